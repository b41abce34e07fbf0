"""Empirical Fisher: outer products of per-sample gradients at the true labels."""

from __future__ import annotations

import torch

from curvopt.curvature.registry import register_curvature
from curvopt.curvature.sandwich import JacobianSandwich, SandwichContext, outer_product


@register_curvature("empirical_fisher")
class EmpiricalFisherOperator(JacobianSandwich):
    """``c * sum_n grad l_n grad l_n^T`` with ``c`` the loss reduction's factor.

    ``c`` is ``1/N`` for mean-reduced cross entropy, ``1/(N*outputs)`` for mean-reduced
    MSE and BCE, ``1`` for sum, so the matrix is on the scale of the GGN and Fisher
    (Kunstner et al., 2019, discuss when it is, and is not, a good curvature proxy).
    Options as for :class:`~curvopt.curvature.base.CurvatureOperator`.
    """

    def _output_data(self, ctx: SandwichContext) -> torch.Tensor:
        return self.spec.gradients(ctx.out.detach(), ctx.y).unsqueeze(0)

    def _output_product(self, ctx: SandwichContext, u: torch.Tensor) -> torch.Tensor:
        return outer_product(ctx.extra, u, self.spec.scale(ctx.out, ctx.y))
