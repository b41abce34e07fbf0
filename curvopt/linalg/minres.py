"""MINRES with non-positive curvature detection (Paige & Saunders, 1975; Liu & Roosta, 2022).

Solves ``(A + shift I) x = b`` for symmetric, possibly indefinite or singular ``A``, by
minimizing ``||b - A x||`` over the Krylov space ``K_k(A, b)``. Liu & Roosta ("MINRES: from
negative curvature detection to monotonicity properties", SIAM J. Optim. 2022) show that
the residual ``r_{k-1}`` satisfies ``r_{k-1}^T A r_{k-1} = phibar_{k-1}^2 c_{k-1} gammabar_k``
(scalars MINRES computes anyway), so a non-positive curvature direction is detected for
free; Newton-MR uses it as a descent direction.
"""

from __future__ import annotations

import math

import torch

from curvopt.linalg.linear_operator import Shifted, SymmetricOperator, matvec, size_of
from curvopt.linalg.solve_result import SolveResult, check_tolerances, finite


def minres(
    A: SymmetricOperator,
    b: torch.Tensor,
    *,
    rtol: float = 1e-6,
    max_iter: int | None = None,
    shift: float = 0.0,
    detect_negative_curvature: bool = True,
) -> SolveResult:
    """MINRES from ``x0 = 0`` for ``(A + shift I) x = b``.

    Stops when ``||r_k|| <= rtol ||b||`` ("converged"), when ``||A r_k|| <= tol ||A|| ||r_k||``
    with ``tol = max(rtol, sqrt(eps))`` (an inconsistent singular system: "least_squares"), when
    the Krylov space is invariant ("exact"), at ``max_iter`` products (default ``2 P``), at a
    non-finite product, or, with ``detect_negative_curvature``, when ``r_{k-1}^T A r_{k-1} <= 0``
    ("negative_curvature": ``x`` is then the previous iterate and ``direction`` is ``r_{k-1}``; for ``b = -g``,
    ``g^T direction < 0``). From ``x0 = 0`` the iterates stay in ``range(A)`` when ``b`` is,
    so a consistent singular system yields the minimum-norm (pseudo-inverse) solution.

    Args:
        A: An operator (:class:`~curvopt.CurvatureOperator` or dense symmetric tensor).
        b: ``[P]`` right-hand side.
        rtol: Relative tolerance.
        max_iter: Cap on products with ``A``.
        shift: ``A + shift I`` is solved (Tikhonov damping).
        detect_negative_curvature: Stop at the first non-positive curvature residual.

    Returns:
        A :class:`~curvopt.linalg.SolveResult`.
    """
    check_tolerances(rtol, max_iter, "minres")
    P = size_of(A)
    op = Shifted(A, shift)
    max_iter = 2 * P if max_iter is None else max_iter
    # the range-orthogonality ratio ||A r|| / (||A|| ||r||) stalls near sqrt(machine epsilon)
    ls_tol = max(rtol, torch.finfo(A.dtype).eps ** 0.5)
    b = b.to(dtype=A.dtype, device=A.device)
    x = torch.zeros_like(b)
    beta1 = float(torch.linalg.norm(b))
    if not math.isfinite(beta1):
        return SolveResult(x, 0, "nonfinite", beta1)
    if beta1 == 0.0:
        return SolveResult(x, 0, "zero_rhs", 0.0)
    v_prev = torch.zeros_like(b)
    v = b / beta1
    r = b.clone()  # the residual b - A x_k, kept by recurrence (Liu & Roosta, eq. 3.9)
    w_prev = torch.zeros_like(b)  # w_{k-1}
    w_prev2 = torch.zeros_like(b)  # w_{k-2}
    beta = 0.0  # beta_k (coupling v_{k-1}, v_k)
    c_prev2, s_prev2 = 1.0, 0.0  # rotation k-2
    c_prev, s_prev = 1.0, 0.0  # rotation k-1
    phibar = beta1
    norm_A2 = 0.0
    k = 0
    while k < max_iter:
        k += 1
        p = matvec(op, v)
        if not finite(p):
            return SolveResult(x, k, "nonfinite", abs(phibar))
        if k > 1:
            p = p - beta * v_prev
        alpha = float(v @ p)
        p = p - alpha * v
        beta_next = float(torch.linalg.norm(p))
        norm_A2 += alpha**2 + beta**2 + beta_next**2
        # the previous two rotations applied to column k of the tridiagonal matrix
        eps = s_prev2 * beta
        dbar = c_prev2 * beta
        delta = c_prev * dbar + s_prev * alpha
        gbar = -s_prev * dbar + c_prev * alpha
        if detect_negative_curvature and c_prev * gbar <= 0:
            # r_{k-1}^T (A + shift I) r_{k-1} = phibar_{k-1}^2 c_{k-1} gbar_k <= 0
            return SolveResult(x, k, "negative_curvature", abs(phibar), direction=r, curvature=c_prev * gbar)
        if k > 1 and math.hypot(gbar, c_prev * beta_next) <= ls_tol * math.sqrt(norm_A2):
            # ||A r_{k-1}|| = |phibar_{k-1}| sqrt(gbar_k^2 + (c_{k-1} beta_{k+1})^2) <= tol ||A|| ||r_{k-1}||:
            # r_{k-1} is orthogonal to range(A), so x_{k-1} solves the least-squares problem
            return SolveResult(x, k, "least_squares", abs(phibar))
        gamma = math.hypot(gbar, beta_next)
        if gamma == 0.0:
            return SolveResult(x, k, "least_squares", abs(phibar))
        c, s = gbar / gamma, beta_next / gamma
        tau, phibar_next = c * phibar, -s * phibar
        w = (v - delta * w_prev - eps * w_prev2) / gamma
        x = x + tau * w
        v_next = p / beta_next if beta_next > 0 else torch.zeros_like(p)
        r = (s * s) * r + (phibar_next * c) * v_next
        phibar = phibar_next
        if abs(phibar) <= rtol * beta1:
            return SolveResult(x, k, "converged", abs(phibar))
        if beta_next <= 1e-14 * math.sqrt(norm_A2):  # invariant Krylov space: x is exact in it
            return SolveResult(x, k, "exact", abs(phibar))
        w_prev2, w_prev = w_prev, w
        v_prev, v = v, v_next
        beta = beta_next
        c_prev2, s_prev2, c_prev, s_prev = c_prev, s_prev, c, s
    return SolveResult(x, k, "max_iterations", abs(phibar))
