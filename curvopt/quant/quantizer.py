"""Simulated (fake) uniform weight quantization: ``Q_b(W)`` at 2-8 bits."""

from __future__ import annotations

import torch

from curvopt.quant.plan import check_bits


class Quantizer:
    """Uniform fake quantization of a weight tensor, per output channel (dim 0).

    (Seam: the full quantizer -- asymmetric, group-wise, ``"mse"``/``"percentile"`` clipping,
    activations -- replaces this minimal symmetric min-max version.)
    """

    def __init__(self, *, clipping: str = "minmax") -> None:
        self.clipping = clipping

    def quantize(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        """``Q_b(weight)``: same shape and dtype, values on the quantization grid."""
        check_bits(bits, "Quantizer.quantize")
        levels = 2 ** (bits - 1) - 1
        w = weight.detach()
        flat = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
        scale = flat.abs().amax(dim=1, keepdim=True) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (torch.clamp(torch.round(flat / scale), -levels, levels) * scale).reshape(w.shape)

    def error(self, weight: torch.Tensor, bits: int) -> float:
        """``||Q_b(W) - W||^2`` (the HAWQ-V2 perturbation), in float64."""
        w = weight.detach()
        return float(((self.quantize(w, bits) - w).double() ** 2).sum())
