"""The one module that talks to ``torch.distributed``.

Everything here is the identity (or a no-op) when no process group is initialized, so single-process
code pays nothing. Under a group, each function issues exactly one collective on its normal path and
counts it (:func:`collective_count`, for tests that count collectives per product).

Failures are agreed, never raised before a collective (the rule of the data loop): a rank that caught an
exception still takes part, with tensors of the right shapes, and its failure travels inside the same
buffer; afterwards every rank raises the lowest failing rank's exception, so no rank is left waiting in a
collective that its peer will never join.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "active",
    "agree",
    "broadcast_",
    "collective_count",
    "rank",
    "sample_offset",
    "sum_across",
    "world_size",
]

_COLLECTIVES = 0


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def active(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is available and a process group is initialized."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (the default group for ``None``); 1 without a process group."""
    return _dist().get_world_size(group) if active(group) else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group``; 0 without a process group."""
    return _dist().get_rank(group) if active(group) else 0


def collective_count() -> int:
    """Collectives curvopt has issued in this process so far (tests count them per product)."""
    return _COLLECTIVES


def _count() -> None:
    global _COLLECTIVES
    _COLLECTIVES += 1


def _default_device(group: Any) -> torch.device:
    """The device a bare buffer lives on for this group's backend (NCCL only moves CUDA tensors)."""
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_uniform(tensors: Sequence[torch.Tensor], what: str) -> tuple[torch.dtype, torch.device] | None:
    if not tensors:
        return None
    dtype, device = tensors[0].dtype, tensors[0].device
    for t in tensors:
        if t.dtype != dtype or t.device != device:
            raise TypeError(
                f"{what}: tensors must share one dtype and device to travel in one buffer; got "
                f"{dtype} on {device} and {t.dtype} on {t.device}"
            )
    return dtype, device


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def sum_across(
    tensors: Sequence[torch.Tensor], group: Any = None, *, failure: BaseException | None = None
) -> list[torch.Tensor]:
    """Sum ``tensors`` over the ranks of ``group`` in one bucketed all-reduce.

    The tensors (one dtype and device) are flattened into one buffer, reduced and split back into tensors
    of the input shapes; the inputs are not modified. One slot per rank rides along in the same buffer: a
    rank that caught an exception before the collective passes it as ``failure`` (still taking part, with
    tensors of the right shapes, e.g. zeros). If any rank failed, every rank then raises the lowest failing
    rank's exception, same type, message prefixed with ``"rank r: "``; it is fetched with one extra
    broadcast, on the failure path only.

    Args:
        tensors: Tensors to sum, of one dtype and device (on NCCL, CUDA tensors).
        group: The process group; ``None`` is the default group.
        failure: The exception this rank caught, if any.

    Returns:
        The summed tensors, in the input shapes. Without a process group: the input tensors themselves.

    Raises:
        The lowest failing rank's exception (on every rank) when any rank passed ``failure``. Without a
        process group, ``failure`` itself.
    """
    tensors = list(tensors)
    if not active(group):
        if failure is not None:
            raise failure
        return tensors
    uniform = _check_uniform(tensors, "sum_across")
    dist = _dist()
    world, me = dist.get_world_size(group), dist.get_rank(group)
    dtype, device = uniform if uniform is not None else (torch.float32, _default_device(group))
    flags = torch.zeros(world, dtype=dtype, device=device)
    if failure is not None:
        flags[me] = 1  # a one-hot slot per rank: the sum says exactly which ranks failed
    flat = torch.cat([t.detach().reshape(-1) for t in tensors] + [flags])
    dist.all_reduce(flat, group=group)
    _count()
    failed = flat[flat.numel() - world :]
    if bool((failed != 0).any()):
        _raise_agreed(int(torch.nonzero(failed)[0, 0]), failure, group)
    return _split(flat, tensors)


def agree(failure: BaseException | None = None, group: Any = None) -> None:
    """Agree on failures where there is no tensor to reduce: one tiny all-reduce under a group.

    Raises:
        The lowest failing rank's exception on every rank (see :func:`sum_across`); without a process
        group, ``failure`` itself when given.
    """
    sum_across([], group, failure=failure)


def broadcast_(tensors: Sequence[torch.Tensor], src: int, group: Any = None) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s, in one bucketed broadcast.

    Args:
        tensors: Tensors of one dtype and device, of the same shapes on every rank; modified in place.
        src: The sending rank, numbered within ``group``.
        group: The process group; ``None`` is the default group.
    """
    tensors = list(tensors)
    if not active(group) or not tensors:
        return
    _check_uniform(tensors, "broadcast_")
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    _dist().broadcast(flat, group=group, group_src=src)
    _count()
    with torch.no_grad():
        for t, part in zip(tensors, _split(flat, tensors)):
            t.copy_(part)


def sample_offset(n_local: int, group: Any = None) -> tuple[int, int]:
    """Where this rank's samples sit among all ranks' samples, in rank order: one all-gather.

    Args:
        n_local: Samples this rank holds.
        group: The process group; ``None`` is the default group.

    Returns:
        ``(offset, total)``: the global index of this rank's first sample and the number of samples over
        all ranks. Without a process group: ``(0, n_local)``.
    """
    if not active(group):
        return 0, int(n_local)
    dist = _dist()
    world, me = dist.get_world_size(group), dist.get_rank(group)
    device = _default_device(group)
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(counts, torch.tensor([int(n_local)], dtype=torch.int64, device=device),
                                group=group)
    _count()
    counts = counts.tolist()
    return int(sum(counts[:me])), int(sum(counts))


# ---------------------------------------------------------------------- failure agreement
def _portable(exc: BaseException) -> tuple[Any, str, dict[str, Any]]:
    """``exc`` as (class, message, attributes) that pickle: a class that does not travel becomes
    RuntimeError with its name in the message; attributes that do not pickle are left behind."""
    cls: Any = type(exc)
    message = str(exc)
    try:
        pickle.loads(pickle.dumps(cls))
    except Exception:  # a local or otherwise unimportable class
        cls, message = RuntimeError, f"{type(exc).__name__}: {message}"
    attrs = {}
    for key, value in getattr(exc, "__dict__", {}).items():
        try:
            pickle.dumps(value)
        except Exception:
            continue
        attrs[key] = value
    return cls, message, attrs


def _rebuild(cls: Any, message: str, attrs: dict[str, Any], source: int) -> BaseException:
    """An exception of class ``cls`` whose message is ``message`` prefixed with the failing rank.

    Built without calling ``cls.__init__`` (whose signature may take anything, e.g. a batch index and a
    value), so every class comes back with its type and attributes."""
    exc = cls.__new__(cls)
    exc.args = (f"rank {source}: {message}",)
    try:
        exc.__dict__.update(attrs)
    except AttributeError:  # a class without an instance dict
        pass
    return exc


def _raise_agreed(source: int, failure: BaseException | None, group: Any) -> None:
    dist = _dist()
    payload = [_portable(failure) if dist.get_rank(group) == source and failure is not None else None]
    dist.broadcast_object_list(payload, group=group, group_src=source, device=_default_device(group))
    _count()
    cls, message, attrs = payload[0]
    agreed = _rebuild(cls, message, attrs, source)
    if failure is not None:
        raise agreed from failure  # keep this rank's own traceback (same exception, or its own)
    raise agreed from None
