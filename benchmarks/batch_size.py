"""Reproduction of the ABS/ABSA table (Yao, Gholami, Keutzer, Mahoney, arXiv:1810.01021) on mnist1d.

Per model (``cnn1d``, the MLP 40-256-256-10) and seed, every run starts from the same initialization
and trains ``--epochs`` epochs with SGD-momentum (0.9, lr ``--lr`` at B0: a fixed choice, not tuned on
this table) through a ``curvopt.schedule`` loop:

- BL: ``FixedBatchSize`` at the small batch ``--batch`` (B0) with the lr ``--lr`` throughout;
- FB: ``FixedBatchSize`` at the max batch B, lr scaled by B / B0 after ``--warmup`` epochs of warm-up;
- GG: ``IncreaseBatchSize`` from B0, doubling at ``log2(B / B0)`` milestones spread evenly over training
  (Smith et al.: each would-be lr decay becomes a batch growth), B reached at the last, the lr unchanged;
- ABS: ``AdaptiveBatchSize`` from B0 to B (Hessian top eigenvalue of a fixed ``--probe-size`` probe set
  by Lanczos, ``--lanczos-steps`` products, ``cache=True``; kappa 2, growth 2, ``--duration``, linear lr);
- ABSA: ABS with ``FGSM(--eps, fraction=0.2)``;

for each max batch B in ``--max-batches``, plus one ABS row with ``curvopt.KFAC`` as base optimizer at
the largest B (``--kfac-*`` options; its lr grows with ``--kfac-lr-scaling``). Columns: test accuracy
(mean +- std over ``--seeds`` seeds), optimizer steps, test accuracy on FGSM examples of the test set
(eps ``--eps``, the seed's robustness claim), and for ABS/ABSA the probes' share of training time, one
probe's cost in gradient-equivalents (probe seconds per check / seconds of one gradient over the probe
set, timed in the same run) and the growths made by the eigenvalue rule and by the duration fallback.
mnist1d is generated with at least ``--train`` training samples and more where needed, so that the
largest batch is below 1/8 of the training set.
Plots of each schedule (batch size, lr, ABS's eigenvalue against epochs, seed 0) are saved under ``--out``.
Training time counts the whole loop (probes and FGSM included), not the evaluations.

Usage: ``python benchmarks/batch_size.py [--quick] [--models cnn1d,mlp] [--max-batches 512,2048] [--seeds 3]
[--epochs 24]``
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import curvopt
from curvopt.data import Dataset, mnist1d
from curvopt.models import cnn1d, mlp
from curvopt.schedule import AdaptiveBatchSize, FixedBatchSize, IncreaseBatchSize
from curvopt.schedule.fgsm import FGSM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import gradient_seconds, with_threads  # noqa: E402

MODELS = {"cnn1d": cnn1d, "mlp": mlp}
SCHEDULES = ("BL", "FB", "GG", "ABS", "ABSA")


@dataclass
class Result:
    """One training run of one schedule."""

    model: str
    optimizer: str
    schedule: str
    max_batch: int
    seed: int
    test_acc: float = 0.0
    fgsm_acc: float = 0.0
    iterations: int = 0
    final_batch: int = 0
    initial_batch: int = 0
    initial_lr: float = 0.0
    seconds: float = 0.0
    probe_seconds: float = 0.0
    checks: int = 0
    diverged: bool = False
    history: list = field(default_factory=list)


def make_data(train: int, test: int, max_batch: int, seed: int = 42) -> Dataset:
    """mnist1d with ``test`` test samples and at least ``train`` training samples, more where needed so that
    ``max_batch`` is below an eighth of the training set (large batches still see many distinct batches)."""
    n_train = max(train, 8 * max_batch + 8)
    total = n_train + test
    data = mnist1d(num_samples=total, seed=seed, train_split=n_train / total)
    assert 8 * max_batch < len(data.y_train), (max_batch, len(data.y_train))
    return data


def gg_milestones(batch: int, max_batch: int, epochs: int) -> list[int]:
    """Epoch counts at which GG doubles the batch: ``log2(max_batch / batch)`` of them, evenly spread over
    ``epochs`` so that the max batch is reached at the last one (at least epoch 1, increasing)."""
    k = max(1, math.ceil(math.log2(max_batch / batch)))
    ms = sorted({max(1, round(epochs * (i + 1) / (k + 1))) for i in range(k)})
    return ms


def make_optimizer(name: str, params, args: argparse.Namespace) -> torch.optim.Optimizer:
    if name == "KFAC":
        # The published table's schedule (factors every step, inverses every 10), pinned: the defaults moved.
        return curvopt.KFAC(params, lr=args.kfac_lr, damping=args.kfac_damping, factor_every=1, inverse_every=10)
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9)


def make_schedule(name: str, opt, model, loss_fn, data: Dataset, max_batch: int, seed: int,
                  args: argparse.Namespace, lr_scaling: str = "linear"):
    """The schedule ``name`` (one of :data:`SCHEDULES`) with the benchmark's settings."""
    common = dict(micro_batch_size=args.micro_batch, seed=seed, epochs=args.epochs)
    train = (data.X_train, data.y_train)
    if name == "BL":
        return FixedBatchSize(opt, model, loss_fn, train, batch_size=args.batch, **common)
    if name == "FB":
        return FixedBatchSize(opt, model, loss_fn, train, batch_size=max_batch, base_batch_size=args.batch,
                              warmup_epochs=args.warmup, **common)
    if name == "GG":
        return IncreaseBatchSize(opt, model, loss_fn, train, batch_size=args.batch, max_batch_size=max_batch,
                                 milestones=gg_milestones(args.batch, max_batch, args.epochs), factor=2, **common)
    adversarial = FGSM(args.eps, fraction=0.2) if name == "ABSA" else None
    return AdaptiveBatchSize(opt, model, loss_fn, train, batch_size=args.batch, max_batch_size=max_batch,
                             probe_size=args.probe_size, lanczos_steps=args.lanczos_steps,
                             duration=args.duration, curvature_options={"cache": True}, lr_scaling=lr_scaling,
                             adversarial=adversarial, **common)


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def run_one(model_name: str, opt_name: str, schedule: str, max_batch: int, seed: int, data: Dataset,
            args: argparse.Namespace, lr_scaling: str = "linear") -> Result:
    """Train one model with one schedule; test and FGSM accuracy afterwards (untimed)."""
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    loss_fn = nn.CrossEntropyLoss()
    opt = make_optimizer(opt_name, model.parameters(), args)
    sched = make_schedule(schedule, opt, model, loss_fn, data, max_batch, seed, args, lr_scaling)
    res = Result(model_name, opt_name, schedule, max_batch if schedule != "BL" else args.batch, seed)
    res.initial_batch, res.initial_lr = sched.batch_size, float(sched.lr)
    t = time.perf_counter()
    try:
        for _ in range(args.epochs):
            model.train()
            for X, y in sched:
                opt.zero_grad()
                loss = sched.backward(X, y)
                if not torch.isfinite(loss):
                    res.diverged = True
                    break
                opt.step()
            if res.diverged:
                break
            sched.step()
    finally:
        res.seconds = time.perf_counter() - t
        if hasattr(opt, "close"):
            opt.close()
    res.iterations, res.final_batch = sched.iterations, sched.batch_size
    res.history = [{k: v for k, v in h.items() if isinstance(v, (int, float, str, type(None)))}
                   for h in sched.history]
    res.probe_seconds = sum(h.get("probe_seconds") or 0.0 for h in sched.history)
    res.checks = sum("probe_seconds" in h for h in sched.history)
    model.eval()
    res.test_acc = accuracy(model, data.X_test, data.y_test)
    lo, hi = float(data.X_train.min()), float(data.X_train.max())
    X_adv = FGSM(args.eps, clamp=(lo, hi)).perturb(model, loss_fn, data.X_test, data.y_test, micro_batch_size=1000)
    res.fgsm_acc = accuracy(model, X_adv, data.y_test)
    return res


