"""One operator hierarchy: every backend is a CurvatureOperator (a LinearOperator), per-batch products exist
exactly on the streaming backends, and the operators outside the registry (GraphHessian, Shifted) are
LinearOperators that agree with dense reverse-over-reverse Hessians."""

import inspect

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvopt
from curvopt.curvature import BatchCurvatureOperator, CurvatureOperator, available_curvatures, curvature_class
from curvopt.curvature.graph_hessian import GraphHessian
from curvopt.linalg import LinearOperator, Shifted
from curvopt_tests.problems import problems, reference_hessian

STREAMING = {"hessian", "ggn", "fisher", "empirical_fisher"}


def test_every_registered_backend_is_a_curvature_operator_without_stubs():
    names = available_curvatures()
    assert STREAMING <= set(names) and {"kfac", "block_diagonal"} <= set(names)
    for name in names:
        cls = curvature_class(name)
        assert issubclass(cls, CurvatureOperator) and issubclass(cls, LinearOperator), name
        assert not inspect.isabstract(cls), name
        assert issubclass(cls, BatchCurvatureOperator) == (name in STREAMING), name
        # the per-batch contract lives only where the data loop calls it: no method that only raises
        for attr in ("_batch_context", "_batch_matvec", "_batch_single_product"):
            assert hasattr(cls, attr) == (name in STREAMING), (name, attr)
    assert curvopt.CurvatureOperator is CurvatureOperator
    assert curvopt.BatchCurvatureOperator is BatchCurvatureOperator



@given(pb=problems(kinds=("mlp", "cnn1d")), shift=st.sampled_from([0.0, 0.3]), k=st.integers(1, 3))
def test_curvature_operator_input_forms_and_shift_match_the_dense_hessian(pb, shift, k):
    op = curvopt.curvature("hessian", pb.model, pb.loss_fn, pb.data)
    H = reference_hessian(pb.model, pb.loss_fn, pb.X, pb.y)
    P = H.shape[0]
    g = torch.Generator().manual_seed(0)
    v, V = torch.randn(P, generator=g, dtype=torch.float64), torch.randn(P, k, generator=g, dtype=torch.float64)
    assert isinstance(op, LinearOperator) and op.shape == (P, P)
    torch.testing.assert_close(op @ v, H @ v)
    torch.testing.assert_close(op @ V, H @ V)
    torch.testing.assert_close(op.matmat(V), H @ V)
    as_list = [t[0] for t in op.unflatten(v[None])]  # shaped like the parameters
    out = op @ as_list
    assert [t.shape for t in out] == [p.shape for p in op.params]
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in out]), H @ v)
    S = Shifted(op, shift)
    torch.testing.assert_close(S @ V, H @ V + shift * V)
    torch.testing.assert_close(S.to_dense(chunk_size=2), H + shift * torch.eye(P, dtype=torch.float64))


def test_graph_hessian_is_a_linear_operator_with_the_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    grads = list(torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True))
    G = GraphHessian(params, grads)
    H = reference_hessian(model, loss_fn, X, y)
    assert isinstance(G, LinearOperator) and G.shape == H.shape and G.dtype == torch.float64
    torch.testing.assert_close(G.to_dense(chunk_size=5), H)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(G @ v, H @ v)
    torch.testing.assert_close(G @ torch.stack([v, 2 * v], 1), H @ torch.stack([v, 2 * v], 1))
