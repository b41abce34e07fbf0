"""The same answers on a CUDA device as on the CPU: every backend, the solvers and estimators, K-FAC, the
schedules' probe and the quantization pipeline, in float32 and (where supported) bfloat16.

Marked ``cuda``: skipped without a CUDA device. ``CURVOPT_TEST_DEVICE=cpu`` runs them on the CPU instead, to
check the tests themselves on a machine without a GPU (``benchmarks/gpu_check.sh --dry-run``).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import curvopt
from curvopt.models import cnn1d, mlp

DEVICE = os.environ.get("CURVOPT_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
BACKENDS = ("hessian", "ggn", "fisher", "empirical_fisher", "kfac", "block_diagonal")


def _problem(kind: str = "mlp", dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = mlp((40, 16, 10)) if kind == "mlp" else cnn1d(channels=4)
    X, y = torch.randn(48, 40), torch.randint(0, 10, (48,))
    data = [(X[:32], y[:32]), (X[32:], y[32:])]
    return model.to(dtype), data


def _on(model: nn.Module, data, device: str, dtype: torch.dtype | None = None):
    import copy

    m = copy.deepcopy(model).to(device)
    if dtype is not None:
        m = m.to(dtype)
    cast = (lambda X: X.to(device, dtype)) if dtype is not None else (lambda X: X.to(device))
    return m, [(cast(X), y.to(device)) for X, y in data]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> None:
    torch.testing.assert_close(a.detach().cpu().double(), b.detach().cpu().double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["mlp", "cnn1d"])
@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_on_the_device_equals_float64_on_the_cpu(name, kind):
    model, data = _problem(kind)
    loss_fn = nn.CrossEntropyLoss()
    opts = {"mc_samples": 1, "seed": 0} if name == "fisher" else {}
    ref_model, ref_data = _on(model, data, "cpu", torch.float64)
    ref = curvopt.curvature(name, ref_model, loss_fn, ref_data, **opts)
    dev_model, dev_data = _on(model, data, DEVICE)
    op = curvopt.curvature(name, dev_model, loss_fn, dev_data, **opts)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(ref.shape[0], 3, generator=g, dtype=torch.float64)
    out = op @ V.to(DEVICE, torch.float32)
    assert out.device.type == torch.device(DEVICE).type and out.dtype == torch.float32
    if name == "fisher":  # Monte-Carlo labels are drawn per device: compare expectations' scale only
        assert torch.isfinite(out).all()
        return
    expect = ref @ V
    _close(out, expect, rtol=2e-3, atol=2e-4 * expect.abs().max().item())


def test_estimators_and_solvers_on_the_device():
    model, data = _problem()
    loss_fn = nn.CrossEntropyLoss()
    ref_model, ref_data = _on(model, data, "cpu", torch.float64)
    dev_model, dev_data = _on(model, data, DEVICE)
    ref = curvopt.curvature("ggn", ref_model, loss_fn, ref_data)
    op = curvopt.curvature("ggn", dev_model, loss_fn, dev_data, cache=True)
    top_ref = curvopt.top_eigenvalues(ref, k=2).eigenvalues
    top = curvopt.top_eigenvalues(op, k=2).eigenvalues
    _close(top, top_ref, rtol=2e-3, atol=0)
    exact = torch.linalg.eigvalsh(ref.to_dense()).sum()
    est = curvopt.trace(op, probes=3 * op.shape[0] + 3)  # Hutch++ is exact at 3P+3 products
    assert abs(est.value - exact.item()) <= 2e-3 * abs(exact.item())
    b = torch.randn(op.shape[0], dtype=torch.float64)
    for method in ("cg", "minres"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = op.solve(b.to(DEVICE, torch.float32), damping=1e-1, method=method, rtol=1e-5)
        x_ref = torch.linalg.solve(ref.to_dense() + 1e-1 * torch.eye(ref.shape[0], dtype=torch.float64), b)
        _close(x, x_ref, rtol=1e-3, atol=1e-3 * x_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kfac_optimizer_steps_on_the_device(dtype):
    if dtype == torch.bfloat16 and DEVICE == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this device")
    model, data = _problem("cnn1d")
    runs = {}
    for device in ("cpu", DEVICE):
        m, d = _on(model, data, device, dtype)
        opt = curvopt.KFAC(m.parameters(), lr=0.05)
        for _ in range(3):
            for X, y in d:
                opt.zero_grad()
                nn.functional.cross_entropy(m(X).float(), y).backward()
                opt.step()
        runs[device] = torch.nn.utils.parameters_to_vector(m.parameters()).float().cpu()
        assert torch.isfinite(runs[device]).all()
    if dtype == torch.float32:
        _close(runs[DEVICE], runs["cpu"], rtol=1e-3, atol=1e-4)


def test_adaptive_batch_size_probe_and_quantization_on_the_device():
    model, data = _problem()
    loss_fn = nn.CrossEntropyLoss()
    m, d = _on(model, data, DEVICE)
    X = torch.cat([X for X, _ in d])
    y = torch.cat([y for _, y in d])
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    sched = curvopt.AdaptiveBatchSize(opt, m, loss_fn, (X, y), batch_size=8, max_batch_size=32, probe_size=16,
                                      lanczos_steps=4, micro_batch_size=8)
    for Xb, yb in sched:
        opt.zero_grad()
        sched.backward(Xb, yb)
        opt.step()
    sched.step()
    assert sched.history and sched.history[-1]["eigenvalue"] > 0
    report = curvopt.sensitivity(m, d, loss_fn, probes=8)
    plan = curvopt.allocate_bits(m, report, bits=(2, 4, 8), average_bits=4.0)
    before = [p.detach().clone() for p in m.parameters()]
    with curvopt.fake_quantized(m, plan):
        assert torch.isfinite(m(X)).all()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.skipif(DEVICE == "cpu", reason="the counted-targets memo is for accelerators (the CPU recounts)")
def test_counted_targets_are_read_from_the_device_once_per_batch_not_per_product():
    """Cross entropy weighs each batch by its counted targets, a host read: with the data held on the device
    (the same target tensors at every product) it happens once per batch, not once per batch and product; a
    batch whose targets change in place is counted again."""
    from curvopt_tests.host_reads import CountHostReads

    model, data = _problem()
    model, data = _on(model, data, DEVICE)
    data[0][1][:5] = -100
    op = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], device=DEVICE)
    first = op @ v
    with CountHostReads({"__int__", "__float__", "item"}) as mode:
        again = op @ v
    assert mode.count == 0
    assert torch.equal(first, again)
    data[0][1][:5] = 0  # in place: the version counter moves, so batch 0 is counted again
    reference = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), [(X, y.clone()) for X, y in data]) @ v
    _close(op @ v, reference, rtol=1e-5, atol=1e-7)