def plot(results: list[Result], path: Path, title: str) -> Path | None:
    """Batch size, lr and (ABS/ABSA) top eigenvalue against epochs, one line per schedule."""
    try:
        import matplotlib
    except ImportError:
        print(f"(no plot: pip install matplotlib for {path})")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
    for i, r in enumerate(results):
        # a record holds the batch and lr set by the check at the end of its epoch, in force from the next
        epochs = [0] + [h["epoch"] + 1 for h in r.history]
        label = r.schedule if r.optimizer == "SGD" else f"{r.schedule} ({r.optimizer})"
        style = dict(marker=".", label=label, color=f"C{i}")
        axes[0].step(epochs, [r.initial_batch] + [h["batch_size"] for h in r.history], where="post", **style)
        axes[1].step(epochs, [r.initial_lr] + [h["lr"] for h in r.history], where="post", **style)
        eig = [h.get("eigenvalue") for h in r.history]
        if any(isinstance(e, float) and math.isfinite(e) for e in eig):
            axes[2].plot(epochs[1:], [math.nan if e is None else e for e in eig], **style)
    axes[0].set_yscale("log", base=2)
    axes[0].set_ylabel("batch size")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("lr")
    axes[2].set_ylabel("top Hessian eigenvalue")
    axes[2].set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    axes[0].set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mean_std(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.1f} ± {100 * sd:.1f}"


