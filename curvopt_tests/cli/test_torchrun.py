"""``torchrun --nproc_per_node=2 -m curvopt train|analyze``: gloo on the CPU, each rank its shard of the data,
rank 0 alone prints and writes; analyze equals one process. Refusals come before the ranks meet."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from curvopt.cli import main
from curvopt.cli.launch import check_replicas, current_launch, shard
from curvopt.errors import CurvoptError, DistributedError
from curvopt_tests.cli.configs import write_config as _write
from curvopt_tests.distributed_harness import run_ranks

ANALYZE = """
[model]
arch = "mlp"
train_epochs = 1
[data]
dataset = "digits"
samples = 301
batch_size = 64
[curvature]
backend = "{backend}"
[estimators]
top_k = 2
trace_probes = 4
[output]
progress = false
plots = false
"""
TRAIN = """
[model]
arch = "mlp"
[data]
dataset = "digits"
batch_size = 64
[optimizer]
name = "{name}"
[train]
epochs = 2
[output]
progress = false
"""


def _torchrun(*args: str, module: str = "curvopt") -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m MODULE ARGS`` (a free port of its own choosing), bounded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", module, *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_shards_are_contiguous_and_cover_every_sample_once():
    for n in (0, 1, 5, 301):
        for world in (1, 2, 3):
            parts = [range(n)[shard(n, r, world)] for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.distributed
def test_analyze_on_two_ranks_equals_one_process(tmp_path, capsys):
    # 301 samples: shards of 151 and 150 in batches of 64 (3 per rank, short last ones), one process has 5
    cfg = _write(tmp_path, ANALYZE.format(backend="ggn"))
    assert main(["analyze", "--config", cfg, "--out", str(tmp_path / "one")]) == 0
    done = _torchrun("analyze", "--config", cfg, "--out", str(tmp_path / "two"))
    assert done.stdout.count("top-2 eigenvalues of the ggn") == 1  # rank 0 alone prints
    assert "3 batches per rank, 2 ranks" in done.stdout
    one = json.loads((tmp_path / "one" / "analysis.json").read_text())
    two = json.loads((tmp_path / "two" / "analysis.json").read_text())
    # float32 model: the same sums in another order
    assert two["top_eigenvalues"] == pytest.approx(one["top_eigenvalues"], rel=1e-5)
    assert two["trace"] == pytest.approx(one["trace"], rel=1e-5)
    assert two["trace_se"] == pytest.approx(one["trace_se"], rel=1e-4)
    for name, layer in one["sensitivity"]["layers"].items():
        assert two["sensitivity"]["layers"][name]["trace"] == pytest.approx(layer["trace"], rel=1e-4, abs=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("name", [pytest.param("adam", marks=pytest.mark.slow), "kfac"])
def test_train_on_two_ranks_writes_one_set_of_outputs(tmp_path, name):
    cfg = _write(tmp_path, TRAIN.format(name=name))
    done = _torchrun("train", "--config", cfg, "--out", str(tmp_path / "run"))
    assert done.stdout.count(f"with {name}") == 1 and "2 ranks: effective batch 128" in done.stdout
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and {r["batch_size"] for r in rows} == {"128"}
    # digits has 1437 training samples: DistributedSampler gives each rank ceil(1437 / 2) = 719, 12 steps of 64
    assert [int(r["iterations"]) for r in rows] == [12, 24]
    assert float(rows[-1]["test_acc"]) > 0.5
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert "0.weight" in state and sorted(os.listdir(tmp_path / "run")) == ["metrics.csv", "model.pt"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["newton_mr", pytest.param("trust_region", marks=pytest.mark.slow),
                                  pytest.param("arc", marks=pytest.mark.slow)])
def test_newton_type_optimizers_train_on_two_ranks_and_every_rank_ends_with_the_same_weights(tmp_path, name):
    # each rank's closure is over its own share of the batch; the optimizer combines the ranks (DDP's
    # average takes no part), so every rank takes the same step: the replicas agree to the last bit
    cfg = _write(tmp_path, TRAIN.format(name=name))
    done = _torchrun("train", "--config", cfg, "--out", str(tmp_path / "run"),
                     module="curvopt_tests.cli.torchrun_weights")
    assert done.stdout.count(f"with {name}") == 1 and "2 ranks: effective batch 128" in done.stdout
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["iterations"]) for r in rows] == [12, 24]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) and float(rows[-1]["test_acc"]) > 0.5
    ranks = [torch.load(tmp_path / "run" / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert list(ranks[0]) == list(ranks[1]) == list(saved)
    for key in saved:
        assert torch.equal(ranks[0][key], ranks[1][key]) and torch.equal(ranks[0][key], saved[key]), key


@pytest.mark.parametrize("command,text,message", [
    # a config train cannot run (the Newton-type optimizers, refused here before, now run on several ranks)
    ("train", "[schedule]\nname = 'gg'\noptions = { milestones = [1] }\n",
     "[schedule] name = 'gg' needs max_batch_size"),
    ("quantize", "", "quantize runs in one process"),
])
def test_what_cannot_run_on_several_ranks_is_refused_before_they_meet(tmp_path, capsys, monkeypatch, command,
                                                                      text, message):
    import curvopt.cli as cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "process_group", lambda: pytest.fail("the ranks met before the refusal"))
    assert main([command, "--config", _write(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("curvopt: error (rank 1): ") and err.count("\n") == 1, err


@pytest.mark.distributed
@pytest.mark.slow
def test_the_example_runs_under_torchrun(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "distributed.toml"
    done = _torchrun("train", "--config", str(example), "--out", str(tmp_path / "run"))
    assert "with kfac" in done.stdout and (tmp_path / "run" / "model.pt").exists()


def _replica_checks(rank, world):
    """The replica check on equal weights, then with rank 1's moved by a relative 1e-3: what each rank saw."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    seen = []
    for step in ("same", "moved"):
        if step == "moved" and rank == 1:
            with torch.no_grad():
                model.weight.mul_(1 + 1e-3)
        try:
            check_replicas(model, current_launch(), "sgd")
            seen.append(None)
        except DistributedError as e:
            seen.append(str(e))
    return seen


@pytest.mark.distributed
def test_replicas_that_differ_raise_a_distributed_error_on_every_rank():
    assert issubclass(DistributedError, CurvoptError)  # main() reports it in one line, exit status 2
    results = run_ranks(_replica_checks, 2, timeout=60)
    for same, moved in results:
        assert same is None
        assert moved is not None and "the weights of the 2 ranks differ (relative 0.001)" in moved
        assert "optimizer 'sgd'" in moved
