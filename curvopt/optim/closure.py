"""Closures that know their mini-batch, so an optimizer can build any curvature on a sub-sample.

``closure = curvopt.batch_closure(model, loss_fn, X, y)`` behaves like the usual
``torch.optim.LBFGS`` closure when called (zero the gradients, forward, backward, return
the loss), and also exposes the model, the loss and the batch, which the Newton-type
optimizers need to build a registry curvature (``"ggn"``, ``"fisher"``, ...) on a random
``curvature_fraction`` of the batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


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

    def loss(self) -> torch.Tensor:
        """The loss on the batch (with a graph when gradients are enabled); no backward."""
        return self.loss_fn(self.model(self.X), self.y)

    def __call__(self) -> torch.Tensor:
        """Zero the model's gradients, compute the loss, backpropagate, return it (LBFGS style)."""
        self.model.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        return loss

    def subsample(self, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random ``ceil(fraction N)`` samples of the batch (all of it for ``fraction == 1``)."""
        n = len(self.X)
        m = max(1, math.ceil(fraction * n))
        if m >= n:
            return self.X, self.y
        index = torch.randperm(n, generator=generator)[:m].to(self.X.device)
        return self.X[index], self.y[index]


def batch_closure(model: nn.Module, loss_fn: Any, X: torch.Tensor, y: torch.Tensor) -> BatchClosure:
    """A closure over one mini-batch for ``optimizer.step(closure)``.

    Example:
        >>> opt = curvopt.TrustRegion(model.parameters(), curvature="ggn", curvature_fraction=0.25)
        >>> for X, y in loader:
        ...     opt.step(curvopt.batch_closure(model, loss_fn, X, y))
    """
    return BatchClosure(model, loss_fn, X, y)
