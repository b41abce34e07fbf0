"""Per-layer Hessian sensitivity for mixed-precision quantization (HAWQ-V2, Dong et al., 2020)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from curvopt.analysis._data import checked_data
from curvopt.analysis.quantize import quantization_perturbation
from curvopt.analysis.spectrum import _generator, top_eigenvalues
from curvopt.curvature.data_loop import first_batch, to_model
from curvopt.curvature.model_state import curvature_pass, seed_batch
from curvopt.curvature.registry import curvature as build_curvature
from curvopt.linalg import trace_estimate

STATUSES = ("ok", "frozen", "unused", "tied")


@dataclass
class LayerSensitivity:
    """One module's row of a :class:`SensitivityReport`.

    ``status`` is ``"ok"``, ``"frozen"`` (no parameter requires grad), ``"unused"``
    (none of its trainable parameters gets a gradient from the loss) or ``"tied"`` (every
    parameter it owns is shared with an earlier module and counted there); only ``ok``
    rows carry curvature numbers. ``shared`` maps the module's own name of each tied
    parameter to the name it is counted under (``model.named_parameters()``'s name: the
    first module that owns it).
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


@dataclass
class SensitivityReport:
    """Per-module curvature sensitivity; ``str(report)`` is a table, ``to_dict()`` plain data."""

    layers: list[LayerSensitivity]
    curvature: str
    probes: int
    method: str
    bits: int | None = None
    total_trace: float = math.nan
    total_trace_se: float = math.nan
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerSensitivity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no module {name!r} in the report; modules: {', '.join(l.name for l in self.layers)}")

    def ranking(self) -> list[str]:
        """Module names, most sensitive first: by HAWQ score when ``bits`` was given,
        else by average trace. Frozen and unused modules are left out."""
        key = "hawq_score" if self.bits is not None else "avg_trace"
        ok = [l for l in self.layers if l.status == "ok"]
        return [l.name for l in sorted(ok, key=lambda l: getattr(l, key), reverse=True)]

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "layers"}
        out["layers"] = {l.name: {k: v for k, v in asdict(l).items() if k != "name"} for l in self.layers}
        out["ranking"] = self.ranking()
        return out

    def table(self) -> str:
        cols = ["module", "params", "trace", "± se", "avg trace", "± se"]
        if any(l.top_eigenvalue is not None for l in self.layers):
            cols.append("top eig")
        if self.bits is not None:
            cols += [f"||Q{self.bits}(W)-W||²", "HAWQ score"]
        rank = {n: i + 1 for i, n in enumerate(self.ranking())}
        cols.append("rank")
        rows = []
        for l in self.layers:
            if l.status != "ok":
                status = f"tied to {', '.join(l.shared.values())}" if l.status == "tied" else l.status
                row = [l.name or "<root>", str(l.numel), status] + [""] * (len(cols) - 3)
            else:
                row = [l.name or "<root>", str(l.numel), f"{l.trace:.4g}", f"{l.trace_se:.2g}",
                       f"{l.avg_trace:.4g}", f"{l.avg_trace_se:.2g}"]
                if "top eig" in cols:
                    row.append("" if l.top_eigenvalue is None else f"{l.top_eigenvalue:.4g}")
                if self.bits is not None:
                    row += [f"{l.perturbation:.4g}", f"{l.hawq_score:.4g}"]
                row.append(str(rank[l.name]))
            rows.append(row)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
        lines.append("  ".join("-" * w for w in widths))
        for r in rows:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        ties = [f"{own} is {counted}" for l in self.layers for own, counted in l.shared.items()]
        if ties:  # a shared parameter is one parameter of the loss: counted once
            lines.append("tied (counted once, in the first module): " + ", ".join(ties))
        head = (f"{self.curvature} sensitivity ({self.method}, {self.probes} probes): total trace "
                f"{self.total_trace:.4g} ± {self.total_trace_se:.2g}")
        return head + "\n" + "\n".join(lines)

    __str__ = table


