"""Data-parallel curvature: ranks holding shards of the data (unequal sizes, unequal batch counts) give the
single-process operator on all of it, in one collective per product; failures on one rank are raised on
every rank; a DDP-wrapped model works, an FSDP-sharded one is refused with the reason."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import curvopt
from curvopt import distributed
from curvopt_tests.distributed_harness import run_ranks

N = 11
#: Per world size, each rank's (start, stop, batch size): unequal shards, unequal batch counts.
SHARDS = {2: [(0, 7, 3), (7, 11, 4)], 3: [(0, 5, 2), (5, 8, 3), (8, 11, 2)]}
#: name -> options; fisher's labels are keyed by the global sample index, so it compares exactly too.
BACKENDS = {
    "hessian": {},
    "ggn": {},
    "fisher": {"mc_samples": 2, "seed": 3},
    "empirical_fisher": {},
    "kfac": {},
    "block_diagonal": {"base": "ggn"},
}


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(N, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    return model, X, y


def _shard(rank, world, X, y):
    start, stop, size = SHARDS[world][rank]
    return list(zip(X[start:stop].split(size), y[start:stop].split(size)))


def _operators(rank, world):
    model, X, y = _problem()
    batches = _shard(rank, world, X, y)
    out = {}
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))
    for name, options in BACKENDS.items():
        op = curvopt.curvature(name, model, nn.CrossEntropyLoss(), batches, **options)
        dense = op.to_dense()
        counts = []
        for x in (v[:, 0], v):  # one vector, then a matrix: one collective each, whatever the batches
            before = distributed.collective_count()
            op @ x
            counts.append(distributed.collective_count() - before)
        out[name] = (dense, counts)
    return out


def _check_operators(world):
    results = run_ranks(_operators, world, timeout=180)
    model, X, y = _problem()
    for name, options in BACKENDS.items():
        reference = curvopt.curvature(name, model, nn.CrossEntropyLoss(), (X, y), **options).to_dense()
        for rank, result in enumerate(results):
            dense, counts = result[name]
            torch.testing.assert_close(dense, reference, rtol=1e-12, atol=1e-14, msg=f"{name} rank {rank}")
            # kfac multiplies by its all-reduced factors: no data pass, no collective per product
            assert counts == ([0, 0] if name == "kfac" else [1, 1]), (name, counts)


@pytest.mark.distributed
def test_every_backend_on_two_ranks_equals_one_process_on_all_data():
    _check_operators(2)


@pytest.mark.distributed
@pytest.mark.slow
def test_every_backend_on_three_ranks_equals_one_process_on_all_data():
    _check_operators(3)


def _outcome(name, model, data):
    """What building ``name`` on ``data`` and taking its dense matrix raised on this rank, if anything."""
    try:
        curvopt.curvature(name, model, nn.CrossEntropyLoss(), data).to_dense()
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
        return type(exc).__name__, str(exc)
    return None


def _failures(rank, world):
    model, X, y = _problem()
    batches = _shard(rank, world, X, y)
    out = {}
    for name in ("hessian", "ggn", "fisher", "kfac"):
        # a NaN input on rank 1's second batch: its loss is NaN
        bad = [(Xb.clone(), yb) for Xb, yb in batches]
        if rank == 1:
            bad.insert(0, (X[:2], y[:2]))
            bad[1][0][0, 0] = float("nan")
        out["nan", name] = _outcome(name, model, bad)
        # rank 0 holds no data at all
        out["empty", name] = _outcome(name, model, [] if rank == 0 else batches)
        # a batch whose product raises on rank 0 only (inputs of the wrong width)
        wrong = [(torch.randn(2, 5, dtype=torch.float64), y[:2])] if rank == 0 else batches
        out["raises", name] = _outcome(name, model, wrong)
    # after all that, the group still works: a clean product on every rank
    out["after"] = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), batches).to_dense()
    return out


@pytest.mark.distributed
def test_a_failure_on_one_rank_is_raised_on_every_rank():
    r0, r1 = run_ranks(_failures, 2, timeout=180)
    for name in ("hessian", "ggn", "fisher", "kfac"):
        nan, empty, raises = r0["nan", name], r0["empty", name], r0["raises", name]
        assert (nan, empty, raises) == (r1["nan", name], r1["empty", name], r1["raises", name]), name
        assert nan[0] == "NonFiniteLossError" and nan[1].startswith("rank 1: the loss on batch 1 is nan"), nan
        assert empty[0] == "EmptyDataError" and empty[1].startswith("rank 0: this rank's data holds no samples")
        assert raises[0] == "RuntimeError" and raises[1].startswith("rank 0: batch 0: "), raises
    model, X, y = _problem()
    reference = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), (X, y)).to_dense()
    torch.testing.assert_close(r0["after"], reference, rtol=1e-12, atol=1e-14)


def _ddp(rank, world):
    model, X, y = _problem()
    ddp = nn.parallel.DistributedDataParallel(model)
    batches = _shard(rank, world, X, y)
    out = {}
    for name in ("ggn", "kfac", "fisher"):
        op = curvopt.curvature(name, ddp, nn.CrossEntropyLoss(), batches)
        out[name] = op.to_dense()
    op = curvopt.curvature("hessian", ddp, nn.CrossEntropyLoss(), batches, params=["module.2.weight", "2.bias"])
    out["names"] = op.param_names
    out["sub"] = op.to_dense()
    out["grads_untouched"] = all(p.grad is None for p in ddp.parameters())
    # the wrapper still trains: its reducer is in a clean state after the curvature passes
    start, stop, _ = SHARDS[world][rank]
    nn.CrossEntropyLoss()(ddp(X[start:stop]), y[start:stop]).backward()
    out["grad"] = ddp.module[0].weight.grad.clone()
    return out


@pytest.mark.distributed
def test_a_ddp_wrapped_model_works_and_its_reducer_stays_out_of_the_passes():
    r0, r1 = run_ranks(_ddp, 2, timeout=120)
    model, X, y = _problem()
    for name in ("ggn", "kfac", "fisher"):
        reference = curvopt.curvature(name, model, nn.CrossEntropyLoss(), (X, y)).to_dense()
        for r in (r0, r1):
            torch.testing.assert_close(r[name], reference, rtol=1e-12, atol=1e-14)
    sub = curvopt.curvature("hessian", model, nn.CrossEntropyLoss(), (X, y), params=["2.weight", "2.bias"])
    for r in (r0, r1):
        assert r["names"] == ["2.weight", "2.bias"] and r["grads_untouched"]
        torch.testing.assert_close(r["sub"], sub.to_dense(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r0["grad"], r1["grad"])  # DDP averaged them


def test_an_fsdp_sharded_model_is_refused_with_the_reason():
    from torch.distributed.fsdp import FSDPModule

    model, X, y = _problem()
    # what fully_shard does to a module's class, without a process group to shard over
    model[2].__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {"_orig_cls_mro_index": 2})
    with pytest.raises(curvopt.errors.UnsupportedModuleError, match=r"module '2' \(FSDPLinear\).*pytorch#172543"):
        curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), (X, y))
    assert not dist.is_initialized()


@pytest.mark.parametrize("loss", ["ce", "ce_padded", "ce_soft", "mse", "bce"])
def test_fisher_labels_do_not_depend_on_batching(loss):
    """Keyed by the global sample index (by the counted target for cross entropy), the Monte-Carlo labels
    of a sample are the same whatever batch it sits in: what lets ranks reproduce one process."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(9, 3, dtype=torch.float64)
    if loss == "ce_soft":  # class probabilities: one draw per sample, not per class entry
        loss_fn, y = nn.CrossEntropyLoss(), torch.softmax(torch.randn(9, 3, dtype=torch.float64), 1)
    elif loss.startswith("ce"):
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (9,))
    elif loss == "mse":
        loss_fn, y = nn.MSELoss(), torch.randn(9, 3, dtype=torch.float64)
    else:
        loss_fn, y = nn.BCEWithLogitsLoss(), torch.rand(9, 3, dtype=torch.float64).round()
    whole = curvopt.curvature("fisher", model, loss_fn, (X, y), mc_samples=3).to_dense()
    batches = [(X[:2], y[:2]), (X[2:7], y[2:7]), (X[7:], y[7:])]
    if loss == "ce_padded":  # padding in the middle of a batch takes no draw
        pad = (torch.randn(2, 3, dtype=torch.float64), y.new_full((2,), -100))
        batches[1] = (torch.cat([X[2:4], pad[0], X[4:7]]), torch.cat([y[2:4], pad[1], y[4:7]]))
    split = curvopt.curvature("fisher", model, loss_fn, batches, mc_samples=3).to_dense()
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)
    other_seed = curvopt.curvature("fisher", model, loss_fn, (X, y), mc_samples=3, seed=1).to_dense()
    assert not torch.allclose(other_seed, whole)


BACKPACK = ("backpack_diag_ggn", "backpack_diag_hessian", "backpack_kflr")


def _backpack(rank, world):
    model, X, y = _problem()
    batches = _shard(rank, world, X, y)
    out = {}
    for name in BACKPACK:
        out[name] = curvopt.curvature(name, model, nn.CrossEntropyLoss(), batches).to_dense()
    out["empty"] = _outcome("backpack_diag_ggn", model, [] if rank == 1 else batches)
    return out


@pytest.mark.distributed
@pytest.mark.optional
def test_backpack_backends_on_two_ranks_equal_one_process():
    pytest.importorskip("backpack")
    r0, r1 = run_ranks(_backpack, 2, timeout=120)
    model, X, y = _problem()
    for name in BACKPACK:
        reference = curvopt.curvature(name, model, nn.CrossEntropyLoss(), (X, y)).to_dense()
        for r in (r0, r1):
            torch.testing.assert_close(r[name], reference, rtol=1e-12, atol=1e-14, msg=name)
    assert r0["empty"] == r1["empty"] and r0["empty"][0] == "EmptyDataError"
    assert r0["empty"][1].startswith("rank 1: this rank's data holds no samples")
