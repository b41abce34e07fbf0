"""The Hessian behind gradients that carry a graph (``loss.backward(create_graph=True)``).

For closures that are plain functions of the parameters (``torch.optim.LBFGS`` style), the
Newton-type optimizers cannot rebuild the loss on a batch; they multiply with the Hessian
by differentiating the gradients once more. Like every second derivative in curvopt, that
happens here in ``curvature/``.
"""

from __future__ import annotations

import torch

from curvopt.linalg.linear_operator import LinearOperator


class GraphHessian(LinearOperator):
    """The Hessian of a loss whose gradients were computed with ``create_graph=True``, ``P x P``.

    For plain closures (``loss.backward(create_graph=True)`` inside): products by double
    backward through the parameters' ``.grad`` graphs, on the closure's whole batch.

    Args:
        params: The parameters; ``P`` is their total size, flat vectors follow their order.
        grads: Their gradients with their graphs; one without a graph is constant (a zero row block).
    """

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self.params, self.grads = params, grads
        n = sum(p.numel() for p in params)
        self.shape, self.dtype, self.device = (n, n), params[0].dtype, params[0].device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # one double backward per column: the graphs are the user's, so no vmap over them
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        parts = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in self.params]), self.params)]
        live = [i for i, g in enumerate(self.grads) if g.grad_fn is not None]  # constant gradients: zero rows
        out: list = [None] * len(self.params)
        if live:
            with torch.enable_grad():
                rows = torch.autograd.grad([self.grads[i] for i in live], self.params, [parts[i] for i in live],
                                           retain_graph=True, allow_unused=True)
            out = list(rows)
        return torch.cat([(o if o is not None else torch.zeros_like(p)).reshape(-1)
                          for o, p in zip(out, self.params)])
