# %% [markdown]
# # Newton-type optimizers: Newton-MR, trust region and cubic regularization
#
# `curvopt.NewtonMR`, `curvopt.TrustRegion` and `curvopt.ARC` are `torch.optim.Optimizer`s
# that take a closure, like `torch.optim.LBFGS`. Each step solves a subproblem with the
# curvature (any registry backend, by name) through matrix-free Krylov solvers from
# `curvopt.linalg`, then accepts or rejects the step by a line search (Newton-MR) or a
# ratio test (trust region, ARC). This tutorial
#
# 1. watches all three escape the saddle point of a 2-D function where gradient descent stalls,
# 2. trains an MLP on the embedded mnist1d data with mini-batches and a sub-sampled curvature,
# 3. switches the curvature backend by name.

# %%
import math
import time

import torch
from torch import nn

import curvopt
from curvopt.data import mnist1d
from curvopt.models import mlp

# %% [markdown]
# ## 1. Escaping a strict saddle
# `f(x, y) = x^2 - y^2 + y^4 / 4` has a saddle at the origin (Hessian `diag(2, -2)`) and
# minima at `(0, ±sqrt(2))` with value -1. Started next to the saddle, gradient descent
# creeps away from it at a rate set by the tiny `y`; the second-order methods see the
# negative curvature and leave at once: Newton-MR through MINRES's non-positive
# curvature direction, the trust region and ARC because their subproblems are minimized
# along it.
#
# A plain closure works when it calls `loss.backward(create_graph=True)` (the exact
# Hessian of whatever it computes); for networks, `curvopt.batch_closure` (below) is the
# better choice.


# %%
def saddle(p):
    return p[0] ** 2 - p[1] ** 2 + p[1] ** 4 / 4


def trajectory(make, steps=30, start=(0.5, 1e-3)):
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = make([p])

    def closure():
        opt.zero_grad()
        loss = saddle(p)
        loss.backward(create_graph=True)
        return loss

    path = [p.detach().clone()]
    for _ in range(steps):
        opt.step(closure)
        path.append(p.detach().clone())
    return torch.stack(path)


paths = {
    "gradient descent": trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "NewtonMR": trajectory(curvopt.NewtonMR),
    "TrustRegion": trajectory(curvopt.TrustRegion),
    "ARC": trajectory(curvopt.ARC),
}
for name, path in paths.items():
    end = path[-1]
    steps = next((i for i, q in enumerate(path) if float(saddle(q)) < -0.999), None)
    print(f"{name:>16}: ends at ({end[0]:+.3f}, {end[1]:+.3f}), f = {float(saddle(end)):+.4f}; "
          f"f < -0.999 after {steps if steps is not None else '>30'} steps")

# %% [markdown]
# With the `[plot]` extra, the trajectories over the contours:

# %%
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("install curvopt[plot] for the plot")
else:
    from pathlib import Path

    grid = torch.linspace(-2, 2, 201)
    X, Y = torch.meshgrid(grid, grid, indexing="xy")
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.contour(X, Y, saddle((X, Y)), levels=30, cmap="Greys")
    for name, path in paths.items():
        ax.plot(path[:, 0], path[:, 1], marker=".", label=name)
    ax.plot(0, 0, "kx")
    ax.set(xlabel="x", ylabel="y", title="escaping the saddle of x² - y² + y⁴/4")
    ax.legend(fontsize=8)
    out = Path("runs/tutorial04")
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "saddle.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(out / "saddle.png")

# %% [markdown]
# ## 2. Training on mini-batches
# `curvopt.batch_closure(model, loss_fn, X, y)` is a closure that also knows its batch, so
# the optimizer can build any registry curvature on a random `curvature_fraction` of it.
# Here: a trust region with the GGN on a quarter of each batch of 256, at most 10 CG
# steps per step. `optimizer.stats` tells what each step did.

# %%
data = mnist1d()
loss_fn = nn.CrossEntropyLoss()


def accuracy(model):
    with torch.no_grad():
        return (model(data.X_test).argmax(1) == data.y_test).float().mean().item()


def train(make, epochs=2, seed=0):
    torch.manual_seed(seed)
    model = mlp((40, 128, 128, 10))
    opt = make(model.parameters())
    start = time.perf_counter()
    for epoch in range(epochs):
        for X, y in data.loader(batch_size=256, shuffle=True, seed=epoch):
            opt.step(curvopt.batch_closure(model, loss_fn, X, y))
    return model, opt, accuracy(model), time.perf_counter() - start


model, opt, acc, seconds = train(lambda ps: curvopt.TrustRegion(ps, curvature="ggn", curvature_fraction=0.25,
                                                                radius=1.0, max_iter=10, rtol=1e-2))
s = opt.stats
print(f"TrustRegion (GGN): test accuracy {acc:.3f} after 2 epochs ({seconds:.1f}s)")
print(f"last step: {s.solver_iterations} CG steps, stopped by {s.stop_reason!r}, ratio {s.ratio:.2f}, "
      f"accepted {s.accepted}, radius now {s.regularization:.3g}")

# %% [markdown]
# ## 3. Switching the curvature by name
# The backend is a string, so it can come from a config file. The exact Hessian sees
# negative curvature (Newton-MR then follows it); the GGN and Fisher are positive
# semi-definite and cheaper per product.

# %%
for backend in ("hessian", "ggn", "fisher"):
    _, opt, acc, seconds = train(lambda ps, b=backend: curvopt.NewtonMR(ps, curvature=b, curvature_fraction=0.25,
                                                                        damping=1e-2, max_iter=10, rtol=1e-2),
                                 epochs=1)
    state = next(iter(opt.state.values()))
    print(f"NewtonMR with {backend:>7}: test accuracy {acc:.3f} after 1 epoch ({seconds:.1f}s), "
          f"{state['accepted']} of {state['steps']} steps accepted")
assert math.isfinite(acc)
