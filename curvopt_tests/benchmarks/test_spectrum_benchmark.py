"""The spectrum benchmark runs (tiny sizes) and its figures are consistent."""

from curvopt_tests.benchmarks import load_benchmark


def test_spectrum_benchmark_quick(capsys):
    module = load_benchmark("spectrum")
    results = module.main(["--quick"])
    assert set(results) == {"MLP 40-256-256-10", "CNN Conv1d"}
    for row in results.values():
        ref = row["ref_top5"]
        assert ref == sorted(ref, reverse=True)
        assert len(row["lanczos_top1"]) == 2 and all(n is not None and n >= 1 for n in row["lanczos_top1"])
        assert row["per_block_sum_gap"] < 1e-6 * abs(row["trace_ref"][0]) + 1e-6
        assert set(row["trace_rms"]) == {"hutchinson", "hutchpp"}
    assert "(d) per-layer traces" in capsys.readouterr().out
