"""Batch-size schedules on 2 gloo ranks with a DDP model equal one process on the whole batch: the same
parameters after two epochs, the same batch sizes, eigenvalues and growth epochs on every rank."""

import pytest
import torch
from torch import nn

from curvopt.schedule import FGSM, AdaptiveBatchSize, FixedBatchSize, IncreaseBatchSize
from curvopt_tests.distributed_harness import run_ranks

pytestmark = pytest.mark.distributed

N = 37  # odd: the global batches split into unequal shares


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(N, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    y[::5] = -100  # ignored targets: the shares' means divide by counted targets, not samples
    return model, nn.CrossEntropyLoss(ignore_index=-100), (X, y)


def _schedule(kind, model, loss_fn, data):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "fb":
        sched = FixedBatchSize(opt, model, loss_fn, data, batch_size=9, base_batch_size=3, warmup_epochs=1,
                               micro_batch_size=2)
    elif kind == "gg":
        sched = IncreaseBatchSize(opt, model, loss_fn, data, batch_size=5, max_batch_size=11, milestones=[1],
                                  micro_batch_size=3)
    else:  # ABSA: the probe is a distributed operator; FGSM perturbs the first samples of the global batch
        sched = AdaptiveBatchSize(opt, model, loss_fn, data, batch_size=5, max_batch_size=20, duration=1,
                                  probe_size=13, micro_batch_size=4, epochs=4,
                                  adversarial=FGSM(0.1, 0.5))
    return opt, sched


def _train(kind, model, loss_fn, data):
    opt, sched = _schedule(kind, model, loss_fn, data)
    losses, seen = [], 0
    for _ in range(2):
        for X, y in sched:
            seen += len(X)
            opt.zero_grad()
            losses.append(float(sched.backward(X, y)))
            opt.step()
        sched.step()
    sizes = [h["batch_size"] for h in sched.history]
    eigs = [h.get("eigenvalue") for h in sched.history]
    return losses, sizes, eigs, seen


KINDS = ("fb", "gg", "absa")


def _rank(rank, world):
    """Every schedule on this rank (one spawn for all: starting ranks costs seconds), and whether a plain
    model is refused."""
    out = {}
    for kind in KINDS:
        model, loss_fn, data = _problem()
        ddp = nn.parallel.DistributedDataParallel(model)
        losses, sizes, eigs, seen = _train(kind, ddp, loss_fn, data)
        out[kind] = ([p.detach().clone() for p in model.parameters()], losses, sizes, eigs, seen)
    model, loss_fn, data = _problem()
    try:
        FixedBatchSize(torch.optim.SGD(model.parameters(), lr=0.1), model, loss_fn, data, batch_size=4)
        out["plain"] = None
    except Exception as e:  # noqa: BLE001 - the error is the result
        out["plain"] = (type(e).__name__, str(e))
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_rank, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_with_ddp_equal_one_process(kind, two_ranks):
    results = [r[kind] for r in two_ranks]
    model, loss_fn, data = _problem()
    losses, sizes, eigs, seen = _train(kind, model, loss_fn, data)
    assert sum(r[4] for r in results) == seen  # each rank trained on its share of every batch, not all of it
    for params, r_losses, r_sizes, r_eigs, _ in results:
        assert r_sizes == sizes
        torch.testing.assert_close(torch.tensor(r_losses), torch.tensor(losses), rtol=1e-10, atol=1e-12)
        if kind == "absa":
            torch.testing.assert_close(torch.tensor(r_eigs), torch.tensor(eigs), rtol=1e-9, atol=1e-12)
        for p, q in zip(params, model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
    assert results[0][2] == results[1][2] and results[0][3] == results[1][3]  # every rank grew at the same epoch
    if kind == "absa":
        assert len(set(sizes)) > 1  # the schedule did grow


def test_a_model_without_ddp_on_two_ranks_is_refused(two_ranks):
    for r in two_ranks:
        name, message = r["plain"]
        assert name == "OptionError"
        assert "DistributedDataParallel" in message and "2 ranks" in message
