# %% [markdown]
# # Hessian-aware mixed-precision quantization (HAWQ), end to end
#
# Quantizing every layer of a network to the same few bits hurts some layers much more than
# others. HAWQ (Dong et al., 2019, 2020; Yao et al., 2021) measures how sensitive each layer is
# with second-order information -- the average Hessian trace of its weights times the squared
# quantization error `||Q_b(W) - W||^2` -- and spends the bits where they matter, under a size
# budget, by solving a small integer program. The pipeline:
#
# 1. train a model (here a small MLP on mnist1d);
# 2. `curvopt.sensitivity`: one score per layer and bit width;
# 3. `allocate_bits`: the cheapest plan `{layer: bits}` within a budget (here a 3-bit average),
#    and the whole size/score Pareto frontier;
# 4. evaluate with `fake_quantized` (weights quantized in place, restored on exit) against
#    uniform 3-bit and random plans of the same size;
# 5. optionally one epoch of quantization-aware fine-tuning (`finetune`).
#
# One seed on a tiny problem, for illustration: `benchmarks/quantization.py` has the table over
# seeds, models and scores.

# %%
import copy

import torch
from torch import nn

import curvopt
from curvopt.data import mnist1d
from curvopt.models import mlp
from curvopt.quant import Quantizer, allocate_bits, fake_quantized, finetune, random_plans, uniform_plan

data = mnist1d(num_samples=5000)  # 4000 training, 1000 test samples
torch.manual_seed(0)
model = mlp((40, 128, 128, 128, 128, 10))  # five Linear layers: five quantizable modules
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
EPOCHS = 15
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS * len(data.loader(64)))
for epoch in range(EPOCHS):
    for X, y in data.loader(64, shuffle=True, seed=epoch):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        sched.step()
model.eval()


def test_accuracy(m: nn.Module) -> float:
    with torch.no_grad():
        return (m(data.X_test).argmax(1) == data.y_test).float().mean().item()


print(f"full precision: {100 * test_accuracy(model):.1f}% test accuracy")

# %% [markdown]
# ## Sensitivity: one score per layer and bit width
# The quantizer is symmetric, one grid per output channel, with the clip range chosen to
# minimise the squared error (`clipping="mse"`, the default): at 2-3 bits, clipping a few large
# weights costs far less than a coarse grid for all of them.
#
# `curvopt.sensitivity` estimates every layer's Hessian trace from one set of Hutch++ probes on a
# calibration set of training samples, in eval mode, leaving the model as it found it. The report
# is independent of the bit width; `score_table` turns it into the predicted loss increase of
# each layer at each width. Look at how unevenly it is spread: a layer whose trace is large, or
# whose weights quantize badly, is worth more bits.

# %%
quantizer = Quantizer()
calibration = data.batches(512)[:2]  # 1024 training samples
BITS = (2, 3, 4, 8)
report = curvopt.sensitivity(model, calibration, score="hawq_v2", probes=64, quantizer=quantizer)
print(report)
table = report.score_table(model, BITS, quantizer=quantizer)
print(f"{'layer':>6} " + " ".join(f"{b:>10}-bit" for b in BITS))
for name, row in table.items():
    print(f"{name:>6} " + " ".join(f"{row[b]:>14.3g}" for b in BITS))

# %% [markdown]
# ## Allocation: the best plan at a 3-bit average
# `allocate_bits` solves HAWQ-V3's integer program: one width per layer, minimise the summed
# score, total size at most that of uniform 3-bit. Sizes count the quantized weights only
# (`numel * bits`; biases and scales stay in full precision). The plan also carries the exact
# Pareto frontier: the least summed score reachable at each size.

# %%
plan = allocate_bits(model, table, bits=BITS, average_bits=3.0)
uniform3 = uniform_plan(model, 3)
print(plan)
print(f"uniform 3-bit: {uniform3.size_bytes:.0f} B; mixed precision: {plan.size_bytes:.0f} B "
      f"({plan.average_bits:.3f} bits per weight)")

