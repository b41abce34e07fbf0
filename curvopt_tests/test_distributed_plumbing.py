"""curvopt.distributed: one bucketed collective each, agreed failures, identity without a group."""

import pytest
import torch

from curvopt import distributed
from curvopt.errors import NonFiniteLossError, ShapeError
from curvopt_tests.distributed_harness import run_ranks


def test_without_a_group_everything_is_the_identity():
    a, b = torch.ones(2, 3), torch.arange(4.0)
    before = distributed.collective_count()
    out = distributed.sum_across([a, b])
    assert out[0] is a and out[1] is b
    distributed.broadcast_([a], src=0)
    assert torch.equal(a, torch.ones(2, 3))
    assert distributed.sample_offset(7) == (0, 7)
    assert (distributed.active(), distributed.world_size(), distributed.rank()) == (False, 1, 0)
    distributed.agree()
    assert distributed.collective_count() == before
    with pytest.raises(ShapeError, match="boom"):
        distributed.sum_across([a], failure=ShapeError("boom"))
    with pytest.raises(ShapeError, match="boom"):
        distributed.agree(ShapeError("boom"))


def _outcome(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
        return type(exc).__name__, str(exc), getattr(exc, "batch_index", None)
    return None


def _plumbing(rank, world):
    torch.manual_seed(rank)  # different global RNG states: nothing here may depend on them
    out = {}
    c0 = distributed.collective_count()
    a = torch.full((2, 3), float(rank + 1), dtype=torch.float64)
    b = torch.arange(4, dtype=torch.float64) * (rank + 1)
    summed = distributed.sum_across([a, b])
    out["sum"] = [t.clone() for t in summed]
    out["inputs_untouched"] = bool(torch.equal(a, torch.full((2, 3), float(rank + 1), dtype=torch.float64)))
    out["sum_collectives"] = distributed.collective_count() - c0

    x = torch.randn(3, 2, dtype=torch.float64)  # differs per rank
    y = torch.randn(5, dtype=torch.float64)
    c0 = distributed.collective_count()
    distributed.broadcast_([x, y], src=world - 1)
    out["bcast"] = (x.clone(), y.clone())
    out["bcast_collectives"] = distributed.collective_count() - c0

    c0 = distributed.collective_count()
    out["offset"] = distributed.sample_offset(3 + 2 * rank)
    out["offset_collectives"] = distributed.collective_count() - c0
    out["world"], out["rank"], out["active"] = distributed.world_size(), distributed.rank(), distributed.active()

    # One rank fails before the collective: it still takes part; every rank raises its error.
    fail = NonFiniteLossError(4, float("nan")) if rank == world - 1 else None
    out["one_failed"] = _outcome(lambda: distributed.sum_across([a], failure=fail))
    # Several fail: the lowest failing rank's exception wins, same type everywhere.
    fail = ShapeError(f"bad shape on {rank}") if rank >= 1 else None
    out["many_failed"] = _outcome(lambda: distributed.sum_across([b], failure=fail))
    out["agree_failed"] = _outcome(lambda: distributed.agree(KeyError("k") if rank == 0 else None))
    # A class that does not pickle by reference still arrives, as a RuntimeError naming it.
    Local = type("LocalError", (Exception,), {})
    out["local_failed"] = _outcome(lambda: distributed.agree(Local("odd") if rank == 1 else None))
    # After failures, the group still works.
    out["after"] = distributed.sum_across([torch.ones(1, dtype=torch.float64)])[0].item()
    return out


@pytest.mark.distributed
def test_sum_broadcast_offset_and_agreed_failures_on_two_ranks():
    r0, r1 = run_ranks(_plumbing, 2, timeout=90)
    for r in (r0, r1):
        assert torch.equal(r["sum"][0], torch.full((2, 3), 3.0, dtype=torch.float64))
        assert torch.equal(r["sum"][1], torch.arange(4, dtype=torch.float64) * 3)
        assert r["inputs_untouched"]
        assert r["sum_collectives"] == r["bcast_collectives"] == r["offset_collectives"] == 1
        assert r["world"] == 2 and r["active"]
        assert r["one_failed"] == ("NonFiniteLossError", "rank 1: " + str(NonFiniteLossError(4, float("nan"))), 4)
        assert r["many_failed"] == ("ShapeError", "rank 1: bad shape on 1", None)
        assert r["agree_failed"][0] == "KeyError" and "rank 0: " in r["agree_failed"][1]
        assert r["local_failed"][:2] == ("RuntimeError", "rank 1: LocalError: odd")
        assert r["after"] == 2.0
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert torch.equal(r0["bcast"][0], r1["bcast"][0]) and torch.equal(r0["bcast"][1], r1["bcast"][1])
    assert not torch.equal(r0["bcast"][0], torch.zeros(3, 2, dtype=torch.float64))
    assert r0["offset"] == (0, 8) and r1["offset"] == (3, 8)


def _raises_in_rank(rank, world):
    if rank == 1:
        raise ShapeError("only rank 1")
    return rank


@pytest.mark.distributed
def test_harness_reraises_a_rank_exception_with_its_type_and_message():
    with pytest.raises(ShapeError) as info:
        run_ranks(_raises_in_rank, 2, timeout=60)
    assert str(info.value) == "only rank 1"
    assert "raised on rank 1 of 2" in info.value.__notes__[0]


def _three_ranks(rank, world):
    fail = ValueError("third") if rank == 2 else None
    return distributed.sample_offset(rank + 1), _outcome(lambda: distributed.agree(fail))


@pytest.mark.distributed
@pytest.mark.slow
def test_three_ranks():
    results = run_ranks(_three_ranks, 3, timeout=90)
    assert [r[0] for r in results] == [(0, 6), (1, 6), (3, 6)]
    assert all(r[1] == ("ValueError", "rank 2: third", None) for r in results)


def _one_rank_stalls(rank, world):
    if rank == 1:
        import time

        time.sleep(600)
    return rank


@pytest.mark.distributed
@pytest.mark.slow
def test_harness_fails_instead_of_hanging_when_a_rank_stalls():
    # rank 0 normally finishes; on a loaded machine its start alone may take the whole timeout
    with pytest.raises(pytest.fail.Exception, match=r"rank\(s\) \[(0, )?1\] did not finish within 15 s"):
        run_ranks(_one_rank_stalls, 2, timeout=15)
