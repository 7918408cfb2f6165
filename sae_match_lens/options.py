"""Options dataclasses: a solver family's tuning knobs, apart from the problem's arguments.

A public function takes the problem in its signature (which SAEs, which score, how many
partners) and its tuning knobs (block sizes, screen widths, candidate counts, null sample
sizes, seeds of internal sampling) in one frozen options dataclass, documented field by field
(:class:`~sae_match_lens.matching.MatchOptions`, :class:`~sae_match_lens.flow.linking.LinkOptions`,
:class:`~sae_match_lens.lens.steering.SamplingOptions`).

Until 0.4 the functions still accept the knobs of 0.2 as flat keyword arguments
(:func:`accepts_flat_options`), with a ``DeprecationWarning`` naming the field that replaces
each. Records that hold flat options (plan files, saved chains) are read through
:func:`gather_options`, which warns about nothing. Standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["accepts_flat_options", "flat_names", "gather_options", "renamed_keywords",
           "resolve_options"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def flat_names(options_cls: type) -> dict[str, str]:
    """Flat keyword → options field: every field under its own name, plus the keywords of 0.2
    that the class renamed (its ``RENAMED_IN_0_3`` mapping, old → field)."""
    renamed = getattr(options_cls, "RENAMED_IN_0_3", {})
    return {**{f.name: f.name for f in dataclasses.fields(options_cls)}, **dict(renamed)}


def resolve_options(options_cls: type[T], options: Any) -> T:
    """``options`` itself, or ``options_cls()`` when it is ``None``.

    Raises:
        TypeError: ``options`` is neither ``None`` nor an ``options_cls``.
    """
    if options is None:
        return options_cls()
    if not isinstance(options, options_cls):
        raise TypeError(f"options must be a {options_cls.__name__}, got {type(options).__name__}.")
    return options


def gather_options(options_cls: type, kwargs: Mapping[str, Any], *,
                   keep: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """Flat keyword arguments with the options fields gathered into ``options=``.

    Args:
        options_cls: the options dataclass.
        kwargs: keyword arguments of the function, knobs among them (as 0.2 took them, also
            under the names the class renamed); an ``options`` entry, if any, is the base the
            knobs are applied to.
        keep: names that are the function's own parameters (never gathered).

    Returns:
        The keyword arguments without the knobs, and ``options`` built from them (absent when
        there were none and no ``options`` was given).

    Raises:
        TypeError: If ``kwargs["options"]`` is not an ``options_cls``.
    """
    flat = flat_names(options_cls)
    rest = {k: v for k, v in kwargs.items() if k in keep or k not in flat}
    knobs = {flat[k]: v for k, v in kwargs.items() if k not in keep and k in flat}
    base = rest.get("options")
    if base is not None and not isinstance(base, options_cls):
        raise TypeError(f"options must be a {options_cls.__name__}, got {type(base).__name__}.")
    if knobs:
        rest["options"] = dataclasses.replace(base if base is not None else options_cls(), **knobs)
    return rest


def accepts_flat_options(options_cls: type) -> Callable[[F], F]:
    """Decorate a function whose knobs moved into ``options: options_cls`` so that it still
    accepts them as flat keyword arguments (0.2), with one ``DeprecationWarning`` per call that
    names the field replacing each. The signature shown (``inspect.signature``, the docs) is
    the function's own.

    Args:
        options_cls: the options dataclass of the function's ``options`` parameter.

    Returns:
        The decorator.
    """
    flat = flat_names(options_cls)

    def decorate(fn: F) -> F:
        own = frozenset(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            old = [k for k in kwargs if k in flat and k not in own]
            if old:
                fields = ", ".join(f"{k}= → options.{flat[k]}" for k in old)
                warnings.warn(f"{fn.__qualname__}(): the tuning keywords of 0.2 go in 0.4; pass "
                              f"options={options_cls.__name__}(...) instead ({fields}).",
                              DeprecationWarning, stacklevel=2)
                kwargs = gather_options(options_cls, kwargs, keep=own)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_keywords(**renamed: str) -> Callable[[F], F]:
    """Decorate a function whose keyword arguments 0.3 renamed (``old="new"``) so that it still
    accepts the old names until 0.4, with one ``DeprecationWarning`` per call naming the new.

    Returns:
        The decorator.

    Raises:
        TypeError: (from the decorated function) when a call gives both the old and the new name.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both {old}= and {new}= ({new}= "
                                        f"replaces {old}= since 0.3).")
                    warnings.warn(f"{fn.__qualname__}({old}=) is {new}= since 0.3 ({old}= goes in "
                                  f"0.4).", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
