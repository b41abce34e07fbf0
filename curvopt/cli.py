"""Command line: ``curvopt analyze [--config FILE.toml]`` and ``curvopt train [--config FILE.toml]``.

With no config, ``analyze`` trains a small CNN on the embedded mnist1d data for a few
epochs, then prints the top eigenvalues of the configured curvature (the Hessian by
default), its trace with the standard error and the per-layer sensitivity table, and
writes the spectral density and loss-landscape plots, each titled with the backend used.
``train`` trains with the optimizer named in the config and writes per-epoch metrics to
CSV and the weights to ``model.pt``. Its ``[schedule]`` table chooses a batch-size schedule
by name (:func:`curvopt.schedule.registry.make_schedule`): ``"none"`` (the default: a fixed
``[data] batch_size``, the plain loop), ``"fb"`` (FB: ``max_batch_size`` with the lr scaled
from ``batch_size`` after a warm-up), ``"gg"`` (the batch grows at ``milestones``), ``"abs"``
(the batch grows when the top Hessian eigenvalue of a fixed probe set has halved) and
``"absa"`` (ABS with FGSM examples, ``options = { eps = ... }``); ``batch_size = 0`` means
``[data] batch_size``, and ``options`` are the schedule's keyword arguments (``epochs`` is
``[train] epochs``). ``metrics.csv`` then also holds, per epoch, the optimizer steps so far
(``iterations``), the ``batch_size`` and ``lr`` of the epoch's last step, and the
``top_eigenvalue`` of the schedule's last probe in the epoch (empty where it measures none).
Every value of a config, and the checkpoint, is checked before any computation: bad
configuration ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import json
import math
import sys
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvopt.errors import ConfigError, CurvoptError
from curvopt.linalg.trace import METHODS as TRACE_METHODS
from curvopt.optim import ARC, KFAC, NewtonMR, TrustRegion, batch_closure
from curvopt.optim.second_order import SecondOrderOptimizer

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"arch": "cnn1d", "checkpoint": "", "train_epochs": 10, "lr": 3e-3, "seed": 0},
    "data": {"dataset": "mnist1d", "samples": 2000, "batch_size": 500},
    "loss": {"name": "cross_entropy"},
    "curvature": {"backend": "hessian", "options": {}},
    "estimators": {
        "top_k": 5,
        "tol": 1e-3,
        "trace_probes": 60,
        "trace_method": "hutchpp",
        "density_probes": 2,
        "density_steps": 40,
        "sensitivity_bits": 4,
        "landscape_steps": 21,
        "landscape_radius": 1.0,
        "seed": 0,
    },
    "output": {"dir": "runs/analyze", "plots": True, "progress": True},
}
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"arch": "cnn1d", "seed": 0},
    "data": {"dataset": "mnist1d", "batch_size": 128},
    "optimizer": {"name": "kfac", "lr": 0.0, "options": {}},
    "train": {"epochs": 10},
    "schedule": {"name": "none", "batch_size": 0, "max_batch_size": 0, "options": {}},
    "output": {"dir": "runs/train", "progress": True},
}
ARCHS = ("cnn1d", "mlp", "transformer", "lstm")
DATASETS = ("mnist1d", "digits")
LOSSES = {"cross_entropy": nn.CrossEntropyLoss}
#: ``lr`` when the config leaves it at 0: a sensible start per optimizer (1 = the full
#: Newton / trust-region / cubic step).
DEFAULT_LR = {"kfac": 0.05, "adam": 1e-3, "sgd": 0.05, "newton_mr": 1.0, "trust_region": 1.0, "arc": 1.0}
OPTIMIZERS = {"kfac": KFAC, "adam": torch.optim.Adam, "sgd": torch.optim.SGD, "newton_mr": NewtonMR,
              "trust_region": TrustRegion, "arc": ARC}


#: Numeric values and their valid range: ``(section, key): (lowest, lowest allowed?)``; every
#: number must also be finite. Checked when the config is loaded, before any computation.
RANGES: dict[tuple[str, str], tuple[float, bool]] = {
    ("model", "train_epochs"): (0, True),
    ("model", "lr"): (0, False),
    ("model", "seed"): (0, True),
    ("data", "samples"): (1, True),
    ("data", "batch_size"): (1, True),
    ("estimators", "top_k"): (1, True),
    ("estimators", "tol"): (0, False),
    ("estimators", "trace_probes"): (1, True),
    ("estimators", "density_probes"): (1, True),
    ("estimators", "density_steps"): (2, True),
    ("estimators", "sensitivity_bits"): (2, True),
    ("estimators", "landscape_steps"): (2, True),  # one point is no landscape: refused
    ("estimators", "landscape_radius"): (0, False),
    ("estimators", "seed"): (0, True),
    ("optimizer", "lr"): (0, True),  # 0: the optimizer's default (DEFAULT_LR)
    ("train", "epochs"): (1, True),
    ("schedule", "batch_size"): (0, True),  # 0: [data] batch_size
    ("schedule", "max_batch_size"): (0, True),  # 0: batch_size (required by fb, gg, abs, absa)
}
#: ``[schedule] options`` the command sets itself.
SCHEDULE_RESERVED = ("epochs",)


def load_config(path: str | None, defaults: dict[str, dict[str, Any]] = DEFAULTS) -> dict[str, dict[str, Any]]:
    """``defaults``, overridden by the TOML file at ``path``; unknown keys are errors."""
    config = copy.deepcopy(defaults)
    if path is None:
        return config
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        user = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    for section, values in user.items():
        if section not in config:
            raise ConfigError(f"unknown section [{section}] in {path}; valid: {', '.join(config)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] in {path} must be a table")
        for key, value in values.items():
            if key not in config[section]:
                raise ConfigError(
                    f"unknown key '{key}' in [{section}] of {path}; valid: {', '.join(config[section])}"
                )
            expected = type(defaults[section][key])
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(
                    f"[{section}] {key} = {value!r} should be a {expected.__name__} in {path}"
                )
            config[section][key] = value
    _check_choices(config)
    _check_ranges(config, path)
    reserved = sorted({"params", "progress"} & set(config.get("curvature", {}).get("options", {})))
    if reserved:
        raise ConfigError(f"[curvature] options in {path} may not set {', '.join(reserved)}: the command sets "
                          "them (all parameters; progress from [output] progress)")
    return config


def _check_ranges(config: dict[str, dict[str, Any]], path: str) -> None:
    """Every number within its range (:data:`RANGES`), so that no run fails after its computation."""
    for (section, key), (low, inclusive) in RANGES.items():
        if key not in config.get(section, {}):  # train configs have fewer keys
            continue
        value = config[section][key]
        ok = math.isfinite(value) and (value >= low if inclusive else value > low)
        if not ok:
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"[{section}] {key} = {value!r} in {path}; it must be a finite number {bound}")


def _check_choices(config: dict[str, dict[str, Any]]) -> None:
    from curvopt.curvature import available_curvatures
    from curvopt.schedule.registry import available_schedules

    choices = [("model", "arch", ARCHS), ("data", "dataset", DATASETS), ("loss", "name", tuple(LOSSES)),
               ("curvature", "backend", tuple(available_curvatures())), ("optimizer", "name", tuple(OPTIMIZERS)),
               ("estimators", "trace_method", TRACE_METHODS), ("schedule", "name", available_schedules())]
    for section, key, valid in choices:
        if section in config and config[section][key] not in valid:
            raise ConfigError(f"[{section}] {key} = {config[section][key]!r}; valid: {', '.join(valid)}")


def _dataset(config):
    from curvopt.data import digits, mnist1d

    return mnist1d() if config["data"]["dataset"] == "mnist1d" else digits()


def _model(config, features: int, classes: int) -> nn.Module:
    """The ``[model] arch`` network for inputs ``[N, features]``: the transformer and the LSTM
    read the signal as a sequence of patches of 4 values (:func:`curvopt.models.transformer`)."""
    from curvopt.models import cnn1d, lstm, mlp, transformer

    torch.manual_seed(config["model"]["seed"])
    arch = config["model"]["arch"]
    if arch == "cnn1d":
        return cnn1d(length=features, classes=classes)
    if arch == "transformer":
        return transformer(features, classes)
    if arch == "lstm":
        return lstm(features, classes)
    return mlp((features, 128, 128, classes))


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` saved with ``torch.save`` at ``path``, read with ``weights_only=True``.

    Raises:
        ConfigError: the file is missing or is not a state dict (a pickled module, a tensor, an
            optimizer state, a corrupt file).
    """
    if not Path(path).is_file():
        raise ConfigError(f"[model] checkpoint not found: {path}")
    fix = "save one with torch.save(model.state_dict(), path)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: pickled modules, corrupt or foreign files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"[model] checkpoint {path} cannot be read as a state dict ({first}); {fix}") from e
    if not (isinstance(state, dict) and state and
            all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        kind = type(state).__name__ if not isinstance(state, dict) else "dict that is not a state dict"
        raise ConfigError(f"[model] checkpoint {path} holds a {kind}, not a model's state dict; {fix}")
    return state


def _load_checkpoint(model: nn.Module, state: dict[str, torch.Tensor], path: str, arch: str) -> None:
    """Load ``state`` (read from ``path``) into ``model``.

    Raises:
        ConfigError: ``state`` is the state dict of another architecture.
    """
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]  # "Missing key(s) ...", "size mismatch ..."
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise ConfigError(f"[model] checkpoint {path} does not fit a {arch}: {detail}") from e


