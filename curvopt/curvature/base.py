"""The curvature operators' bases: a curvature matrix of a model's risk, and one streamed over data.

:class:`CurvatureOperator` is a :class:`~curvopt.linalg.LinearOperator` (shape, dtype, device, ``@``)
that knows the model, loss, data and parameters: it adds parameter-shaped inputs, ``blocks``, the
loss's reduction, :meth:`~CurvatureOperator.solve` and the one data loop; a backend supplies the
products with parameter-shaped columns (``kfac`` and BackPACK from stored factors, ``block_diagonal``
through another backend).

:class:`BatchCurvatureOperator` is the curvature that is a sum over batches. A backend implements two
small pieces for one mini-batch: :meth:`~BatchCurvatureOperator._batch_context` (everything that does not
depend on the vector, e.g. the forward pass) and :meth:`~BatchCurvatureOperator._batch_matvec` (the product
with one vector). The base class batches the columns with :func:`torch.func.vmap`, streams the data
through the one data loop (:func:`curvopt.curvature.data_loop.accumulate`) and, with ``cache=True``,
keeps the per-batch contexts until a parameter changes. Layout follows curvlinops (Dangel et al.).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call, vmap

from curvopt.curvature.data_loop import accumulate, batch_size, check_data, to_model
from curvopt.curvature.losses import loss_reduction, loss_terms, resolve_reduction
from curvopt.curvature.model_state import curvature_pass, seed_batch
from curvopt.curvature.params import (
    Block,
    ParameterSnapshot,
    custom_blocks,
    module_blocks,
    select_parameters,
    unwrap_model,
)
from curvopt.curvature.solve import KRYLOV_METHODS, krylov_solve
from curvopt.errors import DenseSizeError, OptionError, ParameterError, ShapeError
from curvopt.linalg.linear_operator import LinearOperator

TensorList = list[torch.Tensor]


class CurvatureOperator(LinearOperator):
    """A curvature matrix of the empirical risk ``L(theta)``, applied matrix-free.

    The public base of every backend. A subclass implements :meth:`_matmat_list`, the products with
    columns given per parameter; one that streams over batches derives from
    :class:`BatchCurvatureOperator` instead.

    The risk is the loss's own reduction over all samples of ``data``: the mean over
    the loss terms of all batches for ``reduction="mean"`` (each batch weighted by its
    samples, or by its counted targets for cross entropy with ``ignore_index`` padding),
    the sum for ``reduction="sum"``. The operator is evaluated at the model's current
    parameters, and its passes leave the model as they found it
    (:func:`curvopt.curvature.model_state.curvature_pass`): attention runs on a twice
    differentiable kernel; train-mode BatchNorm normalizes with each batch's statistics
    (the curvature of the loss a training step sees) without touching its running
    statistics; train-mode dropout draws one fixed mask per batch, so the operator is one
    matrix; the global RNG, buffers and modes are restored.

    Args:
        model: The network; device and dtype of the operator follow its parameters. A
            ``DistributedDataParallel`` wrapper is looked through (its ``.module`` is used, so its
            reducer never fires during curvature passes; parameter names carry no ``module.`` prefix);
            an FSDP-sharded model is refused (:func:`~curvopt.curvature.params.unwrap_model`).
        loss_fn: ``loss_fn(model(X), y) -> scalar``.
        data: One ``(X, y)`` batch or an iterable of batches (a list, a ``DataLoader``).
            Floating-point inputs and targets are cast to the model's dtype and moved
            to its device.
        params: Parameters (tensors or names) to differentiate; default: every
            parameter with ``requires_grad``. Others are held fixed.
        blocks: Grouping of the parameters into ``op.blocks``: ``{name: [param names]}``
            or a list of lists; default: one block per module, named by module path.
        reduction: ``"mean"``/``"sum"``; default: the loss's ``reduction`` attribute, and for a plain
            function without one, detected on the first batch (a mean is unchanged on the batch
            twice over, a sum doubles; anything else is an error asking for this option).
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
    _operand_forms = "a tensor of shape [P] or [P, k], or a list of tensors shaped like the parameters"

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
        inner = unwrap_model(model)
        if inner is not model and params is not None:
            # names as the wrapper gives them ("module.0.weight") name the same parameters inside it
            params = [p[len("module."):] if isinstance(p, str) and p.startswith("module.") else p
                      for p in ([params] if isinstance(params, (str, torch.Tensor)) else params)]
        model = inner
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.param_names, self._params = select_parameters(model, params)
        self._reduction = loss_reduction(loss_fn, reduction)
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

    # ------------------------------------------------------------------ shape & type
    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)`` with ``P`` the number of selected scalar parameters."""
        p = sum(t.numel() for t in self._params)
        return (p, p)

    @property
    def reduction(self) -> str:
        """``"mean"`` or ``"sum"``: how the loss combines samples, hence batches (see ``reduction=``)."""
        if self._reduction is None:  # a plain function: detected on the first batch

            def forward(X: Any, y: Any) -> tuple[torch.Tensor, Any]:
                with curvature_pass(self.model):
                    return self._forward(self._primal(), self._to_model(X), 0), self._to_model(y)

            self._reduction = resolve_reduction(self.loss_fn, None, self.data, forward, type(self).__name__)
        return self._reduction

    def _batch_weight(self, X: Any, y: Any, n: int) -> int:
        """Loss terms of a batch (its counted targets): batches are weighted by them."""
        return loss_terms(self.loss_fn, y, n, self.reduction)

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
        extra = "".join(f", {k}={v!r}" for k, v in self._repr_fields().items())
        return (
            f"{type(self).__name__}(name={self.name!r}, shape={self.shape}, "
            f"blocks={len(self.blocks)}, dtype={self.dtype}, device={self.device}{extra})"
        )

    def _repr_fields(self) -> dict[str, Any]:
        """Backend facts worth showing in ``repr`` (e.g. how Jacobian products are taken)."""
        return {}

    # ------------------------------------------------------------------ products
    def __matmul__(self, x: torch.Tensor | Sequence[torch.Tensor]) -> Any:
        """Multiply by a flat vector ``[P]``, a matrix ``[P, k]`` or a parameter-shaped list.

        Returns the same format as the input, in the operator's dtype and device.
        """
        if isinstance(x, (list, tuple)):
            V = self._check_list(x)
            return [r.squeeze(0) for r in self._matmat_list([v.unsqueeze(0) for v in V])]
        return super().__matmul__(x)

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
        return super()._columns(x, verb)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``[P, k]`` products: all ``k`` columns in one call of :meth:`_matmat_list` (one data pass)."""
        return self.flatten(self._matmat_list(self.unflatten(V.T))).T

    def to_dense(self, chunk_size: int = 128) -> torch.Tensor:
        """The ``P x P`` matrix, built from products with identity columns (tests, tiny models).

        Raises:
            DenseSizeError: before any product, when the matrix would not fit in the free memory
                of the operator's device; the message gives the size it would need.
        """
        check_dense_size(self.shape[0], self.dtype, self.device, f"{type(self).__name__}.to_dense()")
        return super().to_dense(chunk_size)

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
    def _follow_parameters(self) -> None:
        """Rebind to the model's current parameter tensors: a parameter replaced by a new tensor since
        the operator was built (``module.weight = nn.Parameter(...)``) is followed by name, so the
        operator never computes at stale values.

        Raises:
            ParameterError: when a selected parameter is gone or has changed shape (``P`` would change).
        """
        current = dict(self.model.named_parameters())
        for i, name in enumerate(self.param_names):
            p = current.get(name)
            if p is self._params[i]:
                continue
            if p is None or p.shape != self._params[i].shape:
                raise ParameterError(
                    f"{type(self).__name__}: the model's parameter {name!r} was "
                    f"{'removed' if p is None else f'replaced by one of shape {tuple(p.shape)}'} since the "
                    "operator was built; build a new operator for the new model")
            self._params[i] = p

    @abstractmethod
    def _matmat_list(self, V: TensorList) -> TensorList:
        """Products with ``k`` columns given as ``[k, *shape_i]`` per parameter, returned the same way.

        A backend follows the model's current parameters (:meth:`_follow_parameters`) and leaves the
        model as it found it (:func:`~curvopt.curvature.model_state.curvature_pass`) in any pass it runs.
        """

    def clear_cache(self) -> None:
        """Drop what is kept between products (it is also dropped when a parameter changes)."""

    def _accumulate(self, product: Any, data: Any, zeros: Any = None) -> TensorList:
        """The one data loop with this operator's reduction, batch weights and process group.

        ``zeros() -> tensors`` shaped like ``product``'s results lets a rank without samples take part in
        the pass's one collective (see :func:`~curvopt.curvature.data_loop.accumulate`)."""
        return accumulate(
            product,
            data,
            reduction=self.reduction,
            process_group=self.process_group,
            progress=self.progress,
            weight=self._batch_weight,
            zeros=zeros,
        )

    def _versions(self) -> ParameterSnapshot:
        """The parameters' values now; equal to a later snapshot exactly when no value changed
        (through any route: optimizer steps, ``.data`` writes, ``load_state_dict``, ...)."""
        return ParameterSnapshot(self._params)

    def _to_model(self, t: Any) -> Any:
        return to_model(t, self._params[0])

    # ------------------------------------------------------------------ helpers for backends
    def _primal(self) -> tuple[torch.Tensor, ...]:
        """The selected parameters, detached, as the point of linearization."""
        return tuple(p.detach() for p in self._params)

    def _forward(self, params: Sequence[torch.Tensor], X: Any, index: int | None = None) -> torch.Tensor:
        """``model(X)`` with the selected parameters replaced by ``params``; with the batch ``index``,
        randomness (dropout) is seeded for that batch (inside :func:`curvature_pass` only)."""
        if index is not None:
            seed_batch(index, getattr(self, "seed", 0))
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


