"""Randomized trace and diagonal estimation: Hutchinson (1989) and Hutch++ (Meyer et al., 2021).

Both estimate every block's trace from the same probes (one pass over the data per
product batch), and the block estimates add up to the whole-matrix estimate exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from curvopt.linalg.linear_operator import SymmetricOperator, matmat, size_of
from curvopt.linalg.probes import rademacher

METHODS = ("hutchinson", "hutchpp")


@dataclass
class TraceEstimate:
    """A trace estimate with its standard error, and per block when asked.

    Attributes:
        value: The estimate of ``tr(A)``.
        stderr: Its standard error (sample standard deviation of the stochastic part
            over ``sqrt(probes)``).
        probes: Number of products with ``A`` spent.
        blocks: ``{block name: (value, stderr)}`` (empty unless ``per_block``).
    """

    value: float
    stderr: float
    probes: int
    blocks: dict[str, tuple[float, float]] = field(default_factory=dict)


def trace_estimate(
    A: SymmetricOperator,
    probes: int = 64,
    *,
    method: str = "hutchpp",
    per_block: bool = False,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """Estimate ``tr(A)`` (and each block's trace) with ``probes`` products.

    Args:
        A: A :class:`~curvopt.CurvatureOperator` (blocks from ``A.blocks``) or a dense tensor.
        probes: Budget of products with ``A``. Hutch++ spends a third on a sketch, a third
            on its range and a third on Rademacher probes of the remainder.
        method: ``"hutchpp"`` (default; lower variance when the spectrum decays) or
            ``"hutchinson"``.
        per_block: Also estimate every block's trace from the same probes.
        generator: Seeds the probes.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; valid: {', '.join(METHODS)}")
    P = size_of(A)
    blocks = block_indices(A, P) if per_block else []
    if method == "hutchinson" or probes < 3:
        if probes < 1:
            raise ValueError(f"probes must be positive, got {probes}")
        Z = rademacher(P, probes, A, generator)
        AZ = matmat(A, Z)
        return _combine(Z, AZ, None, None, blocks, probes)
    # Each product needs its probes at once (one pass over the data per product); inputs
    # that are no longer needed are dropped before the next product.
    s = probes // 3
    S = rademacher(P, s, A, generator)
    AS = matmat(A, S)
    del S
    Q, _ = torch.linalg.qr(AS)
    del AS
    AQ = matmat(A, Q)
    RG = rademacher(P, probes - 2 * s, A, generator)
    RG -= Q @ (Q.T @ RG)  # (I - Q Q^T) G
    ARG = matmat(A, RG)
    return _combine(RG, ARG, Q, AQ, blocks, probes)


def _combine(Z, AZ, Q, AQ, blocks, probes) -> TraceEstimate:
    """Exact part ``tr(Q^T A Q)`` plus the Hutchinson mean of ``z^T A z`` over columns.

    Every figure (whole and per block) is computed on the device and brought to the host
    in one transfer.
    """
    def figures(Zb, AZb, Qb, AQb) -> list[torch.Tensor]:
        samples = _column_dots(Zb, AZb)  # [m]
        exact = _column_dots(Qb, AQb).sum() if Qb is not None else samples.new_zeros(())
        spread = samples.std() if samples.shape[0] > 1 else samples.new_zeros(())
        return [exact + samples.mean(), spread]

    parts = figures(Z, AZ, Q, AQ)
    for _, idx in blocks:
        idx = idx.to(Z.device)
        # tr(P_b A) = tr(Q^T P_b A Q) + tr(P_b A R) with R = I - Q Q^T, and
        # E[(R z)^T P_b A (R z)] = tr(P_b A R): unbiased per block, summing to the whole.
        parts += figures(Z[idx], AZ[idx], Q[idx] if Q is not None else None, AQ[idx] if Q is not None else None)
    host = torch.stack(parts).to(torch.float64).tolist()
    m = Z.shape[1]  # probes of the stochastic part
    out = TraceEstimate(value=host[0], stderr=_stderr(host[1], m), probes=probes)
    for i, (name, _) in enumerate(blocks, start=1):
        out.blocks[name] = (host[2 * i], _stderr(host[2 * i + 1], m))
    return out


def _column_dots(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``[k]`` dot products of matching columns of two ``[P, k]`` matrices, without a
    ``[P, k]`` temporary (a batched matrix product over the columns)."""
    return torch.einsum("pk,pk->k", X, Y)


def _stderr(spread: float, m: int) -> float:
    """Standard error of a mean of ``m`` samples of sample standard deviation ``spread``."""
    return spread / math.sqrt(m) if m > 1 else float("inf")


def diagonal_estimate(
    A: SymmetricOperator, probes: int = 64, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson's diagonal estimate ``mean_z z * (A z)`` (Bekas et al., 2007) and its
    per-entry standard error, both ``[P]``."""
    P = size_of(A)
    if probes < 1:
        raise ValueError(f"probes must be positive, got {probes}")
    Z = rademacher(P, probes, A, generator)
    samples = Z.mul_(matmat(A, Z))  # in place on our own probes: one [P, probes] temporary fewer
    del Z
    se = samples.std(1, unbiased=True) / math.sqrt(probes) if probes > 1 else torch.full((P,), float("inf"))
    return samples.mean(1), se


def block_indices(A: Any, P: int) -> list[tuple[str, torch.Tensor]]:
    """``(name, flat indices)`` of each block of ``A.blocks`` (one block ``""`` if ``A`` has none).

    Reads ``A.blocks`` (each with the ``indices`` of its tensors in ``A.params``) as a
    :class:`~curvopt.CurvatureOperator` has them; a dense tensor has no blocks.
    """
    blocks = getattr(A, "blocks", None)
    if not blocks:
        return [("", torch.arange(P))]
    sizes = [p.numel() for p in A.params]
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    return [
        (b.name, torch.cat([torch.arange(starts[i], starts[i + 1]) for i in b.indices]))
        for b in blocks
    ]
