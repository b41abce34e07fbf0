"""Host synchronisations in the Krylov and randomized loops: the ones a device-resident loop needs, no more.

On a GPU every read of a device value on the host (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``,
``.cpu()``, ``torch.equal``) waits for the queued work. The counts are taken on the CPU by a function mode
that sees those calls; host bookkeeping (the tridiagonal ``T``, the stopping test) runs in numpy, which
the mode does not see, so whatever it counts would be a device synchronisation on a GPU.
"""

import pytest
import torch

from curvopt.curvature.data_loop import accumulate
from curvopt.errors import NonFiniteLossError
from curvopt.linalg import lanczos, power_iteration, trace_estimate
from curvopt_tests.host_reads import CountHostReads
from curvopt_tests.linalg.test_spectral_algorithms import BlockedMatrix

SYNCS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu", "equal", "nonzero"}


def CountSyncs() -> CountHostReads:
    """A mode counting the calls in :data:`SYNCS`."""
    return CountHostReads(SYNCS)


def spectrum_matrix(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.linspace(-1, 1, n, dtype=torch.float64) ** 3
    ev[:3] = torch.tensor([6.0, 4.0, 3.0], dtype=torch.float64)
    return (Q * ev) @ Q.T


@pytest.mark.parametrize("k", [1, 3])
def test_lanczos_synchronises_once_per_product(k):
    A = spectrum_matrix()
    with CountSyncs() as mode:
        res = lanczos(A, k, tol=1e-8, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.iterations > k + 2
    assert mode.count == res.iterations


def test_power_iteration_synchronises_once_per_iteration():
    A = spectrum_matrix()
    with CountSyncs() as mode:
        res = power_iteration(A, 2, tol=1e-6, generator=torch.Generator().manual_seed(0))
    # each eigenvalue ends with one product for its residual, which needs no transfer
    assert mode.count <= res.iterations - 2


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_trace_brings_every_figure_back_in_one_transfer(method):
    op = BlockedMatrix(spectrum_matrix(), [10, 30, 45])
    with CountSyncs() as mode:
        est = trace_estimate(op, 12, method=method, per_block=True, generator=torch.Generator().manual_seed(0))
    assert len(est.blocks) == 4
    assert mode.count == 1


def _stored_products(losses):
    """A batch product that serves stored losses, as a pass over cached contexts does."""
    parts = [torch.ones(3)]
    return lambda i, X, y: (losses[i], parts)


def test_data_loop_checks_losses_in_one_transfer_and_cached_losses_once():
    data = [(torch.zeros(4, 2), torch.zeros(4)) for _ in range(5)]
    losses = [torch.tensor(0.5 + i) for i in range(5)]
    with CountSyncs() as mode:
        accumulate(_stored_products(losses), data, reduction="mean")
    assert mode.count == 1  # the first pass checks all five losses at once
    with CountSyncs() as mode:
        accumulate(_stored_products(losses), data, reduction="mean")
    assert mode.count == 0  # the same loss tensors again: known finite


def test_data_loop_rechecks_a_loss_changed_in_place_and_names_its_batch():
    data = [(torch.zeros(4, 2), torch.zeros(4)) for _ in range(3)]
    losses = [torch.tensor(1.0) for _ in range(3)]
    accumulate(_stored_products(losses), data, reduction="mean")
    losses[2].fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="batch 2"):
        accumulate(_stored_products(losses), data, reduction="mean")
    fresh = [torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor(1.0)]
    with pytest.raises(NonFiniteLossError, match="batch 1"):
        accumulate(_stored_products(fresh), data, reduction="mean")


def test_a_parameter_snapshot_check_reads_the_host_once():
    """A cached operator checks its parameters against the snapshot at every product: one read, not one per
    parameter (a 3-layer MLP has 6)."""
    from curvopt.curvature.params import ParameterSnapshot

    params = [torch.randn(4, 3), torch.randn(4), torch.randn(5, 4), torch.randn(5), torch.randn(2, 5),
              torch.randn(2)]
    snap = ParameterSnapshot(params)
    with CountSyncs() as mode:
        assert snap.matches(params)
    assert mode.count == 1
    changed = [p.clone() for p in params]
    changed[3][0] += 1
    assert not snap.matches(changed)
    nan = [p.clone() for p in params]
    nan[0][0, 0] = float("nan")
    assert not ParameterSnapshot(nan).matches(nan)  # NaN != NaN, as with torch.equal
    assert not snap.matches(params[:-1]) and not snap.matches([p.double() for p in params])


def test_a_curvature_pass_restores_buffers_without_reading_the_host():
    """BatchNorm's buffers come back as found at the end of every pass, by device copies: no host read per
    buffer (a pass ran once per product)."""
    from torch import nn

    from curvopt.curvature.model_state import curvature_pass

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with CountSyncs() as mode:
        with curvature_pass(model):
            model[1].running_mean.add_(1.0)  # a pass that changed a buffer in place
            model[3].num_batches_tracked += 5
    assert mode.count == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_counted_targets_on_the_cpu_follow_writes_their_version_counter_misses():
    """Counted targets weigh the batches. On the CPU they are counted afresh at every product (cheap, and a
    tensor sharing memory with a numpy array changes without its version counter knowing); the memo that
    saves the host read per batch and product is for accelerators (tested in ``test_cuda.py``)."""
    import numpy as np
    from torch import nn

    import curvopt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    labels = [np.array([0, 1, 2, -100, 1]) for _ in range(3)]
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.from_numpy(a)) for a in labels]
    op = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    first = op @ v
    labels[1][:3] = -100  # written through numpy: batch 1 counts 1 target now, not 4
    changed = op @ v
    reference = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), [(X, y.clone()) for X, y in data]) @ v
    torch.testing.assert_close(changed, reference, rtol=1e-13, atol=1e-15)
    assert not torch.allclose(changed, first)
