"""The one data loop: every operator that streams over data goes through :func:`accumulate`.

It weights each batch by its size so that the result is the exact mean over all
samples (a short last batch included), and it is the single place where results
are all-reduced when a ``torch.distributed`` process group is active.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from curvopt.errors import EmptyDataError, NonFiniteLossError

Batch = tuple[Any, torch.Tensor]
BatchProduct = Callable[[int, Any, torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]
BatchWeight = Callable[[Any, torch.Tensor, int], float]


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one ``(X, y)`` pair rather than an iterable of batches."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and (isinstance(data[0], torch.Tensor) or _is_tensor_tuple(data[0]))
    )


def _is_tensor_tuple(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x)


def check_data(data: Any) -> None:
    """Reject data that cannot be iterated more than once, or that is visibly empty.

    Under an active process group emptiness is not raised here, on one rank before any collective
    (its peers would wait for it): the data loop agrees on it and raises it on every rank.

    Raises:
        EmptyDataError: for an empty sized collection or an empty single batch (without a process group).
        TypeError: for a one-shot iterator (a generator), which a second product would
            find exhausted.
    """
    from curvopt import distributed

    grouped = distributed.active()
    if is_single_batch(data):
        if batch_size(data[0]) == 0 and not grouped:
            raise EmptyDataError("data holds an (X, y) batch with 0 samples")
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an (X, y) pair of tensors or an iterable of such pairs, "
            f"got {type(data).__name__}"
        )
    if isinstance(data, Iterator):
        raise TypeError(
            "data is a one-shot iterator (e.g. a generator); curvature operators pass "
            "over the data once per product, so give a list of batches or a DataLoader"
        )
    if hasattr(data, "__len__") and len(data) == 0 and not grouped:
        raise EmptyDataError("data holds no batches")


def to_model(t: Any, ref: torch.Tensor) -> Any:
    """Move a batch element to ``ref``'s device, casting floating tensors to its dtype.

    Tuples and lists are converted element-wise; other objects pass through.
    """
    if isinstance(t, (tuple, list)):
        return type(t)(to_model(u, ref) for u in t)
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_floating_point():
        return t.to(device=ref.device, dtype=ref.dtype)
    return t.to(device=ref.device)


def batch_size(X: Any) -> int:
    """Number of samples in a model input (a tensor or a tuple of tensors)."""
    first = X[0] if _is_tensor_tuple(X) else X
    return int(first.shape[0]) if first.dim() > 0 else 1


def iterate_batches(data: Any) -> Iterator[Batch]:
    """Yield ``(X, y)`` pairs from one batch or an iterable of batches."""
    if is_single_batch(data):
        yield data[0], data[1]
        return
    for i, item in enumerate(data):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(
                f"batch {i} is a {type(item).__name__}; every batch must be an (X, y) pair"
            )
        yield item[0], item[1]


def first_batch(data: Any, where: str) -> tuple[Any, Any]:
    """The first batch of ``data`` that holds samples.

    Raises:
        EmptyDataError: naming ``where`` when every batch is empty (or there is none).
    """
    for X, y in iterate_batches(data):
        if batch_size(X) > 0:
            return X, y
    raise EmptyDataError(f"{where}: the data holds no samples (no batch, or every batch is empty)")


def count_samples(data: Any, count: Callable[[Any, Any], int] | None = None) -> int:
    """Samples in ``data`` (one batch or an iterable of batches; a DataLoader is iterated once), or with
    ``count(X, y)``, the sum of what it says of each batch."""
    count = count or (lambda X, y: batch_size(X))
    return sum(count(X, y) for X, y in iterate_batches(data))


def rank_sample_offset(data: Any, group: Any = None, count: Callable[[Any, Any], int] | None = None) -> int:
    """Global index of this rank's first sample (or unit that ``count(X, y)`` counts), ranks' data in rank
    order, which keys per-sample random draws so that they depend neither on batching nor on ranks.

    0 without a process group (nothing is counted then); under one, :func:`count_samples` and one
    all-gather (:func:`curvopt.distributed.sample_offset`), so call it once and keep the result."""
    from curvopt import distributed

    if not distributed.active(group):
        return 0
    return distributed.sample_offset(count_samples(data, count), group)[0]


#: The bar of the estimator running now (see :func:`one_bar`); passes count into it instead of a bar each.
_ESTIMATOR_BAR: contextvars.ContextVar[Any] = contextvars.ContextVar("curvopt_estimator_bar", default=None)


@contextlib.contextmanager
def one_bar(progress: bool | str, desc: str) -> Iterator[None]:
    """Within the block, passes over the data that would show a progress bar each (``progress=`` of an
    operator) count into one bar instead, ``desc``, in passes: one bar per estimator, not one per product.
    Nested blocks use the outer bar. ``progress`` falsy: nothing is shown."""
    if not progress or _ESTIMATOR_BAR.get() is not None:
        yield
        return
    from tqdm.auto import tqdm

    label = f"{desc} ({progress})" if isinstance(progress, str) else desc
    bar = tqdm(desc=label, unit="pass")
    token = _ESTIMATOR_BAR.set(bar)
    try:
        yield
    finally:
        _ESTIMATOR_BAR.reset(token)
        bar.close()


def accumulate(
    product: BatchProduct,
    data: Any,
    *,
    reduction: str,
    process_group: Any = None,
    progress: bool | str = False,
    weight: BatchWeight | None = None,
    zeros: Callable[[], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Sum per-batch results into the curvature of the whole empirical risk.

    Under an active process group the ranks' partial sums and sample counts travel in one all-reduce
    (:func:`curvopt.distributed.sum_across`), so the result is the risk over the union of all ranks' data.
    No rank raises before that collective: a non-finite loss, a rank without samples, or an exception
    raised by ``product`` on some batch is agreed through it, and every rank raises the same error naming
    the rank (and the batch).

    Args:
        product: ``product(index, X, y) -> (loss, tensors)`` evaluated on batch ``index``
            with the loss's own reduction; ``loss`` is the batch loss (a scalar tensor).
        data: One ``(X, y)`` batch or an iterable of them.
        reduction: ``"mean"``: the risk is the mean over all loss terms, so batch ``b`` is
            weighted by ``N_b / N`` with ``N_b`` its terms (by default its samples); ``"sum"``: the
            risk is the sum, weight 1.
        weight: ``weight(X, y, n) -> N_b``, the loss terms of a batch of ``n`` samples (e.g. its
            counted targets, :func:`curvopt.curvature.losses.loss_terms`); a batch without any is
            skipped, as an empty one is. Default: ``n``.
        progress: Show a tqdm bar over the batches (a string is its description); inside
            :func:`one_bar`, count this pass into that bar instead.
        process_group: A ``torch.distributed`` group to all-reduce over; ``None`` uses
            the default group when one is initialized, and no communication otherwise.
        zeros: ``zeros() -> tensors``, zeros shaped like ``product``'s tensors (same dtypes and device).
            Under a process group a rank with no result of its own (no samples, or a first product that
            raised) still takes part in the collective with them, and the pass costs exactly one
            collective; every caller that may run under a group should pass it (an operator knows its
            result shapes: e.g. those of the vectors it multiplies). Without it, the ranks first agree on
            failures in one more, tiny collective. Unused without a process group.

    Returns:
        The accumulated tensors.

    Raises:
        EmptyDataError: when the data holds no samples (under a group: when some rank's data holds
            none, on every rank, naming it).
        NonFiniteLossError: naming the first batch whose loss is not finite (and the rank).
        Any exception raised by ``product``: without a group, as raised; under a group, on every rank,
            same type, the message prefixed with the rank and batch.
    """
    from curvopt import distributed

    grouped = distributed.active(process_group)
    total: list[torch.Tensor] | None = None
    unchecked: list[tuple[torch.Tensor, Any]] = []  # losses not yet found finite: (detached, weak ref to the loss)
    n_samples = 0
    seen = 0  # samples met, counted targets or not
    batch_of_loss: list[int] = []  # the batch index behind each unchecked loss
    batches = iterate_batches(data)
    estimator_bar = _ESTIMATOR_BAR.get() if progress else None
    if progress and estimator_bar is None:
        from tqdm.auto import tqdm

        count = 1 if is_single_batch(data) else (len(data) if hasattr(data, "__len__") else None)
        desc = progress if isinstance(progress, str) else "curvature pass"
        batches = tqdm(batches, total=count, desc=desc, unit="batch", leave=False)
    failure: Exception | None = None
    index = -1
    try:
        for index, (X, y) in enumerate(batches):
            n = batch_size(X)
            seen += n
            if n > 0 and weight is not None:
                n = weight(X, y, n)
            if n == 0:
                continue
            loss, parts = product(index, X, y)
            if not _known_finite(loss):  # a cached context's loss was checked on the pass that built it
                unchecked.append((loss.detach(), weakref.ref(loss)))  # weak: a loss with a graph is not kept
                batch_of_loss.append(index)
            scale = float(n) if reduction == "mean" else 1.0
            scaled = [scale * t for t in parts]
            if total is None:
                total = scaled  # fresh tensors (a product's own may be kept by it, e.g. a cached context's)
            else:
                # in place into the loop's own sums: the same rounding as ``a + b``, one allocation of the
                # result's size less per batch (for a large model, fresh pages the system must zero)
                for a, b in zip(total, scaled):
                    a.add_(b)
            n_samples += n
        _check_finite(unchecked, batch_of_loss)
    except Exception as exc:
        if not grouped:
            raise
        # Caught, to be raised on every rank after the collective rather than here before it.
        failure = exc if isinstance(exc, NonFiniteLossError) else _in_batch(exc, index)
    if estimator_bar is not None:
        estimator_bar.update(1)

    if grouped:
        # a rank whose samples all have ignored targets (padding) adds nothing, as such a batch does alone;
        # one with no samples at all is a sharding mistake
        if failure is None and n_samples == 0 and (seen == 0 or zeros is None):
            failure = EmptyDataError(
                "this rank's data holds no samples (no batch, or every batch is empty"
                + ("" if weight is None else " or has only ignored targets")
                + "); under a process group every rank needs some: shard the data so that each rank gets "
                "samples (e.g. torch.utils.data.DistributedSampler), or run on fewer ranks"
            )
        total, n_samples = _all_reduce(total, n_samples, process_group, failure, zeros)
    if total is None or n_samples == 0:
        raise EmptyDataError("data holds no samples: every batch is empty"
                             + ("" if weight is None else " or has only ignored targets"))
    if reduction == "mean":
        for t in total:  # the loop's own tensors (or the collective's): divided in place, as ``t / n`` rounds
            t.div_(n_samples)
    return total


