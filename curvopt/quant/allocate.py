"""Mixed-precision bit allocation: HAWQ-V3's integer program and HAWQ-V2's Pareto frontier.

Given a sensitivity ``score[l][b]`` (the predicted loss increase of quantizing layer ``l`` to ``b`` bits)
for every quantizable layer, choose one width per layer that minimises the summed score under a budget:

* model size: ``sum_l numel_l * bits_l <= budget`` (``average_bits`` or ``size_bytes``);
* BOPs: ``sum_l MACs_l * bits_l * activation_bits <= bops``;
* latency: ``sum_l latency_table[l][bits_l] <= latency``.

``method="ilp"`` solves the one-hot integer program of HAWQ-V3 (Yao et al., 2021, eq. 7), generalised to any
set of widths, with ``scipy.optimize.milp``; ``method="pareto"`` picks from HAWQ-V2's size/score frontier
(Dong et al., 2020, sec. 3.3), computed by a dynamic program over layers rather than a sweep of integer
programs: one pass yields every frontier point, exactly (up to ``MAX_PARETO_POINTS`` points), where a sweep
finds only the points at the budgets it tries.

Size accounting counts only the quantized weights, ``numel * bits`` bits each; biases, norm layers and the
quantization scales (one or two floats per channel or group) are not counted. When a model is given,
``BitPlan.other_bytes`` holds the fp32 bytes of its remaining parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from torch import nn

from curvopt.errors import BudgetError, OptionError, QuantizationError
from curvopt.quant.plan import BitPlan, ParetoPoint, check_bits, quantizable_modules
from curvopt.registry import Registry

#: The allocation methods by name (``allocate_bits(method=...)``), each with what it solves.
ALLOCATORS: Registry[str] = Registry("method")
ALLOCATORS.register("ilp", "HAWQ-V3's integer program, under any budgets", options=())
ALLOCATORS.register("pareto", "HAWQ-V2's choice on the exact size/score frontier, under a size budget", options=())
METHODS = tuple(ALLOCATORS.names())

#: The frontier's dynamic program keeps at most this many points; beyond it, neighbouring points are merged
#: (``BitPlan.pareto_exact`` is then False) so that a deep model costs seconds, not hours.
MAX_PARETO_POINTS = 20_000

# Relative slack when checking the solver's allocation against float (BOPs, latency) budgets: HiGHS accepts
# rows violated by its feasibility tolerance (1e-7 on scaled rows).
_FLOAT_SLACK = 1e-6


# ----------------------------------------------------------------------------------------------- inputs

@dataclass
class _Layers:
    numel: dict[str, int]  # a weight shared by several modules: counted under its first name, 0 for the others
    shared: list[tuple[str, ...]]  # modules that share one weight (must get equal bits)
    other_bytes: int | None
    model: nn.Module | None


def _layers(model_or_sizes: Any) -> _Layers:
    if isinstance(model_or_sizes, nn.Module):
        model = model_or_sizes
        numel: dict[str, int] = {}
        first: dict[int, str] = {}
        sharers: dict[str, list[str]] = {}
        for name, m in quantizable_modules(model).items():
            w = m.weight
            if id(w) in first:
                numel[name] = 0
                sharers[first[id(w)]].append(name)
            else:
                first[id(w)] = name
                numel[name] = w.numel()
                sharers[name] = [name]
        if not numel:
            raise QuantizationError(f"{type(model).__name__} has no quantizable module (none owns a weight "
                                    "with 2 or more dimensions)")
        quantized = set(first)
        other = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
        shared = [tuple(s) for s in sharers.values() if len(s) > 1]
        return _Layers(numel, shared, 4 * other, model)
    if not isinstance(model_or_sizes, Mapping) or not model_or_sizes:
        raise QuantizationError("model_or_sizes must be an nn.Module or a non-empty mapping {module name: "
                                f"number of weight elements}}; got {type(model_or_sizes).__name__}")
    numel = {}
    for name, n in model_or_sizes.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise QuantizationError(f"sizes[{name!r}] must be a positive number of weight elements, got {n!r}")
        numel[str(name)] = int(n)
    return _Layers(numel, [], None, None)


def _check_names(names: Iterable[str], valid: Mapping[str, Any], where: str) -> None:
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise QuantizationError(f"{where}: unknown module {', '.join(map(repr, unknown))}; quantizable modules: "
                                f"{', '.join(valid)}")


def _bit_set(bits: Any) -> tuple[int, ...]:
    if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool):
        bits = (int(bits),)
    try:
        out = sorted({check_bits(int(b) if isinstance(b, np.integer) else b, "allocate_bits(bits=...)")
                      for b in bits})
    except TypeError:
        raise QuantizationError(f"bits must be a sequence of widths such as (2, 3, 4, 8), got {bits!r}") from None
    if not out:
        raise QuantizationError("bits is empty: give the candidate widths, e.g. bits=(2, 3, 4, 8)")
    return tuple(out)


def _as_bits_key(k: Any, where: str) -> int:
    if isinstance(k, str) and k.strip().isdigit():  # scores read back from JSON have string keys
        k = int(k)
    if isinstance(k, np.integer):
        k = int(k)
    return check_bits(k, where)


def _score_table(scores: Any, layers: _Layers, bits: Sequence[int], quantizer: Any,
                 pinned: Iterable[int] = ()) -> dict[str, dict[int, float]]:
    if hasattr(scores, "score_table"):
        if layers.model is None:
            raise QuantizationError("scores is a SensitivityReport: pass the model (not a sizes mapping) as the "
                                    "first argument so that its quantization errors can be computed")
        report = scores
        scores = {n: dict(row) for n, row in report.score_table(layers.model, tuple(bits), quantizer).items()}
        extra = sorted(set(pinned) - set(bits))
        if extra:
            try:
                more = report.score_table(layers.model, tuple(extra), quantizer)
            except QuantizationError:
                # e.g. a "measured" report without those widths: pinned layers' scores are constants of the
                # objective, so they are left out of it rather than made a reason to fail.
                more = {}
            for n, row in more.items():
                scores.setdefault(n, {}).update(row)
    if not isinstance(scores, Mapping):
        raise QuantizationError("scores must be a SensitivityReport or a mapping {module name: {bits: score}}, "
                                f"got {type(scores).__name__}")
    _check_names(scores, layers.numel, "scores")
    table: dict[str, dict[int, float]] = {}
    for name, row in scores.items():
        if not isinstance(row, Mapping):
            raise QuantizationError(f"scores[{name!r}] must be a mapping {{bits: score}}, got {row!r}")
        table[name] = {}
        for k, v in row.items():
            b = _as_bits_key(k, f"scores[{name!r}]")
            try:
                s = float(v)
            except (TypeError, ValueError):
                raise QuantizationError(f"scores[{name!r}][{b}] is not a number: {v!r}") from None
            if not math.isfinite(s) or s < 0:
                raise QuantizationError(f"scores[{name!r}][{b}] = {s!r}: a score must be finite and >= 0 (a "
                                        "predicted loss increase); check the sensitivity estimate of that layer")
            table[name][b] = s
    return table


# ----------------------------------------------------------------------------------------------- groups

@dataclass
class _Group:
    members: tuple[str, ...]
    options: tuple[int, ...]  # candidate widths, increasing
    pinned: bool  # by fixed= (then options is that one width)
    size: np.ndarray  # int64 bits of the group's weights at each option
    cost: np.ndarray  # float64 summed score at each option


def _groups(layers: _Layers, bits: tuple[int, ...], fixed: Mapping[str, int], ties: Iterable[Sequence[str]]
            ) -> list[_Group]:
    names = list(layers.numel)
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    tie_list = list(layers.shared)
    for t in ties:
        if isinstance(t, str) or not isinstance(t, Iterable):
            raise QuantizationError(f"ties must be a list of tuples of module names, e.g. [('a', 'b')]; got {t!r}")
        t = tuple(t)
        _check_names(t, layers.numel, "ties")
        tie_list.append(t)
    for t in tie_list:
        for other in t[1:]:
            parent[find(other)] = find(t[0])
    members: dict[str, list[str]] = {}
    for n in names:
        members.setdefault(find(n), []).append(n)
    groups = []
    for ms in members.values():
        pinned = {fixed[n] for n in ms if n in fixed}
        if len(pinned) > 1:
            raise QuantizationError(f"modules {', '.join(map(repr, ms))} are tied (ties= or a shared weight) but "
                                    f"fixed= pins them to different widths {sorted(pinned)}")
        options = tuple(pinned) if pinned else bits
        size = np.array([sum(layers.numel[n] for n in ms) * b for b in options], dtype=np.int64)
        groups.append(_Group(tuple(ms), options, bool(pinned), size, np.zeros(len(options))))
    return groups


def _set_costs(groups: list[_Group], table: dict[str, dict[int, float]]) -> None:
    missing = [n for g in groups if not g.pinned for n in g.members if n not in table]
    if missing:
        raise QuantizationError(f"scores have no entry for module {', '.join(map(repr, missing))}: give a score "
                                f"for every quantizable module, or pin it with fixed={{{missing[0]!r}: 8}}")
    for g in groups:
        for n in g.members:
            if g.pinned:
                continue
            lacking = [b for b in g.options if b not in table[n]]
            if lacking:
                have = ', '.join(map(str, sorted(table[n]))) or 'none'
                raise QuantizationError(f"scores[{n!r}] has no score at {', '.join(map(str, lacking))} bits (it "
                                        f"has {have}); score every width in bits=, or pass only the widths scored")
        # A pinned layer's score is a constant of the objective: counted when given, else left out.
        g.cost = np.array([math.fsum(table[n][b] for n in g.members if b in table.get(n, {})) for b in g.options])


def _row(groups: list[_Group], per_layer: Mapping[str, Any], value: Any) -> list[np.ndarray]:
    """Per group and option, the summed ``value(per_layer[name], bits)`` of its members."""
    return [np.array([math.fsum(value(per_layer[n], b) for n in g.members) for b in g.options]) for g in groups]


# ----------------------------------------------------------------------------------------------- budgets

def _fraction(x: Any, name: str) -> Fraction:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) or not math.isfinite(x) \
            or x < 0:
        raise OptionError(f"{name} must be a finite number >= 0, got {x!r}")
    return Fraction(float(x)) if isinstance(x, (float, np.floating)) else Fraction(int(x))


def _ceil(x: float, digits: int = 6) -> str:
    """``x`` rounded up at ``digits`` decimals: a stated minimum that is itself reachable."""
    return f"{math.ceil(x * 10**digits - 1e-9) / 10**digits:.{digits}f}".rstrip("0").rstrip(".")


def _size_budget(average_bits: Any, size_bytes: Any, total: int) -> tuple[int | None, str | None]:
    if average_bits is not None and size_bytes is not None:
        raise OptionError("give one size budget: average_bits= or size_bytes=, not both")
    if average_bits is not None:
        return _floor(_fraction(average_bits, "average_bits") * total), "average_bits"
    if size_bytes is not None:
        return _floor(_fraction(size_bytes, "size_bytes") * 8), "size_bytes"
    return None, None


def _floor(v: Fraction) -> int:
    """The budget in whole bits. Within 1e-9 of an integer counts as that integer, so that a budget read off a
    plan (``average_bits=plan.average_bits``, rounded in floating point) allows that plan's size again."""
    r = round(v)
    return r if abs(v - r) <= 1e-9 * max(1, abs(v)) else math.floor(v)


