"""Kronecker-factored curvature (K-FAC; Martens & Grosse, 2015; Grosse & Martens, 2016).

Each ``Linear``/``Conv1d``/``Conv2d`` layer's block is approximated by ``A ⊗ G``:
``A`` the second moment of the layer inputs (with a constant 1 appended for the bias),
``G`` the second moment of the vectors backpropagated to the layer outputs, scaled like
the loss. For a weight (and bias) ``W~ = [W, b]`` of shape ``[out, in+1]`` the block
acts as ``W~ -> G W~ A``. Weight sharing (convolutions, sequence dimensions) follows
Eschenhagen et al. (2023): ``expand`` treats shared positions as extra samples,
``reduce`` sums the output vectors and averages the inputs over them first.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap

from curvopt.curvature.base import CurvatureOperator, TensorList
from curvopt.curvature.data_loop import accumulate
from curvopt.curvature.losses import LossSpec, loss_spec
from curvopt.curvature.registry import register_curvature
from curvopt.curvature.solve import KRYLOV_METHODS
from curvopt.errors import OptionError, ParameterError

FISHER_TYPES = ("type2", "mc", "empirical")
APPROXIMATIONS = ("expand", "reduce")
KRONECKER_DESCRIPTION = "Linear, and Conv1d/Conv2d with groups=1 and zero padding"


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's inputs as ``[N, T, d_in]`` (``T`` weight-sharing positions); for convolutions
    the patches, ordered like ``weight.reshape(out, -1)`` and positions row-major."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    dims = x.dim() - 2
    pads = _conv_pads(module, dims)
    if any(pads):
        x = F.pad(x, pads)
    # windows as strided views (Tensor.unfold), then one copy; F.unfold (im2col) loops over
    # samples and needs Conv1d inputs lifted to 2-d
    for i in range(dims):
        x = x.unfold(2 + i, module.dilation[i] * (module.kernel_size[i] - 1) + 1, module.stride[i])
    if any(d != 1 for d in module.dilation):
        x = x[(..., *(slice(None, None, d) for d in module.dilation))]
    n, positions = x.shape[0], x.shape[2:2 + dims]
    x = x.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))  # [N, T..., C, k...]
    return x.reshape(n, math.prod(positions), -1)


def _conv_pads(module: nn.Module, dims: int) -> list[int]:
    """A convolution's zero padding in ``F.pad``'s order (last dimension first); ``"same"``
    puts the odd element on the right, as PyTorch does."""
    if module.padding == "valid":
        return [0] * (2 * dims)
    pads = []
    for i in reversed(range(dims)):
        if module.padding == "same":
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [module.padding[i]] * 2
    return pads


def kronecker_structured(module: nn.Module) -> bool:
    """Whether K-FAC factors the layer's weight as ``A ⊗ G``: ``Linear``, and ``Conv1d``/``Conv2d``
    with ``groups=1`` and zero padding. Other layers' parameters get diagonal blocks."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and module.padding_mode == "zeros"


