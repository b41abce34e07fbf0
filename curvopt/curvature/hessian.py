"""Exact Hessian of the empirical risk, by forward-over-reverse Hessian-vector products."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.func import grad_and_value, jvp, linearize

from curvopt.curvature.base import CurvatureOperator, TensorList
from curvopt.curvature.registry import register_curvature


@dataclass
class _HessianContext:
    risk: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]
    primal: tuple[torch.Tensor, ...]
    loss: torch.Tensor | None = None
    linear: Callable[..., Any] | None = None


@register_curvature("hessian")
class HessianOperator(CurvatureOperator):
    """The Hessian ``d^2 L / d theta^2`` of the empirical risk, for any differentiable loss.

    Each product is a forward-mode derivative of the reverse-mode gradient
    (Pearlmutter, 1994), composed with :mod:`torch.func` so that matrix products batch
    the columns with ``vmap``. With ``cache=True`` each batch is linearized once
    (:func:`torch.func.linearize`), after which a product costs only the tangent pass.

    See :class:`~curvopt.curvature.base.CurvatureOperator` for the arguments.
    """

    def _batch_context(self, index: int, X: Any, y: torch.Tensor) -> _HessianContext:
        def risk(p: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return self.loss_fn(self._forward(p, X), y)

        ctx = _HessianContext(risk=risk, primal=self._primal())
        if self.cache:
            with warnings.catch_warnings():
                # linearize's constant folding warns about an internal FX detail
                warnings.simplefilter("ignore", UserWarning)
                (_, loss), ctx.linear = linearize(grad_and_value(risk), ctx.primal)
            ctx.loss = loss
        return ctx

    def _batch_matvec(self, ctx: _HessianContext, v: TensorList) -> tuple[torch.Tensor, TensorList]:
        if ctx.linear is not None:
            hv, _ = ctx.linear(tuple(v))
            return ctx.loss, list(hv)
        (_, loss), (hv, _) = jvp(grad_and_value(ctx.risk), (ctx.primal,), (tuple(v),))
        return loss, list(hv)
