"""Operators on the models people use: attention, recurrent nets, train-mode layers, padding labels.

Every reference is dense float64, built by reverse-over-reverse (``torch.autograd.functional``),
never ``torch.func.hessian``, whose forward-over-reverse is wrong through ``nn.LayerNorm`` in
torch 2.13. The reference risk is the loss torch computes over all batches' outputs together,
each batch's forward run as the operator runs it (its batch statistics, its seeded dropout mask).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import curvopt
from curvopt.curvature.model_state import curvature_pass, seed_batch
from curvopt.errors import DenseSizeError, UnsupportedLossError

TOL = dict(rtol=1e-8, atol=1e-10)
EXACT_BACKENDS = ("hessian", "ggn", "empirical_fisher")


# ---------------------------------------------------------------- models
class Encoder(nn.Module):
    """Tokens -> TransformerEncoderLayer (PyTorch defaults but the sizes) -> mean -> classifier."""

    def __init__(self, d=2, heads=2, ff=3, classes=3, dropout=0.1, norm_first=False, layer="encoder"):
        super().__init__()
        self.embed = nn.Linear(2, d)
        if layer == "encoder":
            self.block = nn.TransformerEncoderLayer(d, heads, ff, dropout=dropout, batch_first=True,
                                                    norm_first=norm_first)
        else:
            self.block = nn.TransformerDecoderLayer(d, heads, ff, dropout=dropout, batch_first=True)
        self.layer = layer
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        if self.layer == "encoder":
            h = self.block(h)
        else:
            mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1], dtype=h.dtype)
            h = self.block(h, h, tgt_mask=mask, tgt_is_causal=True)
        return self.head(h.mean(1))


class MaskedAttention(nn.Module):
    """``nn.MultiheadAttention`` with a key-padding mask (the last tokens are padding)."""

    def __init__(self, d=2, heads=2, classes=3, pad=1):
        super().__init__()
        self.embed = nn.Linear(2, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, classes)
        self.pad = pad

    def forward(self, x):
        h = self.embed(x)
        mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        mask[:, x.shape[1] - self.pad:] = True
        a, _ = self.attn(h, h, h, key_padding_mask=mask, need_weights=False)
        return self.head(a[:, 0])


class CausalSDPA(nn.Module):
    """``F.scaled_dot_product_attention`` with ``is_causal=True``, then a per-position classifier
    (outputs ``[N, C, T]`` for cross entropy over positions)."""

    def __init__(self, d=3, classes=3):
        super().__init__()
        self.qkv = nn.Linear(2, 3 * d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(torch.tanh(self.norm(h))).transpose(1, 2)


class Recurrent(nn.Module):
    def __init__(self, kind="lstm", hidden=3, classes=3, batch_first=True):
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(2, hidden, batch_first=batch_first)
        self.head = nn.Linear(hidden, classes)
        self.batch_first = batch_first

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


def bn_net(classes=3):
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, classes))


# ---------------------------------------------------------------- dense references
def _params(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = tuple(p.detach().clone() for n, p in model.named_parameters() if p.requires_grad)
    return names, values


def _outputs(model, batches, names, ps, seed=0):
    """The batches' outputs, each batch's forward as the operators run it (inside curvature_pass,
    its dropout mask seeded by its index)."""
    outs = []
    for i, (X, _) in enumerate(batches):
        seed_batch(i, seed)
        outs.append(functional_call(model, dict(zip(names, ps)), (X,)))
    return outs


def _flat(blocks):
    return torch.cat([b.reshape(b.shape[0], -1) if b.dim() > 1 else b.reshape(1, -1) for b in blocks], dim=1)


def dense_hessian(model, loss_fn, batches, seed=0):
    names, values = _params(model)
    y = torch.cat([b[1] for b in batches])

    def risk(*ps):
        return loss_fn(torch.cat(_outputs(model, batches, names, ps, seed)), y)

    with curvature_pass(model):
        H = hessian(risk, values)
    P = sum(v.numel() for v in values)
    return torch.cat([torch.cat([h.reshape(a.numel(), b.numel()) for h, b in zip(row, values)], 1)
                      for row, a in zip(H, values)], 0).reshape(P, P)


def _jacobian(model, batches, seed=0):
    names, values = _params(model)

    def net(*ps):
        return torch.cat(_outputs(model, batches, names, ps, seed))

    with curvature_pass(model):
        out = net(*values).detach()
        J = jacobian(net, values)
    return torch.cat([j.reshape(out.numel(), -1) for j in J], 1), out


def dense_ggn(model, loss_fn, batches, seed=0):
    J, out = _jacobian(model, batches, seed)
    y = torch.cat([b[1] for b in batches])
    H = hessian(lambda o: loss_fn(o, y), out).reshape(out.numel(), out.numel())
    return J.T @ H @ J


def dense_empirical_fisher(model, loss_fn, batches, seed=0):
    """``c sum_n g_n g_n^T``: per-sample gradients of the unreduced loss, ``c`` the reduction's factor
    measured from torch's own reduced and summed losses."""
    names, values = _params(model)
    y = torch.cat([b[1] for b in batches])
    per_term = copy.copy(loss_fn)
    per_term.reduction = "none"

    def terms(*ps):
        out = torch.cat(_outputs(model, batches, names, ps, seed))
        return per_term(out, y).reshape(out.shape[0], -1).sum(1)

    with curvature_pass(model):
        G = torch.cat([j.reshape(y.shape[0], -1) for j in jacobian(terms, values)], 1)
        out = torch.cat(_outputs(model, batches, names, values, seed)).detach()
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    c = float(loss_fn(out, y) / summed(out, y))
    return c * G.T @ G


