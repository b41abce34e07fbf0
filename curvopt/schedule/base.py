"""The shared base of the batch-size schedules: a seeded, resumable sampler that hands out one
optimizer step's batch at the current size, a micro-batched backward with the exact mean, lr
scaling per param group, a history and a ``state_dict`` safe under ``torch.load(weights_only=True)``.

The user's loop::

    for epoch in range(epochs):
        for X, y in sched:          # one optimizer step's batch at the current size
            optimizer.zero_grad()
            sched.backward(X, y)     # loss and gradient in micro-batches, exact mean
            optimizer.step()
        sched.step()                 # end of epoch

Data-parallel (torchrun, a ``DistributedDataParallel`` model): every rank builds the schedule on the whole
dataset with the same seed; ``batch_size`` and ``max_batch_size`` are the global (effective) batch, of which each
rank gets its contiguous share (``world x`` per-rank batch), and :meth:`backward` weights the shares so that the
averaged gradient is exactly the global batch's.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from curvopt import distributed
from curvopt.curvature.losses import detect_reduction, loss_reduction, loss_terms
from curvopt.errors import EmptyDataError, OptionError

#: ``lr_scaling`` names: how the lr follows the batch size (Goyal et al.: linear; Krizhevsky/Hoffer: sqrt).
LR_SCALINGS = ("linear", "sqrt", "none")


def lr_factor(ratio: float, scaling: str) -> float:
    """The lr multiplier for a batch grown by ``ratio`` under ``scaling`` (``linear``, ``sqrt``, ``none``)."""
    if scaling == "linear":
        return float(ratio)
    if scaling == "sqrt":
        return math.sqrt(ratio)
    return 1.0


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name} must be a positive integer, got {value!r}")
    return value


class _Data:
    """Indexable view of the training set: ``(X, y)`` tensors, a ``TensorDataset`` or any map-style
    dataset of ``(x, y)`` pairs (collated with ``default_collate``)."""

    def __init__(self, dataset: Any) -> None:
        tensors = getattr(dataset, "tensors", None)
        if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(
                isinstance(t, torch.Tensor) for t in dataset):
            tensors = tuple(dataset)
        self.tensors = tensors
        self.dataset = dataset
        try:
            self.n = len(tensors[0]) if tensors is not None else len(dataset)
        except TypeError:
            raise OptionError(
                f"dataset must be an (X, y) pair of tensors or a map-style dataset with len(), got "
                f"{type(dataset).__name__}") from None
        if tensors is not None and len(tensors[1]) != self.n:
            raise OptionError(f"dataset: X has {self.n} samples but y has {len(tensors[1])}")
        if self.n == 0:
            raise EmptyDataError("the dataset holds no samples")

    def __len__(self) -> int:
        return self.n

    def fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tensors is not None:
            X, y = self.tensors[0], self.tensors[1]
            return X[idx.to(X.device)], y[idx.to(y.device)]
        from torch.utils.data import default_collate

        X, y = default_collate([self.dataset[int(i)] for i in idx])
        return X, y


class BatchSizeSchedule:
    """Base of :class:`AdaptiveBatchSize`, :class:`FixedBatchSize` and :class:`IncreaseBatchSize`.

    Iterating yields the batches ``(X, y)`` of one epoch, one optimizer step each, at the current
    :attr:`batch_size`, drawn without replacement from a permutation seeded by ``(seed, epoch)``.
    With ``drop_last=True`` (default) the samples left over at the end of an epoch (fewer than a
    batch) wait for the next epoch's permutation: no partial step, nothing carried over. Call
    :meth:`step` once at the end of each epoch.

    Args:
        optimizer: Any ``torch.optim.Optimizer`` (``curvopt.KFAC`` included).
        model: The network; ``loss_fn(model(X), y)`` is the mean (or sum) loss of a batch.
        loss_fn: The loss, ``reduction="mean"`` (default) or ``"sum"``.
        dataset: ``(X, y)`` tensors, a ``TensorDataset`` or a map-style dataset of ``(x, y)`` pairs.
        batch_size: Initial batch size.
        max_batch_size: Largest batch size (default ``batch_size``).
        micro_batch_size: Most samples per forward/backward pass in :meth:`backward` (default: the
            batch itself); a large batch then needs no more memory than this many samples.
        seed: Seeds the sampler (and the probe set of :class:`AdaptiveBatchSize`).
        drop_last: Drop the short last batch of each epoch (default) or make it a step of its own.
        epochs: Planned number of epochs (needed by schedules that depend on it, e.g. FGSM's fraction).
        process_group: The ``torch.distributed`` group that shares each batch (default: the default group
            when one is initialized). With more than one rank the model must be a
            ``DistributedDataParallel``, whose gradient average :meth:`backward` relies on.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, loss_fn: Any, dataset: Any, *,
                 batch_size: int, max_batch_size: int | None = None, micro_batch_size: int | None = None,
                 seed: int = 0, drop_last: bool = True, epochs: int | None = None,
                 process_group: Any = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise OptionError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise OptionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise OptionError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.optimizer, self.model, self.loss_fn = optimizer, model, loss_fn
        self.data = _Data(dataset)
        batch_size = _positive_int("batch_size", batch_size)
        max_batch_size = batch_size if max_batch_size is None else _positive_int("max_batch_size", max_batch_size)
        if max_batch_size < batch_size:
            raise OptionError(f"max_batch_size={max_batch_size} is below batch_size={batch_size}: "
                              f"raise max_batch_size or lower batch_size")
        n = len(self.data)
        if max_batch_size > n:
            raise OptionError(f"the dataset holds {n} samples, fewer than a batch "
                              f"(batch_size={batch_size}, max_batch_size={max_batch_size}): "
                              f"use a larger dataset or batch sizes of at most {n}")
        self.micro_batch_size = (None if micro_batch_size is None
                                 else _positive_int("micro_batch_size", micro_batch_size))
        self.initial_batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        if epochs is not None:
            epochs = _positive_int("epochs", epochs)
        self.epochs = epochs
        self.batch_size = batch_size
        self.epoch = 0
        self.iterations = 0
        self.history: list[dict[str, Any]] = []
        self._position = 0  # samples of this epoch's permutation already handed out
        self.process_group = process_group
        self.world = distributed.world_size(process_group)
        self.rank = distributed.rank(process_group)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            if not isinstance(model, DistributedDataParallel):
                raise OptionError(
                    f"{type(self).__name__} runs on {self.world} ranks, so each rank computes the gradient of "
                    f"its share of a batch only: wrap the model in torch.nn.parallel.DistributedDataParallel "
                    f"(which averages the gradients), got {type(model).__name__}")
            if batch_size < self.world:
                raise OptionError(f"batch_size={batch_size} is the global batch, shared by {self.world} ranks: "
                                  f"it must be at least {self.world}")
        # the batch handed out now: its global size and where this rank's share starts in it
        self._global_batch, self._share_start = 0, 0

    @property
    def device(self) -> torch.device:
        """The model's device (of its first parameter or buffer; CPU for a model without either)."""
        t = next(iter(self.model.parameters()), None)
        if t is None:
            t = next(iter(self.model.buffers()), None)
        return t.device if t is not None else torch.device("cpu")

    # --- lr -------------------------------------------------------------------------------------------
    @property
    def lr(self) -> float | None:
        """The first param group's lr (``None`` if the optimizer has none)."""
        return self.optimizer.param_groups[0].get("lr")

    @property
    def lrs(self) -> list[float]:
        """Every param group's lr."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def _require_lr(self, why: str) -> None:
        for i, g in enumerate(self.optimizer.param_groups):
            if "lr" not in g:
                raise OptionError(
                    f"{type(self.optimizer).__name__} param group {i} has no 'lr', which {why} scales; "
                    f"use an optimizer with an lr or turn the lr scaling off (lr_scaling='none')")

    def _scale_lr(self, factor: float) -> None:
        if factor == 1.0:
            return
        for g in self.optimizer.param_groups:
            lr = g["lr"]
            # a tensor lr (capturable optimizers) is updated in place, so a compiled step sees it
            if isinstance(lr, torch.Tensor):
                lr.mul_(factor)
            else:
                g["lr"] = lr * factor

    # --- sampling -------------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=g)

    def steps_per_epoch(self, batch_size: int | None = None) -> int:
        """Optimizer steps in one epoch at ``batch_size`` (default: the current one)."""
        b = batch_size or self.batch_size
        n = len(self.data)
        return n // b if self.drop_last else -(-n // b)

    def _exhausted(self) -> bool:
        n = len(self.data)
        return self._position >= n or (self.drop_last and n - self._position < self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._position > 0 and self._exhausted():
            # a loop without sched.step() would otherwise train one epoch and then silently nothing
            warnings.warn(f"{type(self).__name__}: epoch {self.epoch} is over and yields no batch; call "
                          f"sched.step() at the end of each epoch", RuntimeWarning, stacklevel=2)
        perm = self._permutation(self.epoch)
        while True:
            self._before_batch()
            b = self.batch_size
            if self._exhausted():
                return
            idx = perm[self._position:self._position + b]
            share = self._share(idx)
            X, y = self.data.fetch(share)
            X, y = self._transform_batch(X, y)
            self._on_step()
            self._position += len(idx)
            self.iterations += 1
            yield X, y

    def _share(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the global batch ``idx`` (all of it on one rank); the shares of
        the ranks differ in size by at most one sample."""
        self._global_batch = len(idx)
        if self.world == 1:
            self._share_start = 0
            return idx
        sizes = [len(c) for c in torch.tensor_split(idx, self.world)]
        self._share_start = sum(sizes[:self.rank])
        return idx[self._share_start:self._share_start + sizes[self.rank]]

    def _before_batch(self) -> None:
        """Hook before a batch is drawn (mid-epoch checks); the previous step has been taken."""

    def _on_step(self) -> None:
        """Hook when a batch is handed out, before ``iterations`` counts it (lr warm-up)."""

    def _transform_batch(self, X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook to change a batch before it is handed out (adversarial examples)."""
        return X, y

    def step(self) -> None:
        """End of epoch: the schedule's epoch-end rule, then the sampler moves to the next epoch."""
        self._end_of_epoch()
        self.epoch += 1
        self._position = 0

    def _end_of_epoch(self) -> None:
        self.history.append({"epoch": self.epoch, "iterations": self.iterations,
                             "batch_size": self.batch_size, "lr": self.lr})

    # --- gradient -------------------------------------------------------------------------------------
    def backward(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of the batch and its gradient, accumulated into ``.grad`` in micro-batches of at most
        ``micro_batch_size`` samples: each micro-batch's loss is weighted by its share of what the loss
        averages over (samples; for cross entropy/NLL the counted targets, class weights included, as
        torch's mean divides), so the gradient is the exact full-batch one (and ``curvopt.KFAC`` sees
        one step's statistics). ``X`` and ``y`` may stay on the host: each micro-batch is moved to the
        model's device.

        On several ranks ``X, y`` is this rank's share: the count the mean divides by is summed over the
        ranks (one scalar all-reduce), each share is weighted by ``world`` times its part of the global
        count so that DDP's average is the global batch's gradient, only the last micro-batch synchronises
        (the others run under ``no_sync``), and the returned loss is the global batch's (a second scalar
        all-reduce).

        Returns:
            The batch's loss (detached scalar), as ``loss_fn`` would give on the whole (global) batch.

        Raises:
            UnsupportedLossError: for a loss that is neither a mean nor a sum over samples.
        """
        total = len(X)
        if total == 0 and self.world == 1:
            raise EmptyDataError("sched.backward got an empty batch")
        mb = self.micro_batch_size or max(total, 1)
        device = self.device
        reduction = loss_reduction(self.loss_fn)
        whole = None
        loss_sum = None
        starts = list(range(0, total, mb)) or [0]
        for i, start in enumerate(starts):
            last = i == len(starts) - 1
            # a batch kept on the host goes to the model's device one micro-batch at a time
            Xi, yi = X[start:start + mb].to(device), y[start:start + mb].to(device)
            with self._no_sync(last):
                out = self.model(Xi)
                if reduction is None:  # a plain function: tell mean from sum on the first micro-batch
                    reduction = detect_reduction(self.loss_fn, out.detach(), yi)
                if reduction == "sum":
                    weight = 1.0
                else:
                    if whole is None:
                        whole, n_whole = self._global_count(loss_terms(self.loss_fn, y, total, reduction), total)
                    part = loss_terms(self.loss_fn, yi, len(yi), reduction)
                    if part == 0 and whole != 0 and not (last and self.world > 1):
                        continue  # nothing counted here (all targets ignored); its mean would be 0/0
                    weight = part / whole if whole != 0 else len(yi) / n_whole
                loss = self.loss_fn(out, yi) * weight
                if weight == 0:
                    loss = loss.nan_to_num(0.0, 0.0, 0.0)  # the empty last share still joins DDP's average
                (loss * self.world if self.world > 1 else loss).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if self.world > 1:
            (loss_sum,) = distributed.sum_across([loss_sum.reshape(1)], self.process_group)
            loss_sum = loss_sum.reshape(())
        return loss_sum

    def _no_sync(self, last: bool) -> Any:
        """DDP's ``no_sync`` for every micro-batch but the last: one gradient all-reduce per step."""
        if self.world > 1 and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _global_count(self, local: float, n_local: int) -> tuple[float, int]:
        """What the mean of the global batch divides by, and its samples (summed over ranks)."""
        if self.world == 1:
            return local, n_local
        counts = torch.tensor([float(local), float(n_local)], dtype=torch.float64, device=self.device)
        (counts,) = distributed.sum_across([counts], self.process_group)
        whole, n = counts.tolist()
        return (int(whole) if whole.is_integer() else whole), int(n)

    # --- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (plain numbers, strings, lists and tensors: loads with
        ``torch.load(weights_only=True)``). Save the optimizer's and model's state with it."""
        return {"batch_size": self.batch_size, "epoch": self.epoch, "iterations": self.iterations,
                "position": self._position, "seed": self.seed,
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; iteration resumes at the next batch of the saved epoch."""
        self.batch_size = int(state["batch_size"])
        self.epoch = int(state["epoch"])
        self.iterations = int(state["iterations"])
        self._position = int(state["position"])
        self.seed = int(state["seed"])
        self.history = [dict(h) for h in state["history"]]
