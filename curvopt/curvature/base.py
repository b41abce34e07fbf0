"""The abstract :class:`CurvatureOperator`: a symmetric ``P x P`` matrix known through products.

A backend implements two small pieces for one mini-batch: :meth:`_batch_context`
(everything that does not depend on the vector, e.g. the forward pass) and
:meth:`_batch_matvec` (the product with one vector). The base class turns them into
products with vectors, matrices (the columns batched with :func:`torch.func.vmap`)
and parameter-shaped lists, streams the data through the one data loop
(:func:`curvopt.curvature.data_loop.accumulate`) and, with ``cache=True``, keeps the
per-batch contexts until a parameter changes. Layout follows curvlinops (Dangel et al.).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call, vmap

from curvopt.curvature.data_loop import accumulate, batch_size, check_data, to_model
from curvopt.curvature.losses import loss_reduction
from curvopt.curvature.params import Block, custom_blocks, module_blocks, select_parameters
from curvopt.curvature.solve import KRYLOV_METHODS, krylov_solve
from curvopt.errors import OptionError, ShapeError

TensorList = list[torch.Tensor]


class CurvatureOperator(ABC):
    """A curvature matrix of the empirical risk ``L(theta)``, applied matrix-free.

    The risk is the loss's own reduction over all samples of ``data``: the mean over
    samples for ``reduction="mean"`` (each batch weighted by its size), the sum for
    ``reduction="sum"``. The operator is evaluated at the model's current parameters.

    Args:
        model: The network; device and dtype of the operator follow its parameters.
        loss_fn: ``loss_fn(model(X), y) -> scalar``.
        data: One ``(X, y)`` batch or an iterable of batches (a list, a ``DataLoader``).
            Floating-point inputs and targets are cast to the model's dtype and moved
            to its device.
        params: Parameters (tensors or names) to differentiate; default: every
            parameter with ``requires_grad``. Others are held fixed.
        blocks: Grouping of the parameters into ``op.blocks``: ``{name: [param names]}``
            or a list of lists; default: one block per module, named by module path.
        reduction: Override of the loss's ``reduction`` attribute (``"mean"``/``"sum"``).
        max_batch_columns: The most ``samples x columns`` one vectorized product
            handles at once: a ``k``-column product on a batch of ``n`` samples runs
            its columns in chunks of ``max_batch_columns // n`` (same result), which
            keeps the working set in cache on CPU and bounds memory on GPU.
        cache: Keep each batch's context between products (faster repeated products
            at the same parameters, e.g. in Krylov solvers, at the price of memory for
            every batch's intermediates); invalidated automatically when a selected
            parameter is modified in place. ``True`` keeps autograd graphs (setup about
            one gradient); ``"linearize"`` (Jacobian backends only) traces the Jacobian
            with :func:`torch.func.linearize` once per batch, dearer to set up but with
            cheaper products on convolutional networks.
        progress: A tqdm progress bar on every pass over the data (a string sets its label).
        process_group: ``torch.distributed`` group whose ranks' data together form the
            risk; default: the default group when one is initialized.
    """

    name: ClassVar[str] = ""
    #: Values the ``cache`` option accepts.
    cache_modes: ClassVar[tuple[Any, ...]] = (False, True)
    #: Methods :meth:`solve` accepts; the first is the default.
    solve_methods: ClassVar[tuple[str, ...]] = KRYLOV_METHODS

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        *,
        params: Iterable[torch.Tensor | str] | None = None,
        blocks: Sequence[Sequence[str]] | dict[str, Sequence[str]] | None = None,
        reduction: str | None = None,
        max_batch_columns: int = 4096,
        cache: bool | str = False,
        progress: bool | str = False,
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_data(data)
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.param_names, self._params = select_parameters(model, params)
        self.reduction = loss_reduction(loss_fn, reduction)
        self.blocks: tuple[Block, ...] = (
            module_blocks(self.param_names, self._params)
            if blocks is None
            else custom_blocks(blocks, self.param_names, self._params)
        )
        if not isinstance(max_batch_columns, int) or max_batch_columns < 1:
            raise OptionError(f"max_batch_columns must be a positive integer, got {max_batch_columns!r}")
        self.max_batch_columns = max_batch_columns
        if cache not in self.cache_modes:
            raise OptionError(
                f"cache={cache!r} is not available for {type(self).__name__}; "
                f"valid: {', '.join(map(repr, self.cache_modes))}"
            )
        self.cache = cache
        self.progress = progress
        self.process_group = process_group
        self._cached: tuple[tuple[int, ...], list[tuple[Any, Any, Any]]] | None = None

    # ------------------------------------------------------------------ shape & type
    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)`` with ``P`` the number of selected scalar parameters."""
        p = sum(t.numel() for t in self._params)
        return (p, p)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the selected parameters."""
        return self._params[0].dtype

    @property
    def device(self) -> torch.device:
        """The device of the selected parameters."""
        return self._params[0].device

    @property
    def params(self) -> list[torch.Tensor]:
        """The selected parameter tensors, in model order."""
        return list(self._params)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, shape={self.shape}, "
            f"blocks={len(self.blocks)}, dtype={self.dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ products
    def __matmul__(self, x: torch.Tensor | Sequence[torch.Tensor]) -> Any:
        """Multiply by a flat vector ``[P]``, a matrix ``[P, k]`` or a parameter-shaped list.

        Returns the same format as the input, in the operator's dtype and device.
        """
        if isinstance(x, (list, tuple)):
            V = self._check_list(x)
            return [r.squeeze(0) for r in self._matmat_list([v.unsqueeze(0) for v in V])]
        B, restore = self._columns(x, "multiply")
        return restore(self.matmat(B))

    def solve(
        self,
        b: torch.Tensor | Sequence[torch.Tensor],
        *,
        damping: float = 0.0,
        method: str | None = None,
        rtol: float = 1e-6,
        max_iter: int | None = None,
    ) -> Any:
        """``(A + damping I)^{-1} b`` for ``b`` ``[P]``, ``[P, k]`` or a parameter-shaped list.

        Matrix-free: a Krylov solver of :mod:`curvopt.linalg` from ``x0 = 0``, one column at
        a time. ``"minres"`` (the default) handles indefinite and singular operators (for a
        singular one, the minimum-norm least-squares solution); ``"cg"`` needs ``A + damping I``
        positive definite. Backends with an explicit inverse add their own method (``kfac``:
        ``"kronecker"``, the default there). A column that stops short of ``rtol`` (iteration
        cap, negative curvature for CG, non-finite product) is returned with a warning that
        says why; for the full record call the solver itself (e.g. :func:`curvopt.linalg.minres`).

        Args:
            b: Right-hand side(s).
            damping: Tikhonov damping ``>= 0`` added to the diagonal.
            method: One of ``op.solve_methods``.
            rtol: Relative residual tolerance ``||b - (A + damping I) x|| <= rtol ||b||``.
            max_iter: Cap on products per column (default ``2 P``).

        Returns:
            The solution in the format of ``b``, in the operator's dtype and device.
        """
        method = self.solve_methods[0] if method is None else method
        if method not in self.solve_methods:
            raise OptionError(
                f"{type(self).__name__}.solve: method={method!r}; valid: {', '.join(self.solve_methods)}"
            )
        if not damping >= 0:
            raise OptionError(f"{type(self).__name__}.solve: damping must be >= 0, got {damping!r}")
        B, restore = self._columns(b, "solve")
        return restore(self._solve_columns(B, float(damping), method, rtol, max_iter))

    def _solve_columns(
        self, B: torch.Tensor, damping: float, method: str, rtol: float, max_iter: int | None
    ) -> torch.Tensor:
        """``[P, k]`` solutions; backends with an explicit inverse override this."""
        return krylov_solve(self, B, damping, method, rtol, max_iter)

    def _columns(self, x: Any, verb: str) -> tuple[torch.Tensor, Any]:
        """``x`` (``[P]``, ``[P, k]`` or a parameter-shaped list) as ``[P, k]`` columns, and the map
        that gives a ``[P, k]`` result back in ``x``'s format."""
        if isinstance(x, (list, tuple)):
            B = self.flatten([t.unsqueeze(0) for t in self._check_list(x)]).T
            return B, lambda R: [r.squeeze(0) for r in self.unflatten(R.T)]
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"cannot {verb} {type(self).__name__} with {type(x).__name__}; use a tensor "
                "of shape [P] or [P, k], or a list of tensors shaped like the parameters"
            )
        if x.dim() in (1, 2) and x.shape[0] == self.shape[0]:
            B = x.to(device=self.device, dtype=self.dtype)
            if x.dim() == 1:
                return B.unsqueeze(1), lambda R: R.squeeze(1)
            return B, lambda R: R
        raise ShapeError(
            f"{type(self).__name__} has shape {self.shape}: expected a vector of shape "
            f"({self.shape[0]},) or a matrix of shape ({self.shape[0]}, k), got "
            f"{tuple(x.shape)}"
        )

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` of shape ``[P, k]``; columns are batched, one data pass."""
        if V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise ShapeError(f"expected a matrix of shape ({self.shape[0]}, k), got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        out = self._matmat_list(self.unflatten(V.T))
        return self.flatten(out).T

    def to_dense(self, chunk_size: int = 128) -> torch.Tensor:
        """The ``P x P`` matrix, built from products with identity columns (tests, tiny models)."""
        P = self.shape[0]
        eye = torch.eye(P, dtype=self.dtype, device=self.device)
        cols = [self.matmat(eye[:, i : i + chunk_size]) for i in range(0, P, chunk_size)]
        return torch.cat(cols, dim=1)

    # ------------------------------------------------------------------ conversions
    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[k, *shape_i]`` tensors per parameter -> ``[k, P]``."""
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)

    def unflatten(self, V: torch.Tensor) -> TensorList:
        """``[k, P]`` -> ``[k, *shape_i]`` tensors per parameter."""
        sizes = [p.numel() for p in self._params]
        return [
            chunk.reshape(V.shape[0], *p.shape)
            for chunk, p in zip(V.split(sizes, dim=1), self._params)
        ]

    def _check_list(self, x: Sequence[torch.Tensor]) -> TensorList:
        expected = [tuple(p.shape) for p in self._params]
        got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in x]
        if got != expected:
            raise ShapeError(
                f"expected a list of {len(expected)} tensors shaped like the parameters "
                f"{dict(zip(self.param_names, expected))}, got {got}"
            )
        return [t.to(device=self.device, dtype=self.dtype) for t in x]

    # ------------------------------------------------------------------ the data pass
    def _matmat_list(self, V: TensorList) -> TensorList:
        """Products with ``k`` columns given as ``[k, *shape_i]`` per parameter."""
        versions = self._versions()
        if self.cache and self._cached is not None and self._cached[0] == versions:
            contexts = self._cached[1]
            served = iter(contexts)  # accumulate visits the stored batches in order
            return accumulate(
                lambda i, X, y: self._product(next(served)[2], V, batch_size(X)),
                [(X, y) for X, y, _ in contexts],
                reduction=self.reduction,
                process_group=self.process_group,
                progress=self.progress,
            )
        fresh: list[tuple[Any, Any, Any]] = []

        def product(index: int, X: Any, y: torch.Tensor) -> tuple[torch.Tensor, TensorList]:
            X, y = self._to_model(X), self._to_model(y)
            if not self.cache and V[0].shape[0] == 1:
                single = self._batch_single_product(index, X, y, [v[0] for v in V])
                if single is not None:
                    return single[0], [o.unsqueeze(0) for o in single[1]]
            ctx = self._batch_context(index, X, y)
            if self.cache:
                fresh.append((X, y, ctx))
            return self._product(ctx, V, batch_size(X))

        result = accumulate(
            product,
            self.data,
            reduction=self.reduction,
            process_group=self.process_group,
            progress=self.progress,
        )
        if self.cache:
            self._cached = (versions, fresh)
        return result

    def _product(self, ctx: Any, V: TensorList, n: int) -> tuple[torch.Tensor, TensorList]:
        """Columns of ``V`` times batch ``ctx`` (``n`` samples), vmapped in chunks."""
        k = V[0].shape[0]
        if k == 1:
            loss, out = self._batch_matvec(ctx, [v[0] for v in V])
            return loss, [o.unsqueeze(0) for o in out]
        chunk = max(1, self.max_batch_columns // max(n, 1))
        batched = vmap(lambda v: self._batch_matvec(ctx, v), out_dims=(None, 0))
        parts = [batched([v[s : s + chunk] for v in V]) for s in range(0, k, chunk)]
        loss = parts[0][0]
        return loss, [torch.cat(cols) for cols in zip(*(out for _, out in parts))]

    def clear_cache(self) -> None:
        """Drop cached linearizations (they are also dropped when a parameter changes)."""
        self._cached = None

    def _versions(self) -> tuple[int, ...]:
        # In-place updates (optimizer steps, copy_) bump a tensor's version counter.
        return tuple(p._version for p in self._params)

    def _to_model(self, t: Any) -> Any:
        return to_model(t, self._params[0])

    # ------------------------------------------------------------------ helpers for backends
    def _primal(self) -> tuple[torch.Tensor, ...]:
        """The selected parameters, detached, as the point of linearization."""
        return tuple(p.detach() for p in self._params)

    def _forward(self, params: Sequence[torch.Tensor], X: Any) -> torch.Tensor:
        """``model(X)`` with the selected parameters replaced by ``params``."""
        args = tuple(X) if isinstance(X, (tuple, list)) else (X,)
        # Parameters outside the selection are constants: detached, they build no graph.
        selected = set(self.param_names)
        tensors = {n: p.detach() for n, p in self.model.named_parameters() if n not in selected}
        tensors.update(zip(self.param_names, params))
        out = functional_call(self.model, tensors, args)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"{type(self.model).__name__} returned a {type(out).__name__}; curvature "
                "operators need a model that returns one tensor"
            )
        return out

    def _batch_single_product(
        self, index: int, X: Any, y: torch.Tensor, v: TensorList
    ) -> tuple[torch.Tensor, TensorList] | None:
        """Optional fast path for one uncached vector; ``None`` uses context + matvec."""
        return None

    @abstractmethod
    def _batch_context(self, index: int, X: Any, y: torch.Tensor) -> Any:
        """Everything about batch ``index`` that does not depend on the vector."""

    @abstractmethod
    def _batch_matvec(self, ctx: Any, v: TensorList) -> tuple[torch.Tensor, TensorList]:
        """``(batch loss, A_batch @ v)`` for one vector given per parameter.

        Must be a pure function of ``v`` built from ``torch.func`` transforms, so that
        :func:`torch.func.vmap` batches it over columns.
        """