def row(group: list[Result], grad_s: float) -> dict:
    """The table row of one (model, optimizer, schedule, max batch) over its seeds."""
    r0 = group[0]
    out = {"model": r0.model, "optimizer": r0.optimizer, "schedule": r0.schedule, "max_batch": r0.max_batch,
           "seeds": len(group), "test_acc": [r.test_acc for r in group], "fgsm_acc": [r.fgsm_acc for r in group],
           "iterations": statistics.mean(r.iterations for r in group),
           "final_batch": [r.final_batch for r in group], "diverged": sum(r.diverged for r in group),
           "seconds": statistics.mean(r.seconds for r in group), "probe_share": None, "probe_grads": None,
           "growths": None}
    if any(r.checks for r in group):
        out["probe_share"] = statistics.mean(r.probe_seconds / r.seconds for r in group if r.seconds > 0)
        # one check's cost in gradients over the probe set (the same samples, this run's timing)
        out["probe_grads"] = statistics.mean(r.probe_seconds / max(r.checks, 1) for r in group) / grad_s
        # what drove the growth: the eigenvalue rule or the duration fallback (mean per run)
        out["growths"] = {why: statistics.mean(sum(h.get("reason") == why for h in r.history) for r in group)
                          for why in ("eigenvalue", "duration")}
    return out


def print_table(rows: list[dict], bl_iterations: dict) -> None:
    print("| model | optimizer | schedule | max batch | test acc % | iterations | vs BL | FGSM acc % "
          "| final batch | train s/run | probes / train time | gradients per probe | growths eig/dur | diverged |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fewer = bl_iterations.get(r["model"])
        ratio = f"{fewer / r['iterations']:.1f}x" if fewer and r["iterations"] else "-"
        share = "-" if r["probe_share"] is None else f"{100 * r['probe_share']:.0f}%"
        grads = "-" if r["probe_grads"] is None else f"{r['probe_grads']:.0f}"
        finals = sorted(set(r["final_batch"]))
        why = "-" if r["growths"] is None else f"{r['growths']['eigenvalue']:.1f}/{r['growths']['duration']:.1f}"
        print(f"| {r['model']} | {r['optimizer']} | {r['schedule']} | {r['max_batch']} "
              f"| {mean_std(r['test_acc'])} | {r['iterations']:.0f} | {ratio} | {mean_std(r['fgsm_acc'])} "
              f"| {'/'.join(map(str, finals))} | {r['seconds']:.0f} | {share} | {grads} | {why} "
              f"| {r['diverged']}/{r['seeds']} |", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--models", default="cnn1d,mlp", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--max-batches", default="256,512,1024,2048,4096")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="subset of BL,FB,GG,ABS,ABSA")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32, help="B0: BL's batch and every schedule's first")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD-momentum lr at B0 (fixed, not tuned here)")
    parser.add_argument("--train", type=int, default=16000, help="least training samples (more for 8x max batch)")
    parser.add_argument("--test", type=int, default=4000)
    parser.add_argument("--micro-batch", type=int, default=512, help="micro_batch_size of the schedules")
    parser.add_argument("--warmup", type=int, default=5, help="FB's warm-up epochs")
    parser.add_argument("--duration", type=int, default=4, help="ABS: checks without growth before growing")
    parser.add_argument("--probe-size", type=int, default=1024)
    parser.add_argument("--lanczos-steps", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.1, help="FGSM step (ABSA and the FGSM test), data units "
                                                             "(mnist1d inputs have std 1)")
    parser.add_argument("--kfac", default="ABS", help="schedules run with curvopt.KFAC at the largest max "
                                                       "batch ('' for none)")
    parser.add_argument("--kfac-lr", type=float, default=0.01)
    parser.add_argument("--kfac-damping", type=float, default=1e-2)
    parser.add_argument("--kfac-lr-scaling", default="sqrt",
                        help="lr scaling of the K-FAC rows (a preconditioned step does not follow SGD's "
                             "linear rule)")
    parser.add_argument("--out", default="runs/batch_size", help="folder of the plots and results.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: stable timings)")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_batches, args.seeds, args.epochs, args.batch = "32", 1, 2, 8
        args.train, args.test, args.micro_batch, args.warmup = 300, 200, 16, 1
        args.duration, args.probe_size, args.lanczos_steps = 1, 32, 3
    return with_threads(args.threads, run, args)


