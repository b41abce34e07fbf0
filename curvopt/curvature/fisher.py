"""True Fisher information by Monte-Carlo sampled labels (Martens, 2014 / 2020)."""

from __future__ import annotations

from typing import Any

import torch

from curvopt.curvature.base import TensorList
from curvopt.curvature.data_loop import rank_sample_offset
from curvopt.curvature.losses import SampleDraws
from curvopt.curvature.registry import register_curvature
from curvopt.curvature.sandwich import JacobianSandwich, SandwichContext, outer_product
from curvopt.errors import OptionError


@register_curvature("fisher")
class FisherOperator(JacobianSandwich):
    """Monte-Carlo estimate of the Fisher ``E_{y~p(y|f)}[J^T g g^T J]``.

    Labels are drawn from the model's predictive distribution (categorical for cross
    entropy, Bernoulli for BCE, Gaussian with variance 1/2 for MSE so that the
    expectation is the GGN). The draws are fixed for the operator's lifetime (it is one
    symmetric matrix) and keyed by ``seed`` and each sample's global index
    (:class:`~curvopt.curvature.losses.SampleDraws`): a sample gets the same labels whatever
    batch it sits in, and ranks of a process group holding shards of the data (in rank order)
    reproduce one process on all of it exactly. :meth:`resample` draws new labels.

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
        self._rank_offset: int | None = None  # global index of this rank's first draw unit, found once
        self._units_seen = 0

    def resample(self, seed: int | None = None) -> None:
        """Draw new labels at the next product (with ``seed``, or the next seed)."""
        self.seed = self.seed + 1 if seed is None else int(seed)
        self.clear_cache()

    def _matmat_pass(self, V: TensorList) -> TensorList:
        if self._rank_offset is None:  # before the pass: its products need it, and it costs a collective
            self._rank_offset = rank_sample_offset(
                self.data, self.process_group, lambda X, y: self.spec.draw_units(self._to_model(y)))
        self._units_seen = 0  # the products visit the batches in order: a running count keys them
        return super()._matmat_pass(V)

    def _output_data(self, ctx: SandwichContext) -> torch.Tensor:
        draws = SampleDraws(self.seed, self._rank_offset + self._units_seen)
        self._units_seen += self.spec.draw_units(ctx.y)
        return self.spec.sampled_gradients(ctx.out.detach(), self.mc_samples, draws, y=ctx.y)

    def _output_product(self, ctx: SandwichContext, u: torch.Tensor) -> torch.Tensor:
        return outer_product(ctx.extra, u, self.spec.scale(ctx.out, ctx.y))
