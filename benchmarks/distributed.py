"""Data parallel on one CPU: 1 process against 2 (gloo, one torch thread each), on the same global data.

On the embedded mnist1d data (4000 samples, global batches of 1000: 500 per rank on 2 ranks) for the MLP
40-256-256-10 and the Conv1d CNN of :mod:`curvopt.models`, it measures:

* curvature products (``hessian``, ``ggn``; uncached and ``cache=True``): products/s, the collectives
  issued per product (:func:`curvopt.distributed.collective_count`, 1 under a group), the time spent
  inside ``torch.distributed.all_reduce`` during a product as a share of it (on the rank that waited
  most, so it includes waiting for the slower peer), and a bare all-reduce of the same buffer after a
  barrier (the transport alone);
* K-FAC training steps/s with DDP at the same global batch, for ``distribute="replicate" | "comm_opt" |
  "mem_opt"``, the share of the step spent in K-FAC's own all-reduces (DDP's gradient all-reduce runs
  in C++ and is not in it), and the bytes this rank put into K-FAC's collectives (``KFAC.communication``):
  per factor update, per inverse update, per step; DDP's gradient bytes per step are the parameters'.

Each rank times every repetition between barriers; a repetition's time is the slowest rank's. The
measurements are interleaved within a job (products of all configurations in turn, K-FAC blocks of all
modes in turn), and the 1- and 2-process jobs alternate (1 2 2 1 1 2 ...); figures are medians over all
repetitions of all rounds. The ranks are separate processes started afresh (``python benchmarks/
distributed.py --worker ...``) that meet through a file:// rendezvous; every job has a timeout.

Usage: ``python benchmarks/distributed.py [--quick] [--rounds R] [--repeats N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("MLP 40-256-256-10", "CNN Conv1d")
BACKENDS = ("hessian", "ggn")
MODES = ("replicate", "comm_opt", "mem_opt")


# ---------------------------------------------------------------------- inside a rank
class _AllReduceClock:
    """Seconds spent inside ``torch.distributed.all_reduce`` (curvopt's collectives go through it; DDP's
    gradient buckets do not: they are reduced in C++)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.seconds = 0.0
        self._original = dist.all_reduce

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        dist.all_reduce = timed


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _model(label: str) -> nn.Module:
    from curvopt.models import cnn1d, mlp

    torch.manual_seed(0)  # the same initial weights in every job and on every rank
    return mlp() if label == MODELS[0] else cnn1d()


