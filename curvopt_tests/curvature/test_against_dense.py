"""Every backend's product equals its dense float64 reference on random small problems."""

import pytest
import torch
from hypothesis import given

import curvopt
from curvopt_tests.problems import (
    block_mask,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    problems,
)

TOL = dict(rtol=1e-9, atol=1e-10)


def _close(A, B):
    torch.testing.assert_close(A, B, **TOL)


@given(pb=problems())
def test_hessian_matches_dense(pb):
    op = curvopt.curvature("hessian", pb.model, pb.loss_fn, pb.data)
    _close(op.to_dense(), dense_hessian(pb))


@given(pb=problems())
def test_ggn_matches_dense(pb):
    op = curvopt.curvature("ggn", pb.model, pb.loss_fn, pb.data)
    _close(op.to_dense(), dense_ggn(pb))


@given(pb=problems())
def test_empirical_fisher_matches_dense(pb):
    op = curvopt.curvature("empirical_fisher", pb.model, pb.loss_fn, pb.data)
    _close(op.to_dense(), dense_empirical_fisher(pb))


@pytest.mark.parametrize("name,cache", [("hessian", True), ("ggn", True), ("ggn", "linearize"),
                                        ("empirical_fisher", True)])
@given(pb=problems(reductions=("mean",)))
def test_cached_equals_uncached(name, cache, pb):
    plain = curvopt.curvature(name, pb.model, pb.loss_fn, pb.data).to_dense()
    cached_op = curvopt.curvature(name, pb.model, pb.loss_fn, pb.data, cache=cache)
    _close(cached_op.to_dense(), plain)
    _close(cached_op.to_dense(), plain)  # second pass served from the cache


@pytest.mark.parametrize("base", ["hessian", "ggn", "empirical_fisher"])
@given(pb=problems(kinds=("mlp", "cnn1d")))
def test_block_diagonal_is_masked_dense(base, pb):
    op = curvopt.curvature("block_diagonal", pb.model, pb.loss_fn, pb.data, base=base)
    full = curvopt.curvature(base, pb.model, pb.loss_fn, pb.data).to_dense()
    mask = block_mask(op)
    _close(op.to_dense(), torch.where(mask, full, torch.zeros_like(full)))


@given(pb=problems(kinds=("mlp",)))
def test_block_diagonal_custom_grouping(pb):
    names = [n for n, _ in pb.model.named_parameters()]
    grouping = {"weights": [n for n in names if n.endswith("weight")],
                "biases": [n for n in names if n.endswith("bias")]}
    op = curvopt.curvature("block_diagonal", pb.model, pb.loss_fn, pb.data, blocks=grouping)
    assert [b.name for b in op.blocks] == ["weights", "biases"]
    full = dense_hessian(pb)
    _close(op.to_dense(), torch.where(block_mask(op), full, torch.zeros_like(full)))


@pytest.mark.parametrize("name,dense", [("hessian", dense_hessian), ("ggn", dense_ggn),
                                        ("empirical_fisher", dense_empirical_fisher)])
@given(pb=problems())
def test_one_uncached_vector_matches_dense(name, dense, pb):
    """``op @ v`` for one vector takes its own paths (the Hessian's eager double backward, the others'
    unvectorized matvec), which ``to_dense``'s columns never reach: they agree with the dense matrix too."""
    op = curvopt.curvature(name, pb.model, pb.loss_fn, pb.data)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _close(op @ v, dense(pb) @ v)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulate_never_writes_into_a_products_tensors(reduction):
    """The data loop sums in place into tensors of its own: tensors a product returns (here one kept tensor,
    as a cached context may hand out) are left as they were, and the result is the exact weighted sum."""
    from curvopt.curvature.data_loop import accumulate

    kept = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    before = kept.clone()
    batches = [(torch.zeros(n, 1), torch.zeros(n)) for n in (3, 1, 2)]
    out = accumulate(lambda i, X, y: (torch.tensor(0.0), [kept]), batches, reduction=reduction)[0]
    assert torch.equal(kept, before)
    torch.testing.assert_close(out, before if reduction == "mean" else 3 * before, rtol=0, atol=0)
    assert out.data_ptr() != kept.data_ptr()
