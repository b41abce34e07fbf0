"""curvopt side by side with every installed peer: time (ratios, one process, interleaved rounds, medians)
and the error each answer reached against a float64 reverse-over-reverse reference.

Peers (each optional; a missing one's rows say "not installed"), installed without their dependencies so that
nothing pulls another torch or torchvision (curvlinops depends on backpack-for-pytorch, which pulls torchvision)::

    pip install --no-deps curvlinops-for-pytorch hessian-eigenthings pyhessian backpack-for-pytorch \\
        linear_operator einconv opt-einsum unfoldNd einops tqdm packaging

(all pure Python; numpy and scipy come with curvopt's ``dev`` extra; BackPACK imports without torchvision.)

kfac-pytorch is not on PyPI: put a checkout on the path at run time with ``--peer-path /tmp/kfac_pytorch``
(e.g. ``git clone https://github.com/gpauloski/kfac-pytorch /tmp/kfac_pytorch``); nothing of it enters
this repository.

Setup (issue 14's table): mnist1d, 4000 samples in batches of 1000; the MLP 40-256-256-10, the Conv1d CNN and
the small transformer of :mod:`curvopt.models`, each trained briefly with Adam (so that the spectrum is that of
a network in training) and evaluated in ``eval()`` mode. Tasks (``--tasks``):

* ``products``: one Hessian-vector and one GGN-vector product (uncached; curvopt also cached), and a 16-column
  Hessian matmat, against curvlinops (``HessianLinearOperator``/``GGNLinearOperator``), hessian-eigenthings
  and PyHessian. The error of each product decides the correctness column: a library whose product is off by
  more than 1e-3 (relative) on a model is WRONG there, and none of its speeds count on that model.
* ``eig1``/``eig5``: top-1/top-5 Hessian eigenvalues to relative error 1e-3. Each library first asks for
  1e-3 in its own terms (curvopt's and PyHessian's default ``tol=1e-3``, scipy ``eigsh(tol=1e-3)`` on
  curvlinops' operator; hessian-eigenthings' Lanczos has no tolerance, only ``max_iter``, default ``2k``) and is
  tightened along a ladder until it reaches 1e-3 at a fixed seed; the row names the setting used.
* ``trace``: trace to 2% RMSE. Every library's estimators (curvopt Hutchinson and Hutch++, PyHessian's
  Hutchinson, hessian-eigenthings' Hutchinson and Hutch++, curvlinops' Hutchinson, Hutch++ and XTrace) at equal
  budgets of products (12, 24, 48, 96, 192), the RMSE of the relative error over ``--trace-seeds`` seeds (10),
  the smallest budget reaching 2% RMSE, timed there with the library's own operator (interleaved rounds).
  Hutchinson's estimate is a mean of independent probes, so its mean squared error is exactly sigma^2 / n: its
  RMSE is measured at 48 products and the budget of 2% scaled from it (its time too). The
  seeds' estimates run each library's own estimator code and random draws on one shared cached curvopt
  Hessian (products equal to each library's own to ~1e-6, as the products row checks): ten seeds per budget
  would otherwise cost more than the rest of the benchmark. BackPACK's exact ``DiagHessian`` where it supports
  the model. Per layer: curvopt's ``per_block=True`` from the same probes, its time as a multiple of the whole
  trace's.
* ``density``: spectral density by SLQ at equal probes and Lanczos steps (curvopt, PyHessian -- through a
  ``torch.eig`` shim, removed in torch 2 --, hessian-eigenthings).
* ``kfac``: a K-FAC step at equal schedule (factors every 10 steps, inverses every 100, amortized over 100
  steps) against kfac-pytorch's ``KFACPreconditioner`` + SGD, and test accuracy on the digits CNN at an equal
  tuning budget (best of 3 learning rates each on a validation split, 4 epochs, batch 64).
* ``memory``: peak resident memory of each library's ``eig1`` in a fresh subprocess (Linux ``VmHWM``, reset
  before the task, minus the resident size before it; model and data already loaded, the library's operator
  built inside; torch's CPU allocations are invisible to tracemalloc); on CUDA ``torch.cuda.max_memory_allocated``.

References: float64 copies of the model and data; Hessian-vector and GGN-vector products by reverse-over-reverse
``torch.autograd.grad``. Where P is small (``--quick``) the dense Hessian of ``torch.autograd.functional.hessian``
on the flattened parameters gives eigenvalues and trace exactly; otherwise the eigenvalues come from scipy
``eigsh(tol=1e-10)`` on the float64 product, and the trace from BackPACK's exact float64 ``DiagHessian`` where
it supports the model (checked against the dense one in the tests) or else from float64 Hutch++ with
``--reference-probes`` probes (its standard error is printed). Not ``torch.func.hessian``: its forward-over-reverse
is wrong through ``nn.LayerNorm`` in torch 2.13.

Ratios are ours / peer, measured side by side in this process with ``--threads`` torch threads; absolute times
only with the hardware named. Output: a markdown table (feature rows and measured rows) printed and written with
the JSON to ``--out``.

Usage: ``python benchmarks/peers.py [--quick] [--threads 1] [--rounds 3] [--tasks products,eig1,...]
[--models mlp,cnn,transformer] [--peer-path /tmp/kfac_pytorch] [--out runs/peers]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import curvopt
from curvopt.data import Dataset, digits, mnist1d
from curvopt.models import cnn1d, digits_cnn, mlp, transformer

LIBS = ("curvopt", "curvlinops", "hessian_eigenthings", "pyhessian", "backpack", "kfac_pytorch")
LABELS = {"curvopt": "curvopt", "curvlinops": "curvlinops", "hessian_eigenthings": "hessian-eigenthings",
          "pyhessian": "PyHessian", "backpack": "BackPACK", "kfac_pytorch": "kfac-pytorch"}
MODULES = {"curvlinops": "curvlinops", "hessian_eigenthings": "hessian_eigenthings", "pyhessian": "pyhessian",
           "backpack": "backpack", "kfac_pytorch": "kfac.preconditioner"}
TASKS = ("products", "eig1", "eig5", "trace", "density", "kfac", "memory")
MODEL_LABELS = {"mlp": "MLP 40-256-256-10", "cnn": "CNN Conv1d", "transformer": "Transformer"}
EIG_TOL, TRACE_TOL, PRODUCT_TOL = 1e-3, 2e-2, 1e-3
KFAC_STEP = "K-FAC step (factors every 10, inverses every 100)"
KFAC_EQUAL = "K-FAC step, equal work (kfac-pytorch's layers only, same schedule)"
DENSE_MAX = 3000  # largest P whose dense float64 Hessian the reference builds

# What each library offers (not measured): the README's feature rows.
FEATURES = {
    "top-k Hessian eigenvalues": ("Lanczos, power", "via scipy eigsh", "Lanczos, power", "power", "-", "-"),
    "trace (whole)": ("Hutchinson, Hutch++", "Hutchinson, Hutch++, XTrace", "Hutchinson, Hutch++", "Hutchinson",
                      "exact diagonal", "-"),
    "trace per layer, one pass": ("yes", "-", "-", "-", "exact diagonal", "-"),
    "spectral density (SLQ)": ("yes", "yes (Lanczos)", "yes", "yes (needs torch.eig)", "-", "-"),
    "Hessian / GGN / Fisher products": ("all, cached or not", "all", "Hessian, GGN, EF", "Hessian", "-", "-"),
    "K-FAC optimizer": ("yes", "K-FAC operator", "-", "-", "KFAC quantities", "yes"),
    "Newton-type optimizers": ("NewtonMR, TR, ARC", "-", "-", "-", "-", "-"),
}


# ----------------------------------------------------------------------------------------------------------------
# peers and setup


def peer_status(peer_path: str | None) -> dict[str, str | None]:
    """``{lib: None}`` for an importable library, else why not (``"not installed"`` or the import error)."""
    if peer_path and peer_path not in sys.path:
        sys.path.insert(0, peer_path)
    status: dict[str, str | None] = {"curvopt": None}
    for lib, module in MODULES.items():
        try:
            importlib.import_module(module)
            status[lib] = None
        except ModuleNotFoundError as e:
            ours = e.name and module.startswith(e.name.split(".")[0])  # the peer itself, not one of its imports
            status[lib] = "not installed" if ours else f"import fails: {e}"
        except Exception as e:  # a peer broken on this torch: say how
            status[lib] = f"import fails: {type(e).__name__}: {e}"
    return status


def build_model(name: str, quick: bool) -> nn.Module:
    """The benchmark's network ``name`` (tiny widths with ``quick``, so the dense reference fits)."""
    if name == "mlp":
        return mlp((40, 8, 8, 10)) if quick else mlp()
    if name == "cnn":
        return cnn1d(channels=4) if quick else cnn1d()
    if name == "transformer":
        return transformer(d_model=8, heads=2, layers=1, dim_feedforward=8) if quick else transformer()
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_LABELS)}")


