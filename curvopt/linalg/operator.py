"""Old home of the operator helpers, kept for the modules that still import them from here.

The operator protocol, base class and algebra live in :mod:`curvopt.linalg.linear_operator`, the random
probes in :mod:`curvopt.linalg.probes`; import them from there.
"""

from __future__ import annotations

from curvopt.linalg.linear_operator import SymmetricOperator, matmat, size_of
from curvopt.linalg.probes import gaussian

__all__ = ["SymmetricOperator", "gaussian", "matmat", "size_of"]
