# %% [markdown]
# # Adaptive batch size: ABS and ABSA against a small and a large fixed batch
#
# (Issue 12 asks for this tutorial as `05_adaptive_batch_size.py`; 05 is the transformer
# tutorial, so this one is 06.)
#
# Large batches take fewer optimizer steps per epoch, but a large batch from the first step
# costs accuracy. ABS (Yao, Gholami, Keutzer, Mahoney, arXiv:1810.01021) starts small and
# doubles the batch (and the lr with it) when the top Hessian eigenvalue of a fixed probe set
# has fallen to half its reference, i.e. when the landscape has flattened; after `duration`
# checks without such a drop it grows anyway. ABSA also replaces a share of each batch by
# FGSM examples, which steers training towards flatter regions.
#
# We train the same CNN on mnist1d four times, with the user's loop unchanged apart from
# the schedule:
#
# * BL: batch 32 throughout, the lr the model was tuned for;
# * FB: batch 1024 throughout, lr scaled linearly with a short warm-up (Goyal et al.);
# * ABS: batch 32 growing up to 1024;
# * ABSA: ABS with FGSM examples.
#
# Single seeds on a tiny problem, for illustration: `benchmarks/batch_size.py` has the table
# over seeds, batch sizes and models.

# %%
import time

import torch
from torch import nn

import curvopt
from curvopt.data import mnist1d
from curvopt.models import cnn1d

data = mnist1d(num_samples=10_000)  # 8000 training samples: the largest batch is 1/8 of them
train_set = (data.X_train, data.y_train)
loss_fn = nn.CrossEntropyLoss()
EPOCHS, BATCH, MAX_BATCH, LR = 12, 32, 1024, 0.03