def _in_batch(exc: Exception, index: int) -> Exception:
    """``exc`` with the batch it was raised on named in its message (same type and attributes)."""
    if index < 0:
        return exc
    named = type(exc).__new__(type(exc))
    named.args = (f"batch {index}: {exc}",)
    try:
        named.__dict__.update(exc.__dict__)
    except AttributeError:
        return exc
    named.__cause__ = exc
    return named


#: Attribute set on a loss tensor found finite: its version counter at the check (an in-place
#: change bumps the counter and so asks for a new check).
_FINITE_AT = "_curvopt_finite_at_version"


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _known_finite(loss: torch.Tensor) -> bool:
    """Whether this very tensor was found finite before and has not been modified since."""
    seen = getattr(loss, _FINITE_AT, None)
    return seen is not None and seen == _version(loss)


def _check_finite(unchecked: list[tuple[torch.Tensor, Any]], batch_of_loss: list[int]) -> None:
    """Raise :class:`NonFiniteLossError` for the first non-finite loss; mark the others as checked.

    One transfer to the host for the whole pass (none when every loss was checked before, as on
    a pass served from cached contexts), rather than one per batch.
    """
    if not unchecked:
        return
    finite = torch.isfinite(torch.stack([d.float() for d, _ in unchecked])).tolist()
    for i, ok in enumerate(finite):
        if not ok:
            raise NonFiniteLossError(batch_of_loss[i], float(unchecked[i][0]))
    for _, ref in unchecked:
        loss = ref()
        if loss is None:
            continue  # gone with its pass: never served again
        try:
            setattr(loss, _FINITE_AT, _version(loss))
        except (AttributeError, RuntimeError):  # a tensor type without attributes: checked on every pass
            pass


