"""Run a function on several gloo ranks for a test: :func:`run_ranks`.

Each rank is a fresh ``spawn`` process with one torch thread, joined to a gloo group through a file://
rendezvous (no TCP port to pick, so no race with other tests for one). The function must be defined at
module level (spawn pickles it by reference) and its arguments must pickle.

Every rank is bounded by ``timeout``: a collective left waiting raises inside the rank after most of it
(the group's own timeout), and the caller kills whatever has not finished by the end of it and fails the
test, so a hang never blocks the suite. Results come back by value (tensors and numpy arrays are copied,
not shared through memory that dies with the process).

Batch several checks into one spawn: starting the ranks costs a few seconds.

Example::

    def _check(rank, world, n):
        ...                      # dist is initialized here
        return op.to_dense()

    results = run_ranks(_check, 2, 11)   # [rank 0's tensor, rank 1's tensor]
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_module
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks"]


def _worker(rank: int, world: int, init_file: str, pg_timeout: float, fn: Callable[..., Any], args: tuple,
            results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    try:
        try:
            message = ("ok", pickle.dumps(fn(rank, world, *args)))  # plain pickle: tensors by value
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
            message = ("error", pickle.dumps(_portable(exc) + ("".join(traceback.format_exception(exc)),)))
        results.put((rank, *message))
        if message[0] == "ok":  # a failed rank may have left its peers inside a collective: no barrier
            try:
                dist.barrier()  # neither rank tears gloo down while the other still talks to it
            except Exception:  # noqa: BLE001 - a peer that failed or left: nothing more to wait for
                pass
    finally:
        dist.destroy_process_group()
    results.close()
    results.join_thread()  # the result is flushed before the process exits
    # Leave without the interpreter's teardown: after gloo is destroyed and the result delivered, it now and
    # then aborts (SIGABRT from a background thread at exit, seen under the full suite on 2 loaded cores);
    # nothing of the rank's work is left to check by then.
    os._exit(0)


def _portable(exc: BaseException) -> tuple[Any, str, dict[str, Any]]:
    from curvopt.distributed import _portable as portable

    return portable(exc)


def _rebuild(cls: Any, message: str, attrs: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = (message,)
    try:
        exc.__dict__.update(attrs)
    except AttributeError:
        pass
    return exc


def run_ranks(fn: Callable[..., Any], world: int = 2, *args: Any, timeout: float = 120) -> list[Any]:
    """Call ``fn(rank, world, *args)`` in ``world`` gloo processes and return their results in rank order.

    Args:
        fn: A module-level function; ``torch.distributed`` is initialized (gloo, float64 is the caller's
            choice) when it runs, and torn down after.
        world: Number of ranks.
        *args: Picklable arguments passed to every rank.
        timeout: Seconds every rank has to finish, the start included.

    Returns:
        Each rank's return value (unpickled by value), in rank order.

    Raises:
        The exception of the lowest rank that raised, same type and message, with that rank's traceback
        as a note. A rank that does not finish within ``timeout`` fails the test (all ranks are killed).
    """
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="curvopt_dist_")
    init_file = os.path.join(tmp, "rendezvous")
    pg_timeout = max(5.0, 0.75 * timeout)  # a stuck collective reports itself before the caller kills
    procs = [
        ctx.Process(target=_worker, args=(r, world, init_file, pg_timeout, fn, args, results), daemon=True)
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    got: dict[int, tuple[str, bytes]] = {}
    try:
        for p in procs:
            p.start()
        while len(got) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                r, status, payload = results.get(timeout=min(left, 1.0))
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs) if i not in got and p.exitcode is not None]
                if dead:  # a rank died without a word (a crash): no point waiting for it
                    time.sleep(0.5)  # ... unless its message is still in the pipe
                    if results.empty():
                        break
                continue
            got[r] = (status, payload)
        grace = 30.0 if len(got) == world else 1.0  # all delivered: let them tear gloo down cleanly
        for p in procs:
            p.join(timeout=grace)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        shutil.rmtree(tmp, ignore_errors=True)
    missing = [r for r in range(world) if r not in got]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        pytest.fail(f"run_ranks({fn.__name__}): rank(s) {missing} did not finish within {timeout} s "
                    f"(exit codes {codes}; killed if still running)")
    for r in range(world):
        status, payload = got[r]
        if status == "error":
            cls, message, attrs, remote_tb = pickle.loads(payload)
            exc = _rebuild(cls, message, attrs)
            exc.add_note(f"raised on rank {r} of {world}:\n{remote_tb}")
            raise exc
    bad = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    assert not bad, f"run_ranks({fn.__name__}): rank(s) exited with codes {bad} after returning their results"
    return [pickle.loads(got[r][1]) for r in range(world)]