# %% [markdown]
# ## Mixed precision against uniform 3-bit and random plans of the same size
# `fake_quantized` quantizes the planned weights in place for the length of the block and puts
# them back bit for bit afterwards. The random plans draw widths at random and then fill the
# same budget, so they tell whether *which* layers get the bits matters, not just how many.

# %%


def ptq_accuracy(bits: dict[str, int]) -> float:
    with fake_quantized(model, bits, quantizer):
        return test_accuracy(model)


randoms = random_plans(model, BITS, uniform3.size_bits, 10, seed=0)
random_acc = torch.tensor([ptq_accuracy(p.bits) for p in randoms])
results = {"uniform 3-bit": ptq_accuracy(uniform3.bits), "HAWQ mixed precision": ptq_accuracy(plan.bits)}
for what, acc in results.items():
    print(f"{what:>22}: {100 * acc:.1f}%")
print(f"{'random (10 plans)':>22}: {100 * random_acc.mean():.1f} ± {100 * random_acc.std():.1f}%")

# %% [markdown]
# ## The Pareto curve
# Left: the predicted cost (summed score) of the frontier against size, with the uniform plans
# and the random ones; right: the measured test accuracy of frontier plans. What to look at: where
# the frontier's accuracy stops improving (extra bits beyond it buy little), and how far above
# the uniform and random points at equal size it lies.

# %%
frontier = plan.pareto[:: max(1, len(plan.pareto) // 8)] + plan.pareto[-1:]
frontier_acc = [ptq_accuracy(p.bits) for p in frontier]
uniforms = [uniform_plan(model, b) for b in BITS]
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("install curvopt[plot] for the plots")
else:
    from pathlib import Path

    out = Path("runs/tutorial07")
    out.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([p.size_bytes for p in plan.pareto], [p.objective for p in plan.pareto], "k-", label="frontier")
    left.plot([u.size_bytes for u in uniforms], [sum(table[n][b] for n, b in u.bits.items()) for u in uniforms],
              "s", label="uniform")
    left.plot([r.size_bytes for r in randoms], [sum(table[n][b] for n, b in r.bits.items()) for r in randoms],
              "x", label="random")
    left.plot([plan.size_bytes], [plan.objective], "o", color="C3", label="HAWQ at 3 bits")
    left.set(xlabel="weight bytes", ylabel="summed hawq_v2 score")
    left.set_yscale("log", nonpositive="mask")
    right.plot([p.size_bytes for p in frontier], [100 * a for a in frontier_acc], "k.-", label="frontier")
    right.plot([u.size_bytes for u in uniforms], [100 * ptq_accuracy(u.bits) for u in uniforms], "s",
               label="uniform")
    right.plot([r.size_bytes for r in randoms], 100 * random_acc, "x", label="random")
    right.plot([plan.size_bytes], [100 * results["HAWQ mixed precision"]], "o", color="C3", label="HAWQ at 3 bits")
    right.set(xlabel="weight bytes", ylabel="test accuracy % (PTQ)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    print(out / "pareto.png")

# %% [markdown]
# ## One epoch of quantization-aware fine-tuning
# `finetune` trains with the planned weights quantized in the forward and backward passes and
# applies the gradient to the full-precision weights (the straight-through estimator); the
# model keeps the latent full-precision weights, so the fine-tuned quantized model is evaluated
# inside `fake_quantized` again. Each plan starts from a copy of the trained model. The
# fine-tuned figures are reported apart from the post-training ones above: fine-tuning narrows
# the gap that a poor allocation leaves.

# %%
for what, bits in (("uniform 3-bit", uniform3.bits), ("HAWQ mixed precision", plan.bits)):
    tuned = copy.deepcopy(model)
    losses = finetune(tuned, bits, data.loader(64, shuffle=True, seed=0), epochs=1, lr=1e-4, quantizer=quantizer)
    with fake_quantized(tuned, bits, quantizer):
        acc = test_accuracy(tuned)
    print(f"{what:>22} + 1 epoch QAT: {100 * acc:.1f}% (training loss {losses[-1]:.3f})")
