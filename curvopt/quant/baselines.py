"""The baselines a bit allocation is compared against: every layer at one width (:func:`uniform_plan`) and
random allocations of a given size (:func:`random_plans`), on the same layers, fixed widths and ties as
:func:`~curvopt.quant.allocate.allocate_bits`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from curvopt.errors import OptionError
from curvopt.quant.allocate import (
    _bit_set,
    _check_names,
    _Group,
    _groups,
    _layers,
    _plan,
    _score_table,
    _set_costs,
    _size_budget_error,
)
from curvopt.quant.plan import BitPlan, check_bits


def uniform_plan(model_or_sizes: nn.Module | Mapping[str, int], bits: int, *,
                 fixed: Mapping[str, int] | None = None, scores: Any = None, quantizer: Any = None) -> BitPlan:
    """Every quantizable module at ``bits`` (those in ``fixed`` at their pinned width).

    ``objective`` is the summed score when ``scores`` (as for :func:`allocate_bits`) is given, else NaN.
    """
    b = check_bits(bits, "uniform_plan(bits=...)")
    layers = _layers(model_or_sizes)
    fixed = dict(fixed or {})
    _check_names(fixed, layers.numel, "fixed")
    fixed = {n: check_bits(v, f"fixed[{n!r}]") for n, v in fixed.items()}
    groups = _groups(layers, (b,), fixed, ())
    if scores is not None:
        _set_costs(groups, _score_table(scores, layers, (b,), quantizer))
    return _plan(groups, [0] * len(groups), layers, "uniform", None, None, objective=scores is not None)


#: random_plans samples exactly (a counting table over sizes) while (groups x budget / gcd of the sizes) stays
#: below this; past it, it falls back to the step-wise sampler.
MAX_COUNT_TABLE = 5_000_000


def random_plans(model_or_sizes: nn.Module | Mapping[str, int], bits: Sequence[int], size_bits: int, n: int,
                 seed: int = 0, *, window: float = 0.01, fixed: Mapping[str, int] | None = None,
                 ties: Iterable[Sequence[str]] = (), scores: Any = None, quantizer: Any = None) -> list[BitPlan]:
    """``n`` random allocations from ``bits`` of size ``<= size_bits`` and close to it: the baseline HAWQ is
    compared against at equal size.

    Rule: let ``S`` be the largest size ``<= size_bits`` that any allocation reaches; each plan is drawn
    uniformly at random (independently) among all allocations whose size lies in
    ``[S - window * size_bits, S]``. Which layers end up wide is therefore random and never driven by the
    scores, and every plan is within ``window`` (default 1 %) of the closest reachable size. The draw is exact:
    a table counting the allocations of each partial size, layer by layer, then a walk back through it.
    When that table would exceed ``MAX_COUNT_TABLE`` entries (very deep models with sizes of no common
    factor), each plan instead draws every width uniformly, lowers uniformly chosen layers one width at a
    time while over budget, then raises uniformly chosen layers one width at a time while one fits.
    ``plan.size_bits`` is each achieved size. ``fixed`` and ``ties`` are respected as in
    :func:`allocate_bits`; ``objective`` is the summed score when ``scores`` is given, else NaN.
    """
    layers = _layers(model_or_sizes)
    cand = _bit_set(bits)
    fixed = dict(fixed or {})
    _check_names(fixed, layers.numel, "fixed")
    fixed = {k: check_bits(v, f"fixed[{k!r}]") for k, v in fixed.items()}
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise OptionError(f"n must be a number of plans >= 0, got {n!r}")
    if isinstance(size_bits, bool) or not isinstance(size_bits, (int, np.integer)):
        raise OptionError(f"size_bits must be an integer number of bits (e.g. plan.size_bits), got {size_bits!r}")
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 <= window <= 1:
        raise OptionError(f"window must be a fraction of size_bits in [0, 1], got {window!r}")
    size_bits = int(size_bits)
    groups = _groups(layers, cand, fixed, ties)
    if scores is not None:
        _set_costs(groups, _score_table(scores, layers, cand, quantizer, fixed.values()))
    total = sum(layers.numel.values())
    lo = sum(int(g.size.min()) for g in groups)
    if size_bits < lo:
        raise _size_budget_error("size_bits", size_bits, lo, sum(int(g.size.max()) for g in groups), total)
    rng = np.random.default_rng(seed)
    unit = int(np.gcd.reduce(np.concatenate([g.size for g in groups])))
    if len(groups) * (size_bits // unit + 1) <= MAX_COUNT_TABLE:
        choices = _uniform_draws(groups, size_bits, window, unit, n, rng)
    else:
        choices = [_stepwise_draw(groups, size_bits, rng) for _ in range(n)]
    return [_plan(groups, x, layers, "random", None, None, objective=scores is not None) for x in choices]


def _uniform_draws(groups: list[_Group], size_bits: int, window: float, unit: int, n: int,
                   rng: np.random.Generator) -> list[list[int]]:
    """``n`` option choices drawn uniformly among the allocations of size in the window (see random_plans)."""
    cap = size_bits // unit
    steps = [(g.size // unit).astype(np.int64) for g in groups]
    # table[g][s]: allocations of groups < g with size s units, each row scaled by its maximum (only ratios
    # within a row are used, and the scaling keeps 8 widths over 100+ layers inside float64).
    table = [np.zeros(cap + 1)]
    table[0][0] = 1.0
    for st in steps:
        prev, row = table[-1], np.zeros(cap + 1)
        for d in st:
            if d <= cap:
                row[d:] += prev[:cap + 1 - d]
        table.append(row / row.max())
    last = table[-1]
    top = int(np.flatnonzero(last > 0).max())  # the largest reachable size within budget
    low = max(0, top - math.floor(window * size_bits / unit))
    weights = last[low:top + 1]
    out = []
    for _ in range(n):
        s = low + int(rng.choice(len(weights), p=weights / weights.sum()))
        x = [0] * len(groups)
        for gi in range(len(groups) - 1, -1, -1):
            d = steps[gi]
            w = np.where(d <= s, table[gi][np.clip(s - d, 0, None)], 0.0)
            j = int(rng.choice(len(d), p=w / w.sum()))
            x[gi] = j
            s -= int(d[j])
        out.append(x)
    return out


def _stepwise_draw(groups: list[_Group], size_bits: int, rng: np.random.Generator) -> list[int]:
    """The fallback sampler of random_plans: uniform widths, lowered then raised one width at a time."""
    x = [int(rng.integers(len(g.options))) for g in groups]
    size = sum(int(g.size[j]) for g, j in zip(groups, x))
    while size > size_bits:
        down = [gi for gi, j in enumerate(x) if j > 0]
        gi = down[rng.integers(len(down))]
        size -= int(groups[gi].size[x[gi]] - groups[gi].size[x[gi] - 1])
        x[gi] -= 1
    while True:
        up = [gi for gi, j in enumerate(x) if j + 1 < len(groups[gi].options)
              and size + int(groups[gi].size[j + 1] - groups[gi].size[j]) <= size_bits]
        if not up:
            return x
        gi = up[rng.integers(len(up))]
        size += int(groups[gi].size[x[gi] + 1] - groups[gi].size[x[gi]])
        x[gi] += 1
