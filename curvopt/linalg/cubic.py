"""The cubic-regularization subproblem by the Lanczos (Krylov) method.

``min_s m(s) = g^T s + 1/2 s^T H s + sigma/3 ||s||^3`` is solved over the growing Krylov
space ``K_k(H, g)`` (Cartis, Gould & Toint, "Adaptive cubic regularisation methods",
Math. Program. 2011, section 6.2): with the Lanczos basis ``Q_k`` and tridiagonal ``T_k``,
the reduced problem in ``y`` (``s = Q_k y``) is solved exactly through the secular
equation ``(T_k + mu I) y = -||g|| e_1``, ``mu = sigma ||y||``, ``T_k + mu I >= 0``
(Nesterov & Polyak, 2006), and the model gradient norm ``beta_k |y_k|`` decides when to stop.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from curvopt.linalg.lanczos import _lanczos_steps, tridiagonal
from curvopt.linalg.linear_operator import Shifted, SymmetricOperator, size_of
from curvopt.linalg.solve_result import SolveResult, check_tolerances, finite


def cubic_reduced(T: np.ndarray, g_norm: float, sigma: float) -> tuple[np.ndarray, float]:
    """Global minimizer ``y`` of ``g_norm y_1 + 1/2 y^T T y + sigma/3 ||y||^3`` and the minimum.

    ``T`` is a small symmetric matrix. Bisection on ``phi(mu) = ||y(mu)|| - mu / sigma``, which
    decreases on ``mu > max(0, -lambda_min)``; the hard case (the first basis vector
    orthogonal to the lowest eigenvector) adds that eigenvector to reach ``||y|| = mu / sigma``.
    """
    lam, U = np.linalg.eigh(T)
    bhat = -g_norm * U[0, :]
    lo = max(0.0, -float(lam[0]))
    scale = max(float(np.abs(lam).max()), g_norm, 1e-300)

    def norm_y(mu: float, keep: np.ndarray) -> float:
        return float(np.sqrt(np.sum((bhat[keep] / (lam[keep] + mu)) ** 2)))

    everything = np.ones_like(lam, dtype=bool)
    bottom = lam <= lam[0] + 1e-12 * scale
    if lo > 0 and np.all(np.abs(bhat[bottom]) <= 1e-14 * max(float(np.abs(bhat).max()), 1e-300)):
        keep = ~bottom
        if norm_y(lo, keep) <= lo / sigma:  # hard case: mu = -lambda_min, add the eigenvector
            y = U[:, keep] @ (bhat[keep] / (lam[keep] + lo))
            tau = math.sqrt(max((lo / sigma) ** 2 - float(y @ y), 0.0))
            y = y + tau * U[:, 0]
            return y, _reduced_value(T, g_norm, sigma, y)
    hi = max(2 * lo, lo + 1e-12 * scale, 1e-300)
    while norm_y(hi, everything) > hi / sigma:
        hi *= 2
    a, b = lo, hi
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mid in (a, b):
            break
        if norm_y(mid, everything) > mid / sigma:
            a = mid
        else:
            b = mid
    y = U @ (bhat / (lam + b))
    return y, _reduced_value(T, g_norm, sigma, y)


def _reduced_value(T: np.ndarray, g_norm: float, sigma: float, y: np.ndarray) -> float:
    return float(g_norm * y[0] + 0.5 * y @ T @ y + sigma / 3 * np.linalg.norm(y) ** 3)


def cubic_subproblem(
    H: SymmetricOperator,
    g: torch.Tensor,
    sigma: float,
    *,
    rtol: float = 1e-6,
    max_iter: int | None = None,
    shift: float = 0.0,
) -> SolveResult:
    """Approximately minimize ``m(s) = g^T s + 1/2 s^T (H + shift I) s + sigma/3 ||s||^3`` over Krylov spaces.

    One product with ``H`` per Lanczos step (full reorthogonalization). Stops when the model
    gradient ``||grad m(s)|| = beta_k |y_k| <= rtol ||g||`` ("converged"), when the Krylov space
    is invariant ("exact"), at ``max_iter`` products (default ``min(P, 200)``), or at a
    non-finite product ("nonfinite": the last finite step is returned).

    Returns:
        :class:`~curvopt.linalg.SolveResult` with ``x = s`` and ``model_value = m(s) <= 0``.
    """
    check_tolerances(rtol, max_iter, "cubic_subproblem")
    if not sigma > 0:
        raise ValueError(f"cubic_subproblem: sigma must be > 0, got {sigma!r}")
    P = size_of(H)
    max_iter = min(P, 200) if max_iter is None else min(max_iter, P)
    g = g.to(dtype=H.dtype, device=H.device)
    g_norm = float(torch.linalg.norm(g))
    if not math.isfinite(g_norm):
        return SolveResult(torch.zeros_like(g), 0, "nonfinite", g_norm, model_value=0.0)
    if g_norm == 0.0:
        return SolveResult(torch.zeros_like(g), 0, "zero_rhs", 0.0, model_value=0.0)
    best = SolveResult(torch.zeros_like(g), 0, "max_iterations", g_norm, model_value=0.0)
    for state in _lanczos_steps(Shifted(H, shift), g, max_iter):
        m = state.alpha.shape[0]
        if not (finite(state.basis.last()) and math.isfinite(float(state.alpha[-1])) and
                math.isfinite(float(state.beta[-1]))):
            best.reason, best.iterations = "nonfinite", m
            return best
        b = state.beta.numpy()
        y, value = cubic_reduced(tridiagonal(state.alpha, state.beta).numpy(), g_norm, float(sigma))
        residual = abs(float(b[-1]) * float(y[-1]))
        s = state.basis.combine(torch.as_tensor(y))
        best = SolveResult(s, m, "max_iterations", residual, model_value=value)
        if state.exhausted:
            best.reason = "exact"
            return best
        if residual <= rtol * g_norm:
            best.reason = "converged"
            return best
    return best
