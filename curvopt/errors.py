"""Exceptions raised by curvopt.

Every error names what the user can change: the offending option, parameter,
batch or loss, and the valid choices where there is a finite list of them.
"""

from __future__ import annotations


class CurvoptError(Exception):
    """Base class of every error raised by curvopt."""


class UnknownCurvatureError(CurvoptError, KeyError):
    """A curvature backend name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedLossError(CurvoptError, TypeError):
    """A loss function that a backend cannot handle."""


class ParameterError(CurvoptError, ValueError):
    """Parameters that the model does not own, or an invalid selection of them."""


class ShapeError(CurvoptError, ValueError):
    """An input whose shape does not match the operator."""


class EmptyDataError(CurvoptError, ValueError):
    """Data that holds no samples."""


class NonFiniteLossError(CurvoptError, FloatingPointError):
    """The loss on a batch is NaN or infinite."""

    def __init__(self, batch_index: int, value: float, message: str | None = None) -> None:
        super().__init__(
            message
            or f"the loss on batch {batch_index} is {value}; curvature at this point is "
            "undefined (check that batch for NaN/Inf inputs or a diverged model)"
        )
        self.batch_index = batch_index
        self.value = value


class OptionError(CurvoptError, TypeError):
    """An unknown or invalid option passed to a backend."""


class UnsupportedModuleError(CurvoptError, TypeError):
    """A module (layer) that a backend or optimizer cannot treat; the message names it and the fix."""


class MissingDependencyError(CurvoptError, ImportError):
    """An optional dependency that is not installed; the message gives the ``pip install`` line."""


class ClosureError(CurvoptError, TypeError):
    """``step()`` was called without a usable closure, or the closure returned no loss tensor."""


class ConfigError(CurvoptError, ValueError):
    """A configuration the command line cannot run."""


class DenseSizeError(CurvoptError, MemoryError):
    """A dense matrix (``to_dense()`` and other dense paths) that would not fit in memory."""


class QuantizationError(CurvoptError, ValueError):
    """A quantization request that cannot be carried out: bit widths, module names, scores, plans."""


class BudgetError(QuantizationError):
    """A size, BOPs or latency budget that no bit allocation meets; the message states the reachable range."""


class DistributedError(CurvoptError, RuntimeError):
    """The ranks of a data-parallel run disagree (e.g. their model replicas differ after training); raised
    on every rank, the message names the cause and the fix."""
