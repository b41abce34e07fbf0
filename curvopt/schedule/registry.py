"""Schedules by name, so that a config file (``[schedule] name = "abs"``) can choose one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvopt.errors import OptionError
from curvopt.registry import Registry, accepted_keywords
from curvopt.schedule.adaptive import AdaptiveBatchSize
from curvopt.schedule.base import BatchSizeSchedule
from curvopt.schedule.fgsm import FGSM
from curvopt.schedule.fixed import FixedBatchSize
from curvopt.schedule.increase import IncreaseBatchSize

#: Set by :func:`make_schedule` itself from ``batch_size``/``max_batch_size`` (and ``eps``/``fraction``).
_SET_HERE = ("batch_size", "max_batch_size", "base_batch_size", "adversarial")


def _options(cls: type, *extra: str) -> tuple[str, ...]:
    return (*accepted_keywords(cls, exclude=_SET_HERE), *extra)


def _none(*args: Any, batch_size: int, max_batch_size: int | None = None, **options: Any) -> BatchSizeSchedule:
    if max_batch_size not in (None, batch_size):
        raise OptionError(f"schedule 'none' keeps batch_size={batch_size}: drop max_batch_size="
                          f"{max_batch_size} or choose 'fb', 'gg', 'abs' or 'absa'")
    return FixedBatchSize(*args, batch_size=batch_size, **options)


def _fb(*args: Any, batch_size: int, max_batch_size: int, **options: Any) -> BatchSizeSchedule:
    return FixedBatchSize(*args, batch_size=max_batch_size, base_batch_size=batch_size, **options)


def _gg(*args: Any, batch_size: int, max_batch_size: int, **options: Any) -> BatchSizeSchedule:
    return IncreaseBatchSize(*args, batch_size=batch_size, max_batch_size=max_batch_size, **options)


def _abs(*args: Any, batch_size: int, max_batch_size: int, **options: Any) -> BatchSizeSchedule:
    return AdaptiveBatchSize(*args, batch_size=batch_size, max_batch_size=max_batch_size, **options)


def _absa(*args: Any, batch_size: int, max_batch_size: int, **options: Any) -> BatchSizeSchedule:
    if "eps" not in options:
        raise OptionError("schedule 'absa' needs the FGSM step: options = {eps = ...} (in the data's units)")
    fgsm = FGSM(options.pop("eps"), options.pop("fraction", 0.2))
    return AdaptiveBatchSize(*args, batch_size=batch_size, max_batch_size=max_batch_size, adversarial=fgsm,
                             **options)


#: BL, FB, GG, ABS, ABSA by name; each entry's options are its class's keyword arguments (less those
#: :func:`make_schedule` sets), ``absa`` adding the FGSM step's ``eps`` and ``fraction``.
SCHEDULES: Registry[Callable[..., BatchSizeSchedule]] = Registry("schedule")
SCHEDULES.register("none", _none, options=_options(FixedBatchSize))
SCHEDULES.register("fb", _fb, options=_options(FixedBatchSize))
SCHEDULES.register("gg", _gg, options=_options(IncreaseBatchSize))
SCHEDULES.register("abs", _abs, options=_options(AdaptiveBatchSize))
SCHEDULES.register("absa", _absa, options=_options(AdaptiveBatchSize, "eps", "fraction"))

#: Names :func:`make_schedule` accepts: BL, FB, GG, ABS, ABSA.
SCHEDULE_NAMES = tuple(SCHEDULES.names())


def available_schedules() -> tuple[str, ...]:
    """The names :func:`make_schedule` accepts."""
    return tuple(SCHEDULES.names())


def make_schedule(name: str, optimizer: torch.optim.Optimizer, model: nn.Module, loss_fn: Any, dataset: Any, *,
                  batch_size: int, max_batch_size: int | None = None, **options: Any) -> BatchSizeSchedule:
    """The schedule ``name`` with ``options`` as keyword arguments.

    * ``"none"``: BL, a fixed ``batch_size`` with the optimizer's lr;
    * ``"fb"``: FB, :class:`FixedBatchSize` at ``max_batch_size`` with ``base_batch_size=batch_size``;
    * ``"gg"``: :class:`IncreaseBatchSize` from ``batch_size`` to ``max_batch_size`` (``milestones``...);
    * ``"abs"``: :class:`AdaptiveBatchSize`;
    * ``"absa"``: :class:`AdaptiveBatchSize` with ``adversarial=FGSM(eps, fraction)``, taking the
      options ``eps`` (required) and ``fraction`` (0.2).

    Raises:
        OptionError: an unknown name or option (listing the valid ones), or sizes the schedule cannot take.
    """
    factory = SCHEDULES.get(name)
    if name != "none" and max_batch_size is None:
        raise OptionError(f"schedule {name!r} needs max_batch_size")
    SCHEDULES.check_options(name, options)
    return factory(optimizer, model, loss_fn, dataset, batch_size=batch_size, max_batch_size=max_batch_size,
                   **options)