def _size_budget_error(unit: str, given: Any, lo: int, hi: int, total: int) -> BudgetError:
    if unit == "average_bits":
        rng = f"at least {_ceil(lo / total)} bits per weight; the largest useful is {_ceil(hi / total)}"
    elif unit == "size_bytes":
        rng = f"at least {lo / 8:g} bytes; the largest useful is {hi / 8:g}"
    else:
        rng = f"at least {lo} bits; the largest useful is {hi}"
    return BudgetError(f"{unit}={given!r} is below the smallest allocation: {rng} ({_RANGE})")


_RANGE = ("smallest: every layer at its narrowest width in bits=; largest useful: every layer at its widest; "
          "fixed= and ties= applied")


# ----------------------------------------------------------------------------------------------- solvers

def _pareto_frontier(groups: list[_Group], names: Sequence[str]) -> tuple[list[ParetoPoint], bool]:
    """HAWQ-V2's frontier, exactly: for every reachable size, the least summed score, keeping only
    points that no smaller-or-equal size beats. A dynamic program over groups (multiple-choice knapsack with
    dominance pruning): after each group only the non-dominated partial allocations survive, so the cost is
    (points on the partial frontier) x (options), not the product of all choices. Returns the points and
    whether they are exact (see ``MAX_PARETO_POINTS``)."""
    size = np.zeros(1, dtype=np.int64)
    obj = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    coarsened = False
    for g in groups:
        m = len(g.options)
        cand_size = (size[:, None] + g.size[None, :]).ravel()
        cand_obj = (obj[:, None] + g.cost[None, :]).ravel()
        order = np.lexsort((cand_obj, cand_size))
        cand_size, cand_obj = cand_size[order], cand_obj[order]
        best_before = np.concatenate(([np.inf], np.minimum.accumulate(cand_obj)[:-1]))
        keep = cand_obj < best_before
        if keep.sum() > MAX_PARETO_POINTS:
            # Merge neighbours: in each of MAX_PARETO_POINTS size buckets keep the last (least-score) point.
            coarsened = True
            idx = np.flatnonzero(keep)
            s = cand_size[idx]
            bucket = ((s - s[0]) * MAX_PARETO_POINTS) // (s[-1] - s[0] + 1)
            last = np.concatenate((bucket[1:] != bucket[:-1], [True]))
            last[0] = True  # the smallest allocation stays reachable
            keep = np.zeros_like(keep)
            keep[idx[last]] = True
        kept = order[keep]
        back.append((kept // m, kept % m))
        size, obj = cand_size[keep], cand_obj[keep]
    choice = np.zeros((len(groups), len(size)), dtype=np.int64)
    idx = np.arange(len(size))
    for gi in range(len(groups) - 1, -1, -1):
        parent, opt = back[gi]
        choice[gi] = opt[idx]
        idx = parent[idx]
    column = {}
    for gi, g in enumerate(groups):
        widths = np.asarray(g.options)[choice[gi]].tolist()
        for n in g.members:
            column[n] = widths
    points = [ParetoPoint(int(size[j]), float(obj[j]), {n: column[n][j] for n in names}) for j in range(len(size))]
    return points, not coarsened


def _with_point(frontier: list[ParetoPoint], point: ParetoPoint) -> list[ParetoPoint]:
    """``frontier`` with ``point`` added and the points it dominates removed."""
    if any(p.size_bits <= point.size_bits and p.objective <= point.objective for p in frontier):
        return frontier
    kept = [p for p in frontier if not (p.size_bits >= point.size_bits and p.objective >= point.objective)]
    return sorted(kept + [point], key=lambda p: p.size_bits)


def _milp(groups: list[_Group], rows: list[tuple[list[np.ndarray], float, str]]) -> list[int]:
    """Option index per group minimising the summed cost subject to ``sum <= budget`` for each row
    (HAWQ-V3's one-hot integer program); raises if the solver finds no allocation."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # scipy is slow to import; only the ILP needs it

    free = [gi for gi, g in enumerate(groups) if len(g.options) > 1]
    choice = [0] * len(groups)
    if not free:
        return choice
    offsets = np.cumsum([0] + [len(groups[gi].options) for gi in free])
    nvar = int(offsets[-1])
    # Shift each group's costs to start at 0 and scale the largest spread to 1: HiGHS stops at an absolute gap
    # of 1e-6, which must be small against the score differences, whatever their unit.
    c = np.concatenate([groups[gi].cost - groups[gi].cost.min() for gi in free])
    spread = c.max()
    c = c / spread if spread > 0 else c
    onehot = np.zeros((len(free), nvar))
    for k in range(len(free)):
        onehot[k, offsets[k]:offsets[k + 1]] = 1
    constraints = [LinearConstraint(onehot, 1, 1)]
    for coeffs, budget, _ in rows:
        const = sum(coeffs[gi][0] for gi in range(len(groups)) if gi not in free)
        a = np.concatenate([coeffs[gi] for gi in free]).astype(float)
        ub = budget - const
        if coeffs[0].dtype == np.int64:
            # Integer sizes: divide by their gcd so that a row violated by less than 1 is not violated at all.
            gcd = int(np.gcd.reduce(np.concatenate([coeffs[gi] for gi in free])))
            a, ub = a / gcd, math.floor(ub / gcd)
        else:
            scale = np.abs(a).max() or 1.0
            a, ub = a / scale, ub / scale
        constraints.append(LinearConstraint(a[None, :], -np.inf, ub))
    res = milp(c, integrality=np.ones(nvar), bounds=Bounds(0, 1), constraints=constraints,
               options={"mip_rel_gap": 0.0})
    if res.x is not None and res.status == 0:
        # Ties (layers whose score is 0 at several widths, e.g. a clipped measured increase): among the
        # allocations of least score, spend the budget -- the one with the most weight bits. A second solve
        # with the score pinned at its optimum; kept only when the solver confirms it.
        size = np.concatenate([groups[gi].size for gi in free]).astype(float)
        size = size / (size.max() or 1.0)
        pinned = constraints + [LinearConstraint(c[None, :], -np.inf, float(c @ res.x) + 1e-9)]
        second = milp(-size, integrality=np.ones(nvar), bounds=Bounds(0, 1), constraints=pinned,
                      options={"mip_rel_gap": 0.0})
        if second.x is not None and second.status == 0 and float(c @ second.x) <= float(c @ res.x) + 1e-9:
            res = second
    if res.status == 2 and len(rows) > 1:
        raise BudgetError("no allocation meets " + " and ".join(r[2] for r in rows) + " together (each alone is "
                          "reachable); loosen one of them")
    if res.x is None or res.status != 0:
        # One budget alone was checked reachable above, so this is the solver's failure, not the user's budget.
        raise QuantizationError(f"scipy.optimize.milp found no optimal allocation although one within budget "
                                f"exists: {res.message} (status {res.status}); try method='pareto' for a size "
                                "budget")
    x = np.round(res.x).astype(int)
    for k, gi in enumerate(free):
        block = x[offsets[k]:offsets[k + 1]]
        if block.sum() != 1:
            raise QuantizationError(f"scipy.optimize.milp returned a choice that is not one-hot, "
                                    f"{res.x[offsets[k]:offsets[k + 1]]}, for modules {groups[gi].members}")
        choice[gi] = int(block.argmax())
    return choice


# ----------------------------------------------------------------------------------------------- public API

def allocate_bits(model_or_sizes: nn.Module | Mapping[str, int], scores: Any, *,
                  bits: Sequence[int] = (2, 3, 4, 8), average_bits: float | None = None,
                  size_bytes: float | None = None, bops: float | None = None, latency: float | None = None,
                  macs: Mapping[str, float] | None = None,
                  latency_table: Mapping[str, Mapping[int, float]] | None = None,
                  activation_bits: int | str = 8, method: str = "ilp", fixed: Mapping[str, int] | None = None,
                  ties: Iterable[Sequence[str]] = (), quantizer: Any = None) -> BitPlan:
    """Choose a bit width per quantizable module minimising the summed sensitivity score under a budget.

    HAWQ-V3's integer program (Yao et al., 2021) generalised to any set of widths: binary ``x[l, b]``, one per
    layer and width, ``sum_b x[l, b] = 1``, minimise ``sum score[l][b] x[l, b]`` subject to every budget given:

    * size, as ``average_bits`` (``sum numel*bits <= average_bits * total numel``) or ``size_bytes`` (of the
      quantized weights only: scales, biases and norms are not counted; see ``BitPlan.other_bytes``);
    * ``bops`` with ``macs={name: MACs per sample}``: BOPs = MACs * weight bits * ``activation_bits``
      (``activation_bits="same"``: activations at the layer's weight width, as in HAWQ-V3's configurations);
    * ``latency`` with ``latency_table={name: {bits: seconds}}``.

    Among allocations of equal least score (widths a score does not tell apart) the integer program takes
    the one with the most weight bits within the budgets.

    ``method="pareto"`` (size budget only) returns HAWQ-V2's choice instead: the point of the exact size/score
    frontier with the largest size within budget. Both return the frontier as ``plan.pareto``.

    Args:
        model_or_sizes: the model (its quantizable modules: every module owning a >= 2-d ``weight``; a weight
            shared by several modules is counted once and its modules tied) or ``{name: weight numel}``.
        scores: a :class:`~curvopt.analysis.sensitivity.SensitivityReport` (its ``score_table`` is evaluated
            at ``bits``) or ``{name: {bits: score}}``, finite and >= 0, for every module not in ``fixed``.
        bits: candidate widths, each in 2..8.
        fixed: ``{name: bits}`` pinned layers (e.g. first and last at 8); their width need not be in ``bits``.
        ties: groups of module names that must get equal widths (HAWQ-V3 ties a block's shortcut
            convolution to the convolution reading the same input).
        quantizer: passed to ``scores.score_table`` when ``scores`` is a report.

    Returns:
        The :class:`BitPlan`.

    Raises:
        BudgetError: a budget below the smallest reachable allocation (the message states the range), or
            budgets that no allocation meets together.
        QuantizationError: unknown module names, bits outside 2..8, missing, negative or non-finite scores.
        OptionError: an unknown ``method``, conflicting or missing budgets.
    """
    if method not in ALLOCATORS:
        raise OptionError(f"unknown method {method!r}; choose one of {', '.join(map(repr, ALLOCATORS.names()))}")
    layers = _layers(model_or_sizes)
    names = list(layers.numel)
    total = sum(layers.numel.values())
    cand = _bit_set(bits)
    fixed = dict(fixed or {})
    _check_names(fixed, layers.numel, "fixed")
    fixed = {n: check_bits(b, f"fixed[{n!r}]") for n, b in fixed.items()}
    budget_bits, unit = _size_budget(average_bits, size_bytes, total)
    if bops is not None and macs is None:
        raise OptionError("bops= needs macs={module name: multiply-accumulates per sample} to count BOPs")
    if latency is not None and latency_table is None:
        raise OptionError("latency= needs latency_table={module name: {bits: seconds}}")
    if budget_bits is None and bops is None and latency is None:
        raise OptionError("give a budget: average_bits= or size_bytes= (and/or bops= with macs=, latency= with "
                          "latency_table=)")
    if method == "pareto" and (budget_bits is None or bops is not None or latency is not None):
        raise OptionError("method='pareto' allocates under a size budget only (average_bits= or size_bytes=); "
                          "use method='ilp' for BOPs or latency budgets")

    groups = _groups(layers, cand, fixed, ties)
    _set_costs(groups, _score_table(scores, layers, cand, quantizer, fixed.values()))
    act = _activation_bits(activation_bits)
    bops_row = _bops_row(groups, layers, macs, act) if macs is not None else None
    lat_row = _latency_row(groups, layers, latency_table) if latency_table is not None else None

    rows: list[tuple[list[np.ndarray], float, str]] = []
    if budget_bits is not None:
        lo = sum(int(g.size.min()) for g in groups)
        hi = sum(int(g.size.max()) for g in groups)
        if budget_bits < lo:
            raise _size_budget_error(unit, average_bits if unit == "average_bits" else size_bytes, lo, hi, total)
        rows.append(([g.size for g in groups], budget_bits, f"{unit}={average_bits or size_bytes!r}"))
    for value, row, label, what in ((bops, bops_row, "bops", "BOPs"), (latency, lat_row, "latency", "seconds")):
        if value is None:
            continue
        budget = float(_fraction(value, label))
        lo, hi = math.fsum(r.min() for r in row), math.fsum(r.max() for r in row)
        if budget < lo * (1 - 1e-12):
            raise BudgetError(f"{label}={value!r} is below the smallest allocation: at least {lo:.6g} {what}; the "
                              f"largest useful is {hi:.6g} ({_RANGE})")
        rows.append((row, budget, f"{label}={value!r}"))

    frontier, exact = _pareto_frontier(groups, names)
    if method == "pareto" and exact:
        point = max((p for p in frontier if p.size_bits <= budget_bits), key=lambda p: p.size_bits)
        choice = [g.options.index(point.bits[g.members[0]]) for g in groups]
    else:
        # Also for a merged frontier under method="pareto": its exact point at the budget is by definition the
        # least-score allocation within it, which is what the integer program finds.
        choice = _milp(groups, rows)
    plan = _plan(groups, choice, layers, method, bops_row, lat_row)
    _verify(plan, rows, groups, choice)
    if not exact and len(rows) == 1 and budget_bits is not None:
        frontier = _with_point(frontier, ParetoPoint(plan.size_bits, plan.objective, dict(plan.bits)))
    plan.pareto, plan.pareto_exact = frontier, exact
    return plan


def _nonneg(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and 0 <= v < math.inf


def _activation_bits(a: Any) -> int | None:
    if a == "same":
        return None
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not 1 <= a <= 32:
        raise OptionError(f"activation_bits must be an integer in 1..32 or 'same', got {a!r}")
    return int(a)


def _bops_row(groups: list[_Group], layers: _Layers, macs: Mapping[str, float], act: int | None
              ) -> list[np.ndarray]:
    _check_names(macs, layers.numel, "macs")
    missing = [n for n in layers.numel if n not in macs]
    if missing:
        raise QuantizationError(f"macs has no entry for {', '.join(map(repr, missing))}: give the "
                                "multiply-accumulates of every quantizable module")
    for n, v in macs.items():
        if not _nonneg(v):
            raise QuantizationError(f"macs[{n!r}] must be a finite number >= 0, got {v!r}")
    return _row(groups, macs, lambda m, b: float(m) * b * (b if act is None else act))


def _latency_row(groups: list[_Group], layers: _Layers, table: Mapping[str, Mapping[int, float]]
                 ) -> list[np.ndarray]:
    _check_names(table, layers.numel, "latency_table")
    clean: dict[str, dict[int, float]] = {}
    for n, row in table.items():
        clean[n] = {}
        for k, v in row.items():
            b = _as_bits_key(k, f"latency_table[{n!r}]")
            if not _nonneg(v):
                raise QuantizationError(f"latency_table[{n!r}][{b}] must be finite seconds >= 0, got {v!r}")
            clean[n][b] = float(v)
    for g in groups:
        for n in g.members:
            lacking = [b for b in g.options if b not in clean.get(n, {})]
            if lacking:
                raise QuantizationError(f"latency_table has no latency for {n!r} at "
                                        f"{', '.join(map(str, lacking))} bits; measure every candidate width")
    return _row(groups, clean, lambda r, b: r[b])


def _plan(groups: list[_Group], choice: Sequence[int], layers: _Layers, method: str,
          bops_row: list[np.ndarray] | None, lat_row: list[np.ndarray] | None, objective: bool = True) -> BitPlan:
    bits = {}
    for g, j in zip(groups, choice):
        for n in g.members:
            bits[n] = g.options[j]
    bits = {n: bits[n] for n in layers.numel}
    size = sum(layers.numel[n] * b for n, b in bits.items())
    return BitPlan(
        bits=bits, size_bits=size, numel=dict(layers.numel),
        objective=math.fsum(float(g.cost[j]) for g, j in zip(groups, choice)) if objective else math.nan,
        method=method,
        bops=None if bops_row is None else math.fsum(float(r[j]) for r, j in zip(bops_row, choice)),
        latency=None if lat_row is None else math.fsum(float(r[j]) for r, j in zip(lat_row, choice)),
        other_bytes=layers.other_bytes)


def _verify(plan: BitPlan, rows: list[tuple[list[np.ndarray], float, str]], groups: list[_Group],
            choice: Sequence[int]) -> None:
    """Never hand back an allocation that breaks a budget (the solver works in floating point)."""
    for coeffs, budget, label in rows:
        used = sum(int(c[j]) for c, j in zip(coeffs, choice)) if coeffs[0].dtype == np.int64 \
            else math.fsum(float(c[j]) for c, j in zip(coeffs, choice))
        limit = budget if isinstance(used, int) else budget * (1 + _FLOAT_SLACK)
        if used > limit:
            raise QuantizationError(f"the solver's allocation uses {used} against {label} (limit {budget}); "
                                    "this is a solver tolerance problem, not your budget: please report it")
