"""The operator benchmark runs (tiny sizes) and reports a sane table."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_operators_benchmark_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_ops", ROOT / "benchmarks" / "operators.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick"])
    assert [label for label, _ in results] == ["MLP 40-256-256-10", "CNN Conv1d"]
    for _, rows in results:
        assert [r["backend"] for r in rows] == module.BACKENDS
        for r in rows:  # ratios are positive and finite; no wall-clock bound here
            assert all(0 < r[k] < float("inf") for k in ("product", "cached", "setup", "mm16"))
    assert "hessian" in capsys.readouterr().out
