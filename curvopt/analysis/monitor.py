"""A fixed-probe curvature monitor for any training run: top eigenvalue, trace, per-layer trace.

The same measurement as the adaptive batch-size schedule's probe (Yao et al., "Large batch size training of
neural networks with adversarial training and second-order information", arXiv:1810.01021), for a training loop
that has no schedule: every ``every`` calls the monitor builds the curvature of a **fixed** probe set through
the registry and records, per check, the top eigenvalue (Lanczos), the trace and each layer's trace (Hutch++
with standard errors), the seconds the probe took and any columns the caller passes (batch size, lr)::

    monitor = curvopt.CurvatureMonitor(model, loss_fn, (X_probe, y_probe), every=2, path="curvature.csv")
    for epoch in range(epochs):
        train_one_epoch(...)
        monitor.step(epoch, batch_size=batch_size, lr=optimizer.param_groups[0]["lr"])
    monitor.plot("curvature.png")
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvopt.analysis._data import checked_data
from curvopt.analysis.plots import _save
from curvopt.analysis.spectrum import top_eigenvalues, trace
from curvopt.curvature.data_loop import first_batch
from curvopt.curvature.model_state import curvature_pass
from curvopt.curvature.registry import check_options, curvature_class
from curvopt.curvature.registry import curvature as build_curvature
from curvopt.errors import EmptyDataError, MissingDependencyError, NonFiniteLossError, OptionError
from curvopt.linalg.trace import METHODS as TRACE_METHODS

QUANTITIES = ("top_eigenvalue", "trace", "per_layer_trace")
MODES = ("eval", "train")
#: Columns every record has, before the caller's extra columns and the measured quantities.
INDEX_COLUMNS = ("epoch", "check")


def _block_label(name: str) -> str:
    return name or "<root>"  # parameters owned by the root module form the block named ""


class CurvatureMonitor:
    """Measures the curvature of a fixed probe set every ``every`` calls of :meth:`step` and keeps a history.

    Each check builds ``curvopt.curvature(curvature, model, loss_fn, probe_data, **options)`` on the model's
    current parameters and records (columns of :attr:`history` and of the CSV file):

    * ``epoch``, ``check`` (0, 1, ... over this monitor's checks), then the caller's extra columns, in the order of
      the first check;
    * ``top_eigenvalue`` and ``top_eigenvalue_residual``: the largest eigenvalue from
      :func:`curvopt.top_eigenvalues` (Lanczos, the same seeded start vector at every check) and its residual
      norm ``||A x - theta x||``. Lanczos on a fixed probe is not a sampling estimator, so it has no standard
      error; for a symmetric operator the residual bounds the distance from ``theta`` to an eigenvalue of the
      probe's curvature (it does not prove that eigenvalue is the largest);
    * ``trace`` and ``trace_stderr`` from :func:`curvopt.trace` (Hutch++ by default); with
      ``"per_layer_trace"``, ``trace/<block>`` and ``trace_stderr/<block>`` per block of the operator (per
      module by default, the root module's own parameters as ``<root>``), from the same probes (a standard
      error is ``inf`` when the budget left a single random probe);
    * ``products``: curvature-vector products spent, and ``probe_seconds``: wall time of the check.

    Probes leave the model as found (parameters, buffers such as BatchNorm running statistics, train/eval
    flags, the global random state): the model is measured in eval mode by default (running statistics, no
    dropout), or in training mode with ``mode="train"`` (batch statistics, one dropout mask per batch).

    Args:
        model: The network being trained.
        loss_fn: Its loss, e.g. ``nn.CrossEntropyLoss()``.
        probe_data: The fixed probe: one ``(X, y)`` batch or a re-iterable collection of batches.
        every: Measure at calls ``0, every, 2 * every, ...`` of :meth:`step` (the first call always measures).
        quantities: Any of ``"top_eigenvalue"``, ``"trace"``, ``"per_layer_trace"``.
        curvature: Registry name of the curvature (``"hessian"``, ``"ggn"``, ``"fisher"``, ...).
        path: CSV file written one row per check (header once; an existing file with the same columns is
            appended to, so a resumed run continues it).
        mode: ``"eval"`` (default) or ``"train"``: the mode the model is measured in; restored afterwards.
        probes: Products spent on the trace estimate.
        trace_method: ``"hutchpp"`` or ``"hutchinson"``.
        tol: Relative tolerance of Lanczos.
        max_iter: Most Lanczos products (default: Lanczos's own).
        seed: Seeds the Lanczos start vector and the trace probes (the same at every check).
        **options: Backend options (``cache`` defaults to True, ``mc_samples``, ``max_batch_columns``, ...).

    Raises:
        OptionError: for ``every < 1``, an unknown quantity or mode, or an option the backend does not take.
        UnknownCurvatureError: for an unknown curvature name, listing the valid ones.
        EmptyDataError: when ``probe_data`` holds no samples.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        probe_data: Any,
        *,
        every: int = 1,
        quantities: Sequence[str] = QUANTITIES,
        curvature: str = "hessian",
        path: str | Path | None = None,
        mode: str = "eval",
        probes: int = 64,
        trace_method: str = "hutchpp",
        tol: float = 1e-3,
        max_iter: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"CurvatureMonitor(model=...) must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise OptionError(f"CurvatureMonitor(every={every!r}): give a positive integer number of calls")
        if isinstance(quantities, str):
            quantities = (quantities,)
        unknown = [q for q in quantities if q not in QUANTITIES]
        if unknown or not quantities:
            raise OptionError(
                f"CurvatureMonitor(quantities={tuple(quantities)!r}): unknown or no quantity "
                f"{', '.join(map(repr, unknown))}; valid: {', '.join(QUANTITIES)}"
            )
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise OptionError(f"CurvatureMonitor(probes={probes!r}): give a positive integer number of products")
        if trace_method not in TRACE_METHODS:
            raise OptionError(
                f"CurvatureMonitor(trace_method={trace_method!r}); valid: {', '.join(TRACE_METHODS)}"
            )
        if mode not in MODES:
            raise OptionError(f"CurvatureMonitor(mode={mode!r}); valid: {', '.join(MODES)}")
        backend = curvature_class(curvature)  # an unknown name lists the valid ones, here and not at a check
        if True in getattr(backend, "cache_modes", ()):
            options.setdefault("cache", True)  # Lanczos and the trace reuse each batch's forward pass
        check_options(backend, options)
        checked_data(probe_data, "CurvatureMonitor(probe_data=...)")
        first_batch(probe_data, "CurvatureMonitor(probe_data=...)")
        self.model = model
        self.loss_fn = loss_fn
        self.probe_data = probe_data
        self.every = every
        self.quantities = tuple(dict.fromkeys(quantities))
        self.curvature = curvature
        self.path = None if path is None else Path(path)
        self.mode = mode
        self.probes = probes
        self.trace_method = trace_method
        self.tol = tol
        self.max_iter = max_iter
        self.seed = seed
        self.options = options
        self.calls = 0
        self.history: list[dict[str, Any]] = []
        self._columns: list[str] | None = None
        self._extra: list[str] = []

    def step(self, epoch: int | float | None = None, **extra: Any) -> dict[str, Any] | None:
        """Count one call (e.g. the end of an epoch) and measure if it is a check.

        Args:
            epoch: The x-axis value recorded (default: the number of calls before this one).
            **extra: Columns recorded with the check, e.g. ``batch_size=256, lr=0.1``.

        Returns:
            The new record (also appended to :attr:`history` and the CSV file), or None between checks.
        """
        call = self.calls
        self.calls += 1
        if call % self.every:
            return None
        return self.measure(call if epoch is None else epoch, **extra)

    __call__ = step

    def measure(self, epoch: int | float | None = None, **extra: Any) -> dict[str, Any]:
        """Measure now, whatever the call count; returns the record (see the class docstring)."""
        epoch = len(self.history) if epoch is None else epoch
        if self._columns is not None:  # before the probe: a misspelt column costs no probe
            new = [k for k in extra if k not in self._extra]
            if new:
                raise OptionError(
                    f"CurvatureMonitor.step: extra column(s) {', '.join(new)} were not given at the first check; "
                    f"the columns are fixed then: {', '.join(self._columns)}"
                )
        # a 0-d tensor (an lr held as a tensor) is written as its number, not as "tensor(0.1)"
        extra = {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for k, v in extra.items()}
        start = time.perf_counter()
        values = self._probe(epoch)
        seconds = time.perf_counter() - start
        record = self._record(epoch, extra, values, seconds)
        self.history.append(record)
        if self.path is not None:
            self._write(record)
        return record

    def _value_columns(self, op: Any) -> list[str]:
        columns = []
        if "top_eigenvalue" in self.quantities:
            columns += ["top_eigenvalue", "top_eigenvalue_residual"]
        if "trace" in self.quantities:
            columns += ["trace", "trace_stderr"]
        if "per_layer_trace" in self.quantities:
            labels = [_block_label(b.name) for b in op.blocks]
            columns += [f"trace/{n}" for n in labels] + [f"trace_stderr/{n}" for n in labels]
        return [*columns, "products"]

    def _probe(self, epoch: Any) -> dict[str, float]:
        with curvature_pass(self.model):  # everything put back on exit, also the mode set here
            self.model.train(self.mode == "train")
            # a second pass entered in the measured mode freezes the running statistics of the norms that are
            # in training mode now (the outer one saw the user's modes)
            with curvature_pass(self.model):
                op = build_curvature(self.curvature, self.model, self.loss_fn, self.probe_data, **self.options)
                values = dict.fromkeys(self._value_columns(op), math.nan)
                try:
                    self._measure_into(op, values)
                except NonFiniteLossError as e:  # a diverged model: recorded as NaN, the user's training goes on
                    warnings.warn(f"CurvatureMonitor: no curvature at epoch {epoch}: {e}", RuntimeWarning,
                                  stacklevel=3)
                    return values
        # an infinite standard error is Hutch++'s "unknown" (a single stochastic probe), not a failure
        bad = [k for k, v in values.items() if not math.isfinite(v) and "stderr" not in k]
        if bad:  # stated, not raised: the monitor must not stop the run it watches
            warnings.warn(f"CurvatureMonitor: non-finite {', '.join(bad)} (a diverged model or probe data "
                          "holding NaN/Inf)", RuntimeWarning, stacklevel=3)
        return values

    def _measure_into(self, op: Any, values: dict[str, float]) -> None:
        products = 0
        if "top_eigenvalue" in self.quantities:
            res = top_eigenvalues(op, 1, self.tol, max_iter=self.max_iter, seed=self.seed)
            values["top_eigenvalue"] = float(res.eigenvalues[0])
            values["top_eigenvalue_residual"] = float(res.residuals[0])
            products += res.iterations
        if "trace" in self.quantities or "per_layer_trace" in self.quantities:
            per_block = "per_layer_trace" in self.quantities
            est = trace(op, self.probes, method=self.trace_method, per_block=per_block, seed=self.seed)
            if "trace" in self.quantities:
                values["trace"], values["trace_stderr"] = est.value, est.stderr
            for name, (value, stderr) in est.blocks.items():
                values[f"trace/{_block_label(name)}"] = value
                values[f"trace_stderr/{_block_label(name)}"] = stderr
            products += est.probes
        values["products"] = products

    def _record(self, epoch: Any, extra: dict[str, Any], values: dict[str, float],
                seconds: float) -> dict[str, Any]:
        clash = sorted(set(extra) & {*INDEX_COLUMNS, *values, "probe_seconds"})
        if clash:
            raise OptionError(f"CurvatureMonitor.step: extra column(s) {', '.join(clash)} clash with measured "
                              "columns; rename them")
        if self._columns is None:
            self._extra = list(extra)
            self._columns = [*INDEX_COLUMNS, *extra, *values, "probe_seconds"]
        found = {"epoch": epoch, "check": len(self.history), **extra, **values, "probe_seconds": seconds}
        return {c: found.get(c) for c in self._columns}  # an extra column not given this time: empty

    def _write(self, record: dict[str, Any]) -> None:
        path = self.path
        header = list(record)
        if path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as f:
                existing = next(csv.reader(f), [])
            if existing != header:
                raise OptionError(
                    f"CurvatureMonitor(path={str(path)!r}) holds other columns ({', '.join(existing)}) than this "
                    f"monitor writes ({', '.join(header)}); give another path or remove the file"
                )
            write_header = False
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_header = True
        with path.open("a", newline="") as f:  # one complete row per check: a crash loses no earlier check
            writer = csv.writer(f)
            if write_header:
                writer.writerow(header)
            writer.writerow(["" if v is None else v for v in record.values()])

    @staticmethod
    def read_csv(path: str | Path) -> list[dict[str, Any]]:
        """The records of a monitor's CSV file, numbers parsed (ints, floats), empty cells as None."""

        def parse(text: str) -> Any:
            if text == "":
                return None
            for kind in (int, float):
                try:
                    return kind(text)
                except ValueError:
                    pass
            return text

        with Path(path).open(newline="") as f:
            return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def plot(self, path: str | Path, *, title: str = "curvature monitor") -> Path:
        """Save a PNG of the top eigenvalue (the trace if it was not measured), batch size and lr against
        epochs, one panel each (batch size and lr when the caller recorded them); returns the path.

        Raises:
            MissingDependencyError: without matplotlib, with the ``pip install`` line.
            EmptyDataError: before the first check.
        """
        try:
            import matplotlib
        except ImportError as e:
            raise MissingDependencyError(
                "CurvatureMonitor.plot needs matplotlib: pip install 'curvopt[plot]' (or pip install matplotlib)"
            ) from e
        if not self.history:
            raise EmptyDataError("CurvatureMonitor.plot: no check recorded yet; call step() or measure() first")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        first = self.history[0]
        key = "top_eigenvalue" if "top_eigenvalue" in first else "trace" if "trace" in first else None
        err = {"top_eigenvalue": "top_eigenvalue_residual", "trace": "trace_stderr"}.get(key)
        panels = [(c, c.replace("_", " ")) for c in (key, "batch_size", "lr")
                  if c is not None and any(r.get(c) is not None for r in self.history)]
        if not panels:
            raise EmptyDataError("CurvatureMonitor.plot: nothing to plot (no eigenvalue, trace, batch_size or lr)")
        fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.4 * len(panels)), sharex=True, squeeze=False)
        epochs = [r["epoch"] for r in self.history]
        for ax, (column, label) in zip(axes[:, 0], panels):
            ys = [math.nan if r.get(column) is None else float(r[column]) for r in self.history]
            if column == key:
                ax.errorbar(epochs, ys, yerr=[float(r.get(err, 0.0)) for r in self.history], marker=".",
                            capsize=2)
            else:
                ax.step(epochs, ys, where="post", marker=".")
                if all(y > 0 for y in ys if math.isfinite(y)):
                    ax.set_yscale("log", base=2 if column == "batch_size" else 10)
            ax.set_ylabel(label)
        axes[-1, 0].set_xlabel("epoch")
        return _save(plt, fig, axes[0, 0], title, path)
