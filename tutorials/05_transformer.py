# %% [markdown]
# # A small transformer: K-FAC training, Hessian spectrum and per-layer sensitivity
#
# `curvopt.models.transformer()` reads each 40-feature mnist1d signal as a sequence of 10
# tokens of 4 features: a Linear token embedding, a learned positional embedding, two
# `nn.TransformerEncoderLayer`s with PyTorch's defaults (dropout 0.1, post-norm), mean
# pooling, a LayerNorm and a Linear classifier. We train it with `curvopt.KFAC` and with
# Adam in the same loop, then look at its curvature, in eval mode and in train mode.
#
# Nothing here is special to transformers: the same calls as for an MLP. During its own
# passes curvopt picks an attention kernel that can be differentiated twice, turns off
# PyTorch's fused fast path, draws one dropout mask per batch (so an operator is one fixed
# matrix) and restores the model's modes, buffers and random state afterwards.

# %%
import time

import torch
from torch import nn

import curvopt
from curvopt.data import mnist1d
from curvopt.models import transformer

data = mnist1d()
loss_fn = nn.CrossEntropyLoss()


def train(make_optimizer, epochs=3, seed=0):
    torch.manual_seed(seed)
    model = transformer()
    optimizer = make_optimizer(model)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for X, y in data.loader(batch_size=128, shuffle=True, seed=epoch):
            optimizer.zero_grad()          # the same loop for both optimizers
            loss_fn(model(X), y).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = (model(data.X_test).argmax(1) == data.y_test).float().mean().item()
    return model, acc, seconds


# %% [markdown]
# ## K-FAC and Adam, the same number of steps
# K-FAC preconditions the Linear layers (token embedding, feed-forward layers, classifier)
# with Kronecker-factored curvature. The attention projections (which
# `nn.MultiheadAttention` applies functionally, not through their modules), the positional
# embedding and the LayerNorms get diagonal blocks, and `KFAC` names them in a one-time
# warning; `docs/support_matrix.rst` lists what each layer type gets. Three epochs of single
# untuned runs, for illustration: `benchmarks/models.py` compares tuned runs.

# %%
runs = {
    "KFAC": lambda m: curvopt.KFAC(m.parameters(), lr=0.05, damping=1e-2),
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
}
for name, make in runs.items():
    model, acc, seconds = train(make)
    print(f"{name}: test accuracy {acc:.3f} after 3 epochs ({seconds:.1f}s)")

# %% [markdown]
# ## Top Hessian eigenvalues, eval mode and train mode
# The model of the last run (Adam), on 1000 training samples. In eval mode dropout is off
# and the Hessian is that of the network used for inference. In train mode it is the
# Hessian of the training loss with dropout on: one mask per batch, drawn once per operator,
# so the same product twice gives the same vector and Lanczos converges on one matrix.

# %%
batches = data.batches(batch_size=500)[:2]
top = {}
for mode in ("eval", "train"):
    getattr(model, mode)()
    H = curvopt.curvature("hessian", model, loss_fn, batches, cache=True)
    result = curvopt.top_eigenvalues(H, k=3, tol=1e-3)
    top[mode] = result.eigenvalues
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    same = torch.equal(H @ v, H @ v)
    print(f"{mode:>5} mode: top-3 eigenvalues {[round(x, 3) for x in result.eigenvalues.tolist()]} "
          f"({result.iterations} products; repeated product identical: {same})")
print("the model is still in train mode:", model.training)

# %% [markdown]
# ## Per-layer sensitivity
# `curvopt.sensitivity` estimates each module's Hessian trace from one set of probes (the
# module traces add up to the model's) and, with `bits`, the HAWQ-V2 score used to decide
# which layers keep more bits under quantization. It analyses the network that will be
# deployed, i.e. the model in eval mode, whatever mode the model is in when called, and
# leaves the model as it found it. Attention is reported per module: `self_attn` (the input
# projection `in_proj_weight`/`in_proj_bias`) and `self_attn.out_proj`.

# %%
model.train()  # as a training loop leaves it
report = curvopt.sensitivity(model, batches, loss_fn, probes=20, bits=4)
print(report)
print("most sensitive first:", report.ranking()[:5])
print("still in train mode:", model.training)

# %% [markdown]
# The per-layer traces of the train-mode Hessian (dropout on, one mask per batch) come from
# any operator with `curvopt.trace(op, per_block=True)`; next to the eval-mode figures they
# show how much of each layer's curvature dropout takes away.

# %%
H_train = curvopt.curvature("hessian", model, loss_fn, batches, cache=True)
per_layer = curvopt.trace(H_train, probes=20, per_block=True)
print(f"{'module':<38}{'eval':>9}{'train':>9}")
for row in report.layers:
    if row.name in per_layer.blocks:
        print(f"{row.name:<38}{row.trace:>9.3f}{per_layer.blocks[row.name][0]:>9.3f}")
print(f"{'total':<38}{report.total_trace:>9.3f}{per_layer.value:>9.3f}")
model.eval()
