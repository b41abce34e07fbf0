"""Backends chosen by name, so that a config file can switch them.

``curvopt.curvature("ggn", model, loss_fn, data, **options)`` builds a backend;
options are keyword arguments, so a TOML/dict config maps onto them one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from curvopt.errors import OptionError, UnknownCurvatureError
from curvopt.registry import Registry, accepted_keywords

if TYPE_CHECKING:
    from curvopt.curvature.base import CurvatureOperator

#: The curvature backends by name; an unknown name is an :class:`UnknownCurvatureError` listing the valid ones.
CURVATURES: Registry[type[CurvatureOperator]] = Registry("curvature", error=UnknownCurvatureError, sort=True)


def register_curvature(name: str) -> Callable[[type], type]:
    """Class decorator adding a :class:`CurvatureOperator` subclass under ``name``."""

    def add(cls: type) -> type:
        CURVATURES.register(name, cls)
        cls.name = name
        return cls

    return add


def available_curvatures() -> list[str]:
    """Names accepted by :func:`curvature`, sorted."""
    return CURVATURES.names()


def curvature_class(name: str) -> type[CurvatureOperator]:
    """The class registered as ``name``.

    Raises:
        UnknownCurvatureError: listing the valid names.
    """
    return CURVATURES.get(name)


def accepted_options(cls: type) -> set[str]:
    """Keyword options a backend class accepts (its own and the base class's)."""
    return set(accepted_keywords(cls))


def check_options(cls: type, options: dict[str, Any]) -> None:
    """Reject options ``cls`` does not take, listing the valid ones."""
    if CURVATURES.entry(cls.name).factory is cls:
        CURVATURES.check_options(cls.name, options)
        return
    valid = accepted_options(cls)  # a subclass registered under no name of its own
    unknown = sorted(set(options) - valid)
    if unknown:
        raise OptionError(
            f"the {cls.name!r} curvature got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(sorted(valid))}"
        )


def curvature(
    name: str,
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Iterable[torch.Tensor | str] | None = None,
    **options: Any,
) -> CurvatureOperator:
    """Build the curvature backend ``name`` of the empirical risk of ``model`` on ``data``.

    Args:
        name: One of :func:`available_curvatures` (``"hessian"``, ``"ggn"``,
            ``"fisher"``, ``"empirical_fisher"``, ``"block_diagonal"``, ...).
        model: The network.
        loss_fn: ``loss_fn(model(X), y)``, a scalar.
        data: One ``(X, y)`` batch or an iterable of batches.
        params: The parameters to differentiate (default: all that require grad).
        **options: Backend options, e.g. ``cache=True``, ``mc_samples=8``,
            ``base="ggn"`` for ``block_diagonal``.

    Returns:
        A :class:`~curvopt.curvature.base.CurvatureOperator` of shape ``(P, P)``.

    Example:
        >>> op = curvopt.curvature("ggn", model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> Gv = op @ v
    """
    cls = CURVATURES.get(name)
    if not getattr(cls, "forwards_options", False):  # wrappers check against their base
        CURVATURES.check_options(name, options)
    return cls(model, loss_fn, data, params=params, **options)