def prepared(name: str, quick: bool, data: Dataset, device: torch.device) -> nn.Module:
    """``build_model(name)`` trained briefly (Adam, fixed seed), in eval mode, on ``device``."""
    torch.manual_seed(0)
    model = build_model(name, quick)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for e in range(1 if quick else 2):
        for X, y in data.loader(batch_size=128, shuffle=True, seed=e):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    return model.eval().to(device)


def math_attention(model: nn.Module) -> Any:
    """For a model with attention: ``sdpa_kernel(MATH)`` and no fused encoder fast path (the fused CPU kernels
    have neither a double backward nor a forward-mode derivative, and the peers cannot pick another path);
    else a no-op context."""
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return _math_attention()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _math_attention() -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused encoder layer has no forward-mode derivative
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device,
                prior: dict[str, tuple[float, Any]] | None = None) -> dict[str, tuple[float, Any]]:
    """Median seconds of each ``fns[name]()`` over ``rounds`` rounds, the order rotated every round so that
    drift of the machine hits every library alike; with the last answer of each. ``prior``: a time and answer
    already measured per name (a calibration run), counted as one more round."""
    prior = prior or {}
    times: dict[str, list[float]] = {k: [prior[k][0]] if k in prior else [] for k in fns}
    answers: dict[str, Any] = {k: prior[k][1] for k in fns if k in prior}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            sync(device)
            t = time.perf_counter()
            answers[name] = fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {k: (statistics.median(v), answers[k]) for k, v in times.items()}


# ----------------------------------------------------------------------------------------------------------------
# the float64 reverse-over-reverse reference


class Reference:
    """Exact float64 curvature of ``loss_fn`` over ``batches`` (mean over all samples)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, batches: list, reference_probes: int) -> None:
        self.model = copy.deepcopy(model).double().eval()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = [(X.double(), y) for X, y in batches]
        self.N = sum(len(y) for _, y in batches)
        self.loss_fn = loss_fn
        self.P = sum(p.numel() for p in self.params)
        self.reference_probes = reference_probes
        self._dense: torch.Tensor | None = None
        self.trace_method = ""

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [c.view_as(p) for c, p in zip(v.double().split([p.numel() for p in self.params]), self.params)]

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` by reverse-over-reverse, ``v [P]`` -> ``[P]`` float64."""
        with math_attention(self.model):
            return self._hvp(v)

    def _hvp(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.P, dtype=torch.float64, device=v.device)
        vs = self._split(v)
        for X, y in self.batches:
            g = torch.autograd.grad(self.loss_fn(self.model(X), y), self.params, create_graph=True)
            hv = torch.autograd.grad(g, self.params, vs)
            out += torch.cat([h.reshape(-1) for h in hv]) * (len(y) / self.N)
        return out

    def ggnvp(self, v: torch.Tensor) -> torch.Tensor:
        """``J^T H_out J v``: ``J v`` as the derivative of a vector-Jacobian product (reverse-over-reverse)."""
        with math_attention(self.model):
            return self._ggnvp(v)

    def _ggnvp(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.P, dtype=torch.float64, device=v.device)
        vs = self._split(v)
        for X, y in self.batches:
            f = self.model(X)
            u = torch.zeros_like(f, requires_grad=True)
            vjp = torch.autograd.grad(f, self.params, u, create_graph=True)
            jv = torch.autograd.grad(vjp, u, vs)[0]
            fd = f.detach().requires_grad_(True)
            g = torch.autograd.grad(self.loss_fn(fd, y), fd, create_graph=True)[0]
            hjv = torch.autograd.grad(g, fd, jv)[0]
            jt = torch.autograd.grad(f, self.params, hjv)
            out += torch.cat([h.reshape(-1) for h in jt]) * (len(y) / self.N)
        return out

    def dense(self) -> torch.Tensor | None:
        """The dense Hessian by ``torch.autograd.functional.hessian`` on the flat parameters (small P only)."""
        if self.P > DENSE_MAX:
            return None
        if self._dense is None:
            shapes = [p.shape for p in self.params]
            flat0 = torch.cat([p.detach().reshape(-1) for p in self.params])

            def risk(flat: torch.Tensor) -> torch.Tensor:
                ps = dict(zip(self.names, [c.view(s) for c, s in zip(flat.split([s.numel() for s in shapes]),
                                                                      shapes)]))
                return sum(self.loss_fn(torch.func.functional_call(self.model, ps, (X,)), y) * (len(y) / self.N)
                           for X, y in self.batches)

            with math_attention(self.model):
                self._dense = torch.autograd.functional.hessian(risk, flat0)
        return self._dense

    def top(self, k: int) -> torch.Tensor:
        """The ``k`` largest eigenvalues, decreasing (of the dense Hessian where it was built, else by eigsh)."""
        if self._dense is not None:
            return torch.linalg.eigvalsh(self._dense).flip(0)[:k]
        import numpy as np
        from scipy.sparse.linalg import LinearOperator, eigsh

        dev = self.params[0].device
        A = LinearOperator((self.P, self.P), dtype=np.float64,
                           matvec=lambda x: self.hvp(torch.as_tensor(x.ravel(), device=dev)).cpu().numpy())
        vals = eigsh(A, k=k, which="LA", tol=1e-10, v0=np.ones(self.P), return_eigenvectors=False)
        return torch.as_tensor(sorted(vals, reverse=True), dtype=torch.float64)

    def diagonal(self) -> torch.Tensor | None:
        """The exact Hessian diagonal ``[P]``: BackPACK's ``DiagHessian`` where it supports the model (one pass),
        else the dense Hessian's where P is small, else None."""
        d = backpack_diag_hessian(self.model, self.loss_fn, self.batches)
        if d is not None:
            self.trace_method = "BackPACK DiagHessian, float64"
            return d
        H = self.dense()
        if H is not None:
            self.trace_method = "dense torch.autograd.functional.hessian"
            return H.diagonal()
        return None

    def trace(self, blocks: dict[str, list[str]]) -> tuple[float, float, dict[str, float]]:
        """``(trace, standard error, {block: trace})``: exact where a diagonal is known, else float64 Hutch++."""
        d = self.diagonal()
        index = {n: i for i, n in enumerate(self.names)}
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.numel())
        if d is None:  # Hutch++ (Meyer et al., 2021) with a third of the probes for the sketch
            self.trace_method = f"Hutch++ float64, {self.reference_probes} probes"
            g = torch.Generator().manual_seed(12345)
            m = self.reference_probes // 3
            dev = self.params[0].device

            def rad(k):
                return (2 * torch.randint(0, 2, (self.P, k), generator=g) - 1).double().to(dev)

            S = torch.stack([self.hvp(s) for s in rad(m).T], 1)
            Q = torch.linalg.qr(S).Q
            AQ = torch.stack([self.hvp(q) for q in Q.T], 1)
            G = rad(m)
            G = G - Q @ (Q.T @ G)
            AG = torch.stack([self.hvp(c) for c in G.T], 1)
            samples = (G * AG).sum(0)
            value = float((Q * AQ).sum() + samples.mean())
            stderr = float(samples.std() / math.sqrt(m))
            per = (Q * AQ).sum(1) + (G * AG).mean(1)  # per-coordinate contributions, for the blocks
        else:
            value, stderr, per = float(d.sum()), 0.0, d
        per_block = {}
        for name, pnames in blocks.items():
            per_block[name] = float(sum(per[offsets[index[n]]:offsets[index[n] + 1]].sum() for n in pnames))
        return value, stderr, per_block