def _shards(spec: dict, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's contiguous share of each global batch: every job reads the same global data, built once
    by the parent (:func:`global_data`)."""
    X, y = torch.load(spec["data"])
    batch = spec["batch"]
    return [(Xb.chunk(world)[rank], yb.chunk(world)[rank]) for Xb, yb in zip(X.split(batch), y.split(batch))]


def _products(spec: dict, rank: int, world: int, clock: _AllReduceClock) -> list[dict]:
    import curvopt
    from curvopt import distributed

    batches = _shards(spec, rank, world)
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for label in MODELS:
        model = _model(label)
        P = sum(p.numel() for p in model.parameters())
        v = torch.randn(P, generator=torch.Generator().manual_seed(1))
        configs = []
        for backend in BACKENDS:
            for cache in (False, True):
                op = curvopt.curvature(backend, model, loss_fn, batches, cache=cache)
                # the product's norm: 1 and 2 processes must compute the same thing
                norm = float((op @ v).double().norm())  # also the warm-up, which builds the cache
                configs.append((dict(model=label, backend=backend, cache=cache, P=P, norm=norm), op, [], [], []))
        for _ in range(spec["repeats"]):  # interleaved: every configuration once per repetition
            for _, op, seconds, in_collective, collectives in configs:
                _barrier(world)
                count, waited, start = distributed.collective_count(), clock.seconds, time.perf_counter()
                op @ v
                seconds.append(time.perf_counter() - start)
                in_collective.append(clock.seconds - waited)
                collectives.append(distributed.collective_count() - count)
        bare = _bare_all_reduce(P + world, next(model.parameters()).dtype, world, spec["repeats"])
        for row, _, seconds, in_collective, collectives in configs:
            rows.append(dict(row, seconds=seconds, in_collective=in_collective, collectives=collectives,
                             bare_all_reduce=bare))
        del configs
    return rows


def _bare_all_reduce(numel: int, dtype: torch.dtype, world: int, repeats: int) -> list[float]:
    """Seconds of one all-reduce of a product's buffer (the vector and one flag per rank) started together
    after a barrier: the transport without waiting for a slower peer."""
    if world == 1:
        return []
    import torch.distributed as dist

    buffer, out = torch.zeros(numel, dtype=dtype), []
    dist.all_reduce(buffer)
    for _ in range(max(10, repeats)):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        out.append(time.perf_counter() - start)
    return out


def _kfac(spec: dict, rank: int, world: int, clock: _AllReduceClock) -> list[dict]:
    import curvopt

    batches = _shards(spec, rank, world)
    modes = MODES if world > 1 else ("none",)  # one process: no group, ``distribute`` has no effect
    block = spec["inverse_every"]  # one block holds the whole schedule: every block does the same work
    rows = []
    for label in MODELS:
        runs = []
        for mode in modes:
            model = _model(label)
            if world > 1:
                from torch.nn.parallel import DistributedDataParallel

                model = DistributedDataParallel(model)
            options = dict(factor_every=spec["factor_every"], inverse_every=spec["inverse_every"])
            if world > 1:
                options["distribute"] = mode
            opt = curvopt.KFAC(model.parameters(), **options)
            runs.append(dict(mode=mode, model=model, opt=opt, step=0, seconds=[], in_collective=[]))

        def train(run: dict, steps: int) -> None:
            for _ in range(steps):
                X, y = batches[run["step"] % len(batches)]
                run["opt"].zero_grad()
                # the mean over this rank's share: DDP averages equal shares into the global batch's gradient
                nn.functional.cross_entropy(run["model"](X), y).backward()
                run["opt"].step()
                run["step"] += 1

        for run in runs:  # warm-up: the first inverse_every steps invert at every factor update
            train(run, block)
            run["opt"].communication.reset()
        for _ in range(spec["repeats"]):
            for run in runs:
                _barrier(world)
                waited, start = clock.seconds, time.perf_counter()
                train(run, block)
                run["seconds"].append((time.perf_counter() - start) / block)
                run["in_collective"].append((clock.seconds - waited) / block)
        for run in runs:
            log, params = run["opt"].communication, list(run["model"].parameters())
            timed_steps = spec["repeats"] * block
            X = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            with torch.no_grad():  # this rank's share of the global loss (ranks hold replicas)
                loss = nn.functional.cross_entropy(run["model"](X), y, reduction="sum").item()
            rows.append(dict(
                model=label, mode=run["mode"], seconds=run["seconds"], in_collective=run["in_collective"],
                bytes=dict(log.bytes), calls=dict(log.calls), steps=timed_steps, loss_sum=loss,
                samples=len(y), ddp_grad_bytes=sum(p.numel() * p.element_size() for p in params)))
        del runs
    return rows


def _worker(job: Path, rank: int, world: int) -> None:
    """One rank of a job: read the spec, measure, write ``result_<rank>.json``."""
    torch.set_num_threads(1)
    spec = json.loads((job / "spec.json").read_text())
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{job / 'rendezvous'}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=spec["pg_timeout"]))
    clock = _AllReduceClock()  # without a group nothing calls it: zero seconds
    try:
        out = dict(products=_products(spec, rank, world, clock), kfac=_kfac(spec, rank, world, clock))
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    (job / f"result_{rank}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------------- the parent
def global_data(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` training samples of mnist1d (the standard 4000 when ``samples`` <= 4000)."""
    from curvopt.data import mnist1d

    # building the data set takes seconds per 1000 samples: make no more than needed
    data = mnist1d() if samples > 800 else mnist1d(num_samples=-(-samples * 5 // 4))
    if samples > len(data.y_train):
        raise ValueError(f"--samples {samples}: mnist1d has {len(data.y_train)} training samples")
    return data.X_train[:samples], data.y_train[:samples]


def run_job(spec: dict, world: int, timeout: float) -> list[dict]:
    """Run one job on ``world`` fresh processes and return each rank's measurements, in rank order.

    Raises:
        RuntimeError: A rank failed (its stderr's tail in the message) or did not finish within
            ``timeout`` seconds (every rank is then killed).
    """
    with tempfile.TemporaryDirectory(prefix="curvopt_distbench_") as tmp:
        job = Path(tmp)
        (job / "spec.json").write_text(json.dumps(dict(spec, pg_timeout=max(5.0, 0.75 * timeout))))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        procs, logs = [], []
        for rank in range(world):
            log = open(job / f"stderr_{rank}.txt", "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(job), "--rank", str(rank),
                 "--world", str(world)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)))
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            late = [r for r, p in enumerate(procs) if p.poll() is None]
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            tails = []
            for log in logs:
                log.seek(0)
                tails.append(log.read()[-3000:])
                log.close()
        if late:
            raise RuntimeError(f"distributed benchmark: rank(s) {late} of {world} did not finish within "
                               f"{timeout:.0f} s and were killed; raise --timeout if the machine is busy.\n"
                               + "\n".join(tails))
        for rank, p in enumerate(procs):
            if p.returncode != 0:
                raise RuntimeError(f"distributed benchmark: rank {rank} of {world} exited with code "
                                   f"{p.returncode}:\n{tails[rank]}")
        return [json.loads((job / f"result_{rank}.json").read_text()) for rank in range(world)]


def _slowest(per_rank: list[list[float]]) -> list[float]:
    """Per repetition, the largest value over the ranks."""
    return [max(values) for values in zip(*per_rank)]


def _merge(jobs: dict[int, list[list[dict]]]) -> tuple[list[dict], list[dict]]:
    """Rows of both tables from every job's ranks: medians over all repetitions of all rounds."""
    products, kfac = [], []
    one = jobs[1][0][0]  # the layout (models, configurations, modes) is the same in every job
    for i, row in enumerate(one["products"]):
        out = {k: row[k] for k in ("model", "backend", "cache", "P")}
        for world, ranks_of_jobs in jobs.items():
            seconds, share, bare, collectives, norms = [], [], [], set(), []
            for ranks in ranks_of_jobs:
                rows = [r["products"][i] for r in ranks]
                times = _slowest([r["seconds"] for r in rows])
                seconds += times
                share += [c / t for c, t in zip(_slowest([r["in_collective"] for r in rows]), times)]
                bare += _slowest([r["bare_all_reduce"] for r in rows]) if world > 1 else []
                collectives |= {c for r in rows for c in r["collectives"]}
                norms += [r["norm"] for r in rows]
            out[f"products_per_s_{world}"] = 1 / statistics.median(seconds)
            out[f"collectives_per_product_{world}"] = sorted(collectives)
            out[f"norm_{world}"] = (min(norms), max(norms))  # over the ranks and rounds
            if world > 1:
                out[f"all_reduce_share_{world}"] = statistics.median(share)
                out[f"bare_all_reduce_ms_{world}"] = statistics.median(bare) * 1e3
        products.append(out)
    worlds = sorted(jobs)
    for world in worlds:
        for i, row in enumerate(jobs[world][0][0]["kfac"]):
            seconds, share, loss = [], [], []
            for ranks in jobs[world]:
                rows = [r["kfac"][i] for r in ranks]
                times = _slowest([r["seconds"] for r in rows])
                seconds += times
                share += [c / t for c, t in zip(_slowest([r["in_collective"] for r in rows]), times)]
                loss.append(sum(r["loss_sum"] for r in rows) / sum(r["samples"] for r in rows))
            log_bytes, calls, steps = row["bytes"], row["calls"], row["steps"]
            kfac.append(dict(
                model=row["model"], processes=world, distribute=row["mode"],
                steps_per_s=1 / statistics.median(seconds),
                kfac_all_reduce_share=statistics.median(share) if world > 1 else 0.0,
                bytes_per_factor_update=log_bytes["factors"] / calls["factors"] if calls["factors"] else 0,
                bytes_per_inverse_update=log_bytes["inverses"] / calls["inverses"] if calls["inverses"] else 0,
                update_bytes_per_step=log_bytes["updates"] / steps,
                kfac_bytes_per_step=sum(log_bytes.values()) / steps,
                ddp_grad_bytes_per_step=row["ddp_grad_bytes"] if world > 1 else 0,
                loss_after=statistics.median(loss)))
    for row in kfac:  # throughput against one process on the same model
        base = next(r for r in kfac if r["model"] == row["model"] and r["processes"] == 1)
        row["vs_1_process"] = row["steps_per_s"] / base["steps_per_s"]
    return products, kfac


def _kb(nbytes: float) -> str:
    return f"{nbytes / 1024:.1f}" if nbytes else "-"


def print_tables(products: list[dict], kfac: list[dict], header: str) -> None:
    """The two markdown tables."""
    print(header)
    print("\n### Curvature products (1 vs 2 processes, the same global data)\n")
    print("| model | backend | cache | 1 proc [prod/s] | 2 procs [prod/s] | 2 vs 1 | collectives/product "
          "| in all-reduce | bare all-reduce [ms] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in products:
        counts = "/".join(map(str, r["collectives_per_product_2"]))
        print(f"| {r['model']} | `{r['backend']}` | {r['cache']} | {r['products_per_s_1']:.2f} "
              f"| {r['products_per_s_2']:.2f} | {r['products_per_s_2'] / r['products_per_s_1']:.2f} "
              f"| {counts} | {100 * r['all_reduce_share_2']:.1f}% | {r['bare_all_reduce_ms_2']:.2f} |")
    print("\n### K-FAC with DDP, same global batch (bytes: this rank's, into K-FAC's collectives)\n")
    print("| model | procs | distribute | steps/s | vs 1 proc | in K-FAC all-reduce | factors [KiB/update] "
          "| inverses [KiB/update] | updates [KiB/step] | K-FAC [KiB/step] | DDP grads [KiB/step] | loss after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in kfac:
        print(f"| {r['model']} | {r['processes']} | {r['distribute']} | {r['steps_per_s']:.2f} "
              f"| {r['vs_1_process']:.2f} | {100 * r['kfac_all_reduce_share']:.1f}% "
              f"| {_kb(r['bytes_per_factor_update'])} | {_kb(r['bytes_per_inverse_update'])} "
              f"| {_kb(r['update_bytes_per_step'])} | {_kb(r['kfac_bytes_per_step'])} "
              f"| {_kb(r['ddp_grad_bytes_per_step'])} | {r['loss_after']:.4f} |")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per process count, alternated")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per job")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=1000, help="global batch (split over the ranks)")
    parser.add_argument("--factor-every", type=int, default=5)
    parser.add_argument("--inverse-every", type=int, default=20, help="also the steps in one timed block")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    parser.add_argument("--out", default=None, help="folder for results.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(Path(args.worker), args.rank, args.world)
        return {}
    if args.quick:
        args.rounds, args.repeats, args.samples, args.batch = 1, 1, 64, 16
        args.factor_every, args.inverse_every, args.timeout = 1, 2, min(args.timeout, 240)
    if args.batch % 2:
        parser.error(f"--batch {args.batch}: must be even, so that 2 ranks hold equal shares")
    commit = _commit()  # at the start: the library the ranks import is the one of this moment
    jobs: dict[int, list] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="curvopt_distbench_data_") as tmp:
        spec = dict(samples=args.samples, batch=args.batch, repeats=args.repeats, data=str(Path(tmp) / "data.pt"),
                    factor_every=args.factor_every, inverse_every=args.inverse_every)
        torch.save(global_data(args.samples), spec["data"])
        for i in range(args.rounds):
            for world in ((1, 2) if i % 2 == 0 else (2, 1)):
                jobs[world].append(run_job(spec, world, args.timeout))
    products, kfac = _merge(jobs)
    header = (f"# curvopt data parallel, commit {commit}, torch {torch.__version__}, gloo, "
              f"{platform.processor() or platform.machine()} with {os.cpu_count()} cores, 1 thread per rank; "
              f"{args.samples} samples in global batches of {args.batch}; K-FAC factors every "
              f"{args.factor_every} steps, inverses every {args.inverse_every}; medians of {args.rounds} "
              f"round(s) x {args.repeats} repetition(s)")
    print_tables(products, kfac, header)
    result = dict(args={k: v for k, v in vars(args).items() if k not in ("worker", "rank", "world")},
                  commit=commit, torch=torch.__version__, machine=platform.machine(), cores=os.cpu_count(),
                  products=products, kfac=kfac)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        print(f"\nresults: {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
