"""Spectral density by stochastic Lanczos quadrature (Lin, Saad & Yang, 2016; Ghorbani et al., 2019)."""

from __future__ import annotations

import math

import torch

from curvopt.linalg.lanczos import _final_state, tridiagonal
from curvopt.linalg.linear_operator import SymmetricOperator, size_of
from curvopt.linalg.probes import rademacher


def slq_nodes(
    A: SymmetricOperator, *, probes: int = 4, steps: int = 60, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrature nodes and weights ``[probes, m]`` of the spectral measure of ``A``.

    Each probe is a Rademacher vector; its Lanczos tridiagonal ``T`` gives nodes
    ``theta_j`` (eigenvalues of ``T``) and weights ``tau_j = (e_1^T s_j)^2``. Memory: one
    probe's Lanczos basis at a time, grown with its steps (at most ``steps`` vectors of
    size ``P``, which full reorthogonalization needs).
    """
    P = size_of(A)
    steps = min(steps, P)
    nodes = torch.full((probes, steps), float("nan"), dtype=torch.float64)
    weights = torch.zeros(probes, steps, dtype=torch.float64)
    for i in range(probes):
        v = rademacher(P, 1, A, generator).squeeze(1)
        state = _final_state(A, v, steps)  # T only: the basis is not copied out
        alpha, beta = state.alpha, state.beta
        del state  # one probe's basis alive at a time
        m = alpha.shape[0]
        theta, S = torch.linalg.eigh(tridiagonal(alpha, beta))
        nodes[i, :m] = theta
        weights[i, :m] = S[0] ** 2
    return nodes, weights


def spectral_density_from_nodes(
    nodes: torch.Tensor,
    weights: torch.Tensor,
    *,
    grid_size: int = 1000,
    sigma: float | None = None,
    margin: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-broadened density on a grid: ``(grid [G], density [G])``, integrating to ~1."""
    finite = nodes[torch.isfinite(nodes)]
    lo, hi = float(finite.min()), float(finite.max())
    span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    lo, hi = lo - margin * span, hi + margin * span
    sigma = sigma if sigma is not None else span / 100
    grid = torch.linspace(lo, hi, grid_size, dtype=torch.float64)
    mask = torch.isfinite(nodes)
    t = torch.where(mask, nodes, torch.zeros_like(nodes))
    w = torch.where(mask, weights, torch.zeros_like(weights))
    kern = torch.exp(-((grid[:, None, None] - t[None]) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    density = (kern * w[None]).sum((1, 2)) / nodes.shape[0]
    return grid, density
