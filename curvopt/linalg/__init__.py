"""Matrix-free numerical algorithms on any curvature operator (or dense tensor).

The only place in curvopt that runs iterative numerical algorithms.
"""

from curvopt.linalg.density import slq_nodes, spectral_density_from_nodes
from curvopt.linalg.lanczos import LanczosResult, lanczos, lanczos_tridiagonal
from curvopt.linalg.power import power_iteration
from curvopt.linalg.trace import TraceEstimate, diagonal_estimate, trace_estimate

__all__ = [
    "LanczosResult",
    "TraceEstimate",
    "diagonal_estimate",
    "lanczos",
    "lanczos_tridiagonal",
    "power_iteration",
    "slq_nodes",
    "spectral_density_from_nodes",
    "trace_estimate",
]
