"""Matrix-free numerical algorithms on any linear operator (or dense tensor).

The only place in curvopt that runs iterative numerical algorithms. Their operand is a
:class:`LinearOperator` (every :class:`~curvopt.CurvatureOperator` is one) or a dense symmetric tensor.
"""

from curvopt.linalg.cg import cg, steihaug_cg
from curvopt.linalg.cubic import cubic_subproblem
from curvopt.linalg.density import slq_nodes, spectral_density_from_nodes
from curvopt.linalg.eigen_result import EigenResult
from curvopt.linalg.lanczos import lanczos, lanczos_tridiagonal
from curvopt.linalg.linear_operator import LinearOperator, Shifted
from curvopt.linalg.minres import minres
from curvopt.linalg.power import power_iteration
from curvopt.linalg.solve_result import STOP_REASONS, SolveResult
from curvopt.linalg.trace import TraceEstimate, diagonal_estimate, trace_estimate

#: The earlier name of :class:`EigenResult`, when only Lanczos returned it.
LanczosResult = EigenResult

__all__ = [
    "STOP_REASONS",
    "EigenResult",
    "LanczosResult",
    "LinearOperator",
    "Shifted",
    "SolveResult",
    "cg",
    "cubic_subproblem",
    "TraceEstimate",
    "diagonal_estimate",
    "lanczos",
    "lanczos_tridiagonal",
    "minres",
    "power_iteration",
    "slq_nodes",
    "spectral_density_from_nodes",
    "steihaug_cg",
    "trace_estimate",
]
