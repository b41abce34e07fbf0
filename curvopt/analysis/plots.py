"""PNG plots of spectra and loss landscapes (needs the ``[plot]`` extra, matplotlib)."""

from __future__ import annotations

from pathlib import Path

import torch

from curvopt.analysis.landscape import Landscape


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'curvopt[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, title: str, path: str | Path) -> Path:
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_spectral_density(grid: torch.Tensor, density: torch.Tensor, path: str | Path, *,
                          title: str = "Hessian eigenvalue density") -> Path:
    """Save the density on a log scale as a PNG; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(grid.cpu().numpy(), density.clamp_min(1e-12).cpu().numpy())
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    return _save(plt, fig, ax, title, path)


def plot_landscape(landscape: Landscape, path: str | Path, *, title: str = "loss landscape") -> Path:
    """Save a 1-D curve or a 2-D contour plot of a :class:`Landscape` as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if landscape.dims == 1:
        ax.plot(landscape.alphas.numpy(), landscape.losses.numpy(), marker=".")
        ax.set_xlabel("step along direction")
        ax.set_ylabel("loss")
    else:
        A, B = torch.meshgrid(landscape.alphas, landscape.betas, indexing="ij")
        cs = ax.contourf(A.numpy(), B.numpy(), landscape.losses.numpy(), levels=30, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="loss")
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    return _save(plt, fig, ax, title, path)
