"""The race benchmark runs (tiny sizes), gives every optimizer the same budget, and selects sanely."""

from curvopt_tests.benchmarks import load_benchmark


def test_race_benchmark_quick(capsys):
    module = load_benchmark("race")
    grids = module.grids(6)
    assert {len(configs) for configs in grids.values()} == {6}  # equal tuning budgets
    results = module.main(["--quick"])
    for model in ("MLP 40-256-256-10", "CNN Conv1d"):
        for name in ("KFAC", "Adam", "SGD"):
            row = results[model][name]
            assert 0.0 <= row["final"] <= 1.0 and row["steps"] > 0 and row["seconds"] > 0
        cost = results[model]["step_cost"]
        assert min(cost["ratio"], cost["precondition_ms"], cost["sgd_ms"], cost["adam_ms"]) > 0
        assert cost["ratio_range"][0] <= cost["ratio"] <= cost["ratio_range"][1] and cost["floor"] > 0
    assert set(results["batch_scaling"]) == {64, 256}
    assert "(c) CNN iterations" in capsys.readouterr().out


def test_selection_prefers_fewest_epochs_then_final_accuracy():
    module = load_benchmark("harness")
    slow = module.Run({"lr": 1}, [(1.0, 10, 1.0, 0.5, 0.5), (2.0, 20, 2.0, 0.96, 0.95)])
    fast = module.Run({"lr": 2}, [(1.0, 10, 1.0, 0.96, 0.94), (2.0, 20, 2.0, 0.90, 0.91)])
    never = module.Run({"lr": 3}, [(1.0, 10, 1.0, 0.80, 0.80), (2.0, 20, 2.0, 0.94, 0.94)])
    assert module.select([slow, fast, never], 0.95).hp == {"lr": 2}
    assert module.select([never], 0.95).hp == {"lr": 3}
    assert fast.first(0.95, module.TEST) is None and slow.first(0.95, module.TEST)[0] == 2.0