class BatchCurvatureOperator(CurvatureOperator):
    """A curvature operator that is a sum over the batches of the data, each known through products.

    A backend supplies, for one batch, :meth:`_batch_context` (what does not depend on the vector)
    and :meth:`_batch_matvec` (``(loss, A_batch @ v)`` for one vector, a pure ``torch.func`` function);
    optionally :meth:`_batch_single_product`, a faster path for one uncached vector. This class batches
    the columns with :func:`torch.func.vmap` (``max_batch_columns`` at a time), runs the one data loop
    and, with ``cache=True``, keeps the contexts until a parameter changes. Arguments as for
    :class:`CurvatureOperator`.
    """

    #: ``(parameter values, [(X, y, context) per batch])`` while ``cache`` keeps the contexts.
    _cached: tuple[ParameterSnapshot, list[tuple[Any, Any, Any]]] | None = None

    def _matmat_list(self, V: TensorList) -> TensorList:
        """Products with ``k`` columns given as ``[k, *shape_i]`` per parameter: one pass over the data."""
        self._follow_parameters()
        with curvature_pass(self.model):
            return self._matmat_pass(V)

    def _matmat_pass(self, V: TensorList) -> TensorList:
        if self.cache and self._cached is not None and self._cached[0].matches(self._params):
            contexts = self._cached[1]
            served = iter(contexts)  # accumulate visits the stored batches in order
            return self._accumulate(
                lambda i, X, y: self._product(next(served)[2], V, batch_size(X)),
                [(X, y) for X, y, _ in contexts],
                zeros=lambda: [torch.zeros_like(v) for v in V],
            )
        self._cached = None  # free the stale contexts before building new ones
        snapshot = ParameterSnapshot(self._params) if self.cache else None
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

        result = self._accumulate(product, self.data, zeros=lambda: [torch.zeros_like(v) for v in V])
        if self.cache:
            self._cached = (snapshot, fresh)
        return result

    def _product(self, ctx: Any, V: TensorList, n: int) -> tuple[torch.Tensor, TensorList]:
        """Columns of ``V`` times batch ``ctx`` (``n`` samples), vmapped in chunks."""
        k = V[0].shape[0]
        if k == 1:
            loss, out = self._batch_matvec(ctx, [v[0] for v in V])
            return loss, [o.unsqueeze(0) for o in out]
        chunk = max(1, self.max_batch_columns // max(n, 1))
        # randomness="same": a forward pass inside the product (dropout in training mode) draws
        # the batch's one mask, as seed_batch makes every pass over the batch do
        batched = vmap(lambda v: self._batch_matvec(ctx, v), out_dims=(None, 0), randomness="same")
        parts = [batched([v[s : s + chunk] for v in V]) for s in range(0, k, chunk)]
        loss = parts[0][0]
        return loss, [torch.cat(cols) for cols in zip(*(out for _, out in parts))]

    def clear_cache(self) -> None:
        """Drop cached linearizations (they are also dropped when a parameter changes)."""
        self._cached = None

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


def check_dense_size(P: int, dtype: torch.dtype, device: torch.device, what: str, copies: int = 1) -> None:
    """Refuse a dense ``P x P`` matrix (``copies`` of them) that would not fit in the free memory of
    ``device``, before anything is computed.

    Raises:
        DenseSizeError: naming ``what``, the bytes it needs and the bytes free.
    """
    need = copies * P * P * torch.empty((), dtype=dtype).element_size()
    free = free_memory(device)
    if free is not None and need > free:
        raise DenseSizeError(
            f"{what} needs a dense {P} x {P} {str(dtype).replace('torch.', '')} matrix: {need / 2**30:.2f} GiB, "
            f"more than the {free / 2**30:.2f} GiB free on {device}; use matrix-free products "
            "(op @ v, curvopt.top_eigenvalues, curvopt.trace) or select fewer parameters (params=...)"
        )


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (available physical memory for the CPU), or None if unknown."""
    import os

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:  # MemAvailable counts reclaimable page cache, which free pages alone do not
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            return None
    return None
