"""Quantizer: grids, clipping rules (against brute force), asymmetric zero points, groups, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import curvopt.quant.quantizer as quantizer_module
from curvopt.errors import OptionError, QuantizationError
from curvopt.quant.quantizer import QUANTIZER_NAMES, Quantizer, make_quantizer

bits_st = st.integers(2, 8)


def weights(max_rows=5, max_cols=12, min_cols=1):
    """Float64 matrices with channels of different scales, drawn from a seed."""
    return st.tuples(st.integers(1, max_rows), st.integers(min_cols, max_cols), st.integers(0, 2**31 - 1)).map(
        lambda t: torch.randn(t[0], t[1], generator=torch.Generator().manual_seed(t[2]), dtype=torch.float64)
        * torch.rand(t[0], 1, generator=torch.Generator().manual_seed(t[2] + 1), dtype=torch.float64) * 3)


def old_quantize_symmetric(w, bits):
    """A copy of the retired ``curvopt.analysis.quantize.quantize_symmetric``."""
    levels = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    scale = flat.abs().amax(dim=1, keepdim=True) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(flat / scale), -levels, levels) * scale
    return q.reshape(w.shape)


def sym_grid(w, lo, hi, bits):
    """The symmetric grid of the test, written out: levels -L..L, scale hi / L."""
    levels = 2 ** (bits - 1) - 1
    scale = hi / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(w / scale), -levels, levels) * scale


def asym_grid(w, lo, hi, bits):
    """Asymmetric: levels 0..2^b-1, scale (hi - lo) / (2^b - 1), integer zero point round(-lo / scale)."""
    top = 2**bits - 1
    scale = (hi - lo) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(w / scale) + zero, 0, top) - zero) * scale


def brute_force(w, bits, grid, symmetric):
    """Per row: the least-error quantization over the clip ratios k / grid, by enumeration."""
    out = torch.empty_like(w)
    for c in range(w.shape[0]):
        row = w[c]
        if symmetric:
            hi0 = row.abs().max()
            lo0 = -hi0
        else:
            lo0, hi0 = row.min().clamp(max=0), row.max().clamp(min=0)
        best, best_err = None, float("inf")
        for k in range(grid, 0, -1):  # largest ratio first: it wins ties
            r = torch.tensor(k, dtype=w.dtype) / grid
            q = (sym_grid if symmetric else asym_grid)(row, lo0 * r, hi0 * r, bits)
            err = float(((q - row) ** 2).sum())
            if err < best_err:
                best, best_err = q, err
        out[c] = best
    return out


@given(weights(), bits_st)
def test_minmax_reproduces_the_retired_quantize_symmetric(w, bits):
    assert torch.equal(Quantizer(clipping="minmax").quantize(w, bits), old_quantize_symmetric(w, bits))
    conv = w.reshape(w.shape[0], 1, -1, 1)
    assert torch.equal(Quantizer(clipping="minmax").quantize(conv, bits), old_quantize_symmetric(conv, bits))


@given(weights(), bits_st, st.sampled_from(["minmax", "percentile"]), st.floats(50, 100))
def test_symmetric_values_lie_on_the_grid(w, bits, clipping, percentile):
    q = Quantizer(clipping=clipping, percentile=percentile).quantize(w, bits)
    levels = 2 ** (bits - 1) - 1
    clip = (w.abs().amax(1, keepdim=True) if clipping == "minmax"
            else torch.quantile(w.abs(), percentile / 100, dim=1, keepdim=True))
    scale = clip / levels
    for c in range(w.shape[0]):
        if scale[c] == 0:
            assert torch.equal(q[c], torch.zeros_like(q[c]))
            continue
        k = q[c] / scale[c]
        assert torch.allclose(k, k.round(), atol=1e-9)
        assert k.round().abs().max() <= levels  # a symmetric range
        assert q[c].unique().numel() <= 2**bits - 1


@given(weights(max_rows=3, max_cols=8), bits_st, st.integers(1, 25), st.booleans())
def test_mse_clipping_is_the_brute_force_optimum_and_no_worse_than_minmax(w, bits, grid, symmetric):
    q = Quantizer(symmetric=symmetric, grid=grid).quantize(w, bits)
    ref = brute_force(w, bits, grid, symmetric)
    err = ((q - w) ** 2).sum(1)
    ref_err = ((ref - w) ** 2).sum(1)
    torch.testing.assert_close(err, ref_err, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(q, ref, rtol=1e-12, atol=1e-15)
    minmax = Quantizer(symmetric=symmetric, clipping="minmax").quantize(w, bits)
    assert bool((err <= ((minmax - w) ** 2).sum(1) + 1e-15).all())


def test_mse_search_in_chunks_equals_one_chunk(monkeypatch):
    w = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole = Quantizer(grid=50).quantize(w, 3)
    monkeypatch.setattr(quantizer_module, "_SEARCH_CHUNK", 7)  # one ratio at a time
    assert torch.equal(Quantizer(grid=50).quantize(w, 3), whole)


def test_mse_clipping_lowers_the_error_of_a_heavy_tailed_channel():
    w = torch.randn(4, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w[:, 0] = 6.0  # one outlier per channel: min-max spends most of the grid on it
    assert Quantizer().error(w, 3) < 0.5 * Quantizer(clipping="minmax").error(w, 3)


@given(weights(min_cols=2), bits_st, st.floats(1, 99))
def test_percentile_clipping_uses_the_percentile_of_each_channel(w, bits, percentile):
    sym = Quantizer(clipping="percentile", percentile=percentile).quantize(w, bits)
    hi = torch.quantile(w.abs(), percentile / 100, dim=1, keepdim=True)
    torch.testing.assert_close(sym, sym_grid(w, -hi, hi, bits), rtol=1e-14, atol=1e-15)
    asym = Quantizer(symmetric=False, clipping="percentile", percentile=percentile).quantize(w, bits)
    lo = torch.quantile(w, 1 - percentile / 100, dim=1, keepdim=True).clamp(max=0)
    hi = torch.quantile(w, percentile / 100, dim=1, keepdim=True).clamp(min=0)
    torch.testing.assert_close(asym, asym_grid(w, lo, hi, bits), rtol=1e-15, atol=1e-15)


@given(weights(), bits_st)
def test_percentile_100_is_minmax(w, bits):
    for symmetric in (True, False):
        a = Quantizer(symmetric=symmetric, clipping="percentile", percentile=100).quantize(w, bits)
        assert torch.equal(a, Quantizer(symmetric=symmetric, clipping="minmax").quantize(w, bits))


@given(weights(), bits_st, st.floats(-5, 5))
def test_asymmetric_minmax_with_a_shift(w, bits, shift):
    w = w + shift  # channels all positive, all negative or straddling zero
    q = Quantizer(symmetric=False, clipping="minmax").quantize(w, bits)
    lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
    assert torch.equal(q, asym_grid(w, lo, hi, bits))
    scale = (hi - lo) / (2**bits - 1)
    for c in range(w.shape[0]):
        assert q[c].unique().numel() <= 2**bits
        if scale[c] > 0:
            k = q[c] / scale[c]
            assert torch.allclose(k, k.round(), atol=1e-9)  # integer zero point: zero on the grid
            # every value moves by at most half a step (min-max: nothing is clipped)
            assert bool(((q[c] - w[c]).abs() <= scale[c] / 2 * (1 + 1e-9) + 1e-12).all())


@pytest.mark.parametrize("clipping", ["mse", "minmax", "percentile"])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_asymmetric_constant_and_zero_channels_are_exact(clipping, bits):
    w = torch.tensor([[0.7] * 5, [-1.3] * 5, [0.0] * 5, [0.0, 0.0, 2.0, 0.0, -1.0]], dtype=torch.float64)
    q = Quantizer(symmetric=False, clipping=clipping).quantize(w, bits)
    torch.testing.assert_close(q[:3], w[:3], rtol=1e-15, atol=0)
    assert bool((q[3][w[3] == 0] == 0).all())  # zero stays exactly zero


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clipping", ["mse", "minmax", "percentile"])
def test_zero_channels_stay_zero(symmetric, clipping):
    w = torch.randn(3, 7, dtype=torch.float64)
    w[1] = 0
    for bits in range(2, 9):
        q = Quantizer(symmetric=symmetric, clipping=clipping, group_size=3).quantize(w, bits)
        assert torch.equal(q[1], torch.zeros(7, dtype=torch.float64))
        assert bool(torch.isfinite(q).all())


@given(weights(max_cols=20), bits_st, st.integers(1, 8), st.booleans(),
       st.sampled_from(["mse", "minmax", "percentile"]))
def test_groupwise_equals_per_channel_on_each_group(w, bits, g, symmetric, clipping):
    kw = {"symmetric": symmetric, "clipping": clipping, "grid": 20}
    q = Quantizer(group_size=g, **kw).quantize(w, bits)
    per_channel = Quantizer(**kw)
    # groups of g consecutive elements of each row; the last one is shorter when g does not divide it
    ref = torch.cat([per_channel.quantize(w[:, j:j + g], bits) for j in range(0, w.shape[1], g)], dim=1)
    torch.testing.assert_close(q, ref, rtol=0, atol=0)


def test_groups_run_along_the_flattened_input_dims_of_a_conv_kernel():
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    q = Quantizer(group_size=5).quantize(w, 3)
    flat = Quantizer(group_size=5).quantize(w.reshape(4, 12), 3)
    assert torch.equal(q, flat.reshape(4, 3, 2, 2))


def test_half_weights_are_quantized_in_float32_and_keep_their_dtype():
    w = torch.randn(5, 9).half()
    q = Quantizer(group_size=4).quantize(w, 4)
    assert q.dtype == torch.float16 and q.shape == w.shape
    assert torch.equal(q, Quantizer(group_size=4).quantize(w.float(), 4).half())


def test_error_is_the_float64_squared_distance():
    w = torch.randn(6, 11)
    for q in (Quantizer(), Quantizer(symmetric=False, group_size=4)):
        e = q.error(w, 3)
        assert isinstance(e, float)
        assert e == pytest.approx(float(((q.quantize(w, 3).double() - w.double()) ** 2).sum()), rel=1e-15)
    assert Quantizer().error(torch.zeros(2, 3), 2) == 0.0


def test_a_1d_weight_is_one_channel_and_an_empty_one_passes_through():
    w = torch.randn(9, dtype=torch.float64)
    assert torch.equal(Quantizer().quantize(w, 4), Quantizer().quantize(w[None], 4)[0])
    assert Quantizer().quantize(torch.empty(0, 3), 4).shape == (0, 3)


def test_make_quantizer_by_name_and_round_trip():
    assert QUANTIZER_NAMES == ("symmetric", "asymmetric")
    q = make_quantizer("asymmetric", group_size=4, clipping="percentile", percentile=99.0, grid=10)
    assert (q.symmetric, q.group_size, q.clipping, q.percentile, q.grid) == (False, 4, "percentile", 99.0, 10)
    d = q.to_dict()
    again = make_quantizer(d.pop("name"), **d)
    assert repr(again) == repr(q)
    assert make_quantizer("symmetric").symmetric


def test_bad_names_options_and_inputs_are_clear_errors():
    with pytest.raises(OptionError, match="unknown quantizer 'int4'; valid names: symmetric, asymmetric"):
        make_quantizer("int4")
    with pytest.raises(OptionError, match="unknown option 'grup_size'.*group_size"):
        make_quantizer("symmetric", grup_size=4)
    with pytest.raises(QuantizationError, match="clipping.*'mse', 'minmax', 'percentile'.*'max'"):
        Quantizer(clipping="max")
    for bad in (0.0, 100.5, -1, float("nan")):
        with pytest.raises(QuantizationError, match="percentile"):
            Quantizer(percentile=bad)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(QuantizationError, match="group_size"):
            Quantizer(group_size=bad)
    for bad in (0, 1.5):
        with pytest.raises(QuantizationError, match="grid"):
            Quantizer(grid=bad)
    with pytest.raises(QuantizationError, match="symmetric"):
        Quantizer(symmetric="yes")
    w = torch.randn(3, 4)
    for bad in (1, 9, 4.0, True):
        with pytest.raises(QuantizationError, match=r"bits must be an integer in \[2, 8\]"):
            Quantizer().quantize(w, bad)
    w[1, 2] = float("nan")
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        Quantizer().quantize(w, 4)
    with pytest.raises(QuantizationError, match="floating-point"):
        Quantizer().quantize(torch.ones(2, 2, dtype=torch.int64), 4)
