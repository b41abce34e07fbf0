"""Closures that know their mini-batch, so an optimizer can build any curvature on a sub-sample.

``closure = curvopt.batch_closure(model, loss_fn, X, y)`` behaves like the usual
``torch.optim.LBFGS`` closure when called (zero the gradients, forward, backward, return
the loss), and also exposes the model, the loss and the batch, which the Newton-type
optimizers need to build a registry curvature (``"ggn"``, ``"fisher"``, ...) on a random
``curvature_fraction`` of the batch.

Under ``torch.distributed`` each rank passes a closure over its own share of the batch; the
optimizers combine the shares (see :class:`curvopt.optim.second_order.SecondOrderOptimizer`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from curvopt.curvature.params import unwrap_model


class BatchClosure:
    """``loss_fn(model(X), y)`` on one mini-batch.

    Attributes:
        model: The network.
        loss_fn: The loss, a scalar of ``(outputs, targets)``.
        X: Inputs ``[N, ...]``.
        y: Targets ``[N, ...]``.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, X: torch.Tensor, y: torch.Tensor) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"batch_closure: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"batch_closure: loss_fn must be callable, got {type(loss_fn).__name__}")
        if len(X) != len(y) or len(X) == 0:
            raise ValueError(f"batch_closure: X and y must hold the same positive number of samples, "
                             f"got {len(X)} and {len(y)}")
        self.model, self.loss_fn, self.X, self.y = model, loss_fn, X, y

    @property
    def network(self) -> nn.Module:
        """The model, looked through a ``DistributedDataParallel`` wrapper: the optimizers differentiate
        it with ``torch.autograd.grad`` and reduce the gradients themselves, so DDP's reducer (which
        would average them with equal weights, and expects a ``backward``) must not take part."""
        return unwrap_model(self.model)

    def loss(self) -> torch.Tensor:
        """The loss on the batch (with a graph when gradients are enabled); no backward."""
        return self.loss_fn(self.network(self.X), self.y)

    def weight(self) -> tuple[float, bool]:
        """``(w, mean)``: this batch's weight in a loss over several batches (ranks), and whether that
        loss is their weighted mean (``w`` = what torch's mean divides by: samples, or counted targets,
        :func:`curvopt.curvature.losses.loss_terms`) or their sum (``w = 1``), as the data loop weighs
        the curvature's batches."""
        from curvopt.curvature.losses import loss_reduction, loss_terms

        if (loss_reduction(self.loss_fn) or "mean") == "sum":
            return 1.0, False
        return float(loss_terms(self.loss_fn, self.y, len(self.X))), True

    def __call__(self) -> torch.Tensor:
        """Zero the model's gradients, compute the loss, backpropagate, return it (LBFGS style)."""
        self.model.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        return loss

    def subsample(self, fraction: float, generator: torch.Generator,
                  counts: list[int] | None = None, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A random ``ceil(fraction N)`` samples of the batch (all of it for ``fraction == 1``).

        Args:
            fraction: Fraction of the samples, in (0, 1].
            generator: The random source (the same state on every rank).
            counts: Samples of each rank's share of the batch, in rank order, when the batch is split
                over ranks (``None``: this closure holds all of it). The draw is made over the global
                indices ``0..sum(counts)-1``, as one process holding the whole batch would make it, and
                this rank keeps the drawn indices of its share: the ranks' sub-samples together are that
                one process's, whatever the number of ranks. Should a rank's share then be empty (every
                rank needs samples), the draw takes further indices of the same permutation until each
                rank has one (the same on every rank).
            rank: This rank's position in ``counts``.
        """
        n = len(self.X)
        counts = [n] if counts is None else [int(c) for c in counts]
        total = sum(counts)
        m = max(1, math.ceil(fraction * total))
        if m >= total:
            return self.X, self.y
        perm = torch.randperm(total, generator=generator)
        offsets = [sum(counts[:r]) for r in range(len(counts))]
        owner = torch.bucketize(perm, torch.tensor(offsets[1:], dtype=perm.dtype), right=True)
        # the shortest prefix of the permutation that gives every rank a sample (m itself as a rule)
        firsts = [int(torch.nonzero(owner == r)[0, 0]) for r in range(len(counts)) if counts[r] > 0]
        m = max(m, max(firsts) + 1)
        index = perm[:m][owner[:m] == rank] - offsets[rank]
        return self.X[index.to(self.X.device)], self.y[index.to(self.y.device)]


def batch_closure(model: nn.Module, loss_fn: Any, X: torch.Tensor, y: torch.Tensor) -> BatchClosure:
    """A closure over one mini-batch for ``optimizer.step(closure)``.

    Example:
        >>> opt = curvopt.TrustRegion(model.parameters(), curvature="ggn", curvature_fraction=0.25)
        >>> for X, y in loader:
        ...     opt.step(curvopt.batch_closure(model, loss_fn, X, y))
    """
    return BatchClosure(model, loss_fn, X, y)
