"""Optimizers that consume curvature: ``torch.optim.Optimizer`` subclasses."""

from curvopt.optim.arc import ARC
from curvopt.optim.closure import BatchClosure, batch_closure
from curvopt.optim.kfac import KFAC
from curvopt.optim.newton_mr import NewtonMR
from curvopt.optim.second_order import ClosureError, StepStats
from curvopt.optim.trust_region import TrustRegion

__all__ = ["ARC", "BatchClosure", "ClosureError", "KFAC", "NewtonMR", "StepStats", "TrustRegion", "batch_closure"]
