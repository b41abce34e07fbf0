"""Reproduction of HAWQ mixed-precision quantization (Dong et al. 2019, 2020; Yao et al. 2021) at small scale.

Per model and training seed (``--seeds``, default 3), a fixed recipe trains the network from scratch (Adam,
lr ``--lr`` with cosine decay to 0 over ``--epochs`` epochs, batch ``--batch``; chosen once for accuracy in
full precision, not tuned on any quantization result):

- ``mlp``: ``mlp((40, 256, 256, 256, 256, 256, 10))`` on mnist1d (``--samples`` samples, 80% for training);
- ``cnn1d``: ``cnn1d(conv_layers=5)`` (five 32-channel 5-tap convolutions and a linear head) on mnist1d;
- ``digits_cnn``: ``digits_cnn()`` (four 3x3 convolutions, two linear layers) on scikit-learn's 8x8 digits;

six quantizable layers each (``--width`` scales their widths; ``--quick`` uses an eighth). Then, weights only
(symmetric per-output-channel ``Quantizer()``, MSE clipping; biases stay in fp32), on a calibration set of
``--calibration`` training samples drawn with the seed:

1. every sensitivity score of ``--scores`` (``curvopt.sensitivity(score=...)``: ``hawq_v2`` with
   ``--probes`` Hutch++ products, ``hawq_v1``, ``qbert``, ``fisher``, ``gptq``, ``measured``), timed, and its
   ``score_table`` at the widths ``--bits`` (2, 3, 4, 8);
2. the plans: uniform b bits for each b of ``--bits``; for each budget of ``--budgets`` (average bits 3, 4,
   2.5; the size of uniform b bits is ``b * weights`` bits), each score's ILP allocation
   (``allocate_bits(method="ilp")``) within that size, and ``--random`` allocations of that size
   (``random_plans``: drawn uniformly among the allocations whose size lies within 1% below the largest
   size reachable within the budget);
3. each plan's test accuracy after post-training quantization (PTQ: ``fake_quantized``) and, reported apart,
   for the plans at the budgets ``--qat-budgets`` (default 3 bits) of the kinds ``--qat-methods`` (default
   uniform, each score's plan and the first ``--random-qat`` random plans of each seed), after
   ``--qat-epochs`` epoch(s) of straight-through QAT (``curvopt.quant.finetune``, Adam lr ``--qat-lr``, batch
   ``--batch``, from the trained weights); plus one PTQ row of the ``hawq_v2`` plan at 3 bits with
   ``--activation-bits``-bit activations (input ranges calibrated on the calibration set).

Accuracy is mean +- std over seeds (random rows: over all plans of all seeds). Size: bytes of the quantized
weights (``BitPlan.size_bytes``; scales, biases not counted), compression = fp32 bytes / size. Targets
(stated per model, never tuned on): at a 3-bit average, HAWQ (``hawq_v2``) >= uniform 3-bit + 2 points and
above the mean of the random allocations of that size. Also: each score's Spearman rank correlation with the
measured test-loss increase per layer at 3 bits (each layer quantized alone), and the seconds it took.
Plots under ``--out`` (seed 0): the hawq_v2 size/objective Pareto frontier and the PTQ accuracy of frontier
points, uniform, random and each score's plans against size; results.json holds every number.

Cost: QAT dominates (its quantizer re-fits the MSE clip of every planned layer at each step: about 20 s per
epoch of the MLP on one core); ``--qat-methods uniform,hawq_v2,random --random-qat 2`` keeps a 3-seed run of
the three models near a quarter of an hour on a busy 2-core CPU.

Usage: ``python benchmarks/quantization.py [--quick] [--models mlp,cnn1d,digits_cnn] [--seeds 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import curvopt
from curvopt.data import Dataset, digits, mnist1d
from curvopt.models import cnn1d, digits_cnn, mlp
from curvopt.quant import allocate_bits, random_plans, uniform_plan
from curvopt.quant.fake import fake_quantized
from curvopt.quant.finetune import finetune
from curvopt.quant.plan import quantizable_modules
from curvopt.quant.quantizer import Quantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import with_threads  # noqa: E402

# name: (builder(width), dataset); the width is 256 / 32 / 16 for the table, an eighth of that in --quick
MODELS = {
    "mlp": (lambda w=256: mlp((40, w, w, w, w, w, 10)), "mnist1d"),
    "cnn1d": (lambda w=32: cnn1d(channels=w, conv_layers=5), "mnist1d"),
    "digits_cnn": (lambda w=16: digits_cnn(channels=w, hidden=4 * w), "digits"),
}
DEFAULT_WIDTH = {"mlp": 256, "cnn1d": 32, "digits_cnn": 16}
SCORES = ("hawq_v2", "hawq_v1", "qbert", "fisher", "gptq", "measured")
HAWQ = "hawq_v2"
TARGET_BITS = 3  # the budget the targets are stated at
TARGET_GAIN = 0.02  # HAWQ >= uniform + 2 points


@dataclass
class Entry:
    """One plan evaluated on one seed's model."""

    method: str  # "fp32", "uniform", a score name, "random", "hawq_v2+a8"
    budget: float | None  # average bits of the size budget (None: fp32 / uniform)
    seed: int
    size_bits: int
    average_bits: float
    ptq: float
    qat: float | None = None
    objective: float | None = None  # summed hawq_v2 score of the plan
    bits: dict = field(default_factory=dict)


