"""Bad input gets a clear error and changes nothing."""

import copy

import pytest
import torch
from torch import nn

import curvopt
from curvopt.errors import (
    EmptyDataError,
    NonFiniteLossError,
    OptionError,
    ParameterError,
    ShapeError,
    UnknownCurvatureError,
    UnsupportedLossError,
)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    return model, nn.CrossEntropyLoss(), data


def _unchanged(model, snapshot):
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot.values()))


def test_unknown_backend_lists_valid_names(setup):
    with pytest.raises(UnknownCurvatureError, match="valid names: .*ggn.*hessian"):
        curvopt.curvature("hesian", *setup)


def test_unknown_option_lists_valid_options(setup):
    with pytest.raises(OptionError, match="'mc_sample'.*valid options: .*mc_samples"):
        curvopt.curvature("fisher", *setup, mc_sample=3)
    with pytest.raises(OptionError, match="positive integer"):
        curvopt.curvature("fisher", *setup, mc_samples=0)
    with pytest.raises(OptionError, match="not available for HessianOperator; valid: False, True"):
        curvopt.curvature("hessian", *setup, cache="linearize")
    with pytest.raises(OptionError, match="max_batch_columns"):
        curvopt.curvature("ggn", *setup, max_batch_columns=0)


def test_parameters_not_owned_by_the_model(setup):
    model, loss, data = setup
    stranger = nn.Linear(2, 2).weight
    with pytest.raises(ParameterError, match=r"params\[1\].*not a parameter of the model"):
        curvopt.curvature("hessian", model, loss, data, params=[model[0].weight, stranger])
    with pytest.raises(ParameterError, match="no parameter named 'fc.weight'; valid names: 0.weight"):
        curvopt.curvature("hessian", model, loss, data, params=["fc.weight"])
    with pytest.raises(ParameterError, match="selected twice"):
        curvopt.curvature("hessian", model, loss, data, params=[model[0].bias, "0.bias"])


def test_unsupported_loss_names_supported_ones(setup):
    model, _, data = setup
    for name in ["ggn", "fisher", "empirical_fisher"]:
        with pytest.raises(UnsupportedLossError, match="NLLLoss.*CrossEntropyLoss.*MSELoss.*BCEWithLogits"):
            curvopt.curvature(name, model, nn.NLLLoss(), data)
    with pytest.raises(UnsupportedLossError, match="weight"):
        curvopt.curvature("ggn", model, nn.CrossEntropyLoss(weight=torch.ones(3)), data)
    with pytest.raises(UnsupportedLossError, match="reduction 'none'"):
        curvopt.curvature("hessian", model, nn.CrossEntropyLoss(reduction="none"), data)


def test_wrong_vector_size_says_expected_shape(setup):
    op = curvopt.curvature("ggn", *setup)
    P = op.shape[0]
    with pytest.raises(ShapeError, match=rf"expected a vector of shape \({P},\)"):
        op @ torch.zeros(P + 1)
    with pytest.raises(ShapeError, match=rf"\({P}, k\)"):
        op @ torch.zeros(P, 2, 2)
    with pytest.raises(ShapeError, match="shaped like the parameters"):
        op @ [torch.zeros(4, 3)]


def test_empty_data(setup):
    model, loss, _ = setup
    with pytest.raises(EmptyDataError, match="no batches"):
        curvopt.curvature("hessian", model, loss, [])
    with pytest.raises(EmptyDataError, match="0 samples"):
        curvopt.curvature("hessian", model, loss, (torch.zeros(0, 3), torch.zeros(0).long()))
    op = curvopt.curvature("hessian", model, loss, [(torch.zeros(0, 3), torch.zeros(0).long())])
    with pytest.raises(EmptyDataError, match="every batch is empty"):
        op @ torch.zeros(op.shape[0])
    with pytest.raises(TypeError, match="one-shot iterator"):
        curvopt.curvature("hessian", model, loss, (b for b in [(torch.zeros(1, 3), torch.zeros(1).long())]))


@pytest.mark.parametrize("name", ["hessian", "ggn", "fisher", "empirical_fisher"])
def test_non_finite_loss_names_the_batch(setup, name):
    model, loss, data = setup
    data = [(x.clone(), y) for x, y in data]
    data[1][0][2, 0] = float("nan")
    snapshot = copy.deepcopy(model.state_dict())
    op = curvopt.curvature(name, model, loss, data)
    with pytest.raises(NonFiniteLossError, match="batch 1"):
        op @ torch.ones(op.shape[0])
    assert _unchanged(model, snapshot)


def test_errors_leave_model_unchanged(setup):
    model, loss, data = setup
    snapshot = copy.deepcopy(model.state_dict())
    op = curvopt.curvature("hessian", model, loss, data)
    with pytest.raises(ShapeError):
        op @ torch.zeros(3)
    op @ torch.ones(op.shape[0])
    assert _unchanged(model, snapshot)
    assert all(p.grad is None for p in model.parameters())


def test_custom_block_errors(setup):
    model, loss, data = setup
    with pytest.raises(ParameterError, match="parameters in no block: 2.bias"):
        curvopt.curvature("block_diagonal", model, loss, data,
                          blocks={"a": ["0.weight", "0.bias", "2.weight"]})
    with pytest.raises(ParameterError, match="in both block 'a' and block 'b'"):
        curvopt.curvature("block_diagonal", model, loss, data,
                          blocks={"a": ["0.weight", "0.bias"], "b": ["0.bias", "2.weight", "2.bias"]})
    with pytest.raises(OptionError, match="'ggn' curvature got unknown option.*'mc_samples'"):
        curvopt.curvature("block_diagonal", model, loss, data, base="ggn", mc_samples=2)
    with pytest.raises(OptionError, match="cannot wrap itself"):
        curvopt.curvature("block_diagonal", model, loss, data, base="block_diagonal")


@pytest.mark.parametrize("backend", ["ggn", "fisher", "kfac", "empirical_fisher"])
def test_functional_losses_match_their_modules(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    for functional, module, target in [(nn.functional.cross_entropy, nn.CrossEntropyLoss(), y),
                                       (nn.functional.mse_loss, nn.MSELoss(), torch.randn(12, 3).double())]:
        a = curvopt.curvature(backend, model, functional, (X, target)).to_dense()
        b = curvopt.curvature(backend, model, module, (X, target)).to_dense()
        torch.testing.assert_close(a, b)
