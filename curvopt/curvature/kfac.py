"""Kronecker-factored curvature (K-FAC; Martens & Grosse, 2015; Grosse & Martens, 2016).

Each ``Linear``/``Conv1d``/``Conv2d`` layer's block is approximated by ``A ⊗ G``:
``A`` the second moment of the layer inputs (with a constant 1 appended for the bias),
``G`` the second moment of the vectors backpropagated to the layer outputs, scaled like
the loss. For a weight (and bias) ``W~ = [W, b]`` of shape ``[out, in+1]`` the block
acts as ``W~ -> G W~ A``. Weight sharing (convolutions, sequence dimensions) follows
Eschenhagen et al. (2023): ``expand`` treats shared positions as extra samples,
``reduce`` sums the output vectors and averages the inputs over them first. A layer
applied several times in one forward pass shares its weight across the applications:
they are extra positions in the ``expand`` sense whatever ``kfac_approx`` (``reduce`` acts
within each application), so ``A`` averages over the rows of all applications and ``G``
sums ``g g^T`` over them.

Every other parameter gets a diagonal block, the exact diagonal of the same Fisher type:
recurrent layers (``nn.RNN``/``LSTM``/``GRU``), ``nn.MultiheadAttention`` (its ``in_proj``
parameters and its ``out_proj``, whose forward never runs: attention applies its weight
functionally), norm layers, embeddings, and any Kronecker layer whose forward hook did not
fire in a pass although its weight was used.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import vjp, vmap

from curvopt.curvature.base import CurvatureOperator, TensorList
from curvopt.curvature.data_loop import rank_sample_offset
from curvopt.curvature.kfac_factors import (  # noqa: F401 - re-exported: the per-layer math's old home
    DiagonalBlock,
    KroneckerFactors,
    _statistics_dtype,
    factored_inverses,
    factored_inverses_cholesky,
    factored_inverses_cholesky_many,
    factored_product,
    input_factor,
    kronecker_solve,
    output_factor,
    statistics_dtype,
)
from curvopt.curvature.kfac_layers import (  # noqa: F401 - re-exported
    KRONECKER_DESCRIPTION,
    functional_linears,
    kronecker_structured,
    layer_inputs,
    layer_output_vectors,
    sample_coupling_norms,
)
from curvopt.curvature.losses import LossSpec, SampleDraws, loss_spec
from curvopt.curvature.model_state import curvature_pass
from curvopt.curvature.registry import register_curvature
from curvopt.curvature.solve import KRYLOV_METHODS
from curvopt.errors import OptionError, ParameterError, ShapeError, UnsupportedModuleError

FISHER_TYPES = ("type2", "mc", "empirical")
APPROXIMATIONS = ("expand", "reduce")


@dataclass
class KroneckerBlock:
    """One layer's place in the operator: the module, the indices of its weight and bias in the
    operator's parameter list, and its factor block (:class:`KroneckerFactors`)."""

    module_name: str
    module: nn.Module
    weight: int
    bias: int | None
    block: KroneckerFactors = field(default_factory=lambda: KroneckerFactors({}))

    @property
    def A(self) -> torch.Tensor:
        """``[in(+1), in(+1)]``"""
        return self.block.A

    @property
    def G(self) -> torch.Tensor:
        """``[out, out]``"""
        return self.block.G

    def eigendecompositions(self) -> tuple:
        """``(eigh(A), eigh(G))``, kept until the factors are recomputed."""
        return self.block.eigendecompositions()


