"""A loss's options, declared once, in one table.

Each :class:`Option` says how to check a value and how ranks agree on it. From the table a
loss derives its argument validation, the columns ranks agree on at each distributed step
(``_exchange``), its ``extra_repr`` and its disagreement messages, which show values, not
codes ("reduction (rank 0: 'mean', rank 1: 'none')"). An option left out of the table cannot
slip through: the base refuses a constructor argument the table does not declare.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ._exchange import MUST_MATCH, Agreed, number

REQUIRED: Any = inspect.Parameter.empty  # an option without a default


@dataclass(frozen=True)
class Option:
    """One constructor option: its check, and whether (and how) every rank must match it.

    ``check(value)`` returns the value to keep or raises ``ValueError`` naming the option.
    An agreed option travels as one float64 column: ``encode`` makes it a number, ``show``
    turns the number back into text for messages, ``fix`` tells the user what to do.
    ``agree=False`` marks an option that is this rank's own business (a process group) or
    is agreed another way (``update_queue_in_eval``, through what a step does).
    ``default`` is used when the constructor does not pass the option.
    """

    name: str
    check: Callable[[Any], Any]
    default: Any = REQUIRED
    agree: bool = True
    encode: Callable[[Any], float] = float
    show: Callable[[float], str] = number
    fix: str = MUST_MATCH

    def with_default(self, default: Any) -> Option:
        """The same option with another default (e.g. a loss's own default temperature)."""
        return replace(self, default=default)

    def agreed(self, value: Any) -> Agreed:
        return Agreed(self.name, self.encode(value), self.fix, self.show)


def choice(name: str, values: tuple[str, ...], **kwargs: Any) -> Option:
    """One of ``values``; agreed by its index, shown by its text."""

    def check(value: Any) -> str:
        if value not in values:
            raise ValueError(f"{name} must be one of {values}, got {value!r}")
        return str(value)

    def show(code: float) -> str:
        return repr(values[int(code)]) if 0 <= code < len(values) else number(code)

    return Option(name, check, encode=values.index, show=show, **kwargs)


def integer(
    name: str, minimum: int | None = None, *, optional: bool = False, **kwargs: Any
) -> Option:
    """An int (not a bool), at least ``minimum``; ``optional``: or ``None`` (agreed as -1)."""

    def check(value: Any) -> int | None:
        if optional and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            ok = False
        else:
            ok = minimum is None or value >= minimum
        if not ok:
            bound = "" if minimum is None else f" >= {minimum}"
            raise ValueError(f"{name} must be an int{bound}, got {value!r}")
        return value

    def show(code: float) -> str:
        return "None" if optional and code == -1 else number(code)

    encode: Callable[[Any], float] = (
        (lambda v: -1.0 if v is None else float(v)) if optional else float
    )
    return Option(name, check, encode=encode, show=show, **kwargs)


def real(name: str, test: Callable[[float], bool], expected: str, **kwargs: Any) -> Option:
    """A finite int or float (not a bool) for which ``test`` holds; kept as a float."""

    def check(value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and test(value))
        ):
            raise ValueError(f"{name} must be {expected}, got {value!r}")
        return float(value)

    return Option(name, check, **kwargs)


def flag(name: str, *, optional: bool = False, agree: bool = False, **kwargs: Any) -> Option:
    """A bool (``optional``: or ``None`` for auto); each rank's own unless ``agree``
    (then agreed as 0/1 and shown as ``False``/``True``)."""

    def check(value: Any) -> bool | None:
        if optional and value is None:
            return None
        if not isinstance(value, bool):
            expected = "None (auto), True or False" if optional else "a bool"
            raise ValueError(f"{name} must be {expected}, got {value!r}")
        return value

    def show(code: float) -> str:
        return repr(bool(code)) if code in (0.0, 1.0) else number(code)

    return Option(name, check, agree=agree, show=show, **kwargs)


def local(name: str, **kwargs: Any) -> Option:
    """Kept as given, neither checked nor agreed (e.g. a handle to this rank's process group)."""
    return Option(name, lambda value: value, agree=False, **kwargs)


def validated(owner: str, table: Iterable[Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` checked by ``table``, in table order (defaults for the names not passed).

    ``TypeError``, as Python raises for an unknown keyword: a constructor option that its
    loss forgot to declare is a bug in the loss, not in the caller's arguments.
    """
    table = tuple(table)
    names = [option.name for option in table]
    undeclared = [name for name in values if name not in names]
    if undeclared:
        raise TypeError(
            f"{owner} passes option(s) {undeclared} that its options table does not declare; "
            "add an Option for each (with how ranks agree on it) to the loss's `options`"
        )
    missing = [o.name for o in table if o.name not in values and o.default is REQUIRED]
    if missing:
        raise TypeError(f"{owner} missing required option(s) {missing}")
    return {o.name: o.check(values.get(o.name, o.default)) for o in table}


def arguments(frame_locals: Mapping[str, Any]) -> dict[str, Any]:
    """A constructor's arguments from its ``locals()``, for a pass-through ``__init__``."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}
