"""Curvature operators: the only part of curvopt that differentiates twice."""

from curvopt.curvature.backpack import BackpackDiagGGN, BackpackDiagHessian, BackpackKFAC, BackpackKFLR
from curvopt.curvature.base import BatchCurvatureOperator, CurvatureOperator
from curvopt.curvature.block_diagonal import BlockDiagonalOperator
from curvopt.curvature.empirical_fisher import EmpiricalFisherOperator
from curvopt.curvature.fisher import FisherOperator
from curvopt.curvature.ggn import GGNOperator
from curvopt.curvature.hessian import HessianOperator
from curvopt.curvature.kfac import KFACOperator
from curvopt.curvature.params import Block
from curvopt.curvature.registry import (
    available_curvatures,
    curvature,
    curvature_class,
    register_curvature,
)

__all__ = [
    "BackpackDiagGGN",
    "BackpackDiagHessian",
    "BackpackKFAC",
    "BackpackKFLR",
    "BatchCurvatureOperator",
    "Block",
    "BlockDiagonalOperator",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "KFACOperator",
    "available_curvatures",
    "curvature",
    "curvature_class",
    "register_curvature",
]
