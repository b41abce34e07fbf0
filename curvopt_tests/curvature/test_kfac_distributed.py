"""The kfac operator on two gloo ranks holding unequal shards equals one process on all the data."""

import warnings

import pytest
import torch
from torch import nn

import curvopt
from curvopt import distributed
from curvopt.errors import EmptyDataError
from curvopt_tests.distributed_harness import run_ranks

pytestmark = pytest.mark.distributed

OPTIONS = [dict(fisher_type="type2"), dict(fisher_type="mc", mc_samples=3, seed=5),
           dict(fisher_type="empirical", kfac_approx="reduce")]


def _problem():
    torch.manual_seed(0)
    # a LayerNorm for the diagonal blocks, a Conv1d for weight sharing
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4), nn.LayerNorm(4),
                          nn.Linear(4, 3)).double()
    X = torch.randn(11, 2, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    return model, X, y


def _shard(rank, X, y):
    # unequal shards and batch counts: 7 samples in batches of 3 on rank 0, 4 in one batch on rank 1
    if rank == 0:
        return list(zip(X[:7].split(3), y[:7].split(3)))
    return [(X[7:], y[7:])]


def _operators(rank, world):
    warnings.simplefilter("ignore")  # the LayerNorm's diagonal-block warning
    model, X, y = _problem()
    out = []
    for kw in OPTIONS:
        op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), _shard(rank, X, y), **kw)
        before = distributed.collective_count()
        dense = op.to_dense()
        out.append((dense, distributed.collective_count() - before))
    try:  # rank 1 has no samples: every rank raises, none hangs
        op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), _shard(0, X, y) if rank == 0 else [])
        op.to_dense()
        out.append(None)
    except EmptyDataError as exc:
        out.append(str(exc))
    return out


def test_two_ranks_equal_one_process_with_one_collective_per_factor_pass():
    ranks = run_ranks(_operators, 2, timeout=180)
    model, X, y = _problem()
    for i, kw in enumerate(OPTIONS):
        with pytest.warns(UserWarning, match="diagonal block"):
            reference = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y), **kw).to_dense()
        for rank in range(2):
            dense, collectives = ranks[rank][i]
            torch.testing.assert_close(dense, reference, rtol=1e-10, atol=1e-12, msg=str(kw))
            # the factor pass's all-reduce, and for "mc" the one all-gather of the shard sizes that keys the draws
            assert collectives == 1 + (kw["fisher_type"] == "mc")
    for rank in range(2):
        assert ranks[rank][-1] is not None and "rank 1" in ranks[rank][-1] and "no samples" in ranks[rank][-1]


def test_mc_draws_do_not_depend_on_the_batching():
    model, X, y = _problem()
    kw = dict(fisher_type="mc", mc_samples=2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y), **kw).to_dense()
        split = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), list(zip(X.split(4), y.split(4))),
                                  **kw).to_dense()
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)
