"""Command line: ``curvopt analyze | train | quantize [--config FILE.toml] [--out DIR]`` (also under ``torchrun``).

With no config, ``analyze`` trains a small CNN on the embedded mnist1d data for a few epochs, then prints the
top eigenvalues of the configured curvature (the Hessian by default), its trace with the standard error and
the per-layer sensitivity table, and writes the spectral density and loss-landscape plots. ``train`` trains
with the optimizer named in the config (and a batch-size schedule) and writes per-epoch metrics and the
weights. ``quantize`` runs Hessian-aware mixed-precision quantization (HAWQ) end to end: sensitivity, bit
allocation at one or several budgets, and mixed against uniform and random precision at equal size. Every
value of a config, and the checkpoint, is checked before any computation: bad configuration ends with a
one-line error and exit status 2.

One module per job: :mod:`~curvopt.cli.config` (the configs, one dataclass per TOML table, validated),
:mod:`~curvopt.cli.launch` (``torchrun``: process group, shards, replicas), :mod:`~curvopt.cli.common` (data,
model, checkpoint), :mod:`~curvopt.cli.analysis`, :mod:`~curvopt.cli.training` and
:mod:`~curvopt.cli.quantization` (the commands; :mod:`~curvopt.cli.quantize_report` prints and draws
``quantize``'s results), and :func:`main` here. The commands look up ``_dataset``, ``_train`` and
``_make_schedule`` on this package at call time, so a stand-in put here (tests do) takes effect.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from curvopt.cli.analysis import analyze
from curvopt.cli.common import _dataset as _dataset  # re-exported: seams (see above) and test helpers
from curvopt.cli.common import _model as _model
from curvopt.cli.common import _train as _train
from curvopt.cli.config import (
    ARCHS,
    DATASETS,
    DEFAULTS,
    LOSSES,
    QUANTIZE_DEFAULTS,
    TRAIN_DEFAULTS,
    AnalyzeConfig,
    QuantizeConfig,
    TrainConfig,
    load_config,
)
from curvopt.cli.launch import process_group, requested_world
from curvopt.cli.quantization import quantize
from curvopt.cli.training import _check_schedule, train
from curvopt.cli.training import _make_schedule as _make_schedule
from curvopt.errors import ConfigError, CurvoptError
from curvopt.quant.allocate import METHODS as ALLOCATION_METHODS


def main(argv: list[str] | None = None) -> int:
    """Run ``curvopt COMMAND`` with the arguments ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 after a one-line error (a bad config, a checkpoint that does not fit, a
        command that cannot run on the ranks launched).
    """
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
