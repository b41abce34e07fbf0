"""What ``op.solve`` runs: ``(A + damping I) X = B`` column by column with a Krylov solver
of :mod:`curvopt.linalg` (which only ever sees the operator's products)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from curvopt.linalg import STOP_REASONS, cg, minres

#: Krylov methods every operator's ``solve`` accepts; the first is the default.
KRYLOV_METHODS = ("minres", "cg")
#: Stop reasons that count as solved: within tolerance, exact in the Krylov space, the
#: least-squares solution of a singular system, or a zero right-hand side.
SOLVED = ("converged", "exact", "least_squares", "zero_rhs")


def krylov_solve(op: Any, B: torch.Tensor, damping: float, method: str, rtol: float,
                 max_iter: int | None) -> torch.Tensor:
    """``[P, k]`` solutions of ``(op + damping I) x_j = B[:, j]``; warns for a column that stops
    short, naming the column, the stop reason and the relative residual reached."""
    columns = []
    for j in range(B.shape[1]):
        if method == "minres":
            result = minres(op, B[:, j], rtol=rtol, max_iter=max_iter, shift=damping,
                            detect_negative_curvature=False)
        else:
            result = cg(op, B[:, j], rtol=rtol, max_iter=max_iter, shift=damping)
        if result.reason not in SOLVED:
            scale = float(torch.linalg.norm(B[:, j])) or 1.0
            warnings.warn(
                f"{type(op).__name__}.solve ({method}): column {j} stopped after {result.iterations} products "
                f"with relative residual {result.residual_norm / scale:.2e}: {result.reason} "
                f"({STOP_REASONS[result.reason]})",
                RuntimeWarning,
                stacklevel=4,
            )
        columns.append(result.x)
    return torch.stack(columns, dim=1)
