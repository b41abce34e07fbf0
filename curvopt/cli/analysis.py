"""``curvopt analyze``: a model (``[model] checkpoint``, or trained briefly on the embedded data), then the top
eigenvalues of the ``[curvature]`` backend, its trace with the standard error, the per-layer sensitivity table,
and the spectral density and loss-landscape plots, each titled with the backend used. Under ``torchrun`` each
rank holds its contiguous share of the samples and the operators all-reduce over the ranks."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import curvopt.cli as cli  # _dataset and _train are looked up there, where a test may substitute them
from curvopt.cli.common import _evaluate, _load_checkpoint, _model, _on_device, _read_checkpoint
from curvopt.cli.config import LOSSES, AnalyzeConfig
from curvopt.cli.launch import current_launch, same_weights_as_rank0, shard
from curvopt.errors import ConfigError


def analyze(config: AnalyzeConfig, out: Path | None = None) -> dict[str, Any]:
    """Run the analysis described by ``config``; returns what it printed, as data."""
    import curvopt
    from curvopt.curvature import curvature

    est, outcfg = config["estimators"], config["output"]
    progress = bool(outcfg["progress"])
    out = Path(out or outcfg["dir"])
    ckpt = config["model"]["checkpoint"]
    state = _read_checkpoint(ckpt) if ckpt else None  # a wrong file fails before the data is built
    launch = current_launch()
    data = _on_device(cli._dataset(config), launch.device)
    model = _model(config, data.X_train.shape[1], data.num_classes).to(launch.device)
    loss_fn = LOSSES[config["loss"]["name"]]()
    backend = config["curvature"]["backend"]
    options = dict(config["curvature"]["options"])
    options.setdefault("cache", True)
    n = min(config["data"]["samples"], data.X_train.shape[0])
    # under torchrun each rank holds its contiguous share of the n samples; the operators and estimators
    # all-reduce over the ranks, so the curvature is that of all n samples
    mine = shard(n, launch.rank, launch.world)
    batches = list(zip(data.X_train[:n][mine].split(config["data"]["batch_size"]),
                       data.y_train[:n][mine].split(config["data"]["batch_size"])))
    # Everything that can be checked before the computation is: the checkpoint, the budgets
    # against the model's size, and the backend options (building an operator runs no pass).
    t0 = time.perf_counter()
    if state is not None:
        _load_checkpoint(model, state, ckpt, config["model"]["arch"])
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if est["top_k"] > P:
        raise ConfigError(f"[estimators] top_k = {est['top_k']} exceeds the {P} parameters of the "
                          f"{config['model']['arch']}")
    with warnings.catch_warnings():  # the real operator below warns once
        warnings.simplefilter("ignore")
        curvature(backend, model, loss_fn, batches, **options)
    if not ckpt:
        cli._train(model, data, loss_fn, config, progress)
        same_weights_as_rank0(model, launch)
    model.eval()
    print(f"model: {config['model']['arch']} ({sum(p.numel() for p in model.parameters())} parameters), "
          f"{'loaded' if ckpt else 'trained'} in {time.perf_counter() - t0:.1f}s; "
          f"train acc {_evaluate(model, data.X_train, data.y_train)[1]:.3f}, "
          f"test acc {_evaluate(model, data.X_test, data.y_test)[1]:.3f}")
    bar = f"{backend} pass" if progress else False
    op = curvature(backend, model, loss_fn, batches, progress=bar, **options)
    ranks = f" per rank, {launch.world} ranks" if launch.world > 1 else ""
    print(f"curvature: {backend} on {n} samples in {len(batches)} batches{ranks}, P = {op.shape[0]}")

    top = curvopt.top_eigenvalues(op, est["top_k"], tol=est["tol"], seed=est["seed"])
    print(f"top-{est['top_k']} eigenvalues of the {backend} ({top.iterations} products): "
          + ", ".join(f"{v:.4g}" for v in top.eigenvalues.tolist()))
    report = curvopt.sensitivity(model, batches, loss_fn, curvature=backend, probes=est["trace_probes"],
                                 method=est["trace_method"], bits=est["sensitivity_bits"], seed=est["seed"],
                                 progress=bar, **options)
    print(f"{backend} trace: {report.total_trace:.4g} ± {report.total_trace_se:.2g} "
          f"({est['trace_method']}, {est['trace_probes']} products)")
    print(report.table())
    result = {"backend": backend, "top_eigenvalues": top.eigenvalues.tolist(), "trace": report.total_trace,
              "trace_se": report.total_trace_se, "sensitivity": report.to_dict()}
    if launch.main:
        out.mkdir(parents=True, exist_ok=True)
    if outcfg["plots"]:
        from curvopt.analysis import plots

        def plot_spectral_density(*args: Any, **kwargs: Any) -> Path:  # every rank computes, rank 0 draws
            return plots.plot_spectral_density(*args, **kwargs) if launch.main else args[-1]

        def plot_landscape(*args: Any, **kwargs: Any) -> Path:
            return plots.plot_landscape(*args, **kwargs) if launch.main else args[-1]

        grid, dens = curvopt.spectral_density(op, probes=est["density_probes"], steps=est["density_steps"],
                                              seed=est["seed"])
        paths = [plot_spectral_density(grid, dens, out / "spectral_density.png",
                                       title=f"{backend} eigenvalue density")]
        land = curvopt.loss_landscape(model, loss_fn, batches, [top.eigenvectors[:, 0]],
                                      steps=est["landscape_steps"], radius=est["landscape_radius"],
                                      progress="landscape pass" if progress else False)
        paths.append(plot_landscape(land, out / "landscape_top_eigenvector.png",
                                    title=f"loss along the top {backend} eigenvector"))
        if top.eigenvectors.shape[1] > 1:
            land2 = curvopt.loss_landscape(model, loss_fn, batches,
                                           [top.eigenvectors[:, 0], top.eigenvectors[:, 1]],
                                           steps=max(5, est["landscape_steps"] // 2),
                                           radius=est["landscape_radius"],
                                           progress="landscape pass" if progress else False)
            paths.append(plot_landscape(land2, out / "landscape_top2.png",
                                        title=f"loss on the top-2 {backend} eigenvector plane"))
        result["plots"] = [str(p) for p in paths]
        print("plots: " + ", ".join(result["plots"]))
    if launch.main:
        (out / "analysis.json").write_text(json.dumps(result, indent=2))
    print(f"report: {out / 'analysis.json'}")
    return result
