"""What a bit allocation hands to the quantized model: ``{module name: bits}``."""

from __future__ import annotations

from collections.abc import Mapping
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
