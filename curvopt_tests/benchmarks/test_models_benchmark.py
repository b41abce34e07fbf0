"""The sequence-model benchmark runs (tiny sizes): every backend works on both models, and the
K-FAC/Adam comparison gives both optimizers the same tuning budget."""

import math

from curvopt_tests.benchmarks import load_benchmark


def test_models_benchmark_grids_are_equal_budgets():
    module = load_benchmark("models")
    for configs in (1, 3, 4, 6):
        grids = module.grids(configs)
        assert set(grids) == {"KFAC", "Adam"}
        assert {len(g) for g in grids.values()} == {configs}
        assert all(len({tuple(sorted(hp.items())) for hp in g}) == configs for g in grids.values())


def test_models_benchmark_quick(capsys):
    module = load_benchmark("models")
    results = module.main(["--quick"])
    assert list(results) == ["transformer", "LSTM"]
    for label, r in results.items():
        assert [row["backend"] for row in r["products"]] == module.BACKENDS
        for row in r["products"]:  # every backend works on these models; ratios positive, no wall-clock bound
            assert row["error"] is None, (label, row)
            assert all(0 < row[k] < math.inf for k in ("product", "cached", "setup")), (label, row)
        for row in r["spectral"]:
            assert row["error"] is None, (label, row)
            assert row["eig_products"] > 0 and row["eig_grads"] > 0 and row["trace_grads"] > 0
            assert math.isfinite(row["eigenvalue"]) and row["blocks"] == (16 if label == "transformer" else 2)
        for name in ("KFAC", "Adam"):
            race = r["race"][name]
            assert 0.0 <= race["final"] <= 1.0 and race["steps"] > 0
    out = capsys.readouterr().out
    assert "| backend | product (cache=False)" in out and "K-FAC against Adam" in out
