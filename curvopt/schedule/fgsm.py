"""FGSM examples for ABSA (Yao et al., arXiv:1810.01021; Goodfellow et al., arXiv:1412.6572)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from curvopt.curvature.model_state import curvature_pass
from curvopt.errors import OptionError


class FGSM:
    """Fast gradient sign examples ``clamp(x + eps * sign(grad_x loss(model(x), y)), lo, hi)``.

    The gradient is taken with the model in eval mode inside
    :func:`~curvopt.curvature.model_state.curvature_pass` (mode, buffers and RNG restored; the
    parameters' ``.grad`` untouched). ``eps`` is in the data's units; ``(lo, hi)`` is ``clamp`` or,
    by default, the range of the training inputs (set by the schedule).

    As ``adversarial=`` of :class:`~curvopt.AdaptiveBatchSize` (ABSA), ``fraction`` of each batch is
    replaced by FGSM examples of those samples; the fraction halves at each batch growth and is 0 at
    the maximum batch and in the second half of training (when the schedule knows ``epochs``).

    Args:
        eps: Step size (> 0).
        fraction: Initial share of each batch made adversarial, in ``[0, 1]``.
        clamp: ``(lo, hi)`` bounds of the inputs (default: the training data's min and max).
    """

    def __init__(self, eps: float, fraction: float = 0.2, *, clamp: tuple[float, float] | None = None) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
            raise OptionError(f"FGSM eps must be a positive number (in the data's units), got {eps!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise OptionError(f"FGSM fraction must be in [0, 1], got {fraction!r}")
        if clamp is not None and (len(clamp) != 2 or not clamp[0] <= clamp[1]):
            raise OptionError(f"FGSM clamp must be (lo, hi) with lo <= hi, got {clamp!r}")
        self.eps, self.fraction, self.clamp = float(eps), float(fraction), clamp

    def __repr__(self) -> str:
        return f"FGSM(eps={self.eps}, fraction={self.fraction}, clamp={self.clamp})"

    def fraction_at(self, growths: int, at_max: bool, epoch: int, epochs: int | None) -> float:
        """The adversarial share after ``growths`` batch growths: ``fraction / 2**growths``, 0 at the
        maximum batch or from epoch ``epochs // 2`` on (the second half of training)."""
        if at_max or (epochs is not None and 2 * epoch >= epochs):
            return 0.0
        return self.fraction / 2 ** growths

    def perturb(self, model: nn.Module, loss_fn: Any, X: torch.Tensor, y: torch.Tensor, *,
                micro_batch_size: int | None = None) -> torch.Tensor:
        """FGSM examples of ``X`` ``[N, ...]`` (same shape and dtype), computed in micro-batches."""
        if self.clamp is None:
            raise OptionError("FGSM needs the data's range: pass clamp=(lo, hi) (a schedule sets it)")
        lo, hi = self.clamp
        out = []
        mb = micro_batch_size or len(X)
        # detached stand-ins for the parameters: no gradient to them, and a KFAC optimizer (which knows its
        # parameters by identity) records nothing of this pass, whatever the order of the user's loop
        params = {n: p.detach() for n, p in model.named_parameters()}
        with curvature_pass(model):
            model.eval()
            for s in range(0, len(X), mb):
                x = X[s:s + mb].detach().clone().requires_grad_(True)
                loss = loss_fn(torch.func.functional_call(model, params, (x,)), y[s:s + mb])
                (g,) = torch.autograd.grad(loss, x)
                out.append((x.detach() + self.eps * g.sign()).clamp_(lo, hi))
        return torch.cat(out)
