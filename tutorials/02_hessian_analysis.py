# %% [markdown]
# # Hessian analysis of a trained network
#
# Train a small CNN on the embedded mnist1d data, then look at its curvature: the top
# Hessian eigenvalues, the trace, the eigenvalue density, the loss along the top
# eigenvectors, and the per-layer sensitivity used to choose quantization bit widths.
# Everything runs on any `CurvatureOperator`; here the exact Hessian.

# %%
import torch
from torch import nn

import curvopt
from curvopt.data import mnist1d
from curvopt.models import cnn1d

torch.manual_seed(0)
data = mnist1d()
model = cnn1d()
loss_fn = nn.CrossEntropyLoss()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for epoch in range(6):
    for X, y in data.loader(batch_size=128, shuffle=True, seed=epoch):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
model.eval()
with torch.no_grad():
    acc = (model(data.X_test).argmax(1) == data.y_test).float().mean()
print(f"test accuracy {acc:.3f}")

# %% [markdown]
# ## Top eigenvalues and trace
# `cache=True` keeps each batch's gradient graph, so the many products of Lanczos and
# of the trace estimators do not redo the forward and backward passes.

# %%
batches = data.batches(batch_size=500)[:4]  # 2000 samples keep the tutorial quick
H = curvopt.curvature("hessian", model, loss_fn, batches, cache=True)
top = curvopt.top_eigenvalues(H, k=3, tol=1e-3)
print("top-3 eigenvalues:", [round(v, 3) for v in top.eigenvalues.tolist()], f"({top.iterations} products)")
tr = curvopt.trace(H, probes=30, per_block=True)
print(f"trace {tr.value:.2f} ± {tr.stderr:.2f}; per module:",
      {name: round(v, 2) for name, (v, _) in tr.blocks.items()})

# %% [markdown]
# Power iteration, the method most tools use, needs more products for the same
# eigenvalue:

# %%
power = curvopt.top_eigenvalues(H, k=1, tol=1e-4, method="power")
lz = curvopt.top_eigenvalues(H, k=1, tol=1e-4)
print(f"top eigenvalue: Lanczos {float(lz.eigenvalues[0]):.4f} in {lz.iterations} products, "
      f"power {float(power.eigenvalues[0]):.4f} in {power.iterations} products")

# %% [markdown]
# ## Spectral density
# Stochastic Lanczos quadrature gives the whole eigenvalue distribution: a bulk near
# zero and a few outliers, the familiar picture of trained networks.

# %%
grid, density = curvopt.spectral_density(H, probes=2, steps=30)
mass_near_zero = float(torch.trapezoid(density * (grid.abs() < 1), grid))
print(f"spectrum within [{float(grid[0]):.2f}, {float(grid[-1]):.2f}]; "
      f"{100 * mass_near_zero:.1f}% of the eigenvalue mass lies in (-1, 1)")

# %% [markdown]
# ## Loss landscape
# At the same distance, the loss rises fastest along the top eigenvector; along a random
# direction (filter-normalized as in Li et al., 2018, then scaled to unit length like
# the eigenvector) it barely moves.

# %%
sharp = curvopt.loss_landscape(model, loss_fn, batches, [top.eigenvectors[:, 0]], steps=9, radius=0.5)
d = curvopt.random_direction(model)
rand = curvopt.loss_landscape(model, loss_fn, batches, [d / d.norm()], steps=9, radius=0.5)
print("loss along top eigenvector:", [round(v, 3) for v in sharp.losses.tolist()])
print("loss along random direction:", [round(v, 3) for v in rand.losses.tolist()])

# %% [markdown]
# ## Per-layer sensitivity for quantization
# `curvopt.sensitivity` reports each module's Hessian trace from one set of probes, the
# average trace per parameter, and the HAWQ-V2 score `avg_trace * ||Q_b(W) - W||^2`
# for a bit width: layers with a high score should keep more bits.

# %%
report = curvopt.sensitivity(model, batches, loss_fn, probes=30, bits=4)
print(report)
print("most sensitive first:", report.ranking())

# %% [markdown]
# ## Plots
# With the `[plot]` extra, the density and landscapes become PNG files.

# %%
try:
    from curvopt.analysis.plots import plot_landscape, plot_spectral_density
except ImportError:
    print("install curvopt[plot] for the plots")
else:
    try:
        print(plot_spectral_density(grid, density, "runs/tutorial02/density.png"))
        print(plot_landscape(sharp, "runs/tutorial02/landscape.png", title="loss along the top eigenvector"))
    except ImportError as e:
        print(e)
