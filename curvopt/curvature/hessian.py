"""Exact Hessian of the empirical risk, by reverse-over-reverse Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad_and_value, vjp

from curvopt.curvature.base import CurvatureOperator, TensorList
from curvopt.curvature.registry import register_curvature


@dataclass
class _HessianContext:
    loss: torch.Tensor
    pullback: Callable[[tuple[torch.Tensor, ...]], tuple[Any, ...]]


@register_curvature("hessian")
class HessianOperator(CurvatureOperator):
    """The Hessian ``d^2 L / d theta^2`` of the empirical risk, for any differentiable loss.

    A batch's context is the gradient together with its backward graph
    (``torch.func.vjp`` of ``grad``); a product pulls the vector back through it
    (Pearlmutter, 1994), so ``vmap`` batches the columns over one shared gradient.
    Reverse-over-reverse is used rather than forward-over-reverse because PyTorch's
    forward-mode rules for some losses' backward (e.g. ``mse_loss`` in 2.13) fail.
    With ``cache=True`` the gradient graph of every batch is kept between products.

    See :class:`~curvopt.curvature.base.CurvatureOperator` for the arguments.
    """

    def _batch_context(self, index: int, X: Any, y: torch.Tensor) -> _HessianContext:
        def risk(p: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return self.loss_fn(self._forward(p, X, index), y)

        _, pullback, loss = vjp(grad_and_value(risk, has_aux=False), self._primal(), has_aux=True)
        return _HessianContext(loss=loss, pullback=pullback)

    def _batch_matvec(self, ctx: _HessianContext, v: TensorList) -> tuple[torch.Tensor, TensorList]:
        (hv,) = ctx.pullback(tuple(v))
        return ctx.loss, list(hv)
