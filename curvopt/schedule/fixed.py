"""FB and BL: a fixed batch with the linear scaling rule and gradual warm-up (Goyal et al., 2017,
"Accurate, Large Minibatch SGD", arXiv:1706.02677)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curvopt.errors import OptionError
from curvopt.schedule.base import BatchSizeSchedule, _positive_int


class FixedBatchSize(BatchSizeSchedule):
    """A fixed batch of ``batch_size`` (FB); BL when ``batch_size == base_batch_size``.

    The optimizer's lr on construction is the lr of ``base_batch_size``; the target lr is that times
    ``batch_size / base_batch_size`` (linear scaling), reached by gradual warm-up: before step ``t``
    (0-based) of the first ``T = warmup_epochs * steps_per_epoch`` steps each group's lr is
    ``lr0 + (target - lr0) * t / T``, then ``target`` (set once, so an lr scheduler may take over).

    Args:
        batch_size: The batch size of every step.
        base_batch_size: The batch size the optimizer's lr was tuned for.
        warmup_epochs: Epochs of linear warm-up (0: the target lr from the first step).
        **kwargs: As for :class:`~curvopt.schedule.base.BatchSizeSchedule` (``micro_batch_size``, ``seed``...).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, loss_fn: Any, dataset: Any, *,
                 batch_size: int, base_batch_size: int | None = None, warmup_epochs: int = 5,
                 **kwargs: Any) -> None:
        if "max_batch_size" in kwargs:
            raise OptionError("FixedBatchSize takes no max_batch_size: its batch is batch_size throughout")
        super().__init__(optimizer, model, loss_fn, dataset, batch_size=batch_size, **kwargs)
        self.base_batch_size = (batch_size if base_batch_size is None
                                else _positive_int("base_batch_size", base_batch_size))
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise OptionError(f"warmup_epochs must be a non-negative integer, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        if self.base_batch_size != batch_size:
            self._require_lr("FixedBatchSize's linear scaling rule")
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups] if self.lr is not None else []
        self._set_warmup_lr(0)

    @property
    def warmup_steps(self) -> int:
        """``T``: the number of warm-up steps."""
        return self.warmup_epochs * self.steps_per_epoch()

    def target_lrs(self) -> list[float]:
        """Each group's lr after warm-up: ``lr0 * batch_size / base_batch_size``."""
        return [lr * self.batch_size / self.base_batch_size for lr in self.base_lrs]

    def _set_warmup_lr(self, t: int) -> None:
        if self.base_batch_size == self.batch_size:
            return  # BL: the lr is the user's
        T = self.warmup_steps
        if t > T:
            return
        frac = 1.0 if T == 0 else t / T
        for g, lr0, target in zip(self.optimizer.param_groups, self.base_lrs, self.target_lrs()):
            g["lr"] = lr0 + (target - lr0) * frac

    def _on_step(self) -> None:
        self._set_warmup_lr(self.iterations)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["base_lrs"] = list(self.base_lrs)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.base_lrs = [float(x) for x in state["base_lrs"]]
