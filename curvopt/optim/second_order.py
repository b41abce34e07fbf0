"""What NewtonMR, TrustRegion and ARC share: closures, curvature on a sub-sample, trial steps, statistics.

Each parameter group is its own block: its own subproblem, its own radius/sigma and
counters; with one group (the usual case) the step is the full second-order step. A step
evaluates the closure for the loss and gradient, builds the curvature of the group's
trainable parameters (frozen ones, ``requires_grad=False``, are ignored), asks the method
for a step, and accepts it or restores the parameters bit for bit.

Data-parallel (``torch.distributed`` with a process group initialized, e.g. under ``torchrun``): every
rank calls ``step`` with a :func:`~curvopt.batch_closure` over its own share of the batch, and the step
is the one a single process would take on the union of the shares. The loss, the gradient and every
trial loss are combined over the ranks in one all-reduce each, weighted as the losses are (the weighted
mean by each rank's samples, or counted targets, :meth:`BatchClosure.weight`; the sum for ``"sum"``
losses); the curvature's products go through the data loop, which all-reduces them the same way. So the
solver, the ratio test and the accept/reject decision see the same global numbers on every rank and
every rank takes the same step. The ``curvature_fraction`` sub-sample is drawn over the global sample
indices (:meth:`BatchClosure.subsample`), so it does not depend on the number of ranks. Gradients are
computed here, with ``torch.autograd.grad`` through the model looked through a ``DistributedDataParallel``
wrapper, and reduced here: DDP's averaging (equal weights per rank) never takes part, so there is
nothing to recognise. A plain closure under a process group is refused (its loss is local, its graph
Hessian too, and whether DDP averaged its ``.grad`` cannot be told from the parameters).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from curvopt import distributed
from curvopt.curvature.graph_hessian import GraphHessian
from curvopt.curvature.model_state import cuda_devices, curvature_pass, frozen_norm_statistics
from curvopt.curvature.registry import available_curvatures, check_options, curvature, curvature_class
from curvopt.errors import ClosureError, UnknownCurvatureError
from curvopt.optim.closure import BatchClosure


@dataclass
class StepStats:
    """What one step of one parameter group did (``optimizer.stats`` after ``step``).

    Attributes:
        loss: Loss before the step.
        trial_loss: Loss at the last trial point (``None`` if none was tried).
        accepted: Whether the parameters moved.
        ratio: Actual / predicted decrease (trust region, ARC) or ``None``.
        solver_iterations: Curvature products the subproblem solver used.
        stop_reason: Why the solver stopped (see :data:`curvopt.linalg.STOP_REASONS`), or
            ``"nonfinite_loss"``/``"nonfinite_gradient"`` when the step was rejected before it.
        step_norm: ``||Delta theta||`` of the accepted step (0 if rejected).
        step_size: Line-search step length (NewtonMR), else 1.
        evaluations: Loss evaluations of the closure in this step (including the first).
        regularization: Trust radius (TrustRegion) or sigma (ARC) after the update; the last accepted
            step length (NewtonMR).
    """

    loss: float
    trial_loss: float | None = None
    accepted: bool = False
    ratio: float | None = None
    solver_iterations: int = 0
    stop_reason: str = ""
    step_norm: float = 0.0
    step_size: float = 1.0
    evaluations: int = 1
    regularization: float = 0.0


def _graph_alive(loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether the closure kept its graph (``create_graph=True``): then a gradient without a graph
    is constant (its Hessian block is zero) rather than a forgotten ``create_graph``."""
    if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
        return False
    try:
        with torch.enable_grad():
            torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    except RuntimeError:
        return False
    return True


