"""Sensitivity scores against direct float64 computations on tiny models.

Curvature references are dense blocks by reverse-over-reverse (``torch.autograd.functional.hessian``);
Hutch++ with ``probes >= 3 P`` spans the whole space, so its block traces are exact.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call

import curvopt
from curvopt.curvature.model_state import curvature_pass
from curvopt.errors import OptionError, QuantizationError, UnsupportedModuleError
from curvopt.quant import Quantizer, quantizable_modules
from curvopt.quant.scores import SCORE_NAMES, data_subsets
from curvopt_tests.problems import assert_same_state, model_state


def _problem(seed=0, n=24):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 3, (n,))
    return model, [(X[:10], y[:10]), (X[10:], y[10:])], X, y


def _weight_block(model, loss_fn, X, y, name):
    """Dense Hessian of the loss on ``(X, y)`` with respect to parameter ``name`` alone (eval mode)."""
    p = dict(model.named_parameters())[name]

    def risk(flat):
        return loss_fn(functional_call(model, {name: flat.reshape(p.shape)}, (X,)), y)

    with curvature_pass(model):
        model.eval()
        return hessian(risk, p.detach().reshape(-1).clone())


def _probes(model):
    return 3 * sum(p.numel() for p in model.parameters()) + 3


# ----------------------------------------------------------------------------- curvature scores
def test_hawq_v2_is_the_exact_weight_block_trace_times_the_perturbation():
    model, data, X, y = _problem()
    loss_fn = nn.CrossEntropyLoss()
    q = Quantizer(clipping="minmax")
    report = curvopt.sensitivity(model, data, probes=_probes(model), quantizer=q)
    assert report.score == "hawq_v2" and report.quantizer is q
    table = report.score_table(model, (2, 4, 8))
    assert set(table) == {"0", "2"}
    for name in ("0", "2"):
        H = _weight_block(model, loss_fn, X, y, f"{name}.weight")
        row = report[name]
        assert row.weight == f"{name}.weight" and row.weight_numel == H.shape[0]
        assert math.isclose(row.weight_trace, float(H.trace()), rel_tol=1e-8, abs_tol=1e-12)
        w = model.get_submodule(name).weight
        for b in (2, 4, 8):
            expected = max(float(H.trace()) / H.shape[0], 0.0) * q.error(w, b)
            assert math.isclose(table[name][b], expected, rel_tol=1e-7, abs_tol=1e-14)
    # the last layer's block is positive semi-definite under cross entropy: a real, non-zero score
    assert table["2"][2] > table["2"][4] > table["2"][8] > 0
    # the module rows keep the module's trace (weight and bias) and add up to the total
    assert math.isclose(report["0"].trace + report["2"].trace, report.total_trace, rel_tol=1e-9)


def test_hawq_v1_is_the_top_eigenvalue_of_the_weight_block():
    model, data, X, y = _problem(1)
    report = curvopt.sensitivity(model, data, score="hawq_v1", probes=0)
    table = report.score_table(model, [3])
    q = Quantizer()
    for name in ("0", "2"):
        H = _weight_block(model, nn.CrossEntropyLoss(), X, y, f"{name}.weight")
        top = float(torch.linalg.eigvalsh(H)[-1])
        assert math.isclose(report[name].weight_top_eigenvalue, top, rel_tol=1e-5)
        w = model.get_submodule(name).weight
        assert math.isclose(table[name][3], max(top, 0.0) * q.error(w, 3), rel_tol=1e-5)
    assert math.isnan(report.total_trace)  # probes=0: no trace pass


def test_qbert_uses_mean_plus_std_of_top_eigenvalues_over_ten_seeded_subsets():
    model, data, X, y = _problem(2, n=40)
    report = curvopt.sensitivity(model, data, score="qbert", probes=0, seed=3)
    subsets = data_subsets(data, seed=3)
    assert len(subsets) == 10
    for sub in subsets:
        idx = torch.cat([b[0] for b in sub])
        assert idx.shape[0] == 4  # ceil(10% of 40), distinct samples of the data
        assert all(any(torch.equal(r, x) for x in X) for r in idx)
        assert len({tuple(r.tolist()) for r in idx}) == 4
    again = data_subsets(data, seed=3)
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(subsets, again))
    name = "2"
    eig = []
    for sub in subsets:
        Xs, ys = torch.cat([b[0] for b in sub]), torch.cat([b[1] for b in sub])
        eig.append(float(torch.linalg.eigvalsh(_weight_block(model, nn.CrossEntropyLoss(), Xs, ys,
                                                             "2.weight"))[-1]))
    torch.testing.assert_close(torch.tensor(report[name].qbert_eigenvalues), torch.tensor(eig), rtol=1e-5,
                               atol=1e-10)
    t = torch.tensor(eig, dtype=torch.float64)
    factor = abs(float(t.mean())) + float(t.std(unbiased=True))
    w = model.get_submodule(name).weight
    assert math.isclose(report.score_table(model, [2])[name][2], factor * Quantizer().error(w, 2), rel_tol=1e-5)


@pytest.mark.parametrize("backend", ["fisher", "empirical_fisher"])
def test_fisher_score_is_the_fisher_weight_block_trace(backend):
    model, data, X, y = _problem(3)
    kwargs = {} if backend == "fisher" else {"curvature": backend}
    report = curvopt.sensitivity(model, data, score="fisher", probes=_probes(model), **kwargs)
    assert report.curvature == backend
    table = report.score_table(model, [4])
    for name in ("0", "2"):
        F_w = curvopt.curvature(backend, model, nn.CrossEntropyLoss(), data, params=[f"{name}.weight"]).to_dense()
        assert math.isclose(report[name].weight_trace, float(F_w.trace()), rel_tol=1e-8)
        w = model.get_submodule(name).weight
        expected = float(F_w.trace()) / w.numel() * Quantizer().error(w, 4)
        assert expected > 0 and math.isclose(table[name][4], expected, rel_tol=1e-8)
    with pytest.raises(OptionError, match="fisher"):
        curvopt.sensitivity(model, data, score="fisher", curvature="hessian")


# ----------------------------------------------------------------------------- gptq
class _Mixed(nn.Module):
    """An embedding, a convolution over the sequence and a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.conv = nn.Conv1d(3, 4, kernel_size=2, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens):
        h = torch.tanh(self.conv(self.emb(tokens).transpose(1, 2)))  # [N, 4, T+1]
        return self.head(h.mean(2))


