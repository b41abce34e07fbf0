"""The batch-size benchmark runs (tiny sizes): every schedule, both models and the K-FAC row give a table
row with accuracies, iterations and (for ABS/ABSA) probe costs; the data and GG's milestones follow their rules."""

import math

import torch

from curvopt_tests.benchmarks import load_benchmark


def test_batch_size_benchmark_gg_milestones_reach_the_max_batch():
    module = load_benchmark("batch_size")
    assert module.gg_milestones(32, 2048, 24) == [3, 7, 10, 14, 17, 21]  # six doublings, evenly spread
    for batch, max_batch, epochs in ((32, 256, 24), (32, 4096, 30), (8, 64, 12)):
        ms = module.gg_milestones(batch, max_batch, epochs)
        assert ms == sorted(set(ms)) and 1 <= ms[0] and ms[-1] < epochs
        assert batch * 2 ** len(ms) == max_batch


def test_batch_size_benchmark_quick(tmp_path, capsys):
    module = load_benchmark("batch_size")
    threads = torch.get_num_threads()
    results = module.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    assert results["train_samples"] > 8 * 32  # the largest batch is below an eighth of the training set
    rows = results["rows"]
    expected = [(m, "SGD", s) for m in ("cnn1d", "mlp") for s in module.SCHEDULES] + [("cnn1d", "KFAC", "ABS")]
    assert {(r["model"], r["optimizer"], r["schedule"]) for r in rows} >= set(expected)
    assert len(rows) == 12
    for r in rows:
        assert all(0.0 <= a <= 1.0 for a in r["test_acc"] + r["fgsm_acc"]), r
        assert r["iterations"] > 0 and r["diverged"] == 0, r
        if r["schedule"] in ("ABS", "ABSA"):  # probes ran and were timed
            assert 0 < r["probe_share"] < 1 and r["probe_grads"] > 0, r
            # duration=1 in --quick: each of the two checks grows the batch, 8 -> 16 -> 32, by some reason
            assert r["growths"]["eigenvalue"] + r["growths"]["duration"] == 2, r
        else:
            assert r["probe_share"] is None and r["growths"] is None, r
    by = {(r["model"], r["optimizer"], r["schedule"]): r for r in rows}
    bl, fb = by["cnn1d", "SGD", "BL"], by["cnn1d", "SGD", "FB"]
    assert bl["final_batch"] == [8] and fb["final_batch"] == [32]
    assert fb["iterations"] == 2 * (results["train_samples"] // 32)  # two epochs at the max batch, drop_last
    for run in results["runs"]:  # every run records one check per epoch
        assert len(run.history) == 2 and all(math.isfinite(h["lr"]) for h in run.history)
    out = capsys.readouterr().out
    assert "| model | optimizer | schedule | max batch | test acc %" in out
    assert (tmp_path / "results.json").exists()
    for p in results["plots"]:
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 0
