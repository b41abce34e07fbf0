"""Per-layer sensitivity for mixed-precision quantization: curvature traces and the scores of
:mod:`curvopt.quant.scores` (HAWQ-V2, Dong et al., 2020; HAWQ-V1; Q-BERT; Fisher; GPTQ; measured)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from curvopt import distributed
from curvopt.analysis._data import checked_data
from curvopt.analysis.spectrum import _generator, top_eigenvalues
from curvopt.curvature.data_loop import first_batch, one_bar, to_model
from curvopt.curvature.model_state import curvature_pass, seed_batch
from curvopt.curvature.registry import curvature as build_curvature
from curvopt.errors import EmptyDataError, OptionError, QuantizationError
from curvopt.linalg import trace_estimate
from curvopt.quant.plan import check_bits, quantizable_modules
from curvopt.quant.quantizer import Quantizer
from curvopt.quant.scores import (
    SCORES,
    check_score,
    data_subsets,
    input_moments,
    measured_increases,
    weight_names,
)

STATUSES = ("ok", "frozen", "unused", "tied")


@dataclass
class LayerSensitivity:
    """One module's row of a :class:`SensitivityReport`.

    ``status`` is ``"ok"``, ``"frozen"`` (no parameter requires grad), ``"unused"``
    (none of its trainable parameters gets a gradient from the loss) or ``"tied"`` (every
    parameter it owns is shared with an earlier module and counted there); only ``ok``
    rows carry module curvature numbers (``trace``, ``avg_trace``, ``top_eigenvalue``). ``shared`` maps the
    module's own name of each tied parameter to the name it is counted under (``model.named_parameters()``'s
    name: the first module that owns it).

    A quantizable module (:func:`curvopt.quant.quantizable_modules`) also gets the statistics of its
    ``weight`` block alone, which its score uses (frozen and tied modules too: their weights are
    quantized): ``weight`` (its name in ``model.named_parameters()``), the weight's trace and average
    trace with standard errors, its top eigenvalue (``"hawq_v1"``), its top eigenvalues on the data
    subsets (``"qbert"``), and the measured loss increase per bit width (``"measured"``: ``measured_raw``
    as measured, ``measured`` clipped at 0). ``perturbation`` (``||Q_b(W) - W||^2``) and ``hawq_score`` (the
    report's score) are at the report's ``bits``, when given.
    """

    name: str
    numel: int
    status: str = "ok"
    shared: dict[str, str] = field(default_factory=dict)
    trace: float = math.nan
    trace_se: float = math.nan
    avg_trace: float = math.nan
    avg_trace_se: float = math.nan
    top_eigenvalue: float | None = None
    perturbation: float | None = None
    hawq_score: float | None = None
    type: str = ""
    quantizable: bool = False
    weight: str | None = None
    weight_numel: int = 0
    weight_trace: float = math.nan
    weight_trace_se: float = math.nan
    weight_avg_trace: float = math.nan
    weight_avg_trace_se: float = math.nan
    weight_top_eigenvalue: float | None = None
    qbert_eigenvalues: list[float] | None = None
    measured: dict[int, float] | None = None
    measured_raw: dict[int, float] | None = None

    @property
    def label(self) -> str:
        """The module's name and type, as the table shows it (``"1 (Linear)"``)."""
        return f"{self.name or '<root>'} ({self.type})" if self.type else (self.name or "<root>")


class _Block(NamedTuple):
    name: str
    indices: tuple[int, ...]


class _TraceBlocks:
    """``op`` with blocks of our choosing for :func:`~curvopt.linalg.trace_estimate`: each module's
    trainable parameters, each quantized weight alone and the trainable total. Blocks may overlap, so one
    set of probes gives all of them."""

    def __init__(self, op: Any, blocks: list[_Block]) -> None:
        self.op, self.blocks = op, blocks
        self.shape, self.dtype, self.device, self.params = op.shape, op.dtype, op.device, op.params

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.op @ V


@dataclass
class SensitivityReport:
    """Per-module curvature sensitivity and the scores of one score; ``str(report)`` is a table,
    ``to_dict()`` plain data, :meth:`score_table` the input of :func:`curvopt.quant.allocate_bits`."""

    layers: list[LayerSensitivity]
    curvature: str
    probes: int
    method: str
    bits: int | None = None
    total_trace: float = math.nan
    total_trace_se: float = math.nan
    extras: dict[str, Any] = field(default_factory=dict)
    score: str = "hawq_v2"
    quantizer: Quantizer | None = None
    measured_bits: tuple[int, ...] = ()
    full_precision_loss: float = math.nan
    #: ``"gptq"``: ``{module: E[x x^T]}`` (``[d_in, d_in]``; an embedding's diagonal ``[num_embeddings]``).
    input_moments: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> LayerSensitivity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no module {name!r} in the report; modules: {', '.join(l.name for l in self.layers)}")

    def ranking(self) -> list[str]:
        """Module names, most sensitive first: by the score at ``bits`` when ``bits`` was given (the
        quantizable modules), else by average trace (without traces, ``probes=0``: by the score at the
        lowest bit width, kept in ``extras["rank_scores"]``). Frozen, unused and tied modules are left out."""
        ok = [l for l in self.layers if l.status == "ok"]
        if self.bits is not None:
            ok = [l for l in ok if l.hawq_score is not None]
            return [l.name for l in sorted(ok, key=lambda l: l.hawq_score, reverse=True)]
        if "rank_scores" in self.extras:
            scores = self.extras["rank_scores"]
            ok = [l for l in ok if l.name in scores]
            return [l.name for l in sorted(ok, key=lambda l: scores[l.name], reverse=True)]
        return [l.name for l in sorted(ok, key=lambda l: l.avg_trace, reverse=True)]

    def score_table(self, model: nn.Module, bits: Sequence[int] | int,
                    quantizer: Quantizer | None = None) -> dict[str, dict[int, float]]:
        """``{quantizable module: {b: predicted loss increase at b bits}}`` for ``model`` (the analysed one,
        at its current weights), finite and ``>= 0``: what :func:`curvopt.quant.allocate_bits` minimises.

        Args:
            model: The model the report was made for.
            bits: Bit widths (2-8).
            quantizer: The quantizer that defines ``Q_b`` (default: the one given to
                :func:`sensitivity`). For ``"measured"`` it must be that one: the losses were measured
                with it.

        Raises:
            QuantizationError: for bits outside 2-8, bits that were not measured (``"measured"``; the
                message names those that were), a quantizer other than the measured one, a model whose
                quantizable modules the report does not hold, or a non-finite score.
        """
        bits = [bits] if isinstance(bits, int) else list(bits)
        bits = [check_bits(b, "score_table(bits=...)") for b in bits]
        quantizer = self._quantizer(quantizer)
        if self.score == "measured":
            missing = [b for b in bits if b not in self.measured_bits]
            if missing:
                raise QuantizationError(
                    f"score_table(bits=...): the 'measured' score has no measurement at {missing} bits; measured "
                    f"bits: {list(self.measured_bits)}; pass sensitivity(..., measured_bits=...) with them")
        modules = quantizable_modules(model)
        rows = {l.name: l for l in self.layers}
        unknown = [n for n in modules if n not in rows]
        if unknown:
            raise QuantizationError(
                f"score_table(model=...): the report holds no row for the quantizable module(s) "
                f"{', '.join(map(repr, unknown))} of {type(model).__name__}; pass the model it was made for")
        table = {}
        for name, m in modules.items():
            table[name] = {b: self._score(rows[name], m.weight, b, quantizer) for b in bits}
            bad = {b: v for b, v in table[name].items() if not math.isfinite(v)}
            if bad:
                raise QuantizationError(
                    f"score_table: the {self.score!r} score of module {name!r} is not finite ({bad}); check its "
                    "weights and the data for NaN/Inf")
        return table

    def _quantizer(self, quantizer: Quantizer | None) -> Quantizer:
        own = self.quantizer if self.quantizer is not None else Quantizer()
        if quantizer is None:
            return own
        if self.score == "measured" and not _same_quantizer(quantizer, own):
            raise QuantizationError(
                f"score_table(quantizer=...): the 'measured' losses were measured with {own!r}, not "
                f"{quantizer!r}; run sensitivity(..., quantizer=...) with the quantizer you want scored")
        return quantizer

    def _score(self, row: LayerSensitivity, weight: torch.Tensor, bits: int, quantizer: Quantizer) -> float:
        """The report's score of one quantizable module at ``bits``."""
        return SCORES.get(self.score).value(row, weight, bits, quantizer, self.input_moments)

    def to_dict(self) -> dict[str, Any]:
        skip = ("layers", "quantizer", "input_moments")
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        q = self.quantizer
        out["quantizer"] = None if q is None else (q.to_dict() if hasattr(q, "to_dict") else repr(q))
        out["layers"] = {l.name: {k: v for k, v in asdict(l).items() if k != "name"} for l in self.layers}
        out["ranking"] = self.ranking()
        return out

    def table(self) -> str:
        cols = ["module", "params", "trace", "± se", "avg trace", "± se"]
        weights = any(math.isfinite(l.weight_avg_trace) for l in self.layers)
        if weights:
            cols.append("weight avg trace")
        if any(l.top_eigenvalue is not None for l in self.layers):
            cols.append("top eig")
        if self.score == "measured":
            cols += [f"ΔL@{b}" for b in self.measured_bits]
        if self.bits is not None:
            cols += [f"||Q{self.bits}(W)-W||²", "HAWQ score" if self.score == "hawq_v2" else f"{self.score} score"]
        rank = {n: i + 1 for i, n in enumerate(self.ranking())}
        cols.append("rank")
        rows = []
        for l in self.layers:
            if l.status != "ok":
                status = f"tied to {', '.join(l.shared.values())}" if l.status == "tied" else l.status
                row = [l.label, str(l.numel), status] + [""] * (len(cols) - 3)
            else:
                row = [l.label, str(l.numel), f"{l.trace:.4g}", f"{l.trace_se:.2g}",
                       f"{l.avg_trace:.4g}", f"{l.avg_trace_se:.2g}"]
                if weights:
                    row.append(f"{l.weight_avg_trace:.4g}" if math.isfinite(l.weight_avg_trace) else "")
                if "top eig" in cols:
                    row.append("" if l.top_eigenvalue is None else f"{l.top_eigenvalue:.4g}")
                if self.score == "measured":
                    row += [f"{l.measured_raw[b]:.4g}" if l.measured_raw else "" for b in self.measured_bits]
                if self.bits is not None:
                    row += ["" if l.perturbation is None else f"{l.perturbation:.4g}",
                            "" if l.hawq_score is None else f"{l.hawq_score:.4g}"]
                row.append(str(rank[l.name]) if l.name in rank else "")
            rows.append(row)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
        lines.append("  ".join("-" * w for w in widths))
        for r in rows:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        ties = [f"{own} is {counted}" for l in self.layers for own, counted in l.shared.items()]
        if ties:  # a shared parameter is one parameter of the loss: counted once
            lines.append("tied (counted once, in the first module): " + ", ".join(ties))
        head = (f"{self.curvature} sensitivity ({self.method}, {self.probes} probes; score {self.score}): "
                f"total trace {self.total_trace:.4g} ± {self.total_trace_se:.2g}")
        return head + "\n" + "\n".join(lines)

    __str__ = table


def _same_quantizer(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if hasattr(a, "to_dict"):
        return a.to_dict() == b.to_dict()
    return vars(a) == vars(b)


def sensitivity(
    model: nn.Module,
    loader: Any,
    loss_fn: Any = None,
    *,
    score: str = "hawq_v2",
    curvature: str | None = None,
    probes: int = 64,
    method: str = "hutchpp",
    quantizer: Quantizer | None = None,
    measured_bits: Sequence[int] = (2, 3, 4, 8),
    top_eigenvalue: bool = False,
    bits: int | None = None,
    seed: int = 0,
    progress: bool | str = False,
    **options: Any,
) -> SensitivityReport:
    """Per-module curvature sensitivity and a quantization score per quantizable module, independent of
    the bit width: :meth:`SensitivityReport.score_table` turns it into ``{module: {b: score}}``.

    Every module's trace comes from the same probes of one curvature operator (one set of passes over the
    data): each module's trainable parameters (the module traces add up to the model's) and each
    quantizable module's weight alone (what the curvature scores use: only the weight is quantized). The
    curvature is that of the model in eval mode (the network that will be quantized and deployed: running
    BatchNorm statistics, no dropout); the model's modes, parameters, buffers and the global random state
    are left as found.

    Scores (:data:`curvopt.quant.scores.SCORE_NAMES`; ``W`` a module's weight, ``D_b = Q_b(W) - W``):
    ``"hawq_v2"`` ``tr(H_ww)/n_w * ||D_b||^2``; ``"hawq_v1"`` ``lambda_max(H_ww) * ||D_b||^2`` (Lanczos on
    the weight's block); ``"qbert"`` ``(|mean| + std)`` of ``lambda_max(H_ww)`` over 10 seeded random 10%
    subsets of the samples, times ``||D_b||^2``; ``"fisher"`` as ``"hawq_v2"`` on ``curvature="fisher"``
    (Monte-Carlo, ``mc_samples=...``) or ``"empirical_fisher"``; ``"gptq"`` ``tr(D_b H D_b^T)``,
    ``H = E[x x^T]`` of the module's inputs (no second derivative; kept in ``report.input_moments``);
    ``"measured"`` the loss over ``loader`` with only that module quantized minus the full-precision loss,
    at each of ``measured_bits`` (a negative increase, noise at high bit widths, is kept in
    ``measured_raw`` and scored 0). A negative trace or eigenvalue (an indefinite block, or too few probes)
    scores 0, with a warning.

    A module is ``"unused"`` when none of its trainable parameters gets a gradient from
    the loss on the first batch (decided by the gradient, not by whether the module's own
    ``forward`` ran: ``nn.MultiheadAttention`` uses ``out_proj``'s weights without calling
    it); its score is 0. A parameter shared by several modules (tied weights, e.g. an embedding and the
    output layer) is one parameter of the loss: it is reported once, under the first
    module that owns it (its name in ``model.named_parameters()``); a later module whose
    parameters are all tied gets the status ``"tied"`` and names the module they are
    counted in. A frozen module's weight is quantized too, so its weight block is analysed.

    Args:
        model: The network.
        loader: One ``(X, y)`` batch or a re-iterable collection of batches (a list, a
            ``DataLoader``; not a generator, which the second pass would find exhausted).
        loss_fn: Default ``torch.nn.CrossEntropyLoss()``.
        score: The score's name (default ``"hawq_v2"``).
        curvature: Registry name of the backend (``"hessian"``, ``"ggn"``, ...); default ``"hessian"``,
            ``"fisher"`` for ``score="fisher"``.
        probes: Products spent on the trace estimate; ``0`` skips it (only for ``"hawq_v1"``, ``"qbert"``,
            ``"gptq"``, ``"measured"``).
        method: ``"hutchpp"`` or ``"hutchinson"``.
        quantizer: Defines ``Q_b`` (default :class:`curvopt.quant.Quantizer()`); kept in the report.
        measured_bits: Bit widths the ``"measured"`` score measures.
        top_eigenvalue: Also each module's top eigenvalue (Lanczos on its own block).
        bits: Adds a display column: ``||Q_b(W) - W||^2`` and the score at ``bits``, and ranks by it.
        seed: Seeds the probes, the Lanczos starts and Q-BERT's subsets.
        progress: tqdm bars on the passes over the data.
        **options: Backend options (``mc_samples``, ``max_batch_columns``, ...).

    Raises:
        OptionError: for an unknown score (listing them), ``score="fisher"`` on a curvature that is no
            Fisher, or ``probes`` below 1 for a trace score.
        QuantizationError: for ``bits`` or ``measured_bits`` outside 2-8.
        UnsupportedModuleError: ``"gptq"`` on a module whose inputs it cannot take (see
            :func:`curvopt.quant.scores.input_moments`).
    """
    spec = SCORES.get(check_score(score))
    if curvature is None:
        curvature = spec.default_curvature
    if spec.curvatures and curvature not in spec.curvatures:
        raise OptionError(f"sensitivity: score={score!r} needs curvature= one of {', '.join(spec.curvatures)} "
                          f"({spec.curvature_note}), got {curvature!r}; or use score='hawq_v2'")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 0:
        raise OptionError(f"sensitivity: probes must be an integer >= 0, got {probes!r}")
    if probes == 0 and spec.needs_trace:
        raise OptionError(f"sensitivity: the {score!r} score needs the trace estimate; pass probes >= 1")
    if bits is not None:
        check_bits(bits, "sensitivity(bits=...)")
    measured = sorted({check_bits(b, "sensitivity(measured_bits=...)") for b in measured_bits})
    if score == "measured" and bits is not None and bits not in measured:
        measured = sorted({*measured, bits})  # the display column is a measurement too
    checked_data(loader, "sensitivity(loader=...)")
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    quantizer = Quantizer() if quantizer is None else quantizer
    with curvature_pass(model):  # modes, buffers and the global RNG come back as found
        model.eval()
        layers = _classify_modules(model, loader, loss_fn)
        modules = quantizable_modules(model)
        weights = weight_names(model, modules)
        rows = [LayerSensitivity(name=l.name, numel=l.numel, status=l.status, shared=l.shared,
                                 type=type(model.get_submodule(l.name)).__name__, quantizable=l.name in modules,
                                 weight=weights.get(l.name)) for l in layers]
        report = SensitivityReport(rows, curvature=curvature, probes=probes, method=method, bits=bits, score=score,
                                   quantizer=quantizer,
                                   measured_bits=tuple(measured) if score == "measured" else ())
        by_name = {r.name: r for r in rows}
        unused = {r.name for r in rows if r.status == "unused"}
        # the weights to score: each tensor once (a tied weight under its first owner), none that is unused
        scored = {n: w for n, w in weights.items() if n not in unused and w.rpartition(".")[0] not in unused}
        distinct = list(dict.fromkeys(scored.values()))
        params = dict(model.named_parameters())
        selected = [n for layer in layers if layer.status == "ok" for n in layer.params]
        options.setdefault("cache", True)
        with one_bar(progress, f"sensitivity ({score})"):  # one bar for all passes, not one per product
            _trace_pass(model, loader, loss_fn, report, layers, scored, selected, distinct, params, curvature,
                        probes, method, top_eigenvalue, seed, progress, options)
            if score == "hawq_v1":
                top = {w: _top_eigenvalue(model, loader, loss_fn, curvature, w, seed, progress, options)
                       for w in distinct}
                for n, w in scored.items():
                    by_name[n].weight_top_eigenvalue = top[w]
            elif score == "qbert":
                subsets = data_subsets(loader, seed=seed)
                eig = {w: [_top_eigenvalue(model, sub, loss_fn, curvature, w, seed, progress, options)
                           for sub in subsets] for w in distinct}
                for n, w in scored.items():
                    by_name[n].qbert_eigenvalues = eig[w]
            elif score == "gptq" and scored:
                report.input_moments = input_moments(model, loss_fn, loader, {n: modules[n] for n in scored},
                                                     progress=progress)
        if score == "measured" and scored:
            base, raw = measured_increases(model, loss_fn, loader, list(scored), measured, quantizer)
            report.full_precision_loss = base
            for n, inc in raw.items():
                by_name[n].measured_raw = inc
                by_name[n].measured = {b: max(v, 0.0) for b, v in inc.items()}
        _warn_negative(report, scored)
        if bits is not None:
            for n, m in modules.items():
                by_name[n].perturbation = quantizer.error(m.weight, bits)
                by_name[n].hawq_score = report._score(by_name[n], m.weight, bits, quantizer)
        elif probes == 0:
            low = min(measured) if score == "measured" else min(measured_bits, default=2)
            report.extras["rank_scores"] = {n: report._score(by_name[n], m.weight, low, quantizer)
                                            for n, m in modules.items()}
        return report


def _trace_pass(model: nn.Module, loader: Any, loss_fn: Any, report: SensitivityReport, layers: list,
                scored: dict[str, str], selected: list[str], distinct: list[str], params: dict, curvature: str,
                probes: int, method: str, top_eigenvalue: bool, seed: int, progress: bool | str,
                options: dict[str, Any]) -> None:
    """Module, weight and total traces from one set of probes, and the module top eigenvalues."""
    rows = {r.name: r for r in report.layers}
    # a frozen module's weight is quantized too: its block joins the operator, not the trainable total
    extra = [w for w in distinct if w not in selected]
    if probes == 0 or not (selected or extra):
        return
    op = build_curvature(curvature, model, loss_fn, loader, params=[*selected, *extra], progress=progress,
                         **options)
    position = {n: i for i, n in enumerate(op.param_names)}
    blocks = [_Block("m:" + l.name, tuple(position[n] for n in l.params)) for l in layers if l.status == "ok"]
    blocks += [_Block("w:" + w, (position[w],)) for w in distinct]
    if selected:
        blocks.append(_Block("total", tuple(position[n] for n in selected)))
    est = trace_estimate(_TraceBlocks(op, blocks), probes, method=method, per_block=True,
                         generator=_generator(seed))
    if selected:
        report.total_trace, report.total_trace_se = est.blocks["total"]
    for info in layers:
        row = rows[info.name]
        if row.status != "ok":
            continue
        row.numel = sum(params[n].numel() for n in info.params)
        row.trace, row.trace_se = est.blocks["m:" + row.name]
        row.avg_trace, row.avg_trace_se = row.trace / row.numel, row.trace_se / row.numel
        if top_eigenvalue:
            sub = build_curvature(curvature, model, loss_fn, loader, params=info.params, progress=progress,
                                  **options)
            row.top_eigenvalue = float(top_eigenvalues(sub, 1, seed=seed).eigenvalues[0])
    for name, w in scored.items():
        row, n = rows[name], params[w].numel()
        row.weight_numel = n
        row.weight_trace, row.weight_trace_se = est.blocks["w:" + w]
        row.weight_avg_trace, row.weight_avg_trace_se = row.weight_trace / n, row.weight_trace_se / n


def _top_eigenvalue(model: nn.Module, data: Any, loss_fn: Any, curvature: str, weight: str, seed: int,
                    progress: bool | str, options: dict[str, Any]) -> float:
    """The top eigenvalue of the curvature block of one weight (Lanczos)."""
    sub = build_curvature(curvature, model, loss_fn, data, params=[weight], progress=progress, **options)
    return float(top_eigenvalues(sub, 1, seed=seed).eigenvalues[0])


def _warn_negative(report: SensitivityReport, scored: dict[str, str]) -> None:
    """A curvature score's factor below 0 scores 0; say so, naming the modules."""
    spec = SCORES.get(report.score)
    if spec.factor is None:
        return
    negative = []
    for name in scored:
        factor = spec.factor(report[name])
        if factor is not None and factor < 0:
            negative.append(f"{name!r} ({factor:.3g})")
    if negative:
        what = spec.factor_name
        warnings.warn(f"sensitivity: the {report.curvature} {what} of {', '.join(negative)} is negative (an "
                      f"indefinite block away from a minimum, or too few probes): its {report.score!r} score is 0",
                      stacklevel=3)


@dataclass
class _ModuleInfo:
    name: str
    numel: int  # parameters counted in this row (tied ones only in their first owner's)
    status: str
    params: list[str]  # trainable parameters counted in this row, by their model-level names
    shared: dict[str, str]  # tied parameters: own name -> model-level name


def _classify_modules(model: nn.Module, loader: Any, loss_fn: Any) -> list[_ModuleInfo]:
    """Modules that own parameters, with the trainable parameters counted in their row and a status."""
    canonical = {id(p): n for n, p in model.named_parameters()}  # first owner wins, as torch names them
    owners = [(name, m) for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    trainable = [p for p in model.parameters() if p.requires_grad]
    used = _parameters_with_gradient(model, loader, loss_fn, trainable)
    infos = []
    for name, m in owners:
        own, shared = [], {}
        for pn, p in m.named_parameters(recurse=False):
            local = f"{name}.{pn}" if name else pn
            if canonical[id(p)] == local:
                own.append((local, p))
            else:
                shared[local] = canonical[id(p)]
        counted = [n for n, p in own if p.requires_grad]
        if not own:
            status = "tied"
        elif not counted:
            status = "frozen"
        elif not any(id(p) in used for n, p in own if p.requires_grad):
            status = "unused"
        else:
            status = "ok"
        numel = sum(p.numel() for _, p in own)
        infos.append(_ModuleInfo(name, numel, status, counted if status == "ok" else [], shared))
    return infos


def _parameters_with_gradient(model: nn.Module, loader: Any, loss_fn: Any,
                              params: list[nn.Parameter]) -> set[int]:
    """``id``s of ``params`` that get a gradient from the loss on the first non-empty batch."""
    if not params:
        return set()
    failure, batch = None, None
    try:
        batch = first_batch(loader, "sensitivity(loader=...)")
    except EmptyDataError as e:
        failure = e
    # a rank without samples raises here, but on every rank: its peers would otherwise wait in the next pass
    distributed.agree(failure)
    X, y = batch
    ref = params[0]
    X, y = to_model(X, ref), to_model(y, ref)
    args = tuple(X) if isinstance(X, (tuple, list)) else (X,)
    seed_batch(0)
    with torch.enable_grad():
        loss = loss_fn(model(*args), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {id(p) for p, g in zip(params, grads) if g is not None}