@register_curvature("kfac")
class KFACOperator(CurvatureOperator):
    """K-FAC approximation of the GGN/Fisher, block-diagonal over layers.

    Args:
        fisher_type: ``"type2"`` (backpropagates the columns of the loss Hessian's square
            root: the K-FAC of the GGN), ``"mc"`` (``mc_samples`` labels drawn from the
            model, seeded with ``seed``) or ``"empirical"`` (the true labels).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-shared layers.
        mc_samples: Label draws per sample for ``"mc"``.
        seed: Seed of the label draws (keyed by each sample's global index, so that they do not depend
            on the batching or on the ranks of a process group), and of train-mode dropout masks, one per
            batch.
        **options: As for :class:`~curvopt.curvature.base.CurvatureOperator`.

    What each layer gets:

    * ``Linear``, ``Conv1d``/``Conv2d`` (``groups=1``, zero padding): ``A ⊗ G`` from the layer's
      real inputs and output gradients; a layer applied several times per forward pass has
      its statistics over all applications (extra positions, Eschenhagen et al., 2023).
    * ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``/``DecoderLayer``):
      diagonal blocks for ``in_proj_weight``/``in_proj_bias`` and for ``out_proj``, an
      ``nn.Linear`` whose forward never runs (attention applies its weight functionally).
    * ``nn.RNN``/``LSTM``/``GRU``, norm layers, embeddings, any other parameter, and a Kronecker
      layer whose forward hook never fired in a pass (e.g. a ``Linear`` applied through
      ``F.linear(x, layer.weight)``), or whose weight is tied to another module (an output layer
      sharing an embedding's weight): diagonal blocks, the exact diagonal of the same Fisher
      type, from per-sample output vectors backpropagated through one forward pass of the
      batch (reverse mode only, any batch layout). One warning names these parameters.
    * ``BatchNorm`` normalizing with batch statistics (training mode): refused with
      :class:`~curvopt.errors.UnsupportedModuleError`, since K-FAC's per-sample statistics
      assume samples that do not interact; call ``model.eval()`` or use the ``"ggn"``/``"hessian"``
      backends, which treat train-mode BatchNorm exactly.

    Factors are computed in one pass over the data at the first product and again after
    a parameter changes, inside :func:`~curvopt.curvature.model_state.curvature_pass` (dropout
    in training mode draws one mask per batch). Targets ignored by the loss
    (``CrossEntropyLoss(ignore_index=...)``) do not count: their samples leave ``A``, ``G`` and
    the diagonal blocks, and the mean runs over the counted targets. Half-precision models
    have their factors accumulated and kept in float32; products come back in the model's dtype.

    ``op.solve(b, damping=d)`` applies ``(K + d I)^{-1}`` exactly through the factors
    (``method="kronecker"``, the default; needs ``d > 0``); ``"minres"`` and ``"cg"`` also work.
    """

    solve_methods = ("kronecker", *KRYLOV_METHODS)

    def __init__(self, model, loss_fn, data, *, fisher_type: str = "type2", kfac_approx: str = "expand",
                 mc_samples: int = 1, seed: int = 0, **options: Any) -> None:
        if fisher_type not in FISHER_TYPES:
            raise OptionError(f"fisher_type={fisher_type!r}; valid: {', '.join(FISHER_TYPES)}")
        if kfac_approx not in APPROXIMATIONS:
            raise OptionError(f"kfac_approx={kfac_approx!r}; valid: {', '.join(APPROXIMATIONS)}")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise OptionError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        super().__init__(model, loss_fn, data, **options)
        self.spec: LossSpec = loss_spec(loss_fn, self.name, options.get("reduction"))
        self.fisher_type, self.kfac_approx = fisher_type, kfac_approx
        self.mc_samples, self.seed = mc_samples, int(seed)
        self.layers, self.diagonal_params = self._find_layers()
        self.diagonal: dict[int, torch.Tensor] = {}
        self._factor_versions: Any = None
        self._rank_offset: int | None = None  # "mc": global index of this rank's first draw unit, found once
        self._units_seen = 0
        if self.diagonal_params:
            names = ", ".join(self.param_names[i] for i in self.diagonal_params)
            warnings.warn(f"kfac: no Kronecker structure for {names}; they get a diagonal block "
                          f"(Kronecker layers: {KRONECKER_DESCRIPTION})", stacklevel=3)

    # ------------------------------------------------------------------ structure
    def _find_layers(self) -> tuple[list[KroneckerBlock], list[int]]:
        # by identity, not by name: a tied parameter is named after its first owner only
        position = {id(p): i for i, p in enumerate(self._params)}
        owners: dict[int, int] = {}
        for module in self.model.modules():
            for p in module._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        functional = functional_linears(self.model)
        layers, owned = [], set()
        for mname, module in self.model.named_modules():
            if not kronecker_structured(module) or id(module) in functional:
                continue
            if any(owners.get(id(t), 0) > 1 for t in (module.weight, module.bias) if t is not None):
                continue  # tied to another module (e.g. an embedding): exact diagonal blocks instead
            w = position.get(id(module.weight))
            b = position.get(id(module.bias)) if module.bias is not None else None
            if w is None:
                if b is not None:
                    raise ParameterError(
                        f"kfac: layer {mname!r} has its bias selected without its weight; select both or neither")
                continue
            layers.append(KroneckerBlock(mname, module, w, b))
            owned.update(i for i in (w, b) if i is not None)
        return layers, [i for i in range(len(self.param_names)) if i not in owned]

    @property
    def statistics_dtype(self) -> torch.dtype:
        """The dtype of the factors: float32 for half-precision models, else the model's."""
        return statistics_dtype(self.dtype)

    # ------------------------------------------------------------------ factors
    def factors(self) -> list[KroneckerBlock]:
        """The layers with their current ``A`` and ``G`` (recomputed when parameters changed)."""
        self._follow_parameters()
        # compared against the saved values, no copy per product; a copy only when factors are rebuilt
        if self._factor_versions is None or not self._factor_versions.matches(self._params):
            snapshot = self._versions()
            self._compute_factors()
            self._factor_versions = snapshot
        return self.layers

    def _compute_factors(self) -> None:
        coupled = sample_coupling_norms(self.model)
        if coupled:
            raise UnsupportedModuleError(
                f"kfac: {', '.join(coupled)} normalize with batch statistics (BatchNorm in training mode), "
                "which couples the samples that K-FAC's per-sample statistics treat as independent; call "
                "model.eval() first, or use the 'ggn'/'hessian' backends, which treat train-mode BatchNorm "
                "exactly")
        with curvature_pass(self.model):
            parts = self._factor_pass()
            missing = [layer for layer, flag in zip(self.layers, parts[-2].tolist()) if flag > 0]
            if missing:
                # a weight used without its module's forward (functional use): no Kronecker
                # statistics exist for it, its exact diagonal does
                self.layers = [layer for layer in self.layers if all(layer is not m for m in missing)]
                moved = sorted(i for layer in missing for i in (layer.weight, layer.bias) if i is not None)
                self.diagonal_params = sorted([*self.diagonal_params, *moved])
                warnings.warn(
                    f"kfac: the forward of {', '.join(repr(m.module_name) for m in missing)} did not run in "
                    f"every batch of the pass, so {', '.join(self.param_names[i] for i in moved)} get a "
                    "diagonal block (the exact diagonal of the same Fisher type)", stacklevel=4)
                parts = self._factor_pass()
        count = parts[-1]
        self.diagonal = dict(zip(self.diagonal_params, parts[2 * len(self.layers):-2]))
        for i, layer in enumerate(self.layers):
            A, G = parts[2 * i], parts[2 * i + 1]
            # A is a mean over samples whatever the loss reduction; under "sum" the loop
            # adds per-batch sums, divided here by the summed sample count.
            layer.block.set(A / count if self.reduction == "sum" else A, G)

    def _factor_pass(self) -> TensorList:
        """One pass over the data: ``[A_0, G_0, ..., diagonals..., missing flags [L], count]``."""

        def product(index: int, X: Any, y: torch.Tensor):
            X, y = self._to_model(X), self._to_model(y)
            return self._batch_factors(index, X, y)

        if self.fisher_type == "mc" and self._rank_offset is None:  # a collective: once, before the pass
            self._rank_offset = rank_sample_offset(
                self.data, self.process_group, lambda X, y: self.spec.draw_units(self._to_model(y)))
        self._units_seen = 0  # the pass visits the batches in order: a running count keys the draws
        return self._accumulate(product, self.data, zeros=self._factor_zeros)

    def _factor_zeros(self) -> TensorList:
        """Zeros shaped like :meth:`_factor_pass`'s results: what a rank without samples contributes to the
        pass's one collective."""
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=self.statistics_dtype, device=self.device)

        parts = []
        for layer in self.layers:
            d_in = layer.module.weight[0].numel() + (layer.bias is not None)
            parts += [zeros(d_in, d_in), zeros(layer.module.weight.shape[0], layer.module.weight.shape[0])]
        parts += [zeros(*self._params[i].shape) for i in self.diagonal_params]
        return [*parts, zeros(len(self.layers)), zeros()]

    def _batch_factors(self, index: int, X: Any, y: torch.Tensor) -> tuple[torch.Tensor, TensorList]:
        captured: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]
        hooks = [layer.module.register_forward_hook(
                     lambda mod, inp, out, i=i: captured[i].append((inp[0].detach(), out)))
                 for i, layer in enumerate(self.layers)]
        primal = [p.detach().requires_grad_() for p in self._params]
        try:
            with torch.enable_grad():
                out = self._forward(primal, X, index)
        finally:
            for h in hooks:
                h.remove()
        if out.dim() != 2:
            raise ShapeError(
                f"kfac needs network outputs of shape [N, C], got {tuple(out.shape)} on batch {index}: "
                "per-position outputs ([N, C, T], e.g. a language model) would need one backward pass per "
                "position for its factors; use 'ggn' or 'fisher' (exact on any output shape), or the KFAC "
                "optimizer, which takes its statistics from the training loss's own backward pass")
        dtype = statistics_dtype(out.dtype)
        detached = out.detach()
        loss = self.loss_fn(detached, y)
        U, weight = self._output_vectors(index, detached, y)  # [K, N, C]
        n = out.shape[0]
        mask = self.spec.counted(detached, y)  # [N, 1] or None: samples whose targets count
        keep = None if mask is None else mask[:, 0] > 0
        counted = n if keep is None else int(keep.sum())
        scale = self.spec.scale(detached, y) * weight
        outs = [o for apps in captured for _, o in apps]
        grads = iter(torch.autograd.grad(out, outs, grad_outputs=U, is_grads_batched=True, allow_unused=True,
                                         retain_graph=bool(self.diagonal_params)) if outs else ())
        result: TensorList = []
        missing = torch.zeros(len(self.layers), dtype=dtype, device=out.device)
        for i, layer in enumerate(self.layers):
            if not captured[i]:  # the weight was not applied through the module (see _compute_factors)
                missing[i] = 1.0
            A, G = self._layer_factors(layer, captured[i], [next(grads) for _ in captured[i]], U.shape[0], n,
                                       keep, dtype)
            # "sum": per-batch sums of a a^T, divided by the total count after the loop
            result += [A if self.reduction == "mean" else A * counted, scale * G]
        if self.diagonal_params:
            fast = self._per_sample_diagonal(X, out, U, scale, dtype)
            result += fast if fast is not None else self._diagonal_blocks(
                out, [primal[i] for i in self.diagonal_params], U, keep, scale, dtype)
        count = torch.tensor(float(counted), dtype=dtype, device=out.device)
        return loss, [*result, missing, count if self.reduction == "sum" else count / max(counted, 1)]

    def _layer_factors(self, layer: KroneckerBlock, applications: list, grads: list, K: int, n: int,
                       keep: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` (mean over rows) and ``G`` (sum over rows) of one batch from every application of the
        layer: input rows ``[rows, d_in]`` and output vectors ``[K, rows, out]``, where ``reduce``
        merges the positions within each application first."""
        module, out_dim = layer.module, layer.module.weight.shape[0]
        d_in = module.weight[0].numel()
        rows_a, rows_g = [], []
        for (x, _), g in zip(applications, grads):
            a = layer_inputs(module, x)  # [N, T, d_in]
            g = (torch.zeros(K, *a.shape[:2], out_dim, dtype=a.dtype, device=a.device) if g is None
                 else layer_output_vectors(module, g))  # [K, N, T, out]; None: the layer does not reach the output
            if keep is not None and a.shape[0] == n:  # ignored targets: their samples do not count
                a, g = a[keep], g[:, keep]
            if self.kfac_approx == "reduce":
                a, g = a.mean(1, keepdim=True), g.sum(2, keepdim=True)
            rows_a.append(a.reshape(-1, 1, d_in))
            rows_g.append(g.reshape(K, -1, 1, out_dim))
        if not rows_a:
            size = d_in + (layer.bias is not None)
            return (torch.zeros(size, size, dtype=dtype, device=module.weight.device),
                    torch.zeros(out_dim, out_dim, dtype=dtype, device=module.weight.device))
        a = rows_a[0] if len(rows_a) == 1 else torch.cat(rows_a)
        g = rows_g[0] if len(rows_g) == 1 else torch.cat(rows_g, 1)
        if a.shape[0] == 0:  # every target of the batch ignored
            size = d_in + (layer.bias is not None)
            return a.new_zeros(size, size, dtype=dtype), g.new_zeros(out_dim, out_dim, dtype=dtype)
        return input_factor(a, "expand", bias=layer.bias is not None), output_factor(g, "expand")

    def _per_sample_diagonal(self, X: Any, out: torch.Tensor, U: torch.Tensor, scale: float,
                             dtype: torch.dtype) -> TensorList | None:
        """The diagonal blocks of :meth:`_diagonal_blocks` from per-sample gradients (``vmap`` over the
        samples of a one-sample forward pass): linear in the batch size, where the batch-graph backward
        passes are quadratic. Used only when the network demonstrably treats the samples of ``X``
        (dimension 0) independently: the vmapped one-sample outputs equal the batch outputs. Otherwise
        (batch statistics, ``batch_first=False`` layouts, dropout, operations without batching rules)
        ``None``."""
        if not isinstance(X, torch.Tensor) or X.dim() == 0 or X.shape[0] != out.shape[0]:
            return None
        primal = self._primal()
        fixed = tuple(primal[i] for i in self.diagonal_params)

        def output_of_one(sub: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
            params = list(primal)
            for i, p in zip(self.diagonal_params, sub):
                params[i] = p
            return self._forward(params, x.unsqueeze(0)).squeeze(0)

        def per_sample(x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:  # u: [K, C]
            _, pull = vjp(lambda *sub: output_of_one(sub, x), *fixed)
            return vmap(pull)(u)

        tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(out.dtype, 1e-2)
        K, n = U.shape[:2]
        chunk = max(1, self.max_batch_columns // max(K, 1))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # vmap's "no batching rule, performance drop" notes
                with torch.no_grad():
                    single = vmap(lambda x: output_of_one(fixed, x))(X)
                reference = out.detach()
                if single.shape != reference.shape or not torch.allclose(
                        single, reference, rtol=tol, atol=tol * float(reference.abs().max().clamp_min(1.0))):
                    return None
                sums = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in fixed]
                for s in range(0, n, chunk):
                    grads = vmap(per_sample)(X[s:s + chunk], U[:, s:s + chunk].transpose(0, 1))
                    for total, g in zip(sums, grads):  # g: [samples, K, *shape]
                        total.add_(_statistics_dtype(g).square().sum((0, 1)))
        except (RuntimeError, NotImplementedError, ValueError):
            # an operation vmap cannot batch (recurrent kernels), or randomness: one sample at a time
            return self._looped_diagonal(X, out, U, scale, dtype, output_of_one, fixed, tol)
        return [total.mul_(scale) for total in sums]

    def _looped_diagonal(self, X: torch.Tensor, out: torch.Tensor, U: torch.Tensor, scale: float,
                         dtype: torch.dtype, output_of_one: Any, fixed: tuple, tol: float) -> TensorList | None:
        """:meth:`_per_sample_diagonal` one sample at a time (linear in the batch size, with a Python loop),
        for models ``vmap`` cannot batch; ``None`` as soon as a sample's output differs from the batch's."""
        reference = out.detach()
        atol = tol * float(reference.abs().max().clamp_min(1.0))
        sums = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in fixed]
        try:
            for i in range(X.shape[0]):
                live = [u for u in U[:, i] if bool(u.any())]
                sub = [p.detach().requires_grad_() for p in fixed]
                with torch.enable_grad():
                    o = output_of_one(tuple(sub), X[i])
                if o.shape != reference[i].shape or not torch.allclose(o.detach(), reference[i], rtol=tol,
                                                                       atol=atol):
                    return None  # the samples interact (or draw random numbers): the batch-graph path
                for j, u in enumerate(live):
                    grads = torch.autograd.grad(o, sub, u, retain_graph=j + 1 < len(live), allow_unused=True)
                    for total, g in zip(sums, grads):
                        if g is not None:
                            total.add_(_statistics_dtype(g).square())
        except (RuntimeError, NotImplementedError, ValueError):
            return None
        return [total.mul_(scale) for total in sums]

    def _diagonal_blocks(self, out: torch.Tensor, params: list[torch.Tensor], U: torch.Tensor,
                         keep: torch.Tensor | None, scale: float, dtype: torch.dtype) -> TensorList:
        """``scale * sum_{n,k} (J_n^T u_{n,k})^2`` for the parameters without Kronecker structure.

        ``J_n^T u_{n,k}`` is the backward pass of the batch output ``out`` ``[N, C]`` with ``u_{n,k}``
        at sample ``n`` and zeros elsewhere: reverse mode only (recurrent kernels have no forward
        mode), one forward pass for the batch (so any batch layout of the input, e.g. ``batch_first=
        False``, and the batch's one dropout mask), the columns batched ``max_batch_columns // N``
        at a time."""
        if not params:
            return []
        K, n, C = U.shape
        samples = torch.arange(n, device=out.device) if keep is None else keep.nonzero()[:, 0]
        cols_k = torch.arange(K, device=out.device).repeat_interleave(samples.numel())
        cols_n = samples.repeat(K)
        sums = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in params]
        chunk = max(1, self.max_batch_columns // max(n, 1))
        for s in range(0, cols_k.numel(), chunk):
            k, i = cols_k[s:s + chunk], cols_n[s:s + chunk]
            V = U.new_zeros(k.numel(), n, C)
            V[torch.arange(k.numel(), device=out.device), i] = U[k, i]
            grads = torch.autograd.grad(out, params, grad_outputs=V, is_grads_batched=True, allow_unused=True,
                                        retain_graph=True)
            for total, g in zip(sums, grads):
                if g is not None:  # None: the parameter does not reach the output
                    total.add_(_statistics_dtype(g).square().sum(0))
        return [total.mul_(scale) for total in sums]

    def _output_vectors(self, index: int, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Vectors to backpropagate ``[K, N, C]`` (zero at ignored targets) and the weight ``1/K`` or 1
        of their outer products."""
        if self.fisher_type == "type2":
            return self.spec.hessian_sqrt(out, y=y), 1.0
        if self.fisher_type == "empirical":
            return self.spec.gradients(out, y).unsqueeze(0), 1.0
        # keyed by the global sample index: the same labels whatever the batching, and ranks holding
        # shards of the data (in rank order) reproduce one process on all of it
        draws = SampleDraws(self.seed, self._rank_offset + self._units_seen)
        self._units_seen += self.spec.draw_units(y)
        return self.spec.sampled_gradients(out, self.mc_samples, draws, y=y), 1.0 / self.mc_samples

    # ------------------------------------------------------------------ products
    def _matrices(self, layer: KroneckerBlock, V: TensorList) -> torch.Tensor:
        """The columns of ``V`` for one layer as ``[k, out, in(+1)]`` matrices ``[W, b]``, in the
        factors' dtype."""
        k, W = V[layer.weight].shape[0], V[layer.weight]
        M = W.reshape(k, W.shape[1], -1)
        if layer.bias is not None:
            M = torch.cat([M, V[layer.bias].reshape(k, -1, 1)], dim=2)
        return M.to(layer.A.dtype)

    def _scatter(self, layer: KroneckerBlock, M: torch.Tensor, out: list) -> None:
        w = self._params[layer.weight]
        d_w = w[0].numel()
        out[layer.weight] = M[:, :, :d_w].reshape(M.shape[0], *w.shape)
        if layer.bias is not None:
            out[layer.bias] = M[:, :, d_w]

    def _matmat_list(self, V: TensorList) -> TensorList:
        out: list = [None] * len(V)
        for layer in self.factors():
            self._scatter(layer, layer.block.multiply(self._matrices(layer, V))[0], out)
        for i, d in self.diagonal.items():
            out[i] = DiagonalBlock(d).multiply(V[i])
        return [o.to(v.dtype) for o, v in zip(out, V)]

    def _solve_columns(
        self, B: torch.Tensor, damping: float, method: str, rtol: float, max_iter: int | None
    ) -> torch.Tensor:
        if method == "kronecker":  # exact, through the factors' eigendecompositions
            if damping <= 0:
                raise OptionError(
                    f"KFACOperator.solve: method='kronecker' needs damping > 0 (Kronecker factors are often "
                    f"singular), got damping={damping!r}; pass e.g. damping=1e-3, or method='minres' for the "
                    "undamped least-squares solution")
            return self.inverse_matmat(B, damping)
        return super()._solve_columns(B, damping, method, rtol, max_iter)

    def inverse_matmat(self, V: torch.Tensor, damping: float, *, factored: bool = False) -> torch.Tensor:
        """``(K + damping I)^{-1} V`` for ``V`` ``[P]`` or ``[P, k]``, ``K`` this operator.

        Exact for the Kronecker blocks via eigendecompositions of ``A`` and ``G`` (kept
        between calls until the parameters change). With
        ``factored=True`` it applies ``(A + pi sqrt(d) I)^{-1} ⊗ (G + sqrt(d)/pi I)^{-1}``
        instead, the factored Tikhonov damping of Martens & Grosse (2015) with
        ``pi = sqrt((tr A / dim A) / (tr G / dim G))``.
        """
        if damping <= 0:
            raise OptionError(f"KFACOperator.inverse_matmat: damping must be positive, got {damping!r}")
        vector = V.dim() == 1
        Vm = (V.unsqueeze(1) if vector else V).to(dtype=self.statistics_dtype, device=self.device)
        parts = self.unflatten(Vm.T)
        out: list = [None] * len(parts)
        for layer in self.factors():
            R, _ = layer.block.multiply(self._matrices(layer, parts), power=-1, damping=damping, factored=factored)
            self._scatter(layer, R, out)
        for i, d in self.diagonal.items():
            out[i] = DiagonalBlock(d).multiply(parts[i], power=-1, damping=damping)
        result = self.flatten(out).T.to(self.dtype)
        return result.squeeze(1) if vector else result
