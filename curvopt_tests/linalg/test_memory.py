"""Memory of the Krylov and randomized methods: no ``P x max_iter`` block reserved up front.

Live tensor memory is measured by a dispatch mode that sees every tensor an op creates
and when the last Python reference to its storage dies (exact on CPU, independent of the
allocator and of timing).
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from curvopt.analysis import top_eigenvalues
from curvopt.linalg import (
    cubic_subproblem,
    lanczos,
    lanczos_tridiagonal,
    power_iteration,
    slq_nodes,
    trace_estimate,
)

P = 50_000


class LiveTensorBytes(TorchDispatchMode):
    """Peak of the bytes held by live tensor storages created inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, live Python tensors]
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != 0:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live:  # a new allocation (views share their base's storage)
                    self.live[key] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.live[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out

    def peak_vectors(self) -> float:
        """The peak in float64 vectors of size ``P``."""
        return self.peak / (8 * P)


class Diagonal:
    """A diagonal operator that only multiplies (what the algorithms may use)."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.shape, self.dtype, self.device = d, (d.numel(), d.numel()), d.dtype, d.device
        self.products = 0

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.d.reshape(-1, *([1] * (V.dim() - 1))) * V


def _separated() -> Diagonal:
    """Three eigenvalues far above a bulk: Lanczos finds the top one in a handful of steps."""
    g = torch.Generator().manual_seed(0)
    return Diagonal(torch.cat([torch.tensor([10.0, 5.0, 3.0], dtype=torch.float64),
                               0.1 * torch.rand(P - 3, generator=g, dtype=torch.float64)]))


def _few_distinct() -> Diagonal:
    """Four distinct eigenvalues: every Krylov space closes after four steps."""
    return Diagonal(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64).repeat_interleave(P // 4))


def test_top_eigenvalue_holds_the_steps_it_takes_not_max_iter():
    A = _separated()
    with LiveTensorBytes() as mem:
        res = top_eigenvalues(A, 1)  # default max_iter = 80
    assert res.converged and abs(float(res.eigenvalues[0]) - 10.0) < 1e-6
    assert res.iterations <= 12
    # the steps taken, one storage block of slack (8 columns), a few temporaries; 80+ before
    assert mem.peak_vectors() <= res.iterations + 8 + 6


def test_lanczos_with_a_large_max_iter_grows_only_as_needed():
    A = _separated()
    with LiveTensorBytes() as mem:
        res = lanczos(A, 2, tol=1e-8, max_iter=400, generator=torch.Generator().manual_seed(1))
    assert res.converged
    assert mem.peak_vectors() <= res.iterations + 8 + 6


def test_lanczos_tridiagonal_and_slq_stop_at_an_invariant_subspace():
    A = _few_distinct()
    v0 = torch.randn(P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with LiveTensorBytes() as mem:
        alpha, beta, Q = lanczos_tridiagonal(A, v0, 60)
    assert alpha.shape == (4,) and Q.shape == (P, 4)
    T = torch.diag(alpha) + torch.diag(beta[:3], 1) + torch.diag(beta[:3], -1)
    assert torch.allclose(T, Q.T @ (A.d[:, None] * Q), atol=1e-10)
    assert torch.allclose(torch.linalg.eigvalsh(T), torch.tensor([1.0, 2, 3, 4], dtype=torch.float64))
    assert mem.peak_vectors() <= 4 + 8 + 6  # 60+ before
    with LiveTensorBytes() as mem:
        nodes, weights = slq_nodes(A, probes=3, steps=60, generator=torch.Generator().manual_seed(3))
    distinct = torch.tensor([1.0, 2, 3, 4], dtype=torch.float64)
    assert torch.allclose(nodes[:, :4].sort(1).values, distinct.expand(3, 4))
    assert torch.allclose(weights.sum(1), torch.ones(3, dtype=torch.float64))
    assert mem.peak_vectors() <= 8 + 6  # one probe's basis at a time; 60+ before


def test_cubic_subproblem_basis_grows_with_its_steps():
    A = _few_distinct()
    g = torch.randn(P, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with LiveTensorBytes() as mem:
        res = cubic_subproblem(A, g, sigma=1.0)
    assert res.reason in ("exact", "converged") and res.iterations <= 4
    assert mem.peak_vectors() <= 8 + 8  # 200+ before (max_iter = min(P, 200))


def test_power_iteration_and_trace_hold_only_their_working_set():
    A = _separated()
    with LiveTensorBytes() as mem:
        power_iteration(A, 2, generator=torch.Generator().manual_seed(5))
    assert mem.peak_vectors() <= 8  # the k found vectors and a few iterates
    with LiveTensorBytes() as mem:
        est = trace_estimate(A, 30, method="hutchinson", generator=torch.Generator().manual_seed(6))
    assert abs(est.value - float(A.d.sum())) <= 1e-9 * float(A.d.sum())  # exact on a diagonal
    # the probes and their products (one pass over the data for all of them), no third copy
    assert mem.peak_vectors() <= 2 * 30 + 3
