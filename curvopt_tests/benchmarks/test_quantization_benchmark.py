"""The quantization benchmark runs (tiny sizes): every model gives FP32, uniform, every score's mixed-precision
and random rows at equal size, PTQ and QAT apart, targets, rank correlations and plots; its helpers are right."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvopt_tests.benchmarks import load_benchmark


@given(st.lists(st.integers(-5, 5), min_size=2, max_size=8), st.data())
def test_spearman_matches_pearson_of_average_ranks(xs, data):
    module = load_benchmark("quantization")
    ys = data.draw(st.lists(st.integers(-5, 5), min_size=len(xs), max_size=len(xs)))

    def ranks(v):  # by counting: the average of the 0-based positions a value's ties occupy
        return [sum(u < x for u in v) + (sum(u == x for u in v) - 1) / 2 for x in v]

    rx, ry = torch.tensor(ranks(xs), dtype=torch.float64), torch.tensor(ranks(ys), dtype=torch.float64)
    rho = module.spearman([float(x) for x in xs], [float(y) for y in ys])
    if rx.std() == 0 or ry.std() == 0:
        assert math.isnan(rho)
    else:
        assert rho == pytest.approx(float(torch.corrcoef(torch.stack([rx, ry]))[0, 1]), abs=1e-12)


def test_quantization_benchmark_quick(tmp_path, capsys):
    module = load_benchmark("quantization")
    threads = torch.get_num_threads()
    results = module.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    rows = results["rows"]
    for model in module.MODELS:
        mine = [r for r in rows if r["model"] == model]
        methods = {(r["method"], r["budget"]) for r in mine}
        assert {("fp32", None), ("uniform", None), ("random", 3.0), ("hawq_v2+a8", 3.0)} <= methods, model
        assert {(s, 3.0) for s in module.SCORES} <= methods, model
        weights = results["models"][model]["weights"]
        assert len(results["models"][model]["seeds"][0]["truth"]) == 6  # six quantizable layers
        uniform = {r["w_bits"]: r for r in mine if r["method"] == "uniform"}
        assert sorted(uniform) == [2, 3, 4, 8]
        for r in mine:
            assert all(0.0 <= a <= 1.0 for a in r["ptq"] + r["qat"]), r
            assert r["size_bytes"] == pytest.approx(r["w_bits"] * weights / 8), r
            if r["method"] == "fp32" or r["method"].endswith("+a8") or r["w_bits"] in (2, 4, 8):
                assert r["qat"] == [], r  # QAT reported apart, and only where it ran: at the 3-bit budget
            else:
                assert r["qat"], r
            if r["budget"] is not None:  # mixed precision and random plans within the uniform size
                assert r["size_bytes"] <= uniform[r["budget"]]["size_bytes"], r
        random_row = [r for r in mine if r["method"] == "random"][0]
        assert len(random_row["ptq"]) == 3 * 2 and len(random_row["qat"]) == 1 * 2  # plans x seeds
    assert {(g["model"], g["kind"]) for g in results["targets"]} == {(m, k) for m in module.MODELS
                                                                     for k in ("ptq", "qat")}
    assert all(isinstance(g["met"], bool) for g in results["targets"])
    assert {(r["model"], r["score"]) for r in results["spearman"]} == {(m, s) for m in module.MODELS
                                                                       for s in module.SCORES}
    assert all(t > 0 for r in results["spearman"] for t in r["seconds"])
    out = capsys.readouterr().out
    assert "| model | method | w-bits | PTQ acc % | PTQ + QAT acc % | size (B) | compression |" in out
    assert "Spearman" in out and "target mlp PTQ: HAWQ >= uniform 3-bit + 2 points" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows)
    for p in results["plots"]:
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 0
