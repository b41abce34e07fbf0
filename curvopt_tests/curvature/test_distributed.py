"""Data-parallel curvature: two gloo ranks with half the data each give the full-data operator."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvopt

pytestmark = pytest.mark.distributed


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(11, 3, dtype=torch.float64)  # odd count: ranks hold 6 and 5 samples
    y = torch.randint(0, 3, (11,))
    return model, X, y


def _worker(rank: int, world: int, init_file: str, name: str, queue) -> None:
    # file rendezvous: no TCP port to pick, so no race with other tests for one
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, X, y = _problem()
        shard = slice(0, 6) if rank == 0 else slice(6, 11)
        batches = list(zip(X[shard].split(4), y[shard].split(4)))
        op = curvopt.curvature(name, model, nn.CrossEntropyLoss(), batches)
        queue.put((rank, op.to_dense().numpy()))  # by value: a shared tensor dies with its process
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    queue.close()
    queue.join_thread()  # the result is flushed before the process exits


@pytest.mark.parametrize("name", ["hessian", "ggn"])
def test_two_ranks_equal_one_process_on_all_data(name, tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = str(tmp_path / "rendezvous")
    procs = [ctx.Process(target=_worker, args=(r, 2, init_file, name, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: torch.from_numpy(a) for r, a in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    model, X, y = _problem()
    reference = curvopt.curvature(name, model, nn.CrossEntropyLoss(), (X, y)).to_dense()
    torch.testing.assert_close(results[0], reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[1], reference, rtol=1e-12, atol=1e-14)
