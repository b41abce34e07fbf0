"""BackPACK backends, cross-checked against the native operators (skipped without BackPACK)."""

import builtins

import pytest
import torch
from hypothesis import given
from torch import nn

import curvopt
from curvopt.curvature.backpack import MissingDependencyError, UnsupportedModuleError
from curvopt_tests.problems import problems

pytestmark = pytest.mark.optional


def _dense_or_unsupported(op, pb):
    """The dense matrix, or None where BackPACK lacks a rule (only ELU here), which must
    surface as a clear UnsupportedModuleError rather than BackPACK's own traceback."""
    try:
        return op.to_dense()
    except UnsupportedModuleError as e:
        assert "elu" in pb.description and "ELU" in str(e) and "native backends" in str(e)
        return None


def test_missing_backpack_names_the_install_line(monkeypatch):
    real_import = builtins.__import__

    def no_backpack(name, *args, **kwargs):
        if name == "backpack" or name.startswith("backpack."):
            raise ImportError("No module named 'backpack'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_backpack)
    model = nn.Linear(2, 2)
    with pytest.raises(MissingDependencyError, match=r"pip install 'curvopt\[backpack\]'"):
        curvopt.curvature("backpack_kflr", model, nn.CrossEntropyLoss(),
                          (torch.randn(3, 2), torch.zeros(3).long()))


@given(pb=problems(kinds=("mlp", "cnn2d"), losses=("ce", "mse"), reductions=("mean",)))
def test_diagonals_equal_dense_diagonals(pb):
    pytest.importorskip("backpack")
    for name, dense in [("backpack_diag_ggn", "ggn"), ("backpack_diag_hessian", "hessian")]:
        D = _dense_or_unsupported(curvopt.curvature(name, pb.model, pb.loss_fn, pb.data), pb)
        if D is None:
            continue
        ref = curvopt.curvature(dense, pb.model, pb.loss_fn, pb.data).to_dense()
        torch.testing.assert_close(D, torch.diag(ref.diagonal()), rtol=1e-9, atol=1e-11)


@given(pb=problems(kinds=("mlp",), losses=("ce", "mse"), reductions=("mean",)))
def test_kflr_equals_native_type2_kfac_on_weight_and_bias_blocks(pb):
    """BackPACK keeps weights and biases as separate blocks; the native kfac couples them.
    On the weight-weight and bias-bias blocks the two are the same matrices."""
    pytest.importorskip("backpack")
    B = _dense_or_unsupported(curvopt.curvature("backpack_kflr", pb.model, pb.loss_fn, pb.data), pb)
    if B is None:
        return
    K = curvopt.curvature("kfac", pb.model, pb.loss_fn, pb.data).to_dense()
    start = 0
    for p in pb.model.parameters():
        s = slice(start, start + p.numel())
        torch.testing.assert_close(B[s, s], K[s, s], rtol=1e-9, atol=1e-11)
        start += p.numel()


def test_backpack_kfac_converges_to_kflr_and_leaves_the_model_alone():
    pytest.importorskip("backpack")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    exact = curvopt.curvature("backpack_kflr", model, nn.CrossEntropyLoss(), (X, y)).to_dense()
    mc = curvopt.curvature("backpack_kfac", model, nn.CrossEntropyLoss(), (X, y), mc_samples=20_000).to_dense()
    assert float(torch.linalg.norm(mc - exact) / torch.linalg.norm(exact)) < 0.03
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == hooks_before
    assert all(not hasattr(p, "kflr") for p in model.parameters())