def sensitivity(
    model: nn.Module,
    loader: Any,
    loss_fn: Any = None,
    *,
    curvature: str = "hessian",
    probes: int = 64,
    method: str = "hutchpp",
    top_eigenvalue: bool = False,
    bits: int | None = None,
    seed: int = 0,
    progress: bool | str = False,
    **options: Any,
) -> SensitivityReport:
    """Per-module curvature sensitivity: trace, average trace, optional top eigenvalue and
    the HAWQ-V2 score ``avg_trace * ||Q_b(W) - W||^2``.

    Every module's trace comes from the same probes of one curvature operator (one set
    of passes over the data), and the module traces add up to the model's. The curvature
    is that of the model in eval mode (the network that will be quantized and deployed:
    running BatchNorm statistics, no dropout); the model's modes, parameters, buffers and
    the global random state are left as found.

    A module is ``"unused"`` when none of its trainable parameters gets a gradient from
    the loss on the first batch (decided by the gradient, not by whether the module's own
    ``forward`` ran: ``nn.MultiheadAttention`` uses ``out_proj``'s weights without calling
    it). A parameter shared by several modules (tied weights, e.g. an embedding and the
    output layer) is one parameter of the loss: it is reported once, under the first
    module that owns it (its name in ``model.named_parameters()``); a later module whose
    parameters are all tied gets the status ``"tied"`` and names the module they are
    counted in.

    Args:
        model: The network.
        loader: One ``(X, y)`` batch or a re-iterable collection of batches (a list, a
            ``DataLoader``; not a generator, which the second pass would find exhausted).
        loss_fn: Default ``torch.nn.CrossEntropyLoss()``.
        curvature: Registry name of the backend (``"hessian"``, ``"ggn"``, ...).
        probes: Products spent on the trace estimate.
        method: ``"hutchpp"`` or ``"hutchinson"``.
        top_eigenvalue: Also each module's top eigenvalue (Lanczos on its own block).
        bits: Bit width for the HAWQ-V2 score (symmetric uniform, per output channel,
            applied to the module's ``weight``; all its parameters if it has none).
        seed: Seeds the probes.
        progress: tqdm bars on the passes over the data.
        **options: Backend options (``mc_samples``, ``max_batch_columns``, ...).
    """
    checked_data(loader, "sensitivity(loader=...)")
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    with curvature_pass(model):  # modes, buffers and the global RNG come back as found
        model.eval()
        layers = _classify_modules(model, loader, loss_fn)
        selected = [n for layer in layers if layer.status == "ok" for n in layer.params]
        rows = [LayerSensitivity(name=l.name, numel=l.numel, status=l.status, shared=l.shared) for l in layers]
        report = SensitivityReport(rows, curvature=curvature, probes=probes, method=method, bits=bits)
        if not selected:
            return report
        options.setdefault("cache", True)
        op = build_curvature(curvature, model, loss_fn, loader, params=selected, progress=progress, **options)
        est = trace_estimate(op, probes, method=method, per_block=True, generator=_generator(seed))
        report.total_trace, report.total_trace_se = est.value, est.stderr
        params = dict(model.named_parameters())
        for row, info in zip(rows, layers):
            if row.status != "ok":
                continue
            row.numel = sum(params[n].numel() for n in info.params)
            row.trace, row.trace_se = est.blocks[row.name]
            row.avg_trace, row.avg_trace_se = row.trace / row.numel, row.trace_se / row.numel
            if top_eigenvalue:
                sub = build_curvature(curvature, model, loss_fn, loader, params=info.params,
                                      progress=progress, **options)
                row.top_eigenvalue = float(top_eigenvalues(sub, 1, seed=seed).eigenvalues[0])
            if bits is not None:
                weights = [params[n] for n in info.params if n.rpartition(".")[2] == "weight"]
                weights = weights or [params[n] for n in info.params]
                row.perturbation = quantization_perturbation(weights, bits)
                row.hawq_score = row.avg_trace * row.perturbation
        return report


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
    X, y = first_batch(loader, "sensitivity(loader=...)")
    ref = params[0]
    X, y = to_model(X, ref), to_model(y, ref)
    args = tuple(X) if isinstance(X, (tuple, list)) else (X,)
    seed_batch(0)
    with torch.enable_grad():
        loss = loss_fn(model(*args), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {id(p) for p, g in zip(params, grads) if g is not None}
