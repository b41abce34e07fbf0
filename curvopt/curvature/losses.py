"""Output-space quantities of the supported losses, in closed form.

For a batch with network outputs ``f`` the loss is ``L = c * sum_n l(f_n, y_n)``
where ``c`` is ``1`` for ``reduction="sum"`` and ``1 / (number of terms)`` for
``"mean"`` (PyTorch's convention: samples for cross entropy, every output entry
for MSE and BCE). The Gauss-Newton family needs three things from a loss:

* ``hessian_product``: ``c * d^2 l / df^2`` applied to output-space vectors;
* ``gradients``: per-sample ``d l_n / d f_n`` at the true labels (empirical Fisher);
* ``sampled_gradients``: the same at labels drawn from the model's predictive
  distribution (true Fisher), with ``E[g g^T] = d^2 l / df^2``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from curvopt.errors import UnsupportedLossError

SUPPORTED_LOSSES = ("CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss")
REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class LossSpec(ABC):
    """Closed-form output-space derivatives of one loss. Subclasses per loss type."""

    reduction: str

    def scale(self, out: torch.Tensor) -> float:
        """The factor ``c`` between the batch loss and the sum of per-sample losses."""
        return 1.0 if self.reduction == "sum" else 1.0 / self._terms(out)

    def _terms(self, out: torch.Tensor) -> int:
        return out.numel()

    @abstractmethod
    def hessian_product(self, out: torch.Tensor, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``c * (d^2 l / df^2) V`` for ``V`` shaped like ``out``."""

    @abstractmethod
    def gradients(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample ``d l_n / d f_n`` (unscaled), shaped like ``out``."""

    @abstractmethod
    def hessian_sqrt(self, out: torch.Tensor) -> torch.Tensor:
        """``[C, *out.shape]`` vectors ``h_c`` per sample with ``d^2 l / df^2 = sum_c h_c h_c^T``
        (unscaled), for outputs ``[N, C]``."""

    @abstractmethod
    def sampled_gradients(
        self, out: torch.Tensor, samples: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """``[samples, *out.shape]`` gradients at labels drawn from the model."""


@dataclass(frozen=True)
class CrossEntropySpec(LossSpec):
    """Softmax cross entropy over dimension 1 (``[N, C]`` or ``[N, C, *spatial]``)."""

    def _terms(self, out: torch.Tensor) -> int:
        return out.numel() // out.shape[1]

    def hessian_product(self, out, y, V):
        p = torch.softmax(out, dim=1)
        pv = p * V
        return self.scale(out) * (pv - p * pv.sum(dim=1, keepdim=True))

    def gradients(self, out, y):
        p = torch.softmax(out, dim=1)
        if y.dtype.is_floating_point:  # class probabilities
            return p * y.sum(dim=1, keepdim=True) - y
        return p - _one_hot(y, out.shape[1], dim=1, like=out)

    def hessian_sqrt(self, out):
        # diag(p) - p p^T = sum_c sqrt(p_c)(e_c - p) (sqrt(p_c)(e_c - p))^T since sum_c p_c = 1
        p = torch.softmax(out, dim=1)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return p.T.sqrt()[:, :, None] * (eye[:, None, :] - p[None])

    def sampled_gradients(self, out, samples, generator):
        p = torch.softmax(out, dim=1)
        probs = p.movedim(1, -1).reshape(-1, out.shape[1])
        # A non-finite output is reported by the data loop with its batch index;
        # sample something harmless here instead of failing inside multinomial.
        probs = torch.where(torch.isfinite(probs), probs, torch.ones_like(probs))
        labels = torch.multinomial(probs, samples, replacement=True, generator=generator)
        onehot = F.one_hot(labels.T, out.shape[1]).to(out.dtype)  # [S, N*, C]
        onehot = onehot.reshape(samples, *p.movedim(1, -1).shape).movedim(-1, 2)
        return p.unsqueeze(0) - onehot


@dataclass(frozen=True)
class MSESpec(LossSpec):
    """Squared error ``l = ||f - y||^2`` summed over the output entries of a sample."""

    def hessian_product(self, out, y, V):
        return 2.0 * self.scale(out) * V

    def gradients(self, out, y):
        return 2.0 * (out - y)

    def hessian_sqrt(self, out):
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return (2.0**0.5) * eye[:, None, :].expand(out.shape[1], *out.shape)

    def sampled_gradients(self, out, samples, generator):
        # y ~ N(f, I/2) makes E[g g^T] = 2 I, the loss Hessian.
        noise = torch.randn(
            (samples, *out.shape), generator=generator, dtype=out.dtype, device=out.device
        )
        return -2.0 * (0.5**0.5) * noise


@dataclass(frozen=True)
class BCEWithLogitsSpec(LossSpec):
    """Binary cross entropy on logits, each output entry an independent Bernoulli."""

    def hessian_product(self, out, y, V):
        s = torch.sigmoid(out)
        return self.scale(out) * s * (1 - s) * V

    def gradients(self, out, y):
        return torch.sigmoid(out) - y

    def hessian_sqrt(self, out):
        s = torch.sigmoid(out)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return (s * (1 - s)).sqrt().T[:, :, None] * eye[:, None, :]

    def sampled_gradients(self, out, samples, generator):
        s = torch.sigmoid(out)
        u = torch.rand((samples, *out.shape), generator=generator, dtype=out.dtype, device=out.device)
        return s.unsqueeze(0) - (u < s).to(out.dtype)


def _one_hot(y: torch.Tensor, classes: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y.long(), classes).to(like.dtype).movedim(-1, dim)


def loss_reduction(loss_fn: object, reduction: str | None = None) -> str:
    """The reduction of ``loss_fn`` (its ``reduction`` attribute, default ``"mean"``).

    Raises:
        UnsupportedLossError: for a reduction other than ``"mean"`` or ``"sum"``.
    """
    r = reduction if reduction is not None else getattr(loss_fn, "reduction", "mean")
    if r not in REDUCTIONS:
        raise UnsupportedLossError(
            f"loss reduction {r!r} is not supported; the loss must be a scalar with "
            f"reduction one of {', '.join(REDUCTIONS)}"
        )
    return r


#: Functional losses accepted as their module counterparts with default options.
FUNCTIONAL_LOSSES = {
    F.cross_entropy: nn.CrossEntropyLoss,
    F.mse_loss: nn.MSELoss,
    F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
}


def loss_spec(loss_fn: object, backend: str, reduction: str | None = None) -> LossSpec:
    """The closed-form spec for ``loss_fn``, or an error naming the supported losses.

    ``torch.nn.functional.cross_entropy``, ``mse_loss`` and ``binary_cross_entropy_with_logits``
    are accepted too, as their modules with default options.

    Raises:
        UnsupportedLossError: for a loss type, reduction or loss option the Gauss-Newton
            family cannot treat exactly.
    """
    kinds = {
        nn.CrossEntropyLoss: CrossEntropySpec,
        nn.MSELoss: MSESpec,
        nn.BCEWithLogitsLoss: BCEWithLogitsSpec,
    }
    module = next((m for f, m in FUNCTIONAL_LOSSES.items() if loss_fn is f), None)
    if module is not None:  # F.cross_entropy & co. with their defaults (mean reduction)
        loss_fn = module()
    spec_type = kinds.get(type(loss_fn))
    if spec_type is None:
        raise UnsupportedLossError(
            f"the {backend!r} curvature does not support the loss {type(loss_fn).__name__}; "
            f"supported: {', '.join(f'torch.nn.{n}' for n in SUPPORTED_LOSSES)} or their functional forms "
            "(use 'hessian' for any other twice-differentiable loss)"
        )
    _reject_options(loss_fn, backend)
    return spec_type(reduction=loss_reduction(loss_fn, reduction))


def _reject_options(loss_fn: nn.Module, backend: str) -> None:
    bad = []
    if getattr(loss_fn, "weight", None) is not None:
        bad.append("weight")
    if getattr(loss_fn, "pos_weight", None) is not None:
        bad.append("pos_weight")
    if getattr(loss_fn, "label_smoothing", 0.0):
        bad.append("label_smoothing")
    if getattr(loss_fn, "ignore_index", -100) != -100:
        bad.append("ignore_index")
    if bad:
        raise UnsupportedLossError(
            f"the {backend!r} curvature supports {type(loss_fn).__name__} only with default "
            f"options; remove {', '.join(bad)} (or use 'hessian')"
        )
