"""``curvopt train``: train with the ``[optimizer]`` named in the config, print and write per-epoch metrics to
``metrics.csv`` and the weights to ``model.pt``.

The ``[schedule]`` table chooses a batch-size schedule by name (:func:`curvopt.schedule.registry.make_schedule`):
``"none"`` (the default: a fixed ``[data] batch_size``, the plain loop), ``"fb"`` (FB: ``max_batch_size`` with
the lr scaled from ``batch_size`` after a warm-up), ``"gg"`` (the batch grows at ``milestones``), ``"abs"``
(the batch grows when the top Hessian eigenvalue of a fixed probe set has halved) and ``"absa"`` (ABS with
FGSM examples, ``options = { eps = ... }``); ``batch_size = 0`` means ``[data] batch_size``, and ``options``
are the schedule's keyword arguments (``epochs`` is ``[train] epochs``). ``metrics.csv`` then also holds, per
epoch, the optimizer steps so far (``iterations``), the ``batch_size`` and ``lr`` of the epoch's last step,
and the ``top_eigenvalue`` of the schedule's last probe in the epoch (empty where it measures none).

Under ``torchrun`` the model is wrapped in DDP and each rank draws its share of every epoch; the Newton-type
optimizers (``step(closure)``) take a closure over the rank's own share and combine the ranks themselves.
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import curvopt.cli as cli  # _dataset and _make_schedule are looked up there, where a test may substitute them
from curvopt.cli.common import _evaluate, _model, _on_device
from curvopt.cli.config import SCHEDULE_RESERVED, TrainConfig, check_optimizer_options, schedule_option_names
from curvopt.cli.launch import Launch, check_replicas, current_launch
from curvopt.errors import ConfigError, CurvoptError
from curvopt.optim import batch_closure
from curvopt.optim.registry import OPTIMIZERS, takes_closure
from curvopt.optim.second_order import SecondOrderOptimizer


def train(config: TrainConfig, out: Path | None = None) -> list[dict[str, Any]]:
    """Train with the configured optimizer (and ``[schedule]``); print and write per-epoch metrics, save the
    weights. Returns the rows of ``metrics.csv``."""
    from tqdm.auto import tqdm

    progress = bool(config["output"]["progress"])
    out = Path(out or config["output"]["dir"])
    launch = current_launch()
    if launch.world == 1:  # under torchrun: checked by main() before the ranks met
        _check_schedule(config)
    data = _on_device(cli._dataset(config), launch.device)
    model = _model(config, data.X_train.shape[1], data.num_classes).to(launch.device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = _optimizer(config, model)
    net = model
    if launch.world > 1:  # DDP averages the gradients; its constructor gives every rank rank 0's weights
        # (the Newton-type optimizers, which combine the ranks themselves, use it for the latter only)
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[launch.device.index] if launch.device.index is not None
                                      else None)
    name = config["schedule"]["name"]
    sched = (None if name == "none" else
             cli._make_schedule(config, optimizer, net, loss_fn, (data.X_train, data.y_train), world=launch.world))
    if launch.main:
        out.mkdir(parents=True, exist_ok=True)
    fields = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "iterations", "batch_size",
              "lr", "top_eigenvalue"]
    rows: list[dict[str, Any]] = []
    batch_size, max_batch_size = _schedule_sizes(config)
    sizes = f"batch {batch_size}" + (f" -> {max_batch_size}, schedule {name}" if sched is not None else "")
    if launch.world > 1:
        sizes += f" per rank; {launch.world} ranks: effective batch {batch_size * launch.world}"
    batch_size *= launch.world  # the metrics report the effective (global) batch
    print(f"training {config['model']['arch']} on {config['data']['dataset']} with {config['optimizer']['name']} "
          f"(lr {optimizer.defaults['lr']}, {sizes})")
    print("  ".join(f"{f:>10}" for f in fields))
    with (open(out / "metrics.csv", "w", newline="") if launch.main else io.StringIO()) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        elapsed = 0.0
        iterations = 0
        for epoch in range(1, config["train"]["epochs"] + 1):
            model.train()
            start = time.perf_counter()
            eigenvalue: float | str = ""
            if sched is None:
                loader = _loader(data, batch_size // launch.world, config["model"]["seed"], epoch, launch)
                for X, y in tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress):
                    iterations += 1
                    if isinstance(optimizer, SecondOrderOptimizer):
                        # Newton-type: a closure over this rank's share of the batch, on the unwrapped model;
                        # the optimizer weighs and all-reduces the ranks' losses, gradients and curvature
                        # products itself, so DDP's equal-weight gradient average never takes part
                        optimizer.step(batch_closure(model, loss_fn, X, y))
                        continue
                    optimizer.zero_grad()
                    loss_fn(net(X), y).backward()
                    optimizer.step()
                lr = _first_lr(optimizer)
            else:
                seen = len(sched.history)
                for X, y in tqdm(sched, desc=f"epoch {epoch}", unit="batch", total=sched.steps_per_epoch(),
                                 leave=False, disable=not progress):
                    optimizer.zero_grad()
                    sched.backward(X, y)
                    optimizer.step()
                # what this epoch trained with; sched.step() may then grow the batch for the next one
                batch_size, lr, iterations = sched.batch_size, _first_lr(optimizer), sched.iterations
                sched.step()  # its probes count as training time
                eigenvalue = _epoch_eigenvalue(sched.history[seen:])
            elapsed += time.perf_counter() - start
            model.eval()
            train_loss, train_acc = _evaluate(model, data.X_train, data.y_train, loss_fn)
            test_loss, test_acc = _evaluate(model, data.X_test, data.y_test, loss_fn)
            row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                       test_acc=test_acc, seconds=elapsed, iterations=iterations, batch_size=batch_size, lr=lr,
                       top_eigenvalue=eigenvalue)
            writer.writerow(row)
            handle.flush()
            rows.append(row)
            print("  ".join(_cell(row[f]) for f in fields))
    check_replicas(model, launch, config["optimizer"]["name"])
    if launch.main:
        torch.save(model.state_dict(), out / "model.pt")
    print(f"metrics: {out / 'metrics.csv'}; weights: {out / 'model.pt'}")
    return rows


def _optimizer(config: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The ``[optimizer]`` of ``config`` over ``model``'s parameters (lr 0: the registry's default)."""
    name = config["optimizer"]["name"]
    options = dict(config["optimizer"]["options"])
    check_optimizer_options(name, options)
    options["lr"] = config["optimizer"]["lr"] or OPTIMIZERS.info(name, "default_lr")
    if takes_closure(name):
        # the command always has the model and the batch, so the Newton-type optimizers get the GGN (positive
        # semi-definite) unless told otherwise: with the classes' default Hessian, all three diverged on the
        # default cnn1d (mnist1d, batch 128: train loss 2.3 -> 2.8-6.5 in 3 epochs, test accuracy 0.19-0.26)
        # where the GGN trains (0.78-0.89)
        options.setdefault("curvature", "ggn")
    try:
        return OPTIMIZERS.get(name)(model.parameters(), **options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[optimizer] {name}: {e}") from e


def _loader(data: Any, batch_size: int, seed: int, epoch: int, launch: Launch) -> Any:
    """One epoch's shuffled batches of the training split: all of it in one process; under torchrun this
    rank's share, drawn by a ``DistributedSampler`` (which pads the last round with repeated samples so that
    every rank takes the same number of steps)."""
    if launch.world == 1:
        return data.loader(batch_size, shuffle=True, seed=seed + epoch)
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    dataset = TensorDataset(data.X_train, data.y_train)
    sampler = DistributedSampler(dataset, num_replicas=launch.world, rank=launch.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def _epoch_eigenvalue(records: list[dict[str, Any]]) -> float | str:
    """The top eigenvalue of the last of ``records`` (one epoch's history) that measured one; per-block
    values joined by ``;`` (``blockwise``); ``""`` for none."""
    for record in reversed(records):
        value = record.get("eigenvalue")
        if value is None:
            continue
        return ";".join(repr(float(v)) for v in value) if isinstance(value, list) else float(value)
    return ""


def _first_lr(optimizer: torch.optim.Optimizer) -> float | str:
    lr = optimizer.param_groups[0].get("lr")
    return "" if lr is None else float(lr)


def _cell(value: Any) -> str:
    return f"{value:>10.4g}" if isinstance(value, (int, float)) else f"{value:>10}"


def _schedule_sizes(config: Any) -> tuple[int, int | None]:
    """``(batch_size, max_batch_size)`` of ``[schedule]``: 0 means ``[data] batch_size`` and "not given"."""
    s = config["schedule"]
    return s["batch_size"] or config["data"]["batch_size"], s["max_batch_size"] or None


def _make_schedule(config: Any, optimizer: torch.optim.Optimizer, model: nn.Module,
                   loss_fn: Any, dataset: Any, world: int = 1) -> Any:
    """The ``[schedule]`` of ``config`` over ``dataset`` (``epochs`` from ``[train]``, ``seed`` from ``[model]``
    unless the options set it). On ``world`` ranks the schedule's batches are global: ``world`` times the
    per-rank sizes of the config, each shared by the ranks."""
    from curvopt.schedule.registry import make_schedule

    batch_size, max_batch_size = _schedule_sizes(config)
    batch_size, max_batch_size = batch_size * world, max_batch_size and max_batch_size * world
    options = dict(config["schedule"]["options"])
    options["epochs"] = config["train"]["epochs"]
    options.setdefault("seed", config["model"]["seed"])
    return make_schedule(config["schedule"]["name"], optimizer, model, loss_fn, dataset, batch_size=batch_size,
                         max_batch_size=max_batch_size, **options)


def _check_schedule(config: Any) -> None:
    """Every ``[schedule]`` value, before the data is built: the sizes, the option names, and the option
    values, by building the schedule once on a stand-in (a 1-feature linear model and ``max_batch_size``
    zero samples, no computation).

    Raises:
        ConfigError: naming the key and the fix.
    """
    s = config["schedule"]
    name, options = s["name"], s["options"]
    batch_size, max_batch_size = _schedule_sizes(config)
    others = "choose fb, gg, abs or absa"
    if name == "none":
        if options:
            raise ConfigError(f"[schedule] name = 'none' takes no options (it trains at the fixed batch_size "
                              f"{batch_size}): drop options = {options!r} or {others}")
        if max_batch_size not in (None, batch_size):
            raise ConfigError(f"[schedule] max_batch_size = {max_batch_size} with name = 'none', which keeps "
                              f"batch_size = {batch_size}: drop max_batch_size or {others}")
        return
    opt_name = config["optimizer"]["name"]
    if takes_closure(opt_name):
        raise ConfigError(f"[schedule] name = {name!r} needs a gradient optimizer (kfac, adam, sgd): {opt_name} "
                          f"takes step(closure) and its lr is a step length, not scaled with the batch; "
                          f"use name = 'none' or another [optimizer] name")
    if max_batch_size is None:
        raise ConfigError(f"[schedule] name = {name!r} needs max_batch_size, the largest batch "
                          f"(>= batch_size = {batch_size})")
    if max_batch_size < batch_size:
        raise ConfigError(f"[schedule] max_batch_size = {max_batch_size} is below batch_size = {batch_size}: "
                          f"raise max_batch_size or lower batch_size")
    reserved = sorted(set(SCHEDULE_RESERVED) & set(options))
    if reserved:
        raise ConfigError(f"[schedule] options may not set {', '.join(reserved)}: the command sets it "
                          f"([train] epochs)")
    valid = schedule_option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"[schedule] options for {name!r} has unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(valid)}")
    required = {"gg": "milestones", "absa": "eps"}.get(name)
    if required and required not in options:
        example = "milestones = [3, 6]" if name == "gg" else "eps = 0.1 (in the data's units)"
        raise ConfigError(f"[schedule] name = {name!r} needs options = {{ {example} }}")
    stand_in = nn.Linear(1, 2)
    optimizer = _optimizer(config, stand_in)  # its own errors name [optimizer]
    # zero-stride views: a stand-in of max_batch_size samples that allocates one
    X, y = torch.zeros(1, 1).expand(max_batch_size, 1), torch.zeros(1, dtype=torch.int64).expand(max_batch_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli._make_schedule(config, optimizer, stand_in, nn.CrossEntropyLoss(), (X, y))
    except (CurvoptError, TypeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"[schedule] {name}: {first}") from e
    finally:
        if hasattr(optimizer, "close"):  # KFAC's global module hooks go now, not at garbage collection
            optimizer.close()
