"""curvopt: second-order optimization and curvature analysis for PyTorch.

Public API::

    op = curvopt.curvature("ggn", model, loss_fn, data)   # a CurvatureOperator
    op @ v, op @ V, op.blocks, op.to_dense()
"""

from curvopt import errors
from curvopt.curvature import (
    Block,
    CurvatureOperator,
    available_curvatures,
    curvature,
    register_curvature,
)

__version__ = "0.1.0"

__all__ = [
    "Block",
    "CurvatureOperator",
    "available_curvatures",
    "curvature",
    "errors",
    "register_curvature",
    "__version__",
]