def test_accuracy(model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        return (model(data.X_test).argmax(1) == data.y_test).float().mean().item()


def train(make_schedule, monitor_probe=None, seed=0):
    """The loop of issue 12, for any schedule; optionally a CurvatureMonitor on the side."""
    torch.manual_seed(seed)
    model = cnn1d()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sched = make_schedule(optimizer, model)
    monitor = None
    if monitor_probe is not None:
        monitor = curvopt.CurvatureMonitor(model, loss_fn, monitor_probe, every=3, quantities=("top_eigenvalue",),
                                           max_iter=10)
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        for X, y in sched:          # one optimizer step's batch at the current size
            optimizer.zero_grad()
            sched.backward(X, y)     # loss and gradient in micro-batches, exact mean
            optimizer.step()
        sched.step()                 # end of epoch: probe, maybe grow batch and lr
        if monitor is not None:
            monitor.step(epoch + 1, batch_size=sched.batch_size, lr=sched.lr)  # x: epochs done
    seconds = time.perf_counter() - start
    return sched, monitor, test_accuracy(model), seconds


# %% [markdown]
# ## Four schedules, one loop
# The schedule hands out batches (seeded, resumable), computes the gradient of a batch of
# any size in micro-batches of at most `micro_batch_size` samples, and sets the lr. ABS
# probes at the end of every epoch: Lanczos (at most `lanczos_steps` Hessian-vector products,
# warm-started from the last check) on a fixed draw of `probe_size` training samples, in
# eval mode, leaving the model as it found it. `cache=True` lets the products reuse each
# probe batch's forward pass. `duration=3` lets the batch grow at least every third epoch
# in this short run (the paper's default waits longer).

# %%
abs_options = dict(batch_size=BATCH, max_batch_size=MAX_BATCH, duration=3, probe_size=512, lanczos_steps=10,
                   curvature_options={"cache": True}, micro_batch_size=256)
schedules = {
    "BL": lambda opt, model: curvopt.FixedBatchSize(opt, model, loss_fn, train_set, batch_size=BATCH),
    "FB": lambda opt, model: curvopt.FixedBatchSize(opt, model, loss_fn, train_set, batch_size=MAX_BATCH,
                                                    base_batch_size=BATCH, warmup_epochs=2,
                                                    micro_batch_size=256),
    "ABS": lambda opt, model: curvopt.AdaptiveBatchSize(opt, model, loss_fn, train_set, **abs_options),
    # eps is in the data's units (the features have unit standard deviation); epochs= lets the
    # adversarial share stop in the second half of training
    "ABSA": lambda opt, model: curvopt.AdaptiveBatchSize(opt, model, loss_fn, train_set, **abs_options,
                                                         adversarial=curvopt.FGSM(0.1, fraction=0.2),
                                                         epochs=EPOCHS),
}
# BL gets a CurvatureMonitor on a fixed probe of its own: the same measurement for a run without ABS
monitor_probe = (data.X_train[:512], data.y_train[:512])
results = {}
print(f"{'schedule':<9}{'test acc':>9}{'iterations':>11}{'final batch':>12}{'final lr':>10}"
      f"{'probes':>8}{'total':>8}")
for name, make in schedules.items():
    sched, monitor, acc, seconds = train(make, monitor_probe if name == "BL" else None)
    results[name] = (sched, monitor, acc)
    probe_seconds = sum(h.get("probe_seconds", 0.0) for h in sched.history)
    print(f"{name:<9}{acc:>9.3f}{sched.iterations:>11}{sched.batch_size:>12}{sched.lr:>10.3f}"
          f"{probe_seconds:>7.1f}s{seconds:>7.1f}s")

# %% [markdown]
# FB takes the fewest steps but, with its lr scaled 32-fold, does not train; ABS and ABSA
# need far fewer steps than BL (once the batch is large an epoch is a few steps) for a test
# accuracy close to BL's. On a model this small the probes are a large share of ABS's time:
# a probe is `lanczos_steps` Hessian-vector products on `probe_size` samples (each a small
# multiple of a gradient on those samples), once per epoch, so its share falls as the
# training set (the work of an epoch) grows.
#
# ## What ABS saw
# One record per check (here after each epoch): the top eigenvalue with its error bound (the
# Lanczos residual), the reference it was compared with, and why the batch grew (`eigenvalue`: it halved;
# `duration`: three checks without growth; `cap`: it would have grown past `max_batch_size`).

# %%
for name in ("ABS", "ABSA"):
    print(name)
    for h in results[name][0].history:
        ref = "" if h["reference"] is None else f"{h['reference']:.2f}"
        print(f"  after epoch {h['epoch'] + 1:>2}: eigenvalue {h['eigenvalue']:6.2f} ± {h['std_error']:.1e}"
              f"  reference {ref:>6}  -> batch {h['batch_size']:>4}, lr {h['lr']:.3f}  {h['reason']}"
              + (f"  (adversarial share {h['adversarial_fraction']:.2f})" if name == "ABSA" else ""))

bl_monitor = results["BL"][1]
print("BL, CurvatureMonitor:", [(r["epoch"], round(r["top_eigenvalue"], 2)) for r in bl_monitor.history])

# %% [markdown]
# ## The schedules
# Top eigenvalue, batch size and lr against epochs (the figure of the paper), saved under
# `runs/tutorial06/` with the `[plot]` extra. `CurvatureMonitor.plot` draws the same panels
# for any run it watched.

# %%
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("install curvopt[plot] for the plots")
else:
    from pathlib import Path

    out = Path("runs/tutorial06")
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(3, 1, figsize=(6, 7.5), sharex=True)
    for i, (name, (sched, monitor, _)) in enumerate(results.items()):
        # one colour per schedule in every panel; ABSA dashed, as its batch and lr may equal ABS's
        style = dict(color=f"C{i}", linestyle="--" if name == "ABSA" else "-", marker=".", label=name)
        epochs = [h["epoch"] + 1 for h in sched.history]  # the state after each epoch
        if "eigenvalue" in sched.history[0]:
            axes[0].plot(epochs, [h["eigenvalue"] for h in sched.history], **style)
        if monitor is not None:
            axes[0].plot([r["epoch"] for r in monitor.history], [r["top_eigenvalue"] for r in monitor.history],
                         **dict(style, marker="x", linestyle=":", label=f"{name} (monitor)"))
        axes[1].step(epochs, [h["batch_size"] for h in sched.history], where="post", **style)
        axes[2].step(epochs, [h["lr"] for h in sched.history], where="post", **style)
    axes[0].set_ylabel("top eigenvalue")
    axes[1].set_ylabel("batch size")
    axes[1].set_yscale("log", base=2)
    axes[2].set(ylabel="lr", yscale="log", xlabel="epoch")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[0].set_title("mnist1d, cnn1d, SGD-momentum")
    fig.tight_layout()
    fig.savefig(out / "schedules.png", dpi=120)
    plt.close(fig)
    print(out / "schedules.png")
    print(bl_monitor.plot(out / "bl_monitor.png", title="BL, CurvatureMonitor"))
