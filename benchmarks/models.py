"""Curvature on sequence models: the small transformer and the LSTM classifier of ``curvopt.models``.

On mnist1d read as a sequence (10 tokens of 4 features), for ``transformer()`` and ``lstm()``:

(a) every backend's ``op @ v`` in gradients over the same data (``--curvature-samples`` samples,
    batches of ``--batch``): ``product`` with ``cache=False``, ``cached`` with ``cache=True`` once
    the cache is built, ``setup`` the first product of a new operator (``cache=True``: the cache;
    ``kfac``: the factors). Rounds interleave one gradient and every backend's products, so a slow
    phase of a shared machine hits all alike; each figure is the minimum over rounds (a setup longer
    than ten gradients is timed in the first round only);
(b) the top eigenvalue by Lanczos (``top_eigenvalues(k=1, tol=1e-3)``) and per-layer traces
    (``trace(op, per_block=True)``) of the Hessian and the GGN (``cache=True``, cache built inside
    the timing), in gradients and in products;
(c) K-FAC against Adam: epochs and steps to ``--targets`` test accuracy (evaluated every quarter
    epoch), each optimizer with an equal tuning grid of ``--configs`` configurations chosen on a
    validation split (fewest epochs to the higher target, then the best final validation accuracy).

The curvature is that of the model in eval mode (dropout off), after ``--pretrain`` epochs of Adam.
Gradient-equivalents: seconds / seconds of one gradient over the same batches, both in this run.
Usage: ``python benchmarks/models.py [--quick] [--rounds 5] [--configs 6] [--epochs 10] [--parts abc]``
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

import curvopt
from curvopt.data import mnist1d
from curvopt.models import lstm, transformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import TEST, select, split, train, with_threads  # noqa: E402

BACKENDS = ["hessian", "ggn", "fisher", "empirical_fisher", "kfac", "block_diagonal"]
MODELS = {"transformer": transformer, "LSTM": lstm}
SPECTRAL = ["hessian", "ggn"]


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gradient(model: nn.Module, loss_fn, batches) -> None:
    """One gradient over ``batches`` (the unit of every cost here)."""
    model.zero_grad(set_to_none=True)
    for X, y in batches:
        loss_fn(model(X), y).backward()
    model.zero_grad(set_to_none=True)


def pretrain(model: nn.Module, batches, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for X, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    model.eval()


def product_costs(model: nn.Module, loss_fn, batches, rounds: int) -> list[dict]:
    """(a): per backend, ``product``/``cached``/``setup`` in gradients and the failures, if any."""
    ops, rows = {}, {name: {"backend": name, "error": None} for name in BACKENDS}
    for name in BACKENDS:
        try:
            plain = curvopt.curvature(name, model, loss_fn, batches)
            cached = curvopt.curvature(name, model, loss_fn, batches, cache=True)
            v = torch.randn(plain.shape[0], generator=torch.Generator().manual_seed(0))
            plain @ v, cached @ v  # warm-up, and the cache is built
            ops[name] = (plain, cached, v)
            rows[name]["P"] = plain.shape[0]
        except Exception as e:  # recorded in the table: this benchmark reports what breaks
            rows[name]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    times: dict = defaultdict(list)
    gradient(model, loss_fn, batches)
    for round_ in range(rounds):
        times["gradient"].append(seconds(lambda: gradient(model, loss_fn, batches)))
        for name, (plain, cached, v) in ops.items():
            times[name, "product"].append(seconds(lambda: plain @ v))
            times[name, "cached"].append(seconds(lambda: cached @ v))
            if round_ == 0 or times[name, "setup"][-1] < 10 * times["gradient"][-1]:
                # a long setup (K-FAC's per-sample diagonal blocks) is timed once: noise is small next to it
                fresh = curvopt.curvature(name, model, loss_fn, batches, cache=True)
                times[name, "setup"].append(seconds(lambda: fresh @ v))
    grad = min(times["gradient"])
    for name in ops:
        for key in ("product", "cached", "setup"):
            rows[name][key] = min(times[name, key]) / grad
    return [rows[name] for name in BACKENDS]


def spectral_costs(model: nn.Module, loss_fn, batches, probes: int, tol: float = 1e-3) -> list[dict]:
    """(b): top eigenvalue (Lanczos) and per-layer traces, in gradients and products."""
    rows = []
    for name in SPECTRAL:
        row: dict = {"backend": name, "error": None}
        try:
            grad = seconds(lambda: gradient(model, loss_fn, batches))
            op = curvopt.curvature(name, model, loss_fn, batches, cache=True)
            t = time.perf_counter()
            top = curvopt.top_eigenvalues(op, k=1, tol=tol)
            row["eig_s"] = time.perf_counter() - t
            op = curvopt.curvature(name, model, loss_fn, batches, cache=True)
            t = time.perf_counter()
            tr = curvopt.trace(op, probes=probes, per_block=True)
            row["trace_s"] = time.perf_counter() - t
            grad = min(grad, seconds(lambda: gradient(model, loss_fn, batches)))
            row.update(eigenvalue=float(top.eigenvalues[0]), eig_products=top.iterations,
                       eig_grads=row["eig_s"] / grad, trace=tr.value, trace_products=probes,
                       trace_grads=row["trace_s"] / grad, blocks=len(tr.blocks))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        rows.append(row)
    return rows


def grids(configs: int) -> dict[str, list[dict]]:
    """Equal tuning budgets: ``configs`` configurations each, log-spaced around the usual values."""

    def logspace(lo: float, hi: float, n: int) -> list[float]:
        return [math.sqrt(lo * hi)] if n == 1 else [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]

    n_lr = max(1, configs // 2)
    kfac = [{"lr": lr, "damping": d} for lr in logspace(0.03, 1.0, n_lr) for d in (1e-3, 1e-2)][:configs]
    if len(kfac) < configs:  # odd budgets: one more learning rate at the larger damping
        kfac += [{"lr": lr, "damping": 1e-2} for lr in logspace(0.03, 1.0, configs)][len(kfac):configs]
    return {"KFAC": kfac, "Adam": [{"lr": lr} for lr in logspace(1e-3, 3e-2, configs)]}


def make_optimizer(name: str):
    if name == "KFAC":
        # The published table's schedule (factors every step, inverses every 10), pinned: the defaults moved.
        return lambda params, hp: curvopt.KFAC(params, lr=hp["lr"], damping=hp["damping"], factor_every=1,
                                               inverse_every=10)
    return lambda params, hp: torch.optim.Adam(params, lr=hp["lr"])


def race(model_fn, data, val, configs: int, epochs: float, targets: list[float], batch_size: int) -> dict:
    """(c): the configuration each optimizer's grid selects, with its test figures."""
    out = {}
    for name, grid in grids(configs).items():
        runs = [train(model_fn, make_optimizer(name), hp, data, val, batch_size=batch_size, max_epochs=epochs)
                for hp in grid]
        best = select(runs, targets[-1])
        hits = {t: best.first(t, TEST) for t in targets}
        out[name] = {"hp": best.hp, "final": best.final_test, "steps": best.steps, "seconds": best.seconds,
                     "epochs_to": {t: h[0] if h else None for t, h in hits.items()},
                     "steps_to": {t: h[1] if h else None for t, h in hits.items()},
                     "reached_in_grid": sum(r.first(targets[-1], TEST) is not None for r in runs)}
    return out