def layer_output_vectors(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Vectors at a layer's output, ``[K, N, out, *spatial]`` (conv) or ``[K, N, *, out]``
    (linear), as ``[K, N, T, out]``."""
    K, n = g.shape[:2]
    if isinstance(module, nn.Linear):
        return g.reshape(K, n, -1, g.shape[-1])
    return g.reshape(K, n, g.shape[2], -1).transpose(2, 3)


def input_factor(a: torch.Tensor, approx: str, *, bias: bool = False, alpha: float = 1.0,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``A``: mean of ``a a^T`` over samples (and positions for ``expand``), ``a`` ``[N, T, d]``,
    with a constant 1 appended to ``a`` for a ``bias``; times ``alpha``, and added to ``out``
    in place when it is given. The bias row and column are the input sums, so the inputs are
    never copied to append the 1. Half-precision inputs are summed in float32."""
    a = _statistics_dtype(a)
    if approx == "reduce":
        a = a.mean(1, keepdim=True)
    a = a.reshape(-1, a.shape[-1])
    weight = alpha / a.shape[0]
    if not bias:
        return _gram(a, weight, out)
    d = a.shape[1]
    if out is None:
        out = a.new_zeros(d + 1, d + 1)
    _gram(a, weight, out[:d, :d])
    sums = a.sum(0)
    out[:d, d].add_(sums, alpha=weight)
    out[d, :d].add_(sums, alpha=weight)
    out[d, d].add_(alpha)
    return out


def output_factor(g: torch.Tensor, approx: str, *, alpha: float = 1.0,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum g g^T`` over vectors, samples and positions (positions summed first for
    ``reduce``), for ``g`` of shape ``[K, N, T, out]``; times ``alpha``, and added to ``out``
    in place when it is given."""
    g = _statistics_dtype(g)
    if approx == "reduce":
        g = g.sum(2, keepdim=True)
    g = g.reshape(-1, g.shape[-1])
    return _gram(g, alpha, out)


def _statistics_dtype(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations and gradients (autocast) in float32: their second-moment
    sums overflow float16 (65504) at ordinary magnitudes, and a GradScaler's scale squares."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _gram(x: torch.Tensor, alpha: float, out: torch.Tensor | None) -> torch.Tensor:
    """``alpha x^T x`` (plus ``out``, in place). Scaling in place and accumulating with
    ``addmm_`` allocate no factor-sized temporaries, which on CPU cost page faults each."""
    if out is not None:
        return out.addmm_(x.T, x, alpha=alpha)
    gram = x.T @ x
    return gram if alpha == 1.0 else gram.mul_(alpha)


def _pi(mean_eig_A: torch.Tensor, mean_eig_G: torch.Tensor) -> torch.Tensor:
    return ((mean_eig_A / mean_eig_G.clamp_min(1e-30)).clamp_min(1e-30)).sqrt()


def factored_inverses(
    eig_A: tuple[torch.Tensor, torch.Tensor], eig_G: tuple[torch.Tensor, torch.Tensor], damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A + pi sqrt(d) I)^{-1}`` and ``(G + sqrt(d)/pi I)^{-1}`` from ``(eigenvalues, eigenvectors)``
    of ``A`` and ``G``, with ``pi = sqrt((tr A / dim A) / (tr G / dim G))``: the factored Tikhonov
    damping of Martens & Grosse (2015, section 6.3)."""
    pi = _pi(eig_A[0].mean(), eig_G[0].mean())
    return _inverse_from_eig(eig_A, pi * damping**0.5), _inverse_from_eig(eig_G, damping**0.5 / pi)


def _inverse_from_eig(eig: tuple[torch.Tensor, torch.Tensor], shift: Any) -> torch.Tensor:
    """``(M + shift I)^{-1}`` from ``(eigenvalues, eigenvectors)`` of a symmetric ``M``."""
    lam, Q = eig
    return (Q / (lam + shift)) @ Q.T


def factored_inverses_cholesky(
    A: torch.Tensor, G: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The :func:`factored_inverses` from the factors themselves, by Cholesky (several times
    cheaper than an eigendecomposition); a factor that is not numerically positive definite
    after damping falls back to its eigendecomposition with the eigenvalues clamped at 0."""
    pi = _pi(A.diagonal().mean(), G.diagonal().mean())
    return _damped_inverse(A, pi * damping**0.5), _damped_inverse(G, damping**0.5 / pi)


def _damped_inverse(M: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(M + shift * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    lam, Q = torch.linalg.eigh(M)
    return _inverse_from_eig((lam.clamp_min(0.0), Q), shift)


def factored_product(
    G_inv: torch.Tensor, gw: torch.Tensor, gb: torch.Tensor | None, A_inv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's K-FAC update ``G_inv [gw | gb] A_inv`` (weight gradient ``gw`` ``[out, in]``, bias
    gradient ``gb`` ``[out]`` or None), as its weight and bias parts, without forming
    ``[gw | gb]``: with ``A_inv = [[P, q], [q^T, r]]`` the weight part is
    ``G_inv (gw P + gb q^T)`` and the bias part ``G_inv (gw q + r gb)``. The matrix products then
    keep the layer's own sizes (often multiples of the SIMD width) instead of one more column."""
    if gb is None:
        return G_inv @ gw @ A_inv, None
    d = gw.shape[1]
    T = (gw @ A_inv[:d, :d]).addr_(gb, A_inv[:d, d])
    t = torch.addcmul(gw @ A_inv[:d, d], gb, A_inv[d, d])  # r stays a tensor: no device sync
    return G_inv @ T, G_inv @ t


def kronecker_solve(
    M: torch.Tensor,
    eig_A: tuple[torch.Tensor, torch.Tensor],
    eig_G: tuple[torch.Tensor, torch.Tensor],
    damping: float,
    factored: bool,
) -> torch.Tensor:
    """``(A ⊗ G + d I)^{-1}`` (or, ``factored``, the :func:`factored_inverses` product) applied to
    matrices ``M`` ``[..., out, in]`` as ``G^-1 M A^-1``, given ``(eigenvalues, eigenvectors)``."""
    if factored:
        A_inv, G_inv = factored_inverses(eig_A, eig_G, damping)
        return G_inv @ M @ A_inv
    (la, Qa), (lg, Qg) = eig_A, eig_G
    denom = lg[:, None] * la[None, :] + damping
    return Qg @ ((Qg.T @ M @ Qa) / denom) @ Qa.T


@dataclass
class KroneckerBlock:
    """One layer's factors. ``weight``/``bias`` index the operator's parameter list."""

    module_name: str
    module: nn.Module
    weight: int
    bias: int | None
    A: torch.Tensor | None = None  # [in(+1), in(+1)]
    G: torch.Tensor | None = None  # [out, out]
    eigen: tuple | None = None  # (eigh(A), eigh(G)) of the current factors, computed on demand

    def eigendecompositions(self) -> tuple:
        """``(eigh(A), eigh(G))``, kept until the factors are recomputed."""
        if self.eigen is None:
            self.eigen = (torch.linalg.eigh(self.A), torch.linalg.eigh(self.G))
        return self.eigen


@register_curvature("kfac")
class KFACOperator(CurvatureOperator):
    """K-FAC approximation of the GGN/Fisher, block-diagonal over layers.

    Args:
        fisher_type: ``"type2"`` (backpropagates the columns of the loss Hessian's square
            root: the K-FAC of the GGN), ``"mc"`` (``mc_samples`` labels drawn from the
            model, seeded with ``seed``) or ``"empirical"`` (the true labels).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-shared layers.
        mc_samples: Label draws per sample for ``"mc"``.
        seed: Seed of the label draws.
        **options: As for :class:`~curvopt.curvature.base.CurvatureOperator`.

    Factors are computed in one pass over the data at the first product and again after
    a parameter changes. Parameters of other layers (norm layers, embeddings, ...) get a
    diagonal block, the exact diagonal of the same Fisher type from per-sample products
    (one warning names them); their layers must treat samples independently (e.g.
    ``BatchNorm`` in eval mode).

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
        self._factor_versions: tuple[int, ...] | None = None
        if self.diagonal_params:
            names = ", ".join(self.param_names[i] for i in self.diagonal_params)
            warnings.warn(f"kfac: no Kronecker structure for {names}; they get a diagonal block "
                          f"(Kronecker layers: {KRONECKER_DESCRIPTION})", stacklevel=3)

    # ------------------------------------------------------------------ structure
    def _find_layers(self) -> tuple[list[KroneckerBlock], list[int]]:
        position = {n: i for i, n in enumerate(self.param_names)}
        layers, owned = [], set()
        for mname, module in self.model.named_modules():
            if not kronecker_structured(module):
                continue
            prefix = f"{mname}." if mname else ""
            w, b = position.get(prefix + "weight"), position.get(prefix + "bias")
            if w is None:
                if b is not None:
                    raise ParameterError(
                        f"kfac: layer {mname!r} has its bias selected without its weight; select both or neither")
                continue
            layers.append(KroneckerBlock(mname, module, w, b))
            owned.update(i for i in (w, b) if i is not None)
        return layers, [i for i in range(len(self.param_names)) if i not in owned]

    # ------------------------------------------------------------------ factors
    def factors(self) -> list[KroneckerBlock]:
        """The layers with their current ``A`` and ``G`` (recomputed when parameters changed)."""
        versions = self._versions()
        if self._factor_versions != versions:
            self._compute_factors()
            self._factor_versions = versions
        return self.layers

    def _compute_factors(self) -> None:
        sizes = []
        for layer in self.layers:
            d_in = layer.module.weight[0].numel() + (layer.bias is not None)
            sizes.append((d_in, layer.module.weight.shape[0]))

        def product(index: int, X: Any, y: torch.Tensor):
            X, y = self._to_model(X), self._to_model(y)
            return self._batch_factors(index, X, y)

        parts = accumulate(product, self.data, reduction=self.reduction, process_group=self.process_group,
                           progress=self.progress)
        count = parts[-1]
        self.diagonal = dict(zip(self.diagonal_params, parts[2 * len(self.layers):-1]))
        for i, layer in enumerate(self.layers):
            A, G = parts[2 * i], parts[2 * i + 1]
            # A is a mean over samples whatever the loss reduction; under "sum" the loop
            # adds per-batch sums, divided here by the summed sample count.
            layer.A = A / count if self.reduction == "sum" else A
            layer.G = G
            layer.eigen = None

    def _batch_factors(self, index: int, X: Any, y: torch.Tensor) -> tuple[torch.Tensor, TensorList]:
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [layer.module.register_forward_hook(
                     lambda mod, inp, out, i=i: captured.__setitem__(i, (inp[0].detach(), out)))
                 for i, layer in enumerate(self.layers)]
        primal = [p.detach().requires_grad_() for p in self._params]
        try:
            with torch.enable_grad():
                out = self._forward(primal, X)
        finally:
            for h in hooks:
                h.remove()
        if out.dim() != 2:
            raise ParameterError(f"kfac needs network outputs of shape [N, C], got {tuple(out.shape)}")
        detached = out.detach()
        loss = self.loss_fn(detached, y)
        U, weight = self._output_vectors(index, detached, y)  # [K, N, C]
        outs = [captured[i][1] for i in range(len(self.layers))]
        grads = torch.autograd.grad(out, outs, grad_outputs=U, is_grads_batched=True, allow_unused=True)
        n = out.shape[0]
        scale = self.spec.scale(detached) * weight
        result: TensorList = []
        for i, layer in enumerate(self.layers):
            a = layer_inputs(layer.module, captured[i][0])  # [N, T, d_in]
            if grads[i] is None:  # the layer does not reach the output
                g = torch.zeros(U.shape[0], n, a.shape[1], layer.module.weight.shape[0], dtype=out.dtype,
                                device=out.device)
            else:
                g = layer_output_vectors(layer.module, grads[i])  # [K, N, T, out]
            A = input_factor(a, self.kfac_approx, bias=layer.bias is not None)
            # "sum": per-batch sums of a a^T, divided by the total count after the loop
            result += [A if self.reduction == "mean" else A * n, scale * output_factor(g, self.kfac_approx)]
        result += self._diagonal_blocks(X, U, scale)
        count = torch.tensor(float(n), dtype=out.dtype, device=out.device)
        return loss, [*result, count if self.reduction == "sum" else count / n]

    def _diagonal_blocks(self, X: Any, U: torch.Tensor, scale: float) -> TensorList:
        """``scale * sum_{n,k} (J_n^T u_{n,k})^2`` for the parameters without Kronecker structure."""
        if not self.diagonal_params:
            return []
        if isinstance(X, (tuple, list)):
            raise ParameterError("kfac's diagonal blocks need a single input tensor per batch")
        primal = self._primal()
        fixed = [primal[i] for i in self.diagonal_params]

        def output_of_one(sub: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
            params = list(primal)
            for i, p in zip(self.diagonal_params, sub):
                params[i] = p
            return self._forward(params, x.unsqueeze(0)).squeeze(0)

        def per_sample(x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:  # u: [K, C]
            _, pull = vjp(lambda *sub: output_of_one(sub, x), *fixed)
            return vmap(pull)(u)

        grads = vmap(per_sample)(X, U.transpose(0, 1))  # per parameter: [N, K, *shape]
        return [scale * (g**2).sum((0, 1)) for g in grads]

    def _output_vectors(self, index: int, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Vectors to backpropagate ``[K, N, C]`` and the weight ``1/K`` or 1 of their outer products."""
        if self.fisher_type == "type2":
            return self.spec.hessian_sqrt(out), 1.0
        if self.fisher_type == "empirical":
            return self.spec.gradients(out, y).unsqueeze(0), 1.0
        g = torch.Generator(device=out.device)
        g.manual_seed(self.seed * 1_000_003 + index)
        return self.spec.sampled_gradients(out, self.mc_samples, g), 1.0 / self.mc_samples

    # ------------------------------------------------------------------ products
    def _matrices(self, layer: KroneckerBlock, V: TensorList) -> torch.Tensor:
        """The columns of ``V`` for one layer as ``[k, out, in(+1)]`` matrices ``[W, b]``."""
        k, W = V[layer.weight].shape[0], V[layer.weight]
        M = W.reshape(k, W.shape[1], -1)
        if layer.bias is not None:
            M = torch.cat([M, V[layer.bias].reshape(k, -1, 1)], dim=2)
        return M

    def _scatter(self, layer: KroneckerBlock, M: torch.Tensor, out: list) -> None:
        w = self._params[layer.weight]
        d_w = w[0].numel()
        out[layer.weight] = M[:, :, :d_w].reshape(M.shape[0], *w.shape)
        if layer.bias is not None:
            out[layer.bias] = M[:, :, d_w]

    def _matmat_list(self, V: TensorList) -> TensorList:
        out: list = [None] * len(V)
        for layer in self.factors():
            self._scatter(layer, layer.G @ self._matrices(layer, V) @ layer.A, out)
        for i, d in self.diagonal.items():
            out[i] = d * V[i]
        return out

    def _solve_columns(
        self, B: torch.Tensor, damping: float, method: str, rtol: float, max_iter: int | None
    ) -> torch.Tensor:
        if method == "kronecker":  # exact, through the factors' eigendecompositions
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
            raise OptionError(f"damping must be positive, got {damping!r}")
        vector = V.dim() == 1
        Vm = (V.unsqueeze(1) if vector else V).to(dtype=self.dtype, device=self.device)
        parts = self.unflatten(Vm.T)
        out: list = [None] * len(parts)
        for layer in self.factors():
            R = kronecker_solve(self._matrices(layer, parts), *layer.eigendecompositions(), damping, factored)
            self._scatter(layer, R, out)
        for i, d in self.diagonal.items():
            out[i] = parts[i] / (d + damping)
        result = self.flatten(out).T
        return result.squeeze(1) if vector else result

    def _batch_context(self, index, X, y):  # pragma: no cover - products use the factors
        raise RuntimeError("KFACOperator multiplies with its factors, not per batch")

    def _batch_matvec(self, ctx, v):  # pragma: no cover - products use the factors
        raise RuntimeError("KFACOperator multiplies with its factors, not per batch")
