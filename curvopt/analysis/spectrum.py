"""Spectrum of a curvature operator: top eigenvalues, trace, spectral density."""

from __future__ import annotations

import torch

from curvopt.linalg import (
    LanczosResult,
    TraceEstimate,
    lanczos,
    power_iteration,
    slq_nodes,
    spectral_density_from_nodes,
    trace_estimate,
)
from curvopt.linalg.operator import SymmetricOperator

EIGEN_METHODS = ("lanczos", "power")


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def top_eigenvalues(
    op: SymmetricOperator,
    k: int = 1,
    tol: float = 1e-3,
    *,
    which: str = "largest",
    method: str = "lanczos",
    max_iter: int | None = None,
    seed: int | torch.Generator | None = 0,
) -> LanczosResult:
    """The ``k`` top (or bottom) eigenvalues and eigenvectors of ``op``.

    Lanczos with full reorthogonalization (default) or power iteration with deflation
    (``method="power"``, largest magnitude, the PyHessian baseline). Build ``op`` with
    ``cache=True`` so that every product reuses each batch's forward pass.

    Returns:
        A :class:`~curvopt.linalg.LanczosResult`: ``eigenvalues [k]``,
        ``eigenvectors [P, k]``, residuals, number of products, ``converged``.
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"method={method!r}; valid: {', '.join(EIGEN_METHODS)}")
    g = _generator(seed)
    if method == "power":
        if which != "largest":
            raise ValueError("power iteration finds the largest-magnitude eigenvalues only; use lanczos")
        return power_iteration(op, k, tol=tol, max_iter=max_iter or 200, generator=g)
    return lanczos(op, k, which=which, tol=tol, max_iter=max_iter, generator=g)


def trace(
    op: SymmetricOperator,
    probes: int = 64,
    *,
    method: str = "hutchpp",
    per_block: bool = False,
    seed: int | torch.Generator | None = 0,
) -> TraceEstimate:
    """Randomized estimate of ``tr(op)`` with its standard error.

    With ``per_block=True`` also one estimate per block of ``op.blocks`` (per module by
    default) from the same probes: one set of passes over the data gives every
    layer's trace, and the blocks add up to the whole.
    """
    return trace_estimate(op, probes, method=method, per_block=per_block, generator=_generator(seed))


def spectral_density(
    op: SymmetricOperator,
    *,
    probes: int = 4,
    steps: int = 60,
    grid_size: int = 1000,
    sigma: float | None = None,
    seed: int | torch.Generator | None = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalue density of ``op`` by stochastic Lanczos quadrature.

    Args:
        probes: Random start vectors (each costs ``steps`` products).
        steps: Lanczos steps per probe.
        grid_size: Points of the returned grid.
        sigma: Width of the Gaussian broadening (default: 1% of the spectral range).

    Returns:
        ``(grid [grid_size], density [grid_size])`` with the density integrating to ~1.
    """
    nodes, weights = slq_nodes(op, probes=probes, steps=steps, generator=_generator(seed))
    return spectral_density_from_nodes(nodes, weights, grid_size=grid_size, sigma=sigma)
