"""The K-FAC defaults grid runs (tiny sizes), measures every schedule on both models, and chooses by its rule."""

from curvopt_tests.benchmarks import load_benchmark


def test_kfac_defaults_benchmark_quick(capsys):
    module = load_benchmark("kfac_defaults")
    results = module.main(["--quick"])
    assert set(results["costs"]) == {"digits CNN", "mnist1d CNN"}
    for by_schedule in results["costs"].values():
        assert set(by_schedule) == {"1/10", "10/100"}
        for cost in by_schedule.values():
            lo, hi = cost["vs Adam range"]
            assert cost["K-FAC_ms"] > 0 and cost["Adam_ms"] > 0 and lo <= cost["vs Adam"] <= hi
    assert len(results["grid"]) == 2
    for row in results["grid"]:
        assert all(0.0 <= a <= 1.0 for a in row["test"]) and len(row["test"]) == 1
    assert "(c) " in capsys.readouterr().out


def test_choice_needs_both_targets_then_prefers_the_worst_seed_then_the_cheaper_schedule():
    module = load_benchmark("kfac_defaults")
    costs = {"a": {(1, 10): {"vs Adam": 3.0}, (10, 100): {"vs Adam": 1.3}, (20, 200): {"vs Adam": 1.1}},
             "b": {(1, 10): {"vs Adam": 2.0}, (10, 100): {"vs Adam": 1.4}, (20, 200): {"vs Adam": 1.2}}}

    def row(schedule, test):
        return {"schedule": list(schedule), "test": test}

    too_slow = row((1, 10), [0.99, 0.99])
    one_bad_seed = row((10, 100), [0.99, 0.96])
    good = row((10, 100), [0.98, 0.985])
    as_good_cheaper = row((20, 200), [0.985, 0.98])
    rows = [too_slow, one_bad_seed, good, as_good_cheaper]
    assert module.choose(rows, costs, 1.5, 0.97) is as_good_cheaper
    assert module.choose(rows[:3], costs, 1.5, 0.97) is good
    assert module.choose(rows[:2], costs, 1.5, 0.97) is None
    # worst seeds one test sample apart are a tie: the cheaper schedule wins; two steps apart, accuracy wins
    tie = [row((10, 100), [0.983, 0.99]), row((20, 200), [0.981, 0.981])]
    assert module.choose(tie, costs, 1.5, 0.97) is tie[1]
    better = [row((10, 100), [0.99, 0.99]), row((20, 200), [0.981, 0.981])]
    assert module.choose(better, costs, 1.5, 0.97) is better[0]
