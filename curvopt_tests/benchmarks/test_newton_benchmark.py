"""The Newton benchmark runs (tiny sizes) with equal grids per method and consistent figures."""

from curvopt_tests.benchmarks import load_benchmark


def test_newton_benchmark_quick(capsys):
    module = load_benchmark("newton")
    full = module.methods(10, quick=False)
    assert {len(grid) for _, grid in full.values()} == {6}  # the same tuning grid size per method
    assert {"NewtonMR hessian", "TrustRegion ggn", "ARC hessian", "SGD", "Adam"} <= set(full)
    results = module.main(["--quick", "--models", "MLP 40-256-256-10"])
    rows = results["MLP 40-256-256-10"]
    assert set(rows) == set(full)
    for row in rows.values():
        assert 0.0 <= row["robustness"] <= 1.0 and 0.0 <= row["best_test"] <= 1.0
        if row["epochs"] is not None:
            assert row["grad_equivalents"] > 0 and row["seconds"] > 0
    assert "grid reaching" in capsys.readouterr().out


def test_newton_defaults_table_quick(capsys):
    module = load_benchmark("newton")
    results = module.main(["--defaults", "--quick"])
    assert set(results["defaults"]) == set(module.DEFAULTS_GRID) == {"NewtonMR", "TrustRegion", "ARC"}
    for name, row in results["defaults"].items():
        assert len(row["accuracies"]) == 1 and 0.0 <= row["worst"] <= 1.0
        assert row["target_met"] == (row["worst"] >= module.DEFAULTS_TARGET)
        assert {} in [r["options"] for r in results["grid"][name]]  # the defaults are a row of the grid
    out = capsys.readouterr().out
    assert "(a) candidate settings" in out and "(b) the defaults" in out