REFERENCES = {"hessian": dense_hessian, "ggn": dense_ggn, "empirical_fisher": dense_empirical_fisher}


def _close(A, B, **tol):
    torch.testing.assert_close(A, B, **(tol or TOL))


def _data(n, T, classes, seed, splits=None, dtype=torch.float64, pad_targets=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, T, 2, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    if pad_targets:
        y[-pad_targets:] = -100
    splits = splits or [n]
    return list(zip(X.split(splits), y.split(splits)))


# ---------------------------------------------------------------- attention
@settings(max_examples=5)
@given(heads=st.sampled_from([1, 2]), mode=st.sampled_from(["train", "eval"]),
       norm_first=st.booleans(), seed=st.integers(0, 2**16), split=st.integers(1, 4))
def test_transformer_encoder_layer_is_exact_in_both_modes(heads, mode, norm_first, seed, split):
    """PyTorch defaults (the fused CPU attention kernel, the eval-mode fast path) but dropout 0, so the
    dense reference is the plain network; backends pick a twice differentiable path themselves."""
    torch.manual_seed(seed)
    model = Encoder(heads=heads, dropout=0.0, norm_first=norm_first).double()
    getattr(model, mode)()
    batches = _data(5, 3, 3, seed, splits=[split, 5 - split])
    loss_fn = nn.CrossEntropyLoss()
    for name in EXACT_BACKENDS:
        op = curvopt.curvature(name, model, loss_fn, batches)
        _close(op.to_dense(), REFERENCES[name](model, loss_fn, batches))
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is back


def test_attention_variants_exact_for_every_backend():
    """Key-padding masks, causal SDPA with [N, C, T] outputs and LayerNorm, a decoder layer."""
    torch.manual_seed(0)
    cases = [(MaskedAttention().double(), nn.CrossEntropyLoss(), _data(4, 3, 3, 1, splits=[3, 1])),
             (Encoder(layer="decoder", dropout=0.0).double().eval(), nn.CrossEntropyLoss(), _data(4, 3, 3, 2)),
             (CausalSDPA().double(), nn.CrossEntropyLoss(reduction="sum"),
              [(X, torch.randint(0, 3, (X.shape[0], 3))) for X, _ in _data(4, 3, 3, 3, splits=[2, 2])])]
    for model, loss_fn, batches in cases:
        for name in EXACT_BACKENDS:
            op = curvopt.curvature(name, model, loss_fn, batches)
            _close(op.to_dense(), REFERENCES[name](model, loss_fn, batches))
        blocks = curvopt.curvature("block_diagonal", model, loss_fn, batches, base="ggn").to_dense()
        full = dense_ggn(model, loss_fn, batches)
        _close(blocks[:4, :4], full[:4, :4])


def test_layernorm_reference_is_reverse_over_reverse():
    """The trap: torch.func.hessian (forward-over-reverse) is wrong through LayerNorm in torch 2.13.
    curvopt's Hessian must agree with reverse-over-reverse and with finite differences of the gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    H = curvopt.curvature("hessian", model, loss_fn, (X, y)).to_dense()
    names, values = _params(model)
    theta = torch.cat([v.reshape(-1) for v in values])

    def grad_at(t):
        ps, i = [], 0
        for v in values:
            ps.append(t[i:i + v.numel()].reshape(v.shape).requires_grad_())
            i += v.numel()
        loss = loss_fn(functional_call(model, dict(zip(names, ps)), (X,)), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps)])

    eps = 1e-6
    fd = torch.stack([(grad_at(theta + eps * e) - grad_at(theta - eps * e)) / (2 * eps)
                      for e in torch.eye(theta.numel(), dtype=torch.float64)], 1)
    _close(H, dense_hessian(model, loss_fn, [(X, y)]))
    _close(H, fd, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- recurrent nets
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_float32_falls_back_to_reverse_mode(kind, batch_first):
    """Float32 LSTM on CPU has no forward-mode AD (mkldnn_rnn_layer): the GGN family switches to a
    reverse-mode J v once, visibly, with the numbers of a float64 reference."""
    torch.manual_seed(0)
    model = Recurrent(kind, batch_first=batch_first)
    batches = [(X.float(), y) for X, y in _data(5, 3, 3, 0, splits=[3, 2])]
    loss_fn = nn.CrossEntropyLoss()
    ref_model = copy.deepcopy(model).double()
    ref_batches = [(X.double(), y) for X, y in batches]
    for name in ("ggn", "empirical_fisher", "hessian"):
        for cache in (False, True):
            op = curvopt.curvature(name, model, loss_fn, batches, cache=cache)
            dense = op.to_dense().double()
            _close(dense, REFERENCES[name](ref_model, loss_fn, ref_batches), rtol=2e-4, atol=2e-5)
    fisher = curvopt.curvature("fisher", model, loss_fn, batches)
    v = torch.randn(fisher.shape[0])
    assert torch.isfinite(fisher @ v).all()
    if kind == "lstm":
        assert fisher.jacobian_mode == "reverse" and "jacobian_mode='reverse'" in repr(fisher)
    linearized = curvopt.curvature("ggn", model, loss_fn, batches, cache="linearize")
    _close(linearized @ v, curvopt.curvature("ggn", model, loss_fn, batches) @ v, rtol=1e-5, atol=1e-6)


@settings(max_examples=4)
@given(hidden=st.integers(1, 3), seed=st.integers(0, 2**16), kind=st.sampled_from(["lstm", "gru"]))
def test_recurrent_float64_exact(hidden, seed, kind):
    torch.manual_seed(seed)
    model = Recurrent(kind, hidden=hidden).double()
    batches = _data(4, 3, 3, seed, splits=[1, 3])
    for name in EXACT_BACKENDS:
        op = curvopt.curvature(name, model, nn.CrossEntropyLoss(), batches)
        _close(op.to_dense(), REFERENCES[name](model, nn.CrossEntropyLoss(), batches))


def test_newton_optimizer_with_ggn_on_float32_lstm():
    torch.manual_seed(0)
    model = Recurrent("lstm")
    (X, y), = _data(8, 3, 3, 0, dtype=torch.float32)
    opt = curvopt.NewtonMR(model.parameters(), curvature="ggn", damping=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    before = float(loss_fn(model(X), y))
    for _ in range(3):
        opt.step(curvopt.batch_closure(model, loss_fn, X, y))
    assert float(loss_fn(model(X), y)) < before


# ---------------------------------------------------------------- train-mode layers
def test_train_mode_batchnorm_is_the_batch_loss_and_leaves_statistics_alone():
    torch.manual_seed(0)
    model = bn_net().double().train()
    model[3].p = 0.0  # dropout is tested on its own below
    batches = _data(7, 1, 3, 0, splits=[4, 3])
    batches = [(X[:, 0], y) for X, y in batches]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss_fn = nn.CrossEntropyLoss()
    for name in EXACT_BACKENDS:
        for cache in (False, True):
            op = curvopt.curvature(name, model, loss_fn, batches, cache=cache)
            _close(op.to_dense(), REFERENCES[name](model, loss_fn, batches))
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert model.training and model[1].track_running_stats
    # the eval-mode curvature is a different matrix: the batch statistics do enter
    eval_model = copy.deepcopy(model).eval()
    assert not torch.allclose(curvopt.curvature("hessian", eval_model, loss_fn, batches).to_dense(),
                              dense_hessian(model, loss_fn, batches))


def test_train_mode_dropout_gives_one_matrix():
    """One mask per batch, seeded: identical products agree, the matrix is symmetric and equals the
    dense curvature of the network with those masks; the user's RNG stream is untouched."""
    torch.manual_seed(0)
    model = bn_net().double().train()
    model[1].eval()
    batches = [(X[:, 0], y) for X, y in _data(6, 1, 3, 1, splits=[3, 3])]
    loss_fn = nn.CrossEntropyLoss()
    for name in EXACT_BACKENDS:
        op = curvopt.curvature(name, model, loss_fn, batches)
        v, w = torch.randn(op.shape[0], dtype=torch.float64), torch.randn(op.shape[0], dtype=torch.float64)
        state = torch.get_rng_state()
        Av, Av2 = op @ v, op @ v
        assert torch.equal(torch.get_rng_state(), state)
        _close(Av, Av2)
        _close(w @ (op @ v), v @ (op @ w))
        _close(op.to_dense(), REFERENCES[name](model, loss_fn, batches))
        _close(op @ torch.stack([v, w], 1), torch.stack([Av, op @ w], 1))  # vmapped columns: same masks


def test_newton_steps_update_batchnorm_like_one_training_step():
    torch.manual_seed(0)
    model = bn_net().double().train()
    X, y = torch.randn(16, 2, dtype=torch.float64), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    for cls in (curvopt.NewtonMR, curvopt.TrustRegion, curvopt.ARC):
        m = copy.deepcopy(model)
        plain = copy.deepcopy(model)
        plain(X)  # one training forward
        opt = cls(m.parameters(), curvature="ggn", damping=1e-3)
        opt.step(curvopt.batch_closure(m, loss_fn, X, y))
        assert int(m[1].num_batches_tracked) == 1, cls.__name__
        _close(m[1].running_mean, plain[1].running_mean)


# ---------------------------------------------------------------- loss semantics
@settings(max_examples=8)
@given(pad=st.integers(0, 3), smoothing=st.sampled_from([0.0, 0.2]), reduction=st.sampled_from(["mean", "sum"]),
       split=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_ignored_targets_and_label_smoothing(pad, smoothing, reduction, split, seed):
    """The risk is the loss torch computes over all batches: ignored targets weigh zero and the mean
    runs over the counted targets across batches (a batch of padding only adds nothing)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    batches = _data(6, 1, 3, seed, splits=[split, 6 - split], pad_targets=pad)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing, reduction=reduction)
    for name in EXACT_BACKENDS:
        op = curvopt.curvature(name, model, loss_fn, batches)
        _close(op.to_dense(), REFERENCES[name](model, loss_fn, batches))


def test_ignore_index_with_sequence_outputs():
    torch.manual_seed(0)
    model = CausalSDPA().double()
    batches = []
    for X, _ in _data(5, 3, 3, 4, splits=[2, 3]):
        y = torch.randint(0, 3, (X.shape[0], 3))
        y[0, 1:] = 7
        batches.append((X, y))
    loss_fn = nn.CrossEntropyLoss(ignore_index=7)
    for name in EXACT_BACKENDS:
        _close(curvopt.curvature(name, model, loss_fn, batches).to_dense(),
               REFERENCES[name](model, loss_fn, batches))


def test_fisher_ignores_padding():
    """Padding samples at the end of each batch change nothing (the label draws of the others are
    the same), whatever their inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    X, y = torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 3, (6,))
    noise = torch.randn(2, 2, dtype=torch.float64)
    padded = [(torch.cat([X[:3], noise]), torch.cat([y[:3], y.new_full((2,), -100)])), (X[3:], y[3:])]
    plain = [(X[:3], y[:3]), (X[3:], y[3:])]
    for name in ("fisher", "ggn", "empirical_fisher", "hessian"):
        _close(curvopt.curvature(name, model, nn.CrossEntropyLoss(), padded).to_dense(),
               curvopt.curvature(name, model, nn.CrossEntropyLoss(), plain).to_dense())


def test_plain_loss_functions_reduction_detected_or_declared():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, Y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    batches = [(X[:3], Y[:3]), (X[3:], Y[3:])]

    def summed(out, y):
        return ((out - y) ** 2).sum()

    def averaged(out, y):
        return ((out - y) ** 2).sum(1).mean()

    for loss_fn in (summed, averaged):
        op = curvopt.curvature("hessian", model, loss_fn, batches)
        _close(op.to_dense(), dense_hessian(model, nn.MSELoss(reduction="sum"), batches)
               / (1 if loss_fn is summed else 5))
        assert op.reduction == ("sum" if loss_fn is summed else "mean")

    def odd(out, y):
        return ((out - y) ** 2).sum().sqrt()

    with pytest.raises(UnsupportedLossError, match="reduction="):
        curvopt.curvature("hessian", model, odd, batches) @ torch.zeros(17, dtype=torch.float64)
    declared = curvopt.curvature("hessian", model, odd, batches, reduction="sum")
    assert declared.reduction == "sum"


# ---------------------------------------------------------------- caches
def _changes(model, optimizer):
    p = next(model.parameters())
    state = copy.deepcopy(model.state_dict())
    for k in state:
        state[k] = state[k] + 0.1
    new = torch.nn.utils.parameters_to_vector(model.parameters()).detach() * 1.1
    return {
        "data_copy": lambda: p.data.copy_(p.data * 1.5),
        "data_rebind": lambda: setattr(p, "data", p.data * 0.5),
        "vector_to_parameters": lambda: torch.nn.utils.vector_to_parameters(new, model.parameters()),
        "load_state_dict": lambda: model.load_state_dict(state),
        "no_grad_inplace": lambda: torch.no_grad()(lambda: p.mul_(0.7))(),
        "optimizer": lambda: (optimizer.zero_grad(),
                              model(torch.randn(3, 2, dtype=torch.float64)).sum().backward(), optimizer.step()),
    }


@pytest.mark.parametrize("name,cache", [("ggn", True), ("ggn", "linearize"), ("hessian", True),
                                        ("empirical_fisher", True), ("kfac", False)])
def test_caches_follow_every_parameter_change(name, cache):
    torch.manual_seed(0)
    for change in _changes(nn.Linear(1, 1), None):
        model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        X, y = torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 2, (6,))
        op = curvopt.curvature(name, model, nn.CrossEntropyLoss(), (X, y), cache=cache)
        v = torch.randn(op.shape[0], dtype=torch.float64)
        op @ v
        _changes(model, torch.optim.SGD(model.parameters(), lr=0.1))[change]()
        fresh = curvopt.curvature(name, model, nn.CrossEntropyLoss(), (X, y))
        _close(op @ v, fresh @ v, msg=f"{name}/{cache} after {change}")


