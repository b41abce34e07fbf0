"""Quantization-aware fine-tuning (QAT) with the straight-through estimator.

Each step runs the forward and backward passes with the planned weights replaced in place by
``Q_b(W)`` and then puts the latent full-precision ``W`` back before the optimizer's step, so the
update is ``W <- W - lr * step(dL/dW |_{W = Q_b(W)})``: the gradient at the quantized weights
applied to the latent ones as if ``Q`` were the identity (Bengio et al., 2013; the fine-tuning of
HAWQ-V3, Yao et al., 2021). The model keeps its own ``Parameter`` objects throughout, so nothing
is re-registered and optimizers created elsewhere keep working.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from curvopt.curvature.data_loop import batch_size, is_single_batch, iterate_batches, to_model
from curvopt.curvature.model_state import cuda_devices
from curvopt.errors import EmptyDataError, NonFiniteLossError, QuantizationError
from curvopt.quant.fake import planned_weights, quantize_in_place, restore
from curvopt.quant.quantizer import Quantizer


def finetune(
    model: nn.Module,
    plan: Any,
    loader: Any,
    loss_fn: Any = None,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    quantizer: Any = None,
    seed: int = 0,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> list[float]:
    """Fine-tune ``model`` for its quantized weights with the straight-through estimator.

    The forward and backward passes of every step see ``Q_b(W)`` for the planned modules (the
    ``quantizer``, clip ranges re-fitted to the current ``W`` at each step); the gradient updates
    the latent full-precision weights, which stay in the model afterwards: evaluate the fine-tuned
    quantized model with ``with fake_quantized(model, plan, quantizer): ...``. All trainable
    parameters are trained (biases, norms and unplanned layers in full precision). The model is in
    training mode during the run (BatchNorm statistics update, dropout active, drawn from a
    generator seeded with ``seed`` and forked from the global one), and its modes are restored
    after. Gradients are cleared (``None``) on return. The clip search of an ``"mse"`` quantizer
    runs at every step (``grid`` trial roundings of each planned weight, about a second per million
    weights on one CPU core at ``grid=100``); ``Quantizer(clipping="minmax")`` is the cheap choice
    for large layers.

    Args:
        model: The network.
        plan: ``{module name: bits}`` or an object with such a ``.bits`` (a ``BitPlan``).
        loader: An ``(X, y)`` batch or an iterable of batches, read once per epoch in the order
            given (a ``DataLoader`` with ``shuffle=True`` shuffles from the seeded generator).
        loss_fn: ``loss_fn(model(X), y)``; default ``torch.nn.CrossEntropyLoss()``.
        epochs: Passes over ``loader``.
        lr: Learning rate of the default optimizer, Adam (``torch.optim.Adam``, its default betas);
            not used when ``optimizer`` is given.
        quantizer: Default ``Quantizer()`` (symmetric per channel, MSE clipping).
        seed: Seeds dropout and a shuffling ``DataLoader`` during the run.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` over the model's trainable
            parameters, e.g. ``lambda p: torch.optim.SGD(p, lr=0.01)``; default Adam(lr=lr).

    Returns:
        Per epoch, the sample-weighted mean of the batch losses (each measured at the quantized
        weights, before that batch's step).

    Raises:
        NonFiniteLossError: when a batch's loss is NaN or infinite; the model's parameters and
            buffers are then put back as they were at the call (so is the model on any other
            error raised inside the run), since Adam would have spread the NaN into every weight.
        QuantizationError: for a bad plan, ``epochs`` or ``lr``, or a one-shot iterator with
            ``epochs > 1``.
        EmptyDataError: when an epoch holds no samples.
    """
    where = "finetune"
    weights = planned_weights(model, plan, f"{where}(plan=...)")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise QuantizationError(f"{where}(epochs=...) must be an integer >= 1, got {epochs!r}")
    if optimizer is None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                              or not math.isfinite(lr) or lr <= 0):
        raise QuantizationError(f"{where}(lr=...) must be a positive finite number, got {lr!r}")
    batches = [loader] if is_single_batch(loader) else loader
    if isinstance(batches, Iterator) and epochs > 1:
        raise QuantizationError(f"{where}(loader=...) is a one-shot iterator (e.g. a generator), which "
                                f"epochs={epochs} would find exhausted after the first; pass a list of "
                                "batches or a DataLoader")
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    quantizer = Quantizer() if quantizer is None else quantizer
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise QuantizationError(f"{where}: {type(model).__name__} has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr) if optimizer is None else optimizer(params)
    ref = params[0]

    modes = [(m, m.training) for m in model.modules()]
    start_params = [(p, p.detach().clone()) for p in model.parameters()]
    start_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    losses: list[float] = []
    try:
        with torch.random.fork_rng(devices=cuda_devices(params)):
            torch.manual_seed(seed)
            model.train()
            for epoch in range(epochs):
                total, count = 0.0, 0
                for index, (X, y) in enumerate(iterate_batches(batches)):
                    n = batch_size(X)
                    if n == 0:
                        continue
                    X, y = to_model(X, ref), to_model(y, ref)
                    opt.zero_grad(set_to_none=True)
                    latent: list[torch.Tensor] = []
                    try:
                        quantize_in_place(weights, quantizer, latent)
                        out = model(*X) if isinstance(X, (tuple, list)) else model(X)
                        loss = loss_fn(out, y)
                        value = float(loss.detach())
                        if not math.isfinite(value):
                            raise NonFiniteLossError(
                                index, value,
                                f"{where}: the loss on batch {index} of epoch {epoch} is {value}; the model's "
                                "parameters and buffers are restored to their values before finetune (lower "
                                "lr, or check that batch for NaN/Inf inputs)")
                        loss.backward()  # the gradient at Q_b(W) ...
                    finally:
                        restore(weights[:len(latent)], latent)  # ... applied to the latent W
                    opt.step()
                    total += value * n
                    count += n
                if count == 0:
                    raise EmptyDataError(f"{where}(loader=...): epoch {epoch} holds no samples")
                losses.append(total / count)
    except Exception:
        with torch.no_grad():
            for t, saved in [*start_params, *start_buffers]:
                if t.shape == saved.shape:
                    t.copy_(saved)
                else:  # a buffer the forward resized
                    t.data = saved
        raise
    finally:
        opt.zero_grad(set_to_none=True)
        for m, training in modes:
            m.training = training
    return losses