def _all_reduce(
    total: list[torch.Tensor] | None,
    n_samples: float,
    group: Any,
    failure: Exception | None,
    zeros: Callable[[], list[torch.Tensor]] | None,
) -> tuple[list[torch.Tensor], float]:
    """Partial sums and the sample count of every rank, summed in one collective; failures agreed in it."""
    from curvopt import distributed

    if zeros is None:
        # Without the result's shapes a rank with nothing to send cannot join the reduction: agree first.
        distributed.agree(failure, group)
    elif total is None:
        total = zeros()
    if total is None:  # pragma: no cover - agree() raised on every rank
        raise EmptyDataError("this rank's data holds no samples")
    dtypes = [t.dtype for t in total]
    # One buffer: a common dtype, at least float32 so that the sample count (a sum of weights) stays exact.
    common = torch.float32
    for dt in dtypes:
        common = torch.promote_types(common, dt)
    device = total[0].device
    count = torch.tensor([float(n_samples)], dtype=common, device=device)
    reduced = distributed.sum_across([t.to(common) for t in total] + [count], group, failure=failure)
    total_weight = float(reduced[-1])  # a sample count, or a sum of class weights
    n = int(round(total_weight)) if float(total_weight).is_integer() else total_weight
    return [t.to(dt) for t, dt in zip(reduced[:-1], dtypes)], n
