"""Regression against HAWQ-V3's published ResNet18 bit allocations (no model needed).

The constants (per-layer average Hessian traces, ||Q_b(W) - W||^2 at 4 and 8 bits, parameter counts, BOPs,
T4 latencies) and the published choices are data transcribed into ``hawq_v3_resnet18.json`` from
Zhen-Dong/HAWQ (``ILP.ipynb`` at 87ad098c, ``bit_config.py`` at 800ed9c1; see the file's ``_source``).

How the notebook's problem maps onto ``allocate_bits`` (every choice then matches the published one):

* objective: the notebook minimises ``sum (x_l - 1) * trace_l * (d8_l - d4_l)`` with ``x_l in {1, 2}`` for
  4/8 bits, which is ``sum score_l[bits_l]`` with ``score_l[b] = trace_l * d_b_l`` minus the constant
  ``sum score_l[4]``: the same argmin;
* budgets: its limit ``f`` is the fraction of the way from the all-4-bit to the all-8-bit total. For size
  that is ``average_bits = 4 + 4 f``; for BOPs and latency we pass the same total in absolute units;
* BOPs: the notebook's ``bops`` are full-precision BOPs (MACs x 32 x 32) and it scales them by
  ``(b / 32)^2`` -- activations at the weight's width, as in ``bit_config.py`` where each ``quant_act``
  matches its convolution -- hence ``macs = bops / 1024`` and ``activation_bits="same"``;
* ties: ``x4 == x6``, ``x9 == x11``, ``x14 == x16`` (a unit's shortcut convolution and first convolution
  read the same input);
* the first convolution and the classifier are outside the notebook's problem (8 bits in
  ``bit_config.py``), so they are outside ours.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from curvopt.quant.allocate import allocate_bits

DATA = json.loads((Path(__file__).parent / "hawq_v3_resnet18.json").read_text())
LAYERS = DATA["layers"]
NAMES = [layer["name"] for layer in LAYERS]
SIZES = {layer["name"]: layer["params"] for layer in LAYERS}
SCORES = {layer["name"]: {4: layer["avg_trace"] * layer["delta_4bit_square"],
                          8: layer["avg_trace"] * layer["delta_8bit_square"]} for layer in LAYERS}
MACS = {layer["name"]: layer["bops_fp32"] / 1024 for layer in LAYERS}
LATENCY = {layer["name"]: {4: layer["latency_int4"], 8: layer["latency_int8"]} for layer in LAYERS}
TIES = [tuple(t) for t in DATA["ties"]]
LIMITS = (0.25, 0.5, 0.75)


def published(kind: str, f: float) -> dict[str, int]:
    four = set(DATA["published_4bit_layers"][f"{kind}_{f}"])
    return {n: 4 if n in four else 8 for n in NAMES}


def between(lo: float, hi: float, f: float) -> float:
    """The notebook's budget: ``f`` of the way from the all-4-bit total to the all-8-bit total."""
    return lo + (hi - lo) * f


def test_fixture_is_the_notebooks_problem():
    assert len(LAYERS) == 19 and sum(SIZES.values()) == 11_157_504
    # Every published allocation honours the notebook's ties, and MACs come out whole (BOPs = MACs * 32 * 32).
    for kind in ("modelsize", "bops", "latency"):
        for f in LIMITS:
            plan = published(kind, f)
            assert all(plan[a] == plan[b] for a, b in TIES)
    assert all(m == int(m) for m in MACS.values())


@pytest.mark.parametrize("f", LIMITS)
@pytest.mark.parametrize("method", ["ilp", "pareto"])
def test_model_size_budget_reproduces_bit_config(f, method):
    plan = allocate_bits(SIZES, SCORES, bits=(4, 8), average_bits=4 + 4 * f, ties=TIES, method=method)
    assert plan.bits == published("modelsize", f)
    assert plan.size_bits <= (4 + 4 * f) * sum(SIZES.values())


@pytest.mark.parametrize("f", LIMITS)
def test_bops_budget_reproduces_bit_config(f):
    lo = sum(m * 4 * 4 for m in MACS.values())
    hi = sum(m * 8 * 8 for m in MACS.values())
    budget = between(lo, hi, f)
    plan = allocate_bits(SIZES, SCORES, bits=(4, 8), bops=budget, macs=MACS, activation_bits="same", ties=TIES)
    assert plan.bits == published("bops", f)
    expected = sum(MACS[n] * b * b for n, b in plan.bits.items())
    assert plan.bops == pytest.approx(expected, rel=1e-12) and plan.bops <= budget
    # With activations fixed at 8 bits (our default) a layer's 4 -> 8 step costs MACs * 32 instead of MACs * 48:
    # proportional per layer, so the same fraction f of the range admits the same allocations and the same choice.
    lo8, hi8 = sum(m * 4 * 8 for m in MACS.values()), sum(m * 8 * 8 for m in MACS.values())
    plan8 = allocate_bits(SIZES, SCORES, bits=(4, 8), bops=between(lo8, hi8, f), macs=MACS, ties=TIES)
    assert plan8.bits == plan.bits


@pytest.mark.parametrize("f", LIMITS)
def test_latency_budget_reproduces_bit_config(f):
    lo = math.fsum(r[4] for r in LATENCY.values())
    hi = math.fsum(r[8] for r in LATENCY.values())
    plan = allocate_bits(SIZES, SCORES, bits=(4, 8), latency=between(lo, hi, f), latency_table=LATENCY, ties=TIES)
    assert plan.bits == published("latency", f)
    assert plan.latency == pytest.approx(math.fsum(LATENCY[n][b] for n, b in plan.bits.items()), rel=1e-12)


def test_published_size_choices_lie_on_the_pareto_frontier():
    # HAWQ-V2's view of the same numbers: each published model-size allocation is a frontier point.
    plan = allocate_bits(SIZES, SCORES, bits=(4, 8), average_bits=8.0, ties=TIES)
    frontier = {tuple(sorted(p.bits.items())) for p in plan.pareto}
    for f in LIMITS:
        assert tuple(sorted(published("modelsize", f).items())) in frontier
