"""finetune: the straight-through estimator, loss accounting, restoring the model, errors."""

import copy

import pytest
import torch
from torch import nn

from curvopt.errors import EmptyDataError, NonFiniteLossError, QuantizationError
from curvopt.quant.fake import fake_quantized
from curvopt.quant.finetune import finetune
from curvopt.quant.quantizer import Quantizer


def problem(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] + X[:, 2] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()
    return model, X, y


def quantized_loss(model, plan, X, y, quantizer=None):
    was = model.training
    model.eval()
    with fake_quantized(model, plan, quantizer), torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(X), y))
    model.train(was)
    return loss


def test_the_step_uses_the_gradient_at_the_quantized_weights():
    model, X, y = problem()
    plan = {"0": 2, "3": 3}
    q = Quantizer(clipping="minmax")
    # reference: the same network with Q_b(W) written in, differentiated in training mode
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        for name, b in plan.items():
            ref.get_submodule(name).weight.copy_(q.quantize(model.get_submodule(name).weight, b))
    nn.functional.cross_entropy(ref(X), y).backward()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    finetune(model, plan, (X, y), quantizer=q, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    for name, p in model.named_parameters():
        # W <- W - dL/dW at Q(W): the latent weight moves by the gradient taken at the quantized one
        torch.testing.assert_close(p.detach(), start[name] - ref.get_parameter(name).grad, rtol=1e-12, atol=1e-14)


def test_finetuning_lowers_the_quantized_training_loss():
    model, X, y = problem(seed=1)
    plan = {"0": 2, "3": 2}
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, len(X), 16)]
    before = quantized_loss(model, plan, X, y)
    losses = finetune(model, plan, batches, epochs=8, lr=0.02, seed=3)
    after = quantized_loss(model, plan, X, y)
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert after < 0.7 * before
    assert losses[-1] < losses[0]


def test_epoch_losses_are_sample_weighted_means_at_the_quantized_weights():
    model, X, y = problem(seed=2)
    model = model[:1].append(nn.Tanh()).append(model[3])  # no BatchNorm: the batch split does not matter
    plan = {"0": 4}
    batches = [(X[:10], y[:10]), (X[10:11], y[10:11]), (X[11:], y[11:]), (X[:0], y[:0])]
    losses = finetune(model, plan, batches, epochs=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    expected = quantized_loss(model, plan, X, y)
    assert losses == pytest.approx([expected, expected], rel=1e-12)


def test_parameters_modes_and_grads_after_a_run():
    model, X, y = problem()
    model.eval()
    params = list(model.parameters())
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    finetune(model, {"0": 3}, [(X, y)], epochs=2)
    assert seen == [True, True]  # trained in training mode
    assert list(model.parameters()) == params and all(p.grad is None for p in params)
    assert not any(m.training for m in model.modules())


def test_a_non_finite_loss_restores_parameters_and_buffers():
    model, X, y = problem()
    model.train()
    bad = X.clone()
    bad[3, 0] = float("nan")
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    batches = [(X[:32], y[:32]), (X[32:64], y[32:64]), (bad[:32], y[:32])]
    with pytest.raises(NonFiniteLossError, match="finetune: the loss on batch 2 of epoch 0 is nan.*restored"):
        finetune(model, {"0": 2, "3": 2}, batches, lr=0.1)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert model.training


def test_a_tied_weight_gets_the_gradient_of_both_uses():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 5).double()
            self.out = nn.Linear(5, 5, bias=False).double()
            self.out.weight = self.emb.weight

        def forward(self, idx):
            return self.out(self.emb(idx))

    torch.manual_seed(0)
    model = Tied()
    idx = torch.tensor([0, 1, 2, 3, 4, 2])
    y = torch.tensor([1, 2, 3, 4, 0, 0])
    q = Quantizer(clipping="minmax")
    W = model.emb.weight.detach().clone()
    Wq = q.quantize(W, 4).requires_grad_()  # both owners at the largest bits, 4
    nn.functional.cross_entropy(nn.functional.embedding(idx, Wq) @ Wq.T, y).backward()
    finetune(model, {"emb": 2, "out": 4}, (idx, y), quantizer=q, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    torch.testing.assert_close(model.emb.weight.detach(), W - Wq.grad, rtol=1e-12, atol=1e-14)


def test_bad_requests_are_clear_errors():
    model, X, y = problem()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(QuantizationError, match="no quantizable module 'fc'"):
        finetune(model, {"fc": 4}, (X, y))
    for bad in (0, 1.5):
        with pytest.raises(QuantizationError, match="epochs"):
            finetune(model, {"0": 4}, (X, y), epochs=bad)
    for bad in (0, -1e-3, float("nan")):
        with pytest.raises(QuantizationError, match="lr"):
            finetune(model, {"0": 4}, (X, y), lr=bad)
    with pytest.raises(QuantizationError, match="one-shot iterator"):
        finetune(model, {"0": 4}, ((X, y) for _ in range(2)), epochs=2)
    with pytest.raises(EmptyDataError, match="epoch 0 holds no samples"):
        finetune(model, {"0": 4}, [])
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
