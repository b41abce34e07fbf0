"""Lanczos iteration with full reorthogonalization (Lanczos, 1950; Golub & Van Loan §10.1)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from curvopt.linalg.eigen_result import EigenResult
from curvopt.linalg.linear_operator import SymmetricOperator, matmat, size_of
from curvopt.linalg.probes import gaussian

WHICH = ("largest", "smallest")


#: Columns per storage block of the Lanczos basis: the basis grows one block at a time as
#: the iteration runs, so a run that converges in ``m`` steps holds ``m`` vectors (plus at
#: most a block's slack), never ``max_iter`` reserved up front.
BASIS_BLOCK = 8


class _Basis:
    """Orthonormal columns ``[P, m]`` stored in blocks of :data:`BASIS_BLOCK` columns.

    Memory grows with the number of steps actually taken (at most ``BASIS_BLOCK - 1``
    unused columns), and nothing is copied as it grows.
    """

    def __init__(self, P: int, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.P, self.dtype, self.device, self.capacity = P, dtype, device, capacity
        self.blocks: list[torch.Tensor] = []
        self.size = 0

    def append(self, q: torch.Tensor) -> None:
        j = self.size % BASIS_BLOCK
        if j == 0:
            width = min(BASIS_BLOCK, self.capacity - self.size)
            self.blocks.append(torch.empty(self.P, width, dtype=self.dtype, device=self.device))
        self.blocks[-1][:, j] = q
        self.size += 1

    def _views(self) -> list[torch.Tensor]:
        used = self.size - BASIS_BLOCK * (len(self.blocks) - 1)
        return self.blocks[:-1] + [self.blocks[-1][:, :used]] if self.blocks else []

    def project_out(self, w: torch.Tensor) -> torch.Tensor:
        """``w - Q (Q^T w)`` (classical Gram-Schmidt against every column at once)."""
        views = self._views()
        coeffs = [B.T @ w for B in views]
        for B, c in zip(views, coeffs):
            w = w - B @ c
        return w

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """``Q @ y`` for ``y`` of shape ``[m]`` or ``[m, k]``."""
        y = y.to(dtype=self.dtype, device=self.device)
        out, start = None, 0
        for B in self._views():
            part = B @ y[start : start + B.shape[1]]
            out = part if out is None else out + part
            start += B.shape[1]
        return out

    def last(self) -> torch.Tensor:
        """The newest column ``[P]``."""
        return self.blocks[-1][:, (self.size - 1) % BASIS_BLOCK]

    def dense(self) -> torch.Tensor:
        """The whole basis as one ``[P, m]`` tensor (a copy)."""
        return torch.cat(self._views(), dim=1)


@dataclass
class _State:
    basis: _Basis  # the Lanczos basis Q [P, m], grown one block at a time
    alpha: torch.Tensor  # [m]
    beta: torch.Tensor  # [m]; beta[-1] couples to the next basis vector
    exhausted: bool  # this step closed an invariant subspace


def _lanczos_steps(
    A: SymmetricOperator, v0: torch.Tensor, max_steps: int, restart: torch.Generator | None | bool = False
) -> Iterator[_State]:
    """Yield the Lanczos state after each product with ``A`` (one column per step).

    At an invariant subspace the process ends, or, with ``restart`` (``True`` or a
    generator), continues from a random vector orthogonal to the basis, so that
    further copies of a repeated eigenvalue, which one Krylov space cannot hold, are
    found too (``T`` becomes block diagonal). The basis grows as the steps run (see
    :class:`_Basis`): memory is that of the steps taken, not of ``max_steps``.

    One host synchronisation per step: ``alpha_j`` and ``beta_j`` come back to the host
    together (the caller's stopping test needs them there); everything else stays on
    ``A``'s device. ``alpha``/``beta`` are float64 CPU tensors.
    """
    P = size_of(A)
    max_steps = min(max_steps, P)
    Q = _Basis(P, A.dtype, A.device, max_steps)
    alpha = torch.zeros(max_steps, dtype=torch.float64)
    beta = torch.zeros(max_steps, dtype=torch.float64)
    q = v0.to(dtype=A.dtype, device=A.device)
    q = q / torch.linalg.norm(q)
    scale = 1e-300  # largest |alpha_j| so far, on the host, for the invariant-subspace test
    for j in range(max_steps):
        Q.append(q)
        w = matmat(A, q.unsqueeze(1)).squeeze(1)
        a = q @ w
        del q  # the basis holds it; keep one copy of each vector alive
        for _ in range(2):  # full reorthogonalization; "twice is enough" (Parlett)
            w = Q.project_out(w)
        # the step's one transfer to the host (stacked in float64 so that no digit is lost)
        a, b = torch.stack([a.to(torch.float64), torch.linalg.norm(w).to(torch.float64)]).tolist()
        alpha[j], beta[j] = a, b
        scale = max(scale, abs(a))
        m = j + 1
        exhausted = b <= 1e-12 * scale
        if exhausted:
            beta[j] = 0.0
        yield _State(Q, alpha[:m], beta[:m], exhausted)
        if not exhausted:
            q = w / b
            del w
            continue
        if restart is False or m == max_steps:
            return
        gen = restart if isinstance(restart, torch.Generator) else None
        q = gaussian(P, 1, A, gen).squeeze(1)
        for _ in range(2):
            q = Q.project_out(q)
        norm = torch.linalg.norm(q)
        if norm <= 1e-10:
            return
        q = q / norm


def lanczos_tridiagonal(
    A: SymmetricOperator, v0: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steps`` Lanczos steps from ``v0``: ``(alpha [m], beta [m], Q [P, m])`` in float64/``A``'s dtype.

    ``T = tridiag(beta[:-1], alpha, beta[:-1])``; fewer than ``steps`` when an invariant
    subspace is found first. The basis grows with the steps taken; ``Q`` is assembled at
    the end (callers that need only ``T`` should use the Lanczos steps directly, as
    :func:`~curvopt.linalg.slq_nodes` does).
    """
    state = _final_state(A, v0, steps)
    return state.alpha, state.beta, state.basis.dense()


def tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The Lanczos matrix ``T [m, m]``: ``alpha [m]`` on the diagonal, ``beta[:m-1]`` beside it (``beta``
    may hold one more coefficient, the residual's norm, which ``T`` does not use)."""
    m = alpha.shape[0]
    T = torch.diag(alpha)
    if m > 1:
        T = T + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    return T


def _final_state(A: SymmetricOperator, v0: torch.Tensor, steps: int) -> _State:
    """The state after the last of ``steps`` Lanczos steps (no restart)."""
    return deque(_lanczos_steps(A, v0, steps), maxlen=1)[0]


def lanczos(
    A: SymmetricOperator,
    k: int = 1,
    *,
    which: str = "largest",
    tol: float = 1e-3,
    max_iter: int | None = None,
    min_iter: int | None = None,
    generator: torch.Generator | None = None,
    v0: torch.Tensor | None = None,
) -> EigenResult:
    """The ``k`` largest (or smallest) eigenpairs of a symmetric operator by Lanczos.

    Converged when each wanted Ritz pair's residual bound ``|beta_m s_{m,i}|`` is below
    ``tol * |theta_i|``; one product with ``A`` per step.

    Args:
        A: A :class:`~curvopt.CurvatureOperator` or a dense symmetric tensor.
        k: Number of eigenpairs.
        which: ``"largest"`` or ``"smallest"`` (algebraic).
        tol: Relative residual tolerance.
        max_iter: Most products (default ``max(2k + 40, 80)``, at most ``P``). The basis
            grows with the products actually spent: a run that converges after ``m``
            products holds about ``m`` vectors of size ``P``, not ``max_iter``.
        min_iter: Fewest products before the convergence test (default ``k + 2``).
        generator: Seeds the (Gaussian) start vector.
        v0: Explicit start vector ``[P]``.
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r}; valid: {', '.join(WHICH)}")
    P = size_of(A)
    if not 1 <= k <= P:
        raise ValueError(f"k must be between 1 and {P} (the operator's size), got {k}")
    max_iter = min(P, max_iter if max_iter is not None else max(2 * k + 40, 80))
    min_iter = min(max_iter, min_iter if min_iter is not None else k + 2)
    v = v0 if v0 is not None else gaussian(P, 1, A, generator).squeeze(1)

    # The stopping test runs on the host copy of T (float64 numpy): the only device
    # synchronisation of a step is the one inside _lanczos_steps.
    last = None
    for state in _lanczos_steps(A, v, max_iter, restart=generator if generator is not None else True):
        last = state
        m = state.alpha.shape[0]
        if m < max_iter and (m < min_iter or state.exhausted):
            continue  # too early, or about to restart in the orthogonal complement
        theta, S, bounds = _ritz_pairs(state, k, which)
        if m == max_iter or _within(theta, bounds, tol):
            break
    else:  # the steps ended early (every direction spent): take the last state as it is
        theta, S, bounds = _ritz_pairs(last, k, which)
    m, kk = last.alpha.shape[0], theta.shape[0]
    converged = kk == k and _within(theta, bounds, tol)
    vecs = last.basis.combine(torch.from_numpy(np.ascontiguousarray(S)))
    return EigenResult(torch.from_numpy(theta.copy()).to(A.dtype), vecs, torch.from_numpy(bounds).to(A.dtype),
                         m, converged)


def _within(theta: np.ndarray, bounds: np.ndarray, tol: float) -> bool:
    """Whether every residual bound is below ``tol`` times its Ritz value's magnitude."""
    return bool((bounds <= tol * np.maximum(np.abs(theta), 1e-30)).all())


def _ritz_pairs(state: _State, k: int, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The wanted ``min(k, m)`` Ritz values ``[kk]``, their ``T`` eigenvectors ``[m, kk]`` and residual
    bounds ``|beta_m s_{m,i}| = ||A x_i - theta_i x_i||`` ``[kk]``, from the host copy of ``T``."""
    beta = state.beta.numpy()
    theta, S = np.linalg.eigh(tridiagonal(state.alpha, state.beta).numpy())
    if which == "largest":
        theta, S = theta[::-1], S[:, ::-1]
    kk = min(k, theta.shape[0])
    return theta[:kk], S[:, :kk], np.abs(beta[-1] * S[-1, :kk])
