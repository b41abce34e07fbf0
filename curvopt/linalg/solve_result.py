"""What every Krylov solver in :mod:`curvopt.linalg` returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

STOP_REASONS = {
    "converged": "the relative tolerance was met",
    "least_squares": "the residual is orthogonal to the range (a least-squares solution of a singular system)",
    "exact": "the Krylov space became invariant: the solution is exact in it",
    "negative_curvature": "a direction of non-positive curvature was found (returned as `direction`)",
    "boundary": "the step reached the trust-region boundary",
    "max_iterations": "the iteration cap was reached",
    "nonfinite": "a product with the operator was not finite; the last finite iterate is returned",
    "zero_rhs": "the right-hand side (gradient) is zero",
}


@dataclass
class SolveResult:
    """A solver's answer and why it stopped.

    Attributes:
        x: ``[P]`` the solution (or step) found.
        iterations: Products with the operator.
        reason: One of :data:`STOP_REASONS`.
        residual_norm: ``||b - A x||`` (linear solvers) or the model gradient norm (subproblem solvers).
        direction: ``[P]`` a non-positive curvature direction when ``reason == "negative_curvature"``.
        curvature: ``d^T A d / ||d||^2`` of that direction.
        model_value: The quadratic/cubic model's value at ``x`` (subproblem solvers).
    """

    x: torch.Tensor
    iterations: int
    reason: str
    residual_norm: float
    direction: torch.Tensor | None = None
    curvature: float | None = None
    model_value: float | None = None


def finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (one synchronization)."""
    return bool(torch.isfinite(t).all())


def check_tolerances(rtol: float, max_iter: int | None, name: str) -> None:
    """Reject a non-positive tolerance or iteration cap with the solver's name."""
    if not rtol > 0:
        raise ValueError(f"{name}: rtol must be > 0, got {rtol!r}")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"{name}: max_iter must be a positive integer, got {max_iter!r}")
