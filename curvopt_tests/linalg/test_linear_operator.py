"""The linear-operator base and its algebra against dense float64 matrices: input forms, dtype, errors, shift."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvopt.errors import ShapeError
from curvopt.linalg import LinearOperator, Shifted, cg, minres


class Dense(LinearOperator):
    """A dense matrix through the base class's ``@``: only ``_matmat`` is supplied (``_matvec`` is the base's)."""

    def __init__(self, M):
        self.M = M
        self.shape, self.dtype, self.device = tuple(M.shape), M.dtype, M.device
        self.calls = []

    def _matmat(self, V):
        self.calls.append(tuple(V.shape))
        return self.M @ V


@st.composite
def matrices(draw):
    """``(M, v, V, chunk, shift)``: a random symmetric ``P x P`` matrix, a vector, ``k`` columns."""
    P, k = draw(st.integers(1, 7)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    M = torch.randn(P, P, generator=g, dtype=torch.float64)
    M = M + M.T
    v = torch.randn(P, generator=g, dtype=torch.float64)
    V = torch.randn(P, k, generator=g, dtype=torch.float64)
    shift = draw(st.sampled_from([0.0, 0.5, -1.25]))
    return M, v, V, draw(st.integers(1, P + 1)), shift


@given(matrices())
def test_products_and_dense_form_match_the_matrix(case):
    M, v, V, chunk, _ = case
    A = Dense(M)
    torch.testing.assert_close(A @ v, M @ v)
    assert (A @ v).shape == (M.shape[0],) and A.calls[-1] == (M.shape[0], 1)  # one vector: a one-column matmat
    torch.testing.assert_close(A @ V, M @ V)
    torch.testing.assert_close(A.matmat(V), M @ V)
    A.calls.clear()
    torch.testing.assert_close(A.to_dense(chunk_size=chunk), M)
    assert len(A.calls) == -(-M.shape[0] // chunk)  # chunk_size identity columns per product


@given(matrices())
def test_shift_adds_a_multiple_of_the_identity(case):
    M, v, V, chunk, shift = case
    eye = torch.eye(M.shape[0], dtype=torch.float64)
    for A in (M, Dense(M)):  # a dense tensor or an operator
        S = Shifted(A, shift)
        assert isinstance(S, LinearOperator) and S.shape == A.shape and S.dtype == torch.float64
        torch.testing.assert_close(S @ v, M @ v + shift * v)
        torch.testing.assert_close(S @ V, M @ V + shift * V)
        torch.testing.assert_close(S.to_dense(chunk_size=chunk), M + shift * eye)
    # a dense operand keeps its own vector product (mv), so the solvers' arithmetic is the matrix's
    assert torch.equal(Shifted(M, shift) @ v, M @ v + shift * v if shift else M @ v)


def test_solvers_take_a_linear_operator_like_the_dense_matrix():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    M = (Q * torch.linspace(0.5, 4.0, 6, dtype=torch.float64)) @ Q.T
    b = torch.randn(6, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(M + 0.1 * torch.eye(6, dtype=torch.float64), b)
    for solve in (cg, minres):
        torch.testing.assert_close(solve(Dense(M), b, shift=0.1, rtol=1e-12).x, exact)


def test_operands_are_cast_to_the_operators_dtype():
    M = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)
    A = Dense(M)
    out = A @ torch.ones(3, dtype=torch.float32)
    assert out.dtype == torch.float64 and torch.equal(out, M.sum(1))
    assert A.matmat(torch.ones(3, 2, dtype=torch.float32)).dtype == torch.float64


def test_wrong_operands_name_the_operator_and_the_shapes():
    A = Dense(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"Dense has shape \(3, 3\).*got \(4,\)"):
        A @ torch.ones(4)
    with pytest.raises(ShapeError, match=r"got \(3, 1, 1\)"):
        A @ torch.ones(3, 1, 1)
    only_tensors = r"cannot multiply Dense with list; use a tensor of shape \[P\] or \[P, k\]$"
    with pytest.raises(TypeError, match=only_tensors):
        A @ [torch.ones(3)]
    with pytest.raises(ShapeError, match=r"expected a matrix of shape \(3, k\), got \(3,\)"):
        A.matmat(torch.ones(3))
    with pytest.raises(ShapeError, match=r"expected a matrix of shape \(3, k\), got str"):
        A.matmat("V")


def test_the_base_needs_a_product():
    with pytest.raises(TypeError, match="_matmat"):
        LinearOperator()
