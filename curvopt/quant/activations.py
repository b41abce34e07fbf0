"""Fake quantization of the inputs of the planned modules: per-tensor ranges calibrated on data.

Each planned module's input (its first positional argument) is rounded to a uniform asymmetric
grid of ``2^b`` levels whose range is the minimum and maximum of that input over the calibration
batches, widened to contain 0 (so that zero, ReLU's floor and padding, stays exact, as PyTorch's
``MinMaxObserver``); values outside the range are clamped to it. This is the static per-tensor
activation quantization of HAWQ-V3 (8-bit activations) simulated in floating point.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from curvopt.curvature.data_loop import batch_size, is_single_batch, iterate_batches, to_model
from curvopt.curvature.model_state import curvature_pass
from curvopt.errors import EmptyDataError, QuantizationError


def fake_quantize_activation(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """``x`` rounded to the uniform grid of ``2^bits`` levels on ``[min(lo, 0), max(hi, 0)]``
    with an integer zero point (values outside are clamped); same shape and dtype.

    The grid step is ``(hi - lo) / (2^bits - 1)``: an input inside the range moves by at most half
    of it.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    top = 2**bits - 1
    scale = (hi - lo) / top
    if scale <= 0:  # an input that was always zero
        return torch.zeros_like(x)
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, top) - zero) * scale


def calibrate_input_ranges(model: nn.Module, modules: Mapping[str, nn.Module], calibration: Any,
                           where: str) -> dict[str, tuple[float, float]]:
    """``{name: (min, max)}`` of the floating-point input of each module in ``modules`` over the
    batches of ``calibration`` (an ``(X, y)`` pair, an iterable of them, or a tensor ``X`` of inputs;
    ``y`` is not used),
    with the model in eval mode and without gradients. Modes, buffers and the global random
    state are left as found. Modules whose input is not floating point (an embedding's indices)
    or that never ran are left out, with a warning naming them.

    Raises:
        EmptyDataError: naming ``where`` when the calibration data holds no samples.
    """
    ranges: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 0:
                lo, hi = x.detach().amin().float(), x.detach().amax().float()
                if name in ranges:
                    lo, hi = torch.minimum(lo, ranges[name][0]), torch.maximum(hi, ranges[name][1])
                ranges[name] = [lo, hi]
        return hook

    if isinstance(calibration, torch.Tensor):
        calibration = (calibration, None)
    batches = [calibration] if isinstance(calibration, tuple) and len(calibration) == 2 and (
        is_single_batch(calibration) or calibration[1] is None) else calibration
    ref = next(model.parameters())
    handles = [m.register_forward_pre_hook(record(n)) for n, m in modules.items()]
    samples = 0
    try:
        with curvature_pass(model), torch.no_grad():
            model.eval()
            for X, _ in iterate_batches(batches):
                if batch_size(X) == 0:
                    continue
                X = to_model(X, ref)
                if isinstance(X, (tuple, list)):
                    model(*X)
                else:
                    model(X)
                samples += batch_size(X)
    finally:
        for h in handles:
            h.remove()
    if samples == 0:
        raise EmptyDataError(f"{where}: the calibration data holds no samples")
    missing = [n for n in modules if n not in ranges]
    if missing:
        warnings.warn(f"{where}: the inputs of {', '.join(map(repr, missing))} are not quantized (not "
                      "floating point, or the module did not run on the calibration data)", stacklevel=3)
    out = {}
    for n, (lo, hi) in ranges.items():
        lo_f, hi_f = float(lo), float(hi)
        if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
            raise QuantizationError(f"{where}: the calibration input of {n!r} holds NaN or Inf values; "
                                    "check the calibration batches")
        out[n] = (lo_f, hi_f)
    return out


def add_input_quantizers(modules: Mapping[str, nn.Module], ranges: Mapping[str, tuple[float, float]],
                         bits: int) -> list[RemovableHandle]:
    """Forward pre-hooks fake-quantizing the first input of each module that has a range; the
    caller removes them (``handle.remove()``)."""
    def quantize_input(lo: float, hi: float):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                return (fake_quantize_activation(args[0], lo, hi, bits), *args[1:])
            return None
        return hook

    return [modules[n].register_forward_pre_hook(quantize_input(*ranges[n])) for n in modules if n in ranges]
