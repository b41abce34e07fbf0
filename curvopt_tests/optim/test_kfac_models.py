"""curvopt.KFAC on the models and loops people use: attention, recurrent layers, a Linear applied twice,
half precision, GradScaler without ``grad_scaler=``, forwards without backward, zero_grad after forward."""

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
from torch import nn

import curvopt
from curvopt.errors import OptionError


def _mlp(d_in=6, hidden=8, classes=3):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def _batches(n_batches=3, n=16, d_in=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g))
            for _ in range(n_batches)]


class _Twice(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_linear_applied_twice_has_the_operators_factors():
    """The first step's factors are the batch's: they equal the kfac operator's empirical-Fisher factors
    (expand over the two applications). G was 2x too large: both applications counted their samples."""
    torch.manual_seed(0)
    model = _Twice().double()
    X, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y), fisher_type="empirical")
    expected = {layer.module_name: (layer.A.clone(), layer.G.clone()) for layer in op.factors()}
    opt = curvopt.KFAC(model.parameters())
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    for name, (A, G) in expected.items():
        state = opt.state[getattr(model, name).weight]
        torch.testing.assert_close(state["A"], A)
        torch.testing.assert_close(state["G"], G)


def test_forwards_without_backward_keep_nothing_and_add_nothing():
    """Validation without ``torch.no_grad()`` between training steps: no output (hence no graph) of those
    forwards outlives the user's reference beyond the latest one, and the factors are those of the
    training batches alone."""
    torch.manual_seed(0)
    model, reference = _mlp(), None
    reference = copy.deepcopy(model)
    opt, ref_opt = curvopt.KFAC(model.parameters()), curvopt.KFAC(reference.parameters())
    (X, y), (Xv, _) = _batches(2)
    alive = []
    for _ in range(20):
        alive.append(weakref.ref(model(Xv)))  # validation forward with gradients enabled, no backward
    gc.collect()
    assert sum(r() is not None for r in alive) <= 1
    for m, o in ((model, opt), (reference, ref_opt)):
        o.zero_grad()
        nn.functional.cross_entropy(m(X), y).backward()
        o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        for key in ("A", "G"):
            if key in ref_opt.state[q]:
                torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key])
        torch.testing.assert_close(p, q)


def test_zero_grad_between_forward_and_backward_keeps_the_statistics():
    """``out = model(X); opt.zero_grad(); loss.backward(); opt.step()`` is a common order: the statistics
    come with the gradients, so the factors update (before, they were dropped with the forward's records)."""
    torch.manual_seed(0)
    model = _mlp()
    reference = copy.deepcopy(model)
    opt, ref_opt = curvopt.KFAC(model.parameters()), curvopt.KFAC(reference.parameters())
    for X, y in _batches(2):
        out = model(X)
        opt.zero_grad()
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(X), y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert "A" in opt.state[model[0].weight]


def test_grad_scaler_without_the_option_matches_the_unscaled_run():
    """``scaler.step(optimizer)`` hands its scale to KFAC (amp scaling protocol): no ``grad_scaler=`` needed."""
    torch.manual_seed(0)
    plain = _mlp()
    scaled = copy.deepcopy(plain)
    opt_plain, opt_scaled = curvopt.KFAC(plain.parameters()), curvopt.KFAC(scaled.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for X, y in _batches(4):
        opt_plain.zero_grad()
        nn.functional.cross_entropy(plain(X), y).backward()
        opt_plain.step()
        opt_scaled.zero_grad()
        scaler.scale(nn.functional.cross_entropy(scaled(X), y)).backward()
        scaler.step(opt_scaled)
        scaler.update()
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-8)  # unscaled in place


def test_grad_scaler_skips_a_step_with_inf_gradients_silently():
    torch.manual_seed(0)
    model = _mlp()
    opt = curvopt.KFAC(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    (X, y), = _batches(1)
    before = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(X), y) * float("inf")).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaler's own skip: no warning from KFAC
        scaler.step(opt)
    scaler.update()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() < 2.0**12 and not opt.state[model[0].weight]


