"""Random probe vectors of the randomized methods (trace, density, Lanczos and power starts).

Drawn on the CPU from a ``torch.Generator`` and then moved, so a seed gives the same probes on any device
(and on every rank of a process group).
"""

from __future__ import annotations

import torch

from curvopt.linalg.linear_operator import SymmetricOperator


def rademacher(P: int, k: int, A: SymmetricOperator, generator: torch.Generator | None) -> torch.Tensor:
    """``[P, k]`` random signs, drawn on the CPU from ``generator`` (reproducible on any device)."""
    signs = torch.randint(0, 2, (P, k), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(dtype=A.dtype, device=A.device)


def gaussian(P: int, k: int, A: SymmetricOperator, generator: torch.Generator | None) -> torch.Tensor:
    """``[P, k]`` standard normal entries, drawn on the CPU from ``generator``."""
    return torch.randn(P, k, generator=generator, dtype=torch.float64).to(dtype=A.dtype, device=A.device)
