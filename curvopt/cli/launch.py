"""Running the commands under ``torchrun``: the process group, the device, this rank's shard of the data.

``torchrun --nproc_per_node=N -m curvopt train|analyze --config FILE`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set; :func:`process_group` joins them (NCCL with one GPU per process when
CUDA is available, else gloo) and tears the group down at exit. Without ``WORLD_SIZE > 1`` nothing happens
and the command runs as one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Launch:
    """Where this process stands: its rank, the number of ranks, and the device its model lives on."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints tables and writes files."""
        return self.rank == 0


def requested_world() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def process_group() -> Iterator[Launch]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, else gloo), yield this
    process's :class:`Launch`, and destroy the group at exit. Ranks other than 0 print nothing on stdout.

    Without ``WORLD_SIZE > 1``, or when the caller already initialized a group, it only reports where the
    process stands.
    """
    import torch.distributed as dist

    if requested_world() == 1 or dist.is_initialized():
        yield current_launch()
        return
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # a collective left waiting (a peer that died) fails after this long instead of hanging
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    launch = Launch(dist.get_rank(), dist.get_world_size(), device)
    try:
        with open(os.devnull, "w") as quiet, contextlib.ExitStack() as stack:
            if not launch.main:
                stack.enter_context(contextlib.redirect_stdout(quiet))
            yield launch
            sys.stdout.flush()
    finally:
        dist.destroy_process_group()


def current_launch() -> Launch:
    """This process's :class:`Launch` in the group that is active now (rank 0 of 1 without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Launch()
    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend()).lower():
        device = torch.device("cuda", torch.cuda.current_device())
    return Launch(dist.get_rank(), dist.get_world_size(), device)


def shard(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of ``n`` samples (the first ``n % world`` ranks hold one more).

    Contiguous, in rank order, and without the padding of ``DistributedSampler`` (which repeats samples to
    even the shards): the union of the shards is exactly the ``n`` samples, each once, so a mean over them is
    the one-process mean, and sample ``i`` of rank ``r`` is global sample ``start + i`` (Monte-Carlo labels
    keyed by the global index reproduce one process).
    """
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


__all__ = ["Launch", "current_launch", "process_group", "requested_world", "shard"]
