"""The spectral calls with their defaults: accuracy against dense float64 Hessians, and the contexts of an
uncached operator reused within one call (and nothing kept after it)."""

import pytest
import torch
from hypothesis import given
from torch.autograd.functional import hessian
from torch.func import functional_call

import curvopt
from curvopt.analysis.spectrum import AUTO_CACHE_BATCHES
from curvopt.errors import OptionError
from curvopt_tests.problems import problems, reference_hessian


def _hessian(pb) -> torch.Tensor:
    return reference_hessian(pb.model, pb.loss_fn, pb.X, pb.y)


def counting_contexts(op):
    """Wrap ``op``'s per-batch context builders (the context and the one-vector uncached path, which
    differentiates the batch afresh too); the list fills with one entry per batch differentiated."""
    calls = []
    for attr in ("_batch_context", "_batch_single_product"):
        build = getattr(op, attr)

        def counted(*args, build=build):
            calls.append(args[0])
            return build(*args)

        setattr(op, attr, counted)
    return calls


@given(pb=problems())
def test_default_top_eigenvalues_within_their_tolerance(pb):
    """``tol=1e-3`` (default): each of the top 2 eigenvalues within 1e-3 of the dense one, relative to the
    spectral radius (an eigenvalue near 0 of an indefinite Hessian has no relative accuracy to speak of)."""
    H = _hessian(pb)
    ref = torch.linalg.eigvalsh(H).flip(0)
    k = min(2, H.shape[0])
    res = curvopt.top_eigenvalues(curvopt.curvature("hessian", pb.model, pb.loss_fn, pb.data), k)
    scale = float(ref.abs().max()) + 1e-12
    assert res.converged
    assert float((res.eigenvalues - ref[:k]).abs().max()) <= 1e-3 * scale


def _batches(n_batches, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(6 * n_batches, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6 * n_batches,), generator=g)
    return list(zip(X.split(6), y.split(6)))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


@pytest.mark.parametrize("call", ["eig", "power", "trace", "density"])
def test_auto_cache_builds_each_batch_once_per_call_and_keeps_nothing(call):
    model, loss_fn, data = _model(), torch.nn.CrossEntropyLoss(), _batches(3)
    run = {
        "eig": lambda op, c: curvopt.top_eigenvalues(op, 2, tol=1e-8, cache=c).eigenvalues,
        "power": lambda op, c: curvopt.top_eigenvalues(op, 1, tol=1e-8, method="power", cache=c).eigenvalues,
        "trace": lambda op, c: torch.tensor(curvopt.trace(op, 12, per_block=True, cache=c).value),
        "density": lambda op, c: curvopt.spectral_density(op, probes=2, steps=10, cache=c)[1],
    }[call]
    streamed_op = curvopt.curvature("hessian", model, loss_fn, data)
    streamed_calls = counting_contexts(streamed_op)
    streamed = run(streamed_op, False)
    op = curvopt.curvature("hessian", model, loss_fn, data)
    calls = counting_contexts(op)
    reused = run(op, "auto")
    assert calls == [0, 1, 2]  # one context per batch for the whole call
    assert len(streamed_calls) >= 3 * 3  # streaming: each pass (three or more) builds them again
    torch.testing.assert_close(reused, streamed, rtol=1e-12, atol=1e-12)
    assert op.cache is False and op._cached is None  # uncached again, holding nothing
    run(op, "auto")
    assert calls == [0, 1, 2] * 2  # a second call builds its own contexts: nothing was kept


def test_auto_cache_streams_many_batches_and_cache_true_overrides():
    model, loss_fn = _model(), torch.nn.CrossEntropyLoss()
    data = _batches(AUTO_CACHE_BATCHES + 1)
    op = curvopt.curvature("hessian", model, loss_fn, data)
    calls = counting_contexts(op)
    res = curvopt.top_eigenvalues(op, 1)
    assert len(calls) == res.iterations * len(data)
    calls.clear()
    curvopt.top_eigenvalues(op, 1, cache=True)
    assert len(calls) == len(data)
    assert op._cached is None
    with pytest.raises(OptionError, match="cache='yes'; valid: 'auto', True, False"):
        curvopt.top_eigenvalues(op, 1, cache="yes")


def test_auto_cache_of_a_block_diagonal_operator_caches_its_base_and_leaves_a_user_cache_alone():
    model, loss_fn, data = _model(), torch.nn.CrossEntropyLoss(), _batches(2)
    op = curvopt.curvature("block_diagonal", model, loss_fn, data)
    calls = counting_contexts(op.base)
    dense = op.to_dense()
    calls.clear()
    res = curvopt.top_eigenvalues(op, 1, tol=1e-10)
    assert calls == [0, 1]
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(dense)[-1:], rtol=1e-8, atol=1e-10)
    assert op.base.cache is False and op.base._cached is None
    cached = curvopt.curvature("hessian", model, loss_fn, data, cache=True)
    cached @ torch.ones(cached.shape[0], dtype=torch.float64)
    kept = cached._cached
    curvopt.top_eigenvalues(cached, 1)
    assert cached.cache is True and cached._cached is kept  # the user's own cache is used and left in place


class _PartlyLinear(torch.nn.Module):
    """A loss whose gradient in ``shift`` is constant (zero Hessian rows) and a parameter it never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        self.shift = torch.nn.Parameter(torch.tensor(0.3))
        self.unused = torch.nn.Parameter(torch.ones(2))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.body(X) + self.shift * X[:, :1]


def test_uncached_hessian_vector_product_matches_the_dense_hessian():
    """One uncached vector takes the eager double-backward path: it agrees with the dense float64 Hessian,
    with the cached (torch.func) path, and gives zero rows for a parameter whose gradient is constant or
    that the loss never uses."""
    torch.manual_seed(0)
    model = _PartlyLinear().double()
    X, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    loss_fn = torch.nn.MSELoss()
    data = [(X[:5], y[:5]), (X[5:], y[5:])]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def risk(t):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = t[i : i + s.numel()].reshape(s)
            i += s.numel()
        return loss_fn(functional_call(model, params, (X,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = hessian(risk, theta)
    v = torch.randn(theta.shape[0], dtype=torch.float64)
    uncached = curvopt.curvature("hessian", model, loss_fn, data, cache=False)
    cached = curvopt.curvature("hessian", model, loss_fn, data, cache=True)
    out = uncached @ v
    torch.testing.assert_close(out, H @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, cached @ v, rtol=1e-10, atol=1e-12)
    start = sum(p.numel() for n, p in list(model.named_parameters())[: names.index("unused")])
    assert bool((out[start : start + 2] == 0).all())  # the unused parameter
    listed = uncached @ [torch.ones_like(p) for p in model.parameters()]
    assert [tuple(t.shape) for t in listed] == [tuple(s) for s in shapes]