def load_data(kind: str, samples: int) -> Dataset:
    return mnist1d(num_samples=samples) if kind == "mnist1d" else digits()


def accuracy(model: nn.Module, data: Dataset) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data.X_test).argmax(1) == data.y_test).float().mean())


def test_loss(model: nn.Module, data: Dataset) -> float:
    model.eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(data.X_test).double(), data.y_test))


def train(name: str, data: Dataset, seed: int, args: argparse.Namespace) -> nn.Module:
    """The fixed recipe: Adam at ``args.lr`` with cosine decay to 0 over ``args.epochs`` epochs."""
    torch.manual_seed(seed)
    model = MODELS[name][0](max(1, round(DEFAULT_WIDTH[name] * args.width)))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(data.y_train) / args.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in range(args.epochs):
        for X, y in data.loader(args.batch, shuffle=True, seed=seed * 1000 + epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def calibration_batches(data: Dataset, n: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` training samples drawn without replacement with ``seed``, in batches of ``batch``."""
    idx = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[:n]
    X, y = data.X_train[idx], data.y_train[idx]
    return list(zip(X.split(batch), y.split(batch)))


def layer_increases(model: nn.Module, data: Dataset, bits: int, quantizer: Quantizer) -> dict[str, float]:
    """The measured test-loss increase of each quantizable layer quantized alone at ``bits``."""
    base = test_loss(model, data)
    out = {}
    for name in quantizable_modules(model):
        with fake_quantized(model, {name: bits}, quantizer):
            out[name] = test_loss(model, data) - base
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def objective(plan_bits: dict[str, int], table: dict[str, dict[int, float]]) -> float:
    return math.fsum(table[n][b] for n, b in plan_bits.items())


class CachedQuantizer:
    """``quantizer`` with its ``Q_b(W)`` remembered per weight and width: PTQ of a hundred plans of one trained
    model quantizes each layer once per width. A hit needs the weight's values unchanged (checked)."""

    def __init__(self, quantizer: Quantizer) -> None:
        self.quantizer = quantizer
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def quantize(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        key = (weight.data_ptr(), bits)
        hit = self.cache.get(key)
        if hit is not None and hit[0].shape == weight.shape and torch.equal(hit[0], weight):
            return hit[1].clone()
        q = self.quantizer.quantize(weight, bits)
        self.cache[key] = (weight.detach().clone(), q.detach().clone())
        return q


class Evaluator:
    """PTQ and QAT accuracy of plans on one trained model; seconds spent on each."""

    def __init__(self, model: nn.Module, data: Dataset, quantizer: Quantizer, seed: int, args: argparse.Namespace):
        self.model, self.data, self.quantizer, self.seed, self.args = model, data, quantizer, seed, args
        self.cached = CachedQuantizer(quantizer)
        self.seconds = {"ptq": 0.0, "qat": 0.0}

    def ptq(self, bits: dict[str, int], **kwargs) -> float:
        t = time.perf_counter()
        with fake_quantized(self.model, bits, self.cached, **kwargs):
            acc = accuracy(self.model, self.data)
        self.seconds["ptq"] += time.perf_counter() - t
        return acc

    def qat(self, bits: dict[str, int]) -> float | None:
        if self.args.qat_epochs < 1:
            return None
        t = time.perf_counter()
        model = copy.deepcopy(self.model)  # QAT moves the latent weights: every plan starts from the trained ones
        loader = self.data.loader(self.args.batch, shuffle=True, seed=self.seed)
        finetune(model, bits, loader, epochs=self.args.qat_epochs, lr=self.args.qat_lr, quantizer=self.quantizer,
                 seed=self.seed)
        with fake_quantized(model, bits, self.quantizer):
            acc = accuracy(model, self.data)
        self.seconds["qat"] += time.perf_counter() - t
        return acc


def run_seed(name: str, data: Dataset, seed: int, args: argparse.Namespace) -> dict:
    """Train one model and evaluate every plan of the table on it."""
    t0 = time.perf_counter()
    model = train(name, data, seed, args)
    train_s = time.perf_counter() - t0
    quantizer = Quantizer()
    calib = calibration_batches(data, args.calibration, args.calibration_batch, seed)
    bits = tuple(args.bit_widths)
    tables: dict[str, dict[str, dict[int, float]]] = {}
    seconds: dict[str, float] = {}
    for score in args.score_names:
        t = time.perf_counter()
        report = curvopt.sensitivity(model, calib, nn.CrossEntropyLoss(), score=score, probes=args.probes,
                                     quantizer=quantizer, measured_bits=bits, seed=seed)
        tables[score] = {n: {b: float(v) for b, v in row.items()}
                         for n, row in report.score_table(model, bits, quantizer=quantizer).items()}
        seconds[score] = time.perf_counter() - t
    truth = layer_increases(model, data, TARGET_BITS, quantizer)
    names = list(truth)
    rho = {s: spearman([tables[s][n][TARGET_BITS] for n in names], [truth[n] for n in names]) for s in tables}

    ev = Evaluator(model, data, quantizer, seed, args)
    hawq_table = tables.get(HAWQ)
    entries: list[Entry] = []
    numel = sum(m.weight.numel() for m in quantizable_modules(model).values())
    entries.append(Entry("fp32", None, seed, 32 * numel, 32.0, accuracy(model, data)))

    def add(method: str, budget: float | None, plan, qat: bool = True, **kwargs) -> Entry:
        e = Entry(method, budget, seed, plan.size_bits, plan.average_bits, ev.ptq(plan.bits, **kwargs),
                  ev.qat(plan.bits) if qat else None,
                  objective(plan.bits, hawq_table) if hawq_table else None, dict(plan.bits))
        entries.append(e)
        return e

    qat_at = set(args.qat_budget_list)
    for b in bits:
        add("uniform", None, uniform_plan(model, b), qat=b in qat_at and "uniform" in args.qat_method_list)
    pareto = []
    for budget in args.budget_list:
        for score, table in tables.items():
            plan = allocate_bits(model, table, bits=bits, average_bits=budget, method="ilp")
            add(score, budget, plan, qat=budget in qat_at and score in args.qat_method_list)
            if score == HAWQ and budget == args.budget_list[0]:
                pareto = plan.pareto
        size_bits = math.floor(budget * numel)
        for i, plan in enumerate(random_plans(model, bits, size_bits, args.random, seed=seed)):
            add("random", budget, plan,
                qat=budget in qat_at and "random" in args.qat_method_list and i < args.random_qat)
    if args.activation_bits and HAWQ in tables and TARGET_BITS in args.budget_list:
        plan = allocate_bits(model, tables[HAWQ], bits=bits, average_bits=TARGET_BITS, method="ilp")
        add(f"{HAWQ}+a{args.activation_bits}", TARGET_BITS, plan, qat=False,
            activation_bits=args.activation_bits, calibration=calib)
    frontier = []
    if seed == 0 and pareto:  # PTQ accuracy of (at most --pareto-points) frontier points, for the plot
        step = max(1, math.ceil(len(pareto) / args.pareto_points))
        for p in pareto[::step] + ([pareto[-1]] if (len(pareto) - 1) % step else []):
            frontier.append({"size_bytes": p.size_bytes, "objective": p.objective, "ptq": ev.ptq(p.bits),
                             "bits": dict(p.bits)})
    return {"entries": entries, "seconds": seconds, "spearman": rho, "truth": truth, "train_s": train_s,
            "ptq_s": ev.seconds["ptq"], "qat_s": ev.seconds["qat"],
            "tables": {s: {n: {str(b): v for b, v in row.items()} for n, row in t.items()}
                       for s, t in tables.items()},
            "frontier": frontier, "numel": numel}


def pm(xs: list[float], scale: float = 100.0, digits_: int = 1) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * statistics.mean(xs):.{digits_}f} ± {scale * sd:.{digits_}f}"


def rows_of(model: str, entries: list[Entry], args: argparse.Namespace) -> list[dict]:
    """Table rows of one model: entries grouped by (method, budget, uniform width), over seeds."""
    order = [("fp32", None)] + [("uniform", b) for b in args.bit_widths]
    for budget in args.budget_list:
        order += [(s, budget) for s in args.score_names] + [("random", budget)]
        if budget == TARGET_BITS:
            order.append((f"{HAWQ}+a{args.activation_bits}", budget))
    rows = []
    for method, key in order:
        if method == "uniform":
            group = [e for e in entries if e.method == "uniform" and e.average_bits == key]
        else:
            group = [e for e in entries if e.method == method and e.budget == key]
        if not group:
            continue
        qat = [e.qat for e in group if e.qat is not None]
        rows.append({"model": model, "method": method, "budget": key if method != "uniform" else None,
                     "n": len(group), "w_bits": statistics.mean(e.average_bits for e in group),
                     "size_bytes": statistics.mean(e.size_bits / 8 for e in group),
                     "compression": 32 / statistics.mean(e.average_bits for e in group),
                     "ptq": [e.ptq for e in group], "qat": qat,
                     "objective": (statistics.mean(e.objective for e in group)
                                   if all(e.objective is not None for e in group) else None)})
    return rows


def label(r: dict) -> str:
    if r["method"] == "fp32":
        return "FP32"
    if r["method"] == "uniform":
        return f"uniform {r['w_bits']:g}-bit"
    if r["method"] == "random":
        return f"random @ {r['budget']:g} ({r['n']} plans, {len(r['qat'])} with QAT)"
    what = "HAWQ-V2 MP" if r["method"] == HAWQ else (
        "HAWQ-V2 MP, 8-bit act." if r["method"].startswith(HAWQ + "+") else f"{r['method']} MP")
    return f"{what} @ {r['budget']:g}"


def print_table(rows: list[dict]) -> None:
    print("| model | method | w-bits | PTQ acc % | PTQ + QAT acc % | size (B) | compression | hawq_v2 objective |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        obj = "-" if r["objective"] is None else f"{r['objective']:.3g}"
        print(f"| {r['model']} | {label(r)} | {r['w_bits']:.2f} | {pm(r['ptq'])} | {pm(r['qat'])} "
              f"| {r['size_bytes']:.0f} | {r['compression']:.1f}x | {obj} |", flush=True)


def targets(model: str, rows: list[dict]) -> list[dict]:
    """HAWQ at the 3-bit budget against uniform 3-bit (+2 points) and the random mean, PTQ and QAT apart."""
    by = {(r["method"], r["budget"], r["w_bits"] if r["method"] == "uniform" else None): r for r in rows}
    hawq, uni = by.get((HAWQ, TARGET_BITS, None)), by.get(("uniform", None, float(TARGET_BITS)))
    rnd = by.get(("random", TARGET_BITS, None))
    out = []
    for kind in ("ptq", "qat"):
        if hawq is None or not hawq[kind]:
            continue
        h = statistics.mean(hawq[kind])
        if uni is not None and uni[kind]:
            u = statistics.mean(uni[kind])
            out.append({"model": model, "kind": kind, "target": f"HAWQ >= uniform {TARGET_BITS}-bit + 2 points",
                        "hawq": h, "other": u, "margin": h - u, "met": h - u >= TARGET_GAIN})
        if rnd is not None and rnd[kind]:
            m = statistics.mean(rnd[kind])
            out.append({"model": model, "kind": kind, "target": f"HAWQ > mean of random at {TARGET_BITS} bits",
                        "hawq": h, "other": m, "margin": h - m, "met": h > m})
    return out


def plot(model: str, rows: list[dict], seed0: list[Entry], frontier: list[dict], path: Path) -> Path | None:
    """The hawq_v2 objective and PTQ accuracy against size (seed 0): frontier, uniform, random, each score."""
    try:
        import matplotlib
    except ImportError:
        print(f"(no plot: pip install matplotlib for {path})")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_obj, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if frontier:
        xs = [p["size_bytes"] for p in frontier]
        ax_obj.plot(xs, [p["objective"] for p in frontier], "-", color="k", lw=1, label="hawq_v2 Pareto frontier")
        ax_acc.plot(xs, [100 * p["ptq"] for p in frontier], ".-", color="k", lw=1, label="frontier plans (PTQ)")
    groups: dict[str, list[Entry]] = {}
    for e in seed0:
        if e.method != "fp32" and "+" not in e.method:
            groups.setdefault(e.method, []).append(e)
    markers = {"uniform": "s", "random": "x"}
    for i, (method, es) in enumerate(groups.items()):
        style = dict(marker=markers.get(method, "o"), ls="none", color=f"C{i}", label=method,
                     alpha=0.5 if method == "random" else 1.0)
        if all(e.objective is not None for e in es):
            ax_obj.plot([e.size_bits / 8 for e in es], [e.objective for e in es], **style)
        ax_acc.plot([e.size_bits / 8 for e in es], [100 * e.ptq for e in es], **style)
    fp = [e for e in seed0 if e.method == "fp32"]
    if fp:
        ax_acc.axhline(100 * fp[0].ptq, color="grey", ls=":", label="fp32")
    ax_obj.set_yscale("symlog", linthresh=1e-4)
    ax_obj.set_xlabel("size of the quantized weights (bytes)")
    ax_obj.set_ylabel("summed hawq_v2 score")
    ax_acc.set_xlabel("size of the quantized weights (bytes)")
    ax_acc.set_ylabel("test accuracy % (PTQ)")
    ax_acc.legend(fontsize=7)
    ax_obj.legend(fontsize=7)
    fig.suptitle(f"{model}: mixed precision against size (seed 0)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10000, help="mnist1d samples (80%% train, 20%% test)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam peak lr (cosine decay to 0)")
    parser.add_argument("--batch", type=int, default=64, help="training and QAT batch size")
    parser.add_argument("--scores", default=",".join(SCORES), help="comma-separated sensitivity scores")
    parser.add_argument("--bits", default="2,3,4,8", help="candidate widths (also the uniform rows)")
    parser.add_argument("--budgets", default="3,4,2.5", help="average-bit size budgets; the first is plotted")
    parser.add_argument("--calibration", type=int, default=2048, help="training samples for the scores")
    parser.add_argument("--calibration-batch", type=int, default=512)
    parser.add_argument("--probes", type=int, default=64, help="hawq_v2's Hutch++ products")
    parser.add_argument("--random", type=int, default=20, help="random allocations per budget and seed")
    parser.add_argument("--random-qat", type=int, default=5, help="of which fine-tuned (QAT)")
    parser.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs (0: PTQ only)")
    parser.add_argument("--qat-lr", type=float, default=1e-4, help="QAT Adam lr")
    parser.add_argument("--qat-budgets", default="3", help="average bits whose uniform, score and random plans "
                                                           "are also fine-tuned")
    parser.add_argument("--qat-methods", default=",".join(("uniform", *SCORES, "random")),
                        help="the plans fine-tuned at those budgets: uniform, score names, random")
    parser.add_argument("--activation-bits", type=int, default=8, help="the activation row's width (0: none)")
    parser.add_argument("--pareto-points", type=int, default=24, help="frontier plans evaluated for the plot")
    parser.add_argument("--out", default="runs/quantization", help="folder of the plots and results.json")
    parser.add_argument("--width", type=float, default=1.0, help="scales every model's width (1: the table's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.samples, args.epochs, args.width = 2, 600, 2, 0.125
        args.calibration, args.calibration_batch, args.probes = 96, 48, 4
        args.random, args.random_qat, args.pareto_points = 3, 1, 4
        args.budgets = "3"
    args.model_names = [m for m in args.models.split(",") if m]
    args.score_names = [s for s in args.scores.split(",") if s]
    args.bit_widths = [int(b) for b in args.bits.split(",") if b]
    args.budget_list = [float(b) for b in args.budgets.split(",") if b]
    args.qat_budget_list = [float(b) for b in args.qat_budgets.split(",") if b]
    args.qat_method_list = [m for m in args.qat_methods.split(",") if m]
    for name in args.model_names:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for name in args.score_names:
        if name not in SCORES:
            raise SystemExit(f"unknown score {name!r}; choose from {', '.join(SCORES)}")
    return with_threads(args.threads, run, args)


def run(args: argparse.Namespace) -> dict:
    """Every model and seed for the parsed ``args``; prints the tables, saves plots and results.json."""
    out = Path(args.out)
    cpu = platform.processor() or platform.machine()
    print(f"# HAWQ mixed precision, weights only: torch {torch.__version__}, {cpu}, {torch.get_num_threads()} "
          f"threads; {args.seeds} seeds; Adam lr {args.lr:g} cosine, {args.epochs} epochs, batch {args.batch}; "
          f"scores on {args.calibration} training samples (hawq_v2: {args.probes} Hutch++ products); widths "
          f"{args.bits}; QAT {args.qat_epochs} epoch(s) at Adam lr {args.qat_lr:g}\n", flush=True)
    rows: list[dict] = []
    goals: list[dict] = []
    rank: list[dict] = []
    plots: list[str] = []
    raw: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.model_names:
            data = load_data(MODELS[name][1], args.samples)
            results = []
            for seed in range(args.seeds):
                t = time.perf_counter()
                res = run_seed(name, data, seed, args)
                results.append(res)
                fp = res["entries"][0].ptq
                print(f"  done {name} seed {seed}: fp32 {100 * fp:.1f}%, {time.perf_counter() - t:.0f} s: "
                      f"training {res['train_s']:.0f}, scores {sum(res['seconds'].values()):.0f}, "
                      f"PTQ {res['ptq_s']:.0f}, QAT {res['qat_s']:.0f}", flush=True)
            entries = [e for r in results for e in r["entries"]]
            model_rows = rows_of(name, entries, args)
            rows += model_rows
            goals += targets(name, model_rows)
            for s in args.score_names:
                rank.append({"model": name, "score": s, "spearman": [r["spearman"][s] for r in results],
                             "seconds": [r["seconds"][s] for r in results]})
            raw[name] = {"train_samples": len(data.y_train), "test_samples": len(data.y_test),
                         "weights": results[0]["numel"],
                         "seeds": [{k: v for k, v in r.items() if k != "entries"}
                                   | {"entries": [vars(e) for e in r["entries"]]} for r in results]}
            p = plot(name, model_rows, [e for e in entries if e.seed == 0], results[0]["frontier"],
                     out / f"pareto_{name}.png")
            if p is not None:
                plots.append(str(p))
    print()
    print_table(rows)
    print("\n| model | score | Spearman vs measured test-loss increase at 3 bits | seconds |")
    print("|---|---|---:|---:|")
    for r in rank:
        finite = [x for x in r["spearman"] if math.isfinite(x)]
        print(f"| {r['model']} | {r['score']} | {pm(finite, 1.0, 2)} | {statistics.mean(r['seconds']):.1f} |")
    print()
    for g in goals:
        print(f"target {g['model']} {g['kind'].upper()}: {g['target']}: {100 * g['hawq']:.1f} vs "
              f"{100 * g['other']:.1f} ({100 * g['margin']:+.1f} points): {'met' if g['met'] else 'NOT met'}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "rows": rows,
                                                   "targets": goals, "spearman": rank, "models": raw},
                                                  indent=1, default=str))
    print(f"\nplots: {', '.join(plots) or '-'}; results: {out / 'results.json'}")
    return {"rows": rows, "targets": goals, "spearman": rank, "plots": plots, "models": raw}


if __name__ == "__main__":
    main()
