"""MINRES, CG, Steihaug-CG and the cubic subproblem solver against dense float64 solves."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvopt
from curvopt.linalg import STOP_REASONS, cg, cubic_subproblem, minres, steihaug_cg
from curvopt.linalg.cubic import cubic_reduced

KINDS = ("spd", "indefinite", "singular_psd", "singular_indefinite")


@st.composite
def systems(draw, kinds=KINDS, min_size=3, max_size=30):
    """``(A, b, kind)``: eigenvalue magnitudes in [0.1, 10] (zeros for singular kinds), random basis."""
    kind = draw(st.sampled_from(kinds))
    n = draw(st.integers(min_size, max_size))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    mags = 0.1 * 100 ** torch.rand(n, generator=g, dtype=torch.float64)
    if kind in ("indefinite", "singular_indefinite"):
        mags[: max(1, n // 3)] *= -1
    if kind.startswith("singular"):
        mags[: max(1, n // 4)] = 0.0
    A = (Q * mags) @ Q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return A, b, kind


def range_projector(A):
    return A @ torch.linalg.pinv(A, hermitian=True)


@given(systems(kinds=("spd", "indefinite")))
def test_minres_solves_nonsingular_systems(system):
    A, b, _ = system
    res = minres(A, b, rtol=1e-12, detect_negative_curvature=False)
    assert res.reason in ("converged", "exact")
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-8)
    assert abs(res.residual_norm - float(torch.linalg.norm(b - A @ res.x))) < 1e-7 * float(b.norm())


@given(systems(kinds=("singular_psd", "singular_indefinite")))
def test_minres_consistent_singular_system_gives_pseudo_inverse_solution(system):
    A, b, _ = system
    b = A @ b  # consistent: b in range(A)
    res = minres(A, b, rtol=1e-12, detect_negative_curvature=False)
    assert res.reason in ("converged", "exact", "least_squares")
    torch.testing.assert_close(res.x, torch.linalg.pinv(A, hermitian=True) @ b, rtol=1e-6, atol=1e-7)


@given(systems(kinds=("singular_psd", "singular_indefinite")))
def test_minres_inconsistent_singular_system_is_least_squares(system):
    A, b, _ = system
    res = minres(A, b, rtol=1e-12, detect_negative_curvature=False)
    assert res.reason == "least_squares"
    r = b - A @ res.x
    assert float(torch.linalg.norm(A @ r)) <= 1e-6 * float(torch.linalg.norm(b))
    # its component in range(A) is the pseudo-inverse solution, up to the stopping test:
    # P (x - A^+ b) = -A^+ r, so its norm is at most ||A^+||^2 ||A r||
    pinv = torch.linalg.pinv(A, hermitian=True)
    error = float(torch.linalg.norm(range_projector(A) @ res.x - pinv @ b))
    assert error <= 1.01 * float(torch.linalg.matrix_norm(pinv, 2)) ** 2 * float(torch.linalg.norm(A @ r)) + 1e-12


@given(systems())
def test_minres_detects_nonpositive_curvature_with_the_residual(system):
    A, g, kind = system
    res = minres(A, -g, rtol=1e-12)
    if kind == "spd":
        assert res.reason == "converged"
        return
    if res.reason != "negative_curvature":  # b missed every non-positive eigenvector
        return
    d = res.direction
    torch.testing.assert_close(d, -g - A @ res.x, rtol=1e-8, atol=1e-8)  # it is the residual r_{k-1}
    curvature = float(d @ A @ d) / float(d @ d)
    assert curvature <= 1e-9 * float(torch.linalg.matrix_norm(A, 2))
    assert abs(curvature - res.curvature) <= 1e-8 * float(torch.linalg.matrix_norm(A, 2))
    assert float(g @ d) < 0  # a descent direction for f with gradient g


def test_minres_flags_indefinite_matrix_at_first_step():
    A = torch.diag(torch.tensor([1.0, -2.0], dtype=torch.float64))
    res = minres(A, torch.tensor([0.1, 1.0], dtype=torch.float64))
    assert res.reason == "negative_curvature" and res.iterations == 1 and res.curvature < 0


@given(systems(kinds=("spd",)))
def test_cg_solves_spd_systems(system):
    A, b, _ = system
    res = cg(A, b, rtol=1e-12)
    assert res.reason == "converged"
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-8)


@given(systems(kinds=("indefinite", "singular_indefinite")))
def test_cg_reports_nonpositive_curvature_direction(system):
    A, b, _ = system
    res = cg(A, b, rtol=1e-12)
    if res.reason == "negative_curvature":
        d = res.direction
        assert float(d @ A @ d) <= 1e-9 * float(d @ d) * float(torch.linalg.matrix_norm(A, 2))


def model_value(g, H, p, sigma=0.0):
    return float(g @ p + 0.5 * p @ H @ p + sigma / 3 * torch.linalg.norm(p) ** 3)


@given(systems(), st.floats(0.01, 100.0))
def test_steihaug_cg_stays_in_region_and_beats_cauchy_point(system, radius):
    H, g, kind = system
    res = steihaug_cg(H, g, radius, rtol=1e-10)
    norm = float(torch.linalg.norm(res.x))
    assert norm <= radius * (1 + 1e-10)
    assert abs(res.model_value - model_value(g, H, res.x)) <= 1e-8 * max(1.0, abs(res.model_value))
    # Cauchy point: the model's minimizer along -g within the region
    gHg, gg = float(g @ H @ g), float(g @ g)
    t_max = radius / math.sqrt(gg)
    t = t_max if gHg <= 0 else min(gg / gHg, t_max)
    assert res.model_value <= model_value(g, H, -t * g) + 1e-9 * max(1.0, abs(res.model_value))
    if res.reason in ("boundary", "negative_curvature"):
        assert norm == pytest.approx(radius, rel=1e-8)
    if kind == "spd" and res.reason == "converged":
        torch.testing.assert_close(res.x, -torch.linalg.solve(H, g), rtol=1e-6, atol=1e-8)


@given(systems(), st.floats(0.05, 20.0))
def test_cubic_subproblem_finds_the_global_minimizer(system, sigma):
    H, g, _ = system
    res = cubic_subproblem(H, g, sigma, rtol=1e-11)
    assert res.reason in ("converged", "exact")
    s = res.x
    s_norm = float(torch.linalg.norm(s))
    # global optimality (Nesterov & Polyak, 2006): zero model gradient and H + sigma ||s|| I >= 0
    grad = g + H @ s + sigma * s_norm * s
    assert float(torch.linalg.norm(grad)) <= 1e-7 * float(torch.linalg.norm(g))
    assert float(torch.linalg.eigvalsh(H)[0]) + sigma * s_norm >= -1e-6
    assert abs(res.model_value - model_value(g, H, s, sigma)) <= 1e-8 * max(1.0, abs(res.model_value))


def test_cubic_reduced_hard_case():
    # e_1 is orthogonal to the eigenvector of the lowest eigenvalue -1
    T = np.diag([2.0, -1.0])
    y, value = cubic_reduced(T, 1.0, 1.0)
    assert np.linalg.norm(y) == pytest.approx(1.0)  # mu = -lambda_min = 1 = sigma ||y||
    assert y[0] == pytest.approx(-1 / 3)
    grid = np.linspace(-2, 2, 801)
    Y0, Y1 = np.meshgrid(grid, grid)
    brute = Y0 + 0.5 * (2 * Y0**2 - Y1**2) + np.sqrt(Y0**2 + Y1**2) ** 3 / 3
    assert value <= brute.min() + 1e-9


def test_solvers_run_on_curvature_operators():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    H = curvopt.curvature("ggn", model, nn.CrossEntropyLoss(), (X, y))
    dense = H.to_dense()
    b = torch.randn(H.shape[0], dtype=torch.float64)
    res = minres(H, b, rtol=1e-10, shift=1e-2, detect_negative_curvature=False)
    torch.testing.assert_close(res.x, torch.linalg.solve(dense + 1e-2 * torch.eye(len(b), dtype=b.dtype), b),
                               rtol=1e-6, atol=1e-8)


def test_stop_reasons_and_bad_input():
    A = torch.eye(3, dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    for solve in (lambda: minres(A, zero), lambda: cg(A, zero), lambda: steihaug_cg(A, zero, 1.0),
                  lambda: cubic_subproblem(A, zero, 1.0)):
        assert solve().reason == "zero_rhs"
    nan = torch.full((3, 3), float("nan"), dtype=torch.float64)
    b = torch.ones(3, dtype=torch.float64)
    for solve in (lambda: minres(nan, b), lambda: cg(nan, b), lambda: steihaug_cg(nan, b, 1.0),
                  lambda: cubic_subproblem(nan, b, 1.0)):
        res = solve()
        assert res.reason == "nonfinite" and bool(torch.isfinite(res.x).all())
    assert minres(torch.diag(torch.arange(1.0, 40.0, dtype=torch.float64)), torch.ones(39, dtype=torch.float64),
                  max_iter=3).reason == "max_iterations"
    with pytest.raises(ValueError, match="rtol"):
        minres(A, b, rtol=0)
    with pytest.raises(ValueError, match="max_iter"):
        cg(A, b, max_iter=0)
    with pytest.raises(ValueError, match="radius"):
        steihaug_cg(A, b, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        cubic_subproblem(A, b, -1.0)
    assert set(STOP_REASONS) >= {"converged", "negative_curvature", "boundary", "least_squares", "max_iterations"}
