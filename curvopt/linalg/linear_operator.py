"""Square matrices known through their products, and what the algorithms in :mod:`curvopt.linalg` ask of one.

Two levels, as in curvlinops (Dangel et al.): :class:`LinearOperator` here has a shape, a dtype, a device and
``@`` on a vector ``[P]`` or a matrix ``[P, k]``; :class:`~curvopt.CurvatureOperator` builds on it the curvature
of a model's risk (parameter-shaped inputs, data, solves). The algorithms accept any
:class:`SymmetricOperator`: a :class:`LinearOperator` or a dense symmetric ``torch.Tensor`` (tests, tiny
problems). Nothing here differentiates: second derivatives are taken in :mod:`curvopt.curvature` only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch

from curvopt.errors import ShapeError


class SymmetricOperator(Protocol):
    """Anything with ``shape == (P, P)``, ``dtype``, ``device`` and ``@`` on ``[P, k]`` matrices."""

    shape: Any
    dtype: torch.dtype
    device: torch.device

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor: ...


def size_of(A: SymmetricOperator) -> int:
    """``P`` for a square operator; rejects non-square shapes."""
    shape = tuple(A.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"expected a square operator, got shape {shape}")
    return int(shape[0])


def matmat(A: SymmetricOperator, V: torch.Tensor) -> torch.Tensor:
    """``A @ V`` for ``V`` of shape ``[P, k]``, in ``A``'s dtype and device."""
    return A @ V.to(dtype=A.dtype, device=A.device)


def matvec(A: SymmetricOperator, v: torch.Tensor) -> torch.Tensor:
    """``A @ v`` for one vector ``v`` ``[P]`` (the single-product path of an operator)."""
    return A @ v.to(dtype=A.dtype, device=A.device)


class LinearOperator(ABC):
    """A ``P x P`` matrix known through products with vectors ``[P]`` and matrices ``[P, k]``.

    A subclass provides ``shape``, ``dtype`` and ``device`` (attributes or properties) and
    :meth:`_matmat`; it overrides :meth:`_matvec` when one vector has a cheaper (or a differently
    rounded) path than a one-column matrix.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    #: What the operands of ``@`` may be, for error messages.
    _operand_forms: str = "a tensor of shape [P] or [P, k]"

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x`` for ``x`` of shape ``[P]`` or ``[P, k]``; the result has ``x``'s shape, in the
        operator's dtype and device."""
        x = self._operand(x, "multiply")
        return self._matvec(x) if x.dim() == 1 else self._matmat(x)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` of shape ``[P, k]``."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.shape[0]:
            got = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ShapeError(f"expected a matrix of shape ({self.shape[0]}, k), got {got}")
        return self._matmat(V.to(device=self.device, dtype=self.dtype))

    def to_dense(self, chunk_size: int = 128) -> torch.Tensor:
        """The ``P x P`` matrix, from products with ``chunk_size`` identity columns at a time (tests, tiny
        problems)."""
        P = self.shape[0]
        out = torch.empty(P, P, dtype=self.dtype, device=self.device)
        for i in range(0, P, chunk_size):
            k = min(chunk_size, P - i)
            eye = torch.zeros(P, k, dtype=self.dtype, device=self.device)
            eye[i : i + k].fill_diagonal_(1.0)
            out[:, i : i + k] = self.matmat(eye)
        return out

    @abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` ``[P, k]``, already checked and in the operator's dtype and device."""

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for ``v`` ``[P]``, already checked and in the operator's dtype and device."""
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def _operand(self, x: Any, verb: str) -> torch.Tensor:
        """``x`` checked to be ``[P]`` or ``[P, k]`` and moved to the operator's dtype and device.

        Raises:
            TypeError: for anything but a tensor.
            ShapeError: for a tensor of another shape.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"cannot {verb} {type(self).__name__} with {type(x).__name__}; use {self._operand_forms}"
            )
        if x.dim() in (1, 2) and x.shape[0] == self.shape[0]:
            return x.to(device=self.device, dtype=self.dtype)
        raise ShapeError(
            f"{type(self).__name__} has shape {self.shape}: expected a vector of shape "
            f"({self.shape[0]},) or a matrix of shape ({self.shape[0]}, k), got "
            f"{tuple(x.shape)}"
        )

    def _columns(self, x: Any, verb: str) -> tuple[torch.Tensor, Any]:
        """``x`` as ``[P, k]`` columns, and the map that gives a ``[P, k]`` result back in ``x``'s format."""
        x = self._operand(x, verb)
        if x.dim() == 1:
            return x.unsqueeze(1), lambda R: R.squeeze(1)
        return x, lambda R: R

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class Shifted(LinearOperator):
    """``A + shift * I`` (Tikhonov damping) for an operator or a dense symmetric tensor ``A``."""

    def __init__(self, A: SymmetricOperator, shift: float) -> None:
        self.A, self.shift = A, float(shift)
        self.shape, self.dtype, self.device = A.shape, A.dtype, A.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # A's own product for either form: a dense A multiplies a vector with mv, not a one-column mm
        out = self.A @ V
        return out + self.shift * V if self.shift else out

    _matvec = _matmat
