"""What a bit allocation hands to the quantized model: ``{module name: bits}``, and the plan that carries it
(:class:`BitPlan`, with its exact size, score and the size/score frontier)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from curvopt.errors import QuantizationError

#: Bit widths a weight quantizer accepts.
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: Any, where: str) -> int:
    """``bits`` as an int in ``[MIN_BITS, MAX_BITS]``, or a :class:`QuantizationError` naming ``where``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantizationError(f"{where}: bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


def plan_bits(plan: Any) -> dict[str, int]:
    """The ``{module name: bits}`` of ``plan``: a mapping, or an object with a ``bits`` mapping
    (the plan :func:`curvopt.quant.allocate_bits` returns)."""
    bits = getattr(plan, "bits", plan)
    if not isinstance(bits, Mapping):
        raise QuantizationError(f"a plan is a mapping {{module name: bits}} or has one as .bits; got "
                                f"{type(plan).__name__}")
    return {str(k): check_bits(v, f"plan[{k!r}]") for k, v in bits.items()}


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose ``weight`` a weight quantizer acts on: every module that owns a trainable
    ``weight`` parameter with at least 2 dimensions (Linear, Conv, Embedding, attention
    projections), by name. Norm layers' 1-d scales are left in full precision."""
    out = {}
    for name, m in model.named_modules():
        w = m._parameters.get("weight")
        if w is not None and w.dim() >= 2:
            out[name] = m
    return out


def resolve_modules(model: nn.Module, names: Mapping[str, Any] | list[str], where: str) -> dict[str, nn.Module]:
    """The quantizable modules named in ``names``; an unknown or unquantizable name is a
    :class:`QuantizationError` that lists the valid ones."""
    valid = quantizable_modules(model)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise QuantizationError(f"{where}: no quantizable module {', '.join(map(repr, unknown))} in "
                                f"{type(model).__name__}; quantizable modules: {', '.join(valid) or '(none)'}")
    return {n: valid[n] for n in names}


@dataclass(frozen=True)
class ParetoPoint:
    """One point of the size/score frontier: the least summed score reachable at ``size_bits``."""

    size_bits: int
    objective: float
    bits: dict[str, int]

    @property
    def size_bytes(self) -> float:
        return self.size_bits / 8

    def to_dict(self) -> dict[str, Any]:
        return {"size_bytes": self.size_bytes, "size_bits": self.size_bits, "objective": self.objective,
                "bits": dict(self.bits)}


@dataclass
class BitPlan:
    """A bit width per quantizable module, with its exact size and its predicted cost.

    ``bits`` is what :func:`curvopt.quant.fake_quantized` takes. ``size_bits`` is exact: the sum of
    ``numel * bits`` over the quantized weights (a weight shared by several modules counted once).
    ``objective`` is the summed score of the chosen widths (NaN when the plan was made without scores).
    ``bops`` / ``latency`` are set when MACs / a latency table were given. ``pareto`` holds the size/score
    frontier (increasing size, strictly decreasing objective) under the same fixed layers and ties, ignoring
    BOPs and latency budgets. ``pareto_exact`` is False when the frontier had more than
    ``curvopt.quant.allocate.MAX_PARETO_POINTS`` points and neighbours were merged: every point is still a
    real allocation with its true score, but may miss the least score at its size by a little. Under a size
    budget alone the plan's own allocation is always exact and on the frontier.
    """

    bits: dict[str, int]
    size_bits: int
    numel: dict[str, int]
    objective: float = math.nan
    method: str = "ilp"
    bops: float | None = None
    latency: float | None = None
    other_bytes: int | None = None
    pareto: list[ParetoPoint] = field(default_factory=list)
    pareto_exact: bool = True

    @property
    def size_bytes(self) -> float:
        """Bytes of the quantized weights, ``size_bits / 8`` (scales, biases and norms not counted)."""
        return self.size_bits / 8

    @property
    def average_bits(self) -> float:
        """Bits per quantized weight element."""
        return self.size_bits / sum(self.numel.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable)."""
        return {"method": self.method, "bits": dict(self.bits), "size_bits": self.size_bits,
                "size_bytes": self.size_bytes, "average_bits": self.average_bits, "objective": self.objective,
                "bops": self.bops, "latency": self.latency, "other_bytes": self.other_bytes,
                "numel": dict(self.numel), "pareto": [p.to_dict() for p in self.pareto],
                "pareto_exact": self.pareto_exact}

    def __str__(self) -> str:
        rows = [f"{'module':<32} {'params':>12} {'bits':>4}"]
        rows += [f"{n:<32} {self.numel[n]:>12} {b:>4}" for n, b in self.bits.items()]
        rows.append(f"size {self.size_bytes:.1f} B ({self.average_bits:.3f} bits/weight), objective "
                    f"{self.objective:.6g}")
        return "\n".join(rows)
