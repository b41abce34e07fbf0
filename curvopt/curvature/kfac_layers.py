"""How to get K-FAC's ``A`` and ``G`` for each module type: one small helper per layer type.

The kfac curvature operator (:mod:`curvopt.curvature.kfac`) and the KFAC optimizer
(:mod:`curvopt.optim.kfac`) ask :func:`kronecker_layer` for a module's helper and never look at
the module type themselves, as kfac-pytorch's per-layer helpers do. A helper turns what a forward
hook sees (the layer's input ``x``) and what a backward pass brings (vectors at its output) into
rows ``[N, T, d]``, ``T`` the weight-sharing positions (Eschenhagen et al., 2023). Parameters of
modules without a helper get a diagonal block (:class:`~curvopt.curvature.kfac_factors.DiagonalBlock`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

KRONECKER_DESCRIPTION = "Linear, and Conv1d/Conv2d with groups=1 and zero padding"


class LinearLayer:
    """``nn.Linear``: every leading dimension but the batch is a weight-sharing position."""

    @staticmethod
    def inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's inputs ``[N, *, d_in]`` as ``[N, T, d_in]``."""
        return x.reshape(x.shape[0], -1, x.shape[-1])

    @staticmethod
    def output_vectors(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """Vectors at the output ``[K, N, *, out]`` as ``[K, N, T, out]``."""
        K, n = g.shape[:2]
        return g.reshape(K, n, -1, g.shape[-1])

    @staticmethod
    def rows(module: nn.Module, x: torch.Tensor) -> int:
        """Rows one application adds to ``A`` under ``expand``: samples times positions."""
        return x.numel() // max(x.shape[-1], 1)


class ConvLayer:
    """``nn.Conv1d``/``nn.Conv2d`` (``groups=1``, zero padding): the output positions share the weight;
    each sees one patch of the input."""

    @staticmethod
    def inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The patches ``[N, T, C*k...]``, ordered like ``weight.reshape(out, -1)`` and positions
        row-major."""
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

    @staticmethod
    def output_vectors(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """Vectors at the output ``[K, N, out, *spatial]`` as ``[K, N, T, out]``."""
        K, n = g.shape[:2]
        return g.reshape(K, n, g.shape[2], -1).transpose(2, 3)

    @classmethod
    def rows(cls, module: nn.Module, x: torch.Tensor) -> int:
        """Rows one application adds to ``A`` under ``expand``: samples times output positions."""
        return cls.inputs(module, x[:1]).shape[1] * x.shape[0]  # positions of one sample


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


def kronecker_layer(module: nn.Module) -> type[LinearLayer] | type[ConvLayer] | None:
    """The helper that gets ``A`` and ``G`` for ``module``, or None when its parameters get a
    diagonal block instead."""
    if isinstance(module, nn.Linear):
        return LinearLayer
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and module.padding_mode == "zeros":
        return ConvLayer
    return None


def kronecker_structured(module: nn.Module) -> bool:
    """Whether K-FAC factors the layer's weight as ``A ⊗ G``: ``Linear``, and ``Conv1d``/``Conv2d``
    with ``groups=1`` and zero padding. Other layers' parameters get diagonal blocks."""
    return kronecker_layer(module) is not None


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's inputs as ``[N, T, d_in]`` (``T`` weight-sharing positions); for convolutions
    the patches, ordered like ``weight.reshape(out, -1)`` and positions row-major."""
    if isinstance(module, nn.Linear):
        return LinearLayer.inputs(module, x)
    return ConvLayer.inputs(module, x)


def layer_output_vectors(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Vectors at a layer's output, ``[K, N, out, *spatial]`` (conv) or ``[K, N, *, out]``
    (linear), as ``[K, N, T, out]``."""
    if isinstance(module, nn.Linear):
        return LinearLayer.output_vectors(module, g)
    return ConvLayer.output_vectors(module, g)


def layer_rows(module: nn.Module, x: torch.Tensor, kfac_approx: str) -> int:
    """Rows one application with input ``x`` adds to ``A``: samples times positions (``expand``) or
    samples (``reduce``)."""
    if kfac_approx == "reduce":
        return x.shape[0]
    if isinstance(module, nn.Linear):
        return LinearLayer.rows(module, x)
    return ConvLayer.rows(module, x)


def functional_linears(model: nn.Module) -> set[int]:
    """``id``s of the ``Linear`` modules whose parent applies their weight functionally, so that
    their own forward (and its hooks) never runs: ``nn.MultiheadAttention``'s ``out_proj``."""
    return {id(m.out_proj) for m in model.modules()
            if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Module)}


def sample_coupling_norms(model: nn.Module) -> list[str]:
    """Names of the ``BatchNorm`` layers that normalize with batch statistics in the model's current
    mode (training mode, or no running statistics): they couple the samples of a batch."""
    return [f"{n or '<model>'!r} ({type(m).__name__})" for n, m in model.named_modules()
            if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)]


def batch_dim(module: nn.Module) -> int:
    """The batch dimension of a module's first input: 1 for recurrent layers and attention with
    ``batch_first=False``, else 0."""
    return 1 if getattr(module, "batch_first", True) is False else 0