def test_gptq_is_the_expected_squared_output_error_of_each_layer():
    torch.manual_seed(4)
    model = _Mixed().double()
    T, y = torch.randint(0, 6, (11, 5)), torch.randint(0, 2, (11,))
    data = [(T[:4], y[:4]), (T[4:], y[4:])]
    report = curvopt.sensitivity(model, data, score="gptq", probes=0)
    q = Quantizer()
    table = report.score_table(model, [2, 4])
    with torch.no_grad():
        e = model.emb(T)  # [N, T, 3]
        h = torch.tanh(model.conv(e.transpose(1, 2))).mean(2)
        counts = torch.bincount(T.reshape(-1), minlength=6).double() / T.numel()
        torch.testing.assert_close(report.input_moments["emb"], counts)
        torch.testing.assert_close(report.input_moments["head"], h.T @ h / len(h))
        for b in (2, 4):
            D = {n: q.quantize(m.weight, b) - m.weight for n, m in quantizable_modules(model).items()}
            # E over tokens of the squared change of the embedding's output
            emb_err = float((F.embedding(T, D["emb"]) ** 2).sum(-1).mean())
            # E over samples and positions of the squared change of the convolution's output
            conv_err = float((F.conv1d(e.transpose(1, 2), D["conv"], padding=1) ** 2).sum(1).mean())
            head_err = float(((h @ D["head"].T) ** 2).sum(1).mean())
            assert math.isclose(table["emb"][b], emb_err, rel_tol=1e-10)
            assert math.isclose(table["conv"][b], conv_err, rel_tol=1e-10)
            assert math.isclose(table["head"][b], head_err, rel_tol=1e-10)
    assert report.input_moments["conv"].shape == (6, 6)


