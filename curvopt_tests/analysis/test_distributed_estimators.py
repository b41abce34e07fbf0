"""Estimators under a process group: the same probes on every rank (whatever each rank's global random
state), so every rank gets bitwise the same result, equal to one process on all the data. The data-only
sensitivity scores (GPTQ's input moments, measured loss increases) go through the same data loop."""

import dataclasses

import pytest
import torch
from torch import nn

import curvopt
from curvopt_tests.distributed_harness import run_ranks

pytestmark = pytest.mark.distributed

N = 13
SHARDS = {2: [(0, 8, 3), (8, 13, 5)], 3: [(0, 4, 3), (4, 9, 2), (9, 13, 4)]}


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(N, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    return model, X, y


def _estimates(model, data):
    op = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), data)
    top = curvopt.top_eigenvalues(op, 2, tol=1e-8)
    tr = curvopt.trace(op, 16, per_block=True)
    grid, density = curvopt.spectral_density(op, probes=2, steps=8, grid_size=40)
    report = curvopt.sensitivity(model, data, nn.CrossEntropyLoss(), probes=16, top_eigenvalue=True)
    layers = {layer.name: {k: v for k, v in dataclasses.asdict(layer).items() if isinstance(v, float)}
              for layer in report.layers}
    gptq = curvopt.sensitivity(model, data, nn.CrossEntropyLoss(), score="gptq", probes=0)
    measured = curvopt.sensitivity(model, data, nn.CrossEntropyLoss(), score="measured", probes=0)
    return {
        "gptq": gptq.input_moments,
        "measured": (measured.full_precision_loss, {layer.name: layer.measured_raw for layer in measured.layers}),
        "top": top.eigenvalues,
        "trace": (tr.value, tr.stderr, tr.blocks),
        "density": (grid, density),
        "sensitivity": (report.total_trace, report.total_trace_se, layers),
    }


def _on_ranks(rank, world):
    model, X, y = _problem()
    torch.manual_seed(1000 + rank)  # a different global random state per rank: probes must not use it
    start, stop, size = SHARDS[world][rank]
    estimates = _estimates(model, list(zip(X[start:stop].split(size), y[start:stop].split(size))))
    try:  # the last rank holds no data: every rank raises, none waits for it
        curvopt.sensitivity(model, [] if rank == world - 1 else [(X[start:stop], y[start:stop])],
                            nn.CrossEntropyLoss(), probes=4)
        empty = None
    except Exception as exc:  # noqa: BLE001 - compared across ranks
        empty = (type(exc).__name__, str(exc))
    return estimates, empty


def _flat(result):
    """Every number of a result, in a fixed order (floats and tensors as float64 tensors)."""
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x.detach().reshape(-1).double())
        elif isinstance(x, dict):
            for key in sorted(x):
                walk(x[key])
        elif isinstance(x, (tuple, list)):
            for item in x:
                walk(item)
        elif isinstance(x, float):
            out.append(torch.tensor([x], dtype=torch.float64))

    walk(result)
    return torch.cat(out)


def _check(world):
    results, empty = zip(*run_ranks(_on_ranks, world, timeout=240))
    assert all(e == empty[0] for e in empty)
    assert empty[0][0] == "EmptyDataError" and empty[0][1].startswith(f"rank {world - 1}: sensitivity(loader=...)")
    model, X, y = _problem()
    reference = _flat(_estimates(model, (X, y)))
    first = _flat(results[0])
    assert first.numel() == reference.numel() > 20
    for rank, result in enumerate(results[1:], 1):
        assert torch.equal(_flat(result), first), f"rank {rank} differs from rank 0"
    torch.testing.assert_close(first, reference, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_estimators_on_two_ranks_agree_bitwise_and_equal_one_process():
    _check(2)


@pytest.mark.slow
def test_estimators_on_three_ranks_agree_bitwise_and_equal_one_process():
    _check(3)
