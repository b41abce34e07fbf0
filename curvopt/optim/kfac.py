"""The K-FAC optimizer (Martens & Grosse, 2015), usable in an unchanged training loop.

``optimizer = curvopt.KFAC(model.parameters())``, then the usual
``zero_grad(); loss.backward(); step()``. The optimizer finds the ``Linear``/``Conv1d``/
``Conv2d`` layers that own its parameters by itself: one global module forward hook,
filtered by parameter identity, notes each such layer's input and puts a hook on its
output's gradient; the statistics are taken when that gradient arrives, so a forward
pass that no backward pass follows leaves nothing behind. The hooks are installed only for the
steps that update factors (every ``factor_every``): the forward passes in between run on PyTorch's
hook-free path and cost what they cost without the optimizer. Kronecker factors are the
empirical Fisher's (the gradients of the loss being minimized), computed with the same
functions as the ``kfac`` curvature operator (:mod:`curvopt.curvature.kfac`).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import ChainMap
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim import Optimizer

from curvopt import distributed
from curvopt.curvature.kfac import APPROXIMATIONS
from curvopt.curvature.kfac_factors import (
    DiagonalBlock,
    KroneckerFactors,
    LayerStatistics,
    StepStatistics,
    bias_blocks,
    damped_inverse_entries,
    factored_product,
    input_factor,
    output_factor,
    statistics_dtype,
)
from curvopt.curvature.kfac_layers import (
    KRONECKER_DESCRIPTION,
    batch_dim,
    kronecker_structured,
    layer_inputs,
    layer_output_vectors,
    layer_rows,
)
from curvopt.curvature.losses import loss_spec
from curvopt.errors import OptionError
from curvopt.optim.kfac_distribute import DISTRIBUTE_MODES, CommunicationLog, assign_owners

#: State entries that hold curvature statistics: kept in float32 for half-precision parameters,
#: also through ``load_state_dict`` (which casts floating state to the parameter's dtype).
STATISTICS_KEYS = ("A", "G", "inv_A", "inv_G", "eig_A", "eig_G", "diag")


def _finite_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A float64 device scalar that is finite if every entry of ``tensors`` is: the sum of their
    2-norms (cheap, no concatenation). It also overflows for entries beyond ~1e19, so a non-finite
    value is confirmed entry by entry (:func:`_all_finite`)."""
    return torch.stack(torch._foreach_norm(tensors)).sum().to(torch.float64)


def _all_finite(tensors: list[torch.Tensor], known_sum: float | None = None) -> bool:
    """Whether every entry is finite, with one synchronisation (none when ``known_sum``, the value of
    :func:`_finite_sum`, was read already and is finite)."""
    total = _finite_sum(tensors).item() if known_sum is None else known_sum
    if math.isfinite(total):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; ``t`` itself, without a dispatch, when it already is (the step's hot path runs
    after a backward pass has evicted the dispatcher's code from the caches, so each no-op call costs)."""
    return t if t.dtype == dtype else t.to(dtype)


def _decayed(grad: torch.Tensor, p: torch.Tensor, wd: float) -> torch.Tensor:
    """The gradient with the L2 penalty's ``wd * p`` added (``grad`` itself when ``wd`` is 0)."""
    return grad + wd * p if wd else grad


def _on_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor or a tuple of them) moved to ``device``, in its own dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device)
    if isinstance(value, (tuple, list)):
        return type(value)(_on_device(v, device) for v in value)
    return value


class _Application:
    """One application of a Kronecker layer in a forward pass, kept alive by its output's gradient
    hook only (and, for the latest forward pass of the layer, by the optimizer for
    :meth:`KFAC.mc_backward`): once the user drops an output that no backward pass reached, it is
    freed with the graph. It must not reference the output (the hook lives on the output's graph)."""

    __slots__ = ("key", "module", "group", "bias", "x", "forward", "taken")

    def __init__(self, key: int, module: nn.Module, group: dict, bias: bool, x: torch.Tensor,
                 forward: dict) -> None:
        self.key, self.module, self.group, self.bias = key, module, group, bias
        self.x, self.forward = x, forward
        self.taken: dict | None = None  # the statistics its input went into


