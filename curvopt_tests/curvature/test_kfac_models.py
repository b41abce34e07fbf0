"""K-FAC operator on the models people use: attention, recurrent layers, layers applied several times or
applied functionally, half precision, train-mode layers and padding targets. Dense references are built
in float64 from per-sample Jacobians (reverse mode) and loss Hessians (reverse-over-reverse)."""

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvopt
from curvopt.errors import UnsupportedModuleError


def _ggn_reference(model, loss_fn, X, y):
    """Dense GGN ``J^T H J`` of the batch loss: ``J`` row by row by reverse mode, ``H`` the loss Hessian in
    the outputs by reverse-over-reverse (``torch.autograd.functional.hessian``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(X)
    rows = []
    for r in range(out.numel()):
        g = torch.autograd.grad(out.reshape(-1)[r], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(g, params)]))
    J = torch.stack(rows)
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out.detach()).reshape(out.numel(), -1)
    return J.T @ H @ J


def _slices(op):
    """``{parameter name: slice of the flat parameter vector}``."""
    out, start = {}, 0
    for name, p in zip(op.param_names, op.params):
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def _assert_diagonal_blocks_exact(op, reference, prefixes):
    K, names = op.to_dense(), _slices(op)
    checked = 0
    for name, s in names.items():
        if name.startswith(prefixes):
            block = K[s, s]
            torch.testing.assert_close(block, torch.diag(reference[s, s].diagonal()), rtol=1e-10, atol=1e-12)
            checked += 1
    assert checked > 0


class _Transformer(nn.Module):
    def __init__(self, d, heads, batch_first):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(d, 3)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.layer(x)
        return self.head(h.mean(1 if self.batch_first else 0))


@given(d=st.sampled_from([4, 6]), heads=st.sampled_from([1, 2]), batch_first=st.booleans(), n=st.integers(1, 3),
       length=st.integers(1, 3), train=st.booleans(), seed=st.integers(0, 99))
def test_attention_parameters_get_the_exact_ggn_diagonal(d, heads, batch_first, n, length, train, seed):
    """Was ``KeyError: 0``: ``out_proj`` is a Linear whose forward never runs inside attention."""
    torch.manual_seed(seed)
    model = _Transformer(d, heads, batch_first).double().train(train)
    shape = (n, length, d) if batch_first else (length, n, d)
    X, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (n,))
    loss = nn.CrossEntropyLoss()
    with pytest.warns(UserWarning, match=r"layer\.self_attn\.out_proj\.weight"):
        op = curvopt.curvature("kfac", model, loss, (X, y))
    _assert_diagonal_blocks_exact(op, _ggn_reference(model, loss, X, y),
                                  ("layer.self_attn.", "layer.norm"))


class _Recurrent(nn.Module):
    def __init__(self, cls, d_in, hidden, batch_first):
        super().__init__()
        self.rnn = cls(d_in, hidden, batch_first=batch_first)
        self.head = nn.Linear(hidden, 3)
        self.batch_first = batch_first

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.batch_first else out[-1])


@given(cls=st.sampled_from([nn.LSTM, nn.GRU, nn.RNN]), batch_first=st.booleans(), d_in=st.integers(1, 3),
       hidden=st.integers(1, 3), n=st.integers(1, 4), length=st.integers(1, 4),
       fisher_type=st.sampled_from(["type2", "empirical"]), seed=st.integers(0, 99))
def test_recurrent_weights_get_the_exact_diagonal(cls, batch_first, d_in, hidden, n, length, fisher_type, seed):
    """Was a broadcast-shape error (per-sample forward passes assumed the batch in dim 0 of the input)."""
    torch.manual_seed(seed)
    model = _Recurrent(cls, d_in, hidden, batch_first).double()
    X = torch.randn(*((n, length) if batch_first else (length, n)), d_in, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    loss = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = curvopt.curvature("kfac", model, loss, (X, y), fisher_type=fisher_type)
    if fisher_type == "type2":
        reference = _ggn_reference(model, loss, X, y)
    else:  # (1/N) sum_n g_n g_n^T of the per-sample loss gradients
        grads = []
        for i in range(n):
            xi = X[i:i + 1] if batch_first else X[:, i:i + 1]
            g = torch.autograd.grad(nn.functional.cross_entropy(model(xi), y[i:i + 1]), list(model.parameters()))
            grads.append(torch.cat([t.reshape(-1) for t in g]))
        G = torch.stack(grads)
        reference = G.T @ G / n
    _assert_diagonal_blocks_exact(op, reference, ("rnn.",))


def test_float32_lstm_uses_reverse_mode_only():
    """float32 LSTM on CPU (mkldnn_rnn_layer) has no forward-mode derivative."""
    torch.manual_seed(0)
    model = _Recurrent(nn.LSTM, 3, 4, True)
    X, y = torch.randn(5, 6, 3), torch.randint(0, 3, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y)).to_dense()
        ref = curvopt.curvature("kfac", model.double(), nn.CrossEntropyLoss(), (X.double(), y)).to_dense()
    torch.testing.assert_close(K.double(), ref, rtol=1e-4, atol=1e-6)


class _Twice(nn.Module):
    """One Linear applied twice in a forward pass (weight sharing across applications)."""

    def __init__(self, d, bias):
        super().__init__()
        self.shared = nn.Linear(d, d, bias=bias)
        self.head = nn.Linear(d, 3)

    def forward(self, x, keep=None):
        s1 = self.shared(x)
        s2 = self.shared(torch.tanh(s1))
        if keep is not None:
            keep += [s1, s2]
        return self.head(torch.tanh(s2))


@given(d=st.integers(1, 4), n=st.integers(1, 5), bias=st.booleans(), seed=st.integers(0, 99))
def test_linear_applied_twice_has_statistics_over_both_applications(d, n, bias, seed):
    """Expand K-FAC by hand: ``A`` the mean of ``[a; 1][a; 1]^T`` over the 2N rows of both applications,
    ``G`` the mean over samples of ``g1 g1^T + g2 g2^T`` (empirical Fisher: per-sample loss gradients at
    each application's output). The old code used the second application only."""
    torch.manual_seed(seed)
    model = _Twice(d, bias).double()
    X, y = torch.randn(n, d, dtype=torch.float64), torch.randint(0, 3, (n,))
    op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y), fisher_type="empirical")
    layer = next(f for f in op.factors() if f.module is model.shared)
    outputs = []
    loss = nn.functional.cross_entropy(model(X, outputs), y, reduction="sum")  # sum: per-sample rows
    g1, g2 = torch.autograd.grad(loss, outputs)
    a = torch.cat([X, torch.tanh(outputs[0]).detach()])
    if bias:
        a = torch.cat([a, torch.ones(2 * n, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(layer.A, a.T @ a / (2 * n))
    torch.testing.assert_close(layer.G, (g1.T @ g1 + g2.T @ g2) / n)


class _Functional(nn.Module):
    """A Linear whose weight is applied with ``F.linear``: its forward (and hooks) never run."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(nn.functional.linear(x, self.inner.weight, self.inner.bias)))


def test_linear_whose_forward_never_runs_gets_the_exact_diagonal():
    torch.manual_seed(0)
    model = _Functional().double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y))
    with pytest.warns(UserWarning, match=r"'inner'.*inner\.weight, inner\.bias"):
        op.factors()
    _assert_diagonal_blocks_exact(op, _ggn_reference(model, nn.CrossEntropyLoss(), X, y), ("inner.",))
    assert [layer.module_name for layer in op.factors()] == ["head"]


def test_train_mode_batchnorm_is_refused_with_the_module_and_the_fix():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(BatchNorm1d\).*model\.eval\(\).*'ggn'/'hessian'"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    model.eval()  # running statistics: samples independent, the diagonal block is exact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y))
    _assert_diagonal_blocks_exact(op, _ggn_reference(model, nn.CrossEntropyLoss(), X, y), ("1.",))


def test_train_mode_dropout_gives_one_matrix_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))) for _ in range(2)]
    state = torch.random.get_rng_state()
    first = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), data).to_dense()
    second = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), data).to_dense()
    assert torch.equal(first, second)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_factors_are_float32_and_products_in_the_model_dtype(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y))
        half = copy.deepcopy(model).to(dtype)
        op = curvopt.curvature("kfac", half, nn.CrossEntropyLoss(), (X.to(dtype), y))
        for a, b in zip(op.factors(), ref.factors()):
            assert a.A.dtype == a.G.dtype == torch.float32
            torch.testing.assert_close(a.A, b.A, rtol=0.05, atol=0.02)  # bf16 keeps ~3 digits of the activations
            torch.testing.assert_close(a.G, b.G, rtol=0.05, atol=1e-3)
        assert all(d.dtype == torch.float32 for d in op.diagonal.values())
        v = torch.randn(op.shape[0])
        Kv = op @ v.to(dtype)
        x = op.solve(v.to(dtype), damping=1e-2)
    assert Kv.dtype == x.dtype == dtype
    torch.testing.assert_close(Kv.float(), ref @ v, rtol=0.05, atol=0.01)
    torch.testing.assert_close(x.float(), ref.solve(v, damping=1e-2), rtol=0.05, atol=0.05)


def test_ignored_targets_do_not_count():
    """Padding targets (-100, ``ignore_index``'s default) weigh zero: the factors and diagonal blocks over a
    batch with some of them equal those over the batch without those samples (mean over counted targets)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4)).double()
    X, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 4, (9,))
    y[[1, 4, 5]] = -100
    kept = y != -100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fisher_type in ("type2", "empirical"):
            padded = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), [(X[:5], y[:5]), (X[5:], y[5:])],
                                       fisher_type=fisher_type)
            clean = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X[kept], y[kept]),
                                      fisher_type=fisher_type)
            torch.testing.assert_close(padded.to_dense(), clean.to_dense())
