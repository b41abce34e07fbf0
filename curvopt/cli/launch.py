"""Running the commands under ``torchrun``: the process group, the device, this rank's shard of the data.

``torchrun --nproc_per_node=N -m curvopt train|analyze --config FILE`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set; :func:`process_group` joins them (NCCL with one GPU per process when
CUDA is available, else gloo) and tears the group down at exit. Without ``WORLD_SIZE > 1`` nothing happens
and the command runs as one process. After training, :func:`same_weights_as_rank0` and :func:`check_replicas`
make sure that every rank holds the same model.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from curvopt.errors import DistributedError


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


def same_weights_as_rank0(model: nn.Module, launch: Launch) -> None:
    """Under torchrun, every rank's weights and buffers set to rank 0's (each trained the same way; this
    rules out any difference in the last bit). One broadcast per dtype."""
    if launch.world == 1:
        return
    from curvopt import distributed

    tensors = [t for t in model.state_dict().values() if t.numel()]
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        distributed.broadcast_([t for t in tensors if t.dtype == dtype], src=0)


def check_replicas(model: nn.Module, launch: Launch, name: str) -> None:
    """Under torchrun, that every rank ends with rank 0's weights (DDP keeps gradients, not weights, in step: an
    optimizer whose update depends on rank-local state would let the replicas drift apart silently).

    Raises:
        DistributedError: on every rank, naming the optimizer, when some rank's weights differ from rank 0's.
    """
    if launch.world == 1:
        return
    from curvopt import distributed

    # the worst drift is agreed through one all-reduce, so that every rank raises, none waits for another
    mine = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    theirs = mine.clone()
    distributed.broadcast_([theirs], src=0)
    drift = (mine - theirs).abs().max().reshape(1) / theirs.abs().max().clamp_min(1e-30)
    (worst,) = distributed.sum_across([drift])
    if float(worst) > 1e-6:
        raise DistributedError(f"after training, the weights of the {launch.world} ranks differ (relative "
                           f"{float(worst):.2g}): optimizer {name!r} does not keep DDP replicas in step; run it "
                           f"in one process")


__all__ = ["Launch", "check_replicas", "current_launch", "process_group", "requested_world",
           "same_weights_as_rank0", "shard"]
