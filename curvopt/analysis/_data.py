"""Checks shared by the analysis functions on the data they are given."""

from __future__ import annotations

from typing import Any

from curvopt.curvature.data_loop import check_data
from curvopt.errors import EmptyDataError


def checked_data(data: Any, where: str) -> None:
    """:func:`~curvopt.curvature.data_loop.check_data` with the function and argument named.

    ``where`` is e.g. ``"sensitivity(loader=...)"``: the message starts with it, so that the
    user sees which argument holds no samples or cannot be read twice.

    Raises:
        EmptyDataError: for an empty collection or batch.
        TypeError: for a one-shot iterator (a generator), which a second pass would find
            exhausted.
    """
    try:
        check_data(data)
    except EmptyDataError as e:
        raise EmptyDataError(f"{where}: {e}") from None
    except TypeError as e:
        raise TypeError(f"{where}: {e}") from None
