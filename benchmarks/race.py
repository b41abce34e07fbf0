"""The level-playing-field race: K-FAC against Adam and SGD with momentum on mnist1d.

Each optimizer gets the same tuning budget: ``--configs`` hyperparameter configurations
(a log grid over its learning rate; for K-FAC learning rate x damping), the same model
initialization, the same batch order and the same number of epochs. A configuration is
chosen on a validation split carved from the training set (fewest epochs to the higher
target, then the highest final validation accuracy); the table reports its *test* figures:

(a) per model (MLP 40-256-256-10, Conv1d CNN) and optimizer: epochs and training seconds
    to 90% and 95% test accuracy (evaluated every quarter epoch; evaluation time is not
    counted), and the final test accuracy;
(b) the amortized K-FAC step cost as a multiple of an Adam step, measured side by side
    (rounds of ``--inverse-every`` steps of each optimizer in turn; the median over rounds of
    the ratio within a round, and its range) with K-FAC's default race schedule
    (factors every ``--factor-every`` steps, inverses every ``--inverse-every``), at the
    race's batch 128 and larger ones; with an SGD-momentum step plus K-FAC's preconditioning
    products alone, the least any K-FAC step does, which bounds the ratio from below;
(c) iterations to 90% test accuracy on the CNN as the batch size grows from 128 to 4096,
    each optimizer's learning rate re-tuned per batch size over three values around its
    race choice (scaled by sqrt(batch / 128)).

mnist1d is generated offline with ``--samples`` samples (default 20000: 16000 train,
4000 test), so large batches still see many distinct samples.
Usage: ``python benchmarks/race.py [--quick] [--configs 6] [--epochs 12]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import curvopt
from curvopt.curvature.kfac import factored_product
from curvopt.data import Dataset
from curvopt.models import cnn1d, mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import TEST, select, split, train  # noqa: E402

MODELS = {"MLP 40-256-256-10": mlp, "CNN Conv1d": cnn1d}


def make_optimizer(name: str, params, hp: dict, schedule: dict | None = None):
    if name == "KFAC":
        return curvopt.KFAC(params, lr=hp["lr"], damping=hp["damping"], **(schedule or {}))
    if name == "Adam":
        return torch.optim.Adam(params, lr=hp["lr"])
    return torch.optim.SGD(params, lr=hp["lr"], momentum=0.9)


def factory(name: str, schedule: dict):
    """``make(params, hp)`` for the harness: optimizer ``name`` with K-FAC's ``schedule``."""
    return lambda params, hp: make_optimizer(name, params, hp, schedule)


