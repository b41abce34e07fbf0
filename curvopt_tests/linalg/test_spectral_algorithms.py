"""Lanczos, power iteration, trace, diagonal and density estimators against dense float64 truth."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvopt.curvature.params import module_blocks
from curvopt.linalg import (
    diagonal_estimate,
    lanczos,
    power_iteration,
    slq_nodes,
    spectral_density_from_nodes,
    trace_estimate,
)


@st.composite
def symmetric_matrices(draw, min_size=4, max_size=40):
    """Symmetric matrices with a prescribed, well-separated top of the spectrum."""
    n = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    bulk = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1  # indefinite bulk in [-1, 1]
    top = 2.0 + torch.arange(min(3, n), 0, -1, dtype=torch.float64) * 1.5  # 6.5, 5, 3.5
    ev = bulk.clone()
    ev[: top.shape[0]] = top
    return (Q * ev) @ Q.T


@given(A=symmetric_matrices(), k=st.integers(1, 3))
def test_lanczos_top_k_matches_eigh(A, k):
    k = min(k, A.shape[0])
    ref = torch.linalg.eigvalsh(A).flip(0)[:k]
    res = lanczos(A, k, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-8, atol=1e-8)
    V = res.eigenvectors
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=A.dtype), atol=1e-8, rtol=0)
    torch.testing.assert_close(A @ V, V * res.eigenvalues, atol=1e-6, rtol=0)


@given(A=symmetric_matrices(), seed=st.integers(0, 2**16))
def test_lanczos_default_top_eigenvalue_within_the_asked_tolerance(A, seed):
    """The default stopping rule (k=1, tol=1e-3): the Ritz residual ``||A x - theta x|| <= tol |theta|``, a
    gap-free bound (some eigenvalue lies within it), so the top eigenvalue is within ``tol`` relative; the
    gap-based estimate ``residual**2 / gap`` is not the rule (it stops on unresolved clusters, see
    ``top_eigenvalues``)."""
    res = lanczos(A, generator=torch.Generator().manual_seed(seed))
    top = float(torch.linalg.eigvalsh(A)[-1])
    theta = float(res.eigenvalues[0])
    assert res.converged
    assert float(res.residuals[0]) <= 1e-3 * abs(theta)
    assert abs(theta - top) <= 1e-3 * abs(top)


@given(A=symmetric_matrices())
def test_lanczos_bottom_eigenvalue(A):
    res = lanczos(A, 1, which="smallest", tol=1e-12, max_iter=A.shape[0])
    assert abs(float(res.eigenvalues[0]) - float(torch.linalg.eigvalsh(A)[0])) < 1e-6


@given(A=symmetric_matrices(min_size=6))
def test_lanczos_agrees_with_power_iteration(A):
    g = torch.Generator().manual_seed(1)
    lz = lanczos(A, 2, tol=1e-10, generator=g)
    pw = power_iteration(A, 2, tol=1e-12, max_iter=5000, generator=g)
    torch.testing.assert_close(lz.eigenvalues, pw.eigenvalues, rtol=1e-5, atol=1e-6)
    assert lz.iterations < pw.iterations


class BlockedMatrix:
    """A dense matrix carrying ``blocks``/``params`` like a CurvatureOperator does."""

    def __init__(self, A, cuts):
        n = A.shape[0]
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
        self.A, self.shape, self.dtype, self.device = A, A.shape, A.dtype, A.device
        self.params = [torch.zeros(s) for s in sizes]
        self.blocks = module_blocks([f"b{i}.w" for i in range(len(sizes))], self.params)

    def __matmul__(self, V):
        return self.A @ V


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
@given(A=symmetric_matrices(min_size=6, max_size=30), cuts=st.sets(st.integers(1, 5), max_size=3),
       seed=st.integers(0, 1000))
def test_block_traces_sum_to_the_whole(method, A, cuts, seed):
    op = BlockedMatrix(A, sorted(cuts))
    est = trace_estimate(op, 12, method=method, per_block=True, generator=torch.Generator().manual_seed(seed))
    assert len(est.blocks) == len(op.blocks)
    assert math.isclose(sum(v for v, _ in est.blocks.values()), est.value, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_trace_estimators_are_unbiased_overall_and_per_block(method):
    """Mean over 400 seeded runs lies within 4 standard errors of the exact traces."""
    g = torch.Generator().manual_seed(3)
    n = 24
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = (Q * torch.linspace(-1, 4, n, dtype=torch.float64)) @ Q.T
    op = BlockedMatrix(A, [8, 16])
    runs = [trace_estimate(op, 9, method=method, per_block=True, generator=torch.Generator().manual_seed(s))
            for s in range(400)]
    values = torch.tensor([r.value for r in runs])
    se = float(values.std()) / math.sqrt(len(runs))
    assert abs(float(values.mean()) - float(A.trace())) < 4 * se + 1e-12
    starts = [0, 8, 16, 24]
    for i, name in enumerate(["b0", "b1", "b2"]):
        exact = float(A.diagonal()[starts[i]:starts[i + 1]].sum())
        vals = torch.tensor([r.blocks[name][0] for r in runs])
        assert abs(float(vals.mean()) - exact) < 4 * float(vals.std()) / math.sqrt(len(runs)) + 1e-12
    # the reported standard error describes the spread of single runs
    reported = torch.tensor([r.stderr for r in runs]).mean()
    assert 0.5 < float(reported / values.std()) < 2.0


def test_hutchpp_is_exact_for_low_rank():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(30, 3, generator=g, dtype=torch.float64)
    A = U @ U.T
    est = trace_estimate(A, 12, method="hutchpp", generator=g)
    assert math.isclose(est.value, float(A.trace()), rel_tol=1e-9)


def test_diagonal_estimate_converges():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(20, 20, generator=g, dtype=torch.float64)
    A = B @ B.T
    d, se = diagonal_estimate(A, 4000, generator=g)
    assert ((d - A.diagonal()).abs() < 5 * se).all()


def test_slq_density_integrates_to_one_and_matches_moments():
    g = torch.Generator().manual_seed(0)
    n = 60
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.linspace(-2, 5, n, dtype=torch.float64)
    A = (Q * ev) @ Q.T
    nodes, weights = slq_nodes(A, probes=20, steps=30, generator=g)
    grid, dens = spectral_density_from_nodes(nodes, weights, grid_size=4000)
    assert abs(float(torch.trapezoid(dens, grid)) - 1.0) < 1e-3
    mean = float(torch.trapezoid(dens * grid, grid))
    assert abs(mean - float(ev.mean())) < 0.3  # SLQ mean = tr(A)/n up to probe noise
    assert float(grid[0]) <= float(ev.min()) and float(grid[-1]) >= float(ev.max())


def test_bad_arguments():
    A = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="valid: largest, smallest"):
        lanczos(A, 1, which="middle")
    with pytest.raises(ValueError, match="between 1 and 4"):
        lanczos(A, 5)
    with pytest.raises(ValueError, match="valid: hutchinson, hutchpp"):
        trace_estimate(A, 3, method="girard")
    with pytest.raises(ValueError, match="square"):
        lanczos(torch.zeros(3, 4), 1)


@given(n=st.integers(4, 30), seed=st.integers(0, 1000))
def test_lanczos_finds_repeated_eigenvalues_by_restarting(n, seed):
    """One Krylov space holds one copy of a repeated eigenvalue; restarts find the rest."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.zeros(n, dtype=torch.float64)
    ev[:3] = 2.0  # triple top eigenvalue, the rest zero (like dead ReLU units)
    A = (Q * ev) @ Q.T
    res = lanczos(A, 3, tol=1e-10, max_iter=n, generator=g)
    torch.testing.assert_close(res.eigenvalues, torch.full((3,), 2.0, dtype=torch.float64), rtol=0, atol=1e-8)
    assert res.converged


def test_lanczos_and_power_iteration_return_one_eigen_result_type():
    from curvopt.linalg import EigenResult, LanczosResult, lanczos, power_iteration

    A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    for res in (lanczos(A, 1), power_iteration(A, 1, tol=1e-12, max_iter=500)):
        assert type(res) is EigenResult
        torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0], dtype=torch.float64))
    assert LanczosResult is EigenResult  # the earlier name still imports
