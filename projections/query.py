"""The one generic query layer over read-model tables.

Repositories read projections only through :class:`Query`: one per read-model
``Table``, built once (it holds no connection), each method taking the caller's
``AsyncConnection``.  Every statement is a SQLAlchemy expression with bound
parameters, and means the same on SQLite and PostgreSQL.

Filters
    ``{"field__op": value}``; a key without ``__op`` means ``eq``.  Fields are
    looked up in ``table.c`` (restricted to ``Query(fields=...)`` if given),
    operators in :data:`OPERATORS`; all filters are ANDed.  Anything unknown or
    any value of the wrong shape or type raises :class:`InvalidFilter` naming
    the field, before a statement is built, so no driver error can come out of
    a filter.

    ============ ===========================================================
    eq, ne       ``=``, ``<>``; ``None`` means IS NULL / IS NOT NULL
    lt lte gt gte ordered comparison
    in, not_in   a non-string iterable of values (no ``None``); an empty
                 ``in`` matches nothing, an empty ``not_in`` matches every row
    between      a 2-sequence ``(low, high)``, both ends inclusive
    isnull       ``True`` (IS NULL) or ``False`` (IS NOT NULL)
    like, ilike  a LIKE pattern: ``%`` any run, ``_`` one character, ``\\``
                 escapes the next character (a trailing lone ``\\`` is invalid)
    startswith   literal prefix (wildcards in the value are matched literally)
    contains     literal substring
    ============ ===========================================================

    Comparisons follow SQL: a NULL column never matches ``eq``/``ne``/``lt``/
    ``in``/``not_in``/``like``/... with a value (so ``ne "x"`` and ``not_in``
    skip NULL rows); ask for NULLs with ``isnull`` or ``eq None``.

Values are never converted from strings: the column's Python type decides.
    str columns take ``str`` (no NUL, valid Unicode); Integer/SmallInteger/
    BigInteger take ``int`` (not ``bool``) within the type's 32/16/64-bit range;
    Float takes ``int``/``float`` (finite); Numeric ``int``/``Decimal``
    (finite); Boolean ``bool``; ``DateTime(timezone=True)`` takes an *aware*
    ``datetime`` (compared in UTC: stored values are assumed UTC, which SQLite
    needs) and a naive column a naive one; Date ``date``; Time ``time``; Uuid
    a ``UUID`` or UUID string; Enum a member (equality operators only).  Other
    types (JSON, ARRAY, ...) accept only ``isnull``/``eq None``/``ne None``,
    which test SQL NULL (declare ``JSON(none_as_null=True)`` so that a Python
    ``None`` is stored as one).
    The like family applies to string columns only.

Portability
    String ranges, ordering and the like family use code-point order and are
    case-sensitive (PostgreSQL: ``COLLATE "C"``; SQLite: BINARY and GLOB), so
    both backends agree.  ``ilike`` folds ASCII letters only, on both.
    NULL sorts as greater than every value: last ascending, first descending.

Results
    Rows are plain ``dict``s keyed by column key, in table column order.

Cursors
    ``page`` returns an opaque, URL-safe cursor: base64 of JSON holding a
    version, the last row's order-key values and a checksum over them, the
    table and the ordering.  It is not a secret nor signed: it only names a
    position the caller could already see, its values are re-validated on
    decode, and a malformed, tampered or foreign (other table or ordering)
    cursor raises :class:`InvalidCursor`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import json
import math
import uuid
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, TypeAlias

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from eventstore import telemetry
from eventstore.sqlite_driver import OFF_LOOP
from projections.errors import InvalidCursor, InvalidFilter, InvalidOrdering, InvalidPagination

__all__ = [
    "MAX_IN",
    "MAX_LIMIT",
    "OPERATORS",
    "Filter",
    "Page",
    "Query",
    "Row",
    "parse_filters",
]

Row: TypeAlias = dict[str, Any]
Rows: TypeAlias = list[Row]
_Values: TypeAlias = list[Any]  # Query.list shadows the builtin in the class body
Filters: TypeAlias = Mapping[str, Any] | Iterable["Filter"] | None

OPERATORS: Final = (
    "eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in",
    "like", "ilike", "startswith", "contains", "isnull", "between",
)  # fmt: skip
MAX_LIMIT: Final = 10_000
MAX_IN: Final = 10_000  # both backends cap bound parameters near 32k
_MAX_OFFSET: Final = 2**31 - 1
_MAX_PATTERN: Final = 1_000  # SQLite refuses LIKE/GLOB patterns over 50k bytes
_MAX_CURSOR: Final = 4_096
#: Statements a Query keeps, one per shape of call (see ``Query._prepared``); all are
#: dropped when full (shapes come from code, so a few dozen in practice: a limit and an
#: offset are bound values, not part of a shape).
_STATEMENTS_KEPT: Final = 256
_CURSOR_VERSION: Final = 1
_GET_MANY_CHUNK: Final = 500
_ESC: Final = "\\"
_EQUALITY_OPS: Final = frozenset({"eq", "ne", "in", "not_in", "isnull"})
_RANGE_OPS: Final = frozenset({"lt", "lte", "gt", "gte", "between"})
_PATTERN_OPS: Final = frozenset({"like", "ilike", "startswith", "contains"})
#: Filters no index serves: the statement scans (see ``Query._grows_with_data``).
_SCAN_OPS: Final = frozenset({"ne", "not_in", "like", "ilike", "contains"})
_DEEP_OFFSET: Final = 1_000
_LIMIT: Final = "tiu_limit"
_OFFSET: Final = "tiu_offset"
_INT_BITS: Final = ((sa.SmallInteger, 16), (sa.BigInteger, 64), (sa.Integer, 32))


@dataclass(frozen=True, slots=True)
class Filter:
    """One condition: ``field op value``, with the meaning given in the module docstring."""

    field: str
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class Page:
    """One keyset page; ``next_cursor`` is ``None`` on the last page."""

    items: Rows
    next_cursor: str | None


class _BadValue(Exception):
    pass


# -- column kinds and value coercion ---------------------------------------------


def _base_type(col: sa.Column[Any]) -> sa.types.TypeEngine[Any]:
    t: sa.types.TypeEngine[Any] = col.type
    while isinstance(t, sa.types.TypeDecorator):
        t = t.impl_instance
    return t


@functools.lru_cache(maxsize=1024)
def _kind(col: sa.Column[Any]) -> str:
    """What values ``col`` takes (see ``_coerce``), worked out once per column: checking
    a filter or cursor value asks it several times."""
    t = _base_type(col)
    # Order matters: Enum is a String, DateTime is not a Date, Float may be a Numeric.
    for cls, kind in (
        (sa.Enum, "enum"),
        (sa.String, "text"),
        (sa.Boolean, "bool"),
        (sa.Integer, "int"),
        (sa.Float, "float"),
        (sa.Numeric, "decimal"),
        (sa.DateTime, "datetime"),
        (sa.Date, "date"),
        (sa.Time, "time"),
        (sa.Interval, "interval"),
        (sa.Uuid, "uuid"),
        (sa.LargeBinary, "bytes"),
    ):
        if isinstance(t, cls):
            return kind
    return "opaque"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _expect(value: Any, what: str) -> _BadValue:
    return _BadValue(f"expected {what}, got {type(value).__name__} {_short(value)}")


def _coerce(col: sa.Column[Any], value: Any) -> Any:
    """Check one non-None scalar against the column's type; return the value to bind."""
    kind, t = _kind(col), _base_type(col)
    if value is None:
        raise _BadValue("None is only meaningful with eq/ne (IS NULL / IS NOT NULL)")
    if kind == "text":
        if not isinstance(value, str):
            raise _expect(value, "str")
        if "\x00" in value:
            raise _BadValue("strings may not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadValue("string is not valid Unicode") from None
        return value
    if kind == "enum":
        assert isinstance(t, sa.Enum)
        if t.enum_class is not None and isinstance(value, t.enum_class):
            return value
        if isinstance(value, str) and value in t.enums:
            return value
        raise _expect(value, "one of " + ", ".join(t.enums))
    if kind == "bool":
        if not isinstance(value, bool):
            raise _expect(value, "bool")
        return value
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise _expect(value, "int")
        bits = next(b for cls, b in _INT_BITS if isinstance(t, cls))
        if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
            raise _BadValue(f"{value} is outside the column's {bits}-bit integer range")
        return value
    if kind in ("float", "decimal"):
        if not isinstance(value, int | float | Decimal) or isinstance(value, bool):
            raise _expect(value, "a number")
        if kind == "float" and isinstance(value, Decimal):
            raise _expect(value, "int or float")
        if kind == "decimal" and isinstance(value, float):
            raise _expect(value, "int or Decimal")  # a float is rarely the decimal meant
        try:
            number = float(value) if kind == "float" else Decimal(value)
        except OverflowError:
            raise _BadValue(f"{_short(value)} is too large") from None
        if not (number.is_finite() if isinstance(number, Decimal) else math.isfinite(number)):
            raise _BadValue("NaN and infinity are not comparable portably")
        return number
    if kind == "datetime":
        assert isinstance(t, sa.DateTime)
        if not isinstance(value, dt.datetime):
            raise _expect(value, "datetime")
        if not t.timezone:
            if value.tzinfo is not None:
                raise _BadValue("expected a naive datetime for a column without time zone")
            return value
        if value.tzinfo is None or value.utcoffset() is None:
            raise _BadValue("expected an aware datetime (the column has a time zone)")
        try:
            return value.astimezone(dt.UTC)
        except OverflowError:
            raise _BadValue(f"{_short(value)} is out of range in UTC") from None
    if kind == "date":
        if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
            raise _expect(value, "date")
        return value
    if kind == "time":
        if not isinstance(value, dt.time) or value.tzinfo is not None:
            raise _expect(value, "naive time")
        return value
    if kind == "interval":
        if not isinstance(value, dt.timedelta):
            raise _expect(value, "timedelta")
        return value
    if kind == "uuid":
        assert isinstance(t, sa.Uuid)
        if isinstance(value, str):
            try:
                value = uuid.UUID(value)
            except ValueError:
                raise _expect(value, "UUID") from None
        if not isinstance(value, uuid.UUID):
            raise _expect(value, "UUID")
        return value if t.as_uuid else str(value)
    if kind == "bytes":
        if not isinstance(value, bytes):
            raise _expect(value, "bytes")
        return value
    raise _opaque(col)


def _opaque(col: sa.Column[Any]) -> _BadValue:
    name = _base_type(col).__class__.__name__
    return _BadValue(f"a {name} column supports only isnull, eq None and ne None")


def _check_pattern(pattern: str) -> None:
    if len(pattern) > _MAX_PATTERN:
        raise _BadValue(f"pattern longer than {_MAX_PATTERN} characters")
    i = 0
    while i < len(pattern):
        if pattern[i] == _ESC:
            if i + 1 == len(pattern):
                raise _BadValue("pattern ends with a lone escape character '\\'")
            i += 1
        i += 1


def _escape_like(text: str) -> str:
    return "".join(_ESC + c if c in "%_\\" else c for c in text)


def _like_to_glob(pattern: str) -> str:
    # SQLite's LIKE ignores ASCII case (and PRAGMA case_sensitive_like may flip it);
    # GLOB is always case-sensitive, so a LIKE pattern is translated into one.
    out, chars = [], iter(pattern)
    for c in chars:
        if c == _ESC:
            lit = next(chars)
            out.append(f"[{lit}]" if lit in "*?[" else lit)
        elif c == "%":
            out.append("*")
        elif c == "_":
            out.append("?")
        else:
            out.append(f"[{c}]" if c in "*?[" else c)
    return "".join(out)


# -- parsing -------------------------------------------------------------------------


def _unknown_field(table: sa.Table, name: str, allowed: Collection[str]) -> InvalidFilter:
    return InvalidFilter(
        f"unknown field {_short(name)} on table {table.name!r}; valid fields: {', '.join(allowed)}",
        field=name,
    )


def _lookup(table: sa.Table, name: str, allowed: Collection[str]) -> sa.Column[Any] | None:
    return table.c[name] if name in allowed else None


def _allowed(table: sa.Table, fields: Iterable[str] | None) -> tuple[str, ...]:
    if fields is None:
        return tuple(table.c.keys())
    chosen = tuple(fields)
    missing = [f for f in chosen if f not in table.c]
    if missing:
        raise ValueError(f"fields not on table {table.name!r}: {', '.join(missing)}")
    return chosen


def _check_filter(table: sa.Table, f: Filter, allowed: Collection[str]) -> Filter:
    if not isinstance(f.field, str) or not isinstance(f.op, str):
        raise InvalidFilter(f"filter field and operator must be str, got {_short(f)}")
    col = _lookup(table, f.field, allowed)
    if col is None:
        raise _unknown_field(table, f.field, allowed)
    if f.op not in OPERATORS:
        raise InvalidFilter(
            f"unknown operator {_short(f.op)} for field {f.field!r}; "
            f"valid operators: {', '.join(OPERATORS)}",
            field=f.field,
            operator=f.op,
        )
    try:
        value = _check_value(col, f.op, f.value)
    except _BadValue as e:
        raise InvalidFilter(
            f"invalid value for {f.field}__{f.op}: {e}", field=f.field, operator=f.op
        ) from None
    return Filter(f.field, f.op, value)


def _check_value(col: sa.Column[Any], op: str, value: Any) -> Any:
    kind = _kind(col)
    if op == "isnull":
        if not isinstance(value, bool):
            raise _expect(value, "bool")
        return value
    if op in ("eq", "ne") and value is None:
        return None
    if kind == "opaque":
        raise _opaque(col)
    if kind == "enum" and op not in _EQUALITY_OPS:
        raise _BadValue("enum columns support only eq, ne, in, not_in and isnull")
    if op in ("in", "not_in"):
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
            raise _expect(value, "a non-string iterable")
        items = tuple(value)
        if len(items) > MAX_IN:
            raise _BadValue(f"more than {MAX_IN} values")
        return tuple(_coerce(col, v) for v in items)
    if op == "between":
        if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 2:
            raise _expect(value, "a (low, high) pair")
        return (_coerce(col, value[0]), _coerce(col, value[1]))
    if op in _PATTERN_OPS:
        if kind != "text":
            raise _BadValue(f"{op} applies only to string columns")
        text = _coerce(col, value)
        if op in ("like", "ilike"):
            _check_pattern(text)
        elif len(text) > _MAX_PATTERN:
            raise _BadValue(f"value longer than {_MAX_PATTERN} characters")
        return text
    return _coerce(col, value)


def parse_filters(
    table: sa.Table, filters: Filters, *, fields: Iterable[str] | None = None
) -> tuple[Filter, ...]:
    """Turn ``{"field__op": value}`` (or ``Filter`` objects) into checked ``Filter``\\s.

    Values come back normalised (tuples for ``in``/``between``, aware datetimes
    in UTC).  ``fields`` narrows which columns may be named.  Raises
    :class:`InvalidFilter` for an unknown field or operator or a bad value.
    """
    allowed = _allowed(table, fields)
    if filters is None:
        return ()
    parsed: list[Filter] = []
    if isinstance(filters, Mapping):
        for key, value in filters.items():
            if not isinstance(key, str):
                raise InvalidFilter(f"filter keys must be str, got {_short(key)}")
            name, sep, op = key.rpartition("__")
            if not sep or (name not in allowed and key in allowed):
                name, op = key, "eq"
            parsed.append(Filter(name, op, value))
    else:
        for f in filters:
            if not isinstance(f, Filter):
                raise InvalidFilter(f"expected Filter objects, got {_short(f)}")
            parsed.append(f)
    return tuple(_check_filter(table, f, allowed) for f in parsed)


# -- SQL building ------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _ordered(col: sa.Column[Any], dialect: str) -> ColumnElement[Any]:
    """The column as compared and sorted: code-point order for strings on PostgreSQL
    (built once per column: expressions are immutable, and COLLATE showed in profiles)."""
    if dialect == "postgresql" and _kind(col) == "text":
        return col.collate("C")
    return col


def _bind(col: sa.Column[Any], value: Any, expanding: bool = False) -> ColumnElement[Any]:
    # An explicit bind: SQLAlchemy refuses < and > against a bare True/False.
    if expanding:
        return sa.bindparam(None, list(value), type_=col.type, expanding=True)
    return sa.literal(value, col.type)


Binder: TypeAlias = Callable[..., ColumnElement[Any]]


class _Named:
    """A binder naming the values a query's filters bind ``tiu_filter_0``, ... in order,
    and keeping them: filters of one shape (see :func:`_shape`) then build the same SQL,
    so a statement built once serves every call with these parameters."""

    __slots__ = ("params",)

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def name(self, value: Any) -> str:
        name = f"tiu_filter_{len(self.params)}"
        self.params[name] = value
        return name

    def __call__(
        self, col: sa.Column[Any], value: Any, expanding: bool = False
    ) -> ColumnElement[Any]:
        value = list(value) if expanding else value
        return sa.bindparam(self.name(value), value, type_=col.type, expanding=expanding)


def _shape(f: Filter) -> tuple[str, str, bool | None]:
    """What of a filter decides its SQL: the field, the operator, and for some
    operators whether the value is None or empty (not the value itself)."""
    if f.op in ("eq", "ne"):
        return f.field, f.op, f.value is None
    if f.op in ("isnull", "in", "not_in"):
        return f.field, f.op, bool(f.value)
    return f.field, f.op, None


def _bound(f: Filter, dialect: str) -> tuple[Any, ...]:
    """The values :func:`_clause` binds for ``f``, in the order it binds them: what a
    statement kept for ``f``'s shape (:meth:`Query._prepared`) is executed with."""
    op, v = f.op, f.value
    if op in ("eq", "ne"):
        return () if v is None else (v,)
    if op == "isnull":
        return ()
    if op in ("in", "not_in"):
        return (list(v),) if v else ()
    if op == "between":
        return (v[0], v[1])
    if op in ("lt", "lte", "gt", "gte"):
        return (v,)
    pattern = {
        "like": v,
        "ilike": v,
        "startswith": _escape_like(v) + "%",
        "contains": "%" + _escape_like(v) + "%",
    }[op]
    return (_like_to_glob(pattern),) if op != "ilike" and dialect == "sqlite" else (pattern,)


def _clause(
    col: sa.Column[Any], f: Filter, dialect: str, bind: Binder = _bind
) -> ColumnElement[bool]:
    op, v = f.op, f.value
    values = _bound(f, dialect)
    if op == "eq":
        return col.is_(None) if v is None else col == bind(col, values[0])
    if op == "ne":
        return col.is_not(None) if v is None else col != bind(col, values[0])
    if op == "isnull":
        return col.is_(None) if v else col.is_not(None)
    if op == "in":
        return col.in_(bind(col, values[0], True)) if v else sa.false()
    if op == "not_in":
        return col.not_in(bind(col, values[0], True)) if v else sa.true()
    # Comparisons and patterns only: equality is the same in every deterministic
    # collation, and building the COLLATE expression per filter showed in profiles.
    o = _ordered(col, dialect)
    if op == "between":
        return o.between(bind(col, values[0]), bind(col, values[1]))
    comparisons = {"lt": o.__lt__, "lte": o.__le__, "gt": o.__gt__, "gte": o.__ge__}
    if op in comparisons:
        return comparisons[op](bind(col, values[0]))
    if op == "ilike":
        # SQLAlchemy renders lower(x) LIKE lower(p) on SQLite, which folds ASCII only;
        # COLLATE "C" makes PostgreSQL's ILIKE fold ASCII only too.
        return o.ilike(bind(col, values[0]), escape=_ESC)
    if dialect == "sqlite":
        # A GLOB pattern (see _like_to_glob).
        return col.op("GLOB", is_comparison=True)(bind(col, values[0]))
    return o.like(bind(col, values[0]), escape=_ESC)


Key: TypeAlias = tuple[sa.Column[Any], bool]  # (column, descending)


@functools.lru_cache(maxsize=1024)
def _sort_by(col: sa.Column[Any], desc: bool, dialect: str) -> sa.UnaryExpression[Any]:
    expr = _ordered(col, dialect)
    if desc:
        return expr.desc().nulls_first() if col.nullable else expr.desc()
    return expr.asc().nulls_last() if col.nullable else expr.asc()


def _sort(key: Key, dialect: str) -> sa.UnaryExpression[Any]:
    """The ORDER BY term of ``key``, built once (expressions are immutable)."""
    return _sort_by(key[0], key[1], dialect)


def _after(
    keys: Sequence[Key], values: Sequence[Any], dialect: str, bind: Binder = _bind
) -> ColumnElement[bool]:
    """Rows strictly after ``values`` in the order ``keys`` (NULL greater than all);
    ``bind`` is called once per value that is not None, in key order."""
    if len({d for _, d in keys}) == 1 and not any(c.nullable for c, _ in keys):
        # One direction and no NULLs: a row-value comparison, which indexes serve.
        left = sa.tuple_(*(_ordered(c, dialect) for c, _ in keys))
        right = sa.tuple_(*(bind(c, v) for (c, _), v in zip(keys, values, strict=True)))
        return left < right if keys[0][1] else left > right
    branches: list[ColumnElement[bool]] = []
    ties: list[ColumnElement[bool]] = []
    for (col, desc), v in zip(keys, values, strict=True):
        o = _ordered(col, dialect)
        beyond: ColumnElement[bool]
        tie: ColumnElement[bool]
        if v is None:
            beyond, tie = (col.is_not(None) if desc else sa.false()), col.is_(None)
        else:
            b = bind(col, v)
            beyond, tie = (o < b if desc else o > b), col == b
            if col.nullable and not desc:
                beyond = sa.or_(beyond, col.is_(None))
        branches.append(sa.and_(*ties, beyond))
        ties.append(tie)
    return sa.or_(*branches)


def _json_value(col: sa.Column[Any], v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, dt.datetime):
        if v.tzinfo is None and getattr(_base_type(col), "timezone", False):
            v = v.replace(tzinfo=dt.UTC)  # SQLite hands back the stored UTC wall time
        return v.isoformat()
    if isinstance(v, dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return [v.days, v.seconds, v.microseconds]
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    return str(v)  # Decimal, UUID, Enum names


def _from_json(col: sa.Column[Any], raw: Any) -> Any:
    kind = _kind(col)
    if raw is None or kind in ("text", "enum", "bool", "int", "float", "uuid"):
        return raw
    if not isinstance(raw, str | list):
        raise _expect(raw, "an encoded value")
    if kind == "decimal" and isinstance(raw, str):
        return Decimal(raw)
    if kind == "datetime" and isinstance(raw, str):
        return dt.datetime.fromisoformat(raw)
    if kind == "date" and isinstance(raw, str):
        return dt.date.fromisoformat(raw)
    if kind == "time" and isinstance(raw, str):
        return dt.time.fromisoformat(raw)
    if kind == "interval" and isinstance(raw, list):
        return dt.timedelta(*raw)
    if kind == "bytes" and isinstance(raw, str):
        return base64.b64decode(raw, validate=True)
    raise _expect(raw, f"an encoded {kind}")


# -- the query object ----------------------------------------------------------------


class Query:
    """Read-only queries over one read-model table.

    ``fields`` (default: every column) are the columns that filters and
    ``order_by`` may name: leave out what callers must not probe (hashes,
    tokens).  Lookups by primary key are not restricted.  ``where`` on every
    method is an extra condition the repository ANDs in (access control);
    filters are ANDed with it, so they can only narrow it. Pass the same ``where``
    object for calls of one kind (statements are kept per ``where`` by identity), and
    bind no parameter named ``tiu_filter_N`` in it (the names of the query's values).
    """

    def __init__(
        self,
        table: sa.Table,
        *,
        fields: Iterable[str] | None = None,
        ranks: Mapping[str, tuple[str, Mapping[str, int]]] | None = None,
    ) -> None:
        if not table.primary_key.columns:
            raise ValueError(f"table {table.name!r} has no primary key")
        self.table = table
        self.fields = _allowed(table, fields)
        #: Fields whose names do not sort as they rank (a task's priority): field ->
        #: (column holding the rank, rank of each name). order_by and lt/lte/gt/gte/
        #: between use the rank column; equality and patterns keep the names.
        self._ranks = dict(ranks or {})
        self._pk: tuple[sa.Column[Any], ...] = tuple(table.primary_key.columns)
        #: Columns an index (or the primary key) starts with: filters a lookup serves.
        self._leading = frozenset(
            [self._pk[0].name]
            + [next(iter(i.columns)).name for i in table.indexes if len(i.columns)]
        )
        # Built once: a Select is generative (where() returns a copy).
        self._base: sa.Select[Any] = sa.select(*table.c)
        self._statements: dict[Hashable, tuple[Any, sa.Select[Any]]] = {}
        self._dicts = _dicts_of(tuple(table.c.keys()))

    def __repr__(self) -> str:
        return f"Query({self.table.name!r})"

    # -- building blocks

    def filters(self, filters: Filters) -> tuple[Filter, ...]:
        """:func:`parse_filters` restricted to this query's fields (ranked fields
        compared by rank)."""
        parsed = parse_filters(self.table, filters, fields=self.fields)
        return tuple(self._by_rank(f) for f in parsed) if self._ranks else parsed

    def _by_rank(self, f: Filter) -> Filter:
        ranked = self._ranks.get(f.field)
        if ranked is None or f.op not in _RANGE_OPS:
            return f
        column, rank = ranked
        values = f.value if f.op == "between" else (f.value,)
        if not all(v in rank for v in values):
            raise InvalidFilter(
                f"{f.field} compares by rank: use {', '.join(rank)}", field=f.field, operator=f.op
            )
        ranks = tuple(rank[v] for v in values)
        return Filter(column, f.op, ranks if f.op == "between" else ranks[0])

    def _where(
        self,
        parsed: Sequence[Filter],
        where: ColumnElement[bool] | None,
        dialect: str,
        bind: Binder = _bind,
    ) -> list[ColumnElement[bool]]:
        conds = [_clause(self.table.c[f.field], f, dialect, bind) for f in parsed]
        return [*_also(where), *conds]

    def _select(self) -> sa.Select[Any]:
        return self._base

    def _prepared(
        self,
        kind: Hashable,
        filters: Filters,
        where: ColumnElement[bool] | None,
        dialect: str,
        build: Callable[[list[ColumnElement[bool]]], sa.Select[Any]],
        *,
        values: Sequence[Any] = (),
        conditions: Callable[[list[str]], list[ColumnElement[bool]]] | None = None,
    ) -> tuple[sa.Select[Any], dict[str, Any]]:
        """The statement ``build(conditions)`` for these filters' shape, built once per
        shape, and this call's values for it. ``values`` (checked key or cursor values)
        are bound under the names ``conditions(names)`` binds them by, in conditions
        ANDed with the filters'; ``kind`` must tell apart the shapes those take. Values
        are bound as ``tiu_filter_0``, ``tiu_filter_1``, ...: a ``where`` must not bind
        parameters of those names, nor ``tiu_limit`` and ``tiu_offset``.

        Building a select and SQLAlchemy's cache key for it (a walk of the whole
        statement, the visibility subqueries included) was ~0.2 of ~0.7 ms of a
        50-row list on SQLite (measured: the same Core statement built once and
        executed with parameters, against rebuilt per call); a statement object is
        immutable and keeps its cache key, so one per shape serves every call.
        ``where`` is part of the shape by identity (repositories cache theirs)."""
        binder = _Named()
        names = [binder.name(v) for v in values]
        parsed = self.filters(filters)
        shape = (kind, dialect, id(where), tuple(_shape(f) for f in parsed))
        found = self._statements.get(shape)
        if found is not None and found[0] is where:
            # Only the values: the conditions binding them (SQLAlchemy expressions) are
            # built for a new statement only.
            for f in parsed:
                for value in _bound(f, dialect):
                    binder.name(value)
            return found[1], binder.params
        conds = self._where(parsed, where, dialect, binder)
        if conditions is not None:
            # Last: SQLite tests a row against the terms in this order, and the filters
            # drop most rows more cheaply than a cursor's row-value comparison.
            conds = [*conds, *conditions(names)]
        statement = build(conds)
        if self._grows_with_data(kind, parsed):
            statement = statement.execution_options(**{OFF_LOOP: True})
        if len(self._statements) >= _STATEMENTS_KEPT:
            self._statements.clear()
        self._statements[shape] = (where, statement)
        return statement, binder.params

    def _grows_with_data(self, kind: Hashable, parsed: Sequence[Filter]) -> bool:
        """Whether a statement's cost may grow with the table, so that SQLite runs it on
        a worker thread (``eventstore.sqlite_driver``): a count, a list without a limit
        or past a deep offset, or filters of which no index serves any (patterns,
        negations, columns that lead no index). Other reads cost ~0.1 ms inline, less
        than the hop."""
        if kind == "count":
            return True
        if isinstance(kind, tuple) and kind[0] == "list":
            unlimited, deep = kind[2], kind[4]
            if unlimited or deep:
                return True
        served = any(f.op not in _SCAN_OPS and f.field in self._leading for f in parsed)
        return bool(parsed) and not served

    def _rows(self, result: sa.CursorResult[Any]) -> Rows:
        # .all(): one fetchall, where iterating fetched row by row (profiled).
        return self._dicts(result.all())

    def _keys(self, order_by: str | Sequence[str] | None) -> list[Key]:
        names = [order_by] if isinstance(order_by, str) else list(order_by or ())
        keys: list[Key] = []
        for raw in names:
            if not isinstance(raw, str):
                raise InvalidOrdering(f"order_by keys must be str, got {_short(raw)}")
            name = raw.removeprefix("-")
            if name in self._ranks:
                name = self._ranks[name][0]
            col = _lookup(self.table, name, self.fields)
            if col is None:
                raise InvalidOrdering(
                    f"cannot order by unknown field {_short(name)} on table {self.table.name!r}; "
                    f"valid fields: {', '.join(self.fields)} (prefix '-' for descending)",
                    field=name,
                )
            if _kind(col) in ("opaque", "enum"):
                raise InvalidOrdering(f"cannot order by {name!r}: not portably ordered", name)
            if any(c is col for c, _ in keys):
                raise InvalidOrdering(f"field {name!r} appears twice in order_by", field=name)
            keys.append((col, raw.startswith("-")))
        return keys + [(c, False) for c in self._pk if not any(c is k for k, _ in keys)]

    def _pk_values(self, key: Any) -> tuple[Any, ...]:
        if isinstance(key, Mapping):
            values = tuple(key.get(c.key, _MISSING) for c in self._pk)
            if any(v is _MISSING for v in values) or len(key) != len(self._pk):
                names = ", ".join(c.key for c in self._pk)
                raise InvalidFilter(f"key mapping must have exactly: {names}", field=None)
        elif len(self._pk) == 1:
            values = (key,)
        elif isinstance(key, Sequence) and not isinstance(key, str | bytes):
            values = tuple(key)
        else:
            values = ()
        if len(values) != len(self._pk):
            raise InvalidFilter(
                f"table {self.table.name!r} has a composite key "
                f"({', '.join(c.key for c in self._pk)}); got {_short(key)}"
            )
        out = []
        for col, v in zip(self._pk, values, strict=True):
            try:
                out.append(_coerce(col, v))
            except _BadValue as e:
                raise InvalidFilter(f"invalid key value for {col.key}: {e}", col.key) from None
        return tuple(out)

    def _key_conditions(self, names: list[str]) -> list[ColumnElement[bool]]:
        """A key lookup's conditions, its values bound under ``names``."""
        pairs = zip(self._pk, names, strict=True)
        return [c == sa.bindparam(n, type_=c.type) for c, n in pairs]

    def _match_key(self, values: tuple[Any, ...]) -> ColumnElement[bool]:
        return sa.and_(*(c == v for c, v in zip(self._pk, values, strict=True)))

    # -- the public contract

    @telemetry.traced_query("get")
    async def get(
        self, conn: AsyncConnection, key: Any, *, where: ColumnElement[bool] | None = None
    ) -> Row | None:
        """The row whose primary key is ``key``, or ``None``.

        ``key`` is the value for a one-column key, a tuple in key-column order
        or a mapping by column key for a composite one.  A key of the wrong
        type raises :class:`InvalidFilter`.
        """
        stmt, params = self._prepared(
            "get",
            None,
            where,
            conn.dialect.name,
            lambda conds: self._select().where(*conds),
            values=self._pk_values(key),
            conditions=self._key_conditions,
        )
        rows = self._rows(await conn.execute(stmt, params))
        return rows[0] if rows else None

    @telemetry.traced_query("get_many")
    async def get_many(
        self,
        conn: AsyncConnection,
        keys: Iterable[Any],
        *,
        where: ColumnElement[bool] | None = None,
    ) -> Rows:
        """The rows found for ``keys`` (missing keys are skipped), in primary-key order."""
        wanted = list(dict.fromkeys(self._pk_values(k) for k in keys))
        found: Rows = []
        for i in range(0, len(wanted), _GET_MANY_CHUNK):
            chunk = wanted[i : i + _GET_MANY_CHUNK]
            stmt = self._select().where(sa.or_(*(self._match_key(k) for k in chunk)))
            found += self._rows(await conn.execute(stmt.where(*_also(where))))
        # Python's order of one key type is code-point/numeric order, as in _ordered.
        found.sort(key=lambda r: tuple(r[c.key] for c in self._pk))
        return found

    @telemetry.traced_query("list")
    async def list(
        self,
        conn: AsyncConnection,
        filters: Filters = None,
        *,
        order_by: str | Sequence[str] | None = None,
        limit: int | None = None,
        offset: int | None = None,
        where: ColumnElement[bool] | None = None,
    ) -> Rows:
        """Rows matching ``filters`` and ``where``.

        ``order_by`` names fields, ``"-field"`` for descending; the primary key
        is always appended so the order is total (no ``order_by``: key order).
        ``limit`` is 1..MAX_LIMIT or ``None`` for no limit (only for sets the
        repository knows are small); ``offset`` 0..2**31-1.  Raises
        :class:`InvalidFilter`, :class:`InvalidOrdering` or
        :class:`InvalidPagination`.
        """
        _check_limit(limit, optional=True)
        if offset is not None and (
            not isinstance(offset, int)
            or isinstance(offset, bool)
            or not 0 <= offset <= _MAX_OFFSET
        ):
            raise InvalidPagination(f"offset must be an int in 0..{_MAX_OFFSET}, got {offset!r}")
        dialect = conn.dialect.name
        keys = self._keys(order_by)
        deep = offset is not None and offset >= _DEEP_OFFSET
        stmt, params = self._prepared(
            ("list", tuple((k.key, d) for k, d in keys), limit is None, offset is None, deep),
            filters,
            where,
            dialect,
            lambda conds: _sliced(
                self._select().where(*conds).order_by(*(_sort(k, dialect) for k in keys)),
                limit=limit is not None,
                offset=offset is not None,
            ),
        )
        if limit is not None:
            params[_LIMIT] = limit
        if offset is not None:
            params[_OFFSET] = offset
        return self._rows(await conn.execute(stmt, params))

    @telemetry.traced_query("count")
    async def count(
        self,
        conn: AsyncConnection,
        filters: Filters = None,
        *,
        where: ColumnElement[bool] | None = None,
    ) -> int:
        """How many rows match ``filters`` and ``where``."""
        stmt, params = self._prepared(
            "count",
            filters,
            where,
            conn.dialect.name,
            lambda conds: sa.select(sa.func.count()).select_from(self.table).where(*conds),
        )
        return int((await conn.execute(stmt, params)).scalar_one())

    @telemetry.traced_query("exists")
    async def exists(
        self,
        conn: AsyncConnection,
        filters: Filters = None,
        *,
        where: ColumnElement[bool] | None = None,
    ) -> bool:
        """Whether any row matches ``filters`` and ``where``."""
        inner = sa.select(sa.literal(1)).select_from(self.table)
        inner = inner.where(*self._where(self.filters(filters), where, conn.dialect.name))
        return bool((await conn.execute(sa.select(inner.exists()))).scalar_one())

    @telemetry.traced_query("page")
    async def page(
        self,
        conn: AsyncConnection,
        filters: Filters = None,
        *,
        order_by: str | Sequence[str] | None = None,
        after: str | None = None,
        limit: int,
        where: ColumnElement[bool] | None = None,
    ) -> Page:
        """One page of at most ``limit`` rows, after the row ``after`` points at.

        Ordered as :meth:`list` orders (primary key appended; NULL sorts
        greater than every value), so walking the pages with the same filters
        yields exactly ``list``'s rows.  Pass ``next_cursor`` back as
        ``after`` with the same ``order_by``; rows inserted or deleted between
        calls shift nothing (keyset, not offset).  A cursor from another table
        or ordering, or altered, raises :class:`InvalidCursor`.
        """
        _check_limit(limit, optional=False)
        dialect = conn.dialect.name
        keys = self._keys(order_by)
        position = None if after is None else self._decode(after, keys)

        def after_cursor(names: list[str]) -> list[ColumnElement[bool]]:
            if position is None:
                return []
            bound = iter(names)
            return [
                _after(
                    keys, position, dialect, lambda c, _: sa.bindparam(next(bound), type_=c.type)
                )
            ]

        stmt, params = self._prepared(
            (
                "page",
                tuple((k.key, d) for k, d in keys),
                None if position is None else tuple(v is None for v in position),
            ),
            filters,
            where,
            dialect,
            lambda conds: _sliced(
                self._select().where(*conds).order_by(*(_sort(k, dialect) for k in keys)),
                limit=True,
                offset=False,
            ),
            values=() if position is None else [v for v in position if v is not None],
            conditions=after_cursor,
        )
        # One row past the page tells whether another follows.
        params[_LIMIT] = limit + 1
        rows = self._rows(await conn.execute(stmt, params))
        items = rows[:limit]
        cursor = self._encode(keys, items[-1]) if len(rows) > limit else None
        return Page(items, cursor)

    # -- cursors

    def _sign(self, keys: Sequence[Key], values: Sequence[Any]) -> str:
        spec = [self.table.fullname, [("-" if d else "") + c.key for c, d in keys], list(values)]
        blob = json.dumps([_CURSOR_VERSION, spec], separators=(",", ":")).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()

    def _encode(self, keys: Sequence[Key], row: Row) -> str:
        values = [_json_value(c, row[c.key]) for c, _ in keys]
        body = json.dumps([_CURSOR_VERSION, values, self._sign(keys, values)])
        return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    def _decode(self, cursor: str, keys: Sequence[Key]) -> _Values:
        if not isinstance(cursor, str) or not 0 < len(cursor) <= _MAX_CURSOR:
            raise InvalidCursor("cursor must be a non-empty string from a previous page")
        try:
            body = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            version, values, checksum = json.loads(body)
        except (ValueError, TypeError, binascii.Error, RecursionError):
            raise InvalidCursor("malformed cursor") from None
        if version != _CURSOR_VERSION:
            raise InvalidCursor(f"unsupported cursor version {_short(version)}")
        if not isinstance(values, list) or len(values) != len(keys):
            raise InvalidCursor("cursor does not match this ordering")
        if checksum != self._sign(keys, values):
            raise InvalidCursor("cursor was altered or belongs to another table or ordering")
        out: _Values = []
        for (col, _), raw in zip(keys, values, strict=True):
            if raw is None and col.nullable:
                out.append(None)
                continue
            try:
                out.append(_coerce(col, _from_json(col, raw)))
            except (_BadValue, ValueError, TypeError, OverflowError) as e:
                raise InvalidCursor(f"cursor value for {col.key} is invalid: {e}") from None
        return out


_MISSING: Final = object()


def _dicts_of(keys: tuple[str, ...]) -> Callable[[Sequence[Any]], Rows]:
    """A function turning rows of the columns ``keys`` into dicts keyed by column.

    Generated, as ``namedtuple`` generates its class: a comprehension unpacking each row
    into a dict display with constant keys builds each dict at its size, where
    ``dict(zip(keys, row))`` grew it key by key. ~5,300 against ~10,300 instructions
    a row of 13 columns (callgrind, a keyset page of tasks on PostgreSQL). The keys
    are written as string literals (``repr``), the values as ``v0``, ``v1``, ..."""
    names = [f"v{i}" for i in range(len(keys))]
    items = ", ".join(f"{key!r}: {name}" for key, name in zip(keys, names, strict=True))
    source = f"lambda rows: [{{{items}}} for ({', '.join(names)},) in rows]"
    return eval(source, {})  # type: ignore[no-any-return]  # noqa: S307  # see above


def _sliced(select: sa.Select[Any], *, limit: bool, offset: bool) -> sa.Select[Any]:
    """``select`` with a LIMIT and an OFFSET bound as ``tiu_limit`` and ``tiu_offset``,
    where asked: a kept statement serves every page size and position."""
    if limit:
        select = select.limit(sa.bindparam(_LIMIT, type_=sa.Integer))
    if offset:
        select = select.offset(sa.bindparam(_OFFSET, type_=sa.Integer))
    return select


def _check_limit(limit: int | None, *, optional: bool) -> None:
    if limit is None and optional:
        return
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidPagination(f"limit must be an int in 1..{MAX_LIMIT}, got {limit!r}")


def _also(where: ColumnElement[bool] | None) -> list[ColumnElement[bool]]:
    return [] if where is None else [where]