def grids(configs: int) -> dict[str, list[dict]]:
    """``configs`` configurations per optimizer, log-spaced around the usual defaults."""

    def logspace(lo: float, hi: float, n: int) -> list[float]:
        if n == 1:
            return [math.sqrt(lo * hi)]
        return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]

    n_lr = max(1, configs // 2)
    kfac = [{"lr": lr, "damping": d} for lr in logspace(0.1, 1.0, n_lr) for d in (1e-3, 1e-2)][:configs]
    return {"KFAC": kfac,
            "Adam": [{"lr": lr} for lr in logspace(1e-3, 3e-2, configs)],
            "SGD": [{"lr": lr} for lr in logspace(3e-2, 1.0, configs)]}


def step_cost(model_fn, data: Dataset, hp_kfac: dict, schedule: dict, steps: int, rounds: int = 5,
              batch_size: int = 128) -> dict:
    """Seconds per training step (zero_grad, forward, backward, step) of K-FAC, Adam and
    SGD-momentum, and of K-FAC's preconditioning products ``G^-1 [gW | gb] A^-1`` alone.

    Each round runs ``steps`` steps of each optimizer back to back, continuing the same three
    runs (after one untimed round), so a slow phase of a shared machine hits all three alike;
    ratios are taken within a round and the median over rounds is reported, with their range.
    ``steps`` should be a multiple of K-FAC's ``inverse_every``, so that every round carries its
    share of factor and inverse updates. A K-FAC step does at least an SGD-momentum step's work
    plus the products, so ``(SGD + products) / Adam`` bounds the ratio from below."""
    batches = data.batches(batch_size)
    hps = {"KFAC": hp_kfac, "Adam": {"lr": 1e-3}, "SGD": {"lr": 1e-3}}
    runs = {}
    for name, hp in hps.items():
        torch.manual_seed(0)
        model = model_fn()
        runs[name] = (model, make_optimizer(name, model.parameters(), hp, schedule))
    seconds: dict[str, list[float]] = {name: [] for name in (*hps, "precondition")}
    done = 0
    for round_ in range(rounds + 1):
        for name, (model, opt) in runs.items():
            t = time.perf_counter()
            for i in range(done, done + steps):
                X, y = batches[i % len(batches)]
                opt.zero_grad()
                nn.functional.cross_entropy(model(X), y).backward()
                opt.step()
            if round_:
                seconds[name].append((time.perf_counter() - t) / steps)
        if round_:
            seconds["precondition"].append(precondition_seconds(runs["KFAC"][1], 50))
        done += steps
    runs["KFAC"][1].close()
    ratios = [k / a for k, a in zip(seconds["KFAC"], seconds["Adam"])]
    floors = [(s + p) / a for s, p, a in zip(seconds["SGD"], seconds["precondition"], seconds["Adam"])]
    ms = {f"{name.lower()}_ms": statistics.median(times) * 1e3 for name, times in seconds.items()}
    return {**ms, "ratio": statistics.median(ratios), "ratio_range": (min(ratios), max(ratios)),
            "floor": statistics.median(floors)}


def precondition_seconds(opt: curvopt.KFAC, steps: int) -> float:
    """Seconds per step of the preconditioning products every K-FAC step makes, by the
    optimizer's own function (:func:`curvopt.curvature.kfac.factored_product`)."""
    layers = []
    for p, s in opt.state.items():
        if "inv_A" in s:
            d_w = p.numel() // p.shape[0]
            bias = torch.randn(p.shape[0]) if s["inv_A"].shape[0] == d_w + 1 else None
            layers.append((s["inv_G"], torch.randn(p.shape[0], d_w), bias, s["inv_A"]))
    t = time.perf_counter()
    for _ in range(steps):
        for layer in layers:
            factored_product(*layer)
    return (time.perf_counter() - t) / steps


def fmt(hit: tuple | None, column: int, spec: str) -> str:
    return format(hit[column], spec) if hit else "-"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--configs", type=int, default=6, help="tuning budget: configurations per optimizer")
    parser.add_argument("--epochs", type=float, default=12)
    parser.add_argument("--factor-every", type=int, default=20)
    parser.add_argument("--inverse-every", type=int, default=200)
    parser.add_argument("--batch-sizes", default="128,512,1024,4096")
    parser.add_argument("--cost-batch-sizes", default="128,256,512", help="batch sizes of the step cost (b)")
    parser.add_argument("--targets", default="0.9,0.95")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.configs, args.epochs, args.batch_sizes = 1500, 2, 1, "64,256"
        args.cost_batch_sizes = "128"
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    targets = [float(t) for t in args.targets.split(",")]
    schedule = {"factor_every": args.factor_every, "inverse_every": args.inverse_every}
    data, val = split(args.samples)  # validation split for tuning, cut from the training set
    print(f"mnist1d: {len(data.y_train)} train, {len(val[1])} validation, {len(data.y_test)} test; "
          f"{args.configs} configurations per optimizer, {args.epochs:g} epochs, batch 128")

    results: dict = {}
    print("\n(a) race, best configuration per optimizer (chosen on validation; test figures)")
    print(f"{'model':<18} {'optimizer':<6} {'config':<26} " + " ".join(
        f"{'ep@' + format(t, '.0%'):>7} {'s@' + format(t, '.0%'):>7}" for t in targets) + f" {'final':>6}")
    for model_name, model_fn in MODELS.items():
        results[model_name] = {}
        for opt_name, configs in grids(args.configs).items():
            make = factory(opt_name, schedule)
            runs = [train(model_fn, make, hp, data, val, batch_size=128, max_epochs=args.epochs) for hp in configs]
            best = select(runs, targets[-1])
            hits = {t: best.first(t, TEST) for t in targets}
            results[model_name][opt_name] = {
                "hp": best.hp, "final": best.final_test, "seconds": best.seconds, "steps": best.steps,
                "epochs_to": {t: (h[0] if h else None) for t, h in hits.items()},
                "seconds_to": {t: (h[2] if h else None) for t, h in hits.items()},
                "reached_in_grid": sum(r.first(targets[-1], TEST) is not None for r in runs),
            }
            config = ", ".join(f"{k}={v:.3g}" for k, v in best.hp.items())
            print(f"{model_name:<18} {opt_name:<6} {config:<26} " + " ".join(
                f"{fmt(hits[t], 0, '.2f'):>7} {fmt(hits[t], 2, '.2f'):>7}" for t in targets)
                + f" {best.final_test:>6.3f}")

    print(f"\n(b) amortized step cost, factors every {args.factor_every}, inverses every "
          f"{args.inverse_every} steps (K-FAC / Adam); the race's batch is 128")
    for model_name, model_fn in MODELS.items():
        results[model_name]["step_cost_by_batch"] = {}
        for b in [int(b) for b in args.cost_batch_sizes.split(",")]:
            cost = step_cost(model_fn, data, results[model_name]["KFAC"]["hp"], schedule,
                             20 if args.quick else args.inverse_every, rounds=2 if args.quick else 5,
                             batch_size=b)
            results[model_name]["step_cost_by_batch"][b] = cost
            if b == 128 or "step_cost" not in results[model_name]:
                results[model_name]["step_cost"] = cost
            print(f"{model_name:<18} batch {b:>4}: K-FAC {cost['kfac_ms']:.2f} ms, Adam {cost['adam_ms']:.2f} ms, "
                  f"ratio {cost['ratio']:.2f} (rounds {cost['ratio_range'][0]:.2f}-{cost['ratio_range'][1]:.2f}); "
                  f"SGD-momentum {cost['sgd_ms']:.2f} ms + preconditioning products "
                  f"{cost['precondition_ms']:.2f} ms: the ratio is at least {cost['floor']:.2f}")

    target = targets[0]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"\n(c) CNN iterations to {target:.0%} test accuracy by batch size (lr re-tuned over 3 values each)")
    print(f"{'batch':>6} " + " ".join(f"{name:>14}" for name in grids(1)))
    scaling: dict = {}
    cnn_best = results["CNN Conv1d"]
    for b in sizes:
        scaling[b] = {}
        for opt_name in grids(1):
            base = dict(cnn_best[opt_name]["hp"])
            iters = []
            for factor in (0.5, 1.0, 2.0):
                hp = dict(base, lr=base["lr"] * factor * math.sqrt(b / 128))
                make = factory(opt_name, schedule)
                run = train(cnn1d, make, hp, data, val, batch_size=b, max_epochs=4 * args.epochs,
                            stop_at=target, max_steps=2000)
                hit = run.first(target, TEST)
                iters.append((hit[1] if hit else None, hp["lr"]))
            reached = [i for i in iters if i[0] is not None]
            scaling[b][opt_name] = min(reached) if reached else (None, None)
        cells = [f"{it} (lr {lr:.2g})" if it else "-" for it, lr in scaling[b].values()]
        print(f"{b:>6} " + " ".join(f"{c:>14}" for c in cells))
    results["batch_scaling"] = scaling
    return results


if __name__ == "__main__":
    main()
