"""ABS/ABSA: the growth rule on a mocked probe, the real probe's eigenvalue and its side effects, bad input."""

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvopt
from curvopt.errors import OptionError
from curvopt.schedule import FGSM, AdaptiveBatchSize


def _problem(n=64, seed=0):
    torch.manual_seed(seed)
    X, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, nn.CrossEntropyLoss(), (X, y)


def _mocked(values, ses=None, **kwargs):
    """A schedule whose probe returns the given eigenvalues (and standard errors, default 0) in turn."""
    model, loss_fn, data = _problem()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.01}])
    options = {"batch_size": 2, "max_batch_size": 16, "duration": 3} | kwargs
    sched = AdaptiveBatchSize(opt, model, loss_fn, data, **options)
    ses = ses or [0.0] * len(values)
    answers = iter(zip(values, ses))
    sched.probe = lambda: (lambda v, s: ([v] if not isinstance(v, list) else v, [s] if not isinstance(s, list)
                                         else s))(*next(answers))
    return sched, opt


def _run_checks(sched, k):
    for _ in range(k):
        sched.step()
    return [(h["batch_size"], h["reference"], h["reason"]) for h in sched.history]


def test_halving_grows_and_resets_the_reference_duration_keeps_it():
    sched, opt = _mocked([10.0, 6.0, 5.0, 4.0, 2.4, 2.3, 2.2])
    got = _run_checks(sched, 7)
    assert got == [
        (2, None, ""),            # first check: the reference is set to 10
        (2, 10.0, ""),            # 6 > 10/2: no growth (2 checks without growth)
        (4, 10.0, "eigenvalue"),  # 5 <= 10/2: growth, the reference resets to 5
        (4, 5.0, ""),             # 4 > 5/2
        (8, 5.0, "eigenvalue"),   # 2.4 <= 2.5
        (8, 2.4, ""),
        (8, 2.4, ""),
    ]
    assert sched.reference == [2.4]
    sched2, _ = _mocked([10.0, 9.0, 9.0, 9.0, 4.9])
    got2 = _run_checks(sched2, 5)
    # the 3rd check without growth grows anyway and keeps the reference (10): 4.9 <= 10/2 still triggers
    assert [g[2] for g in got2] == ["", "", "duration", "", "eigenvalue"]
    assert [g[0] for g in got2] == [2, 2, 4, 4, 8]
    assert got2[3][1] == 10.0


def test_growth_is_capped_and_lr_scales_per_group():
    sched, opt = _mocked([10.0, 5.0, 2.5, 1.25, 0.6], max_batch_size=6)
    got = _run_checks(sched, 5)
    assert [g[0] for g in got] == [2, 4, 6, 6, 6]
    assert [g[2] for g in got] == ["", "eigenvalue", "eigenvalue", "cap", "cap"]
    # linear: lr * 6/2 in every group
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.3, 0.03])
    for scaling, factor in (("sqrt", math.sqrt(2)), ("none", 1.0)):
        sched, opt = _mocked([10.0, 5.0], lr_scaling=scaling)
        _run_checks(sched, 2)
        assert sched.batch_size == 4
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, 0.01 * factor])


def test_a_drop_within_twice_the_standard_error_does_not_trigger():
    # drop 10 -> 5 with errors 2 and 1.5: sqrt(4 + 2.25) = 2.5, twice that is 5 = the drop: no growth
    sched, _ = _mocked([10.0, 5.0, 4.9], ses=[2.0, 1.5, 0.0])
    got = _run_checks(sched, 3)
    assert [g[2] for g in got] == ["", "", "eigenvalue"]
    assert sched.history[1]["std_error"] == 1.5


def test_blockwise_grows_only_when_every_block_dropped():
    sched, _ = _mocked([[10.0, 4.0], [5.0, 3.0], [5.0, 2.0]], ses=[[0.0, 0.0]] * 3, blockwise=True)
    got = _run_checks(sched, 3)
    assert [g[2] for g in got] == ["", "", "eigenvalue"]
    assert sched.history[2]["reference"] == [10.0, 4.0] and sched.reference == [5.0, 2.0]


