"""NewtonMR, TrustRegion and ARC: exactness on quadratics, logistic regression against scipy,
saddle escape, Rosenbrock, and the optimizer contract (closures, groups, state, rejection)."""

import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import curvopt
from curvopt.errors import OptionError, UnknownCurvatureError
from curvopt.linalg import STOP_REASONS
from curvopt.optim import ClosureError

OPTIMIZERS = [curvopt.NewtonMR, curvopt.TrustRegion, curvopt.ARC]


def graph_closure(opt, f, x):
    """A plain closure: the loss with ``backward(create_graph=True)``."""
    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward(create_graph=True)
        return loss
    return closure


def run(opt, closure, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's create_graph reference-cycle note
        for _ in range(steps):
            opt.step(closure)


# exact Newton steps: undamped (all three damp by default, for mini-batches), unbounded (TrustRegion)
@pytest.mark.parametrize("cls, kwargs", [(curvopt.NewtonMR, {"damping": 0.0}),
                                         (curvopt.TrustRegion, {"radius": 1e3, "damping": 0.0})])
def test_one_newton_step_solves_a_quadratic(cls, kwargs):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(8, 8, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    x = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = cls([x], rtol=1e-13, **kwargs)
    run(opt, graph_closure(opt, lambda x: 0.5 * x @ A @ x - b @ x, x), 1)
    torch.testing.assert_close(x.detach(), torch.linalg.solve(A, b), rtol=1e-10, atol=1e-10)
    assert opt.stats.accepted and opt.stats.stop_reason == "converged"


def breast_cancer(features=None):
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    if features is not None:
        X = X[:, features]
    return torch.as_tensor(X), torch.as_tensor(y, dtype=torch.float64)


def scipy_logistic(X, y, l2):
    from scipy.optimize import minimize

    Xn, yn = X.numpy(), y.numpy()

    def f(w):
        z = Xn @ w[:-1] + w[-1]
        return np.mean(np.logaddexp(0, z) - yn * z) + 0.5 * l2 * w[:-1] @ w[:-1]

    def grad(w):
        z = Xn @ w[:-1] + w[-1]
        r = (1 / (1 + np.exp(-z)) - yn) / len(yn)
        return np.concatenate([Xn.T @ r + l2 * w[:-1], [r.sum()]])

    res = minimize(f, np.zeros(Xn.shape[1] + 1), jac=grad, method="BFGS",
                   options={"gtol": 1e-13, "maxiter": 10000})
    return torch.as_tensor(res.x), res.fun


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_regularized_logistic_regression_reaches_scipy_optimum(cls):
    X, y = breast_cancer()
    l2 = 1e-2
    w_ref, f_ref = scipy_logistic(X, y, l2)
    model = nn.Linear(X.shape[1], 1).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    opt = cls(model.parameters(), rtol=1e-12, damping=0.0)  # Newton's local rate: undamped

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(X).squeeze(1), y) \
            + 0.5 * l2 * (model.weight**2).sum()
        loss.backward(create_graph=True)
        return loss

    run(opt, closure, 40)
    w = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    assert float(torch.linalg.norm(w - w_ref) / torch.linalg.norm(w_ref)) < 1e-6
    assert abs(opt.stats.loss - f_ref) <= 1e-6 * abs(f_ref)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("backend", ["hessian", "ggn"])
def test_logistic_regression_with_batch_closure_and_registry_backend(cls, backend):
    # two features: not separable, so the unregularized optimum exists; GGN = Hessian here
    X, y = breast_cancer(features=[0, 1])
    w_ref, _ = scipy_logistic(X, y, 0.0)
    model = nn.Linear(2, 1).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    opt = cls(model.parameters(), curvature=backend, rtol=1e-12, damping=0.0)
    closure = curvopt.batch_closure(model, nn.BCEWithLogitsLoss(), X, y.unsqueeze(1))
    run(opt, closure, 40)
    w = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    assert float(torch.linalg.norm(w - w_ref) / torch.linalg.norm(w_ref)) < 1e-6


def saddle(xy):
    return xy[0] ** 2 - xy[1] ** 2 + xy[1] ** 4 / 4


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("start", [(1e-2, 1e-3), (1e-3, -1e-2)])
def test_escapes_strict_saddle(cls, start):
    xy = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = cls([xy])
    run(opt, graph_closure(opt, saddle, xy), 60)
    # the minima are (0, +-sqrt(2)) with value -1; the saddle at the origin has value 0
    assert abs(float(xy.detach()[0])) < 1e-6
    assert abs(abs(float(xy.detach()[1])) - math.sqrt(2)) < 1e-6
    assert float(saddle(xy.detach())) == pytest.approx(-1.0, abs=1e-10)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_rosenbrock_converges(cls):
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    opt = cls([x])
    run(opt, graph_closure(opt, lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2, x), 100)
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the contract
def small_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    return model, X, y


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_closure_errors(cls):
    model, X, y = small_problem()
    opt = cls(model.parameters())
    with pytest.raises(ClosureError, match="closure"):
        opt.step()

    def no_graph():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    with pytest.raises(ClosureError, match="create_graph=True"):
        opt.step(no_graph)
    opt = cls(model.parameters(), curvature="ggn")
    with pytest.raises(ClosureError, match="batch_closure"):
        opt.step(no_graph)
    assert opt.state_dict()["state"] == {}  # nothing was counted


def test_bad_options_name_the_choices():
    model, _, _ = small_problem()
    with pytest.raises(UnknownCurvatureError, match="ggn"):
        curvopt.NewtonMR(model.parameters(), curvature="hesian")
    with pytest.raises(OptionError, match="valid options"):
        curvopt.TrustRegion(model.parameters(), curvature="fisher", curvature_options={"samples": 3})
    for cls, kwargs, word in [(curvopt.NewtonMR, {"curvature_fraction": 0.0}, "curvature_fraction"),
                              (curvopt.NewtonMR, {"lr": -1.0}, "lr"),
                              (curvopt.TrustRegion, {"radius": 0.0}, "radius"),
                              (curvopt.TrustRegion, {"eta": 0.5}, "eta"),
                              (curvopt.ARC, {"sigma": 0.0}, "sigma"),
                              (curvopt.ARC, {"max_iter": 0}, "max_iter")]:
        with pytest.raises(ValueError, match=word):
            cls(model.parameters(), **kwargs)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("backend", ["hessian", "ggn", "fisher"])
def test_subsampled_curvature_trains_and_reports_statistics(cls, backend):
    model, X, y = small_problem()
    loss_fn = nn.CrossEntropyLoss()
    opt = cls(model.parameters(), curvature=backend, curvature_fraction=0.5, damping=1e-3, max_iter=20)
    first = float(loss_fn(model(X), y))
    for _ in range(5):
        opt.step(curvopt.batch_closure(model, loss_fn, X, y))  # curvature on a random half of it
        stats = opt.stats
        assert stats.stop_reason in STOP_REASONS
        assert isinstance(stats.accepted, bool) and stats.solver_iterations >= 1
        assert stats.evaluations >= 2
        if cls is not curvopt.NewtonMR:
            assert stats.ratio is not None
        if stats.accepted:
            assert stats.trial_loss < stats.loss
    assert float(loss_fn(model(X), y)) < first


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_param_groups_and_frozen_parameters(cls):
    model, X, y = small_problem()
    model[0].bias.requires_grad_(False)
    model[0].bias.grad = torch.ones_like(model[0].bias)  # a stale gradient must be ignored
    frozen = model[0].bias.detach().clone()
    key = {curvopt.NewtonMR: "lr", curvopt.TrustRegion: "radius", curvopt.ARC: "sigma"}[cls]
    first, second = [model[0].weight, model[0].bias], list(model[2].parameters())
    opt = cls([{"params": first, key: 0.5}, {"params": second}], curvature="ggn", damping=1e-3)
    closure = curvopt.batch_closure(model, nn.CrossEntropyLoss(), X, y)
    opt.step(closure)
    assert len(opt.stats_per_group) == 2
    assert torch.equal(model[0].bias, frozen)
    state = opt.state_dict()["state"]
    assert len(state) == 2 and all(s["steps"] == 1 for s in state.values())
    assert opt.param_groups[0][key] == 0.5 and opt.param_groups[1][key] != 0.5


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_state_dict_round_trip_resumes_exactly(cls):
    loss_fn = nn.CrossEntropyLoss()

    def make():
        model, X, y = small_problem()
        return model, X, y, cls(model.parameters(), curvature="ggn", curvature_fraction=0.5, damping=1e-2)

    model, X, y, opt = make()
    for _ in range(3):
        opt.step(curvopt.batch_closure(model, loss_fn, X, y))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, _, _, opt2 = make()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.state_dict()["state"] == opt.state_dict()["state"]
    for _ in range(3):
        opt.step(curvopt.batch_closure(model, loss_fn, X, y))
        opt2.step(curvopt.batch_closure(model2, loss_fn, X, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt.state_dict()["state"] == opt2.state_dict()["state"]


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_nonfinite_trial_loss_rejects_and_restores_exactly(cls):
    x = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    origin = x.detach().clone()

    def f(x):  # finite only at the starting point
        loss = (x**2).sum()
        return loss if torch.equal(x.detach(), origin) else loss * float("nan")

    opt = cls([x])
    key = {curvopt.NewtonMR: "step_size", curvopt.TrustRegion: "radius", curvopt.ARC: "sigma"}[cls]
    run(opt, graph_closure(opt, f, x), 1)
    assert not opt.stats.accepted
    assert torch.equal(x.detach(), origin)
    state = next(iter(opt.state.values()))
    assert state["rejected"] == 1
    if cls is curvopt.TrustRegion:
        assert state[key] < 1.0
    if cls is curvopt.ARC:
        assert state[key] > 1.0


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_nonfinite_curvature_rejects_and_restores_exactly(cls):
    x = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    x0 = x.detach().clone()

    def f(x):  # finite loss and gradient at x0, but the second derivative there is 0 * inf
        return ((x - 3) ** 2).sum() + 0 * ((x - x0).abs() ** 1.5).sum()

    opt = cls([x])
    run(opt, graph_closure(opt, f, x), 1)
    assert opt.stats.stop_reason == "nonfinite" and not opt.stats.accepted
    assert torch.equal(x.detach(), x0)
    state = next(iter(opt.state.values()))
    if cls is curvopt.TrustRegion:
        assert state["radius"] < 1.0
    if cls is curvopt.ARC:
        assert state["sigma"] > 1.0


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_nonfinite_loss_warns_and_leaves_parameters(cls):
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = cls([x])
    with pytest.warns(UserWarning, match="non-finite loss|nonfinite loss"):
        opt.step(graph_closure(opt, lambda x: (x**2).sum() * float("inf"), x))
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert not opt.stats.accepted


def test_newton_mr_follows_lr_scheduler():
    model, X, y = small_problem()
    opt = curvopt.NewtonMR(model.parameters(), lr=1.0, curvature="ggn", damping=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    closure = curvopt.batch_closure(model, nn.CrossEntropyLoss(), X, y)
    opt.step(closure)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.25
    opt.step(closure)
    assert opt.stats.step_size <= 0.25  # the line search starts from the scheduled lr


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_unused_parameters_and_zero_gradients(cls):
    model, X, y = small_problem()
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = cls(list(model.parameters()) + [unused], curvature="ggn", damping=1e-2)
    opt.step(curvopt.batch_closure(model, nn.CrossEntropyLoss(), X, y))  # unused has no gradient
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    # a loss that does not depend on the parameters at all: nothing to do, nothing moves
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = cls([x])
    run(opt, graph_closure(opt, lambda x: (x * 0).sum() + 1.0, x), 1)
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert not opt.stats.accepted and opt.stats.stop_reason == "zero_rhs"


@pytest.mark.parametrize("cls", [curvopt.TrustRegion, curvopt.ARC])
def test_trust_region_and_arc_take_a_scheduled_fraction_of_the_step(cls):
    # on a quadratic the model is exact, so a shortened step has ratio 1 and is accepted
    A = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    kwargs = {"radius": 1e3} if cls is curvopt.TrustRegion else {"sigma": 1e-6}
    opt = cls([x], lr=1.0, rtol=1e-13, damping=0.0, **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scheduler.step()  # lr 0.5
    f = graph_closure(opt, lambda x: 0.5 * x @ A @ x - b @ x, x)
    run(opt, f, 1)
    newton = torch.linalg.solve(A, b)
    torch.testing.assert_close(x.detach(), 0.5 * newton, rtol=1e-5, atol=1e-8)
    assert opt.stats.accepted and opt.stats.ratio == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="lr"):
        cls([x], lr=1.5)


def test_newton_mr_defaults_train_a_digits_mlp_without_diverging():
    # mini-batch training with nothing but curvature="ggn" set: the former defaults (undamped, 100 MINRES
    # products) fitted each batch of 64 with a full Newton step and raised the loss on the others (train
    # loss 3.4, 3.8, 1.6 after the epochs, test accuracy 0.53); damping 0.1 and 10 products train
    from curvopt.data import digits
    from curvopt.models import mlp

    data = digits()
    torch.manual_seed(0)
    model = mlp((64, 64, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = curvopt.NewtonMR(model.parameters(), curvature="ggn")
    for epoch in range(3):
        for X, y in data.loader(64, shuffle=True, seed=epoch):
            opt.step(curvopt.batch_closure(model, loss_fn, X, y))
        with torch.no_grad():
            train_loss = float(loss_fn(model(data.X_train), data.y_train))
        assert train_loss < 0.5, f"epoch {epoch + 1}: train loss {train_loss:.3f} (chance level is ln 10 = 2.3)"
    with torch.no_grad():
        accuracy = float((model(data.X_test).argmax(1) == data.y_test).float().mean())
    assert accuracy >= 0.9
