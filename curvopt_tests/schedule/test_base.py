"""The shared base: micro-batched backward, the seeded resumable sampler, bitwise resume, bad input."""

import copy
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvopt
from curvopt.errors import EmptyDataError, OptionError, UnsupportedLossError
from curvopt.schedule import AdaptiveBatchSize, FixedBatchSize, IncreaseBatchSize


def _data(n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)


def _plain_mean(out, y):
    return nn.functional.cross_entropy(out, y)


LOSSES = {
    "mean": nn.CrossEntropyLoss(),
    "sum": nn.CrossEntropyLoss(reduction="sum"),
    # torch's mean divides by the counted targets' class weights: micro-batches weigh by them, not by size
    "weighted_ignore": nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64),
                                           ignore_index=2),
    "plain_function": _plain_mean,
}


@given(batch=st.integers(1, 24), micro=st.integers(1, 24), loss=st.sampled_from(sorted(LOSSES)))
def test_micro_batched_backward_equals_the_full_batch_gradient(batch, micro, loss):
    X, y = _data(24)
    model = _mlp()
    loss_fn = LOSSES[loss]
    if loss == "weighted_ignore" and bool((y[:batch] == 2).all()):
        return  # torch's own mean is 0/0 there
    sched = FixedBatchSize(torch.optim.SGD(model.parameters(), lr=0.1), model, loss_fn, (X, y),
                           batch_size=batch, micro_batch_size=micro)
    Xb, yb = X[:batch], y[:batch]
    model.zero_grad()
    loss = sched.backward(Xb, yb)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = loss_fn(model(Xb), yb)
    full.backward()
    torch.testing.assert_close(loss, full.detach(), rtol=1e-12, atol=1e-12)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)


def test_micro_batched_backward_gives_kfac_the_factors_of_a_full_batch_step():
    X, y = _data(40, dtype=torch.float32)
    full = _mlp(torch.float32)
    micro = copy.deepcopy(full)
    opt_full, opt_micro = curvopt.KFAC(full.parameters()), curvopt.KFAC(micro.parameters())
    loss_fn = nn.CrossEntropyLoss()
    sched = FixedBatchSize(opt_micro, micro, loss_fn, (X, y), batch_size=40, micro_batch_size=15)
    for Xb, yb in sched:  # one step: the whole data set, micro-batches of 15, 15 and 10
        opt_micro.zero_grad()
        sched.backward(Xb, yb)
        opt_micro.step()
        opt_full.zero_grad()
        loss_fn(full(Xb), yb).backward()
        opt_full.step()
    assert sched.iterations == 1
    for p, q in [(full[0].weight, micro[0].weight), (full[2].weight, micro[2].weight)]:
        for key in ("A", "G"):
            torch.testing.assert_close(opt_micro.state[q][key], opt_full.state[p][key])
    for p, q in zip(full.parameters(), micro.parameters()):
        torch.testing.assert_close(q, p)


def test_sampler_is_seeded_covers_each_epoch_once_and_drops_no_partial_step():
    X, y = _data(50)
    X = torch.arange(50, dtype=torch.float64)[:, None].expand(50, 6).contiguous()
    model = _mlp()
    sched = FixedBatchSize(torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), (X, y),
                           batch_size=8, seed=5)
    epoch0 = [Xb[:, 0].long() for Xb, _ in sched]
    assert [len(b) for b in epoch0] == [8] * 6 and sched.iterations == 6  # 2 samples wait for the next epoch
    assert len(set(torch.cat(epoch0).tolist())) == 48
    sched.step()
    epoch1 = torch.cat([Xb[:, 0].long() for Xb, _ in sched])
    assert not torch.equal(epoch1, torch.cat(epoch0))  # a fresh permutation
    again = FixedBatchSize(torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), (X, y),
                           batch_size=8, seed=5)
    assert torch.equal(torch.cat([Xb[:, 0].long() for Xb, _ in again]), torch.cat(epoch0))
    sched.step()
    list(sched)
    with pytest.warns(RuntimeWarning, match="epoch 2 is over.*call sched.step"):
        assert list(sched) == []
    keep = FixedBatchSize(torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), (X, y),
                          batch_size=8, drop_last=False)
    assert [len(Xb) for Xb, _ in keep] == [8] * 6 + [2]


def _train(sched, opt, model, epochs, stop_after=None):
    """The issue's loop; returns after ``stop_after`` optimizer steps (mid-epoch) if given."""
    loss_fn = sched.loss_fn
    for _ in range(epochs - sched.epoch):
        for X, y in sched:
            opt.zero_grad()
            sched.backward(X, y)
            opt.step()
            if stop_after is not None and sched.iterations == stop_after:
                return
        sched.step()
    assert loss_fn is sched.loss_fn


def _abs(model, opt, data):
    sched = AdaptiveBatchSize(opt, model, nn.CrossEntropyLoss(), data, batch_size=4, max_batch_size=16,
                              probe_size=16, duration=2, check_every=5, micro_batch_size=6, lanczos_steps=8,
                              adversarial=curvopt.schedule.FGSM(0.1), epochs=4, seed=1)
    return sched


