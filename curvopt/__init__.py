"""curvopt: second-order optimization and curvature analysis for PyTorch.

Public API::

    op = curvopt.curvature("ggn", model, loss_fn, data)   # a CurvatureOperator
    op @ v, op @ V, op.blocks, op.to_dense()
    curvopt.top_eigenvalues(op, k=5); curvopt.trace(op, per_block=True)
    curvopt.spectral_density(op); curvopt.sensitivity(model, loader)
    plan = curvopt.allocate_bits(model, report, average_bits=3.0); curvopt.fake_quantized(model, plan)
"""

from curvopt import errors, quant
from curvopt.analysis import (
    CurvatureMonitor,
    loss_landscape,
    random_direction,
    sensitivity,
    spectral_density,
    top_eigenvalues,
    trace,
)
from curvopt.curvature import (
    BatchCurvatureOperator,
    Block,
    CurvatureOperator,
    available_curvatures,
    curvature,
    register_curvature,
)
from curvopt.optim import ARC, KFAC, NewtonMR, TrustRegion, batch_closure
from curvopt.optim.registry import available_optimizers, make_optimizer
from curvopt.quant import allocate_bits, fake_quantized
from curvopt.registry import Registry
from curvopt.schedule import (
    FGSM,
    AdaptiveBatchSize,
    FixedBatchSize,
    IncreaseBatchSize,
    available_schedules,
    make_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "ARC",
    "AdaptiveBatchSize",
    "CurvatureMonitor",
    "FGSM",
    "FixedBatchSize",
    "IncreaseBatchSize",
    "Block",
    "KFAC",
    "NewtonMR",
    "TrustRegion",
    "batch_closure",
    "BatchCurvatureOperator",
    "CurvatureOperator",
    "allocate_bits",
    "available_curvatures",
    "available_optimizers",
    "available_schedules",
    "curvature",
    "errors",
    "fake_quantized",
    "loss_landscape",
    "make_optimizer",
    "make_schedule",
    "quant",
    "random_direction",
    "sensitivity",
    "spectral_density",
    "top_eigenvalues",
    "trace",
    "register_curvature",
    "Registry",
    "__version__",
]
