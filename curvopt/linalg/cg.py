"""Conjugate gradients (Hestenes & Stiefel, 1952) and Steihaug-CG for the trust-region subproblem.

Steihaug (1983) and Toint (1981): CG on ``min_p g^T p + 1/2 p^T H p`` from ``p = 0``, stopped
at the trust-region boundary or along a direction of non-positive curvature, which it
follows to the boundary (Nocedal & Wright, 2006, Algorithm 7.2).
"""

from __future__ import annotations

import math

import torch

from curvopt.linalg.linear_operator import Shifted, SymmetricOperator, matvec, size_of
from curvopt.linalg.solve_result import SolveResult, check_tolerances, finite


def cg(
    A: SymmetricOperator,
    b: torch.Tensor,
    *,
    rtol: float = 1e-6,
    max_iter: int | None = None,
    shift: float = 0.0,
) -> SolveResult:
    """Conjugate gradients from ``x0 = 0`` for ``(A + shift I) x = b``, ``A`` symmetric positive definite.

    Stops at ``||r|| <= rtol ||b||`` ("converged"), at ``max_iter`` products (default ``2 P``),
    at a non-finite product, or at a search direction ``d`` with ``d^T A d <= 0``
    ("negative_curvature": ``x`` is the current iterate, ``direction`` is ``d``), which
    means ``A`` is not positive definite.
    """
    check_tolerances(rtol, max_iter, "cg")
    op = Shifted(A, shift)
    max_iter = 2 * size_of(A) if max_iter is None else max_iter
    b = b.to(dtype=A.dtype, device=A.device)
    x = torch.zeros_like(b)
    r = b.clone()
    b_norm = float(torch.linalg.norm(b))
    if not math.isfinite(b_norm):
        return SolveResult(x, 0, "nonfinite", b_norm)
    if b_norm == 0.0:
        return SolveResult(x, 0, "zero_rhs", 0.0)
    d = r.clone()
    rr = b_norm**2
    for k in range(1, max_iter + 1):
        Ad = matvec(op, d)
        if not finite(Ad):
            return SolveResult(x, k, "nonfinite", math.sqrt(rr))
        curvature = float(d @ Ad)
        if curvature <= 0:
            return SolveResult(x, k, "negative_curvature", math.sqrt(rr), direction=d,
                               curvature=curvature / float(d @ d))
        alpha = rr / curvature
        x = x + alpha * d
        r = r - alpha * Ad
        rr_next = float(r @ r)
        if math.sqrt(rr_next) <= rtol * b_norm:
            return SolveResult(x, k, "converged", math.sqrt(rr_next))
        d = r + (rr_next / rr) * d
        rr = rr_next
    return SolveResult(x, max_iter, "max_iterations", math.sqrt(rr))


def _to_boundary(p: torch.Tensor, d: torch.Tensor, radius: float) -> float:
    """The ``tau >= 0`` with ``||p + tau d|| = radius`` (``||p|| <= radius``)."""
    dd, pd, pp = float(d @ d), float(p @ d), float(p @ p)
    return (-pd + math.sqrt(max(pd * pd + dd * (radius**2 - pp), 0.0))) / dd


def steihaug_cg(
    H: SymmetricOperator,
    g: torch.Tensor,
    radius: float,
    *,
    rtol: float = 1e-6,
    max_iter: int | None = None,
    shift: float = 0.0,
) -> SolveResult:
    """Approximately minimize ``m(p) = g^T p + 1/2 p^T (H + shift I) p`` subject to ``||p|| <= radius``.

    Returns ``x = p`` with ``model_value = m(p) <= 0``; ``reason`` is "converged" (model
    gradient ``||g + H p|| <= rtol ||g||`` inside the region), "boundary", "negative_curvature"
    (the direction was followed to the boundary; ``direction`` holds it), "max_iterations",
    "nonfinite" (``x`` is the last finite iterate) or "zero_rhs".

    Args:
        H: The curvature operator (any symmetric operator; indefinite is fine).
        g: ``[P]`` gradient.
        radius: Trust-region radius ``> 0``.
        rtol: Relative tolerance on the model gradient.
        max_iter: Cap on products (default ``2 P``).
        shift: Damping added to ``H``.
    """
    check_tolerances(rtol, max_iter, "steihaug_cg")
    if not radius > 0:
        raise ValueError(f"steihaug_cg: radius must be > 0, got {radius!r}")
    op = Shifted(H, shift)
    max_iter = 2 * size_of(H) if max_iter is None else max_iter
    g = g.to(dtype=H.dtype, device=H.device)
    p = torch.zeros_like(g)
    Hp = torch.zeros_like(g)
    g_norm = float(torch.linalg.norm(g))
    if not math.isfinite(g_norm):
        return SolveResult(p, 0, "nonfinite", g_norm, model_value=0.0)
    if g_norm == 0.0:
        return SolveResult(p, 0, "zero_rhs", 0.0, model_value=0.0)

    def model(p: torch.Tensor, Hp: torch.Tensor) -> float:
        return float(g @ p) + 0.5 * float(p @ Hp)

    r = g.clone()  # model gradient g + H p
    d = -r
    rr = g_norm**2
    for k in range(1, max_iter + 1):
        Hd = matvec(op, d)
        if not finite(Hd):
            return SolveResult(p, k, "nonfinite", math.sqrt(rr), model_value=model(p, Hp))
        curvature = float(d @ Hd)
        if curvature <= 0:
            tau = _to_boundary(p, d, radius)
            p, Hp = p + tau * d, Hp + tau * Hd
            return SolveResult(p, k, "negative_curvature", float(torch.linalg.norm(g + Hp)), direction=d,
                               curvature=curvature / float(d @ d), model_value=model(p, Hp))
        alpha = rr / curvature
        p_next = p + alpha * d
        if float(torch.linalg.norm(p_next)) >= radius:
            tau = _to_boundary(p, d, radius)
            p, Hp = p + tau * d, Hp + tau * Hd
            return SolveResult(p, k, "boundary", float(torch.linalg.norm(g + Hp)), model_value=model(p, Hp))
        p, Hp = p_next, Hp + alpha * Hd
        r = r + alpha * Hd
        rr_next = float(r @ r)
        if math.sqrt(rr_next) <= rtol * g_norm:
            return SolveResult(p, k, "converged", math.sqrt(rr_next), model_value=model(p, Hp))
        d = -r + (rr_next / rr) * d
        rr = rr_next
    return SolveResult(p, max_iter, "max_iterations", math.sqrt(rr), model_value=model(p, Hp))
