"""The Newton-type optimizers' defaults (issue 14): damped, truncated steps for mini-batches, which still
converge on a deterministic problem.

The undamped 100-product TrustRegion and ARC steps fitted their own mini-batch and were accepted on its
ratio while the training-set loss rose several-fold (0.816 test accuracy on one seed of the digits MLP;
``benchmarks/newton.py --defaults`` has the grid that chose damping 0.3 and 10 products)."""

import pytest
import torch

import curvopt


@pytest.mark.parametrize("cls, damping, max_iter", [(curvopt.NewtonMR, 0.1, 10), (curvopt.TrustRegion, 0.3, 10),
                                                    (curvopt.ARC, 0.3, 10)])
def test_mini_batch_defaults(cls, damping, max_iter):
    # the chosen point of the grid; the training figures it gave are the benchmark's, too slow for a test
    defaults = cls([torch.zeros(1, requires_grad=True)]).defaults
    assert (defaults["damping"], defaults["max_iter"]) == (damping, max_iter)


@pytest.mark.parametrize("cls", [curvopt.TrustRegion, curvopt.NewtonMR, curvopt.ARC])
def test_defaults_reject_nothing_on_a_deterministic_quadratic(cls):
    # damping is a mini-batch default: on an exact quadratic model the damped step is still a descent step
    # with ratio close to 1, so every step is accepted until the optimum's round-off, and the iterates
    # converge (more slowly than Newton)
    A = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = cls([x])

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ A @ x - b @ x
        loss.backward(create_graph=True)
        return loss

    optimum = float(-0.5 * b @ torch.linalg.solve(A, b))
    for _ in range(60):
        opt.step(closure)
        assert opt.stats.accepted or abs(opt.stats.loss - optimum) <= 1e-14
    torch.testing.assert_close(x.detach(), torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
