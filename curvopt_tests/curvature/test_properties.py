"""Structural properties: symmetry, semi-definiteness, input formats, special cases."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvopt
from curvopt_tests.problems import dense_ggn, dense_hessian, problems

ALL = ["hessian", "ggn", "fisher", "empirical_fisher", "block_diagonal"]
PSD = ["ggn", "fisher", "empirical_fisher"]


@pytest.mark.parametrize("name", ALL)
@given(pb=problems(), seed=st.integers(0, 1000))
def test_symmetric(name, pb, seed):
    op = curvopt.curvature(name, pb.model, pb.loss_fn, pb.data)
    g = torch.Generator().manual_seed(seed)
    v, w = torch.randn(2, op.shape[0], generator=g, dtype=torch.float64)
    torch.testing.assert_close(w @ (op @ v), v @ (op @ w), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", PSD)
@given(pb=problems())
def test_positive_semidefinite(name, pb):
    A = curvopt.curvature(name, pb.model, pb.loss_fn, pb.data, mc_samples=3).to_dense() \
        if name == "fisher" else curvopt.curvature(name, pb.model, pb.loss_fn, pb.data).to_dense()
    eig = torch.linalg.eigvalsh(A)
    assert eig.min() >= -1e-10 * max(1.0, eig.abs().max().item())


@pytest.mark.parametrize("name", ALL)
@given(pb=problems(kinds=("mlp", "cnn1d")), k=st.integers(2, 4))
def test_vector_matrix_and_list_inputs_agree(name, pb, k):
    op = curvopt.curvature(name, pb.model, pb.loss_fn, pb.data)
    V = torch.randn(op.shape[0], k, dtype=torch.float64)
    AV = op @ V
    assert AV.shape == (op.shape[0], k)
    for j in range(k):
        torch.testing.assert_close(op @ V[:, j], AV[:, j], rtol=1e-9, atol=1e-11)
    as_list = [t[0] for t in op.unflatten(V[:, 0].unsqueeze(0))]
    out = op @ as_list
    assert [o.shape for o in out] == [p.shape for p in op.params]
    torch.testing.assert_close(op.flatten([o.unsqueeze(0) for o in out])[0], AV[:, 0],
                               rtol=1e-9, atol=1e-11)


@given(pb=problems(losses=("mse",), kinds=("mlp",)), n_out=st.integers(1, 3))
def test_ggn_equals_hessian_for_linear_model_with_mse(pb, n_out):
    torch.manual_seed(0)
    model = nn.Linear(pb.X.shape[1], n_out).double()
    y = torch.randn(pb.X.shape[0], n_out, dtype=torch.float64)
    data = list(zip(pb.X.split(pb.splits), y.split(pb.splits)))
    H = curvopt.curvature("hessian", model, pb.loss_fn, data).to_dense()
    G = curvopt.curvature("ggn", model, pb.loss_fn, data).to_dense()
    torch.testing.assert_close(G, H, rtol=1e-10, atol=1e-12)


@given(pb=problems(kinds=("mlp",)))
def test_batch_split_does_not_change_result(pb):
    """Weighting by batch size makes any split equal to the one-batch result."""
    whole = curvopt.curvature("hessian", pb.model, pb.loss_fn, (pb.X, pb.y)).to_dense()
    split = curvopt.curvature("hessian", pb.model, pb.loss_fn, pb.batches).to_dense()
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)


def test_dataloader_with_short_last_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    loss_fn = nn.CrossEntropyLoss()
    from curvopt_tests.problems import Problem

    ref = dense_ggn(Problem(model, loss_fn, X, y, [10], "loader"))
    torch.testing.assert_close(curvopt.curvature("ggn", model, loss_fn, loader).to_dense(), ref)


def test_progress_bar_leaves_results_unchanged(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))) for _ in range(3)]
    plain = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), data).to_dense()
    shown = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), data, progress="ggn pass").to_dense()
    torch.testing.assert_close(shown, plain, rtol=0, atol=0)
    assert "ggn pass" in capsys.readouterr().err


def test_params_subset_is_the_submatrix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, y = torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 2, (5,))
    from curvopt_tests.problems import Problem

    H = dense_hessian(Problem(model, nn.CrossEntropyLoss(), X, y, [5], "sub"))
    op = curvopt.curvature("hessian", model, nn.CrossEntropyLoss(), (X, y),
                           params=[model[2].weight, model[0].bias])
    assert op.param_names == ["0.bias", "2.weight"]  # model order
    idx = torch.cat([torch.arange(6, 9), torch.arange(9, 15)])
    torch.testing.assert_close(op.to_dense(), H[idx][:, idx])
    assert [b.name for b in op.blocks] == ["0", "2"]
    for name in ["hessian", "ggn"]:  # products carry no graph through unselected parameters
        sub = curvopt.curvature(name, model, nn.CrossEntropyLoss(), (X, y), params=["0.bias"])
        assert not (sub @ torch.ones(3, dtype=torch.float64)).requires_grad
        assert not (sub @ torch.ones(3, 2, dtype=torch.float64)).requires_grad


def test_frozen_parameters_are_left_out_by_default():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    op = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), (torch.randn(4, 2), torch.zeros(4).long()))
    assert op.param_names == ["0.bias", "2.weight", "2.bias"]
    assert op.shape == (3 + 6 + 2, 3 + 6 + 2)


def test_dtype_and_device_follow_the_model():
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(4, 3), torch.randn(4, 2)  # float32 data, float64 model
    op = curvopt.curvature("ggn", model, nn.MSELoss(), (X, y))
    assert op.dtype == torch.float64 and op.device == model.weight.device
    out = op @ torch.ones(op.shape[0], dtype=torch.float32)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_fisher_converges_to_ggn(loss):
    """Monte-Carlo Fisher -> GGN at rate 1/sqrt(mc_samples); fixed seeds, stated tolerance."""
    from curvopt_tests.problems import LOSSES, Problem, build_model

    model = build_model("mlp", 3, 1, "tanh", 3, (2,), seed=3)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = {"ce": torch.randint(0, 3, (6,), generator=g),
         "mse": torch.randn(6, 3, generator=g, dtype=torch.float64),
         "bce": torch.rand(6, 3, generator=g, dtype=torch.float64)}[loss]
    pb = Problem(model, LOSSES[loss](), X, y, [4, 2], loss)
    G = dense_ggn(pb)

    def rel_err(samples):
        F = curvopt.curvature("fisher", model, pb.loss_fn, pb.batches, mc_samples=samples, seed=1)
        return (torch.linalg.norm(F.to_dense() - G) / torch.linalg.norm(G)).item()

    few, many = rel_err(10), rel_err(40_000)
    assert many < 0.03  # expected ~ few * sqrt(10 / 40000) = few / 63
    assert many < few / 8


def test_fisher_is_reproducible_and_resamples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    data = (torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 3, (8,)))
    a = curvopt.curvature("fisher", model, nn.CrossEntropyLoss(), data, seed=5)
    b = curvopt.curvature("fisher", model, nn.CrossEntropyLoss(), data, seed=5)
    A = a.to_dense()
    torch.testing.assert_close(A, b.to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(A, a.to_dense(), rtol=0, atol=0)  # same draws on every pass
    a.resample()
    assert not torch.equal(A, a.to_dense())


def test_block_diagonal_forwards_options_to_its_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    data = (torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 3, (6,)))
    op = curvopt.curvature("block_diagonal", model, nn.CrossEntropyLoss(), data,
                           base="fisher", mc_samples=7, seed=2)
    assert op.base.mc_samples == 7
    full = curvopt.curvature("fisher", model, nn.CrossEntropyLoss(), data, mc_samples=7, seed=2)
    from curvopt_tests.problems import block_mask

    F = full.to_dense()
    torch.testing.assert_close(op.to_dense(), torch.where(block_mask(op), F, torch.zeros_like(F)))


def test_cache_is_invalidated_when_parameters_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    data = (torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    for name in ["hessian", "ggn"]:
        op = curvopt.curvature(name, model, nn.MSELoss(), data, cache=True)
        before = op.to_dense()
        with torch.no_grad():
            model[0].weight.mul_(2.0)
        after = op.to_dense()
        fresh = curvopt.curvature(name, model, nn.MSELoss(), data).to_dense()
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, fresh)


@pytest.mark.parametrize("name", ["hessian", "ggn", "empirical_fisher", "fisher"])
@given(pb=problems(kinds=("mlp", "cnn1d")), budget=st.integers(1, 7), k=st.integers(1, 3))
def test_column_chunking_does_not_change_products(name, pb, budget, k):
    """Running the columns in chunks of max_batch_columns // n gives the same product."""
    whole = curvopt.curvature(name, pb.model, pb.loss_fn, pb.data)
    cut = curvopt.curvature(name, pb.model, pb.loss_fn, pb.data, max_batch_columns=budget)
    V = torch.randn(whole.shape[0], k, dtype=torch.float64)
    torch.testing.assert_close(cut @ V, whole @ V, rtol=1e-9, atol=1e-11)


def test_non_finite_loss_reports_the_batch_when_chunking_columns():
    from curvopt.errors import NonFiniteLossError

    model = nn.Linear(2, 2).double()
    X, y = torch.randn(12, 2, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    X[10, 0] = float("inf")
    op = curvopt.curvature("ggn", model, nn.MSELoss(), [(X[:6], y[:6]), (X[6:], y[6:])],
                           max_batch_columns=4)
    with pytest.raises(NonFiniteLossError, match="batch 1 "):
        op @ torch.randn(op.shape[0], 2, dtype=torch.float64)