def cell(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--curvature-samples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=500, help="batch size of the curvature passes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--probes", type=int, default=30, help="products of the per-layer trace")
    parser.add_argument("--pretrain", type=int, default=2, help="Adam epochs before the curvature figures")
    parser.add_argument("--samples", type=int, default=10000, help="mnist1d size for the race (c)")
    parser.add_argument("--configs", type=int, default=6, help="tuning budget: configurations per optimizer")
    parser.add_argument("--parts", default="abc", help="which tables: a (products), b (spectral), c (race)")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--targets", default="0.6,0.75")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; one keeps the ratios stable on a shared machine, where two "
                             "threads' spin-waits can make a tiny product 100x slower")
    args = parser.parse_args(argv)
    if args.quick:
        args.curvature_samples, args.batch, args.rounds, args.probes, args.pretrain = 24, 12, 1, 2, 0
        args.samples, args.configs, args.epochs = 400, 2, 0.25
    return with_threads(args.threads, run, args)


def run(args: argparse.Namespace) -> dict:
    """The three tables for the parsed ``args`` (see the module docstring)."""
    targets = [float(t) for t in args.targets.split(",")]
    tol = 1e-1 if args.quick else 1e-3
    loss_fn = nn.CrossEntropyLoss()
    full = mnist1d()
    batches = list(zip(full.X_train[:args.curvature_samples].split(args.batch),
                       full.y_train[:args.curvature_samples].split(args.batch)))
    cpu = platform.processor() or platform.machine()
    print(f"# curvopt on sequence models, torch {torch.__version__}, {cpu}, "
          f"{torch.get_num_threads()} threads; curvature over {args.curvature_samples} mnist1d samples in "
          f"batches of {args.batch}, eval mode after {args.pretrain} Adam epochs")
    results: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K-FAC's diagonal-block notices, once per operator
        for label, model_fn in MODELS.items() if set(args.parts) & set("ab") else ():
            torch.manual_seed(0)
            model = model_fn()
            pretrain(model, batches, args.pretrain)
            rows = product_costs(model, loss_fn, batches, args.rounds)
            spectral = spectral_costs(model, loss_fn, batches, args.probes, tol)
            results[label] = {"products": rows, "spectral": spectral}
            P = sum(p.numel() for p in model.parameters())
            print(f"\n## (a) {label} (P = {P}): one product in gradients\n", flush=True)
            print("| backend | product (cache=False) | product (cache=True) | setup (cache / factors) |")
            print("|---|---:|---:|---:|")
            for r in rows:
                if r["error"]:
                    print(f"| {r['backend']} | {r['error']} | | |")
                else:
                    print(f"| {r['backend']} | {r['product']:.2f} | {r['cached']:.2f} | {r['setup']:.2f} |")
            print(f"\n## (b) {label}: top eigenvalue (Lanczos, tol {tol:g}) and per-layer traces "
                  f"({args.probes} probes), cache=True\n")
            print("| backend | top eigenvalue | products | gradients | trace | blocks | gradients |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for r in spectral:
                if r["error"]:
                    print(f"| {r['backend']} | {r['error']} | | | | | |")
                else:
                    print(f"| {r['backend']} | {r['eigenvalue']:.4g} | {r['eig_products']} | {r['eig_grads']:.1f} "
                          f"| {r['trace']:.4g} | {r['blocks']} | {r['trace_grads']:.1f} |")

        if "c" not in args.parts:
            return results
        data, val = split(args.samples)
        print(f"\n## (c) K-FAC against Adam: mnist1d {len(data.y_train)} train, {len(val[1])} validation, "
              f"{len(data.y_test)} test; batch 128, {args.epochs:g} epochs, {args.configs} configurations each\n")
        print("| model | optimizer | selected | " + " | ".join(
            f"epochs (steps) to {t:.0%}" for t in targets) + " | final test | reached in grid |")
        print("|---|---|---|" + "---:|" * (len(targets) + 2))
        for label, model_fn in MODELS.items():
            race_result = race(model_fn, data, val, args.configs, args.epochs, targets, 128)
            results.setdefault(label, {})["race"] = race_result
            for name, r in results[label]["race"].items():
                config = ", ".join(f"{k}={v:.3g}" for k, v in r["hp"].items())
                reach = " | ".join(f"{cell(r['epochs_to'][t], '.2f')} ({cell(r['steps_to'][t], 'd')})"
                                   for t in targets)
                print(f"| {label} | {name} | {config} | {reach} | {r['final']:.3f} | "
                      f"{r['reached_in_grid']}/{args.configs} |")
    return results


if __name__ == "__main__":
    main()