# ---------------------------------------------------------------- memory
def test_to_dense_refuses_what_does_not_fit(monkeypatch):
    model = nn.Linear(3, 2)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    op = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), (torch.randn(4, 3), torch.randint(0, 2, (4,))))
    monkeypatch.setattr(importlib.import_module("curvopt.curvature.base"), "free_memory", lambda device: 100)
    with pytest.raises(DenseSizeError, match=r"8 x 8 float32 .* GiB"):
        op.to_dense()
    assert not calls


def test_closure_returning_a_float_works_or_says_what_is_wrong():
    model = nn.Linear(2, 2).double()
    X, y = torch.randn(4, 2, dtype=torch.float64), torch.randint(0, 2, (4,))

    def closure():
        model.zero_grad()
        loss = nn.CrossEntropyLoss()(model(X), y)
        loss.backward(create_graph=True)
        return float(loss)

    opt = curvopt.NewtonMR(model.parameters())
    assert isinstance(opt.step(closure), float)
    with pytest.raises(curvopt.errors.ClosureError, match="returned NoneType"):
        opt.step(lambda: None)


def test_attention_dropout_batch_first_gives_one_matrix():
    """Train-mode transformer layer, batch_first=True, default dropout: dropout then acts on a
    non-contiguous tensor, whose torch.func derivative is wrong in torch 2.13 unless made contiguous.
    A stochastic model also runs one forward per batch and pass (reverse-mode J v), so the columns
    of op @ V equal single products, and every backend equals its dense reference."""
    torch.manual_seed(0)
    model = Encoder(dropout=0.1).double().train()
    model.block = nn.TransformerEncoderLayer(2, 2, 3, batch_first=True).double()
    batches = _data(3, 3, 3, 0)
    for name in ("ggn", "fisher", "empirical_fisher", "hessian"):
        op = curvopt.curvature(name, model, nn.CrossEntropyLoss(), batches)
        V = torch.randn(op.shape[0], 3, dtype=torch.float64)
        _close(op @ V, torch.stack([op @ V[:, j] for j in range(3)], 1))
        D = op.to_dense()
        _close(D, D.T)
        if name != "hessian":
            assert op.jacobian_mode == "reverse"
        if name in REFERENCES:  # the curvature of the network with the batch's one mask
            _close(D, REFERENCES[name](model, nn.CrossEntropyLoss(), batches))
    eval_op = curvopt.curvature("ggn", copy.deepcopy(model).eval(), nn.CrossEntropyLoss(), batches)
    eval_op @ V[:, 0]
    assert eval_op.jacobian_mode == "forward"  # a deterministic model keeps forward mode


