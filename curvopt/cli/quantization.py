"""``curvopt quantize``: Hessian-aware mixed-precision quantization (HAWQ) end to end.

A model (``[model] checkpoint``, or trained on the embedded data), the per-layer sensitivity once
(``[sensitivity]``: any curvature backend and score, bit independent), then for each budget of
``[allocation]`` the test loss and accuracy of FP32, uniform b-bit, the mixed-precision plan at exactly the
size of the uniform plan whose average is the budget, random allocations of that size and the allocation of
the ``measured`` score; with ``[finetune] epochs > 0`` each row also after straight-through QAT. Fixed layers
and budgets are checked against the model before any pass over the data.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

from torch import nn

import curvopt.cli as cli  # _dataset and _train are looked up there, where a test may substitute them
from curvopt.cli.common import _evaluate, _load_checkpoint, _model, _read_checkpoint
from curvopt.cli.config import (
    DEFAULT_AVERAGE_BITS,
    FIXED_ALIASES,
    LOSSES,
    QuantizeConfig,
    make_quantizer,
    sensitivity_curvature,
)
from curvopt.cli.quantize_report import (
    _pareto_points,
    _plain_table,
    _plan_dict,
    _plot_pareto,
    _quantize_table,
    _stats,
)
from curvopt.errors import ConfigError, CurvoptError


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
    quantizer = make_quantizer(config)
    ckpt = m["checkpoint"]
    state = _read_checkpoint(ckpt) if ckpt else None  # a wrong file fails before the data is built
    data = cli._dataset(config)
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
    backend = sensitivity_curvature(config)
    with warnings.catch_warnings():  # the real passes below warn once
        warnings.simplefilter("ignore")
        curvature(backend, model, loss_fn, calibration, **options)
    t0 = time.perf_counter()
    if not ckpt:
        cli._train(model, data, loss_fn, config, progress)
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
