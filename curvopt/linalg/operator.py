"""What the algorithms in :mod:`curvopt.linalg` need from a matrix: ``A @ V``, size, dtype, device.

A :class:`~curvopt.CurvatureOperator` and a dense symmetric ``torch.Tensor`` both
qualify, so every algorithm runs on either (dense for tests and tiny problems).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class SymmetricOperator(Protocol):
    """Anything with ``shape == (P, P)``, ``dtype``, ``device`` and ``@`` on ``[P, k]`` matrices."""

    shape: Any
    dtype: torch.dtype
    device: torch.device

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor: ...


def size_of(A: SymmetricOperator) -> int:
    """``P`` for a square operator; rejects non-square shapes."""
    shape = tuple(A.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"expected a square operator, got shape {shape}")
    return int(shape[0])


def matmat(A: SymmetricOperator, V: torch.Tensor) -> torch.Tensor:
    """``A @ V`` for ``V`` of shape ``[P, k]``, in ``A``'s dtype and device."""
    return A @ V.to(dtype=A.dtype, device=A.device)


def matvec(A: SymmetricOperator, v: torch.Tensor) -> torch.Tensor:
    """``A @ v`` for one vector ``v`` ``[P]`` (the single-product path of an operator)."""
    return A @ v.to(dtype=A.dtype, device=A.device)


class Shifted:
    """``A + shift * I`` as an operator (Tikhonov damping of a curvature operator)."""

    def __init__(self, A: SymmetricOperator, shift: float) -> None:
        self.A, self.shift = A, float(shift)
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        out = self.A @ V
        return out + self.shift * V if self.shift else out


def rademacher(P: int, k: int, A: SymmetricOperator, generator: torch.Generator | None) -> torch.Tensor:
    """``[P, k]`` random signs, drawn on the CPU from ``generator`` (reproducible on any device)."""
    signs = torch.randint(0, 2, (P, k), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(dtype=A.dtype, device=A.device)


def gaussian(P: int, k: int, A: SymmetricOperator, generator: torch.Generator | None) -> torch.Tensor:
    """``[P, k]`` standard normal entries, drawn on the CPU from ``generator``."""
    return torch.randn(P, k, generator=generator, dtype=torch.float64).to(dtype=A.dtype, device=A.device)


def block_indices(A: Any, P: int) -> list[tuple[str, torch.Tensor]]:
    """``(name, flat indices)`` of each block of ``A.blocks`` (one block ``""`` if none)."""
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
