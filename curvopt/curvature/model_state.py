"""What a curvature pass may do to a model while it runs, and how everything is put back.

Every pass of curvopt over a user's model (curvature products, K-FAC statistics, trial
points of the Newton-type optimizers, loss landscapes) runs inside :func:`curvature_pass`,
which makes the model twice differentiable with PyTorch's defaults and leaves no trace:

* attention runs on the math kernel of ``F.scaled_dot_product_attention`` (the fused CPU
  and GPU kernels have no double backward and no forward-mode derivative) and the fused
  ``nn.TransformerEncoderLayer``/``nn.MultiheadAttention`` fast path is off (no forward
  mode); both settings are restored on exit;
* normalization layers in training mode (``BatchNorm*``, ``InstanceNorm*`` with running
  statistics) normalize with the batch statistics, as in training, but do not update their
  running statistics: the curvature is that of the batch loss the training step sees;
* the global random number generators are forked: randomness inside the pass (dropout
  masks, which :func:`seed_batch` makes one per batch) does not advance the user's stream;
  ``nn.Dropout`` layers get a contiguous input (``torch.func`` differentiates dropout on a
  non-contiguous tensor wrongly in torch 2.13), so the mask is the same whether the pass runs
  eagerly or under ``torch.func`` transforms;
* buffers and the train/eval flags of every module are restored, bit for bit, on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

#: Seed offset of the per-batch dropout masks (any fixed number; one operator, one mask per batch).
MASK_SEED = 20_240_917


def _attention_kernels() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # pragma: no cover - old torch
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def cuda_devices(tensors: Iterable[torch.Tensor]) -> list[int]:
    """Indices of the CUDA devices holding ``tensors`` (whose generators a pass must fork)."""
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def train_mode_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the normalization layers that use batch statistics and update running
    statistics in the model's current mode (``BatchNorm*`` or ``InstanceNorm*`` in training mode
    with ``track_running_stats``)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, _NormBase) and m.training and m.track_running_stats]


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else args


def stochastic_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the dropout layers that are active in the model's current mode."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]


@contextlib.contextmanager
def curvature_pass(model: nn.Module) -> Iterator[None]:
    """Run a curvature pass over ``model``: twice differentiable, and without side effects.

    See the module docstring for what is changed inside and restored on exit (on exceptions too).
    """
    buffers = [(b, b.clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    norms = [m for _, m in train_mode_norms(model)]
    for m in norms:
        m.track_running_stats = False  # batch statistics, no update (see nn.BatchNorm's forward)
    # torch.func's derivative of dropout applied to a non-contiguous tensor (the attention output of a
    # batch_first transformer layer) disagrees with its own forward pass in torch 2.13; on a contiguous
    # copy it is right, and eager and torch.func passes then draw the same mask
    hooks = [m.register_forward_pre_hook(_contiguous_input) for _, m in stochastic_modules(model)]
    try:
        devices = cuda_devices(model.parameters())
        with torch.random.fork_rng(devices=devices), _attention_kernels(), _no_mha_fastpath():
            yield
    finally:
        for h in hooks:
            h.remove()
        for m in norms:
            m.track_running_stats = True
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape != saved.shape:
                    b.data = saved  # undoes a resize; same dtype and device
                else:
                    b.copy_(saved)  # a device copy, where comparing first would read the host per buffer


def seed_batch(index: int, seed: int = 0) -> None:
    """Seed the (forked) global generators for batch ``index``: every forward pass of a batch inside
    :func:`curvature_pass` draws the same dropout masks, so an operator is one fixed matrix.
    Call it at the start of each forward pass, inside :func:`curvature_pass` only."""
    s = MASK_SEED + 1_000_003 * int(seed) + int(index)
    # not torch.manual_seed: it also visits every accelerator backend PyTorch knows of (formatting a stack
    # trace for each absent one), a cost paid once per batch of every product; the generators a model can
    # draw from are the CPU's and those of an initialized CUDA or MPS device
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(s)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(s)


def rng_states(model: nn.Module) -> list[torch.Tensor]:
    """The states of the generators a forward pass of ``model`` may draw from (CPU and the model's
    CUDA devices): compared before and after a pass, they tell whether the model is stochastic."""
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in cuda_devices(model.parameters()))]


def draws_random_numbers(model: nn.Module, forward: Any) -> bool:
    """Whether ``forward()`` (a pass of ``model``, run here without gradients) draws random numbers,
    e.g. dropout in training mode, also when called functionally. Run inside :func:`curvature_pass`."""
    before = rng_states(model)
    with torch.no_grad():
        forward()
    return any(not torch.equal(a, b) for a, b in zip(before, rng_states(model)))


@contextlib.contextmanager
def frozen_norm_statistics() -> Iterator[None]:
    """While it is active, every normalization layer that runs a forward pass in training mode uses its
    batch statistics without updating its running statistics, whatever model it belongs to: for code
    that runs a user's model it is not given (a plain closure), through global module hooks."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    frozen: list[nn.Module] = []

    def before(module: nn.Module, args: tuple) -> None:
        if isinstance(module, _NormBase) and module.training and module.track_running_stats:
            module.track_running_stats = False
            frozen.append(module)

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        if frozen and frozen[-1] is module:
            frozen.pop().track_running_stats = True

    handles = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while frozen:  # a forward that raised
            frozen.pop().track_running_stats = True
