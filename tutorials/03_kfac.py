# %% [markdown]
# # K-FAC: Kronecker-factored curvature and the KFAC optimizer
#
# `curvopt.KFAC(model.parameters())` drops into an unchanged PyTorch training loop. It
# preconditions each Linear/Conv layer's gradient with the inverse of a Kronecker-factored
# Fisher `A ⊗ G`. This tutorial trains a small CNN on the embedded mnist1d data with
# K-FAC, Adam and SGD for the same few epochs, then looks at the factors through the
# `kfac` curvature operator.

# %%
import time

import torch
from torch import nn

import curvopt
from curvopt.data import mnist1d
from curvopt.models import cnn1d

data = mnist1d()
loss_fn = nn.CrossEntropyLoss()


def train(make_optimizer, epochs=3, seed=0):
    torch.manual_seed(seed)
    model = cnn1d()
    optimizer = make_optimizer(model)
    start = time.perf_counter()
    for epoch in range(epochs):
        for X, y in data.loader(batch_size=128, shuffle=True, seed=epoch):
            optimizer.zero_grad()          # the loop is the same for every optimizer
            loss_fn(model(X), y).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = (model(data.X_test).argmax(1) == data.y_test).float().mean().item()
    return model, optimizer, acc, seconds


# %% [markdown]
# ## The same loop, three optimizers
# K-FAC's main knobs are `lr` and `damping`; `factor_every`/`inverse_every` trade cost for
# freshness of the curvature, `kl_clip` bounds the step. These are single untuned runs,
# for illustration only: `benchmarks/race.py` compares tuned optimizers.

# %%
runs = {
    "KFAC": lambda m: curvopt.KFAC(m.parameters(), lr=0.05, damping=1e-2),
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
    "SGD-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
}
results = {}
for name, make in runs.items():
    model, optimizer, acc, seconds = train(make)
    results[name] = (model, optimizer)
    print(f"{name:>13}: test accuracy {acc:.3f} after 3 epochs ({seconds:.1f}s)")

# %% [markdown]
# ## What the optimizer holds
# Per layer, the moving averages of the factors `A` (input second moment, with a 1 for
# the bias) and `G` (output-gradient second moment), and their largest eigenvalues.

# %%
model, optimizer = results["KFAC"]
for name, module in model.named_modules():
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        state = optimizer.state[module.weight]
        print(f"layer {name}: A {tuple(state['A'].shape)}, G {tuple(state['G'].shape)}, "
              f"steps {state['step']}, largest eigenvalues A {torch.linalg.eigvalsh(state['A'])[-1]:.3g}, "
              f"G {torch.linalg.eigvalsh(state['G'])[-1]:.3g}")

# %% [markdown]
# ## The same curvature as an operator
# The `kfac` backend builds the factors over a whole dataset (here the type-2 Fisher,
# i.e. the K-FAC of the GGN) and can be used like any operator, for instance to compare
# with the exact GGN or to apply a damped inverse.

# %%
batches = data.batches(batch_size=500)[:2]
K = curvopt.curvature("kfac", model, loss_fn, batches)
G = curvopt.curvature("ggn", model, loss_fn, batches)
v = torch.randn(K.shape[0])
print(f"v^T K v = {float(v @ (K @ v)):.4f}   v^T GGN v = {float(v @ (G @ v)):.4f}")
step = K.inverse_matmat(v, damping=1e-2, factored=True)
print(f"damped K-FAC solve: |v| = {float(v.norm()):.2f} -> |(K + damping)^-1 v| = {float(step.norm()):.2f}")
