"""Power iteration with deflation: the baseline that PyHessian-style tools use."""

from __future__ import annotations

import torch

from curvopt.linalg.eigen_result import EigenResult
from curvopt.linalg.linear_operator import SymmetricOperator, matmat, size_of
from curvopt.linalg.probes import gaussian


def power_iteration(
    A: SymmetricOperator,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 200,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The ``k`` eigenpairs of largest magnitude, one at a time, deflating found ones.

    Each eigenvalue iterates ``v <- (A - sum_j lambda_j u_j u_j^T) v / ||.||`` until the
    Rayleigh quotient changes by less than ``tol`` relatively. Kept as the reference
    method that :func:`~curvopt.linalg.lanczos.lanczos` is measured against. One host
    synchronisation per product (the stopping test).
    """
    P = size_of(A)
    if not 1 <= k <= P:
        raise ValueError(f"k must be between 1 and {P} (the operator's size), got {k}")
    vals: list[torch.Tensor] = []
    vecs: list[torch.Tensor] = []
    resid: list[torch.Tensor] = []
    products, converged_all = 0, True
    for _ in range(k):
        v = gaussian(P, 1, A, generator).squeeze(1)
        v = v / torch.linalg.norm(v)
        lam = torch.zeros((), dtype=A.dtype, device=A.device)
        lam_host = 0.0
        converged = False
        for _ in range(max_iter):
            w = _deflated(A, v, vals, vecs)
            products += 1
            new, n = v @ w, torch.linalg.norm(w)
            # the iteration's one transfer to the host: the Rayleigh quotient and the norm together
            new_host, n_host = torch.stack([new, n]).tolist()
            if n_host == 0:
                lam, converged = new, True
                break
            done = abs(new_host - lam_host) <= tol * abs(new_host)
            v, lam, lam_host = w / n_host, new, new_host
            if done:
                converged = True
                break
        w = _deflated(A, v, vals, vecs)
        products += 1
        resid.append(torch.linalg.norm(w - lam * v))
        vals.append(lam)
        vecs.append(v)
        converged_all &= converged
    return EigenResult(torch.stack(vals), torch.stack(vecs, 1), torch.stack(resid), products, converged_all)


def _deflated(A, v, vals, vecs):
    w = matmat(A, v.unsqueeze(1)).squeeze(1)
    for lam, u in zip(vals, vecs):
        w = w - lam * u * (u @ v)
    return w
