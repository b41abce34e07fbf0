"""NewtonMR, TrustRegion and ARC on 2 gloo ranks, each holding an unequal share of every batch: every rank
takes the same accept/reject sequence and ends with the same parameters as one process stepping on the union
of the shares (also with a sub-sampled curvature, drawn over the global indices); a plain closure and a
failure on one rank give the same error on every rank instead of a hang."""

import warnings

import pytest
import torch
from torch import nn

import curvopt
from curvopt.optim import ClosureError
from curvopt_tests.distributed_harness import run_ranks

pytestmark = pytest.mark.distributed

STEPS = 6
SPLIT = 13  # rank 0 holds the first 13 samples of each batch of 21, rank 1 the other 8
#: (optimizer, options): options chosen so that each run both accepts and rejects steps
CASES = [
    ("NewtonMR", {"lr": 8.0, "max_evaluations": 2, "rtol": 1e-10}),
    ("TrustRegion", {"radius": 10.0, "damping": 0.0, "max_iter": 100, "rtol": 1e-10}),
    ("ARC", {"sigma": 1e-3, "damping": 0.0, "max_iter": 100, "rtol": 1e-10}),
]
FRACTIONS = (1.0, 0.5)


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X = torch.randn(STEPS * 21, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS * 21,))
    return model, X, y


def _train(name, options, fraction, rank=None):
    """Parameters and (loss, accepted, line-search step, evaluations) per step; ``rank=None``: one process
    on whole batches."""
    model, X, y = _problem()
    opt = getattr(curvopt, name)(model.parameters(), curvature="ggn", curvature_fraction=fraction, seed=5,
                                 **options)
    trace = []
    for Xb, yb in zip(X.split(21), y.split(21)):
        if rank is not None:
            part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
            Xb, yb = Xb[part], yb[part]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a non-finite trial point warns
            opt.step(curvopt.batch_closure(model, nn.CrossEntropyLoss(), Xb, yb))
        s = opt.stats
        trace.append((s.loss, s.accepted, s.step_size, s.evaluations))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), trace


def _ranks(rank, world):
    out = {(name, f): _train(name, options, f, rank) for name, options in CASES for f in FRACTIONS}
    model, X, y = _problem()
    errors = []
    opt = curvopt.TrustRegion(model.parameters())

    def plain():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward(create_graph=True)
        return loss

    try:
        opt.step(plain)
    except ClosureError as e:
        errors.append(str(e))
    # rank 1's targets do not fit the model: its loss raises, rank 0's does not; both must raise it
    bad = y if rank == 0 else torch.full_like(y, 7)
    try:
        opt.step(curvopt.batch_closure(model, nn.CrossEntropyLoss(), X, bad))
    except IndexError as e:
        errors.append(str(e))
    return out, errors, {name: _padded(name, rank) for name, _ in CASES}


def _padded(name, rank=None):
    """One step on 8 samples whose last 2 targets are padding, held alone by rank 1: (loss, parameters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    y[6:] = -100
    if rank is not None:
        part = slice(0, 6) if rank == 0 else slice(6, None)
        X, y = X[part], y[part]
    opt = getattr(curvopt, name)(model.parameters(), curvature="ggn", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt.step(curvopt.batch_closure(model, nn.CrossEntropyLoss(), X, y))
    return opt.stats.loss, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_ranks, 2, timeout=180)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("name, options", CASES)
def test_ranks_take_the_steps_of_one_process_on_the_union(ranks, name, options, fraction):
    params, trace = _train(name, options, fraction)
    decisions = [a for _, a, _, _ in trace]
    assert any(decisions) and not all(decisions), f"{name}: {decisions} (the case must accept and reject)"
    (p0, t0), (p1, t1) = ranks[0][0][name, fraction], ranks[1][0][name, fraction]
    assert [s[1:] for s in t0] == [s[1:] for s in t1] == [s[1:] for s in trace]
    assert torch.equal(p0, p1)  # the same global numbers on every rank: the same step, bit for bit
    torch.testing.assert_close(p0, params, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tensor([s[0] for s in t0]), torch.tensor([s[0] for s in trace]),
                               rtol=1e-10, atol=0)


def test_plain_closures_and_one_failing_rank_raise_on_every_rank(ranks):
    plain0, failed0 = ranks[0][1]
    plain1, failed1 = ranks[1][1]
    assert "batch_closure" in plain0 and plain0 == plain1
    assert failed0 == failed1 and failed0.startswith("rank 1: ")


@pytest.mark.parametrize("name", [name for name, _ in CASES])
def test_a_rank_holding_only_ignored_targets_adds_nothing(ranks, name):
    """A share whose targets are all padding weighs 0 (its own mean loss is 0/0): the step is one process's
    (before, its NaN poisoned the global loss and no step was taken)."""
    loss, params = _padded(name)
    for r in ranks:
        r_loss, r_params = r[2][name]
        assert r_loss == pytest.approx(loss, rel=1e-12)
        torch.testing.assert_close(r_params, params, rtol=1e-10, atol=1e-12)
