"""The K-FAC seam: factor blocks' matrix powers against dense float64 references."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvopt.curvature.kfac_factors import DiagonalBlock, KroneckerFactors


def _spd(n, g, rank=None):
    X = torch.randn(n, rank or n, generator=g, dtype=torch.float64)
    return X @ X.T / (rank or n)


def _dense_power(A, G, damping, power):
    # row-major vec: G M A == (G ⊗ A) vec(M), both factors symmetric
    lam, Q = torch.linalg.eigh(torch.kron(G, A) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype))
    return (Q * lam.pow(power)) @ Q.T


@given(out=st.integers(1, 4), d_in=st.integers(1, 4), bias=st.booleans(), seed=st.integers(0, 2**16),
       power=st.sampled_from([1, -1, 0.5, -0.5]))
def test_multiply_by_a_power_matches_the_dense_kronecker_product(out, d_in, bias, seed, power):
    g = torch.Generator().manual_seed(seed)
    size = d_in + bias
    A, G = _spd(size, g, rank=max(1, size - 1)), _spd(out, g)  # A singular: damping keeps powers defined
    block = KroneckerFactors({})
    block.set(A, G)
    W = torch.randn(out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    damping = 0.0 if power == 1 else 0.3
    u_w, u_b = block.multiply(W, b, power=power, damping=damping)
    M = W if b is None else torch.cat([W, b[:, None]], 1)
    expected = (_dense_power(A, G, damping, power) @ M.reshape(-1)).reshape(out, size)
    got = u_w if b is None else torch.cat([u_w, u_b[:, None]], 1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_factored_inverse_uses_stored_inverses_only_for_their_damping():
    g = torch.Generator().manual_seed(0)
    A, G = _spd(3, g), _spd(2, g)
    W = torch.randn(2, 3, generator=g, dtype=torch.float64)
    pi = ((A.trace() / 3) / (G.trace() / 2)).sqrt()
    for d in (0.1, 1.0):
        expected = torch.linalg.solve(G + d**0.5 / pi * torch.eye(2, dtype=A.dtype), W) @ torch.linalg.inv(
            A + pi * d**0.5 * torch.eye(3, dtype=A.dtype))
        store = {"A": A, "G": G, "inv_A": torch.zeros(3, 3), "inv_G": torch.zeros(2, 2), "inv_damping": 0.5}
        u, _ = KroneckerFactors(store).multiply(W, power=-1, damping=d, factored=True)  # stale: recomputed
        torch.testing.assert_close(u, expected)
    with pytest.raises(ValueError, match="power=-1"):
        KroneckerFactors({"A": A, "G": G}).multiply(W, power=0.5, damping=0.1, factored=True)


def test_diagonal_block_powers_and_moving_average():
    D = torch.tensor([1.0, 4.0], dtype=torch.float64)
    block = DiagonalBlock(None)
    block.update(D, 0.9)
    assert torch.equal(block.D, D)
    block.update(torch.tensor([3.0, 0.0], dtype=torch.float64), 0.5)
    torch.testing.assert_close(block.D, torch.tensor([2.0, 2.0], dtype=torch.float64))
    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(block.multiply(v), 2 * v)
    torch.testing.assert_close(block.multiply(v, power=-1, damping=2.0), v / 4)
    torch.testing.assert_close(block.multiply(v, power=0.5, damping=2.0), v * 2)
