"""Per-layer sensitivity scores for mixed-precision quantization, chosen by name.

A score says, for each quantizable module ``l`` and bit width ``b``, how much the loss grows when only
that module's weight ``W`` is quantized: ``D_b = Q_b(W) - W`` with a :class:`~curvopt.quant.Quantizer`.

* ``"hawq_v2"`` (Dong et al., 2020): ``tr(H_ww) / n_w * ||D_b||^2``, the average Hessian trace of the
  weight block;
* ``"hawq_v1"`` (Dong et al., 2019): ``lambda_max(H_ww) * ||D_b||^2``;
* ``"qbert"`` (Shen et al., 2020): ``(|mean| + std)`` of ``lambda_max(H_ww)`` over random 10% subsets of
  the data, times ``||D_b||^2``;
* ``"fisher"``: as ``"hawq_v2"`` with the trace of the (Monte-Carlo or empirical) Fisher block;
* ``"gptq"`` (Frantar et al., 2023): ``tr(D_b H D_b^T)`` with ``H = E[x x^T]`` of the layer's inputs (the
  expected squared error of the layer's outputs; K-FAC's ``A`` factor, no second derivative);
* ``"measured"``: the calibration loss with only that module quantized, minus the full-precision loss.

Each name is a :class:`Score` in the registry :data:`SCORES` (what it needs: the trace, a Fisher, and
how it scores a report row).

The curvature scores are HAWQ's ``Omega``: twice the second-order Taylor prediction
``1/2 vec(D)^T H vec(D)`` of the loss increase when ``D`` spreads evenly over the block's eigenvectors.
The block is the weight alone: only the weight is quantized, so the curvature of the bias (often much
larger per parameter) has no part in the increase. Each function here runs the user's model as it is;
:func:`curvopt.sensitivity` calls them inside :func:`~curvopt.curvature.model_state.curvature_pass`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from curvopt.curvature.data_loop import accumulate, batch_size, iterate_batches, to_model
from curvopt.curvature.kfac import input_factor, kronecker_structured, layer_inputs, statistics_dtype
from curvopt.curvature.losses import loss_terms, resolve_reduction
from curvopt.curvature.model_state import seed_batch
from curvopt.errors import OptionError, UnsupportedModuleError
from curvopt.quant.fake import fake_quantized
from curvopt.quant.plan import check_bits
from curvopt.quant.quantizer import Quantizer
from curvopt.registry import Registry

#: Curvatures the ``"fisher"`` score accepts (``curvature=...``).
FISHER_CURVATURES = ("fisher", "empirical_fisher")
#: Q-BERT's subsets: how many, and the share of the samples in each.
QBERT_SUBSETS, QBERT_FRACTION = 10, 0.1


def weight_names(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """``{module name: name of its weight in model.named_parameters()}``: a tied weight goes by the name of
    its first owner, so that modules sharing one tensor share its curvature."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {name: canonical[id(m.weight)] for name, m in modules.items()}


def curvature_score(factor: float, weight: torch.Tensor, bits: int, quantizer: Quantizer) -> float:
    """``max(factor, 0) * ||Q_b(W) - W||^2``: a curvature score from its bit-independent factor (an average
    trace or a top eigenvalue). A negative factor (an indefinite block, or estimator noise) predicts no
    increase, so the score is 0; the report keeps the factor itself."""
    return max(float(factor), 0.0) * quantizer.error(weight, check_bits(bits, "score_table(bits=...)"))


def gptq_score(weight: torch.Tensor, moment: torch.Tensor, bits: int, quantizer: Quantizer) -> float:
    """``tr(D H D^T)`` in float64, ``D = Q_b(W) - W`` as ``[out, d_in]`` (a convolution's weight flattened
    like its patches) and ``H = E[x x^T]`` ``[d_in, d_in]``; for an embedding ``H`` is diagonal, given as
    the token frequencies ``[num_embeddings]``, and the score is ``sum_i p_i ||D_i||^2`` over its rows."""
    w = weight.detach()
    D = (quantizer.quantize(w, check_bits(bits, "score_table(bits=...)")) - w).double()
    H = moment.double().to(D.device)
    if H.dim() == 1:
        return float((H * D.reshape(D.shape[0], -1).square().sum(1)).sum())
    D = D.reshape(D.shape[0], -1)
    return float(((D @ H) * D).sum())