def test_newton_step_evaluations_share_dropout_masks():
    """The step's loss, gradient and trial points see the same masks: a step of length ~0 has ratio ~1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    X, y = torch.randn(16, 2, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt = curvopt.TrustRegion(model.parameters(), curvature="ggn", radius=1e-9, damping=1e-3)
    state = torch.get_rng_state()
    opt.step(curvopt.batch_closure(model, nn.CrossEntropyLoss(), X, y))
    assert torch.equal(torch.get_rng_state(), state)
    assert opt.stats.trial_loss == pytest.approx(opt.stats.loss, rel=1e-6)
    assert opt.stats.ratio is None or opt.stats.ratio == pytest.approx(1.0, abs=1e-2)


def test_hessian_weighs_batches_like_torch_for_weighted_and_nll_losses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5), nn.LogSoftmax(-1)).double()
    X = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 5, (12,))
    y[:2] = -100
    y[7] = -100
    batches = list(zip(X.split([4, 3, 5]), y.split([4, 3, 5])))
    clean = [(Xb, yb.clamp(min=0)) for Xb, yb in batches]
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    for loss_fn, data in [(nn.NLLLoss(), batches), (nn.NLLLoss(weight=w), batches),
                          (nn.CrossEntropyLoss(weight=w), clean), (F.nll_loss, batches)]:
        _close(curvopt.curvature("hessian", model, loss_fn, data).to_dense(), dense_hessian(model, loss_fn, data))
    with pytest.raises(UnsupportedLossError, match="negative class indices"):
        curvopt.curvature("hessian", model, lambda o, t: F.nll_loss(o, t), batches).to_dense()


def test_kfac_on_tied_embedding_and_solve_defaults():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(5, 3), nn.Linear(3, 5)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(torch.tanh(self.emb(x)).mean(1))

    torch.manual_seed(0)
    model = Tied().double()
    x, y = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3,))
    with pytest.warns(UserWarning, match="emb.weight, out.bias"):
        op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (x, y))
    # tied weight: exact diagonal blocks, i.e. the diagonal of the GGN
    ggn = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    _close(op.to_dense(), torch.diag(ggn.diagonal()))
    with pytest.raises(curvopt.errors.OptionError, match="method='kronecker' needs damping > 0.*minres"):
        op.solve(torch.ones(op.shape[0], dtype=torch.float64))
    sequence = curvopt.curvature("kfac", nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5)).double(),
                                 nn.CrossEntropyLoss(), (x, torch.randint(0, 5, (3, 4))))
    with pytest.raises(curvopt.errors.ShapeError, match=r"\[N, C, T\].*'ggn'"):
        sequence @ torch.zeros(sequence.shape[0], dtype=torch.float64)


def test_operators_follow_a_replaced_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, y = torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 2, (5,))
    ops = [curvopt.curvature(n, model, nn.CrossEntropyLoss(), (X, y), cache=c)
           for n, c in [("ggn", True), ("hessian", False), ("kfac", False)]]
    v = torch.randn(ops[0].shape[0], dtype=torch.float64)
    for op in ops:
        op @ v
    model[0].weight = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    for op in ops:
        _close(op @ v, curvopt.curvature(op.name, model, nn.CrossEntropyLoss(), (X, y)) @ v)
    model[0].weight = nn.Parameter(torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(curvopt.errors.ParameterError, match="'0.weight' was replaced by one of shape"):
        ops[0] @ v


@pytest.mark.parametrize("kind", ["attention", "lstm"])
def test_kfac_diagonal_blocks_per_sample_path_equals_batch_path(monkeypatch, kind):
    """Samples that the network treats independently get their diagonal blocks from per-sample
    gradients (vmapped, or one sample at a time where vmap cannot batch, as for LSTM): linear in the
    batch size; the result equals the batch-graph backward passes."""
    from curvopt.curvature.kfac import KFACOperator

    torch.manual_seed(0)
    model = (MaskedAttention() if kind == "attention" else Recurrent("lstm")).double()
    batches = _data(6, 3, 3, 5, splits=[4, 2], pad_targets=1)
    original = KFACOperator._per_sample_diagonal
    monkeypatch.setattr(KFACOperator, "_per_sample_diagonal", lambda self, *a: None)
    slow = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), batches, fisher_type="empirical").to_dense()
    used = []

    def recorded(self, *args):
        result = original(self, *args)
        used.append(result is not None)
        return result

    monkeypatch.setattr(KFACOperator, "_per_sample_diagonal", recorded)
    fast = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), batches, fisher_type="empirical").to_dense()
    _close(fast, slow)
    assert used == [True, True]


def test_plain_closure_trial_points_leave_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double().train()
    X, y = torch.randn(16, 2, dtype=torch.float64), torch.randint(0, 3, (16,))

    def closure():
        model.zero_grad()
        loss = nn.CrossEntropyLoss()(model(X), y)
        loss.backward(create_graph=True)
        return loss

    for cls in (curvopt.NewtonMR, curvopt.TrustRegion, curvopt.ARC):
        model[1].reset_running_stats()
        opt = cls(model.parameters())
        opt.step(closure)
        assert opt.stats.evaluations >= 2
        assert int(model[1].num_batches_tracked) == 1, cls.__name__  # the step's own loss only
        assert model[1].track_running_stats
