"""Analysis functions on the models and data users bring: empty data, generators, tied weights,
transformers, train-mode BatchNorm and Dropout, padding targets and plain summing losses.

References are dense float64 Hessians by reverse-over-reverse (``torch.autograd.functional.hessian``).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call

import curvopt
from curvopt.curvature.model_state import curvature_pass
from curvopt.errors import EmptyDataError
from curvopt_tests.problems import assert_same_state, model_state


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    return model, X, y


def _exact_block_traces(model, loss_fn, X, y):
    """``{parameter name: trace of its diagonal Hessian block}`` of the loss on ``(X, y)``."""
    named = list(model.named_parameters())  # tied parameters once, under their first name
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def risk(t):
        moved = {n: s.reshape(p.shape) for (n, p), s in zip(named, t.split(sizes))}
        return loss_fn(functional_call(model, moved, (X,)), y)

    with curvature_pass(model):
        H = hessian(risk, theta)
    return {n: float(d.sum()) for (n, _), d in zip(named, H.diagonal().split(sizes))}


# ----------------------------------------------------------------------------- empty and one-shot data
@pytest.mark.parametrize("data", [[], [(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))]])
def test_sensitivity_of_empty_data_names_the_argument(data):
    model, *_ = _mlp()
    with pytest.raises(EmptyDataError, match=r"sensitivity\(loader=\.\.\.\)"):
        curvopt.sensitivity(model, data)


def test_loss_landscape_refuses_a_generator_and_empty_data():
    model, X, y = _mlp()
    d = curvopt.random_direction(model)
    with pytest.raises(TypeError, match=r"loss_landscape\(data=\.\.\.\): .*one-shot iterator.*DataLoader"):
        curvopt.loss_landscape(model, nn.CrossEntropyLoss(), ((X, y) for _ in range(2)), [d], steps=3)
    with pytest.raises(EmptyDataError, match=r"loss_landscape\(data=\.\.\.\)"):
        curvopt.loss_landscape(model, nn.CrossEntropyLoss(), [], [d], steps=3)
    with pytest.raises(TypeError, match=r"sensitivity\(loader=\.\.\.\): .*one-shot iterator"):
        curvopt.sensitivity(model, ((X, y) for _ in range(2)))


# ----------------------------------------------------------------------------- tied weights
class _TiedLM(nn.Module):
    """An embedding tied to the output layer (the usual language-model head)."""

    def __init__(self, vocab=5, width=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mid(self.emb(tokens))))


def test_sensitivity_counts_a_tied_parameter_once_under_its_first_owner():
    torch.manual_seed(1)
    model = _TiedLM().double()
    T, Y = torch.randint(0, 5, (12,)), torch.randint(0, 5, (12,))
    P = sum(p.numel() for p in model.parameters())  # 15 + 12 + 5: the tie counted once
    # Hutch++ with a sketch of >= P columns spans the whole space: block traces are exact
    report = curvopt.sensitivity(model, [(T[:7], Y[:7]), (T[7:], Y[7:])], probes=3 * P + 3)
    exact = _exact_block_traces(model, nn.CrossEntropyLoss(), T, Y)
    assert report["emb"].status == "ok" and report["emb"].numel == 15
    assert report["out"].status == "ok" and report["out"].numel == 5  # its bias only
    assert report["out"].shared == {"out.weight": "emb.weight"}
    assert math.isclose(report["emb"].trace, exact["emb.weight"], rel_tol=1e-8, abs_tol=1e-10)
    assert math.isclose(report["out"].trace, exact["out.bias"], rel_tol=1e-8, abs_tol=1e-10)
    assert math.isclose(report.total_trace, sum(exact.values()), rel_tol=1e-8)
    assert "out.weight is emb.weight" in str(report)


def test_a_module_with_only_tied_parameters_is_reported_as_tied():
    torch.manual_seed(2)
    model = _TiedLM().double()
    model.out = nn.Linear(3, 5, bias=False).double()
    model.out.weight = model.emb.weight
    T, Y = torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,))
    report = curvopt.sensitivity(model, (T, Y), probes=9)
    assert report["out"].status == "tied" and report["out"].shared == {"out.weight": "emb.weight"}
    assert set(report.ranking()) == {"emb", "mid"}
    assert "tied to emb.weight" in str(report)


# ----------------------------------------------------------------------------- transformers
class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.1, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def test_sensitivity_of_a_transformer_counts_out_proj_exactly():
    torch.manual_seed(3)
    model = _Encoder().double()
    X, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    P = sum(p.numel() for p in model.parameters())
    report = curvopt.sensitivity(model, (X, y), probes=3 * P + 3)
    assert report["enc.self_attn.out_proj"].status == "ok"  # its forward never runs; its weights do
    assert "enc.self_attn.out_proj" in report.ranking()
    model.eval()  # sensitivity's curvature is the eval-mode model's
    exact = _exact_block_traces(model, nn.CrossEntropyLoss(), X, y)
    model.train()
    for module, names in [("enc.self_attn.out_proj", ["weight", "bias"]),
                          ("enc.self_attn", ["in_proj_weight", "in_proj_bias"]), ("head", ["weight", "bias"])]:
        ref = sum(exact[f"{module}.{n}"] for n in names)
        assert math.isclose(report[module].trace, ref, rel_tol=1e-7, abs_tol=1e-9), module


# ----------------------------------------------------------------------------- looking changes nothing
class _BNDrop(nn.Module):
    def __init__(self, dropout=0.3):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _bn_problem(dropout=0.3):
    torch.manual_seed(4)
    model = _BNDrop(dropout).double().train()
    X, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    return model, [(X[:9], y[:9]), (X[9:], y[9:])], X, y


def test_loss_landscape_leaves_train_mode_batchnorm_dropout_and_rng_as_found():
    model, data, *_ = _bn_problem()
    d = curvopt.random_direction(model, seed=0)
    before = model_state(model)
    first = curvopt.loss_landscape(model, nn.CrossEntropyLoss(), data, [d], steps=3)
    assert_same_state(model, before)
    second = curvopt.loss_landscape(model, nn.CrossEntropyLoss(), data, [d], steps=3)
    assert torch.equal(first.losses, second.losses)  # one dropout mask per batch: one function


def test_loss_landscape_in_train_mode_is_the_batch_statistics_loss():
    model, data, X, y = _bn_problem(dropout=0.0)
    d = curvopt.random_direction(model, seed=1)
    land = curvopt.loss_landscape(model, nn.CrossEntropyLoss(), data, [d], steps=3, radius=0.5)
    ref = copy.deepcopy(model)  # train mode: each batch normalized by its own statistics
    with torch.no_grad():
        expected = sum(len(yb) * float(F.cross_entropy(ref(Xb), yb)) for Xb, yb in data) / len(y)
    assert math.isclose(float(land.losses[1]), expected, rel_tol=1e-12)


def test_sensitivity_leaves_train_mode_batchnorm_dropout_and_rng_as_found():
    model, data, *_ = _bn_problem()
    before = model_state(model)
    report = curvopt.sensitivity(model, data, probes=6, top_eigenvalue=True)
    assert_same_state(model, before)
    assert report["bn"].status == "ok"


# ----------------------------------------------------------------------------- the loss over all batches
def test_loss_landscape_is_the_loss_torch_computes_over_all_batches():
    model, X, y = _mlp()
    y = y.clone()
    y[[0, 1, 2, 7]] = -100  # padding targets, unevenly spread over the batches
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    d = curvopt.random_direction(model, seed=2)
    with torch.no_grad():
        mean = float(F.cross_entropy(model(X), y))
        total = float(F.cross_entropy(model(X), y, reduction="sum"))
    land = curvopt.loss_landscape(model, nn.CrossEntropyLoss(), data, [d], steps=3)
    assert math.isclose(float(land.losses[1]), mean, rel_tol=1e-12)

    def summed(out, target):  # a plain function that sums: not a mean of the batch losses
        return F.cross_entropy(out, target, reduction="sum")

    land = curvopt.loss_landscape(model, summed, data, [d], steps=3)
    assert math.isclose(float(land.losses[1]), total, rel_tol=1e-12)


def test_loss_landscape_with_one_step_is_the_trained_point():
    model, X, y = _mlp()
    d = curvopt.random_direction(model, seed=3)
    land = curvopt.loss_landscape(model, nn.CrossEntropyLoss(), (X, y), [d], steps=1)
    assert land.alphas.tolist() == [0.0]
    with torch.no_grad():
        assert math.isclose(float(land.losses[0]), float(F.cross_entropy(model(X), y)), rel_tol=1e-12)
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            curvopt.loss_landscape(model, nn.CrossEntropyLoss(), (X, y), [d], steps=bad)
