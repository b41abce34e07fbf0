"""Optimizers that consume curvature: ``torch.optim.Optimizer`` subclasses."""

from curvopt.optim.kfac import KFAC

__all__ = ["KFAC"]
