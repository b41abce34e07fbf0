"""Shared by the training benchmarks (race.py, newton.py): seeded runs with quarter-epoch checkpoints.

A run trains from a fixed initialization and batch order, times only the optimizer steps
(not the evaluations), and records ``(epoch, step, seconds, validation accuracy, test
accuracy)`` every quarter epoch. Newton-type optimizers get a closure over each batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from curvopt import batch_closure
from curvopt.data import Dataset, mnist1d
from curvopt.optim.second_order import SecondOrderOptimizer

VAL, TEST = 3, 4  # checkpoint columns


@dataclass
class Run:
    """One training run: accuracy checkpoints and the cost to reach each target."""

    hp: dict
    checkpoints: list = field(default_factory=list)  # (epoch, step, seconds, val acc, test acc)
    seconds: float = 0.0
    steps: int = 0
    diverged: bool = False

    def first(self, target: float, column: int) -> tuple | None:
        """The first checkpoint whose ``column`` accuracy reaches ``target``."""
        for c in self.checkpoints:
            if c[column] >= target:
                return c
        return None

    @property
    def final_val(self) -> float:
        return self.checkpoints[-1][VAL] if self.checkpoints else 0.0

    @property
    def final_test(self) -> float:
        return self.checkpoints[-1][TEST] if self.checkpoints else 0.0


def split(samples: int) -> tuple[Dataset, tuple[torch.Tensor, torch.Tensor]]:
    """mnist1d with ``samples`` samples; an eighth of the training set becomes the validation split."""
    full = mnist1d(num_samples=samples)
    n_val = len(full.y_train) // 8
    data = Dataset(full.X_train[n_val:], full.y_train[n_val:], full.X_test, full.y_test, full.num_classes)
    return data, (full.X_train[:n_val], full.y_train[:n_val])


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def train(model_fn: Callable[[], nn.Module], make_optimizer: Callable, hp: dict, data: Dataset, val: tuple, *,
          batch_size: int, max_epochs: float, stop_at: float | None = None, max_steps: int | None = None,
          seed: int = 0) -> Run:
    """Train ``model_fn()`` with ``make_optimizer(params, hp)``; evaluate every quarter epoch (untimed)."""
    torch.manual_seed(seed)
    model = model_fn()
    opt = make_optimizer(model.parameters(), hp)
    run = Run(hp)
    steps_per_epoch = math.ceil(len(data.y_train) / batch_size)
    eval_every = max(1, steps_per_epoch // 4)
    limit = max_epochs * steps_per_epoch if max_steps is None else min(max_steps, max_epochs * steps_per_epoch)
    epoch = 0
    try:
        while run.steps < limit:
            model.train()
            for X, y in data.loader(batch_size, shuffle=True, seed=seed * 1000 + epoch):
                t = time.perf_counter()
                if isinstance(opt, SecondOrderOptimizer):
                    loss = opt.step(batch_closure(model, nn.CrossEntropyLoss(), X, y))
                else:
                    opt.zero_grad()
                    out = nn.functional.cross_entropy(model(X), y)
                    out.backward()
                    opt.step()
                    loss = out.item()
                run.seconds += time.perf_counter() - t
                run.steps += 1
                if not math.isfinite(loss):
                    run.diverged = True
                    return run
                if run.steps % eval_every == 0 or run.steps == steps_per_epoch * (epoch + 1):
                    model.eval()
                    run.checkpoints.append((run.steps / steps_per_epoch, run.steps, run.seconds,
                                            accuracy(model, *val), accuracy(model, data.X_test, data.y_test)))
                    model.train()
                    if stop_at is not None and min(run.checkpoints[-1][VAL], run.checkpoints[-1][TEST]) >= stop_at:
                        return run  # both accuracies reached it: the selection and the report are known
                if run.steps >= limit:
                    return run
            epoch += 1
    finally:
        if hasattr(opt, "close"):
            opt.close()
    return run


def select(runs: list[Run], target: float) -> Run:
    """Fewest epochs to ``target`` validation accuracy, then the best final validation accuracy."""
    def key(r: Run):
        hit = r.first(target, VAL)
        return (0, hit[0], -r.final_val) if hit else (1, 0.0, -r.final_val)
    return min(runs, key=key)


def gradient_seconds(model_fn: Callable[[], nn.Module], data: Dataset, batch_size: int,
                     repeats: int = 20) -> float:
    """Seconds of one mini-batch gradient (forward and backward), best of ``repeats``."""
    torch.manual_seed(0)
    model = model_fn()
    X, y = data.X_train[:batch_size], data.y_train[:batch_size]
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(X), y).backward()
        best = min(best, time.perf_counter() - t)
    return best


def with_threads(threads: int, run: Callable, *args) -> object:
    """``run(*args)`` with ``threads`` torch threads, the previous count restored after (a test calling a
    benchmark's ``main()`` gets its process back as it was)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run(*args)
    finally:
        torch.set_num_threads(before)