def _evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn: Any = None) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on ``(X, y)`` without gradients."""
    with torch.no_grad():
        out = model(X)
        loss = float((loss_fn or nn.CrossEntropyLoss())(out, y))
        return loss, float((out.argmax(1) == y).float().mean())


def _train(model, data, loss_fn, config, progress: bool) -> None:
    from tqdm.auto import tqdm

    epochs = config["model"]["train_epochs"]
    opt = torch.optim.Adam(model.parameters(), lr=config["model"]["lr"])
    loader = data.loader(batch_size=128, shuffle=True, seed=config["model"]["seed"])
    model.train()
    for _ in tqdm(range(epochs), desc="training", unit="epoch", disable=not progress):
        for X, y in loader:
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step()
    model.eval()


def analyze(config: dict[str, dict[str, Any]], out: Path | None = None) -> dict[str, Any]:
    """Run the analysis described by ``config``; returns what it printed, as data."""
    import curvopt
    from curvopt.curvature import curvature

    est, outcfg = config["estimators"], config["output"]
    progress = bool(outcfg["progress"])
    out = Path(out or outcfg["dir"])
    ckpt = config["model"]["checkpoint"]
    state = _read_checkpoint(ckpt) if ckpt else None  # a wrong file fails before the data is built
    data = _dataset(config)
    model = _model(config, data.X_train.shape[1], data.num_classes)
    loss_fn = LOSSES[config["loss"]["name"]]()
    backend = config["curvature"]["backend"]
    options = dict(config["curvature"]["options"])
    options.setdefault("cache", True)
    n = min(config["data"]["samples"], data.X_train.shape[0])
    batches = list(zip(data.X_train[:n].split(config["data"]["batch_size"]),
                       data.y_train[:n].split(config["data"]["batch_size"])))
    # Everything that can be checked before the computation is: the checkpoint, the budgets
    # against the model's size, and the backend options (building an operator runs no pass).
    t0 = time.perf_counter()
    if state is not None:
        _load_checkpoint(model, state, ckpt, config["model"]["arch"])
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if est["top_k"] > P:
        raise ConfigError(f"[estimators] top_k = {est['top_k']} exceeds the {P} parameters of the "
                          f"{config['model']['arch']}")
    with warnings.catch_warnings():  # the real operator below warns once
        warnings.simplefilter("ignore")
        curvature(backend, model, loss_fn, batches, **options)
    if not ckpt:
        _train(model, data, loss_fn, config, progress)
    model.eval()
    print(f"model: {config['model']['arch']} ({sum(p.numel() for p in model.parameters())} parameters), "
          f"{'loaded' if ckpt else 'trained'} in {time.perf_counter() - t0:.1f}s; "
          f"train acc {_evaluate(model, data.X_train, data.y_train)[1]:.3f}, "
          f"test acc {_evaluate(model, data.X_test, data.y_test)[1]:.3f}")
    bar = f"{backend} pass" if progress else False
    op = curvature(backend, model, loss_fn, batches, progress=bar, **options)
    print(f"curvature: {backend} on {n} samples in {len(batches)} batches, P = {op.shape[0]}")

    top = curvopt.top_eigenvalues(op, est["top_k"], tol=est["tol"], seed=est["seed"])
    print(f"top-{est['top_k']} eigenvalues of the {backend} ({top.iterations} products): "
          + ", ".join(f"{v:.4g}" for v in top.eigenvalues.tolist()))
    report = curvopt.sensitivity(model, batches, loss_fn, curvature=backend, probes=est["trace_probes"],
                                 method=est["trace_method"], bits=est["sensitivity_bits"], seed=est["seed"],
                                 progress=bar, **options)
    print(f"{backend} trace: {report.total_trace:.4g} ± {report.total_trace_se:.2g} "
          f"({est['trace_method']}, {est['trace_probes']} products)")
    print(report.table())
    result = {"backend": backend, "top_eigenvalues": top.eigenvalues.tolist(), "trace": report.total_trace,
              "trace_se": report.total_trace_se, "sensitivity": report.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    if outcfg["plots"]:
        from curvopt.analysis.plots import plot_landscape, plot_spectral_density

        grid, dens = curvopt.spectral_density(op, probes=est["density_probes"], steps=est["density_steps"],
                                              seed=est["seed"])
        paths = [plot_spectral_density(grid, dens, out / "spectral_density.png",
                                       title=f"{backend} eigenvalue density")]
        land = curvopt.loss_landscape(model, loss_fn, batches, [top.eigenvectors[:, 0]],
                                      steps=est["landscape_steps"], radius=est["landscape_radius"],
                                      progress="landscape pass" if progress else False)
        paths.append(plot_landscape(land, out / "landscape_top_eigenvector.png",
                                    title=f"loss along the top {backend} eigenvector"))
        if top.eigenvectors.shape[1] > 1:
            land2 = curvopt.loss_landscape(model, loss_fn, batches,
                                           [top.eigenvectors[:, 0], top.eigenvectors[:, 1]],
                                           steps=max(5, est["landscape_steps"] // 2),
                                           radius=est["landscape_radius"],
                                           progress="landscape pass" if progress else False)
            paths.append(plot_landscape(land2, out / "landscape_top2.png",
                                        title=f"loss on the top-2 {backend} eigenvector plane"))
        result["plots"] = [str(p) for p in paths]
        print("plots: " + ", ".join(result["plots"]))
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    print(f"report: {out / 'analysis.json'}")
    return result


def _optimizer(config: dict[str, dict[str, Any]], model: nn.Module) -> torch.optim.Optimizer:
    name, lr = config["optimizer"]["name"], config["optimizer"]["lr"] or DEFAULT_LR[config["optimizer"]["name"]]
    options = dict(config["optimizer"]["options"])
    factory = OPTIMIZERS[name]
    accepted = list(inspect.signature(factory.__init__).parameters)
    valid = [p for p in accepted if p not in ("self", "params", "lr")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"[optimizer] options for {name!r} has unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(valid)}")
    options["lr"] = lr
    try:
        return factory(model.parameters(), **options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[optimizer] {name}: {e}") from e


def _schedule_sizes(config: dict[str, dict[str, Any]]) -> tuple[int, int | None]:
    """``(batch_size, max_batch_size)`` of ``[schedule]``: 0 means ``[data] batch_size`` and "not given"."""
    s = config["schedule"]
    return s["batch_size"] or config["data"]["batch_size"], s["max_batch_size"] or None


def _schedule_option_names(name: str) -> list[str]:
    """The ``[schedule] options`` keys schedule ``name`` accepts (its class's keyword arguments, less
    those the command sets)."""
    from curvopt.schedule import AdaptiveBatchSize, FixedBatchSize, IncreaseBatchSize
    from curvopt.schedule.base import BatchSizeSchedule

    classes = {"fb": FixedBatchSize, "gg": IncreaseBatchSize, "abs": AdaptiveBatchSize, "absa": AdaptiveBatchSize}
    cls = classes[name]
    # set by the command from batch_size/max_batch_size (fb: base_batch_size = batch_size), or by eps/fraction
    taken = {"self", "optimizer", "model", "loss_fn", "dataset", "batch_size", "max_batch_size", "kwargs",
             "base_batch_size", "adversarial", *SCHEDULE_RESERVED}
    names = [p for c in (cls, BatchSizeSchedule) for p in inspect.signature(c.__init__).parameters]
    names += ["eps", "fraction"] if name == "absa" else []
    return [n for n in dict.fromkeys(names) if n not in taken]


def _make_schedule(config: dict[str, dict[str, Any]], optimizer: torch.optim.Optimizer, model: nn.Module,
                   loss_fn: Any, dataset: Any) -> Any:
    """The ``[schedule]`` of ``config`` over ``dataset`` (``epochs`` from ``[train]``, ``seed`` from ``[model]``
    unless the options set it)."""
    from curvopt.schedule.registry import make_schedule

    batch_size, max_batch_size = _schedule_sizes(config)
    options = dict(config["schedule"]["options"])
    options["epochs"] = config["train"]["epochs"]
    options.setdefault("seed", config["model"]["seed"])
    return make_schedule(config["schedule"]["name"], optimizer, model, loss_fn, dataset, batch_size=batch_size,
                         max_batch_size=max_batch_size, **options)


def _check_schedule(config: dict[str, dict[str, Any]]) -> None:
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
    if issubclass(OPTIMIZERS[opt_name], SecondOrderOptimizer):
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
    valid = _schedule_option_names(name)
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
            _make_schedule(config, optimizer, stand_in, nn.CrossEntropyLoss(), (X, y))
    except (CurvoptError, TypeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"[schedule] {name}: {first}") from e
    finally:
        if hasattr(optimizer, "close"):  # KFAC's global module hooks go now, not at garbage collection
            optimizer.close()


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


def train(config: dict[str, dict[str, Any]], out: Path | None = None) -> list[dict[str, Any]]:
    """Train with the configured optimizer (and ``[schedule]``); print and write per-epoch metrics, save the
    weights. Returns the rows of ``metrics.csv``."""
    from tqdm.auto import tqdm

    progress = bool(config["output"]["progress"])
    out = Path(out or config["output"]["dir"])
    _check_schedule(config)
    data = _dataset(config)
    model = _model(config, data.X_train.shape[1], data.num_classes)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = _optimizer(config, model)
    name = config["schedule"]["name"]
    sched = (None if name == "none" else
             _make_schedule(config, optimizer, model, loss_fn, (data.X_train, data.y_train)))
    out.mkdir(parents=True, exist_ok=True)
    fields = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "iterations", "batch_size",
              "lr", "top_eigenvalue"]
    rows: list[dict[str, Any]] = []
    batch_size, max_batch_size = _schedule_sizes(config)
    sizes = f"batch {batch_size}" + (f" -> {max_batch_size}, schedule {name}" if sched is not None else "")
    print(f"training {config['model']['arch']} on {config['data']['dataset']} with {config['optimizer']['name']} "
          f"(lr {optimizer.defaults['lr']}, {sizes})")
    print("  ".join(f"{f:>10}" for f in fields))
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        elapsed = 0.0
        iterations = 0
        for epoch in range(1, config["train"]["epochs"] + 1):
            model.train()
            start = time.perf_counter()
            eigenvalue: float | str = ""
            if sched is None:
                loader = data.loader(batch_size, shuffle=True, seed=config["model"]["seed"] + epoch)
                for X, y in tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress):
                    iterations += 1
                    if isinstance(optimizer, SecondOrderOptimizer):  # Newton-type: a closure over the batch
                        optimizer.step(batch_closure(model, loss_fn, X, y))
                        continue
                    optimizer.zero_grad()
                    loss_fn(model(X), y).backward()
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
    torch.save(model.state_dict(), out / "model.pt")
    print(f"metrics: {out / 'metrics.csv'}; weights: {out / 'model.pt'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curvopt", description="curvature analysis and second-order training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="spectrum, trace and per-layer sensitivity of a trained network")
    p.add_argument("--config", help="TOML file (model/checkpoint, data, loss, curvature backend, budgets)")
    p.add_argument("--out", help="output folder (default: [output] dir)")
    t = sub.add_parser("train", help="train with an optimizer chosen by name (kfac, adam, sgd, newton_mr, "
                                     "trust_region, arc)")
    t.add_argument("--config", help="TOML file (model, data, optimizer and its options, epochs, batch-size "
                                    "schedule)")
    t.add_argument("--out", help="output folder (default: [output] dir)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else None
    try:
        if args.command == "train":
            train(load_config(args.config, TRAIN_DEFAULTS), out)
        else:
            analyze(load_config(args.config), out)
    except (CurvoptError, OSError) as e:
        print(f"curvopt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