def test_non_finite_eigenvalue_warns_and_keeps_everything():
    sched, opt = _mocked([10.0, float("nan"), float("inf"), 5.0], duration=2)
    with pytest.warns(RuntimeWarning, match="not finite"):
        got = _run_checks(sched, 4)
    # the non-finite checks count neither as growth nor towards duration; the reference is kept
    assert [g[2] for g in got] == ["", "non-finite", "non-finite", "eigenvalue"]
    assert [g[0] for g in got] == [2, 2, 2, 4]


def test_adversarial_fraction_halves_at_growth_and_stops_at_the_cap_and_half_time():
    sched, _ = _mocked([10.0, 5.0, 2.5, 1.0], adversarial=FGSM(0.1, fraction=0.4), epochs=20,
                       max_batch_size=8)
    fractions = [sched.adversarial_fraction]
    for _ in range(3):
        sched.step()
        fractions.append(sched.adversarial_fraction)
    assert fractions == [0.4, 0.4, 0.2, 0.0]  # grows at checks 2 (to 4) and 3 (to 8 = the cap)
    sched, _ = _mocked([10.0] * 12, adversarial=FGSM(0.1, fraction=0.4), epochs=10, duration=100)
    fractions = []
    for _ in range(10):
        fractions.append(sched.adversarial_fraction)
        sched.step()
    assert fractions == [0.4] * 5 + [0.0] * 5


def test_adversarial_batches_replace_that_fraction_by_fgsm_examples():
    model, loss_fn, (X, y) = _problem(n=40)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AdaptiveBatchSize(opt, model, loss_fn, (X, y), batch_size=10, max_batch_size=20,
                              adversarial=FGSM(0.05, fraction=0.3), seed=3)
    Xb, yb = next(iter(sched))
    perm = sched._permutation(0)[:10]
    clean = X[perm]
    fgsm = FGSM(0.05, clamp=(float(X.min()), float(X.max()))).perturb(model, loss_fn, clean[:3], y[perm][:3])
    torch.testing.assert_close(Xb[:3], fgsm, rtol=0, atol=0)
    torch.testing.assert_close(Xb[3:], clean[3:], rtol=0, atol=0)
    assert torch.equal(yb, y[perm])