@settings(max_examples=10, deadline=None)
@given(width=st.integers(1, 5), cut=st.integers(1, 8), bits=st.integers(2, 8), seed=st.integers(0, 100))
def test_gptq_input_moment_is_the_mean_over_all_samples_whatever_the_batches(width, cut, bits, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 3)).double()
    X, y = torch.randn(9, 2, dtype=torch.float64), torch.randint(0, 3, (9,))
    report = curvopt.sensitivity(model, [(X[:cut], y[:cut]), (X[cut:], y[cut:])], score="gptq", probes=0)
    with torch.no_grad():
        a = torch.relu(model[0](X))
        torch.testing.assert_close(report.input_moments["0"], X.T @ X / 9)
        torch.testing.assert_close(report.input_moments["2"], a.T @ a / 9)
        D = Quantizer().quantize(model[2].weight, bits) - model[2].weight
        direct = float(((a @ D.T) ** 2).sum(1).mean())
    assert math.isclose(report.score_table(model, [bits])["2"][bits], direct, rel_tol=1e-9, abs_tol=1e-15)


def test_gptq_names_a_layer_whose_forward_never_runs():
    torch.manual_seed(5)
    model = nn.Sequential(nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, batch_first=True),
                          nn.Flatten(), nn.Linear(12, 2)).double()
    X, y = torch.randn(3, 3, 4, dtype=torch.float64), torch.randint(0, 2, (3,))
    with pytest.raises(UnsupportedModuleError, match=r"'0.self_attn.out_proj'.*hawq_v2"):
        curvopt.sensitivity(model, (X, y), score="gptq", probes=0)


# ----------------------------------------------------------------------------- measured
def test_measured_is_the_loss_with_only_that_layer_quantized_minus_full_precision():
    model, data, X, y = _problem(6)
    loss_fn = nn.CrossEntropyLoss()
    q = Quantizer(symmetric=False)
    before = model_state(model)
    report = curvopt.sensitivity(model, data, score="measured", probes=0, quantizer=q, measured_bits=(2, 8))
    assert_same_state(model, before)
    with torch.no_grad():
        base = float(loss_fn(model(X), y))
        assert math.isclose(report.full_precision_loss, base, rel_tol=1e-12)
        for name in ("0", "2"):
            for b in (2, 8):
                w = model.get_submodule(name).weight
                moved = {f"{name}.weight": q.quantize(w, b)}
                raw = float(loss_fn(functional_call(model, moved, (X,)), y)) - base
                assert math.isclose(report[name].measured_raw[b], raw, rel_tol=1e-9, abs_tol=1e-14)
                assert report[name].measured[b] == max(raw, 0.0)
                assert report.score_table(model, [b])[name][b] == max(raw, 0.0)
    assert report.measured_bits == (2, 8)
    with pytest.raises(QuantizationError, match=r"\[4\] bits.*measured bits: \[2, 8\]"):
        report.score_table(model, [4])
    with pytest.raises(QuantizationError, match="measured with"):
        report.score_table(model, [2], quantizer=Quantizer())
    assert report.score_table(model, [2], quantizer=Quantizer(symmetric=False)) == report.score_table(model, [2])


def test_a_negative_measured_increase_is_kept_raw_and_scored_zero():
    model, data, X, y = _problem(7)
    report = curvopt.sensitivity(model, data, score="measured", probes=0, measured_bits=(2, 3, 4, 5, 6, 7, 8))
    raws = [v for n in ("0", "2") for v in report[n].measured_raw.values()]
    assert any(v < 0 for v in raws), "fixture: some quantization lowers the loss"
    for n in ("0", "2"):
        for b, v in report[n].measured_raw.items():
            assert report.score_table(model, [b])[n][b] == max(v, 0.0) >= 0