def _inputs_of(X: Any) -> tuple:
    return tuple(X) if isinstance(X, (tuple, list)) else (X,)


def _forward(model: nn.Module) -> Any:
    ref = next(model.parameters())

    def forward(X: Any, y: Any) -> tuple[torch.Tensor, Any]:
        return model(*_inputs_of(to_model(X, ref))), to_model(y, ref)

    return forward


def dataset_loss(model: nn.Module, loss_fn: Any, data: Any, reduction: str | None = None) -> float:
    """The loss torch computes over all batches of ``data`` together (the one data loop, batches weighted
    by their loss terms), without gradients, in the model's current mode. ``reduction``: the loss's
    (``"mean"``/``"sum"``), detected when ``None``."""
    forward = _forward(model)
    if reduction is None:
        reduction = resolve_reduction(loss_fn, None, data, forward, "sensitivity(loader=...)")

    def product(index: int, X: Any, y: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        seed_batch(index)
        with torch.no_grad():
            out, y = forward(X, y)
            loss = loss_fn(out, y)
        return loss, [loss.detach().double().reshape(1)]

    return float(accumulate(product, data, reduction=reduction,
                            weight=lambda X, y, n: loss_terms(loss_fn, y, n, reduction),
                            zeros=lambda: [torch.zeros(1, dtype=torch.float64, device=_device(model))])[0])


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def measured_increases(model: nn.Module, loss_fn: Any, data: Any, modules: Sequence[str],
                       bits: Sequence[int], quantizer: Quantizer) -> tuple[float, dict[str, dict[int, float]]]:
    """The full-precision loss and ``{module: {b: loss with only that module at b bits - full precision}}``
    (raw, possibly negative), each loss over all of ``data``; every weight is restored bit for bit."""
    reduction = resolve_reduction(loss_fn, None, data, _forward(model), "sensitivity(loader=...)")
    base = dataset_loss(model, loss_fn, data, reduction)
    out: dict[str, dict[int, float]] = {}
    for name in modules:
        out[name] = {}
        for b in bits:
            with fake_quantized(model, {name: b}, quantizer):
                out[name][b] = dataset_loss(model, loss_fn, data, reduction) - base
    return base, out


def _gptq_capable(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or kronecker_structured(module)


def input_moments(model: nn.Module, loss_fn: Any, data: Any, modules: dict[str, nn.Module],
                  progress: bool | str = False) -> dict[str, torch.Tensor]:
    """``H = E[x x^T]`` of each module's inputs over all samples of ``data`` (rows of every application,
    and every position of a sequence or a convolution's patches, count as samples): K-FAC's ``A`` factor
    without the bias row, computed with its :func:`~curvopt.curvature.kfac.layer_inputs` and
    :func:`~curvopt.curvature.kfac.input_factor` in one pass of the one data loop. An embedding's is the
    diagonal, returned as the frequency of each index ``[num_embeddings]``. Half-precision models get
    float32 moments.

    Raises:
        UnsupportedModuleError: for a module that is not ``Linear``, ``Conv1d``/``Conv2d`` (``groups=1``,
            zero padding) or ``Embedding``, or whose forward never ran (``nn.MultiheadAttention``'s
            ``out_proj``, whose weight attention applies functionally), naming it and the scores that work.
    """
    bad = [f"{n!r} ({type(m).__name__})" for n, m in modules.items() if not _gptq_capable(m)]
    if bad:
        raise UnsupportedModuleError(
            f"the 'gptq' score needs the inputs of a Linear, Conv1d/Conv2d (groups=1, zero padding) or "
            f"Embedding layer; {', '.join(bad)} is not one; use score='hawq_v2' or score='measured'")
    names = list(modules)
    ref = next(iter(modules.values())).weight
    dtype = statistics_dtype(ref.dtype)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    ran: set[str] = set()
    hooks = [modules[n].register_forward_hook(lambda m, inp, out, n=n: captured[n].append(inp[0].detach()))
             for n in names]

    def moment(name: str) -> torch.Tensor:
        m, xs = modules[name], captured[name]
        if isinstance(m, nn.Embedding):
            rows = sum(x.numel() for x in xs)
            counts = sum(torch.bincount(x.reshape(-1), minlength=m.num_embeddings) for x in xs)
            return (counts.to(dtype) / max(rows, 1)) if xs else torch.zeros(m.num_embeddings, dtype=dtype,
                                                                           device=ref.device)
        d = m.weight[0].numel()
        if not xs:
            return torch.zeros(d, d, dtype=dtype, device=m.weight.device)
        rows = torch.cat([layer_inputs(m, x).reshape(-1, 1, d) for x in xs])  # all applications' rows
        return input_factor(rows, "expand")

    def product(index: int, X: Any, y: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for xs in captured.values():
            xs.clear()
        X, y = to_model(X, ref), to_model(y, ref)
        seed_batch(index)
        with torch.no_grad():
            loss = loss_fn(model(*_inputs_of(X)), y)
        ran.update(n for n in names if captured[n])
        return loss, [moment(n) for n in names]

    def zeros() -> list[torch.Tensor]:  # a rank without samples still takes part in the one collective
        for xs in captured.values():
            xs.clear()
        return [moment(n) for n in names]

    try:
        # weighted by samples: the mean over every sample's rows, as K-FAC's A
        moments = accumulate(product, data, reduction="mean", progress=progress, zeros=zeros)
    finally:
        for h in hooks:
            h.remove()
    missing = [f"{n!r} ({type(modules[n]).__name__})" for n in names if n not in ran]
    if missing:
        raise UnsupportedModuleError(
            f"the 'gptq' score needs the inputs of {', '.join(missing)}, whose forward never ran on the data "
            "(a weight applied functionally, e.g. nn.MultiheadAttention's out_proj); use score='hawq_v2' or "
            "score='measured' for this model")
    return dict(zip(names, moments))


def data_subsets(data: Any, count: int = QBERT_SUBSETS, fraction: float = QBERT_FRACTION,
                 seed: int = 0) -> list[list[tuple[Any, Any]]]:
    """``count`` random subsets of the samples of ``data``, each ``ceil(fraction * N)`` samples drawn
    without replacement (seeded), as lists of batches no larger than ``data``'s largest (Q-BERT's 10%
    subsets)."""
    Xs, ys, largest = [], [], 1
    for X, y in iterate_batches(data):
        n = batch_size(X)
        if n == 0:
            continue
        Xs.append(X)
        ys.append(y)
        largest = max(largest, n)
    if isinstance(Xs[0], (tuple, list)):
        X_all: Any = type(Xs[0])(torch.cat(parts) for parts in zip(*Xs))
    else:
        X_all = torch.cat(Xs)
    y_all = torch.cat(ys)
    N = batch_size(X_all)
    size = max(1, math.ceil(fraction * N))
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in range(count):
        idx = torch.randperm(N, generator=g)[:size]
        batches = []
        for chunk in idx.split(largest):
            Xc = type(X_all)(t[chunk.to(t.device)] for t in X_all) if isinstance(X_all, (tuple, list)) \
                else X_all[chunk.to(X_all.device)]
            batches.append((Xc, y_all[chunk.to(y_all.device)]))
        out.append(batches)
    return out


def qbert_factor(eigenvalues: Sequence[float]) -> float:
    """Q-BERT's ``|mean| + std`` of a layer's top eigenvalues over the subsets (sample standard deviation)."""
    t = torch.tensor(list(eigenvalues), dtype=torch.float64)
    std = float(t.std(unbiased=True)) if t.numel() > 1 else 0.0
    return abs(float(t.mean())) + std


# ---- the scores by name --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """What one score needs from :func:`curvopt.sensitivity` and how it scores a module from its report row.

    Attributes:
        rule: ``rule(row, weight, bits, quantizer, input_moments)``: the predicted loss increase of the row's
            module with its ``weight`` at ``bits`` bits (a used module; an unused one scores 0 for every score).
        factor: For a curvature score ``c * ||Q_b(W) - W||^2``, reads ``c`` from a row (``None`` where it was
            not computed); ``None`` for the other scores.
        factor_name: What ``c`` is called in the warning about a negative one.
        needs_trace: Whether the score reads the weight block's trace (then ``probes >= 1``).
        default_curvature: The backend when ``sensitivity(curvature=None)``.
        curvatures: The backends the score accepts (empty: any), and ``curvature_note``, why.
    """

    rule: Callable[[Any, torch.Tensor, int, Quantizer, dict[str, torch.Tensor]], float]
    factor: Callable[[Any], float | None] | None = None
    factor_name: str = "weight trace"
    needs_trace: bool = False
    default_curvature: str = "hessian"
    curvatures: tuple[str, ...] = ()
    curvature_note: str = ""

    def value(self, row: Any, weight: torch.Tensor, bits: int, quantizer: Quantizer,
              input_moments: dict[str, torch.Tensor]) -> float:
        """The score of ``row``'s module at ``bits``: 0 for an unused one (quantizing it changes nothing)."""
        if row.status == "unused":
            return 0.0
        return self.rule(row, weight, bits, quantizer, input_moments)


def _curvature_rule(factor: Callable[[Any], float | None]) -> Callable[..., float]:
    """The rule of a curvature score: ``curvature_score`` of the row's factor (NaN where it is missing)."""

    def rule(row: Any, weight: torch.Tensor, bits: int, quantizer: Quantizer, _: Any) -> float:
        c = factor(row)
        return curvature_score(math.nan if c is None else float(c), weight, bits, quantizer)

    return rule


def _avg_trace(row: Any) -> float:
    return row.weight_avg_trace


def _top_eigenvalue(row: Any) -> float | None:
    return row.weight_top_eigenvalue


def _qbert(row: Any) -> float | None:
    return qbert_factor(row.qbert_eigenvalues) if row.qbert_eigenvalues else None


def _gptq_rule(row: Any, weight: torch.Tensor, bits: int, quantizer: Quantizer,
               input_moments: dict[str, torch.Tensor]) -> float:
    return gptq_score(weight, input_moments[row.name], bits, quantizer)


def _measured_rule(row: Any, weight: torch.Tensor, bits: int, quantizer: Quantizer, _: Any) -> float:
    raw = (row.measured_raw or {}).get(bits, math.nan)
    return max(raw, 0.0) if math.isfinite(raw) else raw  # a negative increase (noise): no increase


#: The scores :func:`curvopt.sensitivity` takes by name (``score=...``), in the order they are listed.
SCORES: Registry[Score] = Registry("score")
SCORES.register("hawq_v2", Score(_curvature_rule(_avg_trace), _avg_trace, needs_trace=True), options=())
SCORES.register("hawq_v1", Score(_curvature_rule(_top_eigenvalue), _top_eigenvalue, "top eigenvalue"),
                options=())
SCORES.register("qbert", Score(_curvature_rule(_qbert), _qbert), options=())
SCORES.register("fisher", Score(_curvature_rule(_avg_trace), _avg_trace, needs_trace=True,
                                default_curvature="fisher", curvatures=FISHER_CURVATURES,
                                curvature_note="Monte-Carlo or empirical Fisher"), options=())
SCORES.register("gptq", Score(_gptq_rule), options=())
SCORES.register("measured", Score(_measured_rule), options=())
#: Score names accepted by :func:`curvopt.sensitivity` (``score=...``).
SCORE_NAMES = tuple(SCORES.names())
#: Scores of the form ``c * ||Q_b(W) - W||^2`` with ``c`` a curvature statistic of the weight block.
CURVATURE_SCORES = tuple(n for n in SCORE_NAMES if SCORES.get(n).factor is not None)


def check_score(score: Any) -> str:
    """``score`` if it is a registered score name, else an :class:`~curvopt.errors.OptionError` listing them."""
    if score not in SCORES:  # also a name that is no string
        raise OptionError(f"sensitivity: unknown score {score!r}; valid scores: {', '.join(SCORES.names())}")
    return score
