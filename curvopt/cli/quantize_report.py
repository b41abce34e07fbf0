"""How ``curvopt quantize`` reports: the printed table, ``pareto.png``, and the plain data (``quantize.json``)
of plans, frontiers and score tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


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
