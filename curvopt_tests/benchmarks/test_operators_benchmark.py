"""The operator benchmark runs (tiny sizes) and reports a sane table."""

from curvopt_tests.benchmarks import load_benchmark


def test_operators_benchmark_quick(capsys):
    module = load_benchmark("operators")
    results = module.main(["--quick"])
    assert [label for label, _ in results] == ["MLP 40-256-256-10", "CNN Conv1d"]
    for _, rows in results:
        assert [r["backend"] for r in rows] == module.BACKENDS
        for r in rows:  # ratios are positive and finite; no wall-clock bound here
            assert all(0 < r[k] < float("inf") for k in ("product", "cached", "setup", "mm16"))
    assert "hessian" in capsys.readouterr().out