def test_probe_matches_dense_hessian_and_restores_mode_buffers_and_rng():
    torch.manual_seed(0)
    X, y = torch.randn(48, 4, dtype=torch.float64), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).double()
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AdaptiveBatchSize(opt, model, loss_fn, (X, y), batch_size=4, max_batch_size=8, probe_size=32,
                              micro_batch_size=16, lanczos_steps=60, tol=1e-10)
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    eigs, ses = sched.probe()
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())
    # dense reference: eval-mode Hessian of the mean loss over the 32 probe samples (reverse over reverse)
    Xp = torch.cat([b[0] for b in sched.probe_batches()])
    yp = torch.cat([b[1] for b in sched.probe_batches()])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    model.eval()

    def loss_of(theta):
        parts = torch.split(theta, [math.prod(s) for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(torch.func.functional_call(model, params, (Xp,)), yp)

    H = torch.autograd.functional.hessian(loss_of, flat)
    model.train()
    top = torch.linalg.eigvalsh(H)[-1].item()
    assert eigs[0] == pytest.approx(top, rel=1e-8)
    assert 0 <= ses[0] < 1e-6
    # the warm start: the next probe begins at the last Ritz vector and converges at once
    sched.lanczos_steps = 3
    eigs2, _ = sched.probe()
    assert eigs2[0] == pytest.approx(top, rel=1e-8)
    # blockwise: one top eigenvalue per module, those of the diagonal blocks of H
    sched.blockwise, sched.lanczos_steps, sched._ritz = True, 60, None
    eigs3, _ = sched.probe()
    sizes = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model if list(m.parameters())]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    dense = [torch.linalg.eigvalsh(H[a:a + n, a:a + n])[-1].item() for a, n in zip(starts, sizes)]
    assert len(eigs3) == 3 and eigs3 == pytest.approx(dense, rel=1e-8)


def test_bad_input_is_refused_naming_the_option():
    model, loss_fn, data = _problem(n=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OptionError, match="max_batch_size=4 is below batch_size=8"):
        AdaptiveBatchSize(opt, model, loss_fn, data, batch_size=8, max_batch_size=4)
    with pytest.raises(OptionError, match="32 samples, fewer than a batch"):
        AdaptiveBatchSize(opt, model, loss_fn, data, batch_size=8, max_batch_size=64)
    with pytest.raises(OptionError, match="lr_scaling"):
        AdaptiveBatchSize(opt, model, loss_fn, data, batch_size=8, max_batch_size=16, lr_scaling="cubic")
    with pytest.raises(OptionError, match="kappa"):
        AdaptiveBatchSize(opt, model, loss_fn, data, batch_size=8, max_batch_size=16, kappa=1)
    with pytest.raises(OptionError, match="unknown option.*'cahce'"):
        AdaptiveBatchSize(opt, model, loss_fn, data, batch_size=8, max_batch_size=16,
                          curvature_options={"cahce": True})
    with pytest.raises(curvopt.errors.UnknownCurvatureError, match="hessain"):
        AdaptiveBatchSize(opt, model, loss_fn, data, batch_size=8, max_batch_size=16, curvature="hessain")


class _NoLr(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {"momentum": 0.0})

    def step(self, closure=None):
        return None


def test_optimizer_without_lr_needs_lr_scaling_none():
    model, loss_fn, data = _problem(n=32)
    opt = _NoLr(model.parameters())
    with pytest.raises(OptionError, match="_NoLr param group 0 has no 'lr'.*lr_scaling='none'"):
        AdaptiveBatchSize(opt, model, loss_fn, data, batch_size=4, max_batch_size=8)
    sched = AdaptiveBatchSize(opt, model, loss_fn, data, batch_size=4, max_batch_size=8, lr_scaling="none",
                              duration=1)
    sched.probe = lambda: ([1.0], [0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()
        sched.step()
    assert sched.batch_size == 8 and sched.lr is None


def test_checks_every_n_steps_run_once_each_also_across_epochs():
    sched, _ = _mocked([10.0] * 40, check_every=3, max_batch_size=4, duration=100)
    for _ in range(3):
        for _batch in sched:  # 32 steps per epoch at batch 2: checks after steps 3, 6, ..., 96
            pass
        sched.step()
    assert [h["iterations"] for h in sched.history] == list(range(3, 97, 3))
    assert [h["epoch"] for h in sched.history] == [0] * 10 + [1] * 11 + [2] * 11
    assert sched.iterations == 96
    next(iter(sched))  # no second check at 96 in the next epoch
    assert len(sched.history) == 32


def test_a_real_probe_with_a_non_finite_loss_warns_and_training_continues():
    model, loss_fn, (X, y) = _problem(n=32)
    X = X.clone()
    X[5] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AdaptiveBatchSize(opt, model, loss_fn, (X, y), batch_size=4, max_batch_size=8, probe_size=32,
                              lanczos_steps=4, duration=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="not finite.*batch size stays 4 and training continues"):
        sched.step()
        sched.step()
    assert sched.batch_size == 4 and [h["reason"] for h in sched.history] == ["non-finite"] * 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(list(sched)) == 8  # the sampler goes on


@given(values=st.lists(st.one_of(st.floats(0.01, 100.0), st.just(float("nan"))), min_size=1, max_size=25),
       duration=st.integers(1, 5), kappa=st.floats(1.1, 4.0))
def test_growth_rule_invariants_on_any_eigenvalue_sequence(values, duration, kappa):
    sched, opt = _mocked(values, duration=duration, kappa=kappa, max_batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _run_checks(sched, len(values))
    sizes = [2] + [h["batch_size"] for h in sched.history]
    assert all(a <= b <= 32 for a, b in zip(sizes, sizes[1:]))
    grew = [b > a for a, b in zip(sizes, sizes[1:])]
    assert grew == [h["reason"] in ("eigenvalue", "duration") for h in sched.history]
    # linear scaling: every group's lr stays proportional to the batch
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * sizes[-1] / 2, 0.01 * sizes[-1] / 2])
    since = 0
    for h in sched.history:
        e, r = h["eigenvalue"], h["reference"]
        if h["reason"] == "non-finite":
            assert math.isnan(e)
            continue
        if h["reason"] == "eigenvalue":
            assert e <= r / kappa
        elif r is not None and h["reason"] == "":
            assert e > r / kappa  # with zero standard errors any drop to 1/kappa triggers
        since = 0 if h["reason"] in ("eigenvalue", "duration", "cap") else since + 1
        assert since < duration
