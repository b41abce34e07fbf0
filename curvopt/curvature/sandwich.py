"""Curvatures of the form ``J^T M J``: the Jacobian of the network output around an
output-space matrix ``M`` (the loss Hessian for the GGN, gradient outer products for
the Fisher matrices). Subclasses supply only ``M``; the Jacobian products live here.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp, linearize, vjp

from curvopt.curvature.base import BatchCurvatureOperator, TensorList
from curvopt.curvature.losses import LossSpec, loss_spec
from curvopt.curvature.model_state import draws_random_numbers, seed_batch


@dataclass
class SandwichContext:
    """One batch: network output, the loss, Jacobian products and ``M``'s data."""

    out: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor
    jvp: Callable[[TensorList], torch.Tensor]
    vjp: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    index: int = 0
    extra: Any = None


def missing_forward_ad(error: BaseException) -> bool:
    """Whether ``error`` says that an operation has no forward-mode derivative (e.g. PyTorch's
    ``mkldnn_rnn_layer`` for float32 LSTMs on CPU, fused attention kernels)."""
    text = str(error).lower()
    return isinstance(error, (NotImplementedError, RuntimeError)) and (
        "forward ad" in text or "forward-mode" in text or "forward mode" in text or "jvp" in text
    )


class JacobianSandwich(BatchCurvatureOperator):
    """Base of GGN, Fisher and empirical Fisher: ``sum_b w_b J_b^T M_b J_b``.

    Needs a loss with a closed form (``CrossEntropyLoss``, ``MSELoss``,
    ``BCEWithLogitsLoss``, reduction ``"mean"`` or ``"sum"``).

    Jacobian-vector products ``J v`` are taken in forward mode (one forward pass carrying the
    tangent). Where the model has an operation without a forward-mode derivative (float32 LSTM/GRU
    on CPU, some fused kernels), the operator switches once, at the first product that meets it,
    to reverse mode (``J v`` as the vector-Jacobian product of the linear map ``u -> J^T u``): the
    same numbers, about one more backward pass per product. A model that draws random numbers in
    its forward pass (dropout in training mode) uses reverse mode too, found by one probe forward
    at the first product: then every pass runs one forward per batch, so all products see the same
    masks (PyTorch's attention consumes the random stream differently inside ``torch.func``
    transforms than outside, so seeding alone would not make forward-mode products agree).
    ``op.jacobian_mode`` (also in the operator's ``repr``) says which is in use.
    """

    cache_modes = (False, True, "linearize")

    def __init__(self, model, loss_fn, data, **options: Any) -> None:
        super().__init__(model, loss_fn, data, **options)
        self.spec: LossSpec = loss_spec(loss_fn, self.name, options.get("reduction"))
        #: ``"forward"`` or ``"reverse"``: how ``J v`` is computed (see the class docstring).
        self.jacobian_mode = "forward"
        self._forward_checked = False
        self._stochastic: bool | None = None

    def _repr_fields(self) -> dict[str, Any]:
        return {"jacobian_mode": self.jacobian_mode}

    def _use_reverse(self, error: BaseException) -> None:
        if not missing_forward_ad(error):
            raise error
        self.jacobian_mode = "reverse"

    def _check_randomness(self, index: int, X: Any) -> None:
        """Once per operator: a stochastic forward pass (train-mode dropout) switches to reverse mode,
        where each batch's pass runs a single forward (see the class docstring)."""
        if self._stochastic is None:
            seed_batch(index, getattr(self, "seed", 0))
            self._stochastic = draws_random_numbers(self.model, lambda: self._forward(self._primal(), X))
            if self._stochastic:
                self.jacobian_mode = "reverse"

    def _batch_context(self, index: int, X: Any, y: torch.Tensor) -> SandwichContext:
        self._check_randomness(index, X)
        primal = self._primal()

        def net(*p: torch.Tensor) -> torch.Tensor:
            return self._forward(p, X, index)

        out, pullback = vjp(net, *primal)
        if self.jacobian_mode == "forward" and not self._forward_checked and self.cache != "linearize":
            # the products run J v lazily, inside vmap: find out here, once, whether forward mode works
            try:
                jvp(net, primal, tuple(torch.zeros_like(p) for p in primal))
                self._forward_checked = True
            except (NotImplementedError, RuntimeError) as error:
                self._use_reverse(error)
        if self.cache == "linearize" and self.jacobian_mode == "forward":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # an FX detail of linearize
                    _, push = linearize(net, *primal)
            except (NotImplementedError, RuntimeError) as error:
                self._use_reverse(error)
        if self.cache == "linearize" and self.jacobian_mode == "forward":

            def push_forward(v: TensorList) -> torch.Tensor:
                return push(*v)
        elif self.cache or self.jacobian_mode == "reverse":
            # J v as the vjp of the linear map u -> J^T u: its graph is built once per
            # batch (about one gradient) and replayed by every product, where
            # re-running jvp would redo the forward pass each time.
            _, transpose = vjp(pullback, torch.zeros_like(out))

            def push_forward(v: TensorList) -> torch.Tensor:
                return transpose(tuple(v))[0]
        else:

            def push_forward(v: TensorList) -> torch.Tensor:
                return jvp(net, primal, tuple(v))[1]

        return self._context(index, out, y, push_forward, pullback)

    def _context(self, index: int, out: torch.Tensor, y: torch.Tensor, push: Any, pull: Any) -> SandwichContext:
        """The batch's context: output, loss and ``M``'s data (both product paths share it)."""
        ctx = SandwichContext(out=out, y=y, loss=self.loss_fn(out, y), jvp=push, vjp=pull, index=index)
        ctx.extra = self._output_data(ctx)
        return ctx

    def _batch_single_product(
        self, index: int, X: Any, y: torch.Tensor, v: TensorList
    ) -> tuple[torch.Tensor, TensorList] | None:
        # One forward pass carries J v as a forward-mode tangent and records the graph
        # that the backward pass then uses: no second forward, as jvp + vjp would need.
        self._check_randomness(index, X)
        if self.jacobian_mode != "forward":
            return None  # context + matvec, in reverse mode
        primal = [p.detach().requires_grad_() for p in self._params]
        try:
            with torch.enable_grad(), fwAD.dual_level():
                dual = self._forward([fwAD.make_dual(p, t) for p, t in zip(primal, v)], X, index)
                out, Jv = fwAD.unpack_dual(dual)
                Jv = torch.zeros_like(out) if Jv is None else Jv.detach()
        except (NotImplementedError, RuntimeError) as error:
            self._use_reverse(error)
            return None
        self._forward_checked = True
        ctx = self._context(index, out.detach(), y, None, None)
        u = self._output_product(ctx, Jv)
        grads = torch.autograd.grad(out, primal, u, allow_unused=True)
        return ctx.loss, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, primal)]

    def _batch_matvec(self, ctx: SandwichContext, v: TensorList) -> tuple[torch.Tensor, TensorList]:
        u = self._output_product(ctx, ctx.jvp(v))
        return ctx.loss, list(ctx.vjp(u))

    def _output_data(self, ctx: SandwichContext) -> Any:
        """Per-batch data for ``M`` that does not depend on the vector."""
        return None

    @abstractmethod
    def _output_product(self, ctx: SandwichContext, u: torch.Tensor) -> torch.Tensor:
        """``M u`` for an output-space tangent ``u`` shaped like the network output."""


def outer_product(grads: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale / S * sum_s g_s (g_s . u)``, dot products per sample.

    Args:
        grads: ``[S, N, *out]`` per-sample output gradients for ``S`` label draws.
        u: ``[N, *out]`` output-space tangent.
    """
    coef = (grads * u.unsqueeze(0)).flatten(2).sum(-1)  # [S, N]
    coef = coef.reshape(*coef.shape, *([1] * (grads.dim() - 2)))
    return (scale / grads.shape[0]) * (coef * grads).sum(0)
