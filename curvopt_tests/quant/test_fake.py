"""fake_quantized: weights quantized in place and restored bit for bit; tied weights; activations."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from curvopt.errors import EmptyDataError, QuantizationError
from curvopt.quant.activations import fake_quantize_activation
from curvopt.quant.fake import fake_quantized
from curvopt.quant.quantizer import Quantizer


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 4),
                         nn.BatchNorm1d(4), nn.Linear(4, 3)).double()


def bits_of(model):
    return {n: p.detach().clone().view(torch.int64) for n, p in model.named_parameters()}


def same_bits(before, model):
    return all(torch.equal(before[n], p.detach().view(torch.int64)) for n, p in model.named_parameters())


class Tied(nn.Module):
    """An embedding and an output layer sharing one weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5).double()
        self.out = nn.Linear(5, 7, bias=False).double()
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(self.emb(idx))


@given(st.dictionaries(st.sampled_from(["0", "3", "5"]), st.integers(2, 8), min_size=1),
       st.sampled_from([Quantizer(), Quantizer(symmetric=False, group_size=4, clipping="minmax")]))
def test_planned_weights_are_quantized_inside_and_restored_bit_for_bit(plan, quantizer):
    model = net()
    with torch.no_grad():
        model[0].weight[0, 0, 0] = -0.0  # the sign of zero must come back too
    before = bits_of(model)
    params = list(model.parameters())
    with fake_quantized(model, plan, quantizer) as inside:
        assert inside is model and list(model.parameters()) == params  # the same Parameter objects
        for name, m in model.named_children():
            saved = before[f"{name}.weight"].view(torch.float64) if hasattr(m, "weight") else None
            if name in plan:
                assert torch.equal(m.weight, quantizer.quantize(saved, plan[name]))
            elif saved is not None:
                assert torch.equal(m.weight, saved)  # unplanned: untouched
    assert same_bits(before, model)


def test_weights_are_restored_after_an_exception_in_the_block():
    model = net()
    before = bits_of(model)
    with pytest.raises(RuntimeError, match="boom"), fake_quantized(model, {"0": 2, "3": 3}):
        assert not torch.equal(model[0].weight.view(torch.int64), before["0.weight"])
        raise RuntimeError("boom")
    assert same_bits(before, model)


def test_a_failure_part_way_restores_what_was_already_quantized():
    model = net()
    with torch.no_grad():
        model[5].weight[1, 1] = float("nan")
    before = bits_of(model)
    with pytest.raises(QuantizationError, match="weight of '5'.*NaN or Inf"):
        with fake_quantized(model, {"0": 2, "3": 2, "5": 2}):
            pass
    assert same_bits(before, model)


def test_a_tied_weight_is_quantized_once_at_the_largest_bits_of_its_owners():
    model = Tied()
    w = model.emb.weight.detach().clone()
    q = Quantizer()
    for plan in ({"emb": 2, "out": 8}, {"emb": 8, "out": 2}):
        with fake_quantized(model, plan, q):
            assert torch.equal(model.emb.weight, q.quantize(w, 8))
            assert model.out.weight is model.emb.weight
        assert torch.equal(model.emb.weight, w)
    with fake_quantized(model, {"out": 3}, q):  # a planned owner quantizes the weight for both
        assert torch.equal(model.emb.weight, q.quantize(w, 3))
    assert torch.equal(model.emb.weight, w)


def test_activation_quantization_moves_the_output_within_its_step_bound_and_hooks_go():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    X = torch.randn(40, 6, dtype=torch.float64) + 0.3
    y = torch.zeros(40)
    batches = [(X[:15], y[:15]), (X[15:], y[15:])]
    bits = 8
    with fake_quantized(model, {"0": 4}) as m, torch.no_grad():
        weights_only = m(X)
        Wq = m[0].weight.detach().clone()
    with fake_quantized(model, {"0": 4}, activation_bits=bits, calibration=batches) as m, torch.no_grad():
        assert len(m[0]._forward_pre_hooks) == 1
        both = m(X)
    assert len(model[0]._forward_pre_hooks) == 0
    # ranges: min/max of the calibration inputs over every batch, widened to contain 0
    step = (float(X.max()) - min(float(X.min()), 0.0)) / (2**bits - 1)
    bound = Wq.abs().sum(1) * step / 2  # |Wq (Q(x) - x)| <= |Wq| |Q(x) - x|, |Q(x) - x| <= step / 2
    diff = (both - weights_only).abs()
    assert bool((diff <= bound * (1 + 1e-9)).all())
    assert float(diff.max()) > 0  # the activations were quantized
    assert torch.equal(model(X), nn.functional.linear(X, model[0].weight, model[0].bias))


def test_calibration_runs_in_eval_mode_and_leaves_modes_and_buffers():
    model = net().train()
    X = torch.randn(8, 2, 8, dtype=torch.float64)
    buffers = [b.clone() for b in model.buffers()]
    seen = []
    model[4].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    with fake_quantized(model, {"0": 8, "3": 8, "5": 8}, activation_bits=8, calibration=X):
        assert seen == [False]  # calibration: eval mode (running statistics, as deployed)
        assert model.training and model[4].training
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(m.training for m in model.modules())


def test_fake_quantize_activation_grid():
    x = torch.linspace(-1.0, 3.0, 101, dtype=torch.float64)
    for bits in (2, 4, 8):
        q = fake_quantize_activation(x, -1.0, 3.0, bits)
        step = 4.0 / (2**bits - 1)
        assert q.unique().numel() <= 2**bits
        assert bool(((q - x).abs() <= step / 2 + 1e-12).all())
        assert float(fake_quantize_activation(torch.zeros(1, dtype=torch.float64), -1.0, 3.0, bits)) == 0.0
    assert float(fake_quantize_activation(torch.tensor([9.0]), 0.0, 3.0, 8)) == 3.0  # clamped to the range
    assert torch.equal(fake_quantize_activation(torch.zeros(3), 0.0, 0.0, 8), torch.zeros(3))


def test_bad_requests_are_clear_errors_and_change_nothing():
    model = net()
    before = bits_of(model)
    with pytest.raises(QuantizationError, match="no quantizable module 'fc'.*quantizable modules: 0, 3, 5"):
        with fake_quantized(model, {"fc": 4}):
            pass
    with pytest.raises(QuantizationError, match=r"plan\['0'\]: bits must be an integer in \[2, 8\], got 1"):
        with fake_quantized(model, {"0": 1}):
            pass
    with pytest.raises(QuantizationError, match="activation_bits=8.*needs calibration"):
        with fake_quantized(model, {"0": 4}, activation_bits=8):
            pass
    with pytest.raises(QuantizationError, match="activation_bits"):
        with fake_quantized(model, {"0": 4}, activation_bits=16, calibration=torch.zeros(1, 2, 8)):
            pass
    with pytest.raises(EmptyDataError, match="calibration"):
        with fake_quantized(model, {"0": 4}, activation_bits=8, calibration=[]):
            pass
    assert same_bits(before, model)
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_inputs_that_cannot_be_quantized_are_named_in_a_warning():
    model = Tied()
    idx = torch.tensor([[0, 3, 6]])
    with pytest.warns(UserWarning, match="inputs of 'emb' are not quantized"):
        with fake_quantized(model, {"emb": 8, "out": 8}, activation_bits=8, calibration=(idx, idx)) as m:
            assert len(m.out._forward_pre_hooks) == 1 and len(m.emb._forward_pre_hooks) == 0
