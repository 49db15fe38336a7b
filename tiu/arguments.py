"""The types of the repositories' arguments, checked where a call enters the library.

A command's fields are validated by the command itself (``domain.base.Command``); a
read or a lookup passes its arguments to SQL, a hash or a query builder, where a value
of the wrong type (``None`` for an email, a list for an id) failed with whatever that
step raised: ``AttributeError``, ``TypeError``, a driver's ``ProgrammingError``. Each
public coroutine method of a repository class is wrapped once, at class creation, to
refuse such a value with ``InvalidCommand(field=<parameter>)`` before anything runs.

Only the plain annotations of the public methods are checked (``str``, ``int``,
``float``, ``bool``, ``datetime``, ``timedelta``, mappings, sequences and iterables of
``str``, each optionally ``| None``); others pass unchecked. Values are not converted,
except that an iterable of strings (or of mappings) is read into a tuple to check its
items. A call that does not match the signature at all (an unknown keyword) raises
Python's own ``TypeError``, as any function does.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

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
    signature = inspect.signature(method)
    rules = {
        name: rule
        for name, param in signature.parameters.items()
        if (rule := _rule(str(param.annotation))) is not None
    }
    if not rules:
        return method

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            rule = rules.get(name)
            if rule is not None:
                bound.arguments[name] = rule(name, value)
        return await method(*bound.args, **bound.kwargs)

    return wrapper  # type: ignore[return-value]


def _rule(annotation: str) -> Callable[[str, Any], Any] | None:
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    kinds = [p for p in parts if p != "None"]
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    if kind in _SCALARS:
        return functools.partial(_scalar, kind, _SCALARS[kind], optional)
    if kind.startswith("Mapping["):
        return functools.partial(_mapping, optional)
    if kind in _STRINGS:
        return functools.partial(_strings, optional)
    if kind.startswith("Sequence[Mapping["):
        return functools.partial(_mappings, optional)
    return None


def _scalar(kind: str, types: tuple[type, ...], optional: bool, name: str, value: Any) -> Any:
    if value is None and optional:
        return value
    if not isinstance(value, types) or (isinstance(value, bool) and kind != "bool"):
        raise InvalidCommand(name, f"must be {_a(kind, optional)}, not {type(value).__name__}")
    return value


def _mapping(optional: bool, name: str, value: Any) -> Any:
    if (value is None and optional) or isinstance(value, Mapping):
        return value
    raise InvalidCommand(name, f"must be {_a('mapping', optional)}, not {type(value).__name__}")


def _strings(optional: bool, name: str, value: Any) -> Any:
    if value is None and optional:
        return value
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidCommand(
            name, f"must be {_a('list of str', optional)}, not {type(value).__name__}"
        )
    items = tuple(value)
    wrong = next((item for item in items if not isinstance(item, str)), None)
    if wrong is not None or any(item is None for item in items):
        raise InvalidCommand(name, f"must hold only str, not {type(wrong).__name__}")
    return items


def _mappings(optional: bool, name: str, value: Any) -> Any:
    if value is None and optional:
        return value
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise InvalidCommand(name, f"must be a list of mappings, not {type(value).__name__}")
    items = tuple(value)
    wrong = next((item for item in items if not isinstance(item, Mapping)), None)
    if wrong is not None or any(item is None for item in items):
        raise InvalidCommand(name, f"must hold only mappings, not {type(wrong).__name__}")
    return items


def _a(kind: str, optional: bool) -> str:
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{article} {kind}{' or None' if optional else ''}"
