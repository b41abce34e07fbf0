"""``fake_quantized``: a model's planned weights quantized in place for the length of a block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from curvopt.quant.plan import plan_bits, resolve_modules
from curvopt.quant.quantizer import Quantizer


@contextmanager
def fake_quantized(model: nn.Module, plan: Any, quantizer: Quantizer | None = None) -> Iterator[nn.Module]:
    """Quantize the ``weight`` of every module in ``plan`` (``{name: bits}`` or a plan with
    ``.bits``) in place; on exit, exceptions included, restore every weight bit for bit.

    Example::

        with curvopt.quant.fake_quantized(model, {"0": 4, "2": 8}):
            accuracy = evaluate(model)
    """
    bits = plan_bits(plan)
    modules = resolve_modules(model, bits, "fake_quantized(plan=...)")
    quantizer = Quantizer() if quantizer is None else quantizer
    saved: dict[int, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, m in modules.items():
                w = m.weight
                if id(w) in saved:  # a tied weight: quantized once
                    continue
                saved[id(w)] = w.detach().clone()
                w.copy_(quantizer.quantize(w, bits[name]))
        yield model
    finally:
        with torch.no_grad():
            for m in modules.values():
                if id(m.weight) in saved:
                    m.weight.copy_(saved[id(m.weight)])
