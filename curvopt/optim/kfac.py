"""The K-FAC optimizer (Martens & Grosse, 2015), usable in an unchanged training loop.

``optimizer = curvopt.KFAC(model.parameters())``, then the usual
``zero_grad(); loss.backward(); step()``. The optimizer finds the ``Linear``/``Conv1d``/
``Conv2d`` layers that own its parameters by itself: one global module forward hook,
filtered by parameter identity, records each such layer's input and puts a hook on its
output's gradient. Kronecker factors are the empirical Fisher's (the gradients of the
loss being minimized), computed with the same functions as the ``kfac`` curvature
operator (:mod:`curvopt.curvature.kfac`).
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook
from torch.optim import Optimizer

from curvopt.curvature.kfac import (
    APPROXIMATIONS,
    KRONECKER_DESCRIPTION,
    factored_inverses_cholesky,
    factored_product,
    input_factor,
    kronecker_solve,
    kronecker_structured,
    layer_inputs,
    layer_output_vectors,
    output_factor,
)
from curvopt.curvature.losses import loss_spec


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry is finite, with one synchronisation. The sum of 2-norms is cheap
    (no concatenation); it also overflows for entries beyond ~1e19, so only a non-finite sum
    is confirmed entry by entry."""
    if math.isfinite(torch.stack(torch._foreach_norm(tensors)).sum().item()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _decayed(grad: torch.Tensor, p: torch.Tensor, wd: float) -> torch.Tensor:
    """The gradient with the L2 penalty's ``wd * p`` added (``grad`` itself when ``wd`` is 0)."""
    return grad + wd * p if wd else grad


def _average_factors(state: dict, new: dict[str, tuple[torch.Tensor, float]], decay: float) -> None:
    """Moving averages ``A <- decay A + (1 - decay) sum / divisor`` (and ``G``), in place: no
    factor-sized temporaries. The first step's sums are not used again: they become the factors."""
    for name, (total, divisor) in new.items():
        if name in state:
            state[name].mul_(decay).add_(total, alpha=(1 - decay) / divisor)
        else:
            state[name] = total.div_(divisor)


class KFAC(Optimizer):
    """K-FAC with Tikhonov (optionally factored) damping, KL clipping, momentum and weight decay.

    Args:
        params: Parameters or parameter groups (each hyperparameter may differ per group).
        lr: Learning rate.
        damping: Tikhonov damping ``lambda`` added to the curvature.
        momentum: Momentum of the preconditioned update (SGD-style buffer).
        weight_decay: L2 penalty added to the gradient before preconditioning.
        factor_decay: Exponential moving average of the Kronecker factors.
        factor_every: Update the factors every this many steps.
        inverse_every: Recompute the damped factor inverses (by Cholesky; eigendecompositions
            when ``factored_damping=False``) every this many steps; during the first
            ``inverse_every`` steps also at every factor update (warm-up: the first factors come
            from few batches).
        kl_clip: Scale the update so that ``lr^2 * sum(update . grad) <= kl_clip``
            (Ba et al., 2017); ``0`` disables it.
        factored_damping: Split ``lambda`` between the factors with the pi rule of
            Martens & Grosse (2015) instead of adding it to the Kronecker product.
        kfac_approx: ``"expand"`` or ``"reduce"`` for convolutions (Eschenhagen et al., 2023).
        grad_scaler: The ``torch.amp.GradScaler`` of a mixed-precision loop, whose scale the
            recorded output gradients carry; ``G`` is unscaled with it. (Call
            ``scaler.step(optimizer)`` as usual; a skipped step leaves everything unchanged.)

    The factors are the empirical Fisher's by default. For the true Fisher, add one line
    before ``loss.backward()``: ``optimizer.mc_backward(outputs, loss_fn)``
    (:meth:`mc_backward`), which draws labels from the model's predictions.

    Statistics recorded by forward and backward passes belong to the gradients they came
    with: they accumulate over several backward calls (gradient accumulation) and are
    dropped by ``zero_grad()`` and by a skipped step. Like the gradient, the factors are then
    those of the loss averaged over all the step's samples when each micro-batch's mean loss is
    weighted by its share of them (``loss * len(batch) / total``, or ``/ k`` for ``k`` equal
    micro-batches): one step on the micro-batches equals one step on them together.

    Parameters outside Kronecker layers (norm layers, embeddings, ...) get a diagonal block:
    a moving average of ``N * grad**2`` (``N`` the samples their module saw since the last
    step), the "square of the sum" estimate of the Fisher diagonal, which assumes ``grad`` is
    the gradient of a mean loss. One warning names them at the first step.
    A non-finite gradient or factor skips the step: parameters, factors and counters stay
    as they were, and a warning says why.
    """

    def __init__(self, params, lr: float = 1e-2, damping: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, factor_decay: float = 0.95, factor_every: int = 1,
                 inverse_every: int = 10, kl_clip: float = 1e-3, factored_damping: bool = True,
                 kfac_approx: str = "expand", grad_scaler: Any = None) -> None:
        checks = [(lr >= 0, f"lr must be >= 0, got {lr}"), (damping > 0, f"damping must be > 0, got {damping}"),
                  (0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}"),
                  (weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}"),
                  (0 <= factor_decay < 1, f"factor_decay must be in [0, 1), got {factor_decay}"),
                  (isinstance(factor_every, int) and factor_every >= 1, "factor_every must be an integer >= 1"),
                  (isinstance(inverse_every, int) and inverse_every >= 1, "inverse_every must be an integer >= 1"),
                  (kl_clip >= 0, f"kl_clip must be >= 0, got {kl_clip}"),
                  (kfac_approx in APPROXIMATIONS,
                   f"kfac_approx={kfac_approx!r}; valid: {', '.join(APPROXIMATIONS)}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
                        factor_decay=factor_decay, factor_every=factor_every, inverse_every=inverse_every,
                        kl_clip=kl_clip, factored_damping=factored_damping, kfac_approx=kfac_approx)
        super().__init__(params, defaults)
        self._layers: dict[int, nn.Module] = {}  # id(weight) -> layer owning it
        self._pending: dict[int, dict[str, Any]] = {}  # id(weight) -> statistics since the last step
        self._warned_diagonal = False
        self._diag_counts: dict[int, tuple[int, str]] = {}  # id(param) -> (samples, "Module.name")
        self._mc = {"step": False, "forward": False}  # mc_backward called / a recorded layer ran
        self._plans: dict[int, tuple] = {}  # id(group) -> (signature, plan), see _plan
        self.grad_scaler = grad_scaler
        me = weakref.ref(self)

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            opt = me()
            if opt is not None:
                opt._record(module, inputs, output)

        self._hook = register_module_forward_hook(hook)
        weakref.finalize(self, self._hook.remove)

    # ------------------------------------------------------------------ statistics
    def _owned(self) -> dict[int, tuple[dict, torch.Tensor]]:
        # rebuilt only when the groups change: the hook runs on every module's forward
        signature = tuple((id(g), len(g["params"])) for g in self.param_groups)
        if getattr(self, "_owned_signature", None) != signature:
            self._owned_map = {id(p): (g, p) for g in self.param_groups for p in g["params"]}
            self._owned_signature = signature
        return self._owned_map

    def _record(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        if not kronecker_structured(module):
            if module._parameters:  # most modules own none: this hook runs on every forward
                self._record_diagonal(module, inputs)
            return
        owned = self._owned()
        key = id(module.weight)
        if key not in owned or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        group, weight = owned[key]
        self._mc["forward"] = True
        if self.state[weight].get("step", 0) % group["factor_every"] != 0:
            return
        self._layers[key] = module
        bias = module.bias is not None and id(module.bias) in owned
        stats = self._pending.get(key)
        if stats is None:  # sums over the step's batches, normalized when the step takes them
            stats = self._pending[key] = {"A": None, "a_count": 0, "G": None, "g_count": 0, "g_calls": 0,
                                          "g_samples": 0, "outputs": []}
        with torch.no_grad():
            a = layer_inputs(module, inputs[0].detach())
            n = a.shape[0]
            stats["A"] = input_factor(a, group["kfac_approx"], bias=bias, alpha=n, out=stats["A"])
        stats["a_count"] += n
        stats["outputs"].append((output, module, group, n))

        def on_grad(grad: torch.Tensor) -> None:
            if self._mc["step"]:
                return  # this step's G comes from mc_backward's sampled labels
            self._add_G(stats, module, group, grad.detach().unsqueeze(0), n)

        output.register_hook(on_grad)

    def _record_diagonal(self, module: nn.Module, inputs: tuple) -> None:
        """Count the samples seen by a module's own parameters (diagonal blocks): the leading
        dimension of its first tensor input."""
        owned = self._owned()
        x = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        n = x.shape[0] if x is not None and x.dim() > 0 else 1
        for name, p in module._parameters.items():
            if p is not None and id(p) in owned:
                seen, _ = self._diag_counts.get(id(p), (0, ""))
                self._diag_counts[id(p)] = (seen + n, f"{type(module).__name__}.{name}")

    @staticmethod
    @torch.no_grad()
    def _add_G(stats: dict, module: nn.Module, group: dict, grads: torch.Tensor, n: int) -> None:
        """Add ``sum g g^T`` for gradients ``[S, N, ...]`` w.r.t. a layer output, with their
        counts. The step's ``G`` is ``N_total sum g g^T / S``: for gradients of a mean over all
        ``N_total`` samples of the step (``(1/N_total) d l_n / d s``, also when they arrive in
        several backward calls of micro-batches whose losses are divided by their number), the
        Fisher's output factor, averaged over the ``S`` draws."""
        g = layer_output_vectors(module, grads)
        stats["G"] = output_factor(g, group["kfac_approx"], out=stats["G"])
        stats["g_count"] += grads.shape[0]
        stats["g_calls"] += 1
        stats["g_samples"] += n

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``; drops the cached per-group plans, which
        point into the replaced state."""
        super().load_state_dict(state_dict)
        self._plans.clear()

    def close(self) -> None:
        """Remove the module hook now (it is also removed when the optimizer is collected)."""
        self._hook.remove()
        self._clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients and the curvature statistics recorded with them."""
        self._clear()
        super().zero_grad(set_to_none=set_to_none)

    def _clear(self) -> None:
        self._pending.clear()
        self._diag_counts.clear()
        self._mc["step"] = self._mc["forward"] = False

    def mc_backward(self, outputs: torch.Tensor, loss_fn: Any, samples: int = 1,
                    generator: torch.Generator | None = None) -> None:
        """Record this step's ``G`` from labels sampled from the model (the true Fisher).

        Call it between the forward pass and ``loss.backward()``::

            outputs = model(X)
            optimizer.mc_backward(outputs, loss_fn)   # the one extra line
            loss_fn(outputs, y).backward()

        Labels are drawn from the predictive distribution that ``loss_fn`` implies
        (categorical for ``CrossEntropyLoss``, Bernoulli for ``BCEWithLogitsLoss``,
        Gaussian for ``MSELoss``), ``samples`` times; their loss gradients are
        backpropagated to the recorded layer outputs only, so parameter gradients are
        untouched.
        """
        spec = loss_spec(loss_fn, "KFAC.mc_backward")
        records = [(stats, *rec) for stats in self._pending.values() for rec in stats["outputs"]]
        if not records:
            if self._mc.get("forward"):
                return  # no layer updates its factors at this step (factor_every)
            raise RuntimeError("mc_backward needs a forward pass through the optimizer's layers with "
                               "gradients enabled since the last zero_grad()/step()")
        with torch.no_grad():
            U = spec.sampled_gradients(outputs.detach(), samples, generator) * spec.scale(outputs.detach())
        self._mc["step"] = True  # the output hooks stand aside for this step
        # all draws in one batched backward, to the recorded layer outputs only
        grads = torch.autograd.grad(outputs, [r[1] for r in records], U, retain_graph=True, allow_unused=True,
                                    is_grads_batched=True)
        for (stats, _, module, group, n), g in zip(records, grads):
            if g is not None:
                self._add_G(stats, module, group, g, n)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One K-FAC update; ``closure`` (optional) re-evaluates the loss with gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads and not _all_finite(grads):
            warnings.warn("KFAC: non-finite gradient; step skipped, parameters and factors unchanged",
                          stacklevel=2)
            self._clear()
            return loss
        new = self._new_factors()
        if new is None:
            return loss
        for group in self.param_groups:
            self._step_group(group, new)
        self._clear()
        return loss

    def _new_factors(self) -> dict[int, dict[str, tuple[torch.Tensor, float]]] | None:
        """``id(weight) -> {"A": (sum, divisor), "G": (sum, divisor)}`` of this step's statistics
        (the factor is ``sum / divisor``; G's divisor folds in the GradScaler's scale), or None
        if one is not finite."""
        new = {}
        for key, stats in self._pending.items():
            if stats["G"] is None or stats["a_count"] == 0:
                continue  # a forward without a backward through this layer
            g_divisor = stats["g_count"] / stats["g_calls"] / stats["g_samples"]  # draws per call / samples
            if self.grad_scaler is not None and self.grad_scaler.is_enabled():
                g_divisor *= float(self.grad_scaler.get_scale()) ** 2
            new[key] = {"A": (stats["A"], float(stats["a_count"])), "G": (stats["G"], g_divisor)}
        if new and not _all_finite([total for factors in new.values() for total, _ in factors.values()]):
            warnings.warn("KFAC: non-finite Kronecker factor; step skipped, parameters and factors unchanged",
                          stacklevel=3)
            self._clear()
            return None
        return new

    def _plan(self, group: dict) -> tuple[list[tuple], list[torch.Tensor]]:
        """The group's recorded layers as ``(weight, bias or None, state, bias state, weight size per
        output)`` and its parameters outside them; cached until the group or the recorded layers
        change (or a state dict is loaded), since the step runs this per group on every step."""
        signature = (len(group["params"]), len(self._layers))
        cached = self._plans.get(id(group))
        if cached is not None and cached[0] == signature:
            return cached[1]
        owned = self._owned()
        biases = {id(m.bias) for m in self._layers.values() if m.bias is not None}
        layers, others = [], []
        for p in group["params"]:
            module = self._layers.get(id(p))
            if module is not None:
                # the bias column of A exists exactly when the bias is the optimizer's (see _record)
                bias = module.bias if module.bias is not None and id(module.bias) in owned else None
                layers.append((p, bias, self.state[p], None if bias is None else self.state[bias],
                               p.numel() // p.shape[0]))
            elif id(p) not in biases:
                others.append(p)
        self._plans[id(group)] = (signature, (layers, others))
        return layers, others

    def _step_group(self, group: dict, new: dict[int, tuple]) -> None:
        lr, damping, wd = group["lr"], group["damping"], group["weight_decay"]
        kl = group["kl_clip"] > 0 and lr > 0
        params: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []  # preconditioned gradients, in the order of params
        states: list[dict] = []
        dots: list[torch.Tensor] = []  # update . grad per layer, for the KL clip
        plain: list[torch.Tensor] = []  # Kronecker layers before their first statistics
        layers, others = self._plan(group)
        for p, bias, state, bias_state, d_w in layers:
            gw = p.grad
            if gw is None:
                continue
            if id(p) in new:
                _average_factors(state, new[id(p)], group["factor_decay"])
            if "A" not in state:  # no statistics yet: plain gradient step for this layer
                plain += [t for t in (p, bias) if t is not None and t.grad is not None]
                continue
            step = state.get("step", 0)
            # warm-up: the first factors come from few batches, so until inverse_every steps have
            # passed the inverses follow every factor update
            refresh = step % group["inverse_every"] == 0 or (step < group["inverse_every"] and id(p) in new)
            if group["factored_damping"]:
                # explicit damped inverses by Cholesky: two matmuls per step; a damping changed by
                # a scheduler takes effect at once, from the current factors
                if refresh or "inv_A" not in state or state["inv_damping"] != damping:
                    state["inv_A"], state["inv_G"] = factored_inverses_cholesky(state["A"], state["G"], damping)
                    state["inv_damping"] = damping
            elif refresh or "eig_A" not in state:
                for name in ("A", "G"):
                    lam, Q = torch.linalg.eigh(state[name])
                    state[f"eig_{name}"] = (lam.clamp_min(0.0), Q)
            gw = _decayed(gw, p, wd)
            gw = gw if gw.dim() == 2 else gw.reshape(gw.shape[0], -1)
            gb = None
            if bias is not None:
                gb = _decayed(bias.grad if bias.grad is not None else torch.zeros_like(bias), bias, wd)
            if group["factored_damping"]:
                u_w, u_b = factored_product(state["inv_G"], gw, gb, state["inv_A"])
            else:
                M = gw if gb is None else torch.cat([gw, gb[:, None]], dim=1)
                R = kronecker_solve(M, state["eig_A"], state["eig_G"], damping, False)
                u_w, u_b = (R, None) if gb is None else (R[:, :d_w], R[:, d_w])
            params.append(p)
            steps.append(u_w.view_as(p))
            states.append(state)
            if u_b is not None and bias.grad is not None:  # a bias without a gradient stays put
                params.append(bias)
                steps.append(u_b)
                states.append(bias_state)
            if kl:  # update . grad of the whole layer
                dots.append(torch.vdot(u_w.reshape(-1), gw.reshape(-1)))
                if u_b is not None:
                    dots.append(torch.dot(u_b, gb))
            state["step"] = step + 1
        extra = self._diagonal_updates(group, [p for p in others if p.grad is not None])
        extra += [(p, _decayed(p.grad, p, wd), p.grad) for p in plain]
        for p, u, _ in extra:
            params.append(p)
            steps.append(u)
            states.append(self.state[p])
        if not params:
            return
        scale = 1.0
        if kl:
            dots += [torch.vdot(u.reshape(-1), g.reshape(-1)) for _, u, g in extra]
            vg = float(torch.stack(dots).sum()) * lr**2
            if vg > 0:
                scale = min(1.0, (group["kl_clip"] / vg) ** 0.5)
        if group["momentum"]:  # buf = momentum * buf + scale * u, batched over the group's tensors
            bufs = [state.get("momentum_buffer") for state in states]
            if all(b is not None for b in bufs):
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, steps, alpha=scale)
            else:  # a buffer starts as the first (clipped) update
                for i, (b, u) in enumerate(zip(bufs, steps)):
                    if b is None:
                        bufs[i] = states[i]["momentum_buffer"] = u * scale if scale != 1.0 else u.clone()
                    else:
                        b.mul_(group["momentum"]).add_(u, alpha=scale)
            steps, scale = bufs, 1.0
        torch._foreach_add_(params, steps, alpha=-lr * scale)

    def _diagonal_updates(self, group: dict, params: list[torch.Tensor]) -> list[tuple]:
        """``(param, (grad + wd * param) / (D + damping), grad)`` for parameters without a Kronecker
        structure, ``D`` a moving average of ``N * grad**2`` updated every ``factor_every`` steps."""
        if not params:
            return []
        if not self._warned_diagonal:
            self._warned_diagonal = True
            names = ", ".join(f"{self._diag_counts.get(id(p), (0, 'parameter'))[1]} {tuple(p.shape)}"
                              for p in params)
            warnings.warn(f"KFAC: {names} not in a Kronecker layer ({KRONECKER_DESCRIPTION}); they get a "
                          "diagonal block (moving average of N * grad**2)", stacklevel=5)
        fallback = max([n for n, _ in self._diag_counts.values()]
                       + [stats["a_count"] for stats in self._pending.values()] + [1])
        wd, decay = group["weight_decay"], group["factor_decay"]
        out = []
        for p in params:
            state = self.state[p]
            step = state.get("step", 0)
            if step % group["factor_every"] == 0:
                n = self._diag_counts.get(id(p), (fallback, ""))[0]
                D = p.grad.square() * n
                state["diag"] = D if "diag" not in state else decay * state["diag"] + (1 - decay) * D
            state["step"] = step + 1
            grad = _decayed(p.grad, p, wd)
            out.append((p, grad / (state["diag"] + group["damping"]), grad))
        return out
