"""GG: grow the batch instead of decaying the lr (Smith, Kindermans, Ying, Le, 2018, "Don't Decay the
Learning Rate, Increase the Batch Size", arXiv:1711.00489)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from curvopt.errors import OptionError
from curvopt.schedule.base import BatchSizeSchedule


class IncreaseBatchSize(BatchSizeSchedule):
    """At the end of each epoch listed in ``milestones`` (counting epochs done, as ``MultiStepLR``)
    the batch grows by ``factor`` instead of the lr decaying by it. Once growth is capped at
    ``max_batch_size`` the lr makes up the rest: ``B' = min(B * factor, max_batch_size)`` and every
    group's ``lr *= (B' / B) / factor``, so ``lr / B`` falls by ``factor`` at every milestone.

    Args:
        milestones: Epoch counts at which to grow (increasing positive integers).
        factor: Growth (and would-be decay) factor, > 1.
        **kwargs: As for :class:`~curvopt.schedule.base.BatchSizeSchedule` (``batch_size``,
            ``max_batch_size``, ``micro_batch_size``, ``seed``...).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, loss_fn: Any, dataset: Any, *,
                 milestones: Sequence[int], factor: float = 2.0, **kwargs: Any) -> None:
        super().__init__(optimizer, model, loss_fn, dataset, **kwargs)
        ms = list(milestones)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ms) or ms != sorted(set(ms)):
            raise OptionError(f"milestones must be increasing positive epoch counts, got {milestones!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise OptionError(f"factor must be a number > 1, got {factor!r}")
        self.milestones, self.factor = ms, float(factor)
        if self.initial_batch_size * self.factor ** len(ms) > self.max_batch_size * (1 + 1e-12):
            # some milestone will decay the lr: refuse now rather than after epochs of training
            self._require_lr("IncreaseBatchSize's lr decay at the batch-size cap")

    def _end_of_epoch(self) -> None:
        reason = ""
        if self.epoch + 1 in self.milestones:
            new = min(int(round(self.batch_size * self.factor)), self.max_batch_size)
            self._scale_lr((new / self.batch_size) / self.factor)
            reason = "milestone" if new > self.batch_size else "cap"
            self.batch_size = new
        self.history.append({"epoch": self.epoch, "iterations": self.iterations,
                             "batch_size": self.batch_size, "lr": self.lr, "reason": reason})
