"""allocate_bits / uniform_plan / random_plans: optimality against exhaustive enumeration, exact size
accounting, the Pareto frontier, fixed layers and ties, and every bad input."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvopt
import curvopt.quant.allocate as allocate_mod
from curvopt.errors import BudgetError, OptionError, QuantizationError
from curvopt.quant import BitPlan, allocate_bits, random_plans, uniform_plan
from curvopt.quant import baselines as baselines_mod
from curvopt.quant.fake import fake_quantized
from curvopt.quant.plan import plan_bits

# --------------------------------------------------------------------------------------- enumeration reference


def enumerate_plans(sizes, bits, fixed=None, ties=()):
    """Every allocation honouring ``fixed`` and ``ties``, as ``{name: bits}``."""
    fixed = fixed or {}
    names = list(sizes)
    choices = [[fixed[n]] if n in fixed else list(bits) for n in names]
    for combo in itertools.product(*choices):
        plan = dict(zip(names, combo))
        if all(plan[a] == plan[b] for t in ties for a in t for b in t):
            yield plan


def size_of(sizes, plan):
    return sum(sizes[n] * b for n, b in plan.items())


def cost_of(scores, plan, fixed=()):
    return math.fsum(scores[n][b] for n, b in plan.items() if n in scores and b in scores[n])


@st.composite
def instances(draw, with_fixed_and_ties=True):
    n = draw(st.integers(2, 5))
    names = [f"l{i}" for i in range(n)]
    bits = sorted(draw(st.sets(st.integers(2, 8), min_size=1, max_size=4)))
    sizes = {nm: draw(st.integers(1, 60)) for nm in names}
    scores = {nm: {b: draw(st.floats(0, 10, allow_nan=False, allow_infinity=False)) for b in bits} for nm in names}
    fixed, ties = {}, []
    if with_fixed_and_ties and draw(st.booleans()):
        fixed[names[0]] = draw(st.integers(2, 8))
    if with_fixed_and_ties and n >= 3 and draw(st.booleans()):
        ties = [(names[1], names[2])]
    frac = draw(st.floats(0, 1))
    return sizes, bits, scores, fixed, ties, frac


def budget_between(sizes, bits, fixed, ties, frac):
    totals = [size_of(sizes, p) for p in enumerate_plans(sizes, bits, fixed, ties)]
    return min(totals) + math.floor(frac * (max(totals) - min(totals)))


def assert_feasible(plan, sizes, bits, fixed, ties, budget_bits):
    assert set(plan.bits) == set(sizes)
    assert plan.size_bits == size_of(sizes, plan.bits) <= budget_bits
    for n, b in plan.bits.items():
        assert b == fixed[n] if n in fixed else b in bits
    for a, b in ties:
        assert plan.bits[a] == plan.bits[b]


# --------------------------------------------------------------------------------------- optimality


@given(instances())
def test_ilp_and_pareto_are_optimal_against_enumeration(inst):
    sizes, bits, scores, fixed, ties, frac = inst
    budget = budget_between(sizes, bits, fixed, ties, frac)
    best = min(cost_of(scores, p) for p in enumerate_plans(sizes, bits, fixed, ties)
               if size_of(sizes, p) <= budget)
    scale = max(max(r.values()) for r in scores.values())
    for method in ("ilp", "pareto"):
        plan = allocate_bits(sizes, scores, bits=bits, size_bytes=budget / 8, fixed=fixed, ties=ties,
                             method=method)
        assert_feasible(plan, sizes, bits, fixed, ties, budget)
        assert plan.objective == pytest.approx(cost_of(scores, plan.bits), rel=1e-12, abs=1e-12)
        # The DP is exact; HiGHS stops at an absolute gap of 1e-6 on scores scaled to [0, 1].
        tol = 1e-12 * (1 + scale) if method == "pareto" else 1e-6 * scale + 1e-12
        assert plan.objective <= best + tol


@given(instances(with_fixed_and_ties=False), st.floats(0, 1), st.floats(0, 1), st.data())
def test_ilp_with_bops_and_latency_budgets_is_optimal_against_enumeration(inst, fb, fl, data):
    sizes, bits, scores, _, _, frac = inst
    macs = {n: data.draw(st.integers(0, 100)) for n in sizes}
    table = {n: {b: data.draw(st.floats(0, 1)) for b in bits} for n in sizes}
    plans = list(enumerate_plans(sizes, bits))
    bops = [sum(macs[n] * b * 8 for n, b in p.items()) for p in plans]
    lat = [math.fsum(table[n][b] for n, b in p.items()) for p in plans]
    size_budget = budget_between(sizes, bits, {}, (), frac)
    bops_budget = min(bops) + fb * (max(bops) - min(bops))
    lat_budget = min(lat) + fl * (max(lat) - min(lat))
    lat_budget += 1e-12

    def fits(i, slack):  # slack: the solver's feasibility tolerance on float rows
        return (size_of(sizes, plans[i]) <= size_budget and bops[i] <= bops_budget * (1 + slack)
                and lat[i] <= lat_budget * (1 + slack))

    ok = [i for i in range(len(plans)) if fits(i, 0.0)]
    kwargs = dict(bits=bits, size_bytes=size_budget / 8, bops=bops_budget, macs=macs, latency=lat_budget,
                  latency_table=table)
    if not any(fits(i, 1e-6) for i in range(len(plans))):
        with pytest.raises(BudgetError, match="together"):
            allocate_bits(sizes, scores, **kwargs)
        return
    plan = allocate_bits(sizes, scores, **kwargs)
    if not ok:  # feasible only within the solver's tolerance: either answer is right
        return
    best = min(cost_of(scores, plans[i]) for i in ok)
    assert_feasible(plan, sizes, bits, {}, (), size_budget)
    assert plan.bops == pytest.approx(sum(macs[n] * b * 8 for n, b in plan.bits.items()))
    assert plan.bops <= bops_budget * (1 + 1e-6) and plan.latency <= lat_budget * (1 + 1e-6)
    assert plan.objective <= best + 1e-6 * max(max(r.values()) for r in scores.values()) + 1e-12


@given(instances())
def test_pareto_frontier_is_monotone_and_each_point_optimal_for_its_size(inst):
    sizes, bits, scores, fixed, ties, _ = inst
    all_plans = list(enumerate_plans(sizes, bits, fixed, ties))
    top = max(size_of(sizes, p) for p in all_plans)
    plan = allocate_bits(sizes, scores, bits=bits, size_bytes=top / 8, fixed=fixed, ties=ties)
    front = plan.pareto
    assert front[0].size_bits == min(size_of(sizes, p) for p in all_plans)
    for a, b in zip(front, front[1:]):
        assert a.size_bits < b.size_bits and a.objective > b.objective  # larger size never scores worse
    for p in front:
        assert p.size_bits == size_of(sizes, p.bits) and p.size_bytes == p.size_bits / 8
        assert p.objective == pytest.approx(cost_of(scores, p.bits), rel=1e-12, abs=1e-12)
        best = min(cost_of(scores, q) for q in all_plans if size_of(sizes, q) <= p.size_bits)
        assert p.objective == pytest.approx(best, rel=1e-12, abs=1e-12)
    # Every allocation is matched or beaten by a frontier point no larger than it.
    for q in all_plans:
        assert any(p.size_bits <= size_of(sizes, q) and p.objective <= cost_of(scores, q) + 1e-12 for p in front)


def test_pareto_method_takes_the_largest_frontier_point_within_budget():
    sizes = {"a": 10, "b": 20, "c": 30}
    scores = {n: {2: 9.0 * (i + 1), 4: 3.0 * (i + 1), 8: 1.0 * (i + 1)} for i, n in enumerate(sizes)}
    budget = 4 * 60
    plan = allocate_bits(sizes, scores, bits=(2, 4, 8), size_bytes=budget / 8, method="pareto")
    within = [p for p in plan.pareto if p.size_bits <= budget]
    assert plan.size_bits == max(p.size_bits for p in within)
    assert plan.bits == max(within, key=lambda p: p.size_bits).bits
    assert plan.method == "pareto"


def test_frontier_beyond_the_cap_is_merged_and_flagged_and_the_plan_stays_exact(monkeypatch):
    sizes = {f"l{i}": 3 + 7 * i for i in range(6)}
    scores = {n: {2: 5.0 + i, 3: 2.0 + i / 2, 4: 1.0, 8: 0.1} for i, n in enumerate(sizes)}
    exact = {m: allocate_bits(sizes, scores, average_bits=3.5, method=m) for m in ("ilp", "pareto")}
    assert exact["ilp"].pareto_exact and exact["ilp"].to_dict()["pareto_exact"] is True
    monkeypatch.setattr(allocate_mod, "MAX_PARETO_POINTS", 5)
    for method in ("ilp", "pareto"):
        plan = allocate_bits(sizes, scores, average_bits=3.5, method=method)
        assert not plan.pareto_exact and len(plan.pareto) < len(exact[method].pareto)
        # The plan itself is the exact optimum within budget, and one of the frontier's points.
        assert plan.objective == pytest.approx(exact[method].objective, rel=1e-12)
        assert (plan.size_bits, plan.bits) in [(p.size_bits, p.bits) for p in plan.pareto]
        front = plan.pareto
        assert front[0].size_bits == exact[method].pareto[0].size_bits  # the smallest allocation stays on it
        for a, b in zip(front, front[1:]):
            assert a.size_bits < b.size_bits and a.objective > b.objective
        for p in front:  # still real allocations with their true scores
            assert p.size_bits == size_of(sizes, p.bits)
            assert p.objective == pytest.approx(cost_of(scores, p.bits), rel=1e-12)


# --------------------------------------------------------------------------------------- size accounting


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 5, 3)
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 7)
        self.head = nn.Linear(7, 11, bias=False)
        self.register_buffer("stat", torch.zeros(4))


def flat_scores(names, bits=(2, 3, 4, 8)):
    return {n: {b: 1.0 / b for b in bits} for n in names}


def test_size_accounting_is_exact_on_a_model():
    model = Net()
    numel = {"emb": 66, "conv": 90, "fc": 35, "head": 77}
    plan = allocate_bits(model, flat_scores(numel), bits=(2, 3, 4, 8), average_bits=3.0)
    assert plan.numel == numel and list(plan.bits) == list(numel)
    assert plan.size_bits == sum(numel[n] * b for n, b in plan.bits.items())
    assert plan.size_bits <= 3 * sum(numel.values())
    assert plan.size_bytes == plan.size_bits / 8
    assert plan.average_bits == plan.size_bits / 268
    # Biases and the norm's scale and shift in fp32; buffers, the quantized weights and scales are not counted.
    assert plan.other_bytes == 4 * (5 + 7 + 5 + 5)
    uni = uniform_plan(model, 3)
    assert uni.size_bits == 3 * 268 and uni.size_bytes == 100.5 and uni.average_bits == 3.0
    assert math.isnan(uni.objective) and uni.other_bytes == plan.other_bytes
    # The plan is what fake_quantized takes.
    assert plan_bits(plan) == plan.bits
    before = [p.detach().clone() for p in model.parameters()]
    with fake_quantized(model, plan):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_shared_weight_is_counted_once_and_its_modules_tied():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    scores = {"0": {2: 0.0, 8: 0.0}, "1": {2: 100.0, 8: 0.0}}
    plan = allocate_bits(model, scores, bits=(2, 8), average_bits=8.0)
    assert plan.numel == {"0": 40, "1": 0} and plan.bits == {"0": 8, "1": 8}
    assert plan.size_bits == 320 and plan.other_bytes == 0


def test_budget_boundary_is_inclusive_and_round_trips_through_average_bits():
    sizes = {"a": 3, "b": 7, "c": 11}
    scores = {n: {2: 3.0, 3: 2.0, 4: 1.0, 8: 0.0} for n in sizes}
    for target in ({"a": 3, "b": 3, "c": 3}, {"a": 8, "b": 2, "c": 3}, {"a": 4, "b": 8, "c": 2}):
        exact = size_of(sizes, target)
        avg = exact / sum(sizes.values())  # rounded in floating point
        plan = allocate_bits(sizes, scores, average_bits=avg)
        assert plan.size_bits <= exact
        assert allocate_bits(sizes, scores, average_bits=plan.average_bits).size_bits == plan.size_bits
        assert allocate_bits(sizes, scores, size_bytes=plan.size_bytes).size_bits == plan.size_bits
    # Both at 3 bits fills 3.0 bits/weight exactly and is the best within it; one bit less would cost 11.
    plan = allocate_bits({"a": 1, "b": 1}, {n: {2: 10.0, 3: 1.0, 4: 0.0} for n in "ab"}, bits=(2, 3, 4),
                         average_bits=3.0)
    assert plan.bits == {"a": 3, "b": 3} and plan.size_bits == 6 and plan.objective == 2.0


def test_to_dict_is_plain_json():
    plan = allocate_bits({"a": 5, "b": 9}, flat_scores("ab"), average_bits=4.0,
                         macs={"a": 10, "b": 20}, latency_table={"a": {b: 0.1 * b for b in (2, 3, 4, 8)},
                                                                 "b": {b: 0.2 * b for b in (2, 3, 4, 8)}})
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["bits"] == plan.bits and d["size_bits"] == plan.size_bits and d["size_bytes"] == plan.size_bytes
    assert d["bops"] == pytest.approx(sum(m * plan.bits[n] * 8 for n, m in {"a": 10, "b": 20}.items()))
    assert d["latency"] == pytest.approx(0.1 * plan.bits["a"] + 0.2 * plan.bits["b"])
    assert len(d["pareto"]) == len(plan.pareto) and set(d["pareto"][0]) >= {"size_bytes", "objective", "bits"}
    assert "a" in str(plan) and isinstance(plan, BitPlan)


# --------------------------------------------------------------------------------------- fixed, ties, reports


def test_fixed_and_ties_are_respected():
    sizes = {"first": 10, "mid1": 50, "mid2": 50, "short": 5, "last": 10}
    scores = {n: {2: 10.0, 4: 1.0, 8: 0.0} for n in sizes}
    scores["mid1"] = {2: 0.0, 4: 0.0, 8: 0.0}  # alone it would take 2 bits; tied to short it may not
    free = {n: s for n, s in scores.items() if n not in ("first", "last")}
    untied = allocate_bits(sizes, free, bits=(2, 4, 8), average_bits=4.0, fixed={"first": 8, "last": 8})
    assert untied.bits == {"first": 8, "mid1": 2, "mid2": 4, "short": 8, "last": 8} and untied.objective == 1.0
    plan = allocate_bits(sizes, free, bits=(2, 4, 8), average_bits=4.0, fixed={"first": 8, "last": 8},
                         ties=[("mid1", "short")])
    assert plan.bits["first"] == plan.bits["last"] == 8 and plan.bits["mid1"] == plan.bits["short"]
    assert plan.size_bits <= 4 * 125 and plan.objective == 11.0
    # A fixed width outside bits= is allowed; its score counts when given.
    plan = allocate_bits({"a": 4, "b": 4}, {"a": {2: 1.0, 4: 0.5}, "b": {6: 7.0}}, bits=(2, 4), average_bits=5.0,
                         fixed={"b": 6})
    assert plan.bits == {"a": 4, "b": 6} and plan.objective == 7.5
    # A layer tied to a fixed one follows it and needs no score.
    plan = allocate_bits({"a": 4, "b": 4, "c": 4}, {"c": {2: 1.0, 4: 0.0}}, bits=(2, 4), average_bits=6.0,
                         fixed={"a": 8}, ties=[("a", "b")])
    assert plan.bits == {"a": 8, "b": 8, "c": 2}


class FakeReport:
    """Stands in for a SensitivityReport: allocate_bits only calls score_table."""

    def __init__(self):
        self.calls = []

    def score_table(self, model, bits, quantizer=None):
        self.calls.append((model, tuple(bits), quantizer))
        return {n: {b: float(m.weight.numel()) / b ** 2 for b in bits}
                for n, m in model.named_modules() if n and hasattr(m, "weight") and m.weight.dim() >= 2}


def test_a_sensitivity_report_is_asked_for_its_score_table():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    report, q = FakeReport(), object()
    plan = allocate_bits(model, report, bits=(2, 4), average_bits=5.0, fixed={"2": 8}, quantizer=q)
    assert report.calls == [(model, (2, 4), q), (model, (8,), q)]  # the pinned width asked for apart
    assert plan.bits == {"0": 2, "2": 8} and plan.objective == pytest.approx(32 / 4 + 24 / 64)
    with pytest.raises(QuantizationError, match="pass the model"):
        allocate_bits({"0": 32, "2": 24}, report, average_bits=3.0)


@pytest.mark.filterwarnings("ignore:sensitivity.*is negative")  # an untrained model's indefinite block
def test_end_to_end_with_a_real_sensitivity_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    data = (torch.randn(64, 6), torch.randint(0, 3, (64,)))
    report = curvopt.sensitivity(model, data, nn.CrossEntropyLoss(), probes=8)
    table = report.score_table(model, (2, 3, 4, 8))
    plan = allocate_bits(model, report, average_bits=3.5, fixed={"4": 8})
    assert set(plan.bits) == {"0", "2", "4"} and plan.bits["4"] == 8 and plan.size_bits <= 3.5 * 136
    assert plan.objective == pytest.approx(math.fsum(table[n][b] for n, b in plan.bits.items()), rel=1e-12)
    sizes = {"0": 48, "2": 64, "4": 24}
    best = min(cost_of(table, p) for p in enumerate_plans(sizes, (2, 3, 4, 8), {"4": 8})
               if size_of(sizes, p) <= 3.5 * 136)
    assert plan.objective <= best + 1e-6 * max(max(r.values()) for r in table.values())
    with fake_quantized(model, plan):
        pass


# --------------------------------------------------------------------------------------- baselines


def test_random_plans_are_uniform_over_the_window_below_the_closest_reachable_size():
    sizes = {"a": 3, "b": 5, "c": 7}
    bits = (2, 3, 4, 8)
    budget = 50
    every = list(enumerate_plans(sizes, bits))
    top = max(size_of(sizes, p) for p in every if size_of(sizes, p) <= budget)
    window = 0.1  # 5 bits: sizes 44..49 here
    inside = [p for p in every if top - 5 <= size_of(sizes, p) <= top]
    plans = random_plans(sizes, bits, budget, 3000, seed=0, window=window)
    counts = {tuple(p.values()): 0 for p in inside}
    for p in plans:
        assert p.size_bits <= budget and p.method == "random" and math.isnan(p.objective)
        counts[tuple(p.bits.values())] += 1  # a KeyError would be a plan outside the window
    expected = len(plans) / len(inside)
    assert len(inside) >= 5 and all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values())
    assert {p.size_bits for p in random_plans(sizes, bits, budget, 50, seed=0, window=0.0)} == {top}


def test_random_plans_respect_fixed_and_ties_and_are_seeded():
    sizes = {f"l{i}": s for i, s in enumerate((30, 50, 70, 110, 130, 170))}
    bits = (2, 3, 4, 8)
    budget = 3 * sum(sizes.values()) + 7
    fixed, ties = {"l0": 8}, [("l1", "l2")]
    top = max(size_of(sizes, p) for p in enumerate_plans(sizes, bits, fixed, ties) if size_of(sizes, p) <= budget)
    plans = random_plans(sizes, bits, budget, 40, seed=1, fixed=fixed, ties=ties)
    assert len(plans) == 40
    for p in plans:
        assert p.bits["l0"] == 8 and p.bits["l1"] == p.bits["l2"]
        assert top - 0.01 * budget <= p.size_bits <= top <= budget
    assert len({tuple(p.bits.values()) for p in plans}) >= 3
    again = random_plans(sizes, bits, budget, 40, seed=1, fixed=fixed, ties=ties)
    assert [p.bits for p in again] == [p.bits for p in plans]
    assert [p.bits for p in random_plans(sizes, bits, budget, 40, seed=2, fixed=fixed, ties=ties)] != \
        [p.bits for p in plans]
    scored = random_plans(sizes, bits, budget, 3, seed=2, scores=flat_scores(sizes))
    assert all(p.objective == pytest.approx(cost_of(flat_scores(sizes), p.bits)) for p in scored)
    with pytest.raises(BudgetError, match="size_bits=1119 .*at least 1120 bits; the largest useful is 4480"):
        random_plans(sizes, bits, 1119, 1)
    with pytest.raises(OptionError, match="window must be a fraction"):
        random_plans(sizes, bits, budget, 1, window=2.0)


def test_random_plans_fallback_sampler_is_within_budget_and_maximal(monkeypatch):
    monkeypatch.setattr(baselines_mod, "MAX_COUNT_TABLE", 0)
    sizes = {f"l{i}": s for i, s in enumerate((30, 50, 70, 110, 130, 170))}
    bits = (2, 3, 4, 8)
    budget = 3 * sum(sizes.values())
    plans = random_plans(sizes, bits, budget, 40, seed=1, ties=[("l1", "l2")])
    for p in plans:
        assert p.size_bits <= budget and p.bits["l1"] == p.bits["l2"]
        for group in (("l0",), ("l1", "l2"), ("l3",), ("l4",), ("l5",)):  # no layer can be widened one step
            b = p.bits[group[0]]
            if b != 8:
                assert p.size_bits + sum(sizes[n] for n in group) * (bits[bits.index(b) + 1] - b) > budget
    assert len({tuple(p.bits.values()) for p in plans}) > 10


def test_uniform_plan_with_fixed_layers_and_scores():
    sizes = {"a": 8, "b": 16, "c": 8}
    plan = uniform_plan(sizes, 4, fixed={"a": 8}, scores={"b": {4: 1.0}, "c": {4: 2.0}})
    assert plan.bits == {"a": 8, "b": 4, "c": 4} and plan.size_bits == 64 + 64 + 32 and plan.objective == 3.0
    assert plan.other_bytes is None


# --------------------------------------------------------------------------------------- bad input


SIZES = {"a": 10, "b": 20}
SCORES = {"a": {2: 2.0, 4: 1.0, 8: 0.0}, "b": {2: 2.0, 4: 1.0, 8: 0.0}}


def test_budget_below_the_smallest_model_states_the_range_in_the_users_unit():
    msg = r"average_bits=1\.5 .*at least 2 bits per weight; the largest useful is 8"
    with pytest.raises(BudgetError, match=msg):
        allocate_bits(SIZES, SCORES, bits=(2, 4, 8), average_bits=1.5)
    with pytest.raises(BudgetError, match=r"at least 3\.333334 bits per weight"):  # rounded up: itself reachable
        allocate_bits(SIZES, SCORES, bits=(2, 4, 8), average_bits=3.0, fixed={"a": 6})
    with pytest.raises(BudgetError, match=r"size_bytes=7 .*at least 7\.5 bytes; the largest useful is 30"):
        allocate_bits(SIZES, SCORES, bits=(2, 4, 8), size_bytes=7)
    with pytest.raises(BudgetError, match=r"bops=100 .*at least 480 BOPs"):
        allocate_bits(SIZES, SCORES, bits=(2, 4, 8), bops=100, macs={"a": 10, "b": 20})
    table = {n: {2: 1.0, 4: 2.0, 8: 3.0} for n in SIZES}
    with pytest.raises(BudgetError, match=r"latency=1\.5 .*at least 2 seconds"):
        allocate_bits(SIZES, SCORES, bits=(2, 4, 8), latency=1.5, latency_table=table)
    # Reachable alone, not together: a narrow layer must be slow and a wide one big.
    table = {"a": {2: 5.0, 8: 0.0}, "b": {2: 5.0, 8: 0.0}}
    with pytest.raises(BudgetError, match="together"):
        allocate_bits(SIZES, SCORES, bits=(2, 8), average_bits=3.0, latency=1.0, latency_table=table)


@pytest.mark.parametrize("kwargs, match", [
    (dict(fixed={"c": 8}), r"fixed: unknown module 'c'; quantizable modules: a, b"),
    (dict(ties=[("a", "zz")]), r"ties: unknown module 'zz'; quantizable modules: a, b"),
    (dict(ties=["ab"]), "ties must be a list of tuples"),
    (dict(bits=(1, 4)), r"bits must be an integer in \[2, 8\], got 1"),
    (dict(bits=(4, 9)), r"bits must be an integer in \[2, 8\], got 9"),
    (dict(bits=()), "bits is empty"),
    (dict(fixed={"a": 16}), r"fixed\['a'\]: bits must be an integer in \[2, 8\]"),
    (dict(fixed={"a": 2, "b": 4}, ties=[("a", "b")]), "tied .* different widths"),
    (dict(macs={"a": 1}, bops=1e9), r"macs has no entry for 'b'"),
    (dict(macs={"a": 1, "b": -1}, bops=1e9), r"macs\['b'\] must be a finite number >= 0"),
    (dict(latency_table={"a": {2: 1, 4: 1, 8: 1}, "b": {2: 1, 8: 1}}, latency=9.0),
     "no latency for 'b' at 4 bits"),
])
def test_bad_names_and_bits_are_quantization_errors(kwargs, match):
    kwargs = {"bits": (2, 4, 8), "average_bits": 4.0, **kwargs}
    with pytest.raises(QuantizationError, match=match):
        allocate_bits(SIZES, SCORES, **kwargs)


@pytest.mark.parametrize("scores, match", [
    ({"a": SCORES["a"], "b": SCORES["b"], "c": SCORES["a"]}, r"scores: unknown module 'c'; quantizable modules"),
    ({"a": SCORES["a"]}, r"no entry for module 'b'.*fixed=\{'b': 8\}"),
    ({"a": SCORES["a"], "b": {2: 1.0, 8: 0.0}}, r"scores\['b'\] has no score at 4 bits \(it has 2, 8\)"),
    ({"a": SCORES["a"], "b": {2: math.nan, 4: 1.0, 8: 0.0}}, r"scores\['b'\]\[2\] = nan"),
    ({"a": SCORES["a"], "b": {2: math.inf, 4: 1.0, 8: 0.0}}, r"scores\['b'\]\[2\] = inf"),
    ({"a": {2: 1.0, 4: -1e-3, 8: 0.0}, "b": SCORES["b"]}, r"scores\['a'\]\[4\] = -0\.001: .*finite and >= 0"),
    ({"a": {2: 1.0, 4: "x", 8: 0.0}, "b": SCORES["b"]}, r"scores\['a'\]\[4\] is not a number"),
    ({"a": {1: 1.0, 2: 1.0, 4: 1.0, 8: 0.0}, "b": SCORES["b"]}, r"scores\['a'\]: bits must be an integer"),
    ([1, 2], "scores must be a SensitivityReport or a mapping"),
])
def test_bad_scores_name_the_layer_and_bits(scores, match):
    with pytest.raises(QuantizationError, match=match):
        allocate_bits(SIZES, scores, bits=(2, 4, 8), average_bits=4.0)


def test_scores_read_back_from_json_are_accepted():
    plan = allocate_bits(SIZES, json.loads(json.dumps(SCORES)), bits=(2, 4, 8), average_bits=4.0)
    assert plan.objective == pytest.approx(min(cost_of(SCORES, p) for p in enumerate_plans(SIZES, (2, 4, 8))
                                               if size_of(SIZES, p) <= 120))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="greedy", average_bits=4.0), r"unknown method 'greedy'; choose one of 'ilp', 'pareto'"),
    (dict(average_bits=4.0, size_bytes=10), "one size budget"),
    (dict(), "give a budget"),
    (dict(bops=1e6), "bops= needs macs="),
    (dict(latency=1.0), "latency= needs latency_table="),
    (dict(method="pareto", bops=1e6, macs={"a": 1, "b": 1}), "size budget only"),
    (dict(average_bits=-1.0), "average_bits must be a finite number >= 0"),
    (dict(size_bytes=math.inf), "size_bytes must be a finite number >= 0"),
    (dict(average_bits=4.0, activation_bits=0), "activation_bits must be an integer in 1..32 or 'same'"),
])
def test_bad_options_are_option_errors(kwargs, match):
    with pytest.raises(OptionError, match=match):
        allocate_bits(SIZES, SCORES, bits=(2, 4, 8), **kwargs)


@pytest.mark.parametrize("sizes, match", [
    ({}, "non-empty mapping"),
    ({"a": 0}, r"sizes\['a'\] must be a positive number"),
    ({"a": 2.5}, r"sizes\['a'\] must be a positive number"),
    (nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), "no quantizable module"),
])
def test_bad_model_or_sizes(sizes, match):
    with pytest.raises(QuantizationError, match=match):
        allocate_bits(sizes, {}, average_bits=4.0)


def test_a_solver_failure_is_an_error_never_a_wrong_plan(monkeypatch):
    import scipy.optimize

    class Result:
        def __init__(self, status, x, message="stub"):
            self.status, self.x, self.message = status, x, message

    def infeasible(*args, **kwargs):
        return Result(2, None)

    monkeypatch.setattr(scipy.optimize, "milp", infeasible)
    with pytest.raises(QuantizationError, match="found no optimal allocation although one within budget exists"):
        allocate_bits(SIZES, SCORES, bits=(2, 4, 8), average_bits=4.0)

    def over_budget(c, integrality, bounds, constraints, options):
        return Result(0, np.array([0.0, 0.0, 1.0, 0.0, 0.0, 1.0]))  # both at 8 bits: 240 bits > 120

    monkeypatch.setattr(scipy.optimize, "milp", over_budget)
    with pytest.raises(QuantizationError, match="solver tolerance problem"):
        allocate_bits(SIZES, SCORES, bits=(2, 4, 8), average_bits=4.0)

    def not_one_hot(c, integrality, bounds, constraints, options):
        return Result(0, np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]))

    monkeypatch.setattr(scipy.optimize, "milp", not_one_hot)
    with pytest.raises(QuantizationError, match="not one-hot"):
        allocate_bits(SIZES, SCORES, bits=(2, 4, 8), average_bits=4.0)


def test_budget_above_the_largest_model_takes_the_best_allocation():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = allocate_bits(SIZES, SCORES, bits=(2, 4, 8), average_bits=100.0)
    assert plan.bits == {"a": 8, "b": 8} and plan.objective == 0.0


@given(instances(with_fixed_and_ties=False))
def test_ilp_among_least_score_allocations_spends_the_budget(inst):
    """Scores that tie across widths (a clipped measured increase is 0 at every width it does not hurt): the
    ILP keeps the least score and, among those allocations, the largest size within the budget."""
    sizes, bits, scores, _, _, frac = inst
    mid = bits[len(bits) // 2]
    scores = {n: {b: (0.0 if b >= mid else s) for b, s in row.items()} for n, row in scores.items()}
    budget = budget_between(sizes, bits, {}, (), frac)
    plan = allocate_bits(sizes, scores, bits=bits, size_bytes=budget / 8)
    within = [p for p in enumerate_plans(sizes, bits) if size_of(sizes, p) <= budget]
    best = min(cost_of(scores, p) for p in within)
    assert plan.objective == pytest.approx(best, abs=1e-9)
    largest = max(size_of(sizes, p) for p in within if cost_of(scores, p) <= best + 1e-9)
    assert plan.size_bits == largest


def test_zero_scores_fill_the_budget():
    plan = allocate_bits({"a": 10, "b": 10}, {"a": {2: 0.0, 8: 0.0}, "b": {2: 0.0, 8: 0.0}}, bits=(2, 8),
                         average_bits=5.0)
    assert plan.size_bits == 100 and sorted(plan.bits.values()) == [2, 8]
