"""``fake_quantized``: a model's planned weights quantized in place for the length of a block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from curvopt.errors import QuantizationError
from curvopt.quant.activations import add_input_quantizers, calibrate_input_ranges
from curvopt.quant.plan import check_bits, plan_bits, resolve_modules
from curvopt.quant.quantizer import Quantizer


def planned_weights(model: nn.Module, plan: Any, where: str) -> list[tuple[nn.Parameter, int, list[str]]]:
    """``(weight, bits, owners)`` for each distinct ``weight`` of the planned modules: a weight tied
    between several planned modules appears once, at the largest of their bit widths.

    Raises:
        QuantizationError: for a malformed plan or a name that is not a quantizable module.
    """
    bits = plan_bits(plan)
    modules = resolve_modules(model, bits, where)
    out: dict[int, tuple[nn.Parameter, int, list[str]]] = {}
    for name, m in modules.items():
        w = m.weight
        if id(w) in out:
            _, b, owners = out[id(w)]
            out[id(w)] = (w, max(b, bits[name]), [*owners, name])
        else:
            out[id(w)] = (w, bits[name], [name])
    return list(out.values())


def quantize_in_place(weights: list[tuple[nn.Parameter, int, list[str]]], quantizer: Any,
                      saved: list[torch.Tensor]) -> None:
    """Overwrite each weight with its ``quantizer.quantize(w, bits)``, appending the original to
    ``saved`` first (so that :func:`restore` puts back what was changed, also when this raises
    part way)."""
    with torch.no_grad():
        for w, b, owners in weights:
            try:
                q = quantizer.quantize(w, b)
            except QuantizationError as e:
                raise QuantizationError(f"weight of {', '.join(map(repr, owners))}: {e}") from None
            saved.append(w.detach().clone())
            w.copy_(q)


def restore(weights: list[tuple[nn.Parameter, int, list[str]]], saved: list[torch.Tensor]) -> None:
    """Copy the saved originals back into the weights, bit for bit."""
    with torch.no_grad():
        for (w, _, _), s in zip(weights, saved):
            w.copy_(s)


@contextmanager
def fake_quantized(model: nn.Module, plan: Any, quantizer: Quantizer | None = None, *,
                   activation_bits: int | None = None, calibration: Any = None) -> Iterator[nn.Module]:
    """Quantize the ``weight`` of every module in ``plan`` in place for the length of the block;
    on exit, exceptions included, restore every weight bit for bit.

    A weight tied between several planned modules (an embedding and the output layer) is quantized
    once, at the largest bit width among its planned owners; a module outside the plan that shares
    it sees it quantized too. With ``activation_bits`` the input of each planned module is also
    fake-quantized (per tensor, asymmetric uniform, by a forward pre-hook) on the range
    (min, max) that its input takes on the ``calibration`` batches, run once on entry in eval mode
    with the weights already quantized (the deployed network); modes, buffers and the global
    random state are left as found and the hooks are removed on exit.

    Args:
        model: The network; its parameters are the same objects inside the block.
        plan: ``{module name: bits}``, or an object with such a ``.bits`` (a ``BitPlan``).
        quantizer: Default ``Quantizer()`` (symmetric, per output channel, MSE clipping); anything
            with ``quantize(weight, bits)``.
        activation_bits: 2-8 bits for the planned modules' inputs; ``None``: full precision.
        calibration: An ``(X, y)`` batch, an iterable of them or a tensor ``X`` of inputs; required
            with ``activation_bits``.

    Raises:
        QuantizationError: for a bad plan (unknown module, bits outside 2..8), ``activation_bits``
            without ``calibration``, or non-finite weights; raised before anything is changed
            or with everything restored.

    Example::

        with curvopt.quant.fake_quantized(model, {"0": 4, "2": 8}):
            accuracy = evaluate(model)
    """
    where = "fake_quantized"
    weights = planned_weights(model, plan, f"{where}(plan=...)")
    if activation_bits is not None:
        check_bits(activation_bits, f"{where}(activation_bits=...)")
        if calibration is None:
            raise QuantizationError(f"{where}(activation_bits={activation_bits}) needs calibration=..., an (X, y) "
                                    "batch or an iterable of batches on which to measure the input ranges")
    quantizer = Quantizer() if quantizer is None else quantizer
    modes = [(m, m.training) for m in model.modules()]
    saved: list[torch.Tensor] = []
    handles = []
    try:
        quantize_in_place(weights, quantizer, saved)
        if activation_bits is not None:
            modules = resolve_modules(model, plan_bits(plan), f"{where}(plan=...)")
            ranges = calibrate_input_ranges(model, modules, calibration, f"{where}(calibration=...)")
            handles = add_input_quantizers(modules, ranges, activation_bits)
        yield model
    finally:
        for h in handles:
            h.remove()
        restore(weights[:len(saved)], saved)
        for m, training in modes:
            m.training = training
