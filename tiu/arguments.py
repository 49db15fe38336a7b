"""The types of the repositories' arguments, checked where a call enters the library.

A command's fields are validated by the command itself (``domain.base.Command``); a
read or a lookup passes its arguments to SQL, a hash or a query builder, where a value
of the wrong type (``None`` for an email, a list for an id) failed with whatever that
step raised: ``AttributeError``, ``TypeError``, a driver's ``ProgrammingError``. Each
public coroutine method of a repository class is wrapped once, at class creation, to
refuse such a value with ``InvalidCommand(field=<parameter>)`` before anything runs.

Only the plain annotations of the public methods are checked (``str``, ``int``,
``float``, ``bool``, ``datetime``, ``timedelta``, mappings, sequences and iterables of
``str``, each optionally ``| None``); others pass unchecked. A ``datetime`` must also be
timezone-aware and within the years 1 to 9999 in UTC, where the log keeps times. Values
are not converted, except that an iterable of strings (or of mappings) is read into a
tuple to check its items. A call that does not match the signature at all (an unknown
keyword) raises Python's own ``TypeError``, as any function does.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

from domain.base import datetime_problem
from domain.errors import InvalidCommand

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

#: What each plain annotation accepts (bool is an int to Python, not to a caller).
_SCALARS: Final[dict[str, tuple[type, ...]]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (datetime,),
    "timedelta": (timedelta,),
}
_STRINGS: Final = ("Sequence[str]", "Iterable[str]")


def checked(method: F) -> F:
    """``method`` with its plainly annotated arguments checked on every call."""
    # (position or None for keyword-only, name, rule), worked out once: binding the
    # signature on every call cost ~40 us, this ~2.
    checks = [
        (None if param.kind is param.KEYWORD_ONLY else index, name, rule)
        for index, (name, param) in enumerate(inspect.signature(method).parameters.items())
        if (rule := _rule(str(param.annotation))) is not None
    ]
    if not checks:
        return method

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        for index, name, rule in checks:
            if name in kwargs:
                kwargs[name] = rule(name, kwargs[name])
            elif index is not None and index < len(args):
                value = rule(name, args[index])
                if value is not args[index]:
                    args = (*args[:index], value, *args[index + 1 :])
        return await method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _rule(annotation: str) -> Callable[[str, Any], Any] | None:
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    kinds = [p for p in parts if p != "None"]
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    if kind == "datetime":
        return _datetime(optional)
    if kind in _SCALARS:
        return _scalar(kind, _SCALARS[kind], optional)
    if kind.startswith("Mapping["):
        return _collection("a mapping", Mapping, None, optional)
    if kind in _STRINGS:
        return _collection("a list of str", None, str, optional)
    if kind.startswith("Sequence[Mapping["):
        return _collection("a list of mappings", None, Mapping, optional)
    return None


# The rules take the exact common types first (an ABC isinstance costs ~1 us).


def _scalar(kind: str, types: tuple[type, ...], optional: bool) -> Callable[[str, Any], Any]:
    exact = frozenset(types)

    def check(name: str, value: Any) -> Any:
        if type(value) in exact or (value is None and optional):
            return value
        if not isinstance(value, types) or (isinstance(value, bool) and kind != "bool"):
            raise InvalidCommand(name, f"must be {_a(kind, optional)}, not {_type(value)}")
        return value

    return check


def _datetime(optional: bool) -> Callable[[str, Any], Any]:
    """A datetime the log can be asked about: aware, and within the years 1-9999 in UTC
    (a naive or out-of-range one failed in the driver's bind, a StatementError)."""
    is_datetime = _scalar("datetime", (datetime,), optional)

    def check(name: str, value: Any) -> Any:
        if is_datetime(name, value) is not None:
            problem = datetime_problem(value)
            if problem is not None:
                raise InvalidCommand(name, problem)
        return value

    return check


def _collection(
    what: str, mapping: type | None, item: type | None, optional: bool
) -> Callable[[str, Any], Any]:
    """A mapping (``mapping``), or an iterable of ``item`` (read into a tuple unless it
    is a list or tuple already)."""

    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return value
        if mapping is not None:
            if type(value) is dict or isinstance(value, Mapping):
                return value
            raise InvalidCommand(name, f"must be {what}{_or_none(optional)}, not {_type(value)}")
        if type(value) in (list, tuple):
            items = value
        elif isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
            raise InvalidCommand(name, f"must be {what}{_or_none(optional)}, not {_type(value)}")
        else:
            items = tuple(value)
        assert item is not None
        for element in items:
            if type(element) is not item and not isinstance(element, item):
                raise InvalidCommand(name, f"must hold only {item.__name__}, not {_type(element)}")
        return items

    return check


def _type(value: Any) -> str:
    return type(value).__name__


def _or_none(optional: bool) -> str:
    return " or None" if optional else ""


def _a(kind: str, optional: bool) -> str:
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{article} {kind}{_or_none(optional)}"
