"""Loss along one or two directions in parameter space (Li et al., 2018)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from curvopt.analysis._data import checked_data
from curvopt.curvature.data_loop import accumulate, to_model
from curvopt.curvature.losses import loss_terms, resolve_reduction
from curvopt.curvature.model_state import curvature_pass, seed_batch
from curvopt.curvature.params import select_parameters
from curvopt.errors import ShapeError


@dataclass
class Landscape:
    """Loss values on a line (``losses [n]``) or a plane (``losses [n, n]``, indexed ``[i_alpha, i_beta]``)."""

    alphas: torch.Tensor
    betas: torch.Tensor | None
    losses: torch.Tensor

    @property
    def dims(self) -> int:
        return 1 if self.betas is None else 2


def random_direction(
    model: nn.Module,
    params: Iterable[torch.Tensor | str] | None = None,
    *,
    filter_normalize: bool = True,
    seed: int | torch.Generator | None = 0,
) -> torch.Tensor:
    """A Gaussian direction ``[P]``; filter-normalized (Li et al., 2018) by default.

    Filter normalization rescales each output filter (slice along dim 0) of every
    weight with ``dim > 1`` to the norm of the corresponding filter of the weight, and
    zeroes the direction on one-dimensional parameters (biases, norm layers).
    """
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed or 0))
    _, tensors = select_parameters(model, params)
    parts = []
    for p in tensors:
        d = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype=p.dtype, device=p.device)
        if filter_normalize:
            if p.dim() <= 1:
                d = torch.zeros_like(d)
            else:
                w, dd = p.detach().reshape(p.shape[0], -1), d.reshape(p.shape[0], -1)
                ratio = w.norm(dim=1, keepdim=True) / dd.norm(dim=1, keepdim=True).clamp_min(1e-30)
                d = (dd * ratio).reshape(p.shape)
        parts.append(d.reshape(-1))
    return torch.cat(parts)


def loss_landscape(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    directions: Sequence[torch.Tensor],
    *,
    steps: int = 21,
    radius: float = 1.0,
    params: Iterable[torch.Tensor | str] | None = None,
    progress: bool | str = False,
) -> Landscape:
    """Loss at ``theta + a d1 (+ b d2)`` for ``a, b`` on ``linspace(-radius, radius, steps)``.

    Args:
        model: The network; evaluated in its current mode.
        loss_fn: The loss (an ``nn.*Loss`` or a function ``loss_fn(output, y)``).
        data: One ``(X, y)`` batch or a re-iterable collection of batches (a list, a
            ``DataLoader``); every point passes over all of it.
        directions: One or two flat directions ``[P]`` over the selected parameters
            (top eigenvectors from :func:`~curvopt.top_eigenvalues`, or
            :func:`random_direction`).
        steps: Points per axis (``>= 1``). ``steps=1`` evaluates the trained point only
            (coordinate 0), not an end of the range.
        radius: Extent along each direction (``> 0``).
        params: The parameters the directions refer to (default: all requiring grad).

    Looking changes nothing: perturbed parameters are passed functionally, and every loss
    runs inside :func:`~curvopt.curvature.model_state.curvature_pass`, so train-mode
    BatchNorm uses batch statistics without updating its running statistics, and the
    global random state is left as found. Dropout active in train mode draws the same
    mask for a batch at every point (one mask per batch), so the landscape is one
    function of the coordinates. Each loss is the loss torch computes over all batches
    together (the one data loop: batches weighted by their loss terms).

    Raises:
        EmptyDataError: when ``data`` holds no samples.
        TypeError: when ``data`` is a one-shot iterator (a generator), which the second
            point would find exhausted: give a list of batches or a ``DataLoader``.
    """
    checked_data(data, "loss_landscape(data=...)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"loss_landscape: steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"loss_landscape: radius must be a finite number > 0, got {radius!r}")
    names, tensors = select_parameters(model, params)
    P = sum(t.numel() for t in tensors)
    if not 1 <= len(directions) <= 2:
        raise ValueError(f"give one or two directions, got {len(directions)}")
    dirs = []
    for i, d in enumerate(directions):
        d = torch.as_tensor(d)
        if d.dim() == 2 and d.shape[1] == 1:
            d = d[:, 0]
        if d.shape != (P,):
            raise ShapeError(f"direction {i} has shape {tuple(d.shape)}; expected ({P},)")
        dirs.append(d.to(dtype=tensors[0].dtype, device=tensors[0].device))
    base = [t.detach() for t in tensors]
    sizes = [t.numel() for t in tensors]
    coords = (torch.zeros(1, dtype=torch.float64) if steps == 1
              else torch.linspace(-radius, radius, steps, dtype=torch.float64))

    def evaluate(moved: dict[str, torch.Tensor], index: int, X: Any, y: Any) -> torch.Tensor:
        X, y = to_model(X, base[0]), to_model(y, base[0])
        args = tuple(X) if isinstance(X, (tuple, list)) else (X,)
        seed_batch(index)  # the same dropout mask for this batch at every point
        with torch.no_grad():
            return loss_fn(functional_call(model, moved, args), y)

    with curvature_pass(model):
        def forward(X: Any, y: Any) -> tuple[torch.Tensor, Any]:
            X = to_model(X, base[0])
            return model(*(tuple(X) if isinstance(X, (tuple, list)) else (X,))), to_model(y, base[0])

        reduction = resolve_reduction(loss_fn, None, data, forward, "loss_landscape(data=...)")

        def loss_at(shift: torch.Tensor) -> float:
            moved = {n: b + s.reshape(b.shape) for n, b, s in zip(names, base, shift.split(sizes))}

            def product(index: int, X: Any, y: torch.Tensor):
                loss = evaluate(moved, index, X, y)
                return loss, [loss.reshape(1)]

            return float(accumulate(product, data, reduction=reduction, progress=progress,
                                    weight=lambda X, y, n: loss_terms(loss_fn, y, n, reduction),
                                    zeros=lambda: [base[0].new_zeros(1)])[0])

        if len(dirs) == 1:
            losses = torch.tensor([loss_at(float(a) * dirs[0]) for a in coords], dtype=torch.float64)
            return Landscape(coords, None, losses)
        losses = torch.tensor([[loss_at(float(a) * dirs[0] + float(b) * dirs[1]) for b in coords]
                               for a in coords], dtype=torch.float64)
    return Landscape(coords, coords.clone(), losses)