def backpack_diag_hessian(model: nn.Module, loss_fn: nn.Module, batches: list) -> torch.Tensor | None:
    """BackPACK's exact Hessian diagonal (mean over samples) ``[P]``, or None where BackPACK lacks a layer.

    A leading ``nn.Unflatten`` (which BackPACK does not know) is applied to the inputs instead.
    """
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagHessian
    except Exception:
        return None
    body, pre = model, None
    if isinstance(model, nn.Sequential) and isinstance(model[0], nn.Unflatten):
        body, pre = model[1:], model[0]
    if not isinstance(body, nn.Sequential):
        return None
    try:
        ext = extend(copy.deepcopy(body))
        params = [p for p in ext.parameters() if p.requires_grad]
        lossf = extend(type(loss_fn)(reduction="mean"))
        N = sum(len(y) for _, y in batches)
        total = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        for X, y in batches:
            ext.zero_grad()
            with backpack(DiagHessian()):
                lossf(ext(pre(X) if pre is not None else X), y).backward()
            total += torch.cat([p.diag_h.reshape(-1) for p in params]) * (len(y) / N)
        return total
    except Exception:  # an unsupported layer: the caller falls back to Hutch++
        return None


# ----------------------------------------------------------------------------------------------------------------
# the libraries' operators


class Ctx:
    """One model's setting: model, data, the libraries available, the reference."""

    def __init__(self, name: str, model: nn.Module, batches: list, status: dict, args: Any,
                 device: torch.device) -> None:
        self.name, self.model, self.batches, self.status, self.args = name, model, batches, status, args
        self.device = device
        self.loss_fn = nn.CrossEntropyLoss()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.P = sum(p.numel() for p in self.params)
        self._ref: Reference | None = None
        self.wrong: dict[str, str] = {}  # lib -> why its answers do not count on this model
        self._ops: dict[str, Any] = {}

    @property
    def ref(self) -> Reference:
        """The float64 reference, built on first use (the memory child never builds it)."""
        if self._ref is None:
            self._ref = Reference(self.model, self.loss_fn, self.batches, self.args.reference_probes)
        return self._ref

    def peer(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` run under :func:`math_attention` (peers only: curvopt picks its own path)."""
        def run():
            with math_attention(self.model):
                return fn()
        return run

    def ok(self, lib: str) -> bool:
        return self.status.get(lib) is None

    def op(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._ops:
            self._ops[key] = make()
        return self._ops[key]

    def curvlinops(self, kind: str) -> Any:
        import curvlinops
        cls = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator}[kind]
        # built once outside the timings (its constructor checks determinism with a few products)
        return self.op(f"cl_{kind}", self.peer(lambda: cls(self.model, self.loss_fn, self.params, self.batches)))

    def he(self, kind: str) -> Any:
        import hessian_eigenthings as he
        if kind == "hessian":
            return self.op("he_h", lambda: he.HessianOperator(self.model, self.batches,
                                                              he.supervised_loss(self.loss_fn)))
        return self.op("he_g", lambda: he.GGNOperator(self.model, self.batches, he.supervised_forward,
                                                      he.supervised_loss_of_output(self.loss_fn)))

    def pyhessian(self) -> Any:
        from pyhessian import hessian
        return self.op("ph", lambda: hessian(self.model, self.loss_fn, dataloader=self.batches,
                                             cuda=self.device.type == "cuda"))

    def clear_grads(self) -> None:
        # PyHessian leaves .grad holding the double-backward graph: free it so it neither leaks nor slows others
        self.model.zero_grad(set_to_none=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().reshape(-1).to(b.device), b.double().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def flat_list(vs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in vs])


def failure(e: Exception) -> str:
    return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def working(fns: dict[str, Callable], task: str, ctx: Ctx, rows: list[dict]) -> dict[str, Callable]:
    """The callables of ``fns`` that run (once, a warm-up); a row saying how for each that fails."""
    good = {}
    for lib, fn in fns.items():
        try:
            fn()
            good[lib] = fn
        except Exception as e:  # a peer failing on this model
            rows.append(row(task, ctx.name, lib.split(" ")[0], status=failure(e)))
    return good


def row(task: str, model: str, lib: str, **kw: Any) -> dict:
    return dict(task=task, model=model, lib=lib, **kw)


def missing_rows(task: str, ctx: Ctx, libs: tuple[str, ...]) -> list[dict]:
    return [row(task, ctx.name, lib, status=ctx.status[lib]) for lib in libs if not ctx.ok(lib)]


# ----------------------------------------------------------------------------------------------------------------
# tasks


def task_products(ctx: Ctx) -> list[dict]:
    """Uncached (and curvopt cached) Hessian- and GGN-vector products and the 16-column Hessian matmat."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(ctx.P, generator=g).to(ctx.device)
    V = torch.randn(ctx.P, 16, generator=g).to(ctx.device)
    ref_h, ref_g = ctx.ref.hvp(v), ctx.ref.ggnvp(v)
    ref_mm = torch.stack([ctx.ref.hvp(c) for c in V.T], 1)
    m, b, lf = ctx.model, ctx.batches, ctx.loss_fn
    ours = {"hessian": curvopt.curvature("hessian", m, lf, b, cache=False),
            "ggn": curvopt.curvature("ggn", m, lf, b, cache=False),
            "hessian_cached": curvopt.curvature("hessian", m, lf, b, cache=True),
            "ggn_cached": curvopt.curvature("ggn", m, lf, b, cache=True)}
    ours["hessian_cached"] @ v  # the caches are built outside the timings (the rows say "cached")
    ours["ggn_cached"] @ v
    jobs: dict[str, dict[str, Callable[[], Any]]] = {
        "Hessian-vector": {"curvopt": lambda: ours["hessian"] @ v,
                           "curvopt (cached)": lambda: ours["hessian_cached"] @ v},
        "GGN-vector": {"curvopt": lambda: ours["ggn"] @ v, "curvopt (cached)": lambda: ours["ggn_cached"] @ v},
        "Hessian matmat, 16 columns": {"curvopt": lambda: ours["hessian"] @ V,
                                       "curvopt (cached)": lambda: ours["hessian_cached"] @ V},
    }
    rows: list[dict] = []
    if ctx.ok("curvlinops"):
        try:
            H = ctx.curvlinops("hessian")
            jobs["Hessian-vector"]["curvlinops"] = ctx.peer(lambda: H @ v)
            jobs["Hessian matmat, 16 columns"]["curvlinops"] = ctx.peer(lambda: H @ V)
        except Exception as e:
            rows.append(row("Hessian-vector", ctx.name, "curvlinops", status=failure(e)))
        try:
            G = ctx.curvlinops("ggn")
            jobs["GGN-vector"]["curvlinops"] = ctx.peer(lambda: G @ v)
        except Exception as e:
            rows.append(row("GGN-vector", ctx.name, "curvlinops", status=failure(e)))
    if ctx.ok("hessian_eigenthings"):
        he_h, he_g = ctx.he("hessian"), ctx.he("ggn")
        jobs["Hessian-vector"]["hessian_eigenthings"] = ctx.peer(lambda: he_h.matvec(v))
        jobs["GGN-vector"]["hessian_eigenthings"] = ctx.peer(lambda: he_g.matvec(v))
    if ctx.ok("pyhessian"):
        ph = ctx.pyhessian()
        vs = [c.view_as(p) for c, p in zip(v.split([p.numel() for p in ctx.params]), ctx.params)]

        def ph_hvp():
            out = flat_list(ph.dataloader_hv_product(vs)[1])
            ctx.clear_grads()
            return out
        jobs["Hessian-vector"]["pyhessian"] = ctx.peer(ph_hvp)
    refs = {"Hessian-vector": ref_h, "GGN-vector": ref_g, "Hessian matmat, 16 columns": ref_mm}
    for what, fns in jobs.items():
        for lib, (secs, ans) in interleaved(working(fns, what, ctx, rows), ctx.args.rounds, ctx.device).items():
            err = rel(ans, refs[what])
            base = lib.split(" ")[0]
            status = None
            if err > PRODUCT_TOL:
                status = "WRONG"
                ctx.wrong[base] = f"{what} off by {err:.1e}"
            rows.append(row(what, ctx.name, base, variant=lib, seconds=secs, error=err, status=status))
    rows += missing_rows("Hessian-vector", ctx, ("curvlinops", "hessian_eigenthings", "pyhessian"))
    return rows


def eig_ladders(ctx: Ctx, k: int) -> dict[str, list[tuple[str, Callable[[], torch.Tensor]]]]:
    """Per library, settings from the one asking for 1e-3 to tighter ones, each a callable giving the top-k."""
    m, b, lf = ctx.model, ctx.batches, ctx.loss_fn
    ladders: dict[str, list] = {}

    def ours(**kw):
        return lambda: curvopt.top_eigenvalues(curvopt.curvature("hessian", m, lf, b), k, seed=0, **kw).eigenvalues
    ladders["curvopt"] = [("defaults (tol=1e-3)", ours())] + [(f"tol={t:g}", ours(tol=t)) for t in (1e-4, 1e-5)]
    if ctx.ok("pyhessian"):
        ph = ctx.pyhessian()

        def pyh(**kw):
            def run():
                torch.manual_seed(0)
                vals = ph.eigenvalues(top_n=k, **kw)[0]
                ctx.clear_grads()
                return torch.tensor(vals)
            return ctx.peer(run)
        ladders["pyhessian"] = [("defaults (tol=1e-3, maxIter=100)", pyh())] + [
            (f"tol={t:g}", pyh(tol=t)) for t in (1e-4, 1e-5)] + [
            ("tol=1e-6, maxIter=1000", pyh(tol=1e-6, maxIter=1000))]
        if k > 1:  # deflated power iteration costs k runs per setting: two settings at most
            ladders["pyhessian"] = ladders["pyhessian"][:2]
    if ctx.ok("hessian_eigenthings"):
        import hessian_eigenthings as he
        op = ctx.he("hessian")

        def hel(**kw):
            return ctx.peer(lambda: he.lanczos(op, k=k, seed=0, **kw).eigenvalues)
        steps = [s for s in (10, 20, 40, 80) if 2 * k < s < ctx.P]
        ladders["hessian_eigenthings"] = [(f"Lanczos defaults (max_iter={2 * k})", hel())] + [
            (f"Lanczos max_iter={s}", hel(max_iter=s)) for s in steps]
    if ctx.ok("curvlinops"):
        import numpy as np
        from scipy.sparse.linalg import eigsh
        H = ctx.curvlinops("hessian")

        def cl(tol):
            def run():
                v0 = np.random.default_rng(0).standard_normal(ctx.P)
                return torch.as_tensor(eigsh(H.to_scipy(), k=k, which="LA", tol=tol, v0=v0,
                                             return_eigenvectors=False).copy())
            return ctx.peer(run)
        ladders["curvlinops"] = [(f"scipy eigsh tol={t:g}" + (" (default)" if t == 0 else ""), cl(t))
                                 for t in (1e-3, 1e-4, 1e-5, 0)]
    return ladders


def top_error(est: torch.Tensor, ref: torch.Tensor) -> float:
    est = est.double().flatten().cpu().sort(descending=True).values
    k = len(ref)
    if len(est) < k:
        return math.inf
    return float(((est[:k] - ref).abs() / ref.abs()).max())


def task_eig(ctx: Ctx, k: int) -> list[dict]:
    """Top-k eigenvalues to 1e-3: the setting of each library found first, then interleaved timings."""
    task = f"top-{k} eigenvalues"
    ref = ctx.ref.top(k)
    chosen: dict[str, tuple[str, Callable]] = {}
    calibration: dict[str, tuple[float, Any]] = {}
    rows: list[dict] = []
    for lib, ladder in eig_ladders(ctx, k).items():
        if lib in ctx.wrong:  # its products are wrong here: nothing it computes from them counts
            rows.append(row(task, ctx.name, lib, status=wrong_status(ctx, lib)))
            continue
        tried = []
        for setting, fn in ladder:
            try:
                sync(ctx.device)
                t = time.perf_counter()
                ans = fn()
                sync(ctx.device)
                secs = time.perf_counter() - t
                err = top_error(ans, ref)
            except Exception as e:  # a peer failing on this model: its row says how
                tried.append((setting, failure(e)))
                break
            tried.append((setting, err))
            if err <= EIG_TOL:
                chosen[lib] = (setting, fn)
                calibration[lib] = (secs, ans)  # counts as the first round
                break
        if lib not in chosen:
            last = tried[-1][1] if tried else None
            status = last if isinstance(last, str) else f"not reached (err {last:.1e} at {tried[-1][0]})"
            rows.append(row(task, ctx.name, lib, status=status, tried=[(s, e) for s, e in tried]))
        else:
            ctx._ops[f"eig{k}_setting_{lib}"] = chosen[lib][0]
            rows.append(row(task, ctx.name, lib, setting=chosen[lib][0], default="default" in chosen[lib][0],
                            tried=[(s, e) for s, e in tried]))
    timed = interleaved({lib: fn for lib, (_, fn) in chosen.items()}, ctx.args.rounds - 1, ctx.device, calibration)
    for r in rows:
        if r["lib"] in timed:
            secs, ans = timed[r["lib"]]
            r.update(seconds=secs, error=top_error(ans, ref), status=wrong_status(ctx, r["lib"]))
    return rows + missing_rows(task, ctx, ("curvlinops", "hessian_eigenthings", "pyhessian"))


def wrong_status(ctx: Ctx, lib: str) -> str | None:
    return f"WRONG ({ctx.wrong[lib]})" if lib in ctx.wrong else None


class _SharedProducts:
    """Products of one cached curvopt Hessian, in the shapes each library's estimator asks for. The error
    statistics of every library's trace estimator run on it: the estimators' own code and random draws,
    with products equal to the library's own to ~1e-6 (the products row checks each library's), at the
    cost of a cached product, so that ten seeds per budget fit in the run. Times come from each
    library's own operator (see :func:`task_trace`)."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.op = curvopt.curvature("hessian", ctx.model, ctx.loss_fn, ctx.batches, cache=True)
        self.shape, self.device, self.dtype = tuple(self.op.shape), self.op.device, self.op.dtype

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:  # curvlinops' estimators: A @ [P] or [P, k]
        return self.op @ V

    def flat(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:  # PyHessian's dataloader_hv_product
        out = self.op @ flat_list(vs)
        return [c.view_as(p) for c, p in zip(out.split([p.numel() for p in self.ctx.params]), self.ctx.params)]

    def he(self) -> Any:
        import hessian_eigenthings as he
        shared = self

        class Op(he.CurvatureOperator):
            size = property(lambda self: shared.shape[0])
            device = property(lambda self: shared.device)
            dtype = property(lambda self: shared.dtype)

            def matvec(self, v: torch.Tensor) -> torch.Tensor:
                return shared.op @ v
        return Op()


def trace_estimators(ctx: Ctx) -> dict[str, tuple[str, Callable[[Any, int, int], float]]]:
    """``{key: (lib, estimate(products, n, seed))}``: each library's trace estimators, ``products`` either
    the library's own operator (``None``) or a :class:`_SharedProducts`."""
    m, b, lf = ctx.model, ctx.batches, ctx.loss_fn
    out: dict[str, tuple[str, Callable]] = {}
    for method in ("hutchinson", "hutchpp"):
        def ours(shared, n, seed, method=method):
            op = shared.op if shared is not None else curvopt.curvature("hessian", m, lf, b)
            return curvopt.trace(op, n, method=method, seed=seed).value
        out[f"curvopt {method}"] = ("curvopt", ours)
    if ctx.ok("pyhessian"):
        ph = ctx.pyhessian()

        def pyh(shared, n, seed):
            own = ph.dataloader_hv_product
            if shared is not None:  # an instance attribute shadows the method for this call only
                ph.dataloader_hv_product = lambda vs: (None, shared.flat(vs))
            try:
                torch.manual_seed(seed)
                with math_attention(m):
                    return float(sum(ph.trace(maxIter=n, tol=0.0)) / n)
            finally:
                if shared is not None:
                    del ph.dataloader_hv_product
                    assert ph.dataloader_hv_product == own
                ctx.clear_grads()
        out["pyhessian hutchinson"] = ("pyhessian", pyh)
    if ctx.ok("hessian_eigenthings"):
        import hessian_eigenthings as he

        def he_pp(shared, n, seed):
            op = shared.he() if shared is not None else ctx.he("hessian")
            with math_attention(m):
                return float(he.hutch_plus_plus(op, num_matvecs=n, seed=seed).estimate)

        def he_h(shared, n, seed):
            op = shared.he() if shared is not None else ctx.he("hessian")
            with math_attention(m):
                return float(he.hutchinson(op, num_samples=n, seed=seed).estimate)
        out["hessian_eigenthings hutchpp"] = ("hessian_eigenthings", he_pp)
        out["hessian_eigenthings hutchinson"] = ("hessian_eigenthings", he_h)
    if ctx.ok("curvlinops"):
        import curvlinops
        for name, fn in (("hutchinson", curvlinops.hutchinson_trace), ("hutchpp", curvlinops.hutchpp_trace),
                         ("xtrace", curvlinops.xtrace)):
            def cl(shared, n, seed, fn=fn):
                A = shared if shared is not None else ctx.curvlinops("hessian")
                torch.manual_seed(seed)
                with math_attention(m):
                    return float(fn(A, n))
            out[f"curvlinops {name}"] = ("curvlinops", cl)
    return out


TRACE_TASK = "trace to 2% RMSE (each library's fastest estimator)"


def trace_task(key: str) -> str:
    """The task of one estimator's row, e.g. ``"trace to 2% RMSE: hutchpp"``."""
    return f"trace to 2% RMSE: {key.split(' ')[1]}"


#: Products of the one budget at which each Hutchinson estimator's RMSE is measured.
HUTCHINSON_BUDGET, HUTCHINSON_BUDGET_QUICK = 48, 24


def trace_budgets(quick: bool) -> list[int]:
    """Product budgets of the Hutch++/XTrace ladder (multiples of 3 for Hutch++, of 6 for XTrace, as the peers
    require); the ladder stops at the first budget of 2% RMSE."""
    return [12, 24, 48, 96, 192]


def task_trace(ctx: Ctx) -> list[dict]:
    """Trace to 2% RMSE: each library's estimators at equal budgets of products, RMSE of the relative error
    over ``--trace-seeds`` seeds, the smallest budget of the ladder reaching 2%, timed there with the library's
    own operator (interleaved rounds); per-layer traces."""
    op = curvopt.curvature("hessian", ctx.model, ctx.loss_fn, ctx.batches)
    blocks = {blk.name: list(blk.param_names) for blk in op.blocks}
    ref, ref_err, ref_blocks = ctx.ref.trace(blocks)
    rows: list[dict] = []
    seeds = range(ctx.args.trace_seeds)
    shared = _SharedProducts(ctx)
    shared.op @ torch.zeros(ctx.P, device=ctx.device)  # the cache is built once
    estimators = trace_estimators(ctx)
    found: dict[str, tuple[int, float]] = {}  # key -> (budget, rmse)
    tried_rmse: dict[str, float] = {}  # Hutchinson: the RMSE measured at its one budget
    for key, (lib, est) in list(estimators.items()):
        if lib in ctx.wrong:
            rows.append(row(trace_task(key), ctx.name, lib, status=wrong_status(ctx, lib)))
            del estimators[key]
            continue
        tried = []
        try:
            if key.endswith("hutchinson"):
                # a mean of independent probes: its mean squared error is exactly sigma^2 / n, so one budget's
                # RMSE over the seeds gives the budget of 2% RMSE (rounded up to whole probes) without a ladder
                n0 = HUTCHINSON_BUDGET_QUICK if ctx.args.quick else HUTCHINSON_BUDGET
                errs = [est(shared, n0, s) / ref - 1 for s in seeds]
                rmse0 = math.sqrt(sum(e * e for e in errs) / len(errs))
                n = max(1, math.ceil(n0 * (rmse0 / TRACE_TOL) ** 2))
                tried.append((n0, rmse0))
                tried_rmse[key] = rmse0
                found[key] = (n, rmse0 * math.sqrt(n0 / n))
            for n in [] if key in found else trace_budgets(ctx.args.quick):
                errs = [est(shared, n, s) / ref - 1 for s in seeds]
                rmse = math.sqrt(sum(e * e for e in errs) / len(errs))
                tried.append((n, rmse))
                if rmse <= TRACE_TOL:
                    found[key] = (n, rmse)
                    break
        except Exception as e:  # a peer failing on this model
            rows.append(row(trace_task(key), ctx.name, lib, status=failure(e)))
            del estimators[key]
            continue
        if key not in found:
            n, rmse = tried[-1]
            # RMSE falls as 1 / sqrt(products) for Hutchinson (faster for Hutch++): an upper bound on the need
            rows.append(row(trace_task(key), ctx.name, lib, tried=tried,
                            status=f"not reached: RMSE {rmse:.1%} at {n} products "
                                   f"(~{n * (rmse / TRACE_TOL) ** 2:.0f} needed at 1/sqrt(n))"))
    budget = {key: (HUTCHINSON_BUDGET_QUICK if ctx.args.quick else HUTCHINSON_BUDGET)
              if key.endswith("hutchinson") else n for key, (n, _) in found.items()}
    timed = interleaved({key: (lambda est=estimators[key][1], n=budget[key]: est(None, n, 0))
                         for key in found}, ctx.args.rounds, ctx.device)
    fastest: dict[str, dict] = {}
    for key, (n, rmse) in found.items():
        lib = estimators[key][0]
        secs, setting = timed[key][0], f"{n} products"
        if key.endswith("hutchinson"):  # timed at the measured budget, scaled to the budget of 2% RMSE
            n0 = HUTCHINSON_BUDGET_QUICK if ctx.args.quick else HUTCHINSON_BUDGET
            secs, setting = secs * n / n0, f"{n} products (RMSE {tried_rmse[key]:.1%} at {n0}, x sqrt({n0}/{n}))"
        r = row(trace_task(key), ctx.name, lib, setting=setting, seconds=secs, error=rmse,
                seconds_per_product=secs / n, status=wrong_status(ctx, lib))
        rows.append(r)
        if lib not in fastest or secs < fastest[lib]["seconds"]:
            fastest[lib] = dict(r, task=TRACE_TASK, setting=f"{key.split(' ')[1]}, {n} products")
    rows += list(fastest.values())
    for lib in {lib for lib, _ in estimators.values()} - set(fastest):
        rows.append(row(TRACE_TASK, ctx.name, lib, status=f"not reached within {trace_budgets(ctx.args.quick)[-1]}"
                        " products"))
    # per layer: curvopt's per_block against its whole trace, same probes; BackPACK's exact diagonal
    n = found.get("curvopt hutchpp", (trace_budgets(ctx.args.quick)[-1],))[0]
    fns = {"whole": lambda: curvopt.trace(op, n, seed=0),
           "per_block": lambda: curvopt.trace(op, n, per_block=True, seed=0)}
    timed = interleaved(fns, ctx.args.rounds, ctx.device)
    est = timed["per_block"][1]
    block_err = sum(abs(est.blocks[k][0] - ref_blocks[k]) for k in ref_blocks) / abs(ref)
    rows.append(row("trace per layer", ctx.name, "curvopt", setting=f"per_block=True, {n} products",
                    seconds=timed["per_block"][0], per_block_ratio=timed["per_block"][0] / timed["whole"][0],
                    error=block_err, status=wrong_status(ctx, "curvopt")))
    if ctx.ok("backpack"):
        b64 = [(X, y) for X, y in ctx.batches]
        secs, d = interleaved({"backpack": lambda: backpack_diag_hessian(ctx.model, ctx.loss_fn, b64)},
                              ctx.args.rounds, ctx.device)["backpack"]
        if d is None:
            rows.append(row(TRACE_TASK, ctx.name, "backpack", status="unsupported (a layer BackPACK lacks)"))
        else:
            rows.append(row(TRACE_TASK, ctx.name, "backpack", setting="exact DiagHessian (also per layer)",
                            seconds=secs, error=abs(float(d.sum()) / ref - 1)))
    else:
        rows.append(row(TRACE_TASK, ctx.name, "backpack", status=ctx.status["backpack"]))
    for r in rows:
        r.update(reference=ref, reference_stderr=ref_err, reference_method=ctx.ref.trace_method)
    return rows + missing_rows(TRACE_TASK, ctx, ("curvlinops", "hessian_eigenthings", "pyhessian"))


def _torch_eig_shim(T: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.eig`` as PyHessian calls it (removed in torch 2): ``(values [n, 2], vectors)`` of a symmetric T."""
    vals, vecs = torch.linalg.eigh(T)
    return torch.stack([vals, torch.zeros_like(vals)], 1), vecs


def task_density(ctx: Ctx) -> list[dict]:
    """SLQ spectral density at equal probes and Lanczos steps; error: top node against the top eigenvalue."""
    probes, steps = (1, 5) if ctx.args.quick else (2, 30)
    top = float(ctx.ref.top(1)[0])
    setting = f"{probes} probes x {steps} steps"
    fns: dict[str, Callable] = {}
    extract: dict[str, Callable[[Any], float]] = {}

    from curvopt.linalg import slq_nodes

    def ours_top() -> float:  # the same seed's nodes as the public call, outside its timing
        op = curvopt.curvature("hessian", ctx.model, ctx.loss_fn, ctx.batches)
        nodes, _ = slq_nodes(op, probes=probes, steps=steps, generator=torch.Generator().manual_seed(0))
        return float(nodes.max())

    fns["curvopt"] = lambda: curvopt.spectral_density(curvopt.curvature("hessian", ctx.model, ctx.loss_fn,
                                                                        ctx.batches), probes=probes, steps=steps)
    extract["curvopt"] = lambda ans: ours_top()
    rows: list[dict] = []
    if ctx.ok("pyhessian"):
        ph = ctx.pyhessian()

        def pyh():
            had = hasattr(torch, "eig")
            old = getattr(torch, "eig", None)
            torch.eig = _torch_eig_shim
            try:
                torch.manual_seed(0)
                out = ph.density(iter=steps, n_v=probes)
            finally:
                if had:
                    torch.eig = old
                else:
                    del torch.eig
            ctx.clear_grads()
            return out
        fns["pyhessian"] = ctx.peer(pyh)
        extract["pyhessian"] = lambda ans: max(max(e) for e in ans[0])
    if ctx.ok("hessian_eigenthings"):
        import hessian_eigenthings as he
        op = ctx.he("hessian")
        fns["hessian_eigenthings"] = ctx.peer(lambda: he.spectral_density(op, num_runs=probes, lanczos_steps=steps,
                                                                          seed=0))
        extract["hessian_eigenthings"] = lambda ans: float(torch.as_tensor(ans.raw_eigenvalues).max())
    for lib in [lib for lib in fns if lib in ctx.wrong]:
        rows.append(row("spectral density", ctx.name, lib, status=wrong_status(ctx, lib)))
        del fns[lib]
    for lib, (secs, ans) in interleaved(working(fns, "spectral density", ctx, rows), ctx.args.rounds,
                                        ctx.device).items():
        try:
            err = abs(extract[lib](ans) / top - 1)
        except Exception:
            err = None
        shim = " (torch.eig shim)" if lib == "pyhessian" else ""
        rows.append(row("spectral density", ctx.name, lib, setting=setting + shim,
                        seconds=secs, error=err, status=wrong_status(ctx, lib)))
    rows.append(row("spectral density", ctx.name, "curvlinops", status="has one (Lanczos on scipy), not timed"
                    if ctx.ok("curvlinops") else ctx.status["curvlinops"]))
    return rows + missing_rows("spectral density", ctx, ("hessian_eigenthings", "pyhessian"))


# ----------------------------------------------------------------------------------------------------------------
# K-FAC


def kfac_schedule_kwargs() -> dict[str, Any] | None:
    """curvopt.KFAC's schedule options (names read from its signature): factors every 10, inverses every 100."""
    names = inspect.signature(curvopt.KFAC.__init__).parameters
    if "factor_every" in names and "inverse_every" in names:
        return dict(factor_every=10, inverse_every=100)
    return None


#: The layer types kfac-pytorch preconditions (its ``kfac.layers.register.KNOWN_MODULES``: linear, conv2d); the
#: parameters of every other layer it leaves to the plain optimizer.
KFAC_PYTORCH_LAYERS = (nn.Linear, nn.Conv2d)


def kfac_pytorch_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(parameters of the layers kfac-pytorch preconditions, the others)``."""
    theirs = {id(p) for m in model.modules() if isinstance(m, KFAC_PYTORCH_LAYERS) for p in m.parameters()}
    params = list(model.parameters())
    return [p for p in params if id(p) in theirs], [p for p in params if id(p) not in theirs]


def make_kfac(lib: str, model: nn.Module, lr: float,
              equal_work: bool = False) -> tuple[Callable[[torch.Tensor, torch.Tensor], float], Any]:
    """One training step ``step(X, y) -> loss`` of ``lib``'s K-FAC at the equal schedule, and its closer.

    ``equal_work`` (curvopt): K-FAC on the parameters kfac-pytorch preconditions only, the others with
    kfac-pytorch's plain SGD (momentum 0.9), so that both do the same work on a model with layers it lacks."""
    if lib == "curvopt":
        kfac_params, rest = kfac_pytorch_split(model) if equal_work else (list(model.parameters()), [])
        opt = curvopt.KFAC(kfac_params, lr=lr, **kfac_schedule_kwargs())
        plain = torch.optim.SGD(rest, lr=lr, momentum=0.9) if rest else None

        def step(X, y):
            opt.zero_grad()
            if plain is not None:
                plain.zero_grad()
            loss = nn.functional.cross_entropy(model(X), y)
            loss.backward()
            opt.step()
            if plain is not None:
                plain.step()
            return loss
        return step, opt
    from kfac.preconditioner import KFACPreconditioner
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pre = KFACPreconditioner(model, factor_update_steps=10, inv_update_steps=100,
                             lr=lambda _: opt.param_groups[0]["lr"])

    def step(X, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        pre.step()
        opt.step()
        return loss
    return step, None


def kfac_step_times(status: dict, args: Any, device: torch.device) -> list[dict]:
    """Seconds per step, amortized over 100 steps (10 factor updates, 1 inversion), interleaved rounds."""
    rows: list[dict] = []
    libs = ["curvopt"] + (["kfac_pytorch"] if status["kfac_pytorch"] is None else [])
    if kfac_schedule_kwargs() is None:
        return [row(KFAC_STEP, "-", "curvopt", status="curvopt.KFAC has no factor_every/inverse_every")]
    steps = 10 if args.quick else 100
    cases = [("digits CNN (batch 64)", lambda: digits_cnn(channels=4, hidden=8) if args.quick else digits_cnn(),
              digits(), 64)]
    mn = mnist1d()
    for name in args.models:
        if name != "transformer":  # kfac-pytorch preconditions Linear and Conv2d only (no Conv1d, no attention)
            cases.append((f"{MODEL_LABELS[name]} (batch 128)", lambda name=name: build_model(name, args.quick),
                          mn, 128))
    for label, builder, data, bs in cases:
        batches = [(X.to(device), y.to(device)) for X, y in data.batches(bs)][:max(1, len(data.y_train) // bs)]
        runners = {}
        # where kfac-pytorch leaves layers to plain SGD (a Conv1d), curvopt does more work: also time curvopt
        # on kfac-pytorch's layers only, the rest with the same SGD
        unequal = bool(kfac_pytorch_split(builder())[1])
        variants = libs + (["curvopt (equal work)"] if unequal and "kfac_pytorch" in libs else [])
        for lib in variants:
            torch.manual_seed(0)
            model = builder().to(device)
            try:
                step, _ = make_kfac(lib.split(" ")[0], model, 0.01, equal_work=lib.endswith("(equal work)"))
                for i in range(steps):  # one window of warm-up (curvopt inverts more often in its first)
                    step(*batches[i % len(batches)])
            except Exception as e:
                rows.append(row(KFAC_STEP, label, lib, status=failure(e)))
                continue

            def run(step=step):
                for i in range(steps):
                    X, y = batches[i % len(batches)]
                    step(X, y)
            runners[lib] = run
        timed = interleaved(runners, args.rounds, device)
        for lib, (secs, _) in timed.items():
            if lib == "curvopt (equal work)":
                continue
            note = ("full work: it preconditions the Linear and Conv2d layers only, plain SGD for the rest"
                    if lib == "kfac_pytorch" and unequal else None)
            rows.append(row(KFAC_STEP, label, lib, seconds=secs / steps, setting=note))
            if lib == "kfac_pytorch" and "curvopt (equal work)" in runners:  # the equal-work pair: its own task
                rows.append(row(KFAC_EQUAL, label, "kfac_pytorch", seconds=secs / steps))
                rows.append(row(KFAC_EQUAL, label, "curvopt", seconds=timed["curvopt (equal work)"][0] / steps,
                                setting="K-FAC on kfac-pytorch's layers, SGD for the rest"))
        if status["kfac_pytorch"] is not None:
            rows.append(row(KFAC_STEP, label, "kfac_pytorch", status=status["kfac_pytorch"]))
    return rows


def kfac_accuracy(status: dict, args: Any, device: torch.device) -> list[dict]:
    """Digits CNN, 4 epochs, batch 64: best of 3 learning rates each on a validation split, its test accuracy."""
    full = digits()
    n_val = len(full.y_train) // 8
    X, y = full.X_train[n_val:].to(device), full.y_train[n_val:].to(device)
    Xv, yv = full.X_train[:n_val].to(device), full.y_train[:n_val].to(device)
    Xt, yt = full.X_test.to(device), full.y_test.to(device)
    epochs = 1 if args.quick else 4
    lrs = (0.01, 0.03, 0.1)
    rows = []
    for lib in ("curvopt", "kfac_pytorch"):
        if status[lib] is not None:
            rows.append(row("K-FAC accuracy", "digits CNN", lib, status=status[lib]))
            continue
        best = None
        for lr in lrs:
            torch.manual_seed(0)
            model = (digits_cnn(channels=4, hidden=8) if args.quick else digits_cnn()).to(device)
            step, _ = make_kfac(lib, model, lr)
            ok = True
            for e in range(epochs):
                g = torch.Generator().manual_seed(e)
                perm = torch.randperm(len(y), generator=g).to(device)
                model.train()
                for i in range(0, len(y), 64):
                    loss = step(X[perm[i:i + 64]], y[perm[i:i + 64]])
                    if not torch.isfinite(loss):
                        ok = False
                        break
                if not ok:
                    break
            model.eval()
            with torch.no_grad():
                val = float((model(Xv).argmax(1) == yv).float().mean()) if ok else 0.0
                test = float((model(Xt).argmax(1) == yt).float().mean()) if ok else 0.0
            if best is None or val > best[1]:
                best = (lr, val, test)
        rows.append(row("K-FAC accuracy", "digits CNN", lib, setting=f"best lr of {list(lrs)}: {best[0]}",
                        accuracy=best[2], val_accuracy=best[1]))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# memory, in fresh subprocesses


def child_memory(argv: list[str]) -> None:
    """Subprocess entry: run one library's ``eig1`` once and print the peak-memory delta as JSON."""
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    if spec["peer_path"]:
        sys.path.insert(0, spec["peer_path"])
    # only the library measured is imported: the others' imports would count in nobody's peak but cost seconds
    status = {lib: None if lib in ("curvopt", spec["lib"]) else "not loaded" for lib in LIBS}
    device = torch.device(spec["device"])
    args = argparse.Namespace(quick=spec["quick"], rounds=1, reference_probes=3)
    saved = torch.load(spec["state"])
    model = build_model(spec["model"], spec["quick"])
    model.load_state_dict(saved["model"])
    model = model.eval().to(device)
    batches = [(X.to(device), y.to(device)) for X, y in saved["batches"]]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = resident_kib("VmRSS")
    # the library's operator is built inside the measured region (curvlinops' constructor runs products)
    ctx = Ctx(spec["model"], model, batches, status, args, device)
    dict(eig_ladders(ctx, 1)[spec["lib"]])[spec["setting"]]()
    if device.type == "cuda":
        mb = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:  # the peak resident size since the reset, minus the resident size before (both KiB on Linux)
        mb = (resident_kib("VmHWM") - before) / 1024
    print(json.dumps({"mb": mb}))


def reset_peak_rss() -> None:
    """Reset the peak resident size (``VmHWM``) to the current one (Linux >= 4.0): imports and loading must not
    count in the task's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def resident_kib(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak since the last reset) in KiB from ``/proc/self/status``, else
    ``ru_maxrss`` (the peak of the whole process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def task_memory(ctx: Ctx, settings: dict[str, str], args: Any) -> list[dict]:
    """Peak memory of each library's top eigenvalue (at the setting ``eig1`` chose) in a fresh subprocess."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state.pt")
        torch.save({"model": {k: v.cpu() for k, v in ctx.model.state_dict().items()},
                    "batches": [(X.cpu(), y.cpu()) for X, y in ctx.batches]}, state)
        for lib, setting in settings.items():
            spec = dict(threads=args.threads, peer_path=args.peer_path, device=str(ctx.device), quick=args.quick,
                        model=ctx.name, state=state, lib=lib, setting=setting)
            proc = subprocess.run([sys.executable, __file__, "--_memory-child", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=900)
            try:
                mb = json.loads(proc.stdout.strip().splitlines()[-1])["mb"]
                rows.append(row("peak memory, top eigenvalue", ctx.name, lib, setting=setting, megabytes=mb))
            except (IndexError, ValueError, KeyError):
                rows.append(row("peak memory, top eigenvalue", ctx.name, lib,
                                status=f"fails: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# tables


def cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r.get("status"):
        s = r["status"]
        if r.get("seconds") is not None and s.startswith("WRONG"):
            return f"WRONG (err {r['error']:.0e})"
        return s
    parts = []
    if r.get("seconds") is not None:
        parts.append(f"{r['seconds']:.3g} s")
    if r.get("megabytes") is not None:
        parts.append(f"{r['megabytes']:.0f} MB")
    if r.get("accuracy") is not None:
        parts.append(f"acc {r['accuracy']:.3f}")
    if r.get("error") is not None:
        parts.append(f"err {r['error']:.0e}")
    if r.get("per_block_ratio") is not None:
        parts.append(f"{r['per_block_ratio']:.2f}x whole")
    if r.get("setting") and not r.get("default"):  # eig rows at a library's defaults need not say so
        parts.append(r["setting"])
    return ", ".join(parts)


def counted(r: dict) -> bool:
    return not r.get("status") and r.get("seconds") is not None


def add_ratios(rows: list[dict]) -> None:
    """``ratio`` (ours / peer seconds, or MB) on each peer row where both answers count."""
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["model"]), []).append(r)
    for group in by.values():
        ours = [r for r in group if r["lib"] == "curvopt" and r.get("variant", "curvopt") == "curvopt"]
        if not ours:
            continue
        o = ours[0]
        for r in group:
            if r["lib"] == "curvopt":
                continue
            if counted(o) and counted(r):
                r["ratio"] = o["seconds"] / r["seconds"]
            elif o.get("megabytes") is not None and r.get("megabytes"):
                r["ratio"] = o["megabytes"] / r["megabytes"]


def markdown(rows: list[dict], status: dict, header: str) -> str:
    libs = list(LIBS)
    lines = [header, "", "| feature | " + " | ".join(LABELS[lib] for lib in libs) + " |",
             "|---|" + "---|" * len(libs)]
    for feat, vals in FEATURES.items():
        lines.append(f"| {feat} | " + " | ".join(v if status[lib] is None else f"{v} (not installed)" if v != "-"
                                                 else "-" for lib, v in zip(libs, vals)) + " |")
    lines += ["", "| task | model | " + " | ".join(LABELS[lib] for lib in libs) + " | ours / fastest right peer |",
              "|---|---|" + "---|" * (len(libs) + 1)]
    groups: dict[tuple, dict] = {}
    for r in rows:
        g = groups.setdefault((r["task"], r["model"]), {})
        key = r["lib"] if r.get("variant", r["lib"]) == r["lib"] or r.get("variant") == "curvopt" else r["variant"]
        g[key] = r
    for (task, model), g in groups.items():
        cells = []
        for lib in libs:
            c = cell(g.get(lib))
            if lib == "curvopt" and "curvopt (cached)" in g:
                c += f"; cached {cell(g['curvopt (cached)'])}"
            if g.get(lib, {}).get("ratio") is not None:
                c += f" (ours {g[lib]['ratio']:.2f}x)"
            cells.append(c)
        ratios = [g[lib]["ratio"] for lib in libs if g.get(lib, {}).get("ratio") is not None]
        # ours / the fastest right peer = the largest of our ratios
        best = f"{max(ratios):.2f}x" if ratios else ""
        lines.append(f"| {task} | {MODEL_LABELS.get(model, model)} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Run the chosen tasks and print the tables; returns ``{"status", "rows", "setup"}`` (also as JSON)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_memory-child"]:
        child_memory(argv[1:])
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and data (seconds), for smoke tests")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--models", default="mlp,cnn,transformer",
                        help="comma-separated subset of mlp,cnn,transformer")
    parser.add_argument("--peer-path", default=os.environ.get("KFAC_PYTORCH_PATH"),
                        help="a directory holding kfac-pytorch's package 'kfac' (or env KFAC_PYTORCH_PATH)")
    parser.add_argument("--transformer-samples", type=int, default=1000,
                        help="samples for the transformer (its products cost several times the MLP's)")
    parser.add_argument("--reference-probes", type=int, default=90,
                        help="float64 Hutch++ probes of the trace reference where no exact diagonal is known")
    parser.add_argument("--trace-seeds", type=int, default=10,
                        help="seeds per budget of the trace task's RMSE (--quick: at most 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None, help="directory for peers.json and peers.md")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.models = [m for m in args.models.split(",") if m]
    for t in args.tasks:
        if t not in TASKS:
            parser.error(f"unknown task {t!r}; valid: {', '.join(TASKS)}")
    for m in args.models:
        if m not in MODEL_LABELS:
            parser.error(f"unknown model {m!r}; valid: {', '.join(MODEL_LABELS)}")
    if args.quick:
        args.rounds = min(args.rounds, 1)
        args.reference_probes = min(args.reference_probes, 30)
        args.trace_seeds = min(args.trace_seeds, 3)
    device = torch.device(args.device)
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(before)


def _run(args: Any, device: torch.device) -> dict:
    status = peer_status(args.peer_path)
    n, bs = (200, 100) if args.quick else (4000, 1000)
    data = mnist1d()
    batches = [(X.to(device), y.to(device)) for X, y in data.batches(bs)][: n // bs]
    versions = {lib: (getattr(importlib.import_module(MODULES.get(lib, lib).split(".")[0]), "__version__", "?")
                      if status[lib] is None else None) for lib in LIBS}
    hw = cpu_name()
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    header = (f"# curvopt vs peers: torch {torch.__version__}, {hw}, {torch.get_num_threads()} threads, mnist1d "
              f"{n} samples in batches of {bs}"
              + ("" if args.quick or "transformer" not in args.models else
                 f" (the transformer: the first {max(1, args.transformer_samples // bs) * bs})")
              + f", median of {args.rounds} interleaved rounds")
    print(header)
    print("libraries: " + ", ".join(f"{LABELS[lib]} {versions[lib] or status[lib]}" for lib in LIBS))
    rows: list[dict] = []
    model_tasks = [t for t in args.tasks if t not in ("kfac",)]
    for name in args.models if model_tasks else []:
        t0 = time.perf_counter()
        model = prepared(name, args.quick, data, device)
        some = batches if args.quick or name != "transformer" else batches[:max(1, args.transformer_samples // bs)]
        ctx = Ctx(name, model, some, status, args, device)
        print(f"\n## {MODEL_LABELS[name]}: P = {ctx.P}, {sum(len(y) for _, y in some)} samples", flush=True)
        steps = [("products", lambda: task_products(ctx)),  # first: it decides the correctness column
                 ("eig1", lambda: task_eig(ctx, 1)), ("eig5", lambda: task_eig(ctx, 5)),
                 ("trace", lambda: task_trace(ctx)), ("density", lambda: task_density(ctx)),
                 ("memory", lambda: task_memory(ctx, {lib: ctx._ops[f"eig1_setting_{lib}"] for lib in LIBS
                                                      if f"eig1_setting_{lib}" in ctx._ops}, args))]
        wanted = set(args.tasks) | ({"products"} if set(args.tasks) - {"kfac"} else set())
        if "memory" in wanted:
            wanted.add("eig1")  # the memory task measures eig1 at the setting eig1 chose
        for task, run in steps:
            if task in wanted:
                t1 = time.perf_counter()
                rows += run()
                print(f"{task}: {time.perf_counter() - t1:.1f} s", flush=True)
        print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if "kfac" in args.tasks:
        rows += kfac_step_times(status, args, device)
        rows += kfac_accuracy(status, args, device)
    add_ratios(rows)
    table = markdown(rows, status, header)
    print("\n" + table)
    result = {"setup": {"header": header, "argv": vars(args) | {"device": str(device)}, "versions": versions},
              "status": status, "rows": rows}
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "peers.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "peers.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
