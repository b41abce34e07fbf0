"""FGSM against a hand-computed sign gradient; FB's warm-up and GG's milestones against their formulas."""

import pytest
import torch
from torch import nn

from curvopt.errors import OptionError
from curvopt.schedule import FGSM, FixedBatchSize, IncreaseBatchSize


def test_fgsm_is_the_clamped_sign_of_the_hand_computed_input_gradient_in_eval_mode():
    torch.manual_seed(0)
    X, y = torch.rand(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    lin = nn.Linear(5, 3).double()
    model = nn.Sequential(nn.Dropout(0.5), lin)  # train mode: the dropout would change the gradient
    model.train()
    rng = torch.get_rng_state()
    out = FGSM(0.3, clamp=(0.0, 1.0)).perturb(model, nn.CrossEntropyLoss(), X, y, micro_batch_size=3)
    # d CE / d x = (softmax(W x + b) - onehot(y)) W per sample (the mean's 1/N keeps the sign)
    with torch.no_grad():
        p = torch.softmax(X @ lin.weight.T + lin.bias, 1)
        g = (p - nn.functional.one_hot(y, 3).double()) @ lin.weight
    expected = (X + 0.3 * g.sign()).clamp(0.0, 1.0)
    assert torch.equal(out, expected)
    assert out.min() == 0.0 or out.max() == 1.0  # the clamp was exercised
    assert model.training and model[0].training
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_fgsm_bad_input():
    with pytest.raises(OptionError, match="eps must be a positive number"):
        FGSM(0.0)
    with pytest.raises(OptionError, match="fraction must be in"):
        FGSM(0.1, fraction=1.5)
    with pytest.raises(OptionError, match="needs the data's range"):
        FGSM(0.1).perturb(nn.Linear(2, 2), nn.CrossEntropyLoss(), torch.zeros(1, 2), torch.zeros(1).long())


def _lr_per_step(sched, opt, epochs):
    lrs, sizes = [], []
    for _ in range(epochs):
        for X, y in sched:
            opt.zero_grad()
            sched.backward(X, y)
            lrs.append([g["lr"] for g in opt.param_groups])
            sizes.append(len(X))
            opt.step()
        sched.step()
    return lrs, sizes


def _setup(n=64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.02}])
    return model, opt, (torch.randn(n, 3), torch.randint(0, 2, (n,)))


def test_fb_warmup_follows_goyal_linear_scaling_and_bl_keeps_the_lr():
    model, opt, data = _setup()
    sched = FixedBatchSize(opt, model, nn.CrossEntropyLoss(), data, batch_size=16, base_batch_size=4,
                           warmup_epochs=2)
    lrs, sizes = _lr_per_step(sched, opt, 4)
    T = 2 * (64 // 16)
    for t, (a, b) in enumerate(lrs):
        frac = min(t / T, 1.0)
        assert a == pytest.approx(0.1 + (0.4 - 0.1) * frac) and b == pytest.approx(0.02 + (0.08 - 0.02) * frac)
    assert sizes == [16] * 16
    model, opt, data = _setup()
    bl = FixedBatchSize(opt, model, nn.CrossEntropyLoss(), data, batch_size=16, base_batch_size=16)
    lrs, _ = _lr_per_step(bl, opt, 2)
    assert lrs == [[0.1, 0.02]] * 8
    model, opt, data = _setup()
    FixedBatchSize(opt, model, nn.CrossEntropyLoss(), data, batch_size=16, base_batch_size=4, warmup_epochs=0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.08])


def test_gg_grows_at_milestones_then_decays_the_lr_at_the_cap():
    model, opt, data = _setup()
    sched = IncreaseBatchSize(opt, model, nn.CrossEntropyLoss(), data, batch_size=4, max_batch_size=24,
                              milestones=[2, 4, 5, 6], factor=2)
    lrs, sizes = _lr_per_step(sched, opt, 7)
    per_epoch = [(h["batch_size"], h["reason"]) for h in sched.history]
    # end of epoch 2: 4 -> 8; 4: 8 -> 16; 5: 16 -> 24 (capped, the lr decays by the rest, 2 * 16/24);
    # 6: at the cap, the lr decays by 2
    assert per_epoch == [(4, ""), (8, "milestone"), (8, ""), (16, "milestone"), (24, "milestone"), (24, "cap"),
                         (24, "")]
    assert sizes == [4] * 32 + [8] * 16 + [16] * 4 + [24] * 4
    assert lrs[-1] == pytest.approx([0.1 * (24 / 16) / 2 / 2, 0.02 * (24 / 16) / 2 / 2])
    assert lrs[-3] == pytest.approx([0.1 * (24 / 16) / 2, 0.02 * (24 / 16) / 2])
    assert lrs[0] == lrs[51] == [0.1, 0.02]
    with pytest.raises(OptionError, match="milestones must be increasing"):
        IncreaseBatchSize(opt, model, nn.CrossEntropyLoss(), data, batch_size=4, max_batch_size=8,
                          milestones=[3, 2])
    with pytest.raises(OptionError, match="factor must be a number > 1"):
        IncreaseBatchSize(opt, model, nn.CrossEntropyLoss(), data, batch_size=4, max_batch_size=8,
                          milestones=[1], factor=1)


class _NoLr(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {"momentum": 0.0})

    def step(self, closure=None):
        return None


def test_optimizer_without_lr_is_refused_before_training_where_an_lr_must_change():
    model, _, data = _setup()
    opt = _NoLr(model.parameters())
    with pytest.raises(OptionError, match="_NoLr param group 0 has no 'lr'"):
        IncreaseBatchSize(opt, model, nn.CrossEntropyLoss(), data, batch_size=4, max_batch_size=8,
                          milestones=[1, 2])  # the second milestone would decay the lr
    with pytest.raises(OptionError, match="_NoLr param group 0 has no 'lr'"):
        FixedBatchSize(opt, model, nn.CrossEntropyLoss(), data, batch_size=16, base_batch_size=4)
    gg = IncreaseBatchSize(opt, model, nn.CrossEntropyLoss(), data, batch_size=4, max_batch_size=16,
                           milestones=[1, 2])
    gg.step()
    gg.step()
    assert gg.batch_size == 16