def run(args: argparse.Namespace) -> dict:
    """Every run of the table for the parsed ``args``; prints the table, saves plots and results.json."""
    models = [m for m in args.models.split(",") if m]
    max_batches = sorted(int(b) for b in args.max_batches.split(",") if b)
    schedules = [s for s in args.schedules.split(",") if s]
    kfac = [s for s in args.kfac.split(",") if s]
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in schedules + kfac:
        if name not in SCHEDULES:
            raise SystemExit(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    data = make_data(args.train, args.test, max_batches[-1])
    out = Path(args.out)
    cpu = platform.processor() or platform.machine()
    print(f"# batch-size schedules on mnist1d ({len(data.y_train)} train, {len(data.y_test)} test), torch "
          f"{torch.__version__}, {cpu}, {torch.get_num_threads()} threads; SGD-m lr {args.lr:g} at B0 = "
          f"{args.batch}, {args.epochs} epochs, {args.seeds} seeds; ABS duration {args.duration}, probe "
          f"{args.probe_size} samples, Lanczos {args.lanczos_steps} products; FGSM eps {args.eps:g}\n", flush=True)
    runs: list[Result] = []
    rows: list[dict] = []
    bl_iterations: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K-FAC's one-time notices
        for model_name in models:
            grad_s = gradient_seconds(MODELS[model_name], data, min(args.probe_size, len(data.y_train)))
            plans = []  # (optimizer, schedule, max batch, lr scaling)
            if "BL" in schedules:
                plans.append(("SGD", "BL", args.batch, "linear"))
            plans += [("SGD", s, b, "linear") for b in max_batches for s in schedules if s != "BL"]
            plans += [("KFAC", s, max_batches[-1] if s != "BL" else args.batch, args.kfac_lr_scaling)
                      for s in kfac]
            for opt_name, schedule, max_batch, scaling in plans:
                group = [run_one(model_name, opt_name, schedule, max_batch, seed, data, args, scaling)
                         for seed in range(args.seeds)]
                runs += group
                rows.append(row(group, grad_s))
                if opt_name == "SGD" and schedule == "BL":
                    bl_iterations[model_name] = rows[-1]["iterations"]
                print(f"  done {model_name} {opt_name} {schedule} {max_batch}: "
                      f"{mean_std(rows[-1]['test_acc'])}% in {rows[-1]['iterations']:.0f} steps, "
                      f"{rows[-1]['seconds']:.0f} s/run", flush=True)
    print()
    print_table(rows, bl_iterations)
    plots = []
    for model_name in models:
        for b in max_batches:
            sel = [r for r in runs if r.model == model_name and r.seed == 0
                   and (r.max_batch == b or r.schedule == "BL" and r.optimizer == "SGD")]
            if sel:
                p = plot(sel, out / f"schedules_{model_name}_max{b}.png",
                         f"{model_name}: batch-size schedules to {b} (seed 0)")
                if p is not None:
                    plots.append(str(p))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                   "runs": [asdict(r) for r in runs]}, indent=1))
    print(f"\nplots: {', '.join(plots) or '-'}; results: {out / 'results.json'}")
    return {"rows": rows, "runs": runs, "plots": plots, "train_samples": len(data.y_train)}


if __name__ == "__main__":
    main()
