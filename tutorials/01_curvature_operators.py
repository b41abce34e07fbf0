# %% [markdown]
# # Curvature operators
#
# A `CurvatureOperator` is a curvature matrix of the empirical risk (Hessian, GGN,
# Fisher, ...) that you multiply with vectors but never store. This tutorial builds
# each backend on the embedded mnist1d data, checks it against the dense matrix on a
# tiny model, and switches the backend by name from a config dict.

# %%
import torch
from torch import nn

import curvopt
from curvopt.data import mnist1d
from curvopt.models import mlp

torch.manual_seed(0)
data = mnist1d()  # built offline from templates: 4000 train / 1000 test signals of length 40
batches = data.batches(batch_size=1000)  # a list of (X, y); a DataLoader works too
model = mlp((40, 64, 10))
loss_fn = nn.CrossEntropyLoss()
print(f"{len(batches)} batches, model with {sum(p.numel() for p in model.parameters())} parameters")

# %% [markdown]
# ## Every backend, by name
# `curvopt.available_curvatures()` lists the registry. Each operator has a shape
# `(P, P)`, per-module `blocks`, and multiplies flat vectors `[P]`, matrices `[P, k]`
# (columns batched with `vmap`, one pass over the data) and parameter-shaped lists.

# %%
print("backends:", curvopt.available_curvatures())
v = torch.randn(sum(p.numel() for p in model.parameters()))
for name in ["hessian", "ggn", "fisher", "empirical_fisher"]:
    op = curvopt.curvature(name, model, loss_fn, batches)
    print(f"{name:>17}: shape {op.shape}, v^T A v = {float(v @ (op @ v)):+.4f}")
print("blocks:", [(b.name, b.numel) for b in op.blocks])

# %% [markdown]
# ## Compare with the dense matrix on a tiny model
# On a model small enough to form the Hessian with `torch.func.hessian`, the operator
# agrees to float64 round-off; the GGN is positive semi-definite, the Hessian need not be.

# %%
tiny = mlp((40, 4, 10)).double()
names = [n for n, _ in tiny.named_parameters()]
shapes = [p.shape for p in tiny.parameters()]
theta = torch.cat([p.detach().reshape(-1) for p in tiny.parameters()])
X, y = data.X_train[:500].double(), data.y_train[:500]


def risk(t):
    chunks = t.split([s.numel() for s in shapes])
    params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
    return loss_fn(torch.func.functional_call(tiny, params, (X,)), y)


H_dense = torch.func.hessian(risk)(theta)
H_op = curvopt.curvature("hessian", tiny, loss_fn, list(zip(X.split(128), y.split(128)))).to_dense()
print("max |H_op - H_dense| =", float((H_op - H_dense).abs().max()))
G = curvopt.curvature("ggn", tiny, loss_fn, (X, y)).to_dense()
print("smallest eigenvalue  Hessian: %.2e   GGN: %.2e"
      % (torch.linalg.eigvalsh(H_op)[0], torch.linalg.eigvalsh(G)[0]))

# %% [markdown]
# ## Solving with the curvature
# `op.solve(b, damping=...)` applies `(A + damping I)^{-1}` without forming `A`: MINRES
# from `curvopt.linalg` by default (it copes with an indefinite Hessian), `method="cg"`
# for a positive definite system; a Newton-type step is `-op.solve(gradient, damping=...)`.

# %%
ggn = curvopt.curvature("ggn", tiny, loss_fn, (X, y))
b = torch.randn(ggn.shape[0], dtype=torch.float64)
step = ggn.solve(b, damping=1e-3, rtol=1e-10)
dense_step = torch.linalg.solve(G + 1e-3 * torch.eye(G.shape[0], dtype=G.dtype), b)
print(f"solve vs dense: max difference {float((step - dense_step).abs().max()):.1e}")

# %% [markdown]
# ## Block-diagonal curvature
# `block_diagonal` wraps any backend and keeps one block per module (or your grouping).

# %%
B = curvopt.curvature("block_diagonal", tiny, loss_fn, (X, y), base="ggn").to_dense()
off_block = (B == 0) & (G != 0)
print(f"block-diagonal GGN keeps {int((B != 0).sum())} of {G.numel()} entries; "
      f"zeroed {int(off_block.sum())} off-block entries")

# %% [markdown]
# ## Switching the backend from a config
# Options are keyword arguments, so a config dict (or a TOML table) maps onto them
# one to one; changing `name` switches the curvature everywhere.

# %%
config = {"name": "fisher", "options": {"mc_samples": 4, "seed": 0, "cache": True}}
op = curvopt.curvature(config["name"], model, loss_fn, batches, **config["options"])
V = torch.randn(op.shape[0], 8)
AV = op @ V  # 8 columns in one pass over the data
print(f"{config['name']} @ V: {tuple(AV.shape)}, symmetric check "
      f"{float((V[:, 0] @ AV[:, 1] - V[:, 1] @ AV[:, 0]).abs()):.1e}")
