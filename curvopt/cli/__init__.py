"""Command line: ``curvopt analyze | train | quantize [--config FILE.toml]``.

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
``quantize`` runs Hessian-aware mixed-precision quantization (HAWQ) end to end: a model (``[model]
checkpoint``, or trained on the embedded data), the per-layer sensitivity once (``[sensitivity]``: any
curvature backend and score, bit independent), then for each budget of ``[allocation]`` (``average_bits``
or ``size_bytes``, one or several) the test loss and accuracy of FP32, uniform b-bit for every b in
``bits``, the mixed-precision plan of the configured score at exactly the size of the uniform plan whose
average is the budget (else at the budget), the mean and spread of ``random`` random allocations of that
size, and the allocation of the ``measured`` score (the loss increase of each layer quantized alone). With
``[finetune] epochs > 0`` each row is also evaluated after straight-through QAT, in separate columns. It
prints the table and writes ``quantize.json`` and, with ``[output] plots``, ``pareto.png``.
Every value of a config, and the checkpoint, is checked before any computation: bad
configuration ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvopt.cli.config import (
    ALLOCATION_METHODS,
    ARCHS,
    DATASETS,
    DEFAULT_AVERAGE_BITS,
    DEFAULTS,
    FIXED_ALIASES,
    LOSSES,
    QUANTIZE_DEFAULTS,
    SCHEDULE_RESERVED,
    TRAIN_DEFAULTS,
    AnalyzeConfig,
    QuantizeConfig,
    TrainConfig,
    check_optimizer_options,
    load_config,
    schedule_option_names,
)
from curvopt.cli.config import make_quantizer as _make_quantizer
from curvopt.cli.config import sensitivity_curvature as _sensitivity_curvature
from curvopt.cli.launch import Launch, current_launch, process_group, requested_world, shard
from curvopt.errors import ConfigError, CurvoptError
from curvopt.optim import batch_closure
from curvopt.optim.registry import OPTIMIZERS, takes_closure
from curvopt.optim.second_order import SecondOrderOptimizer


def _dataset(config):
    from curvopt.data import digits, mnist1d

    return mnist1d() if config["data"]["dataset"] == "mnist1d" else digits()


def _model(config, features: int, classes: int) -> nn.Module:
    """The ``[model] arch`` network for inputs ``[N, features]``: the transformer and the LSTM
    read the signal as a sequence of patches of 4 values (:func:`curvopt.models.transformer`); the MLP
    has the hidden widths ``[model] hidden`` and the CNN ``[model] conv_layers`` convolutions (quantize
    configs; 128, 128 and 2 for the others)."""
    from curvopt.models import cnn1d, lstm, mlp, transformer

    torch.manual_seed(config["model"]["seed"])
    arch = config["model"]["arch"]
    if arch == "cnn1d":
        return cnn1d(length=features, classes=classes, conv_layers=config["model"].get("conv_layers", 2))
    if arch == "transformer":
        return transformer(features, classes)
    if arch == "lstm":
        return lstm(features, classes)
    return mlp((features, *config["model"].get("hidden", (128, 128)), classes))


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


def analyze(config: AnalyzeConfig, out: Path | None = None) -> dict[str, Any]:
    """Run the analysis described by ``config``; returns what it printed, as data."""
    import curvopt
    from curvopt.curvature import curvature

    est, outcfg = config["estimators"], config["output"]
    progress = bool(outcfg["progress"])
    out = Path(out or outcfg["dir"])
    ckpt = config["model"]["checkpoint"]
    state = _read_checkpoint(ckpt) if ckpt else None  # a wrong file fails before the data is built
    launch = current_launch()
    data = _on_device(_dataset(config), launch.device)
    model = _model(config, data.X_train.shape[1], data.num_classes).to(launch.device)
    loss_fn = LOSSES[config["loss"]["name"]]()
    backend = config["curvature"]["backend"]
    options = dict(config["curvature"]["options"])
    options.setdefault("cache", True)
    n = min(config["data"]["samples"], data.X_train.shape[0])
    # under torchrun each rank holds its contiguous share of the n samples; the operators and estimators
    # all-reduce over the ranks, so the curvature is that of all n samples
    mine = shard(n, launch.rank, launch.world)
    batches = list(zip(data.X_train[:n][mine].split(config["data"]["batch_size"]),
                       data.y_train[:n][mine].split(config["data"]["batch_size"])))
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
        _same_weights_as_rank0(model, launch)
    model.eval()
    print(f"model: {config['model']['arch']} ({sum(p.numel() for p in model.parameters())} parameters), "
          f"{'loaded' if ckpt else 'trained'} in {time.perf_counter() - t0:.1f}s; "
          f"train acc {_evaluate(model, data.X_train, data.y_train)[1]:.3f}, "
          f"test acc {_evaluate(model, data.X_test, data.y_test)[1]:.3f}")
    bar = f"{backend} pass" if progress else False
    op = curvature(backend, model, loss_fn, batches, progress=bar, **options)
    ranks = f" per rank, {launch.world} ranks" if launch.world > 1 else ""
    print(f"curvature: {backend} on {n} samples in {len(batches)} batches{ranks}, P = {op.shape[0]}")

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
    if launch.main:
        out.mkdir(parents=True, exist_ok=True)
    if outcfg["plots"]:
        from curvopt.analysis import plots

        def plot_spectral_density(*args: Any, **kwargs: Any) -> Path:  # every rank computes, rank 0 draws
            return plots.plot_spectral_density(*args, **kwargs) if launch.main else args[-1]

        def plot_landscape(*args: Any, **kwargs: Any) -> Path:
            return plots.plot_landscape(*args, **kwargs) if launch.main else args[-1]

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
    if launch.main:
        (out / "analysis.json").write_text(json.dumps(result, indent=2))
    print(f"report: {out / 'analysis.json'}")
    return result


def _on_device(data: Any, device: torch.device) -> Any:
    """``data`` with its tensors on ``device`` (a copy; the same object on the CPU)."""
    if device.type == "cpu":
        return data
    moved = copy.copy(data)
    for name in ("X_train", "y_train", "X_test", "y_test"):
        setattr(moved, name, getattr(data, name).to(device))
    return moved


def _same_weights_as_rank0(model: nn.Module, launch: Launch) -> None:
    """Under torchrun, every rank's weights and buffers set to rank 0's (each trained the same way; this
    rules out any difference in the last bit). One broadcast per dtype."""
    if launch.world == 1:
        return
    from curvopt import distributed

    tensors = [t for t in model.state_dict().values() if t.numel()]
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        distributed.broadcast_([t for t in tensors if t.dtype == dtype], src=0)


def _fixed_bits(config: Any, names: list[str]) -> dict[str, int]:
    """``[allocation] fixed`` with ``first``/``last`` replaced by the first/last of the quantizable ``names``.

    Raises:
        ConfigError: a name that is not a quantizable module, or one module fixed at two widths.
    """
    fixed: dict[str, int] = {}
    for key, bits in config["allocation"]["fixed"].items():
        name = key
        if key in FIXED_ALIASES and key not in names:
            name = names[0] if key == "first" else names[-1]
        elif key not in names:
            raise ConfigError(f"[allocation] fixed names {key!r}, not a quantizable module of the "
                              f"{config['model']['arch']}; quantizable modules: {', '.join(names)} "
                              f"(or first, last)")
        if fixed.get(name, bits) != bits:
            raise ConfigError(f"[allocation] fixed sets module {name!r} to both {fixed[name]} and {bits} bits "
                              f"({key!r}); keep one")
        fixed[name] = bits
    return fixed


def _budgets(config: Any, model: nn.Module, fixed: dict[str, int]) -> list[dict[str, Any]]:
    """Each ``[allocation]`` budget: its label, the :func:`~curvopt.quant.allocate_bits` keyword that sets it,
    the uniform width of exactly that size (``None`` if no uniform plan has it) and its size in bits.

    The allocator reads a budget exactly (``floor(average_bits * weights)`` bits, in rationals), so a budget
    equal to a uniform plan's average (or size) is exactly that plan's size: mixed and uniform precision are
    compared at equal size. Every budget is tried once with all-zero scores
    (an integer program over a few layers: no data, no model pass), so that a budget no allocation meets, or
    fixed layers that do not fit it, fail before any computation.

    Raises:
        ConfigError: with the allocator's message (the reachable minimum) under ``[allocation]``.
    """
    from curvopt.quant import allocate_bits, uniform_plan

    a = config["allocation"]
    bits = sorted(a["bits"])
    uniform = {b: uniform_plan(model, b) for b in bits}
    budgets = []
    if a["size_bytes"]:
        for size in a["size_bytes"]:
            match = next((b for b, p in uniform.items() if p.size_bytes == size), None)
            budgets.append({"label": f"{size:g} B", "size_bytes": size, "average_bits": None,
                            "uniform_bits": match})
    else:
        for avg in a["average_bits"] or [DEFAULT_AVERAGE_BITS]:
            match = int(avg) if avg == int(avg) and int(avg) in bits else None
            budgets.append({"label": f"{avg:g}-bit avg", "size_bytes": None, "average_bits": avg,
                            "uniform_bits": match})
    weights = uniform[bits[0]].size_bits // bits[0]  # quantized weights in all
    zeros = {name: dict.fromkeys(sorted(set(bits) | set(fixed.values())), 0.0) for name in uniform[bits[0]].bits}
    for budget in budgets:
        by_size = budget["size_bytes"] is not None
        budget["kwargs"] = ({"size_bytes": budget["size_bytes"]} if by_size else
                            {"average_bits": budget["average_bits"]})
        # the size in bits, as the allocator reads it; random allocations get it too
        budget["size_bits"] = math.floor(Fraction(budget["size_bytes"]) * 8 if by_size else
                                         Fraction(budget["average_bits"]) * weights)
        try:
            allocate_bits(model, zeros, bits=bits, method=a["method"], fixed=fixed or None, **budget["kwargs"])
        except CurvoptError as e:  # BudgetError (with the reachable range), bad fixed widths
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"[allocation] budget {budget['label']}: {first}") from e
    return budgets


def _objective(table: dict[str, dict[int, float]], bits: dict[str, int]) -> float:
    """The summed score of the plan ``bits`` (the predicted loss increase of the score's table)."""
    return float(sum(table[name][b] for name, b in bits.items()))


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def quantize(config: QuantizeConfig, out: Path | None = None) -> dict[str, Any]:
    """Sensitivity, bit allocation and quantized evaluation described by ``config`` (``curvopt quantize``).

    Prints the table (FP32, uniform b-bit, then per budget the mixed-precision plan, random plans of the same
    size and the ``measured``-score plan; test loss and accuracy, weight size in bytes, average bits,
    compression against FP32 weights) and writes ``quantize.json`` (and ``pareto.png``). Returns what
    ``quantize.json`` holds.
    """
    import curvopt
    from curvopt.curvature import curvature
    from curvopt.quant import allocate_bits, random_plans, uniform_plan
    from curvopt.quant.fake import fake_quantized
    from curvopt.quant.plan import quantizable_modules

    m, s, a, ft, outcfg = (config[k] for k in ("model", "sensitivity", "allocation", "finetune", "output"))
    progress = bool(outcfg["progress"])
    out = Path(out or outcfg["dir"])
    quantizer = _make_quantizer(config)
    ckpt = m["checkpoint"]
    state = _read_checkpoint(ckpt) if ckpt else None  # a wrong file fails before the data is built
    data = _dataset(config)
    model = _model(config, data.X_train.shape[1], data.num_classes)
    if state is not None:
        _load_checkpoint(model, state, ckpt, m["arch"])
    loss_fn = LOSSES[config["loss"]["name"]]()
    n = min(s["samples"], data.X_train.shape[0])
    batch_size = config["data"]["batch_size"]
    calibration = list(zip(data.X_train[:n].split(batch_size), data.y_train[:n].split(batch_size)))
    names = list(quantizable_modules(model))
    # Everything that can be checked before the computation is: fixed layers and budgets against the
    # model's sizes, and the backend options (building an operator runs no pass).
    fixed = _fixed_bits(config, names)
    budgets = _budgets(config, model, fixed)
    options = dict(s["options"])
    backend = _sensitivity_curvature(config)
    with warnings.catch_warnings():  # the real passes below warn once
        warnings.simplefilter("ignore")
        curvature(backend, model, loss_fn, calibration, **options)
    t0 = time.perf_counter()
    if not ckpt:
        _train(model, data, loss_fn, config, progress)
    model.eval()
    X, y = data.X_test, data.y_test
    bits = sorted(a["bits"])
    table_bits = sorted(set(bits) | set(fixed.values()))
    weights = uniform_plan(model, bits[0]).size_bits // bits[0]
    fp32_loss, fp32_acc = _evaluate(model, X, y, loss_fn)
    print(f"model: {m['arch']} ({sum(p.numel() for p in model.parameters())} parameters; {len(names)} quantizable "
          f"modules, {weights} weights), {'loaded' if ckpt else 'trained'} in {time.perf_counter() - t0:.1f}s; "
          f"test acc {fp32_acc:.3f}")

    act = config["quantizer"]["activation_bits"]
    act_kwargs = {"activation_bits": act, "calibration": calibration} if act else {}
    finetune_loader = data.loader(ft["batch_size"], shuffle=True, seed=m["seed"]) if ft["epochs"] else None

    def evaluate(plan_bits: dict[str, int]) -> dict[str, float]:
        with fake_quantized(model, plan_bits, quantizer, **act_kwargs):
            loss, acc = _evaluate(model, X, y, loss_fn)
        result = {"loss": loss, "accuracy": acc}
        if ft["epochs"]:  # QAT on a copy: the PTQ rows and the next plans start from the same weights
            from curvopt.quant.finetune import finetune

            tuned = copy.deepcopy(model)
            finetune(tuned, plan_bits, finetune_loader, loss_fn, epochs=ft["epochs"], lr=ft["lr"],
                     quantizer=quantizer, seed=m["seed"])
            tuned.eval()
            with fake_quantized(tuned, plan_bits, quantizer, **act_kwargs):
                result["qat_loss"], result["qat_accuracy"] = _evaluate(tuned, X, y, loss_fn)
        return result

    t0 = time.perf_counter()
    bar = f"{s['score']} sensitivity" if progress else False
    common = dict(curvature=backend, method=s["method"], quantizer=quantizer, measured_bits=tuple(table_bits),
                  seed=s["seed"], **options)
    report = curvopt.sensitivity(model, calibration, loss_fn, score=s["score"], probes=s["probes"], progress=bar,
                                 **common)
    table = report.score_table(model, table_bits, quantizer)
    if s["score"] == "measured":
        measured, measured_table = report, table
    else:
        measured = curvopt.sensitivity(model, calibration, loss_fn, score="measured", probes=0,  # no traces
                                       progress="measured sensitivity" if progress else False, **common)
        measured_table = measured.score_table(model, table_bits, quantizer)
    print(f"sensitivity: {s['score']} ({backend}, {s['probes']} probes) and measured on {n} calibration "
          f"samples in {time.perf_counter() - t0:.1f}s")
    print(report.table())

    def row(method: str, plan_bits: dict[str, int], size_bits: int, budget: str = "") -> dict[str, Any]:
        return {"method": method, "budget": budget, "bits": dict(plan_bits), "size_bits": int(size_bits),
                "size_bytes": size_bits / 8, "average_bits": size_bits / weights,
                "compression": 32 * weights / size_bits,
                "objective": _objective(table, plan_bits), **evaluate(plan_bits)}

    fp32 = {"method": "fp32", "budget": "", "bits": {}, "size_bits": 32 * weights, "size_bytes": 4 * weights,
            "average_bits": 32.0, "compression": 1.0, "objective": 0.0, "loss": fp32_loss, "accuracy": fp32_acc}
    uniform_rows = []
    for b in bits:
        plan = uniform_plan(model, b)
        uniform_rows.append(row(f"uniform {b}-bit", plan.bits, plan.size_bits))
    results: list[dict[str, Any]] = []
    frontier: list[dict[str, Any]] = []
    for budget in budgets:
        kwargs = dict(bits=bits, method=a["method"], fixed=fixed or None, **budget["kwargs"])
        plan = allocate_bits(model, table, quantizer=quantizer, **kwargs)
        mixed = row(f"{s['score']} ({a['method']})", plan.bits, plan.size_bits, budget["label"])
        mixed["plan"] = _plan_dict(plan)
        frontier = frontier or _pareto_points(plan)  # one frontier: same scores and fixed layers per budget
        mplan = plan if measured is report else allocate_bits(model, measured_table, quantizer=quantizer, **kwargs)
        measured_row = row(f"measured ({a['method']})", mplan.bits, mplan.size_bits, budget["label"])
        measured_row["plan"] = _plan_dict(mplan)
        plans = random_plans(model, bits, budget["size_bits"], a["random"], seed=m["seed"], fixed=fixed or None)
        randoms = [row("random", p.bits, p.size_bits, budget["label"]) for p in plans]
        summary: dict[str, Any] = {"n": len(randoms), "rows": randoms}
        for key in ("loss", "accuracy", "qat_loss", "qat_accuracy", "size_bytes", "average_bits", "compression",
                    "objective"):
            if randoms and key in randoms[0]:
                summary[f"{key}_mean"], summary[f"{key}_std"] = _stats([r[key] for r in randoms])
        results.append({"budget": budget["label"], "average_bits": budget["average_bits"],
                        "size_bytes": budget["size_bits"] / 8,
                        "size_bits": budget["size_bits"], "uniform_bits": budget["uniform_bits"], "mixed": mixed,
                        "random": summary, "measured": measured_row})
    quantizable = {name: int(mod.weight.numel()) for name, mod in quantizable_modules(model).items()}
    result = {"model": {"arch": m["arch"], "checkpoint": ckpt or None,
                        "parameters": sum(p.numel() for p in model.parameters()), "quantizable": quantizable,
                        "weights": weights},
              "score": s["score"], "curvature": backend, "calibration_samples": n, "fixed": fixed,
              "sensitivity": report.to_dict(), "score_table": _plain_table(table),
              "measured_table": _plain_table(measured_table), "fp32": fp32, "uniform": uniform_rows,
              "budgets": results, "pareto": frontier, "finetune_epochs": ft["epochs"],
              "config": config.to_dict() if hasattr(config, "to_dict") else config}
    print(_quantize_table(result))
    out.mkdir(parents=True, exist_ok=True)
    if outcfg["plots"]:
        # the accuracy of at most 40 frontier points, evenly spread: a long frontier costs more than it shows
        step = max(1.0, (len(frontier) - 1) / 39)
        for i in sorted({round(k * step) for k in range(min(40, len(frontier)))}):
            with fake_quantized(model, frontier[i]["bits"], quantizer, **act_kwargs):
                frontier[i]["loss"], frontier[i]["accuracy"] = _evaluate(model, X, y, loss_fn)
        result["plots"] = [str(_plot_pareto(result, out / "pareto.png"))]
        print("plots: " + ", ".join(result["plots"]))
    (out / "quantize.json").write_text(json.dumps(result, indent=2))
    print(f"report: {out / 'quantize.json'}")
    return result


def _pareto_points(plan: Any) -> list[dict[str, Any]]:
    """``plan.pareto`` as plain data: ``size_bytes``, ``objective`` and ``bits`` of each point, by size."""
    points = []
    for p in getattr(plan, "pareto", None) or []:
        get = p.get if isinstance(p, dict) else lambda k, p=p: getattr(p, k)
        points.append({"size_bytes": float(get("size_bytes")), "objective": float(get("objective")),
                       "bits": {str(k): int(v) for k, v in dict(get("bits")).items()}})
    return sorted(points, key=lambda p: p["size_bytes"])


def _plan_dict(plan: Any) -> dict[str, Any]:
    """``plan.to_dict()`` without its frontier (``quantize.json`` holds the frontier once)."""
    return {k: v for k, v in plan.to_dict().items() if k != "pareto"}


def _plain_table(table: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    return {name: {str(b): float(v) for b, v in row.items()} for name, row in table.items()}


def _quantize_table(result: dict[str, Any]) -> str:
    """The printed table: one row per method and budget; random plans as mean ± std; QAT columns apart."""
    qat = result["finetune_epochs"] > 0
    cols = ["method", "budget", "w-bits", "size (B)", "compr.", "pred. dloss", "test loss", "test acc"]
    if qat:
        cols += [f"QAT loss ({result['finetune_epochs']} ep)", "QAT acc"]

    def cells(r: dict[str, Any]) -> list[str]:
        line = [r["method"], r["budget"] or "-", f"{r['average_bits']:.2f}", f"{r['size_bytes']:,.0f}",
                f"{r['compression']:.1f}x", f"{r['objective']:.4g}", f"{r['loss']:.4f}", f"{r['accuracy']:.4f}"]
        if qat:
            line += [f"{r['qat_loss']:.4f}", f"{r['qat_accuracy']:.4f}"] if "qat_loss" in r else ["-", "-"]
        return line

    rows = [cells(result["fp32"])] + [cells(r) for r in result["uniform"]]
    for b in result["budgets"]:
        rows.append(cells(b["mixed"]))
        rand = b["random"]
        if rand["n"]:
            line = [f"random (n={rand['n']})", b["budget"], f"{rand['average_bits_mean']:.2f}",
                    f"{rand['size_bytes_mean']:,.0f}", f"{rand['compression_mean']:.1f}x",
                    f"{rand['objective_mean']:.4g} ± {rand['objective_std']:.2g}",
                    f"{rand['loss_mean']:.4f} ± {rand['loss_std']:.4f}",
                    f"{rand['accuracy_mean']:.4f} ± {rand['accuracy_std']:.4f}"]
            if qat:
                line += [f"{rand['qat_loss_mean']:.4f} ± {rand['qat_loss_std']:.4f}",
                         f"{rand['qat_accuracy_mean']:.4f} ± {rand['qat_accuracy_std']:.4f}"]
            rows.append(line)
        rows.append(cells(b["measured"]))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    head = (f"quantized {result['model']['arch']}: weights of {len(result['model']['quantizable'])} modules "
            f"({result['model']['weights']} weights; size and compression count them only); "
            f"pred. dloss = summed {result['score']} score")
    return "\n".join([head, fmt(cols), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def _plot_pareto(result: dict[str, Any], path: Path) -> Path:
    """``pareto.png``: the predicted loss increase (left) and the test accuracy (right) against the weights'
    size: the frontier of the mixed-precision allocations, uniform plans, random plans, the chosen plans."""
    from curvopt.analysis.plots import _pyplot, _save

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    kib = 1 / 1024
    for ax, key in ((left, "objective"), (right, "accuracy")):
        frontier = [p for p in result["pareto"] if key in p]
        if frontier:
            ax.plot([p["size_bytes"] * kib for p in frontier], [p[key] for p in frontier], ".-", color="C0",
                    lw=1, ms=3, label="Pareto frontier")
        ax.plot([r["size_bytes"] * kib for r in result["uniform"]], [r[key] for r in result["uniform"]], "s",
                color="C1", label="uniform")
        for b in result["uniform"]:
            ax.annotate(b["method"].split()[1], (b["size_bytes"] * kib, b[key]), fontsize=7)
        randoms = [r for b in result["budgets"] for r in b["random"]["rows"]]
        if randoms:
            ax.plot([r["size_bytes"] * kib for r in randoms], [r[key] for r in randoms], ".", color="0.6",
                    label="random")
        ax.plot([b["mixed"]["size_bytes"] * kib for b in result["budgets"]],
                [b["mixed"][key] for b in result["budgets"]], "*", color="C3", ms=12, label=result["score"])
        ax.plot([b["measured"]["size_bytes"] * kib for b in result["budgets"]],  # open: visible on a star
                [b["measured"][key] for b in result["budgets"]], "^", mfc="none", color="C2", ms=9,
                label="measured")
        ax.set_xlabel("weights (KiB)")
    left.set_ylabel(f"predicted loss increase (summed {result['score']})")
    left.set_yscale("symlog", linthresh=1e-4)
    right.axhline(result["fp32"]["accuracy"], color="k", ls=":", lw=1, label="fp32")
    right.set_ylabel("test accuracy")
    right.legend(fontsize=7)
    left.set_title(f"{result['score']} ({result['curvature']}) mixed precision")
    return _save(plt, fig, right, "test accuracy against size", path)


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


def _schedule_sizes(config: Any) -> tuple[int, int | None]:
    """``(batch_size, max_batch_size)`` of ``[schedule]``: 0 means ``[data] batch_size`` and "not given"."""
    s = config["schedule"]
    return s["batch_size"] or config["data"]["batch_size"], s["max_batch_size"] or None


def _schedule_option_names(name: str) -> list[str]:
    """The ``[schedule] options`` keys schedule ``name`` accepts (its class's keyword arguments, less
    those the command sets)."""
    return schedule_option_names(name)


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


def train(config: TrainConfig, out: Path | None = None) -> list[dict[str, Any]]:
    """Train with the configured optimizer (and ``[schedule]``); print and write per-epoch metrics, save the
    weights. Returns the rows of ``metrics.csv``."""
    from tqdm.auto import tqdm

    progress = bool(config["output"]["progress"])
    out = Path(out or config["output"]["dir"])
    launch = current_launch()
    if launch.world == 1:  # under torchrun: checked by main() before the ranks met
        _check_schedule(config)
    data = _on_device(_dataset(config), launch.device)
    model = _model(config, data.X_train.shape[1], data.num_classes).to(launch.device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = _optimizer(config, model)
    net = model
    if launch.world > 1:  # DDP averages the gradients; its constructor gives every rank rank 0's weights
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[launch.device.index] if launch.device.index is not None
                                      else None)
    name = config["schedule"]["name"]
    sched = (None if name == "none" else
             _make_schedule(config, optimizer, net, loss_fn, (data.X_train, data.y_train), world=launch.world))
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
                    if isinstance(optimizer, SecondOrderOptimizer):  # Newton-type: a closure over the batch
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
    _check_replicas(model, launch, config["optimizer"]["name"])
    if launch.main:
        torch.save(model.state_dict(), out / "model.pt")
    print(f"metrics: {out / 'metrics.csv'}; weights: {out / 'model.pt'}")
    return rows


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


def _check_distributed_train(config: Any, world: int) -> None:
    """What ``train`` cannot do on ``world`` ranks, refused before they meet."""
    name = config["optimizer"]["name"]
    if takes_closure(name):
        # their loss, gradient and curvature are not yet all-reduced (issue 15, item 4): each rank would step on
        # its own shard and the replicas would drift apart
        raise ConfigError(f"[optimizer] name = {name!r} runs in one process only; launched on {world} ranks "
                          f"(WORLD_SIZE): run it without torchrun, or choose kfac, adam or sgd")


def _check_replicas(model: nn.Module, launch: Launch, name: str) -> None:
    """Under torchrun, that every rank ends with rank 0's weights (DDP keeps gradients, not weights, in step: an
    optimizer whose update depends on rank-local state would let the replicas drift apart silently).

    Raises:
        CurvoptError: on every rank, naming the optimizer, when some rank's weights differ from rank 0's.
    """
    if launch.world == 1:
        return
    from curvopt import distributed

    mine = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    theirs = mine.clone()
    distributed.broadcast_([theirs], src=0)
    drift = (mine - theirs).abs().max().reshape(1) / theirs.abs().max().clamp_min(1e-30)
    (worst,) = distributed.sum_across([drift])
    if float(worst) > 1e-6:
        raise CurvoptError(f"after training, the weights of the {launch.world} ranks differ (relative "
                           f"{float(worst):.2g}): optimizer {name!r} does not keep DDP replicas in step; run it "
                           f"in one process")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curvopt", description="curvature analysis, second-order training and "
                                                                  "Hessian-aware quantization")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="spectrum, trace and per-layer sensitivity of a trained network")
    p.add_argument("--config", help="TOML file (model/checkpoint, data, loss, curvature backend, budgets)")
    p.add_argument("--out", help="output folder (default: [output] dir)")
    t = sub.add_parser("train", help="train with an optimizer chosen by name (kfac, adam, sgd, newton_mr, "
                                     "trust_region, arc)")
    t.add_argument("--config", help="TOML file (model, data, optimizer and its options, epochs, batch-size "
                                    "schedule)")
    t.add_argument("--out", help="output folder (default: [output] dir)")
    q = sub.add_parser("quantize", help="Hessian-aware mixed-precision quantization (HAWQ): sensitivity, bit "
                                        "allocation, and mixed vs uniform vs random precision at equal size",
                       description="Per-layer sensitivity (any curvature backend and score), bit allocation at "
                                   "one or several budgets (integer program or Pareto frontier), and the test "
                                   "accuracy of FP32, uniform b-bit, mixed precision at exactly the uniform "
                                   "plan's size, random allocations of that size and the measured-loss "
                                   "allocation, with optional straight-through QAT reported apart. Writes "
                                   "quantize.json and pareto.png.")
    q.add_argument("--config", help="TOML file ([model], [data], [sensitivity] score/curvature/probes, "
                                    "[quantizer], [allocation] bits/average_bits/size_bytes/method/fixed/random, "
                                    "[finetune], [output])")
    q.add_argument("--out", help="output folder (default: [output] dir)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else None
    try:
        defaults = {"train": TRAIN_DEFAULTS, "quantize": QUANTIZE_DEFAULTS}.get(args.command, DEFAULTS)
        config = load_config(args.config, defaults)
        world = requested_world()
        if world > 1:  # every check that needs no data, before the ranks meet
            if args.command == "quantize":
                raise ConfigError(f"quantize runs in one process; launched on {world} (WORLD_SIZE): run it "
                                  f"without torchrun")
            if args.command == "train":
                _check_distributed_train(config, world)
                _check_schedule(config)
        with process_group() as launch:
            if not launch.main:
                config["output"]["progress"] = False  # one set of bars: rank 0's
            command = {"train": train, "quantize": quantize}.get(args.command, analyze)
            command(config, out)
    except (CurvoptError, OSError) as e:
        where = f" (rank {_rank()})" if requested_world() > 1 else ""
        print(f"curvopt: error{where}: {e}", file=sys.stderr)
        return 2
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


__all__ = [
    "ALLOCATION_METHODS",
    "ARCHS",
    "AnalyzeConfig",
    "DATASETS",
    "DEFAULTS",
    "LOSSES",
    "QUANTIZE_DEFAULTS",
    "QuantizeConfig",
    "TRAIN_DEFAULTS",
    "TrainConfig",
    "analyze",
    "load_config",
    "main",
    "quantize",
    "train",
]
