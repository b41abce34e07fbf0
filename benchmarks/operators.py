"""Cost of each curvature product as a multiple of one full-data gradient, one run.

On the embedded mnist1d data (4000 samples, batches of 1000) for an MLP 40-256-256-10
(ReLU) and a small Conv1d CNN. For every backend it prints, as ratios measured side
by side in this run (minimum over repeats, so background noise inflates nothing):

* ``product``: one ``op @ v`` in gradients (uncached: each product re-runs the batch);
* ``cached``: one ``op @ v`` with ``cache=True`` once the cache is built;
* ``setup``: building the cache (the first cached product) in gradients;
* ``lin``/``lin setup``: the same with ``cache="linearize"`` (Jacobian backends);
* ``mm16``: a 16-column ``op @ V`` in single products of the same mode.

Usage: ``python benchmarks/operators.py [--quick] [--repeats R] [--threads T]``
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

import curvopt
from curvopt.data import mnist1d
from curvopt.models import cnn1d, mlp

BACKENDS = ["hessian", "ggn", "fisher", "empirical_fisher"]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gradient_fn(model, loss_fn, batches):
    def run():
        model.zero_grad(set_to_none=True)
        for X, y in batches:
            loss_fn(model(X), y).backward()

    return run


def measure(model, loss_fn, batches, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    grad = best_time(gradient_fn(model, loss_fn, batches), repeats)
    rows = []
    for name in BACKENDS:
        op = curvopt.curvature(name, model, loss_fn, batches)
        cop = curvopt.curvature(name, model, loss_fn, batches, cache=True)
        P = op.shape[0]
        v, V = torch.randn(P), torch.randn(P, 16)
        single = best_time(lambda: op @ v, repeats)
        mm = best_time(lambda: op @ V, max(1, repeats // 2))

        def first():
            cop.clear_cache()
            cop @ v

        setup = best_time(first, max(1, repeats // 2))
        cop @ v
        cached = best_time(lambda: cop @ v, repeats)
        cached_mm = best_time(lambda: cop @ V, max(1, repeats // 2))
        lin = lin_setup = float("nan")
        if "linearize" in type(op).cache_modes:
            lop = curvopt.curvature(name, model, loss_fn, batches, cache="linearize")

            def first_lin():
                lop.clear_cache()
                lop @ v

            lin_setup = best_time(first_lin, 1)
            lop @ v
            lin = best_time(lambda: lop @ v, repeats)
        # the gradient again, so that drift over the run shows up
        grad = min(grad, best_time(gradient_fn(model, loss_fn, batches), repeats))
        rows.append(dict(backend=name, P=P, product=single, cached=cached, setup=setup,
                         lin=lin, lin_setup=lin_setup,
                         mm16=mm / single, mm16_cached=cached_mm / cached))
    for r in rows:
        r["product"] /= grad
        r["cached"] /= grad
        r["setup"] /= grad
        r["lin"] /= grad
        r["lin_setup"] /= grad
    return rows


def main(argv: list[str] | None = None) -> list[tuple[str, list[dict]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, bs = (200, 50) if args.quick else (4000, 1000)
    repeats = 1 if args.quick else args.repeats
    data = mnist1d()
    batches = list(zip(data.X_train[:n].split(bs), data.y_train[:n].split(bs)))
    loss_fn = nn.CrossEntropyLoss()
    print(f"# curvopt operator costs, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {n} samples in batches of {bs}")
    results = []
    for label, model in [("MLP 40-256-256-10", mlp()), ("CNN Conv1d", cnn1d())]:
        torch.manual_seed(0)
        rows = measure(model, loss_fn, batches, repeats)
        results.append((label, rows))
        print(f"\n## {label}  (P = {rows[0]['P']})")
        print(f"{'backend':<18}{'product':>9}{'cached':>9}{'setup':>9}{'lin':>9}{'lin setup':>10}"
              f"{'mm16':>8}{'mm16c':>8}")
        print(f"{'':<18}{'[grads]':>9}{'[grads]':>9}{'[grads]':>9}{'[grads]':>9}{'[grads]':>10}"
              f"{'[prod]':>8}{'[prod]':>8}")
        for r in rows:
            print(f"{r['backend']:<18}{r['product']:>9.2f}{r['cached']:>9.2f}{r['setup']:>9.2f}"
                  f"{r['lin']:>9.2f}{r['lin_setup']:>10.2f}{r['mm16']:>8.2f}{r['mm16_cached']:>8.2f}")
    return results


if __name__ == "__main__":
    main()
