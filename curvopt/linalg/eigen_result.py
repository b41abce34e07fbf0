"""What the eigenvalue algorithms in :mod:`curvopt.linalg` (Lanczos, power iteration) return."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EigenResult:
    """Approximate eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: ``[k]``, sorted by decreasing (``largest``) or increasing value.
        eigenvectors: ``[P, k]`` orthonormal (approximate) eigenvectors.
        residuals: ``[k]`` residual norms ``||A x_i - theta_i x_i||`` (Lanczos: the bounds
            ``|beta_m s_{m,i}|``, equal to them in exact arithmetic).
        iterations: Number of products with ``A``.
        converged: Whether every pair met the tolerance.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    converged: bool
