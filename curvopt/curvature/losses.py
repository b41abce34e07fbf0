"""Output-space quantities of the supported losses, in closed form.

For a batch with network outputs ``f`` the loss is ``L = c * sum_n l(f_n, y_n)``
where ``c`` is ``1`` for ``reduction="sum"`` and ``1 / (number of terms)`` for
``"mean"`` (PyTorch's convention: the counted targets for cross entropy, i.e. samples
and positions whose target is not ``ignore_index``; every output entry for MSE and BCE).
Ignored targets (padding labels, ``-100`` by default) weigh zero in every quantity below,
and cross entropy's ``label_smoothing`` enters the gradients (its Hessian in the logits is
unchanged). The Gauss-Newton family needs three things from a loss:

* ``hessian_product``: ``c * d^2 l / df^2`` applied to output-space vectors;
* ``gradients``: per-sample ``d l_n / d f_n`` at the true labels (empirical Fisher);
* ``sampled_gradients``: the same at labels drawn from the model's predictive
  distribution (true Fisher), with ``E[g g^T] = d^2 l / df^2``.
"""

from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curvopt.errors import UnsupportedLossError

SUPPORTED_LOSSES = ("CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss")
REDUCTIONS = ("mean", "sum")


#: ``id(targets) -> (weak ref, version, ignore_index, count)``: see :func:`counted_targets`.
_COUNTS: dict[int, tuple[Any, int, int, int]] = {}


def counted_targets(y: torch.Tensor, ignore_index: int) -> int:
    """The entries of the class-index targets ``y`` that are not ``ignore_index``.

    Counting reads the host, a synchronisation when ``y`` lives on an accelerator, and a product passes over
    the same batches again and again: there, the count of a targets tensor met again unmodified (its version
    counter unchanged) is remembered for as long as the tensor lives, so data held on the device costs one
    read per batch, not one per batch and product. Writes that bypass the version counter (through ``.data``)
    are not seen on a device. On the CPU the count is cheap and always taken afresh (a tensor sharing memory
    with a numpy array changes without its version counter knowing)."""
    try:
        version = None if y.is_inference() or y.device.type == "cpu" else y._version
    except (AttributeError, RuntimeError):  # a tensor without a version counter (transform wrappers)
        version = None
    key = id(y)
    hit = _COUNTS.get(key) if version is not None else None
    if hit is not None and hit[0]() is y and hit[1] == version and hit[2] == ignore_index:
        return hit[3]
    count = int((y != ignore_index).sum())
    if version is not None:
        try:  # the entry goes with its tensor, before its id can be reused
            ref = weakref.ref(y, lambda _, k=key: _COUNTS.pop(k, None))
        except TypeError:
            return count
        _COUNTS[key] = (ref, version, ignore_index, count)
    return count


