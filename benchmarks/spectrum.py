"""Cost of spectral estimates in gradient-equivalents, Lanczos vs power iteration and
Hutchinson vs Hutch++, measured in one run on mnist1d (4000 samples, batches of 1000).

For the MLP 40-256-256-10 and the Conv1d CNN (briefly trained, so the spectrum is that
of a network in training) and their exact Hessian with ``cache=True``:

(a) products to the top eigenvalue within relative error 1e-3 of a converged reference
    (Lanczos to 1e-10), for Lanczos and power iteration from the same start vectors
    (``--starts`` of them; the ratio is of the totals),
    and what ``top_eigenvalues(tol=1e-3)`` spends with its own stopping rule;
(b) the same for the top-5 eigenvalues (power iteration with deflation);
(c) relative error of the trace over ``--seeds`` seeds for Hutchinson and Hutch++ at
    equal budgets, and the smallest budget reaching 2% (RMS over seeds);
(d) per-layer traces (``per_block=True``) against one whole-model trace, same probes.

Gradient-equivalents: seconds / seconds of one full-data gradient, both in this run.
Usage: ``python benchmarks/spectrum.py [--quick] [--seeds 20] [--starts 5] [--budgets 12,24,48,96]``
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import curvopt
from curvopt.data import mnist1d
from curvopt.linalg import lanczos_tridiagonal
from curvopt.models import cnn1d, mlp


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def gradient_seconds(model, loss_fn, batches, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        for X, y in batches:
            loss_fn(model(X), y).backward()
        best = min(best, time.perf_counter() - t)
    return best


def train_briefly(model, data, epochs):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for e in range(epochs):
        for X, y in data.loader(batch_size=128, shuffle=True, seed=e):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    model.eval()


def ritz_top(alpha, beta, m, k):
    T = torch.diag(alpha[:m])
    if m > 1:
        T = T + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    return torch.linalg.eigvalsh(T).flip(0)[:k]


def first_within(errors, target):
    for i, e in enumerate(errors):
        if e <= target:
            return i + 1
    return None


def eigen_costs(op, ref, k, max_steps, seed):
    """Products until every one of the top-k estimates is within 1e-3 of ``ref``."""
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(op.shape[0], generator=g, dtype=torch.float64).to(op.dtype)
    lz = None
    for steps in sorted({min(40, max_steps), max_steps}):  # a short run first: 1e-3 comes early
        alpha, beta, _ = lanczos_tridiagonal(op, v0, steps)
        lz_err = []
        for m in range(k, alpha.shape[0] + 1):
            est = ritz_top(alpha, beta, m, k).to(ref.dtype)
            lz_err.append(float(((est - ref[:k]).abs() / ref[:k].abs()).max()))
        lz = first_within(lz_err, 1e-3)
        if lz is not None:
            lz += k - 1
            break
    power = None
    if k == 1:  # power iteration from the same start vector, Rayleigh quotient per product
        v = v0 / v0.norm()
        for i in range(max_steps * 4):
            w = op @ v
            if abs(float(v @ w) - float(ref[0])) <= 1e-3 * abs(float(ref[0])):
                power = i + 1
                break
            v = w / w.norm()
    return lz, power


def counts_text(counts: list, unit: float) -> str:
    if None in counts:
        return f"{counts} (None: not reached)"
    mean = sum(counts) / len(counts)
    return f"{counts}, mean {mean:.1f} products = {mean * unit:.1f} grads"


def trace_study(op, seeds, budgets, reference):
    """RMS relative error over seeds per (method, budget); Hutchinson reuses nested probes."""
    rel = {"hutchinson": {}, "hutchpp": {}}
    big = max(budgets)
    for s in range(seeds):
        g = torch.Generator().manual_seed(1000 + s)
        Z = (2 * torch.randint(0, 2, (op.shape[0], big), generator=g) - 1).to(op.dtype)
        samples = (Z * (op @ Z)).sum(0)
        for b in budgets:
            rel["hutchinson"].setdefault(b, []).append(float(samples[:b].mean()) / reference - 1)
            est = curvopt.trace(op, b, method="hutchpp", seed=2000 + s)
            rel["hutchpp"].setdefault(b, []).append(est.value / reference - 1)
    def rms(errs):
        return math.sqrt(sum(e * e for e in errs) / len(errs))

    return {m: {b: rms(errs) for b, errs in d.items()} for m, d in rel.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budgets", default="12,24,48,96")
    parser.add_argument("--reference-probes", type=int, default=600)
    parser.add_argument("--starts", type=int, default=5, help="start vectors for (a) and (b)")
    args = parser.parse_args(argv)
    n, bs, epochs = (200, 100, 1) if args.quick else (4000, 1000, 3)
    seeds = 2 if args.quick else args.seeds
    starts = 2 if args.quick else args.starts
    budgets = [3, 6] if args.quick else [int(b) for b in args.budgets.split(",")]
    ref_probes = 12 if args.quick else args.reference_probes
    data = mnist1d()
    batches = list(zip(data.X_train[:n].split(bs), data.y_train[:n].split(bs)))
    loss_fn = nn.CrossEntropyLoss()
    results = {}
    print(f"# spectrum costs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{n} samples in batches of {bs}; costs in gradient-equivalents measured in this run")
    for label, model in [("MLP 40-256-256-10", mlp()), ("CNN Conv1d", cnn1d())]:
        torch.manual_seed(0)
        train_briefly(model, data, epochs)
        grad = gradient_seconds(model, loss_fn, batches)
        op = curvopt.curvature("hessian", model, loss_fn, batches, cache=True)
        v = torch.randn(op.shape[0])
        op @ v  # builds the cache
        _, prod = timed(lambda: op @ v)
        prod = min(prod, timed(lambda: op @ v)[1])
        unit = prod / grad
        ref = curvopt.top_eigenvalues(op, 5, tol=1e-10, max_iter=min(op.shape[0], 200)).eigenvalues
        row = {"product": unit, "ref_top5": ref.tolist()}
        for k in (1, 5):  # over several start vectors: the counts depend on the start's overlap
            counts = [eigen_costs(op, ref, k, max_steps=min(op.shape[0], 150), seed=s) for s in range(starts)]
            row[f"lanczos_top{k}"] = [lz for lz, _ in counts]
            row[f"power_top{k}"] = [pw for _, pw in counts]
        own, secs = timed(lambda: curvopt.top_eigenvalues(op, 1, tol=1e-3, seed=0))
        row["own_top1"] = (own.iterations, secs / grad, abs(float(own.eigenvalues[0] / ref[0]) - 1))
        pw5, secs = timed(lambda: curvopt.top_eigenvalues(op, 5, tol=1e-4, method="power", seed=0))
        row["power5_own"] = (pw5.iterations, secs / grad,
                             float(((pw5.eigenvalues.sort(descending=True).values - ref).abs() / ref.abs()).max()))
        lz5, secs = timed(lambda: curvopt.top_eigenvalues(op, 5, tol=1e-3, seed=0))
        row["lanczos5_own"] = (lz5.iterations, secs / grad,
                               float(((lz5.eigenvalues - ref).abs() / ref.abs()).max()))
        reference = curvopt.trace(op, ref_probes, method="hutchpp", seed=99)
        row["trace_ref"] = (reference.value, reference.stderr)
        row["trace_rms"] = trace_study(op, seeds, budgets, reference.value)
        whole, t_whole = timed(lambda: curvopt.trace(op, 48, seed=5))
        blocks, t_blocks = timed(lambda: curvopt.trace(op, 48, per_block=True, seed=5))
        row["per_block_ratio"] = t_blocks / t_whole
        row["per_block_sum_gap"] = abs(sum(v for v, _ in blocks.blocks.values()) - blocks.value)
        results[label] = row
        print(f"\n## {label}: P = {op.shape[0]}, cached Hessian product = {unit:.2f} gradients")
        print(f"reference top-5: {', '.join(f'{x:.4g}' for x in ref.tolist())}")
        for k in (1, 5):
            lz, pw = row[f"lanczos_top{k}"], row[f"power_top{k}"]
            print(f"(a/b) top-{k} to rel. err 1e-3 (oracle stop), products per start vector "
                  f"(seeds 0-{starts - 1}): Lanczos {counts_text(lz, unit)}"
                  + ("" if k > 1 else f"; power {counts_text(pw, unit)}"))
            if k == 1 and None not in lz + pw:
                row["ratio_top1"] = sum(lz) / sum(pw)
                per_start = [a / b for a, b in zip(lz, pw)]
                print(f"     Lanczos/power over all starts = {row['ratio_top1']:.2f} "
                      f"(per start {min(per_start):.2f} to {max(per_start):.2f})")
        it, g_eq, err = row["own_top1"]
        print(f"     top_eigenvalues(k=1, tol=1e-3): {it} products, {g_eq:.1f} grads, rel. err {err:.1e}")
        for key, name in [("lanczos5_own", "Lanczos k=5 tol=1e-3"), ("power5_own", "power k=5 tol=1e-4")]:
            it, g_eq, err = row[key]
            print(f"     {name}: {it} products, {g_eq:.1f} grads, max rel. err {err:.1e}")
        print(f"(c) trace reference {reference.value:.5g} ± {reference.stderr:.2g} (Hutch++, "
              f"{ref_probes} probes); RMS relative error over {seeds} seeds:")
        print("     budget  " + "  ".join(f"{b:>8}" for b in budgets))
        for m in ("hutchinson", "hutchpp"):
            print(f"     {m:<10}" + "  ".join(f"{100 * row['trace_rms'][m][b]:7.2f}%" for b in budgets))
        for m in ("hutchinson", "hutchpp"):
            ok = [b for b in budgets if row["trace_rms"][m][b] <= 0.02]
            print(f"     {m}: 2% reached at budget {ok[0] if ok else '> ' + str(max(budgets))}")
        print(f"(d) per-layer traces / whole trace, same 48 probes: time ratio {row['per_block_ratio']:.2f}; "
              f"|sum of blocks - whole| = {row['per_block_sum_gap']:.1e}")
    return results


if __name__ == "__main__":
    main()
