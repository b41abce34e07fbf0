"""True Fisher information by Monte-Carlo sampled labels (Martens, 2014 / 2020)."""

from __future__ import annotations

from typing import Any

import torch

from curvopt.curvature.registry import register_curvature
from curvopt.curvature.sandwich import JacobianSandwich, SandwichContext, outer_product
from curvopt.errors import OptionError


@register_curvature("fisher")
class FisherOperator(JacobianSandwich):
    """Monte-Carlo estimate of the Fisher ``E_{y~p(y|f)}[J^T g g^T J]``.

    Labels are drawn from the model's predictive distribution (categorical for cross
    entropy, Bernoulli for BCE, Gaussian with variance 1/2 for MSE so that the
    expectation is the GGN). The draws are fixed for the operator's lifetime (it is one
    symmetric matrix): batch ``i`` uses a generator seeded with ``seed`` and ``i``;
    :meth:`resample` draws new labels.

    Args:
        mc_samples: Label draws per sample; the estimate converges to the GGN as
            ``1 / sqrt(mc_samples)``.
        seed: Seed of the label draws.
        **options: As for :class:`~curvopt.curvature.base.CurvatureOperator`.
    """

    def __init__(self, model, loss_fn, data, *, mc_samples: int = 1, seed: int = 0, **options: Any):
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise OptionError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        super().__init__(model, loss_fn, data, **options)
        self.mc_samples = mc_samples
        self.seed = int(seed)

    def resample(self, seed: int | None = None) -> None:
        """Draw new labels at the next product (with ``seed``, or the next seed)."""
        self.seed = self.seed + 1 if seed is None else int(seed)
        self.clear_cache()

    def _output_data(self, ctx: SandwichContext) -> torch.Tensor:
        generator = torch.Generator(device=ctx.out.device)
        # Same labels for the same batch on every pass, independent across batches.
        generator.manual_seed(self.seed * 1_000_003 + ctx.index)
        return self.spec.sampled_gradients(ctx.out.detach(), self.mc_samples, generator, y=ctx.y)

    def _output_product(self, ctx: SandwichContext, u: torch.Tensor) -> torch.Tensor:
        return outer_product(ctx.extra, u, self.spec.scale(ctx.out, ctx.y))
