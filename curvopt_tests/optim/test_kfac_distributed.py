"""Data-parallel KFAC: DDP on two gloo ranks with half the batch each takes the steps of one process on the
whole batch, in every ``distribute`` mode, with lazy sync and with gradient accumulation under no_sync."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import curvopt
from curvopt import distributed
from curvopt.errors import OptionError
from curvopt_tests.distributed_harness import run_ranks

pytestmark = pytest.mark.distributed

STEPS = 6
BATCH = 8  # per step, over all ranks
#: (name, KFAC options, micro-batches per rank)
CONFIGS = [
    ("replicate", dict(distribute="replicate", factor_every=1, inverse_every=2), 1),
    ("comm_opt", dict(distribute="comm_opt", factor_every=1, inverse_every=2, weight_decay=1e-3), 1),
    ("mem_opt", dict(distribute="mem_opt", factor_every=1, inverse_every=2), 1),
    ("comm_opt_eigh", dict(distribute="comm_opt", factor_every=1, inverse_every=2, factored_damping=False), 1),
    ("mem_opt_eigh", dict(distribute="mem_opt", factor_every=2, inverse_every=3, factored_damping=False), 1),
    ("lazy", dict(distribute="replicate", factor_every=2, inverse_every=3, lazy_sync=True), 1),
    ("lazy_mem_opt", dict(distribute="mem_opt", factor_every=1, inverse_every=3, lazy_sync=True), 1),
    ("accumulate", dict(distribute="comm_opt", factor_every=1, inverse_every=2), 2),
    # a damping changed between steps (a scheduler) with no inverse refresh due: ranks agree on the lazy sync
    ("lazy_mem_opt_eigh", dict(distribute="mem_opt", factor_every=1, inverse_every=4, lazy_sync=True,
                               factored_damping=False, damping_step=5), 1),
]


def _model():
    torch.manual_seed(0)
    # a LayerNorm for the diagonal blocks (whose sample counts are summed over ranks too)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 5), nn.LayerNorm(5),
                         nn.Tanh(), nn.Linear(5, 4)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 2, 8, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (BATCH,), generator=g)) for _ in range(STEPS)]


def _options(kw):
    return dict(lr=0.1, damping=0.05, **{k: v for k, v in kw.items() if k != "damping_step"})


def _schedule(opt, kw, step):
    if step == kw.get("damping_step"):
        for group in opt.param_groups:
            group["damping"] = 0.2


def _train_ranks(rank, world):
    warnings.simplefilter("ignore")  # the LayerNorm's diagonal-block warning
    out = {}
    for name, kw, micro in CONFIGS:
        model = DDP(_model())
        opt = curvopt.KFAC(model.parameters(), **_options(kw))
        counts = []
        for step, (X, y) in enumerate(_batches()):
            _schedule(opt, kw, step)
            Xs, ys = X.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad()
            parts = list(zip(Xs.chunk(micro), ys.chunk(micro)))
            for i, (Xm, ym) in enumerate(parts):
                loss = nn.functional.cross_entropy(model(Xm), ym) * len(ym) / len(ys)
                if i + 1 < len(parts):
                    with model.no_sync():  # DDP reduces the gradients of the last micro-batch only
                        loss.backward()
                else:
                    loss.backward()
            before = distributed.collective_count()
            opt.step()
            counts.append(distributed.collective_count() - before)
        out[name] = ([p.detach().clone() for p in model.module.parameters()], counts,
                     dict(opt.communication.bytes))
    return out


def _reference(kw):
    model = _model()
    kw = {k: v for k, v in kw.items() if k not in ("distribute", "lazy_sync")}
    opt = curvopt.KFAC(model.parameters(), **_options(kw))
    for step, (X, y) in enumerate(_batches()):
        _schedule(opt, kw, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def _expected_collectives(kw):
    """Per step: 1 for the statistics at a factor update (or, lazy, a one-number agreement on their finiteness
    at a factor update and 1 for the factors before an inversion), 1 for the inverses at an inversion
    (comm_opt), 1 for the updates at every step (mem_opt)."""
    counts = []
    for step in range(STEPS):
        factor = step % kw["factor_every"] == 0
        inverse = step % kw["inverse_every"] == 0 or (step < kw["inverse_every"] and factor)
        n = (factor + inverse if kw.get("lazy_sync") else factor) + (kw["distribute"] == "comm_opt" and inverse)
        counts.append(n + (kw["distribute"] == "mem_opt"))
    return counts


def test_ddp_kfac_equals_one_process_on_the_whole_batch_in_every_mode():
    ranks = run_ranks(_train_ranks, 2, timeout=180)
    sizes = [(3, 2 * 3 + 1), (5, 18 + 1), (4, 5 + 1)]  # (dim G, dim A) of the Kronecker layers
    factor_bytes = 8 * (sum(g * g + a * a for g, a in sizes) + 2 * len(sizes) + 2)  # + counts (2 per layer, 2 LN)
    for name, kw, _ in CONFIGS:
        with pytest.warns(UserWarning, match="LayerNorm"):
            reference = _reference(kw)
        (p0, counts0, bytes0), (p1, counts1, _) = ranks[0][name], ranks[1][name]
        for a, b, ref in zip(p0, p1, reference):
            assert torch.equal(a, b), name  # every rank takes the same step
            torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12, msg=name)
        assert counts0 == counts1 == _expected_collectives(kw), name
        if not kw.get("lazy_sync"):
            factor_updates = sum(step % kw["factor_every"] == 0 for step in range(STEPS))
            assert bytes0["factors"] == factor_updates * factor_bytes, name
        if kw["distribute"] == "mem_opt":
            assert bytes0["updates"] == STEPS * 8 * sum(g * a for g, a in sizes), name
        else:
            assert bytes0["updates"] == 0


def test_bad_distribute_names_the_choices():
    with pytest.raises(OptionError, match="'replicate', 'comm_opt', 'mem_opt'"):
        curvopt.KFAC(_model().parameters(), distribute="kaisa")


def _overflow_on_one_rank(rank, world):
    """Rank 1's inputs overflow its Kronecker factor A (its gradient stays finite: zero)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = curvopt.KFAC(model.parameters(), lazy_sync=True, factor_every=1, inverse_every=1)
    x = torch.randn(5, 3) * (1e20 if rank == 1 else 1.0)
    (model(x) * 0).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    unchanged = all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    return [str(w.message) for w in caught], unchanged


def test_lazy_sync_ranks_agree_on_skipping_a_non_finite_factor_update():
    """With lazy sync the statistics stay local until an inversion: a non-finite factor on one rank is skipped
    by every rank (before, that rank skipped alone and the other waited in the factor sync until the timeout)."""
    for rank, (messages, unchanged) in enumerate(run_ranks(_overflow_on_one_rank, 2, timeout=60)):
        assert unchanged
        expected = "Kronecker factor;" if rank == 1 else "Kronecker factor on another rank"
        assert any("step skipped" in m and expected in m for m in messages), (rank, messages)
