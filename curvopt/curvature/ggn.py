"""Generalized Gauss-Newton matrix ``J^T (d^2 loss / d out^2) J`` (Schraudolph, 2002)."""

from __future__ import annotations

import torch

from curvopt.curvature.registry import register_curvature
from curvopt.curvature.sandwich import JacobianSandwich, SandwichContext


@register_curvature("ggn")
class GGNOperator(JacobianSandwich):
    """The generalized Gauss-Newton matrix of the empirical risk.

    Positive semi-definite for the supported (convex) losses; equals the Hessian when
    the network is linear in its parameters. Options as for
    :class:`~curvopt.curvature.base.CurvatureOperator`.
    """

    def _output_product(self, ctx: SandwichContext, u: torch.Tensor) -> torch.Tensor:
        return self.spec.hessian_product(ctx.out, ctx.y, u)
