"""How the KFAC optimizer spreads its work over data-parallel ranks (KAISA, Pauloski et al., 2021,
arXiv:2107.01739).

``"replicate"``: every rank inverts every factor. ``"comm_opt"``: each layer's inversion is assigned to
one rank (greedy by cost, ``dim(A)^3 + dim(G)^3``), and the inverses travel to every rank in one
collective per inverse update. ``"mem_opt"``: the owner alone keeps the layer's inverses and
preconditions its gradient; the preconditioned gradients travel in one collective per step. The
factor statistics are summed over the ranks in every mode (:meth:`StepStatistics.reduce
<curvopt.curvature.kfac_factors.StepStatistics.reduce>`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DISTRIBUTE_MODES = ("replicate", "comm_opt", "mem_opt")


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """The rank that inverts each layer: the costliest layers first, each to the least loaded rank
    (lowest rank on ties), so that every rank computes the same assignment from the same costs."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


class CommunicationLog:
    """What this rank has put into the optimizer's collectives: bytes and calls per kind, ``"factors"``
    (statistics at a factor update, or factors at a lazy sync), ``"inverses"`` (``comm_opt``) and
    ``"updates"`` (preconditioned gradients, ``mem_opt``). Benchmarks read it to report bytes moved per
    factor update for each ``distribute`` mode."""

    KINDS = ("factors", "inverses", "updates")

    def __init__(self) -> None:
        self.bytes = dict.fromkeys(self.KINDS, 0)
        self.calls = dict.fromkeys(self.KINDS, 0)

    def add(self, kind: str, tensors: Sequence[torch.Tensor]) -> None:
        """Count one collective of ``kind`` carrying ``tensors``."""
        self.bytes[kind] += sum(t.numel() * t.element_size() for t in tensors)
        self.calls[kind] += 1

    def add_bytes(self, kind: str, nbytes: int) -> None:
        """Count one collective of ``kind`` carrying ``nbytes``."""
        self.bytes[kind] += nbytes
        self.calls[kind] += 1

    def reset(self) -> None:
        for kind in self.KINDS:
            self.bytes[kind] = self.calls[kind] = 0