def test_bfloat16_model_trains_with_float32_factors_through_a_state_dict_round_trip():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    model = copy.deepcopy(ref).to(torch.bfloat16)
    opt = curvopt.KFAC(model.parameters(), lr=0.05, inverse_every=2)
    ref_opt = curvopt.KFAC(ref.parameters(), lr=0.05, inverse_every=2)
    batches = _batches(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNorm's diagonal block
        for X, y in batches:
            for m, o, x in ((model, opt, X.to(torch.bfloat16)), (ref, ref_opt, X)):
                o.zero_grad()
                nn.functional.cross_entropy(m(x).float(), y).backward()
                o.step()
    keys = ("A", "G", "inv_A", "inv_G", "diag")
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert all(opt.state[p][k].dtype == torch.float32 for k in keys if k in opt.state[p])
        assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
    for p, q in zip(model.parameters(), ref.parameters()):  # bf16 keeps ~3 digits per step
        torch.testing.assert_close(p.float(), q, rtol=0.05, atol=0.02)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = curvopt.KFAC(model.parameters(), lr=0.05, inverse_every=2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for p in model.parameters():
        for k in keys:
            if k in opt.state[p]:
                assert resumed.state[p][k].dtype == torch.float32
                assert torch.equal(resumed.state[p][k], opt.state[p][k])


class _Recurrent(nn.Module):
    def __init__(self, cls, batch_first):
        super().__init__()
        self.rnn = cls(3, 4, batch_first=batch_first)
        self.head = nn.Linear(4, 3)
        self.batch_first = batch_first

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.batch_first else out[-1])


def test_recurrent_diagonal_counts_samples_along_the_batch_dimension():
    """batch_first=False: the first step's diagonal block is N * grad**2 with N the batch (dim 1), not the
    sequence length (dim 0)."""
    torch.manual_seed(0)
    model = _Recurrent(nn.LSTM, batch_first=False)
    opt = curvopt.KFAC(model.parameters())
    X, y = torch.randn(7, 4, 3), torch.randint(0, 3, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        grads = {p: p.grad.clone() for p in model.rnn.parameters()}
        opt.step()
    for p, g in grads.items():
        torch.testing.assert_close(opt.state[p]["diag"], 4 * g.square())


def test_transformer_trains_with_attention_in_diagonal_blocks():
    """out_proj's forward never runs inside attention: it falls back to a diagonal block, named."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(5 * 8, 3))
    # fresh curvature at every one of the 15 steps (the defaults refresh it every 20)
    opt = curvopt.KFAC(model.parameters(), lr=0.02, damping=1e-3, factor_every=1, inverse_every=10)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 5, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(15):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert any("MultiheadAttention.out_proj.weight (8, 8)" in str(w.message) for w in caught)
    assert "A" in opt.state[layer.linear1.weight] and "diag" in opt.state[layer.self_attn.out_proj.weight]
    assert losses[-1] < 0.5 * losses[0]


def test_unscale_before_scaler_step_needs_the_grad_scaler_option():
    """After ``scaler.unscale_(optimizer)`` the gradients are unscaled but the recorded statistics are not,
    and GradScaler.step no longer says by how much: an error naming the fix, not a silently wrong G."""
    torch.manual_seed(0)
    model = _mlp()
    reference = copy.deepcopy(model)
    (X, y), = _batches(1)
    for grad_scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        scaler = grad_scaler or torch.amp.GradScaler("cpu", init_scale=2.0**10)
        m = copy.deepcopy(reference)
        opt = curvopt.KFAC(m.parameters(), grad_scaler=grad_scaler)
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(m(X), y)).backward()
        scaler.unscale_(opt)
        if grad_scaler is None:
            with pytest.raises(OptionError, match="grad_scaler=scaler"):
                scaler.step(opt)
        else:
            scaler.step(opt)
            plain = curvopt.KFAC(reference.parameters())
            plain.zero_grad()
            nn.functional.cross_entropy(reference(X), y).backward()
            plain.step()
            torch.testing.assert_close(opt.state[m[0].weight]["G"], plain.state[reference[0].weight]["G"],
                                       rtol=1e-4, atol=1e-8)