class KFAC(Optimizer):
    """K-FAC with Tikhonov (optionally factored) damping, KL clipping, momentum and weight decay.

    The defaults (``lr=0.03, damping=0.1``, factors every 20 steps, inverses every 200) were chosen
    from the measured grid of ``benchmarks/kfac_defaults.py`` (schedules x lr x damping, several
    seeds): an amortized step of about 1.25-1.35 Adam steps on small CNNs (factors every step, the old
    default, cost 2.6-3.7), and the best worst-seed test accuracy of the grid on the digits CNN in 8
    epochs (0.975 over 6 seeds; Adam 0.947). The KL clip bounds the update's size, so ``damping``
    matters more than ``lr``.

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
        distribute: Under an initialized process group (DDP), who inverts the factors (KAISA,
            Pauloski et al., 2021): ``"replicate"`` every rank; ``"comm_opt"`` one rank per layer,
            assigned by cost, which sends the inverses to all; ``"mem_opt"`` the owner alone, which
            keeps the inverses and sends the preconditioned gradient instead. No effect without a group.
        lazy_sync: Sum the factor statistics over the ranks only when the inverses are recomputed
            (kfac-jax): each rank averages its own statistics in between, and the factors are averaged
            over the ranks before inversion (exact for equal per-rank batches). Default: at every
            factor update, one collective for all layers.
        process_group: The ``torch.distributed`` group (default: the default group).

    Data parallel (``torchrun`` + DDP): the gradients are used as DDP left them (averaged over the ranks;
    the optimizer does not average again), and the factors are those of the union of the ranks' batches:
    ``A`` and the sample counts summed, ``G`` each rank's factor weighted by its samples, all layers in one
    bucketed all-reduce per factor update. Gradient accumulation under ``model.no_sync()`` counts every
    micro-batch's statistics. :attr:`communication` logs the bytes this rank sent per kind of collective.

    The factors are the empirical Fisher's by default. For the true Fisher, add one line
    before ``loss.backward()``: ``optimizer.mc_backward(outputs, loss_fn)``
    (:meth:`mc_backward`), which draws labels from the model's predictions.

    Statistics belong to the gradients they come with: a layer's input and output gradient
    are taken when the gradient arrives, so a forward pass with gradients enabled that no
    backward pass follows (validation without ``torch.no_grad()``) adds nothing and keeps
    nothing alive once its outputs are dropped. They accumulate over several backward calls
    (gradient accumulation) and are dropped by ``zero_grad()`` and by a skipped step. Like the
    gradient, the factors are then those of the loss averaged over all the step's samples when
    each micro-batch's mean loss is weighted by its share of them (``loss * len(batch) / total``,
    or ``/ k`` for ``k`` equal micro-batches): one step on the micro-batches equals one step on
    them together.

    What each layer gets (as in the ``kfac`` curvature operator):

    * ``Linear``, ``Conv1d``/``Conv2d`` (``groups=1``, zero padding): ``A ⊗ G``. A layer applied
      several times in one forward pass (one call of the outermost module) has its statistics
      over all applications, as extra positions (Eschenhagen et al., 2023): ``A`` the mean over
      the rows of all applications, ``G`` ``N`` times the sum of ``g g^T`` over them, the
      applications sharing the forward pass's ``N`` samples.
    * Every other parameter gets a diagonal block: a moving average of ``N * grad**2`` (``N``
      the samples their module saw since the last step, counted along the batch dimension,
      dim 1 for ``batch_first=False`` layers), the "square of the sum" estimate of the Fisher
      diagonal, which assumes ``grad`` is the gradient of a mean loss. This covers norm layers,
      embeddings, ``nn.RNN``/``LSTM``/``GRU`` and ``nn.MultiheadAttention`` (its ``in_proj`` and
      its ``out_proj``, a ``Linear`` whose forward never runs, so its hook never fires). One
      warning names them at the first step.

    Half-precision (bfloat16/float16) parameters: the statistics are accumulated and kept in
    float32 (also through ``load_state_dict``), the update is computed in float32 and applied in
    the parameters' dtype.

    Mixed precision: ``scaler.step(optimizer)`` of a ``torch.amp.GradScaler`` hands the optimizer
    its scale (PyTorch's ``_step_supports_amp_scaling`` protocol, attributes ``grad_scale`` and
    ``found_inf``); the optimizer unscales the gradients and ``G`` itself and skips the step on
    inf/NaN, so ``grad_scaler=`` is needed only when ``scaler.unscale_(optimizer)`` is called before
    ``scaler.step`` (then the statistics' scale is read from it).
    A non-finite gradient or factor skips the step: parameters, factors and counters stay
    as they were, and a warning says why.
    """

    #: ``torch.amp.GradScaler.step`` passes its scale instead of unscaling the gradients itself.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 0.03, damping: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, factor_decay: float = 0.95, factor_every: int = 20,
                 inverse_every: int = 200, kl_clip: float = 1e-3, factored_damping: bool = True,
                 kfac_approx: str = "expand", grad_scaler: Any = None, distribute: str = "replicate",
                 lazy_sync: bool = False, process_group: Any = None) -> None:
        if distribute not in DISTRIBUTE_MODES:
            raise OptionError(f"KFAC: distribute={distribute!r}; valid: {', '.join(map(repr, DISTRIBUTE_MODES))}")
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
        self._pending = StepStatistics()  # statistics since the last step
        # id(weight) -> (forward id, forward info, applications, their outputs) of the layer's latest
        # forward pass, the one mc_backward may need; older applications live only as long as their graphs
        self._latest: dict[int, tuple[int, dict, list[_Application], list[torch.Tensor]]] = {}
        self._forward = {"depth": 0, "id": 0}  # nesting of module calls; id of the outermost call
        self._warned_diagonal = False
        self._mc = {"step": False, "forward": False}  # mc_backward called / a recorded layer ran
        self._plans: dict[int, tuple] = {}  # id(group) -> (signature, plan), see _plan
        # id(weight) -> (inv_A, its bias_blocks): the views are taken once per inverse, not at every step
        self._blocks: dict[int, tuple[torch.Tensor, tuple]] = {}
        self.grad_scaler = grad_scaler
        self.distribute, self.lazy_sync, self.process_group = distribute, bool(lazy_sync), process_group
        self.communication = CommunicationLog()
        self._owner_plan: tuple | None = None  # (signature, {id(weight): owning rank})
        me = weakref.ref(self)
        depth = self._forward

        def pre_hook(module: nn.Module, inputs: tuple) -> None:
            if depth["depth"] == 0:  # an outermost call: a new forward pass
                depth["id"] += 1
            depth["depth"] += 1

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            depth["depth"] = max(depth["depth"] - 1, 0)
            opt = me()
            if opt is not None:
                opt._record(module, inputs, output)

        self._hook_fns = (pre_hook, hook)
        # the global hooks are installed only while a factor update is due (see _sync_hooks): between
        # factor updates the user's forward passes run on PyTorch's hook-free fast path
        self._hooks: list = []
        self._closed = False
        self._undiscovered: set[int] = set()  # id(weight) with loaded factors whose layer no hook has seen
        self._install_hooks()
        weakref.finalize(self, _remove_hooks, self._hooks)

    def _install_hooks(self) -> None:
        if not self._hooks and not self._closed:
            pre_hook, hook = self._hook_fns
            self._forward["depth"] = 0
            # always_call: an exception inside a forward pass must not leave the depth counter raised
            self._hooks += [register_module_forward_pre_hook(pre_hook),
                            register_module_forward_hook(hook, always_call=True)]

    def _factor_step_due(self) -> bool:
        """Whether the next step updates some factor or diagonal block: a parameter that can have a
        gradient and whose step count is a multiple of its group's ``factor_every`` (as in :meth:`_record`)."""
        if self._undiscovered:  # factors loaded from a state dict, layers not seen yet: hooks until they are
            self._undiscovered.difference_update(self._layers)
            if self._undiscovered:
                return True
        signature = (len(self._layers), tuple((id(g), len(g["params"])) for g in self.param_groups))
        if getattr(self, "_counted_signature", None) != signature:
            # a recorded layer's bias has no step count of its own: its weight's decides
            biases = {id(m.bias) for m in self._layers.values() if m.bias is not None}
            self._counted = [(g, [p for p in g["params"] if id(p) not in biases]) for g in self.param_groups]
            self._counted_signature = signature
        for group, params in self._counted:
            every = group["factor_every"]
            for p in params:
                if p.requires_grad:
                    state = self.state.get(p)
                    if every == 1 or state is None or state.get("step", 0) % every == 0:
                        return True
        return False

    def _sync_hooks(self) -> None:
        """Install the module hooks when the next step updates factors, remove them otherwise. A
        ``factor_every`` changed between steps takes effect from the step after the next."""
        if self._factor_step_due():
            self._install_hooks()
        else:
            _remove_hooks(self._hooks)

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the new parameters' first step records factors."""
        super().add_param_group(param_group)
        if hasattr(self, "_hooks"):  # not during __init__, which installs them itself
            self._sync_hooks()

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
        self._layers[key] = module  # also between factor updates: a loaded state dict's layers are found here
        if self.state[weight].get("step", 0) % group["factor_every"] != 0:
            return
        x = inputs[0].detach()  # shares storage with the input the layer's backward keeps anyway
        fid = self._forward["id"]
        latest = self._latest.get(key)
        if latest is None or latest[0] != fid:  # the layer's first application in this forward pass
            latest = self._latest[key] = (fid, {"n": x.shape[0], "rows": 0, "a_taken": None, "g_taken": None},
                                          [], [])
        forward = latest[1]
        forward["rows"] += layer_rows(module, x, group["kfac_approx"])
        app = _Application(key, module, group, module.bias is not None and id(module.bias) in owned, x, forward)
        latest[2].append(app)
        latest[3].append(output)
        me = weakref.ref(self)

        def on_grad(grad: torch.Tensor) -> None:
            opt = me()
            if opt is not None:
                opt._take(app, None if opt._mc["step"] else grad.detach().unsqueeze(0))

        output.register_hook(on_grad)

    @torch.no_grad()
    def _take(self, app: _Application, grads: torch.Tensor | None) -> None:
        """Add an application's statistics once its output gradient arrived: ``A`` from its input
        (once per step), and ``G`` from ``grads`` ``[S, N, ...]`` unless None (mc_backward's step)."""
        stats = self._pending.layer(app.key)
        forward = app.forward
        if app.taken is not stats:
            app.taken = stats
            # the forward pass's rows all weigh alike: A is the mean over the rows of every application
            a = layer_inputs(app.module, app.x)
            rows = a.shape[0] * (1 if app.group["kfac_approx"] == "reduce" else a.shape[1])
            stats.A = input_factor(a, app.group["kfac_approx"], bias=app.bias,
                                   alpha=forward["n"] * rows / max(forward["rows"], 1), out=stats.A)
            if forward["a_taken"] is not stats:  # the applications share the forward pass's samples
                forward["a_taken"] = stats
                stats.a_count += forward["n"]
        if grads is not None:
            self._add_G(stats, app, grads)

    @staticmethod
    @torch.no_grad()
    def _add_G(stats: LayerStatistics, app: _Application, grads: torch.Tensor) -> None:
        """Add ``sum g g^T`` for gradients ``[S, N, ...]`` w.r.t. a layer output, with their
        counts. The step's ``G`` is ``N_total sum g g^T / S``: for gradients of a mean over all
        ``N_total`` samples of the step (``(1/N_total) d l_n / d s``, also when they arrive in
        several backward calls of micro-batches whose losses are divided by their number), the
        Fisher's output factor, averaged over the ``S`` draws. Applications of the layer in one
        forward pass share its samples: they count them once."""
        g = layer_output_vectors(app.module, grads)
        stats.G = output_factor(g, app.group["kfac_approx"], out=stats.G)
        stats.g_count += grads.shape[0]
        stats.g_calls += 1
        if app.forward["g_taken"] is not stats:
            app.forward["g_taken"] = stats
            stats.g_samples += app.forward["n"]

    def _record_diagonal(self, module: nn.Module, inputs: tuple) -> None:
        """Count the samples seen by a module's own parameters (diagonal blocks): the batch
        dimension of its first tensor input."""
        owned = self._owned()
        x = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        dim = batch_dim(module)
        n = x.shape[dim] if x is not None and x.dim() > dim else 1
        # attention applies out_proj's weight itself: out_proj's forward (and its hook) never runs
        params = (module.named_parameters() if isinstance(module, nn.MultiheadAttention)
                  else module._parameters.items())
        for name, p in params:
            if p is not None and id(p) in owned:
                self._pending.count_samples(id(p), n, f"{type(module).__name__}.{name}")

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, with the curvature statistics in their saved
        dtype (float32 for half-precision parameters; torch would cast them to the parameter's
        dtype); drops the cached per-group plans, which point into the replaced state."""
        saved = {index: {k: v for k, v in entry.items() if k in STATISTICS_KEYS}
                 for index, entry in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        indices = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(indices, params):
            for k, v in saved.get(index, {}).items():
                self.state[p][k] = _on_device(v, p.device)
        self._plans.clear()
        self._blocks.clear()
        # a weight with factors is preconditioned only once its layer is known (its bias is part of the
        # block): the hooks stay until the next forward pass has shown every such layer
        self._undiscovered = {id(p) for p in params if "A" in self.state.get(p, {})} - self._layers.keys()
        self._sync_hooks()

    def close(self) -> None:
        """Remove the module hooks now (they are also removed when the optimizer is collected)."""
        self._closed = True
        _remove_hooks(self._hooks)
        self._clear()
        self._latest.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients and the curvature statistics recorded with them."""
        self._clear()
        super().zero_grad(set_to_none=set_to_none)

    def _clear(self) -> None:
        # the latest forward passes stay: mc_backward may follow a zero_grad() placed after the forward
        self._pending.clear()
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
        records = [(app, out) for _, _, apps, outs in self._latest.values() for app, out in zip(apps, outs)]
        if not records:
            if self._mc.get("forward") or (not self._hooks and not self._closed):
                return  # no layer updates its factors at this step (factor_every): the hooks stood aside
            raise RuntimeError("mc_backward needs a forward pass through the optimizer's layers with "
                               "gradients enabled since the last step()")
        with torch.no_grad():
            U = spec.sampled_gradients(outputs.detach(), samples, generator) * spec.scale(outputs.detach())
        self._mc["step"] = True  # the output hooks stand aside for this step
        # all draws in one batched backward, to the recorded layer outputs only
        grads = torch.autograd.grad(outputs, [out for _, out in records], U, retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        for (app, _), g in zip(records, grads):
            if g is not None:  # None: an output of another forward pass than ``outputs``'
                self._take(app, g)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One K-FAC update; ``closure`` (optional) re-evaluates the loss with gradients.

        The step reads the device once (the finiteness of the gradients and the KL clip's
        ``update . grad``, together), twice at a factor update (the new statistics are checked before
        they enter the factors) and once more at an inverse update (the Cholesky factorizations'
        success flags); a GradScaler's scale and skip flag are one more read."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._latest.clear()  # no mc_backward after the step: free the last forward pass's outputs
        try:
            self._update()
        finally:
            self._sync_hooks()
        return loss

    def _update(self) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        found_inf, grad_scale = self._scaler_values()
        if found_inf:  # the scaler's own skip: it backs off its scale
            self._clear()
            return
        stats_scale = self._statistics_scale(grads, grad_scale)
        new = self._new_factors(stats_scale)
        checked = False
        if new:  # a factor update: nothing may enter the factors before it is known to be finite
            sums = [total for factors in new.values() for total, _ in factors.values()]
            ok = _all_finite(grads + sums)
            if self.lazy_sync and distributed.active(self.process_group) and sums:
                # lazy sync keeps each rank's statistics local: the ranks agree on the skip, or a rank that
                # skips leaves the others waiting in the next factor sync
                flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64, device=sums[0].device)
                (flag,) = distributed.sum_across([flag], self.process_group)
                ok = float(flag) == 0.0
            if not ok:
                what = ("gradient" if not _all_finite(grads) else
                        "Kronecker factor" if not _all_finite(sums) else "Kronecker factor on another rank")
                warnings.warn(f"KFAC: non-finite {what}; step skipped, parameters and factors unchanged",
                              stacklevel=3)
                self._clear()
                return
            checked = True
        updates = [self._prepare_group(group, new) for group in self.param_groups]
        # the step's one read of the device: the gradients' finiteness and every group's update . grad
        reads = [] if checked or not grads else [_finite_sum(grads)]
        reads += [u["vg"] for u in updates if u is not None and u["vg"] is not None]
        values = torch.stack(reads).tolist() if reads else []
        if not checked and grads and not math.isfinite(values[0]) and not _all_finite(grads, known_sum=values[0]):
            warnings.warn("KFAC: non-finite gradient; step skipped, parameters and factors unchanged",
                          stacklevel=3)
            self._clear()
            return
        vgs = iter(values[0 if checked or not grads else 1:])
        for group, update in zip(self.param_groups, updates):
            if update is not None:
                self._apply_group(group, update, next(vgs) if update["vg"] is not None else None)
        self._clear()

    def _scaler_values(self) -> tuple[bool, float | None]:
        """``(found_inf, grad_scale)`` handed over by ``GradScaler.step`` (amp scaling protocol), read from the
        device together; ``(False, None)`` outside it."""
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        tensors = [t for t in (found_inf, grad_scale) if t is not None]
        if not tensors:
            return False, None
        values = torch.stack([t.reshape(-1)[0].to(device=tensors[0].device, dtype=torch.float64)
                              for t in tensors]).tolist()
        found = found_inf is not None and values[0] > 0
        return found, (values[-1] if grad_scale is not None else None)

    def _statistics_scale(self, grads: list[torch.Tensor], grad_scale: float | None) -> float:
        """The loss scale the recorded output gradients carry; unscales ``grads`` in place when
        ``GradScaler.step`` handed its scale over (``grad_scale``) instead of unscaling them."""
        if grad_scale is not None:
            if grads and grad_scale != 1.0:
                torch._foreach_mul_(grads, 1.0 / grad_scale)
            return grad_scale
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            return float(self.grad_scaler.get_scale())
        if hasattr(self, "found_inf") and self._pending:
            # GradScaler.step after the user's scaler.unscale_(optimizer): the gradients are unscaled,
            # the recorded statistics are not, and nothing tells their scale
            raise OptionError("KFAC: scaler.unscale_(optimizer) was called before scaler.step(optimizer), so "
                              "the curvature statistics' loss scale is unknown; pass the scaler as "
                              "KFAC(..., grad_scaler=scaler)")
        return 1.0

    def _new_factors(self, stats_scale: float = 1.0) -> dict[int, dict[str, tuple[torch.Tensor, float]]]:
        """``id(weight) -> {"A": (sum, divisor), "G": (sum, divisor)}`` of this step's statistics
        (the factor is ``sum / divisor``; G's divisor folds in the loss scale ``stats_scale`` of a
        GradScaler); the caller checks that they are finite. Under a process group (and without
        ``lazy_sync``) the statistics are first summed over the ranks, in one collective: every rank then
        checks the same sums, so all skip or none."""
        if self._pending and not self.lazy_sync and distributed.active(self.process_group):
            self._reduce_statistics()
        new = {}
        for key, stats in self._pending.layers.items():
            sums = stats.factor_sums(stats_scale)
            if sums is not None:
                new[key] = sums
        return new

    def _reduce_statistics(self) -> None:
        """Sum this step's statistics over the ranks (all layers of all groups in parameter order)."""
        layers, diagonal, like = [], [], None
        for group in self.param_groups:
            group_layers, others = self._plan(group)
            for p, bias, _, _, d_w in group_layers:
                layers.append((id(p), d_w + (bias is not None), p.shape[0]))
                like = like if like is not None else p.new_empty(0, dtype=statistics_dtype(p.dtype))
            diagonal += [id(p) for p in others]
        if like is None:
            p = next(p for g in self.param_groups for p in g["params"])
            like = p.new_empty(0, dtype=statistics_dtype(p.dtype))
        nbytes = self._pending.reduce(layers, diagonal, like, self.process_group)
        self.communication.add_bytes("factors", nbytes)

    def _mode(self) -> str:
        """The ``distribute`` mode in effect: ``"replicate"`` without a process group."""
        return self.distribute if distributed.active(self.process_group) else "replicate"

    def _owners(self) -> dict[int, int]:
        """``id(weight) -> rank`` that inverts the layer (``comm_opt``/``mem_opt``), by cost over every
        recorded layer in parameter order; cached until the layers or groups change."""
        signature = (len(self._layers), tuple(len(g["params"]) for g in self.param_groups))
        if self._owner_plan is None or self._owner_plan[0] != signature:
            keys, costs = [], []
            for group in self.param_groups:
                for p, bias, _, _, d_w in self._plan(group)[0]:
                    keys.append(id(p))
                    costs.append(float(d_w + (bias is not None)) ** 3 + float(p.shape[0]) ** 3)
            ranks = assign_owners(costs, distributed.world_size(self.process_group))
            self._owner_plan = (signature, dict(zip(keys, ranks)))
        return self._owner_plan[1]

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

    def _prepare_group(self, group: dict, new: dict[int, dict]) -> dict | None:
        """A group's preconditioned gradients and its ``sum(update . grad)`` (a device scalar, for the KL
        clip), with the state entries they change (inverses, diagonal blocks, step counts) held back
        until the step is known to be taken; the new factor statistics enter the factors here, after
        the caller checked them. None when the group has nothing to update."""
        lr, wd = group["lr"], group["weight_decay"]
        kl = group["kl_clip"] > 0 and lr > 0
        params: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []  # preconditioned gradients, in the order of params
        states: list[dict] = []
        dots: list[torch.Tensor] = []  # update . grad per layer, for the KL clip
        plain: list[torch.Tensor] = []  # Kronecker layers before their first statistics
        commits: list[tuple[dict, dict]] = []  # (state, entries) written once the step is taken
        layers, others = self._plan(group)
        active = []
        for layer in layers:
            p, state = layer[0], layer[2]
            if p.grad is None:
                continue
            if id(p) in new:
                KroneckerFactors(state).update(new[id(p)], group["factor_decay"])
            if "A" not in state:  # no statistics yet: plain gradient step for this layer
                plain += [t for t in (p, layer[1]) if t is not None and t.grad is not None]
                continue
            active.append(layer)
        inverses = self._inverses(group, active, new)
        for (p, bias, state, bias_state, _), entries, (gw, gb), (u_w, u_b) in zip(
                active, *self._precondition(group, active, inverses)):
            params.append(p)
            steps.append(_cast(u_w if u_w.shape == p.shape else u_w.view_as(p), p.dtype))
            states.append(state)
            if u_b is not None and bias.grad is not None:  # a bias without a gradient stays put
                params.append(bias)
                steps.append(_cast(u_b, bias.dtype))
                states.append(bias_state)
            if kl:  # update . grad of the whole layer
                dots.append(torch.vdot(u_w.reshape(-1), gw.reshape(-1)))
                if u_b is not None:
                    dots.append(torch.dot(u_b, gb))
            commits.append((state, entries))
        extra = self._diagonal_updates(group, [p for p in others if p.grad is not None], commits)
        extra += [(p, _decayed(p.grad, p, wd), p.grad) for p in plain]
        for p, u, _ in extra:
            params.append(p)
            steps.append(_cast(u, p.dtype))
            states.append(self.state[p])
        if not params:
            for state, entries in commits:
                state.update(entries)
            return None
        vg = None
        if kl:
            dots += [torch.vdot(u.reshape(-1).float(), g.reshape(-1).float()) for _, u, g in extra]
            vg = torch.stack(dots).to(torch.float64).sum()  # summed in float64: one cast, not one per dot
        return {"params": params, "steps": steps, "states": states, "commits": commits, "vg": vg}

    def _precondition(self, group: dict, layers: list[tuple], inverses: list[dict | None]
                      ) -> tuple[list, list, list]:
        """Per layer: the state entries the step will commit (step count, refreshed inverses), the
        gradients ``(gw [out, in], gb [out] or None)`` with weight decay, in the factors' dtype, and the
        update ``(A ⊗ G + damping)^{-1} [gw | gb]`` as ``(u_w, u_b)``. Under ``mem_opt`` each rank
        preconditions the layers it owns, and the updates are summed over the ranks in one collective
        (the other ranks' parts are zeros)."""
        damping, wd, factored = group["damping"], group["weight_decay"], group["factored_damping"]
        all_entries, grads, updates = [], [], []
        mem_opt = self._mode() == "mem_opt"
        owners, me = (self._owners(), distributed.rank(self.process_group)) if mem_opt else ({}, 0)
        for (p, bias, state, _, _), inverse in zip(layers, inverses):
            entries: dict = {"step": state.get("step", 0) + 1}
            if inverse is not None:
                entries.update(inverse)
            dtype = state["A"].dtype  # float32 for half-precision layers: the update is computed in it
            gw = _cast(_decayed(p.grad, p, wd), dtype)
            gw = gw if gw.dim() == 2 else gw.reshape(gw.shape[0], -1)
            gb = None
            if bias is not None:
                gb_raw = bias.grad if bias.grad is not None else torch.zeros_like(bias)
                gb = _cast(_decayed(gb_raw, bias, wd), dtype)
            all_entries.append(entries)
            grads.append((gw, gb))
            if mem_opt and owners[id(p)] != me:
                updates.append((torch.zeros_like(gw), None if gb is None else torch.zeros_like(gb)))
                continue
            inv_A = entries.get("inv_A", state.get("inv_A"))
            if factored and inv_A is not None and entries.get("inv_damping", state.get("inv_damping")) == damping:
                # what KroneckerFactors.multiply does with stored inverses, with the inverse's blocks taken once
                blocks = None if gb is None else self._bias_blocks(p, inv_A)
                updates.append(factored_product(entries.get("inv_G", state.get("inv_G")), gw, gb, inv_A, blocks))
                continue
            # the held-back entries over the state: the step's inverses, stored only once it is taken
            block = KroneckerFactors(ChainMap(entries, state))
            updates.append(block.multiply(gw, gb, power=-1, damping=damping, factored=factored))
        if mem_opt and updates:
            flat = [u for pair in updates for u in pair if u is not None]
            summed = iter(distributed.sum_across(flat, self.process_group))
            self.communication.add("updates", flat)
            updates = [(next(summed), None if u_b is None else next(summed)) for _, u_b in updates]
        return all_entries, grads, updates

    def _bias_blocks(self, p: torch.Tensor, inv_A: torch.Tensor) -> tuple:
        """:func:`bias_blocks` of the layer's ``inv_A``, cached while that inverse stays."""
        cached = self._blocks.get(id(p))
        if cached is None or cached[0] is not inv_A:
            cached = self._blocks[id(p)] = (inv_A, bias_blocks(inv_A))
        return cached[1]

    def _inverses(self, group: dict, layers: list[tuple], new: dict[int, dict]) -> list[dict | None]:
        """Per layer, the refreshed inverses (or eigendecompositions) as state entries, or None when the
        current ones stay. Every ``inverse_every`` steps, and during the first ``inverse_every`` steps at
        every factor update (warm-up: the first factors come from few batches); a damping changed by a
        scheduler takes effect at once, from the current factors. The Cholesky factorizations of all
        refreshed layers are checked with one read of the device."""
        damping, every, factored = group["damping"], group["inverse_every"], group["factored_damping"]
        mode = self._mode()
        owners, me = (self._owners(), distributed.rank(self.process_group)) if mode != "replicate" else ({}, 0)
        due = []
        for p, _, state, _, _ in layers:
            step = state.get("step", 0)
            refresh = step % every == 0 or (step < every and id(p) in new)
            if mode == "mem_opt" and owners[id(p)] != me:
                # not this rank's inverses: the marker of the owner's refresh (see below) decides as the
                # owner's own entries do, so that every rank agrees on the lazy sync's collective
                due.append(refresh or "inv_damping" not in state or (factored and state["inv_damping"] != damping))
            elif factored:
                due.append(refresh or "inv_A" not in state or state["inv_damping"] != damping)
            else:
                due.append(refresh or "eig_A" not in state)
        out: list[dict | None] = [None] * len(layers)
        todo = [i for i, d in enumerate(due) if d]
        if not todo:
            return out
        if self.lazy_sync and distributed.active(self.process_group):
            self._sync_factors([layers[i][2] for i in todo])
        mine = [i for i in todo if mode == "replicate" or owners[id(layers[i][0])] == me]
        if factored:
            # explicit damped inverses by Cholesky: two matmuls per step
            fresh = damped_inverse_entries([KroneckerFactors(layers[i][2]) for i in mine], damping)
        else:
            fresh = [KroneckerFactors(layers[i][2]).clamped_eigendecompositions() for i in mine]
        for i, entries in zip(mine, fresh):
            out[i] = entries
        if mode == "comm_opt":
            shared = self._share_inverses([layers[i] for i in todo], [out[i] for i in todo], factored, damping)
            for i, entries in zip(todo, shared):
                out[i] = entries
        elif mode == "mem_opt":
            for i in todo:
                if out[i] is None:  # the owner refreshed its inverses: remember the damping they are for
                    out[i] = {"inv_damping": damping}
                elif not factored:
                    out[i]["inv_damping"] = damping
        return out

    def _sync_factors(self, states: list[dict]) -> None:
        """``lazy_sync``: average the factors of the layers about to be inverted over the ranks, in place,
        in one collective."""
        factors = [state[name] for state in states for name in ("A", "G")]
        summed = distributed.sum_across(factors, self.process_group)
        self.communication.add("factors", factors)
        world = distributed.world_size(self.process_group)
        for f, total in zip(factors, summed):
            f.copy_(total).div_(world)

    def _share_inverses(self, layers: list[tuple], entries: list[dict | None], factored: bool,
                        damping: float) -> list[dict]:
        """``comm_opt``: every rank receives the inverses its peers computed for the layers they own (their
        state entries, in the order of ``layers``), in one collective: a sum in which the other ranks'
        parts are zeros, exact."""
        parts = []
        for (p, bias, state, _, d_w), entry in zip(layers, entries):
            dim_a, dim_g = d_w + (bias is not None), p.shape[0]
            like = state["A"]
            if factored:
                shapes = [(dim_a, dim_a), (dim_g, dim_g)]
                tensors = [entry["inv_A"], entry["inv_G"]] if entry is not None else None
            else:
                shapes = [(dim_a,), (dim_a, dim_a), (dim_g,), (dim_g, dim_g)]
                tensors = [*entry["eig_A"], *entry["eig_G"]] if entry is not None else None
            parts += tensors if tensors is not None else [like.new_zeros(s) for s in shapes]
        summed = iter(distributed.sum_across(parts, self.process_group))
        self.communication.add("inverses", parts)
        if factored:
            return [{"inv_A": next(summed), "inv_G": next(summed), "inv_damping": damping} for _ in layers]
        return [{"eig_A": (next(summed), next(summed)), "eig_G": (next(summed), next(summed))} for _ in layers]

    def _apply_group(self, group: dict, update: dict, vg: float | None) -> None:
        """Commit a prepared group (:meth:`_prepare_group`): its held-back state entries, the KL clip,
        momentum and the parameter update."""
        for state, entries in update["commits"]:
            state.update(entries)
        params, steps, states, lr = update["params"], update["steps"], update["states"], group["lr"]
        scale = 1.0
        if vg is not None:
            vg *= lr**2
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

    def _diagonal_updates(self, group: dict, params: list[torch.Tensor], commits: list[tuple[dict, dict]]
                          ) -> list[tuple]:
        """``(param, (grad + wd * param) / (D + damping), grad)`` for parameters without a Kronecker
        structure, ``D`` a moving average of ``N * grad**2`` updated every ``factor_every`` steps; the new
        ``D`` and step counts go to ``commits``."""
        if not params:
            return []
        if not self._warned_diagonal:
            self._warned_diagonal = True
            names = ", ".join(f"{self._pending.diag_counts.get(id(p), (0, 'parameter'))[1]} {tuple(p.shape)}"
                              for p in params)
            warnings.warn(f"KFAC: {names} not in a Kronecker layer ({KRONECKER_DESCRIPTION}); they get a "
                          "diagonal block (moving average of N * grad**2)", stacklevel=6)
        fallback = max([n for n, _ in self._pending.diag_counts.values()]
                       + [stats.a_count for stats in self._pending.layers.values()] + [1])
        wd, decay = group["weight_decay"], group["factor_decay"]
        # lazy_sync leaves the counts local: the ranks' batches, assumed equal, make the global count
        lazy_ranks = distributed.world_size(self.process_group) if self.lazy_sync else 1
        out = []
        for p in params:
            state = self.state[p]
            step = state.get("step", 0)
            grad = _decayed(p.grad, p, wd).to(statistics_dtype(p.dtype))  # float32 for half precision
            entries = {"step": step + 1}
            block = DiagonalBlock(state.get("diag"))
            if step % group["factor_every"] == 0:
                n = self._pending.diag_counts.get(id(p), (fallback, ""))[0] * lazy_ranks
                entries["diag"] = block.update(p.grad.to(grad.dtype).square() * n, decay)
            commits.append((state, entries))
            out.append((p, block.multiply(grad, power=-1, damping=group["damping"]), grad))
        return out


def _remove_hooks(hooks: list) -> None:
    for h in hooks:
        h.remove()
    hooks.clear()
