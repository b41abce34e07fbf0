"""Backends chosen by name, so that a config file can switch them.

``curvopt.curvature("ggn", model, loss_fn, data, **options)`` builds a backend;
options are keyword arguments, so a TOML/dict config maps onto them one to one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from curvopt.errors import OptionError, UnknownCurvatureError

if TYPE_CHECKING:
    from curvopt.curvature.base import CurvatureOperator

_REGISTRY: dict[str, type[CurvatureOperator]] = {}


def register_curvature(name: str) -> Callable[[type], type]:
    """Class decorator adding a :class:`CurvatureOperator` subclass under ``name``."""

    def add(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a curvature backend named {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return add


def available_curvatures() -> list[str]:
    """Names accepted by :func:`curvature`, sorted."""
    return sorted(_REGISTRY)


def curvature_class(name: str) -> type[CurvatureOperator]:
    """The class registered as ``name``.

    Raises:
        UnknownCurvatureError: listing the valid names.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownCurvatureError(
            f"unknown curvature {name!r}; valid names: {', '.join(available_curvatures())}"
        )
    return _REGISTRY[name]


def accepted_options(cls: type) -> set[str]:
    """Keyword options a backend class accepts (its own and the base class's)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                names.add(p.name)
    return names


def check_options(cls: type, options: dict[str, Any]) -> None:
    """Reject options ``cls`` does not take, listing the valid ones."""
    valid = accepted_options(cls)
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
    cls = curvature_class(name)
    if not getattr(cls, "forwards_options", False):  # wrappers check against their base
        check_options(cls, options)
    return cls(model, loss_fn, data, params=params, **options)