# ----------------------------------------------------------------------------- report, restore, errors
class _Net(nn.Module):
    """Train-mode BatchNorm and dropout, a frozen layer and an unused one."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.3)
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.bn(self.frozen(x)))))


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_every_score_leaves_the_model_as_found_and_covers_every_quantizable_module(score):
    torch.manual_seed(8)
    model = _Net().double().train()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    data = [(X[:12], y[:12]), (X[12:], y[12:])]
    before = model_state(model)
    report = curvopt.sensitivity(model, data, score=score, probes=12, bits=3, measured_bits=(2, 3))
    assert_same_state(model, before)
    table = report.score_table(model, [2, 3])
    assert set(table) == {"frozen", "unused", "head"}
    assert all(math.isfinite(v) and v >= 0 for row in table.values() for v in row.values())
    assert table["unused"] == {2: 0.0, 3: 0.0}  # its weight does not reach the loss
    assert report["frozen"].status == "frozen"
    assert report["head"].hawq_score == table["head"][3]  # the display column is the score at bits
    text = str(report)
    assert f"score {score}" in text and "head (Linear)" in text and "bn (BatchNorm1d)" in text
    assert report.to_dict()["score"] == score


def test_a_frozen_layer_gets_its_exact_weight_trace():
    torch.manual_seed(9)
    model = _Net().double().eval()
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 3, (16,))
    report = curvopt.sensitivity(model, (X, y), probes=_probes(model))
    H = _weight_block(model, nn.CrossEntropyLoss(), X, y, "frozen.weight")
    assert math.isclose(report["frozen"].weight_trace, float(H.trace()), rel_tol=1e-8, abs_tol=1e-12)
    assert report.ranking() == ["head", "bn"] or report.ranking() == ["bn", "head"]  # trainable modules only


def test_bad_input_gives_errors_that_name_the_choices():
    model, data, *_ = _problem()
    with pytest.raises(OptionError, match="unknown score 'hawq'.*hawq_v2, hawq_v1, qbert, fisher, gptq, measured"):
        curvopt.sensitivity(model, data, score="hawq")
    with pytest.raises(QuantizationError, match=r"sensitivity\(bits=\.\.\.\)"):
        curvopt.sensitivity(model, data, bits=1)
    with pytest.raises(QuantizationError, match=r"measured_bits"):
        curvopt.sensitivity(model, data, score="measured", measured_bits=(4, 9))
    with pytest.raises(OptionError, match="probes >= 1"):
        curvopt.sensitivity(model, data, probes=0)
    report = curvopt.sensitivity(model, data, probes=6)
    with pytest.raises(QuantizationError, match=r"score_table\(bits=\.\.\.\)"):
        report.score_table(model, [1, 4])
    other = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)).double()
    with pytest.raises(QuantizationError, match="no row for the quantizable module"):
        report.score_table(other, [4])


def test_each_score_is_chosen_by_name_from_the_one_registry():
    from curvopt.quant import SCORES
    from curvopt.quant.scores import CURVATURE_SCORES, FISHER_CURVATURES

    assert SCORE_NAMES == tuple(SCORES.names()) == ("hawq_v2", "hawq_v1", "qbert", "fisher", "gptq", "measured")
    assert CURVATURE_SCORES == ("hawq_v2", "hawq_v1", "qbert", "fisher")
    model, data, *_ = _problem()
    for name in SCORE_NAMES:
        spec = SCORES.get(name)
        # what the entry says is what sensitivity does: the trace it needs, the curvature it defaults to
        if spec.needs_trace:
            with pytest.raises(OptionError, match=f"the '{name}' score needs the trace estimate"):
                curvopt.sensitivity(model, data, score=name, probes=0)
        report = curvopt.sensitivity(model, data, score=name, probes=3, measured_bits=(4,))
        assert report.curvature == spec.default_curvature == ("fisher" if name == "fisher" else "hessian")
        assert spec.curvatures == (FISHER_CURVATURES if name == "fisher" else ())
    with pytest.raises(OptionError, match=r"score='fisher' needs curvature= one of fisher, empirical_fisher "
                                          r"\(Monte-Carlo or empirical Fisher\), got 'ggn'"):
        curvopt.sensitivity(model, data, score="fisher", curvature="ggn")
    with pytest.raises(OptionError, match="unknown score 3; valid scores: hawq_v2, hawq_v1"):
        curvopt.sensitivity(model, data, score=3)