def _loss_value(loss: Any) -> float:
    """The closure's loss as a float; a tensor or a number, anything else is a :class:`ClosureError`."""
    try:
        return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    except (TypeError, ValueError, RuntimeError):
        raise ClosureError(
            f"the closure returned {type(loss).__name__} {loss!r:.60}; it must return the loss (a scalar "
            "tensor, or a number), e.g. `loss = loss_fn(model(X), y); loss.backward(create_graph=True); "
            "return loss`") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class SecondOrderOptimizer(Optimizer, ABC):
    """Base class; subclasses implement :meth:`_propose` (solve, try, accept or reject)."""

    _regularization_key = "step_size"  # the state entry the method adapts (radius, sigma, step length)
    _initial_key = "lr"  # the hyperparameter it starts from

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        name = defaults["curvature"]
        if name not in available_curvatures():
            raise UnknownCurvatureError(f"unknown curvature {name!r}; valid names: "
                                        f"{', '.join(available_curvatures())}")
        options = dict(defaults.get("curvature_options") or {})
        if not getattr(curvature_class(name), "forwards_options", False):
            check_options(curvature_class(name), options)
        f = defaults["curvature_fraction"]
        _check(isinstance(f, (int, float)) and 0 < f <= 1, f"curvature_fraction must be in (0, 1], got {f!r}")
        _check(defaults["damping"] >= 0, f"damping must be >= 0, got {defaults['damping']!r}")
        _check(defaults["rtol"] > 0, f"rtol must be > 0, got {defaults['rtol']!r}")
        m = defaults["max_iter"]
        _check(isinstance(m, int) and m >= 1, f"max_iter must be a positive integer, got {m!r}")
        super().__init__(params, defaults)
        self.stats_per_group: list[StepStats] = []

    @property
    def stats(self) -> StepStats | None:
        """Statistics of the last step (of the last parameter group); ``None`` before the first."""
        return self.stats_per_group[-1] if self.stats_per_group else None

    def _group_state(self, group: dict) -> dict:
        """Per-group state (radius/sigma, counters), stored with the group's first parameter."""
        state = self.state[group["params"][0]]
        if not state:
            state.update(steps=0, accepted=0, rejected=0)
            state[self._regularization_key] = float(group[self._initial_key])
        return state


    # ------------------------------------------------------------------ evaluations
    @staticmethod
    def _active(group: dict) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.requires_grad]

    def _loss_and_grad(self, closure: Any, params: list[torch.Tensor]
                       ) -> tuple[float, list[torch.Tensor] | None, list[torch.Tensor]]:
        """``(loss, gradients, parameters that have one)``; gradients keep a graph for plain closures."""
        if distributed.active():
            return self._global_loss_and_grad(closure, params)
        with torch.enable_grad(), self._same_randomness(params):
            if isinstance(closure, BatchClosure):
                loss = closure.loss()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            else:
                loss = closure()
                grads = tuple(p.grad for p in params)
        value = _loss_value(loss)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        if not used:
            return value, None, []
        if (not isinstance(closure, BatchClosure) and any(g.grad_fn is None for _, g in used)
                and not _graph_alive(loss, [p for p, _ in used])):
            raise ClosureError(
                "this closure's gradients carry no graph, so the Hessian cannot be formed from them; "
                "call loss.backward(create_graph=True) inside the closure, or pass "
                "curvopt.batch_closure(model, loss_fn, X, y), which also enables other curvature backends "
                "and curvature_fraction < 1")
        return value, [g for _, g in used], [p for p, _ in used]

    def _global_loss_and_grad(self, closure: BatchClosure, params: list[torch.Tensor]
                              ) -> tuple[float, list[torch.Tensor] | None, list[torch.Tensor]]:
        """:meth:`_loss_and_grad` over the ranks' shares, in one all-reduce: the weighted loss and
        gradients, the weights, which parameters have a gradient on some rank, and each rank's sample
        count (for the sub-sample). A rank that fails still takes part (with zeros) and every rank
        raises its error after the collective."""
        world, me = distributed.world_size(), distributed.rank()
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        zeros = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in params]
        parts = [torch.zeros(2, dtype=dtype, device=params[0].device), *zeros,
                 torch.zeros(len(params) + world, dtype=dtype, device=params[0].device)]
        failure: Exception | None = None
        mean = True
        try:
            w, mean = closure.weight()
            with torch.enable_grad(), self._same_randomness(params):
                loss = closure.loss()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            if w == 0:  # only ignored targets here: the share adds nothing (its mean loss is 0/0)
                loss_part = torch.zeros((), dtype=dtype)
                grads = tuple(None if g is None else torch.zeros_like(g) for g in grads)
            else:
                loss_part = w * loss.detach().reshape(()).to(dtype)
            device = params[0].device
            head = torch.stack([loss_part.to(device), torch.tensor(w, dtype=dtype, device=device)])
            flags = torch.tensor([g is not None for g in grads] + [0] * world, dtype=dtype)
            flags[len(params) + me] = len(closure.X)
            parts = [head.to(parts[0].device), *(z if g is None else w * g.detach().to(dtype)
                                                 for z, g in zip(zeros, grads)), flags.to(parts[0].device)]
        except Exception as exc:  # raised on every rank after the collective, not here before it
            failure = exc
        summed = distributed.sum_across(parts, failure=failure)
        (wloss, weight), grads, flags = summed[0].tolist(), summed[1:-1], summed[-1].tolist()
        scale = 1.0 / weight if mean else 1.0
        self._rank_counts, self._rank_weight = [int(c) for c in flags[len(params):]], (weight, mean)
        used = [(p, g * scale) for p, g, f in zip(params, grads, flags) if f > 0]
        if not used:
            return wloss * scale, None, []
        return wloss * scale, [g.to(p.dtype) for p, g in used], [p for p, _ in used]

    def _trial_loss(self, closure: Any) -> float:
        """The loss at the current parameters (no gradient needed for batch closures). A batch closure's
        trial point runs inside :func:`curvature_pass`, a plain closure's inside
        :func:`frozen_norm_statistics`: train-mode BatchNorm uses the batch statistics, as the step's own
        loss did, without updating its running statistics at points that may be rejected."""
        params = [p for g in self.param_groups for p in g["params"]]
        if isinstance(closure, BatchClosure) and distributed.active():
            return self._global_trial_loss(closure, params)
        if isinstance(closure, BatchClosure):
            with torch.no_grad(), curvature_pass(closure.network), self._same_randomness(params):
                return float(closure.loss())
        with torch.enable_grad(), self._same_randomness(params), frozen_norm_statistics():
            return _loss_value(closure())

    def _global_trial_loss(self, closure: BatchClosure, params: list[torch.Tensor]) -> float:
        """The trial loss over the ranks' shares, weighted as the step's loss (one all-reduce)."""
        weight, mean = self._rank_weight
        value = torch.zeros(1, dtype=torch.float64, device=params[0].device)
        failure: Exception | None = None
        try:
            w, _ = closure.weight()
            with torch.no_grad(), curvature_pass(closure.network), self._same_randomness(params):
                if w != 0:  # only ignored targets here: the share adds nothing (its mean loss is 0/0)
                    value = (w * closure.loss().detach().to(torch.float64)).reshape(1).to(value.device)
        except Exception as exc:  # raised on every rank after the collective, not here before it
            failure = exc
        total = float(distributed.sum_across([value], failure=failure)[0])
        return total / weight if mean else total

    @contextlib.contextmanager
    def _same_randomness(self, params: list[torch.Tensor]) -> Any:
        """The global generators forked and seeded with this step's seed: the step's loss, gradient
        and trial points see the same dropout masks, and the user's random stream is not advanced."""
        with torch.random.fork_rng(devices=cuda_devices(params)):
            torch.manual_seed(getattr(self, "_step_seed", 0))
            yield

    def _curvature(self, closure: Any, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
                   step: int) -> tuple[Any, list[torch.Tensor], torch.Tensor]:
        """The curvature operator, its parameter order, and the flat gradient in that order."""
        if isinstance(closure, BatchClosure):
            generator = torch.Generator().manual_seed(int(group["seed"]) + step)
            if distributed.active():  # drawn over the global indices: the same whatever the number of ranks
                batch = closure.subsample(group["curvature_fraction"], generator, self._rank_counts,
                                          distributed.rank())
            else:
                batch = closure.subsample(group["curvature_fraction"], generator)
            options = dict(group.get("curvature_options") or {})
            op = curvature(group["curvature"], closure.model, closure.loss_fn, [batch], params=params, **options)
            by_id = {id(p): g for p, g in zip(params, grads)}
            ordered = list(op.params)
            flat = torch.cat([by_id[id(p)].detach().reshape(-1) for p in ordered])
            return op, ordered, flat
        flat = torch.cat([g.detach().reshape(-1) for g in grads])
        return GraphHessian(params, grads), params, flat

    @staticmethod
    def _move(params: list[torch.Tensor], origin: list[torch.Tensor], direction: torch.Tensor,
              alpha: float) -> None:
        """Set ``params = origin + alpha * direction`` (flat ``direction`` in ``params`` order)."""
        offset = 0
        with torch.no_grad():
            for p, p0 in zip(params, origin):
                n = p.numel()
                p.copy_(p0 + alpha * direction[offset:offset + n].view_as(p).to(p.dtype))
                offset += n

    @staticmethod
    def _restore(params: list[torch.Tensor], origin: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, p0 in zip(params, origin):
                p.copy_(p0)

    # ------------------------------------------------------------------ the step
    def step(self, closure: Any = None) -> float | None:  # type: ignore[override]
        """One step per parameter group; ``closure`` re-evaluates the loss on the current mini-batch.

        ``closure`` is a :func:`curvopt.batch_closure` (any curvature backend, sub-sampled
        curvature), or a plain function that zeroes the gradients, computes the loss, calls
        ``loss.backward(create_graph=True)`` and returns the loss (exact Hessian on its batch).

        Returns:
            The loss before the step (of the first group), as a float.
        """
        if closure is None or not callable(closure):
            raise ClosureError(
                f"{type(self).__name__}.step needs a closure that re-evaluates the loss on the current "
                "mini-batch, e.g. opt.step(curvopt.batch_closure(model, loss_fn, X, y))")
        if distributed.active() and not isinstance(closure, BatchClosure):
            # the same on every rank (each passes the same kind of closure): no rank waits in a collective
            raise ClosureError(
                f"{type(self).__name__}.step under torch.distributed needs curvopt.batch_closure(model, "
                "loss_fn, X, y) over this rank's share of the batch: a plain closure's loss, gradient and "
                "graph Hessian are this rank's only, and cannot be combined over the ranks")
        self.stats_per_group = []
        first_loss = None
        for group in self.param_groups:
            stats = self._group_step(group, closure)
            self.stats_per_group.append(stats)
            first_loss = stats.loss if first_loss is None else first_loss
        return first_loss

    def _group_step(self, group: dict, closure: Any) -> StepStats:
        if not isinstance(closure, BatchClosure) and (group["curvature"] != "hessian"
                                                      or group["curvature_fraction"] != 1):
            raise ClosureError(
                f"curvature={group['curvature']!r} with curvature_fraction={group['curvature_fraction']} "
                "needs the model and the batch: pass curvopt.batch_closure(model, loss_fn, X, y) as the closure")
        state = self._group_state(group)
        step = state["steps"]
        state["steps"] = step + 1
        active = self._active(group)
        if not active:
            return StepStats(loss=float("nan"), stop_reason="no_trainable_parameters")
        # every evaluation of this step (loss and gradient, trial points) draws the same random numbers
        # (dropout masks), so that the ratio tests and line searches compare like with like
        self._step_seed = int(group["seed"]) * 1_000_003 + step
        loss, grads, params = self._loss_and_grad(closure, active)
        stats = StepStats(loss=loss, regularization=state[self._regularization_key])
        if grads is None:
            stats.stop_reason = "zero_rhs"
            return stats
        if not math.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in grads):
            stats.stop_reason = "nonfinite_loss" if not math.isfinite(loss) else "nonfinite_gradient"
            self._reject(group, state, stats)
            return stats
        op, params, g = self._curvature(closure, group, params, grads, step)
        origin = [p.detach().clone() for p in params]
        accepted = self._propose(group, state, stats, closure, op, params, origin, g)
        if accepted:
            state["accepted"] += 1
        else:
            self._restore(params, origin)
            state["rejected"] += 1
        stats.accepted = accepted
        stats.regularization = state[self._regularization_key]
        return stats

    def _reject(self, group: dict, state: dict, stats: StepStats) -> None:
        """A non-finite loss/gradient/product: nothing moves; the method becomes more cautious."""
        state["rejected"] += 1
        self._on_failure(group, state)
        stats.regularization = state[self._regularization_key]
        warnings.warn(f"{type(self).__name__}: {stats.stop_reason.replace('_', ' ')}; step rejected, "
                      "parameters unchanged", stacklevel=4)

    def _on_failure(self, group: dict, state: dict) -> None:
        """Shrink the radius / raise sigma (subclasses)."""

    @abstractmethod
    def _propose(self, group: dict, state: dict, stats: StepStats, closure: Any, op: Any,
                 params: list[torch.Tensor], origin: list[torch.Tensor], g: torch.Tensor) -> bool:
        """Solve the method's subproblem with ``op`` and gradient ``g`` (flat, in ``params`` order),
        try the step from ``origin`` and return whether it is accepted (the caller restores
        ``origin`` otherwise)."""

    def _model_step_ratio(self, group: dict, state: dict, stats: StepStats, closure: Any,
                          params: list[torch.Tensor], origin: list[torch.Tensor], result: Any,
                          g: torch.Tensor, sigma: float = 0.0) -> StepTrial:
        """Try ``lr`` times the subproblem step ``result.x`` (trust region, ARC): the ratio of actual to
        predicted decrease, or the decision itself where no ratio applies: nothing to do, a solve that
        failed at once, or a stationary point, where the ratio is round-off noise.

        The model ``m(p) = g^T p + 1/2 p^T H p + sigma/3 ||p||^3`` is evaluated at ``lr * p`` from
        ``m(p)``, ``g^T p`` and ``||p||`` (no further curvature product)."""
        stats.solver_iterations, stats.stop_reason = result.iterations, result.reason
        if result.reason == "zero_rhs":
            return StepTrial(decision=False)
        if result.reason == "nonfinite" and result.iterations <= 1:
            self._on_failure(group, state)
            return StepTrial(decision=False)
        t = float(group["lr"])
        predicted = -float(result.model_value)
        if t != 1.0:
            gp, norm = float(g @ result.x), float(torch.linalg.norm(result.x))
            pHp = 2 * (float(result.model_value) - gp - sigma / 3 * norm**3)
            predicted = -(t * gp + t * t / 2 * pHp + sigma / 3 * (t * norm) ** 3)
        self._move(params, origin, result.x, t)
        f = self._trial_loss(closure)
        stats.evaluations += 1
        stats.trial_loss = f
        if math.isfinite(f) and round_off(predicted, stats.loss):
            stats.step_norm = t * float(torch.linalg.norm(result.x)) if f <= stats.loss else 0.0
            return StepTrial(decision=f <= stats.loss)
        rho = (stats.loss - f) / predicted if (math.isfinite(f) and predicted > 0) else -math.inf
        stats.ratio = rho
        return StepTrial(ratio=rho)


@dataclass(frozen=True)
class StepTrial:
    """A tried model step: ``decision`` (accept or reject) where no ratio applies, else the ``ratio`` of
    actual to predicted decrease for the method's own acceptance and radius/sigma update."""

    decision: bool | None = None
    ratio: float = math.nan


def round_off(predicted: float, loss: float) -> bool:
    """Whether a predicted decrease is at the loss's round-off level (a stationary point)."""
    return predicted <= 8 * torch.finfo(torch.float64).eps * max(1.0, abs(loss))


def common_defaults(curvature: str, curvature_fraction: float, curvature_options: dict | None, damping: float,
                    rtol: float, max_iter: int, seed: int) -> dict[str, Any]:
    """The hyperparameters every Newton-type optimizer takes (documented on each class)."""
    return dict(curvature=curvature, curvature_fraction=curvature_fraction,
                curvature_options=dict(curvature_options or {}), damping=damping, rtol=rtol,
                max_iter=max_iter, seed=seed)
