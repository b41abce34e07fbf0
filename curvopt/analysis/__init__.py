"""Curvature analysis: spectrum, trace, density, per-layer sensitivity, loss landscape, plots."""

from curvopt.analysis.landscape import Landscape, loss_landscape, random_direction
from curvopt.analysis.monitor import CurvatureMonitor
from curvopt.analysis.sensitivity import LayerSensitivity, SensitivityReport, sensitivity
from curvopt.analysis.spectrum import spectral_density, top_eigenvalues, trace

__all__ = [
    "CurvatureMonitor",
    "Landscape",
    "LayerSensitivity",
    "SensitivityReport",
    "loss_landscape",
    "random_direction",
    "sensitivity",
    "spectral_density",
    "top_eigenvalues",
    "trace",
]
