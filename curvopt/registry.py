"""One registry helper: names mapped to factories, so that a config file can choose any of them by name.

Curvature backends, optimizers, batch-size schedules, sensitivity scores and quantizers each keep one
:class:`Registry`. Looking up a name that is not registered, or passing a factory an option it does not take,
raises the house error (:class:`~curvopt.errors.UnknownCurvatureError` for curvatures,
:class:`~curvopt.errors.OptionError` otherwise) listing the valid choices.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from curvopt.errors import CurvoptError, OptionError

F = TypeVar("F")


def accepted_keywords(factory: Any, *, positional: bool = False, inherit: bool = True,
                      exclude: Iterable[str] = ()) -> list[str]:
    """The keyword options ``factory`` accepts, in signature order.

    Args:
        factory: A class (its ``__init__``) or a function.
        positional: Count positional-or-keyword parameters too (``torch.optim`` style: ``betas``,
            ``momentum``); else keyword-only ones only (the curvature backends, whose positional
            arguments are the model, the loss and the data).
        inherit: For a class, also the keyword-only parameters of every ``__init__`` up its MRO (a
            backend forwards ``**options`` to its base).
        exclude: Names the caller sets itself (``self``, ``params``, ``lr``...).
    """
    skip = {"self", *exclude}
    if inspect.isclass(factory):
        inits = [k.__dict__["__init__"] for k in factory.__mro__ if "__init__" in k.__dict__]
        inits = inits if inherit else inits[:1]
    else:
        inits = [factory]
    names: dict[str, None] = {}
    for i, init in enumerate(inits):
        for p in inspect.signature(init).parameters.values():
            own_positional = positional and i == 0 and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            if (p.kind is inspect.Parameter.KEYWORD_ONLY or own_positional) and p.name not in skip:
                names[p.name] = None
    return list(names)


@dataclass
class Entry(Generic[F]):
    """One registered name: its factory, the options it takes, and free-form facts (e.g. a default lr)."""

    name: str
    factory: F
    options: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[F]):
    """Names mapped to factories.

    Args:
        kind: What the names are, for messages (``"curvature"``, ``"optimizer"``, ``"schedule"``...).
        error: The exception a lookup of an unknown name raises (a :class:`CurvoptError` subclass).
        positional, inherit, exclude: How a factory's options are read (:func:`accepted_keywords`).
        sort: List the names sorted (else in registration order) in :meth:`names` and in messages.

    Example:
        >>> QUANTIZERS = Registry("quantizer")
        >>> QUANTIZERS.register("symmetric", make_symmetric)
        >>> QUANTIZERS.get("int4")   # OptionError: unknown quantizer 'int4'; valid names: symmetric
    """

    def __init__(self, kind: str, *, error: type[CurvoptError] = OptionError, positional: bool = False,
                 inherit: bool = True, exclude: Iterable[str] = (), sort: bool = False) -> None:
        self.kind, self.error, self.sort = kind, error, sort
        self._read = dict(positional=positional, inherit=inherit, exclude=tuple(exclude))
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, factory: F | None = None, *, options: Iterable[str] | None = None,
                 **info: Any) -> Any:
        """Add ``factory`` under ``name`` (or, without ``factory``, return a decorator that does).

        Args:
            name: The name configs use.
            factory: A class or a function.
            options: The keyword options it takes, when its signature does not tell them (a function that
                forwards ``**options`` to a class); default: read from the signature.
            **info: Facts kept with the entry (:meth:`info`), e.g. ``default_lr=0.03``.

        Raises:
            ValueError: ``name`` is already registered to another factory.
        """

        def add(f: F) -> F:
            old = self._entries.get(name)
            if old is not None and old.factory is not f:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            found = tuple(options) if options is not None else tuple(accepted_keywords(f, **self._read))
            self._entries[name] = Entry(name, f, found, dict(info))
            return f

        return add if factory is None else add(factory)

    def names(self) -> list[str]:
        """The registered names (sorted, or in registration order)."""
        return sorted(self._entries) if self.sort else list(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry[F]:
        """The entry registered as ``name``.

        Raises:
            CurvoptError: (``self.error``) naming ``name`` and listing the valid names.
        """
        if name not in self:
            raise self.error(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._entries[name]

    def get(self, name: str) -> F:
        """The factory registered as ``name`` (raises as :meth:`entry`)."""
        return self.entry(name).factory

    def info(self, name: str, key: str, default: Any = None) -> Any:
        """The fact ``key`` registered with ``name`` (``default`` if none)."""
        return self.entry(name).info.get(key, default)

    def options(self, name: str) -> tuple[str, ...]:
        """The keyword options the factory of ``name`` takes, in signature order."""
        return self.entry(name).options

    def unknown_options(self, name: str, options: Mapping[str, Any] | Iterable[str]) -> list[str]:
        """The keys of ``options`` that ``name`` does not take, sorted."""
        return sorted(set(options) - set(self.options(name)))

    def check_options(self, name: str, options: Mapping[str, Any] | Iterable[str]) -> None:
        """Reject options ``name`` does not take.

        Raises:
            OptionError: ``the 'ggn' curvature got unknown option(s) 'mc_sample'; valid options: ...``.
        """
        unknown = self.unknown_options(name, options)
        if unknown:
            raise OptionError(f"the {name!r} {self.kind} got unknown option(s) {', '.join(map(repr, unknown))}; "
                              f"valid options: {', '.join(sorted(self.options(name)))}")

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        """``factory(*args, **options)`` for ``name``, after checking the options."""
        self.check_options(name, options)
        return self.get(name)(*args, **options)


__all__ = ["Entry", "Registry", "accepted_keywords"]