def test_bitwise_resume_through_state_dict_mid_run():
    data = _data(40, dtype=torch.float32)
    model = _mlp(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = _abs(model, opt, data)
    start = copy.deepcopy(model.state_dict())
    _train(sched, opt, model, 4)
    assert {h["reason"] for h in sched.history} >= {"duration"}  # the batch grew along the way

    model2 = _mlp(torch.float32)
    model2.load_state_dict(start)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    sched2 = _abs(model2, opt2, data)
    _train(sched2, opt2, model2, 4, stop_after=13)  # mid-epoch 1, after a growth
    buf = io.BytesIO()
    torch.save({"sched": sched2.state_dict(), "opt": opt2.state_dict(), "model": model2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model3 = _mlp(torch.float32, seed=9)
    model3.load_state_dict(saved["model"])
    opt3 = torch.optim.SGD(model3.parameters(), lr=0.05, momentum=0.9)
    opt3.load_state_dict(saved["opt"])
    sched3 = _abs(model3, opt3, data)
    sched3.load_state_dict(saved["sched"])
    assert sched3.batch_size > 4 and sched3.epoch == 1
    _train(sched3, opt3, model3, 4)
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)
    strip = [{k: v for k, v in h.items() if k != "probe_seconds"} for h in sched.history]
    assert strip == [{k: v for k, v in h.items() if k != "probe_seconds"} for h in sched3.history]
    assert sched.iterations == sched3.iterations and sched.batch_size == sched3.batch_size


def test_bad_input_is_refused_naming_the_fix():
    X, y = _data(10)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(OptionError, match="dataset holds 10 samples, fewer than a batch"):
        FixedBatchSize(opt, model, loss_fn, (X, y), batch_size=16)
    with pytest.raises(OptionError, match="max_batch_size=2 is below batch_size=4"):
        IncreaseBatchSize(opt, model, loss_fn, (X, y), batch_size=4, max_batch_size=2, milestones=[1])
    with pytest.raises(EmptyDataError):
        FixedBatchSize(opt, model, loss_fn, (X[:0], y[:0]), batch_size=1)
    with pytest.raises(OptionError, match="batch_size must be a positive integer"):
        FixedBatchSize(opt, model, loss_fn, (X, y), batch_size=0)
    with pytest.raises(OptionError, match="X has 10 samples but y has 9"):
        FixedBatchSize(opt, model, loss_fn, (X, y[:9]), batch_size=2)
    with pytest.raises(OptionError, match="must be a torch.optim.Optimizer"):
        FixedBatchSize(model, model, loss_fn, (X, y), batch_size=2)
    sched = FixedBatchSize(opt, model, nn.CrossEntropyLoss(reduction="none"), (X, y), batch_size=2)
    with pytest.raises(UnsupportedLossError, match="reduction 'none' is not supported.*mean, sum"):
        sched.backward(X[:2], y[:2])
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated


def test_map_style_dataset_is_collated():
    X, y = _data(12)
    model = _mlp()
    ds = [(X[i], y[i]) for i in range(12)]
    sched = FixedBatchSize(torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), ds,
                           batch_size=4, seed=2)
    ref = FixedBatchSize(torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), (X, y),
                         batch_size=4, seed=2)
    for (a, b), (c, d) in zip(sched, ref, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_probes_and_fgsm_passes_leave_no_trace_in_kfac():
    """K-FAC's factors after each step are those of the batch handed out (FGSM examples included), even
    with ``zero_grad()`` placed after the step; a run with probes equals one without, bit for bit."""
    X, y = _data(48, dtype=torch.float32)

    def run(probes):
        model = _mlp(torch.float32)
        opt = curvopt.KFAC(model.parameters(), lr=0.1, factor_decay=0.0, factor_every=1)
        loss_fn = nn.CrossEntropyLoss()
        if probes:
            sched = AdaptiveBatchSize(opt, model, loss_fn, (X, y), batch_size=12, max_batch_size=24,
                                      probe_size=16, duration=100, lanczos_steps=4, lr_scaling="none",
                                      adversarial=curvopt.schedule.FGSM(0.5, fraction=0.5), micro_batch_size=5)
        else:
            sched = FixedBatchSize(opt, model, loss_fn, (X, y), batch_size=12, micro_batch_size=5)
        opt.zero_grad()
        for _ in range(2):
            for Xb, yb in sched:
                sched.backward(Xb, yb)
                opt.step()
                a = torch.cat([Xb, torch.ones(12, 1)], 1)
                torch.testing.assert_close(opt.state[model[0].weight]["A"], a.T @ a / 12)
                opt.zero_grad()
            sched.step()
        opt.close()
        return [p.detach() for p in model.parameters()], sched

    plain, _ = run(False)
    probed, sched = run(True)
    assert len(sched.history) == 2 and sched.history[0]["adversarial_fraction"] == 0.5
    for p, q in zip(plain, probed):
        assert not torch.equal(p, q)  # the FGSM examples changed the run
    # the probes alone (no adversarial examples) leave the run unchanged
    model = _mlp(torch.float32)
    opt = curvopt.KFAC(model.parameters(), lr=0.1, factor_decay=0.0, factor_every=1)
    sched = AdaptiveBatchSize(opt, model, nn.CrossEntropyLoss(), (X, y), batch_size=12, max_batch_size=24,
                              probe_size=16, duration=100, lanczos_steps=4, lr_scaling="none", micro_batch_size=5)
    _train(sched, opt, model, 2)
    opt.close()
    assert len(sched.history) == 2
    for p, q in zip(plain, model.parameters()):
        assert torch.equal(p, q)
