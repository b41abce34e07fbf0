"""``op.solve``: (A + damping I)^{-1} b against dense float64 solves, in every input format."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvopt
from curvopt.errors import OptionError, ShapeError
from curvopt_tests.problems import problems


def _damped(A: torch.Tensor, relative: float) -> float:
    """A damping that makes ``A + d I`` positive definite with condition number <= 1 + 1/relative."""
    eig = torch.linalg.eigvalsh(A)
    scale = max(1.0, float(eig.abs().max()))
    return float((-eig.min()).clamp_min(0)) + relative * scale


@pytest.mark.parametrize("name,method", [("hessian", "minres"), ("ggn", "minres"), ("ggn", "cg"),
                                         ("empirical_fisher", "cg"), ("kfac", "kronecker"), ("kfac", "minres")])
@given(pb=problems(kinds=("mlp", "cnn1d")), relative=st.floats(0.05, 2.0), seed=st.integers(0, 1000))
def test_solve_matches_the_dense_solve(name, method, pb, relative, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kfac names layers without Kronecker structure
        op = curvopt.curvature(name, pb.model, pb.loss_fn, pb.data)
    A = op.to_dense()
    d = _damped(A, relative)
    b = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = torch.linalg.solve(A + d * torch.eye(A.shape[0], dtype=A.dtype), b)
    x = op.solve(b, damping=d, method=method, rtol=1e-12)
    torch.testing.assert_close(x, expected, rtol=1e-7, atol=1e-8 * float(expected.abs().max()))


def _linear_mse(n=3, d=5):
    """A linear model with MSE and fewer samples than inputs: GGN = Hessian = 2 X^T X / n, rank n."""
    torch.manual_seed(0)
    model = nn.Linear(d, 1, bias=False).double()
    X = torch.randn(n, d, dtype=torch.float64)
    return model, nn.MSELoss(), (X, torch.randn(n, 1, dtype=torch.float64))


def test_singular_consistent_system_gives_the_pseudo_inverse_solution():
    op = curvopt.curvature("ggn", *_linear_mse())
    A = op.to_dense()
    assert int(torch.linalg.matrix_rank(A)) == 3
    b = A @ torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(op.solve(b, rtol=1e-12), torch.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-10)


def test_vector_matrix_and_list_right_hand_sides_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    op = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), (X, y))
    B = torch.randn(op.shape[0], 3, dtype=torch.float64)
    X_mat = op.solve(B, damping=0.1, rtol=1e-12)
    assert X_mat.shape == B.shape
    for j in range(3):
        torch.testing.assert_close(op.solve(B[:, j], damping=0.1, rtol=1e-12), X_mat[:, j])
    parts = [t[0] for t in op.unflatten(B[:, :1].T)]
    solved = op.solve(parts, damping=0.1, rtol=1e-12)
    assert [tuple(t.shape) for t in solved] == [tuple(p.shape) for p in model.parameters()]
    torch.testing.assert_close(op.flatten([t[None] for t in solved])[0], X_mat[:, 0])


def test_bad_input_is_rejected_with_the_valid_choices():
    op = curvopt.curvature("ggn", *_linear_mse())
    b = torch.ones(5, dtype=torch.float64)
    with pytest.raises(OptionError, match="valid: minres, cg"):
        op.solve(b, method="lsqr")
    with pytest.raises(OptionError, match="damping must be >= 0"):
        op.solve(b, damping=-1.0)
    with pytest.raises(ShapeError, match=r"expected a vector of shape \(5,\)"):
        op.solve(torch.ones(4))
    with pytest.raises(TypeError, match="cannot solve"):
        op.solve(3.0)
    with pytest.raises(OptionError, match="needs damping > 0"):
        curvopt.curvature("kfac", *_linear_mse()).solve(b)  # the exact Kronecker inverse needs damping


def test_a_column_that_stops_short_warns_with_the_reason():
    op = curvopt.curvature("hessian", *_linear_mse(n=8))
    B = torch.randn(5, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"column 0 stopped after 1 products .*max_iterations"):
        op.solve(B, damping=0.5, max_iter=1)


def test_kfac_solve_follows_parameter_changes():
    """The kept eigendecompositions are dropped with the factors when a parameter changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    op = curvopt.curvature("kfac", model, nn.CrossEntropyLoss(), (X, y))
    b = torch.randn(op.shape[0], dtype=torch.float64)
    eye = torch.eye(op.shape[0], dtype=torch.float64)
    first = op.solve(b, damping=0.1)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    second = op.solve(b, damping=0.1)
    torch.testing.assert_close(second, torch.linalg.solve(op.to_dense() + 0.1 * eye, b))
    assert not torch.allclose(first, second)
