"""Schedules by name, so that a config file (``[schedule] name = "abs"``) can choose one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curvopt.errors import OptionError
from curvopt.schedule.adaptive import AdaptiveBatchSize
from curvopt.schedule.base import BatchSizeSchedule
from curvopt.schedule.fgsm import FGSM
from curvopt.schedule.fixed import FixedBatchSize
from curvopt.schedule.increase import IncreaseBatchSize

#: Names :func:`make_schedule` accepts: BL, FB, GG, ABS, ABSA.
SCHEDULE_NAMES = ("none", "fb", "gg", "abs", "absa")


def available_schedules() -> tuple[str, ...]:
    """The names :func:`make_schedule` accepts."""
    return SCHEDULE_NAMES


def make_schedule(name: str, optimizer: torch.optim.Optimizer, model: nn.Module, loss_fn: Any, dataset: Any, *,
                  batch_size: int, max_batch_size: int | None = None, **options: Any) -> BatchSizeSchedule:
    """The schedule ``name`` with ``options`` as keyword arguments.

    * ``"none"``: BL, a fixed ``batch_size`` with the optimizer's lr;
    * ``"fb"``: FB, :class:`FixedBatchSize` at ``max_batch_size`` with ``base_batch_size=batch_size``;
    * ``"gg"``: :class:`IncreaseBatchSize` from ``batch_size`` to ``max_batch_size`` (``milestones``...);
    * ``"abs"``: :class:`AdaptiveBatchSize`;
    * ``"absa"``: :class:`AdaptiveBatchSize` with ``adversarial=FGSM(eps, fraction)``, taking the
      options ``eps`` (required) and ``fraction`` (0.2).
    """
    if name not in SCHEDULE_NAMES:
        raise OptionError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULE_NAMES)}")
    args = (optimizer, model, loss_fn, dataset)
    if name == "none":
        if max_batch_size not in (None, batch_size):
            raise OptionError(f"schedule 'none' keeps batch_size={batch_size}: drop max_batch_size="
                              f"{max_batch_size} or choose 'fb', 'gg', 'abs' or 'absa'")
        return FixedBatchSize(*args, batch_size=batch_size, **options)
    if max_batch_size is None:
        raise OptionError(f"schedule {name!r} needs max_batch_size")
    if name == "fb":
        return FixedBatchSize(*args, batch_size=max_batch_size, base_batch_size=batch_size, **options)
    if name == "gg":
        return IncreaseBatchSize(*args, batch_size=batch_size, max_batch_size=max_batch_size, **options)
    if name == "absa":
        if "eps" not in options:
            raise OptionError("schedule 'absa' needs the FGSM step: options = {eps = ...} (in the data's units)")
        fgsm = FGSM(options.pop("eps"), options.pop("fraction", 0.2))
        options["adversarial"] = fgsm
    return AdaptiveBatchSize(*args, batch_size=batch_size, max_batch_size=max_batch_size, **options)
