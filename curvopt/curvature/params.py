"""Selecting the parameters an operator acts on, and grouping them into blocks."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from curvopt.errors import ParameterError


@dataclass(frozen=True)
class Block:
    """A group of parameters treated as one diagonal block.

    Attributes:
        name: Module path (e.g. ``"features.0"``) or a user-given group name.
        param_names: Names (as in ``model.named_parameters()``) of the parameters.
        indices: Positions of those parameters in the operator's parameter list.
        numel: Number of scalar entries in the block.
    """

    name: str
    param_names: tuple[str, ...]
    indices: tuple[int, ...]
    numel: int


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside a data-parallel wrapper, for the curvature passes to call functionally.

    ``DistributedDataParallel`` (and ``DataParallel``) give their ``.module``: calling the wrapper
    would fire DDP's gradient reducer (an all-reduce per bucket, on gradients the curvature passes do
    not produce), and its parameters would be named with a ``module.`` prefix. The operator
    all-reduces its own results over the process group instead.

    Raises:
        UnsupportedModuleError: for a model sharded with FSDP (``FullyShardedDataParallel`` or FSDP2's
            ``fully_shard``), naming the module: second-order autograd through FSDP's parameter
            all-gathers is broken upstream (pytorch#172543, #182641).
    """
    from curvopt.errors import UnsupportedModuleError

    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    # A sharded model was built with FSDP already imported; importing it here would cost ~1.5 s.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_classes = tuple(c for c in (getattr(fsdp, "FullyShardedDataParallel", None),
                                     getattr(fsdp, "FSDPModule", None)) if isinstance(c, type))
    for name, module in model.named_modules():
        if fsdp_classes and isinstance(module, fsdp_classes):
            kind = type(module).__name__
            where = f"module {name!r} ({kind})" if name else f"the model ({kind})"
            raise UnsupportedModuleError(
                f"{where} is sharded with FSDP; curvature needs second-order autograd through the model, "
                "which FSDP's parameter all-gathers do not support (pytorch#172543, #182641). Build the "
                "operator on the unsharded model, wrapped in DistributedDataParallel (or not wrapped): "
                "the operator all-reduces over the process group itself"
            )
    return model


def select_parameters(
    model: nn.Module, params: Iterable[torch.Tensor | str] | None
) -> tuple[list[str], list[torch.Tensor]]:
    """Resolve a parameter selection to ``(names, tensors)`` in model order.

    Args:
        model: The network.
        params: ``None`` for every parameter with ``requires_grad``, otherwise an
            iterable of parameter tensors of ``model`` or of their names.

    Raises:
        ParameterError: for a tensor the model does not own, an unknown name, a
            duplicate, or an empty selection.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ParameterError(
                f"{type(model).__name__} has no parameter with requires_grad=True; "
                "pass params=... to choose some explicitly"
            )
        return [n for n, _ in chosen], [p for _, p in chosen]

    if isinstance(params, (torch.Tensor, str)):
        params = [params]
    by_id = {id(p): n for n, p in named}
    by_name = dict(named)
    wanted: set[str] = set()
    for i, p in enumerate(params):
        if isinstance(p, str):
            if p not in by_name:
                raise ParameterError(
                    f"params[{i}]: {type(model).__name__} has no parameter named {p!r}; "
                    f"valid names: {', '.join(by_name)}"
                )
            name = p
        elif isinstance(p, torch.Tensor):
            if id(p) not in by_id:
                raise ParameterError(
                    f"params[{i}] (a tensor of shape {tuple(p.shape)}) is not a parameter "
                    f"of the model {type(model).__name__}"
                )
            name = by_id[id(p)]
        else:
            raise ParameterError(
                f"params[{i}] is a {type(p).__name__}; expected a parameter tensor or its name"
            )
        if name in wanted:
            raise ParameterError(f"params[{i}]: parameter {name!r} is selected twice")
        wanted.add(name)
    if not wanted:
        raise ParameterError("params is empty; select at least one parameter")
    chosen = [(n, p) for n, p in named if n in wanted]
    return [n for n, _ in chosen], [p for _, p in chosen]


def module_blocks(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> tuple[Block, ...]:
    """One block per module that owns selected parameters, named by module path.

    Parameters directly on the root module form a block named ``""``.
    """
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.rpartition(".")[0], []).append(i)
    return _blocks_from_groups(groups, names, tensors)


def custom_blocks(
    grouping: Sequence[Sequence[str]] | dict[str, Sequence[str]],
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
) -> tuple[Block, ...]:
    """Blocks from a user grouping: a dict ``{block_name: [param names]}`` or a list of lists.

    Every selected parameter must belong to exactly one group.
    """
    if not isinstance(grouping, dict):
        grouping = {f"block{i}": list(g) for i, g in enumerate(grouping)}
    position = {n: i for i, n in enumerate(names)}
    groups: dict[str, list[int]] = {}
    seen: dict[str, str] = {}
    for block_name, members in grouping.items():
        if isinstance(members, str):
            members = [members]
        if not members:
            raise ParameterError(f"block {block_name!r} is empty")
        for m in members:
            if m not in position:
                raise ParameterError(
                    f"block {block_name!r} names {m!r}, which is not a selected parameter; "
                    f"selected: {', '.join(names)}"
                )
            if m in seen:
                raise ParameterError(
                    f"parameter {m!r} is in both block {seen[m]!r} and block {block_name!r}"
                )
            seen[m] = block_name
        groups[block_name] = sorted(position[m] for m in members)
    missing = [n for n in names if n not in seen]
    if missing:
        raise ParameterError(f"parameters in no block: {', '.join(missing)}")
    return _blocks_from_groups(groups, names, tensors)


def _blocks_from_groups(
    groups: dict[str, list[int]], names: Sequence[str], tensors: Sequence[torch.Tensor]
) -> tuple[Block, ...]:
    return tuple(
        Block(
            name=g,
            param_names=tuple(names[i] for i in idx),
            indices=tuple(idx),
            numel=sum(tensors[i].numel() for i in idx),
        )
        for g, idx in groups.items()
    )


class ParameterSnapshot:
    """The values of some parameters at one moment, to tell exactly whether they changed since.

    Version counters miss writes through ``p.data`` (``p.data.copy_``, ``vector_to_parameters``,
    some ``load_state_dict`` paths) and a rebinding ``p.data = t``; a saved copy compared entry by
    entry cannot miss any of them. The comparison costs one read of the parameters (no
    allocation), small next to one curvature product, which reads them and more at least once.
    Two snapshots compare equal when their values are identical (NaN never is, so a cache at a NaN
    point is always rebuilt).
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            self.values = [p.detach().clone() for p in params]

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether ``params`` hold exactly the saved values (shape, dtype and entries)."""
        if len(params) != len(self.values):
            return False
        if any(p.shape != v.shape or p.dtype != v.dtype or p.device != v.device
               for p, v in zip(params, self.values)):
            return False
        if not params:
            return True
        with torch.no_grad():
            # One host read for all parameters (a cached product checks this at every Krylov step), not one each.
            return bool(torch.stack([torch.eq(p.detach(), v).all() for p, v in zip(params, self.values)]).all())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParameterSnapshot):
            return NotImplemented
        return other.matches(self.values)

    __hash__ = None  # type: ignore[assignment]