@dataclass(frozen=True)
class LossSpec(ABC):
    """Closed-form output-space derivatives of one loss. Subclasses per loss type."""

    reduction: str

    def scale(self, out: torch.Tensor, y: torch.Tensor | None = None) -> float:
        """The factor ``c`` between the batch loss and the sum of per-term losses (with ``y``, ignored
        targets are not counted)."""
        return 1.0 if self.reduction == "sum" else 1.0 / max(self.terms(out, y), 1)

    def terms(self, out: torch.Tensor, y: torch.Tensor | None = None) -> int:
        """Number of loss terms the ``"mean"`` reduction divides by."""
        return out.numel()

    def draw_units(self, y: torch.Tensor) -> int:
        """Units of a batch with targets ``y`` that take their own Monte-Carlo draws (keyed by
        :class:`SampleDraws`): its samples; for cross entropy, its counted targets."""
        return int(y.shape[0]) if y.dim() else 1

    def counted(self, out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
        """A 0/1 mask broadcastable to ``out`` of the entries whose targets count; ``None``: all."""
        return None

    def _masked(self, t: torch.Tensor, out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        mask = self.counted(out, y)
        return t if mask is None else t * mask

    @abstractmethod
    def hessian_product(self, out: torch.Tensor, y: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``c * (d^2 l / df^2) V`` for ``V`` shaped like ``out``."""

    @abstractmethod
    def gradients(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample ``d l_n / d f_n`` (unscaled), shaped like ``out``; zero at ignored targets."""

    @abstractmethod
    def hessian_sqrt(self, out: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[C, *out.shape]`` vectors ``h_c`` per sample with ``d^2 l / df^2 = sum_c h_c h_c^T``
        (unscaled), for outputs ``[N, C]``; zero at ignored targets when ``y`` is given."""

    @abstractmethod
    def sampled_gradients(
        self, out: torch.Tensor, samples: int, generator: torch.Generator | SampleDraws | None,
        y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[samples, *out.shape]`` gradients at labels drawn from the model; zero at ignored
        targets when ``y`` is given. With a :class:`SampleDraws` as ``generator`` the draws of each
        sample depend only on its global index, not on the batch it sits in."""


@dataclass(frozen=True)
class CrossEntropySpec(LossSpec):
    """Softmax cross entropy over dimension 1 (``[N, C]`` or ``[N, C, *spatial]``), class-index
    targets (``ignore_index`` ones excluded) or class probabilities, with ``label_smoothing``."""

    ignore_index: int = -100
    label_smoothing: float = 0.0

    def terms(self, out, y=None):
        if y is not None and not y.dtype.is_floating_point:
            return counted_targets(y, self.ignore_index)
        return out.numel() // out.shape[1]

    def draw_units(self, y):
        # soft targets [N, C, *spatial]: one draw per sample and position, as sampled_gradients keys them
        return self.terms(y, None) if y.dtype.is_floating_point else self.terms(None, y)

    def counted(self, out, y):
        if y is None or y.dtype.is_floating_point:
            return None
        return (y != self.ignore_index).unsqueeze(1).to(out.dtype)

    def _target_mass(self, out, y):
        """``sum_c q_c`` of the (smoothed) target distribution: 1, except for unnormalized soft targets."""
        if y is None or not y.dtype.is_floating_point:
            return 1.0
        return y.sum(dim=1, keepdim=True) * (1 - self.label_smoothing) + self.label_smoothing

    def hessian_product(self, out, y, V):
        # -sum_c q_c log p_c has the logit Hessian (sum_c q_c)(diag(p) - p p^T), whatever the smoothing
        p = torch.softmax(out, dim=1)
        pv = p * V
        H = (pv - p * pv.sum(dim=1, keepdim=True)) * self._target_mass(out, y)
        return self.scale(out, y) * self._masked(H, out, y)

    def gradients(self, out, y):
        p = torch.softmax(out, dim=1)
        C, eps = out.shape[1], self.label_smoothing
        if y.dtype.is_floating_point:  # class probabilities, smoothed as torch does
            q = y * (1 - eps) + eps / C
            return p * q.sum(dim=1, keepdim=True) - q
        mask = self.counted(out, y)
        q = _one_hot(torch.where(y == self.ignore_index, 0, y), C, dim=1, like=out) * (1 - eps) + eps / C
        return (p - q) * mask

    def hessian_sqrt(self, out, y=None):
        # diag(p) - p p^T = sum_c sqrt(p_c)(e_c - p) (sqrt(p_c)(e_c - p))^T since sum_c p_c = 1
        p = torch.softmax(out, dim=1)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        H = p.T.sqrt()[:, :, None] * (eye[:, None, :] - p[None])
        mass = self._target_mass(out, y)
        H = H if isinstance(mass, float) else H * mass.sqrt()
        return self._masked(H, out, y)

    def sampled_gradients(self, out, samples, generator, y=None):
        p = torch.softmax(out, dim=1)
        probs = p.movedim(1, -1).reshape(-1, out.shape[1])
        # A non-finite output is reported by the data loop with its batch index;
        # sample something harmless here instead of failing inside multinomial.
        probs = torch.where(torch.isfinite(probs), probs, torch.ones_like(probs))
        if isinstance(generator, SampleDraws):  # inverse CDF at one keyed uniform per counted target
            if y is None or y.dtype.is_floating_point:
                units: Any = probs.shape[0]
            else:  # ignored targets (padding) take no key: the others' draws do not depend on them
                units = ((y.reshape(-1) != self.ignore_index).cumsum(0) - 1).clamp_(min=0)
            u = generator.uniform(samples, units, 1, out.device)
            cdf = probs.to(torch.float64).cumsum(dim=1)
            u = u.reshape(samples, -1, 1) * cdf[:, -1:]
            labels = (u >= cdf[:, :-1]).sum(dim=2).T  # [N*, S]
        else:
            labels = torch.multinomial(probs, samples, replacement=True, generator=generator)
        onehot = F.one_hot(labels.T, out.shape[1]).to(out.dtype)  # [S, N*, C]
        onehot = onehot.reshape(samples, *p.movedim(1, -1).shape).movedim(-1, 2)
        g = p.unsqueeze(0) - onehot
        mass = self._target_mass(out, y)
        g = g if isinstance(mass, float) else g * mass.sqrt()
        return self._masked(g, out, y)


@dataclass(frozen=True)
class MSESpec(LossSpec):
    """Squared error ``l = ||f - y||^2`` summed over the output entries of a sample."""

    def hessian_product(self, out, y, V):
        return 2.0 * self.scale(out) * V

    def gradients(self, out, y):
        return 2.0 * (out - y)

    def hessian_sqrt(self, out, y=None):
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return (2.0**0.5) * eye[:, None, :].expand(out.shape[1], *out.shape)

    def sampled_gradients(self, out, samples, generator, y=None):
        # y ~ N(f, I/2) makes E[g g^T] = 2 I, the loss Hessian.
        if isinstance(generator, SampleDraws):
            noise = generator.normal(samples, out.shape[0], out[0].numel() if out.dim() else 1, out.device)
            noise = noise.reshape(samples, *out.shape).to(out.dtype)
        else:
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

    def hessian_sqrt(self, out, y=None):
        s = torch.sigmoid(out)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return (s * (1 - s)).sqrt().T[:, :, None] * eye[:, None, :]

    def sampled_gradients(self, out, samples, generator, y=None):
        s = torch.sigmoid(out)
        if isinstance(generator, SampleDraws):
            u = generator.uniform(samples, out.shape[0], out[0].numel() if out.dim() else 1, out.device)
            u = u.reshape(samples, *out.shape)
        else:
            u = torch.rand((samples, *out.shape), generator=generator, dtype=out.dtype, device=out.device)
        return s.unsqueeze(0) - (u < s).to(out.dtype)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _fmix32(x: Any) -> Any:
    """MurmurHash3's 32-bit finalizer: every input bit flips each output bit with probability ~1/2."""
    if isinstance(x, int):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & _M32
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & _M32
        return x ^ (x >> 16)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


@dataclass(frozen=True)
class SampleDraws:
    """Counter-based random numbers for Monte-Carlo labels, keyed by ``(seed, global sample index, draw,
    entry)``: a sample gets the same draws whatever batch, batch size or rank it sits in, so that ranks
    holding shards of the data reproduce one process on all of it exactly. Hashing (MurmurHash3's
    finalizer, chained over the key) replaces a stateful generator, whose stream would depend on what was
    drawn before in the batch; it is the same on every device.

    Args:
        seed: The operator's seed.
        first: Global index of the batch's first unit (a sample; for cross entropy a counted target,
            so that padding takes no key, see :meth:`LossSpec.draw_units`).
    """

    seed: int
    first: int

    def _words(self, samples: int, units: int | torch.Tensor, per_unit: int, device: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        h = _fmix32((self.seed & _M32) ^ 0x9E3779B9)
        h = _fmix32(h ^ ((self.seed >> 32) & _M32))
        if isinstance(units, int):
            index = torch.arange(self.first, self.first + units, dtype=torch.int64, device=device)
        else:
            index = units.to(device=device, dtype=torch.int64) + self.first
        h = _fmix32(_fmix32(h ^ (index & _M32)) ^ (index >> 32))  # [n]
        draw = torch.arange(samples, dtype=torch.int64, device=device)
        h = _fmix32(h.unsqueeze(0) ^ draw.unsqueeze(1))  # [S, n]
        entry = torch.arange(per_unit, dtype=torch.int64, device=device)
        h = _fmix32(h.unsqueeze(2) ^ entry)  # [S, n, E]
        return _fmix32(h ^ 0x68E31DA4), _fmix32(h ^ 0xB5297A4D)

    def uniform(self, samples: int, units: int | torch.Tensor, per_unit: int, device: Any) -> torch.Tensor:
        """``[samples, U, per_unit]`` float64 uniforms on ``[0, 1)`` (53 random bits each) for the units
        ``first + i``, ``i`` in ``range(units)`` or in the tensor ``units`` ``[U]`` (local indices)."""
        a, b = self._words(samples, units, per_unit, device)
        return ((a >> 5) * 67108864 + (b >> 6)).to(torch.float64) * 2.0**-53

    def normal(self, samples: int, units: int | torch.Tensor, per_unit: int, device: Any) -> torch.Tensor:
        """``[samples, U, per_unit]`` float64 standard normals (Box-Muller on two keyed uniforms)."""
        u1 = self.uniform(samples, units, per_unit, device)
        u2 = SampleDraws(self.seed ^ 0x5BD1E995, self.first).uniform(samples, units, per_unit, device)
        return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)


def _one_hot(y: torch.Tensor, classes: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y.long(), classes).to(like.dtype).movedim(-1, dim)


def loss_reduction(loss_fn: object, reduction: str | None = None) -> str | None:
    """The reduction of ``loss_fn``: ``reduction`` if given, else the loss's ``reduction`` attribute
    (``nn.*Loss`` modules), ``"mean"`` for the functional losses of :data:`FUNCTIONAL_LOSSES`, and
    ``None`` for a plain function that declares none (:func:`detect_reduction` tells it then).

    Raises:
        UnsupportedLossError: for a reduction other than ``"mean"`` or ``"sum"``.
    """
    if reduction is None:
        if any(loss_fn is f for f in FUNCTIONAL_LOSSES):
            return "mean"
        reduction = getattr(loss_fn, "reduction", None)
        if reduction is None:
            return None
    if reduction not in REDUCTIONS:
        raise UnsupportedLossError(
            f"loss reduction {reduction!r} is not supported; the loss must be a scalar with "
            f"reduction one of {', '.join(REDUCTIONS)}"
        )
    return reduction


def detect_reduction(loss_fn: Any, out: torch.Tensor, y: Any) -> str:
    """Whether a plain loss function averages or sums over samples, by evaluating it on a batch and
    on the batch twice over: a mean is unchanged, a sum doubles. Exact for any loss that is a mean
    or a sum of per-sample terms; anything else is refused rather than guessed.

    Raises:
        UnsupportedLossError: when neither holds (or the loss is 0, where both do), asking for
            ``reduction=``.
    """
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    fix = (f"pass reduction='mean' or reduction='sum' to say how {name} combines its samples "
           "(curvopt weights batches by it)")
    if not isinstance(y, torch.Tensor) or y.dim() == 0 or out.dim() == 0 or y.shape[0] != out.shape[0]:
        raise UnsupportedLossError(f"cannot tell the reduction of the loss {name}: {fix}")
    with torch.no_grad():
        once = float(loss_fn(out, y))
        twice = float(loss_fn(torch.cat([out, out]), torch.cat([y, y])))
    tol = 1e-4 if out.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-10
    if once != 0 and math.isfinite(once):
        if abs(twice - once) <= tol * abs(once):
            return "mean"
        if abs(twice - 2 * once) <= tol * abs(once):
            return "sum"
        raise UnsupportedLossError(
            f"the loss {name} is neither a mean nor a sum over samples (on one batch {once:.6g}, on the "
            f"batch twice over {twice:.6g}); {fix}")
    raise UnsupportedLossError(f"cannot tell the reduction of the loss {name} from a batch where it is "
                               f"{once}; {fix}")


def resolve_reduction(loss_fn: Any, reduction: str | None, data: Any,
                      forward: Callable[[Any, Any], tuple[torch.Tensor, Any]], where: str) -> str:
    """:func:`loss_reduction`, and for a plain function that declares none, :func:`detect_reduction` on
    the first batch of ``data`` that holds samples, ``forward(X, y) -> (outputs, targets)`` giving the
    model's outputs (run without gradients).

    Raises:
        EmptyDataError: naming ``where`` when the data holds no samples.
        UnsupportedLossError: see :func:`detect_reduction`.
    """
    declared = loss_reduction(loss_fn, reduction)
    if declared is not None:
        return declared
    from curvopt.curvature.data_loop import first_batch

    X, y = first_batch(data, where)
    with torch.no_grad():
        out, y = forward(X, y)
    return detect_reduction(loss_fn, out, y)


def loss_terms(loss_fn: Any, y: Any, n: int, reduction: str = "mean") -> float:
    """How much a batch with targets ``y`` and ``n`` samples weighs in a ``"mean"`` loss over several
    batches: what torch's mean divides by. The counted targets for cross entropy and NLL with class
    indices (those not ``ignore_index``, over every position of ``[N, *]`` targets; with a class
    ``weight``, the sum of their weights), the target entries for cross entropy with class
    probabilities (per class vector), MSE and BCE, ``n`` samples for any other loss. Batches are
    weighted by it, so that the risk is the loss torch computes over all batches together.

    Raises:
        UnsupportedLossError: for a mean-reduced loss of curvopt's unknown kind whose integer targets
            hold negative class indices (padding): whether it averages over all samples or over the
            counted ones cannot be told, and either guess can be wrong.
    """
    known = {**FUNCTIONAL_LOSSES, F.nll_loss: nn.NLLLoss}
    loss_fn = next((m() for f, m in known.items() if loss_fn is f), loss_fn)
    if not isinstance(y, torch.Tensor):
        return n
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        if y.dtype.is_floating_point:
            return y.numel() // y.shape[1] if y.dim() > 1 else 1
        if loss_fn.weight is None:
            return counted_targets(y, loss_fn.ignore_index)
        counted = y != loss_fn.ignore_index
        return float(loss_fn.weight.to(y.device)[y[counted]].sum())
    if isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)):
        return y.numel()
    if reduction == "mean" and not (y.dtype.is_floating_point or y.dtype == torch.bool) and bool((y < 0).any()):
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise UnsupportedLossError(
            f"the targets hold negative class indices (padding such as -100), and curvopt cannot tell whether "
            f"the loss {name} averages over all samples or over the counted targets only, which weighs the "
            "batches differently; pass torch.nn.CrossEntropyLoss(ignore_index=...) or torch.nn.NLLLoss (or "
            "F.cross_entropy / F.nll_loss themselves), whose weighting curvopt knows")
    return n


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
    if spec_type is CrossEntropySpec:
        return CrossEntropySpec(reduction=loss_reduction(loss_fn, reduction), ignore_index=loss_fn.ignore_index,
                                label_smoothing=float(loss_fn.label_smoothing))
    return spec_type(reduction=loss_reduction(loss_fn, reduction))


def _reject_options(loss_fn: nn.Module, backend: str) -> None:
    bad = []
    if getattr(loss_fn, "weight", None) is not None:
        bad.append("weight")
    if getattr(loss_fn, "pos_weight", None) is not None:
        bad.append("pos_weight")
    if bad:
        raise UnsupportedLossError(
            f"the {backend!r} curvature supports {type(loss_fn).__name__} only with default "
            f"options; remove {', '.join(bad)} (or use 'hessian')"
        )
