"""Simulated symmetric uniform quantization, per output channel."""

from __future__ import annotations

import torch


def quantize_symmetric(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q_b(w)``: symmetric uniform quantization to ``bits`` bits per output channel (dim 0).

    Each channel's scale is ``max|w_c| / (2^(b-1) - 1)``; values are rounded to the
    nearest level and clamped to ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` levels.
    """
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits must be an integer >= 2, got {bits!r}")
    levels = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    scale = flat.abs().amax(dim=1, keepdim=True) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(flat / scale), -levels, levels) * scale
    return q.reshape(w.shape)


def quantization_perturbation(weights: list[torch.Tensor], bits: int) -> float:
    """``sum ||Q_b(W) - W||^2`` over the given weight tensors (the HAWQ-V2 perturbation)."""
    return float(sum(((quantize_symmetric(w.detach(), bits) - w.detach()) ** 2).sum() for w in weights))
