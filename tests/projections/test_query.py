"""The generic read-model query layer, on SQLite and PostgreSQL.

Each test gets a freshly created, populated ``tasks`` table (and a composite-key
``members`` table) in a throwaway SQLite file or PostgreSQL schema.  A plain
Python reference over the same in-memory rows states what every filter and
ordering must return; hypothesis checks the layer against it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import enum
import json
import math
import os
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from projections.errors import (
    InvalidCursor,
    InvalidFilter,
    InvalidOrdering,
    InvalidPagination,
    InvalidQuery,
    ProjectionError,
)
from projections.query import MAX_LIMIT, OPERATORS, Filter, Query, parse_filters

PG_URL = os.environ.get(
    "TIU_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REQUIRE_PG = os.environ.get("TIU_REQUIRE_POSTGRES") == "1"
UTC = dt.UTC
BASE = dt.datetime(2024, 3, 1, 9, 30, tzinfo=UTC)


def make_tables(schema: str | None) -> tuple[sa.MetaData, sa.Table, sa.Table]:
    md = sa.MetaData(schema=schema)
    tasks = sa.Table(
        "tasks",
        md,
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("project_id", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done", sa.Boolean, nullable=False),
        sa.Column("points", sa.Float, nullable=True),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=True),
    )
    members = sa.Table(
        "members",
        md,
        sa.Column("project_id", sa.String(16), primary_key=True),
        sa.Column("user_id", sa.String(16), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
    )
    return md, tasks, members


TITLES = [
    "Alpha", "alpha", "ALPHA beta", "100% done", "1000 things", "a_b", "axb", "a%b",
    "back\\slash", "x' OR 1=1 --", "École", "école", "ÉCOLE", "naïve café", "star*",
    "q?", "[br]", "", " lead", "Zeta", "zeta", "mañana", "日本語", "tab\tx", "new\nline",
    "Alpha", "alpha", "b", "B", "%", "_", "\\", "~tilde", "Ωmega", "omega", "z",
    "line--", "Alpha", "mid_dle%", "end",
]  # fmt: skip
STATUSES = ["todo", "doing", "done", "Done", "todo"]


def sample_rows() -> list[dict[str, Any]]:
    rows = []
    for i, title in enumerate(TITLES):
        rows.append(
            {
                # ids are not in insertion order, and mix cases, so key order matters
                "id": f"{'tT'[i % 2]}{(i * 7) % len(TITLES):02d}",
                "title": title,
                "status": STATUSES[i % len(STATUSES)],
                "priority": (i * 3) % 5 - 1,
                "due_at": None if i % 3 == 0 else BASE + dt.timedelta(days=i % 4, hours=i % 2),
                "project_id": f"p{i % 3}",
                "created_at": BASE + dt.timedelta(minutes=i),
                "done": i % 4 == 0,
                "points": None if i % 5 == 0 else [0.5, 1.25, 2.0, -3.5][i % 4],
                "meta": None if i % 2 else {"n": i},
            }
        )
    return rows


ROWS = sample_rows()
MEMBERS = [
    {"project_id": p, "user_id": u, "role": "owner" if u == "u0" else "member"}
    for p in ("p0", "p1")
    for u in ("u0", "u1", "u2")
]


@dataclass
class Db:
    conn: AsyncConnection
    tasks: sa.Table
    members: sa.Table
    q: Query

    async def ids(self, filters: Any = None, **kw: Any) -> list[str]:
        return [r["id"] for r in await self.q.list(self.conn, filters, **kw)]


async def _connectable(url: str) -> str | None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            await conn.execute(sa.select(1))
    except (OSError, TimeoutError, sa.exc.SQLAlchemyError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        await engine.dispose()
    return None


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    schema = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/q.db"
    else:
        url = PG_URL
        problem = await _connectable(url)
        if problem is not None:
            if REQUIRE_PG:
                pytest.fail(f"PostgreSQL required (TIU_REQUIRE_POSTGRES=1): {problem}")
            pytest.skip(f"PostgreSQL unreachable: {problem}")
        schema = f"q_{secrets.token_hex(6)}"
    engine = create_async_engine(url, poolclass=NullPool)
    md, tasks, members = make_tables(schema)
    try:
        async with engine.begin() as conn:
            if schema:
                await conn.execute(sa.schema.CreateSchema(schema))
            await conn.run_sync(md.create_all)
            await conn.execute(tasks.insert(), ROWS)
            await conn.execute(members.insert(), MEMBERS)
        async with engine.connect() as conn:
            yield Db(conn, tasks, members, Query(tasks))
    finally:
        if schema:
            async with engine.begin() as conn:
                await conn.execute(sa.schema.DropSchema(schema, cascade=True, if_exists=True))
        await engine.dispose()


# -- the reference: what the module docstring promises, in plain Python ------------------

KIND = {
    "id": "text", "title": "text", "status": "text", "priority": "int",
    "due_at": "datetime", "project_id": "text", "created_at": "datetime",
    "done": "bool", "points": "float", "meta": "opaque",
}  # fmt: skip
ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class Invalid(Exception):
    pass


def ref_scalar(kind: str, v: Any) -> Any:
    if kind == "text" and isinstance(v, str) and "\x00" not in v:
        try:
            v.encode()
        except UnicodeEncodeError:
            raise Invalid from None
        return v
    if kind == "int" and type(v) is int and -(2**31) <= v < 2**31:
        return v
    if kind == "float" and type(v) in (int, float):
        try:
            f = float(v)
        except OverflowError:
            raise Invalid from None
        if math.isfinite(f):
            return f
    if kind == "bool" and isinstance(v, bool):
        return v
    if kind == "datetime" and isinstance(v, dt.datetime) and v.utcoffset() is not None:
        try:
            return v.astimezone(UTC)
        except OverflowError:
            raise Invalid from None
    raise Invalid


def like_regex(pattern: str) -> re.Pattern[str]:
    out, chars = [], iter(pattern)
    for c in chars:
        if c == "\\":
            out.append(re.escape(next(chars)))
        else:
            out.append({"%": ".*", "_": "."}.get(c, re.escape(c)))
    return re.compile("".join(out), re.DOTALL)


def ref_predicate(field: str, op: str, value: Any) -> Any:
    """A predicate over a row, or raise Invalid."""
    kind = KIND[field]
    if op == "isnull":
        if not isinstance(value, bool):
            raise Invalid
        return lambda r: (r[field] is None) == value
    if op in ("eq", "ne") and value is None:
        return lambda r: (r[field] is None) == (op == "eq")
    if kind == "opaque":
        raise Invalid
    if op in ("in", "not_in"):
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
            raise Invalid
        vals = [ref_scalar(kind, v) for v in value]
        if not vals:
            return lambda r: op == "not_in"
        if op == "in":
            return lambda r: r[field] is not None and r[field] in vals
        return lambda r: r[field] is not None and r[field] not in vals
    if op == "between":
        if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 2:
            raise Invalid
        lo, hi = ref_scalar(kind, value[0]), ref_scalar(kind, value[1])
        return lambda r: r[field] is not None and lo <= r[field] <= hi
    if op in ("like", "ilike", "startswith", "contains"):
        if kind != "text":
            raise Invalid
        text = ref_scalar(kind, value)
        if len(text) > 1000 or (op in ("like", "ilike") and re.search(r"(?<!\\)(\\\\)*\\$", text)):
            raise Invalid
        if op == "startswith":
            return lambda r: r[field].startswith(text)
        if op == "contains":
            return lambda r: text in r[field]
        if op == "like":
            return lambda r: like_regex(text).fullmatch(r[field]) is not None
        folded = like_regex(text.translate(ASCII_LOWER))
        return lambda r: folded.fullmatch(r[field].translate(ASCII_LOWER)) is not None
    compare = {
        "eq": lambda a, b: a == b,
        "ne": lambda a, b: a != b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
    }
    if op not in compare:
        raise Invalid
    v = ref_scalar(kind, value)
    return lambda r: r[field] is not None and compare[op](r[field], v)


def ref_filter(rows: list[dict[str, Any]], filters: Mapping[str, Any]) -> set[str]:
    preds = []
    for key, value in filters.items():
        field, sep, op = key.rpartition("__")
        if not sep or (field not in KIND and key in KIND):
            field, op = key, "eq"
        if field not in KIND or op not in OPERATORS:
            raise Invalid
        preds.append(ref_predicate(field, op, value))
    return {r["id"] for r in rows if all(p(r) for p in preds)}


def ref_order(rows: list[dict[str, Any]], order_by: Sequence[str]) -> list[str]:
    """NULL greater than every value; strings by code point; id appended as tie-breaker."""
    keys = [*order_by, *([] if "id" in {k.lstrip("-") for k in order_by} else ["id"])]
    out = list(rows)
    for key in reversed(keys):
        name = key.lstrip("-")
        out.sort(
            key=lambda r: (r[name] is None, 0 if r[name] is None else r[name]),
            reverse=key.startswith("-"),
        )
    return [r["id"] for r in out]


def ids(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    return [r["id"] for r in rows]


# -- filters: each operator, against the reference and by hand -----------------------------

OPERATOR_CASES: list[dict[str, Any]] = [
    {"status": "todo"},
    {"status__eq": "Done"},
    {"status__ne": "todo"},
    {"priority__lt": 1},
    {"priority__lte": 1},
    {"priority__gt": 1},
    {"priority__gte": 3},
    {"points__gt": 0},
    {"points__lte": 1},
    {"title__lt": "B"},
    {"title__gte": "a"},
    {"title__gt": "École"},
    {"due_at__lt": BASE + dt.timedelta(days=2)},
    {"due_at__gte": (BASE + dt.timedelta(days=1)).astimezone(dt.timezone(dt.timedelta(hours=5)))},
    {"status__in": ["todo", "Done"]},
    {"status__in": ("doing",)},
    {"priority__in": {0, 3}},
    {"status__not_in": ["todo", "doing"]},
    {"points__not_in": [0.5]},
    {"points__in": []},
    {"points__not_in": []},
    {"title__like": "Alpha%"},
    {"title__like": "a_b"},
    {"title__like": "a\\_b"},
    {"title__like": "%\\%%"},
    {"title__like": "%\\\\%"},
    {"title__like": "[br]"},
    {"title__like": "star*"},
    {"title__like": "q?"},
    {"title__like": "%"},
    {"title__ilike": "alpha"},
    {"title__ilike": "ALPHA%"},
    {"title__ilike": "école"},
    {"title__ilike": "%COLE"},
    {"title__startswith": "100%"},
    {"title__startswith": "a_"},
    {"title__startswith": "A"},
    {"title__startswith": "\\"},
    {"title__contains": "%"},
    {"title__contains": "_"},
    {"title__contains": "\\"},
    {"title__contains": "' OR 1=1"},
    {"title__contains": "*"},
    {"title__contains": "["},
    {"title__contains": "lph"},
    {"due_at__isnull": True},
    {"due_at__isnull": False},
    {"meta__isnull": False},
    {"due_at": None},
    {"points__ne": None},
    {"meta": None},
    {"priority__between": (0, 2)},
    {"priority__between": [2, 0]},
    {"title__between": ("a", "b")},
    {"done": True},
    {"done__ne": True},
    {"status": "todo", "priority__gte": 1, "due_at__isnull": False},
    {"project_id__in": ["p1", "p2"], "title__ilike": "%a%", "points__lt": 2},
]


@pytest.mark.parametrize("filters", OPERATOR_CASES, ids=",".join)
async def test_each_operator_returns_the_reference_rows(db: Db, filters: dict[str, Any]) -> None:
    expected = ref_filter(ROWS, filters)
    assert set(await db.ids(filters)) == expected
    assert await db.q.count(db.conn, filters) == len(expected)
    assert await db.q.exists(db.conn, filters) is bool(expected)


async def test_one_query_reused_across_values_of_one_shape_returns_each_calls_rows(
    db: Db,
) -> None:
    # Query keeps one statement per shape of call (fields, operators, None/empty-ness,
    # ordering, limit, where): every case runs on one Query, twice and in reverse, so
    # most calls reuse a statement built for other values.
    for filters in [*OPERATOR_CASES, *reversed(OPERATOR_CASES)]:
        expected = ref_filter(ROWS, filters)
        assert set(await db.ids(filters)) == expected, filters
        assert await db.q.count(db.conn, filters) == len(expected), filters
    for project in ("p1", "p2", "p1"):
        for in_list in (["p1"], ["p1", "p2", "p3"], ["p2"]):
            mine = db.tasks.c.project_id == project  # a new where object each time
            got = await db.q.list(db.conn, {"project_id__in": in_list}, where=mine)
            expected = {r["id"] for r in ROWS if r["project_id"] == project} & ref_filter(
                ROWS, {"project_id__in": in_list}
            )
            assert set(ids(got)) == expected


async def test_literal_operators_treat_wildcards_and_quotes_as_text(db: Db) -> None:
    by_title = {r["id"]: r["title"] for r in ROWS}

    async def titles(filters: dict[str, Any]) -> set[str]:
        return {by_title[i] for i in await db.ids(filters)}

    assert await titles({"title__startswith": "100%"}) == {"100% done"}
    assert await titles({"title__contains": "_"}) == {"a_b", "_", "mid_dle%"}
    assert await titles({"title__like": "a_b"}) == {"a_b", "axb", "a%b"}
    assert await titles({"title__contains": "x' OR 1=1 --"}) == {"x' OR 1=1 --"}
    assert await titles({"title": "x' OR 1=1 --"}) == {"x' OR 1=1 --"}
    assert await titles({"title__contains": "\\"}) == {"back\\slash", "\\"}


async def test_like_is_case_sensitive_and_ilike_folds_ascii_only_on_both_backends(
    db: Db,
) -> None:
    by_title = {r["id"]: r["title"] for r in ROWS}

    async def titles(filters: dict[str, Any]) -> set[str]:
        return {by_title[i] for i in await db.ids(filters)}

    assert await titles({"title__like": "alpha"}) == {"alpha"}
    assert await titles({"title__startswith": "a"}) == {"alpha", "a_b", "axb", "a%b"}
    assert await titles({"title__ilike": "alpha"}) == {"Alpha", "alpha"}
    assert await titles({"title__ilike": "%cole"}) == {"École", "école", "ÉCOLE"}
    assert await titles({"title__ilike": "école"}) == {"école"}  # É is not ASCII


async def test_string_ranges_and_ordering_use_code_point_order(db: Db) -> None:
    assert await db.ids(order_by=["title", "id"]) == ref_order(ROWS, ["title"])
    upper_first = {r["id"] for r in ROWS if r["title"] < "a"}
    assert set(await db.ids({"title__lt": "a"})) == upper_first
    assert any(r["title"] == "Zeta" for r in ROWS if r["id"] in upper_first)


async def test_empty_in_matches_nothing_and_empty_not_in_matches_every_row(db: Db) -> None:
    assert await db.ids({"points__in": []}) == []
    assert len(await db.ids({"points__not_in": []})) == len(ROWS)
    assert len(await db.ids({"points__not_in": [99.0]})) == sum(
        r["points"] is not None for r in ROWS
    )


async def test_eq_none_is_null_and_ne_excludes_nulls_like_sql(db: Db) -> None:
    nulls = {r["id"] for r in ROWS if r["due_at"] is None}
    assert set(await db.ids({"due_at": None})) == nulls
    assert set(await db.ids({"due_at__ne": None})) == {r["id"] for r in ROWS} - nulls
    assert not nulls & set(await db.ids({"points__ne": 0.5, "due_at__ne": BASE}))
    assert all(r["points"] is not None for r in await db.q.list(db.conn, {"points__ne": 0.5}))


async def test_parse_filters_returns_checked_normalised_filters() -> None:
    _, tasks, _ = make_tables(None)
    local = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    parsed = parse_filters(
        tasks, {"status": "todo", "priority__in": [1, 2], "due_at__gt": local, "points__lt": 1}
    )
    assert parsed == (
        Filter("status", "eq", "todo"),
        Filter("priority", "in", (1, 2)),
        Filter("due_at", "gt", dt.datetime(2024, 1, 1, 10, tzinfo=UTC)),
        Filter("points", "lt", 1.0),
    )
    assert parse_filters(tasks, None) == ()
    assert parse_filters(tasks, [Filter("title", "contains", "x")]) == (
        Filter("title", "contains", "x"),
    )


class Utc(sa.types.TypeDecorator[dt.datetime]):
    impl = sa.DateTime(timezone=True)
    cache_ok = True


class Colour(enum.Enum):
    RED = "red"


def test_values_are_checked_against_each_column_type_without_string_conversion() -> None:
    t = sa.Table(
        "kinds",
        sa.MetaData(),
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("small", sa.SmallInteger),
        sa.Column("naive", sa.DateTime),
        sa.Column("aware", Utc),
        sa.Column("day", sa.Date),
        sa.Column("amount", sa.Numeric(10, 2)),
        sa.Column("uid", sa.Uuid),
        sa.Column("status", sa.Enum("open", "closed", name="status")),
        sa.Column("colour", sa.Enum(Colour)),
        sa.Column("blob", sa.LargeBinary),
    )
    u = uuid.uuid4()
    good = {
        "id__gt": 2**40,
        "small__lt": 2**15 - 1,
        "naive__lt": dt.datetime(2024, 1, 1),
        "aware__lt": dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        "day__gte": dt.date(2024, 1, 1),
        "amount__gt": Decimal("1.50"),
        "uid": str(u),
        "status__in": ["open"],
        "colour": Colour.RED,
        "blob": b"\x00",
    }
    parsed = {f.field: f.value for f in parse_filters(t, good)}
    assert parsed["aware"] == dt.datetime(2023, 12, 31, 23, tzinfo=UTC)
    assert parsed["uid"] == u
    bad = [
        {"id__gt": 2**63},
        {"small": 2**15},
        {"naive__lt": dt.datetime(2024, 1, 1, tzinfo=UTC)},
        {"aware__lt": dt.datetime(2024, 1, 1)},
        {"day": dt.datetime(2024, 1, 1)},
        {"day": "2024-01-01"},
        {"amount__gt": Decimal("NaN")},
        {"amount": 1.5},
        {"uid": "not-a-uuid"},
        {"status": "pending"},
        {"status__gt": "open"},
        {"status__like": "o%"},
        {"blob": "x"},
    ]
    for filters in bad:
        with pytest.raises(InvalidFilter) as caught:
            parse_filters(t, filters)
        assert caught.value.field == next(iter(filters)).split("__")[0]


async def test_filter_objects_are_checked_like_mappings(db: Db) -> None:
    with pytest.raises(InvalidFilter, match="unknown field 'nope'"):
        await db.q.list(db.conn, [Filter("nope", "eq", 1)])
    assert set(await db.ids([Filter("status", "in", ["todo"])])) == ref_filter(
        ROWS, {"status__in": ["todo"]}
    )


# -- invalid filters ---------------------------------------------------------------

INVALID_CASES: list[tuple[dict[str, Any], str, str | None, str | None]] = [
    ({"emial": "x"}, "unknown field 'emial' on table 'tasks'; valid fields: id, ", "emial", None),
    ({"emial__eq": "x"}, "unknown field 'emial'", "emial", None),
    ({"title__regex": "x"}, "'regex' for field 'title'; valid operators: eq,", "title", "regex"),
    ({"title__": "x"}, "unknown operator '' for field 'title'", "title", ""),
    ({"priority": "abc"}, "priority__eq: expected int, got str 'abc'", "priority", "eq"),
    ({"priority": True}, "expected int, got bool", "priority", "eq"),
    ({"priority": 1.0}, "expected int", "priority", "eq"),
    ({"priority__gt": 2**31}, "outside the column's 32-bit integer range", "priority", "gt"),
    ({"points__gt": float("nan")}, "NaN", "points", "gt"),
    ({"points__gt": 10**400}, "too large", "points", "gt"),
    ({"title": 5}, "expected str", "title", "eq"),
    ({"title": "a\x00b"}, "NUL", "title", "eq"),
    ({"title": "\ud800"}, "not valid Unicode", "title", "eq"),
    ({"due_at__lt": dt.datetime(2024, 1, 1)}, "expected an aware datetime", "due_at", "lt"),
    ({"due_at__lt": "2024-01-01T00:00:00+00:00"}, "expected datetime, got str", "due_at", "lt"),
    ({"done": 1}, "expected bool", "done", "eq"),
    ({"title__lt": None}, "None is only meaningful with eq/ne", "title", "lt"),
    ({"status__in": "todo"}, "expected a non-string iterable", "status", "in"),
    ({"status__in": {"a": 1}}, "expected a non-string iterable", "status", "in"),
    ({"status__in": ["todo", None]}, "None is only meaningful", "status", "in"),
    ({"priority__not_in": [1, "2"]}, "expected int", "priority", "not_in"),
    ({"status__in": ["x"] * 10_001}, "more than 10000 values", "status", "in"),
    ({"priority__between": (1, 2, 3)}, "expected a (low, high) pair", "priority", "between"),
    ({"priority__between": "12"}, "expected a (low, high) pair", "priority", "between"),
    ({"priority__between": (1, None)}, "None is only meaningful", "priority", "between"),
    ({"due_at__isnull": "yes"}, "expected bool", "due_at", "isnull"),
    ({"priority__like": "1%"}, "like applies only to string columns", "priority", "like"),
    ({"priority__contains": 1}, "contains applies only to string columns", "priority", "contains"),
    ({"title__ilike": 5}, "expected str", "title", "ilike"),
    ({"title__like": "abc\\"}, "lone escape character", "title", "like"),
    ({"title__like": "x" * 1001}, "pattern longer than 1000", "title", "like"),
    ({"title__contains": "x" * 1001}, "longer than 1000", "title", "contains"),
    ({"meta": {"n": 1}}, "JSON column supports only isnull, eq None and ne None", "meta", "eq"),
    ({"meta__gt": 1}, "JSON column supports only isnull", "meta", "gt"),
]  # fmt: skip


@pytest.mark.parametrize(("filters", "message", "field", "operator"), INVALID_CASES)
async def test_invalid_filter_names_the_field_and_never_reaches_the_driver(
    db: Db, filters: dict[str, Any], message: str, field: str | None, operator: str | None
) -> None:
    for call in (db.q.list, db.q.count, db.q.exists):
        with pytest.raises(InvalidFilter) as caught:
            await call(db.conn, filters)
        assert message in str(caught.value)
        assert (caught.value.field, caught.value.operator) == (field, operator)


def test_invalid_filter_is_a_value_error_under_the_projection_root() -> None:
    _, tasks, _ = make_tables(None)
    with pytest.raises(InvalidFilter) as caught:
        parse_filters(tasks, {"title__regex": "x"})
    error = caught.value
    assert isinstance(error, ValueError)
    assert isinstance(error, InvalidQuery)
    assert isinstance(error, ProjectionError)
    assert error.reason == str(error)
    assert ", ".join(OPERATORS) in str(error)
    for cls in (InvalidCursor, InvalidOrdering, InvalidPagination):
        assert issubclass(cls, ValueError)
        assert issubclass(cls, ProjectionError)


async def test_fields_restrict_what_filters_and_order_by_may_name(db: Db) -> None:
    q = Query(db.tasks, fields=["id", "title", "status"])
    with pytest.raises(InvalidFilter) as caught:
        await q.list(db.conn, {"priority__gt": 1})
    assert "priority" not in str(caught.value).split("valid fields:")[1]
    with pytest.raises(InvalidOrdering):
        await q.list(db.conn, order_by=["-priority"])
    assert await q.get(db.conn, ROWS[0]["id"]) is not None
    with pytest.raises(ValueError, match="not on table"):
        Query(db.tasks, fields=["title", "nope"])


async def test_an_unknown_name_of_any_size_is_refused_in_a_short_message_that_keeps_it(
    db: Db,
) -> None:
    huge = "x" * 100_000
    q = Query(db.tasks)
    for filters, order_by, error in (
        ({f"{huge}__eq": 1}, None, InvalidFilter),
        ({f"title__{huge}": 1}, None, InvalidFilter),
        (None, [huge], InvalidOrdering),
    ):
        with pytest.raises(error) as caught:
            await q.list(db.conn, filters, order_by=order_by)
        assert len(str(caught.value)) < 2_000
        assert huge in (caught.value.field, caught.value.operator)


# -- ordering, limit, offset ------------------------------------------------------------

ORDERINGS = [
    [],
    ["title"],
    ["-title"],
    ["priority"],
    ["-priority", "title"],
    ["status", "-created_at"],
    ["due_at"],
    ["-due_at", "priority"],
    ["-points", "-due_at"],
    ["done", "-id"],
    ["project_id", "-priority", "due_at"],
]


@pytest.mark.parametrize("order_by", ORDERINGS, ids=lambda o: ",".join(o) or "pk")
async def test_list_orders_as_documented_with_the_key_as_tie_breaker(
    db: Db, order_by: list[str]
) -> None:
    assert await db.ids(order_by=order_by) == ref_order(ROWS, order_by)


async def test_limit_and_offset_slice_the_ordered_list(db: Db) -> None:
    order = ref_order(ROWS, ["-priority", "due_at"])
    for offset in (0, 1, 7, 39, 40, 100):
        got = await db.ids(order_by=["-priority", "due_at"], limit=5, offset=offset)
        assert got == order[offset : offset + 5]
    assert await db.ids(order_by="title", offset=35) == ref_order(ROWS, ["title"])[35:]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0},
        {"limit": -1},
        {"limit": MAX_LIMIT + 1},
        {"limit": True},
        {"limit": "5"},
        {"offset": -1},
        {"offset": 2**31},
        {"offset": 1.5},
    ],
)
async def test_out_of_range_limit_or_offset_is_rejected(db: Db, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidPagination):
        await db.q.list(db.conn, **kwargs)


@pytest.mark.parametrize(
    ("order_by", "message"),
    [
        (["nope"], "cannot order by unknown field 'nope'"),
        (["-nope"], "unknown field 'nope'"),
        (["title", "-title"], "appears twice"),
        (["meta"], "not portably ordered"),
        ([""], "unknown field ''"),
        ([3], "must be str"),
    ],
)
async def test_bad_order_by_raises_invalid_ordering(
    db: Db, order_by: list[Any], message: str
) -> None:
    with pytest.raises(InvalidOrdering, match=message):
        await db.q.list(db.conn, order_by=order_by)
    with pytest.raises(InvalidOrdering, match=message):
        await db.q.page(db.conn, order_by=order_by, limit=5)


# -- get, get_many, count, exists -----------------------------------------------------


def normalised(row: Mapping[str, Any]) -> dict[str, Any]:
    """SQLite hands DateTime(timezone=True) back naive (in UTC); compare as aware."""
    return {
        k: v.replace(tzinfo=UTC) if isinstance(v, dt.datetime) and v.tzinfo is None else v
        for k, v in row.items()
    }


async def test_get_returns_the_row_as_a_dict_or_none(db: Db) -> None:
    row = await db.q.get(db.conn, ROWS[4]["id"])
    assert type(row) is dict
    assert normalised(row) == ROWS[4]
    assert list(row) == list(db.tasks.c.keys())
    assert await db.q.get(db.conn, "missing") is None
    with pytest.raises(InvalidFilter, match="invalid key value for id"):
        await db.q.get(db.conn, 123)


async def test_get_builds_one_statement_per_where_and_binds_each_key(db: Db) -> None:
    # A point lookup is what every repository write returns through: its statement
    # (the key bound, the repository's cached where) is built once, not per call.
    mine = db.tasks.c.project_id == "p1"
    for row in [*ROWS[:12], *ROWS[:12]]:
        got = await db.q.get(db.conn, row["id"], where=mine)
        assert (normalised(got) if got else None) == (row if row["project_id"] == "p1" else None)
    composite = Query(db.members)
    for member in [*MEMBERS, *MEMBERS]:
        assert await composite.get(db.conn, (member["project_id"], member["user_id"])) == member
    assert len(db.q._statements) == len(composite._statements) == 1


async def test_lists_and_pages_of_any_size_and_position_share_one_statement_per_shape(
    db: Db,
) -> None:
    # A limit and an offset are bound values: a service paging by offset, or taking a
    # page size from its caller, builds no statement per page and never fills the cache.
    q = Query(db.tasks)
    ordered = ref_order(ROWS, ["priority"])
    for limit in range(1, 8):
        for offset in range(0, len(ROWS), 5):
            got = await q.list(db.conn, {}, order_by="priority", limit=limit, offset=offset)
            assert [r["id"] for r in got] == ordered[offset : offset + limit]
    for limit in range(1, 8):
        assert await walk(q, db.conn, {}, ["priority"], limit) == ordered
    # The list's, the first page's, and later pages' (no cursor value is None: priority
    # is never NULL).
    assert len(q._statements) == 3


async def test_get_and_get_many_with_a_composite_key(db: Db) -> None:
    q = Query(db.members)
    assert await q.get(db.conn, ("p1", "u0")) == {
        "project_id": "p1",
        "user_id": "u0",
        "role": "owner",
    }
    assert await q.get(db.conn, {"user_id": "u2", "project_id": "p0"}) == MEMBERS[2]
    assert await q.get(db.conn, ("p9", "u0")) is None
    found = await q.get_many(db.conn, [("p1", "u2"), ("p0", "u1"), ("p1", "u2"), ("p7", "u1")])
    assert found == [MEMBERS[1], MEMBERS[5]]
    for bad in ["p1", ("p1",), ("p1", "u1", "x"), {"project_id": "p1"}]:
        with pytest.raises(InvalidFilter, match=r"composite key|exactly"):
            await q.get(db.conn, bad)


async def test_get_many_returns_found_rows_in_key_order(db: Db) -> None:
    wanted = [ROWS[9]["id"], "missing", ROWS[2]["id"], ROWS[30]["id"], ROWS[2]["id"]]
    assert ids(await db.q.get_many(db.conn, wanted)) == sorted({*wanted} - {"missing"})
    assert await db.q.get_many(db.conn, []) == []
    many = [r["id"] for r in ROWS] * 30  # more keys than one statement carries
    assert ids(await db.q.get_many(db.conn, many)) == sorted(r["id"] for r in ROWS)


async def test_count_and_exists(db: Db) -> None:
    assert await db.q.count(db.conn) == len(ROWS)
    assert await db.q.exists(db.conn) is True
    assert await db.q.count(db.conn, {"status": "nope"}) == 0
    assert await db.q.exists(db.conn, {"status": "nope"}) is False


# -- access control through `where` ------------------------------------------------------


async def test_filters_can_only_narrow_the_repositorys_where(db: Db) -> None:
    tasks = db.tasks
    mine = tasks.c.project_id == "p1"
    p1 = {r["id"] for r in ROWS if r["project_id"] == "p1"}
    q, c = db.q, db.conn
    assert set(ids(await q.list(c, where=mine))) == p1
    assert await q.list(c, {"project_id": "p2"}, where=mine) == []
    assert set(ids(await q.list(c, {"project_id__in": ["p1", "p2"]}, where=mine))) == p1
    assert set(ids(await q.list(c, {"project_id__ne": "p1"}, where=mine))) == set()
    injected = {"project_id": "p1' OR '1'='1", "title__like": "%' OR 1=1 --"}
    assert await q.list(c, injected, where=mine) == []
    assert await q.count(c, {"project_id": "p2"}, where=mine) == 0
    assert await q.exists(c, {"project_id__in": ["p0", "p2"]}, where=mine) is False
    other = next(r["id"] for r in ROWS if r["project_id"] == "p2")
    assert await q.get(c, other, where=mine) is None
    assert await q.get_many(c, [other], where=mine) == []
    walked = await walk(q, c, {}, ["title"], 4, where=mine)
    assert set(walked) == p1


# -- keyset pages ----------------------------------------------------------------------


async def walk(
    q: Query,
    conn: AsyncConnection,
    filters: Mapping[str, Any],
    order_by: Sequence[str],
    limit: int,
    where: Any = None,
) -> list[str]:
    out: list[str] = []
    after = None
    for _ in range(len(ROWS) + 2):
        page = await q.page(conn, filters, order_by=order_by, after=after, limit=limit, where=where)
        assert len(page.items) <= limit
        out += ids(page.items)
        if page.next_cursor is None:
            return out
        assert page.items
        after = page.next_cursor
    raise AssertionError("pages never ended")


@pytest.mark.parametrize("order_by", ORDERINGS, ids=lambda o: ",".join(o) or "pk")
async def test_walking_pages_yields_exactly_the_ordered_list(db: Db, order_by: list[str]) -> None:
    # priority, status, due_at (NULLs) and points (NULLs) all repeat values.
    for limit in (1, 3, 40):
        assert await walk(db.q, db.conn, {}, order_by, limit) == ref_order(ROWS, order_by)
    filters = {"status__in": ["todo", "done"], "due_at__isnull": False}
    expected = [i for i in ref_order(ROWS, order_by) if i in ref_filter(ROWS, filters)]
    assert await walk(db.q, db.conn, filters, order_by, 2) == expected


async def test_walking_pages_builds_one_statement_per_shape_and_binds_each_cursor(
    db: Db,
) -> None:
    # A page is a list's statement plus the cursor's condition: kept per shape (the
    # first page; later pages, by which cursor values are None), its values bound, so
    # walking many pages builds few statements and each page is the list's slice.
    q = Query(db.tasks)
    filters = {"status__in": ["todo", "done"]}
    expected = [i for i in ref_order(ROWS, ["due_at"]) if i in ref_filter(ROWS, filters)]
    for _ in range(2):
        assert await walk(q, db.conn, filters, ["due_at"], 2) == expected
    # due_at is nullable: a cursor on a row without one is a shape of its own.
    assert len(q._statements) == 3


async def test_last_page_has_no_cursor_and_an_exact_fit_ends_cleanly(db: Db) -> None:
    page = await db.q.page(db.conn, order_by=["-priority"], limit=len(ROWS))
    assert len(page.items) == len(ROWS)
    assert page.next_cursor is None
    empty = await db.q.page(db.conn, {"status": "nope"}, limit=5)
    assert empty.items == []
    assert empty.next_cursor is None


async def test_cursor_is_url_safe_and_keeps_its_place_when_rows_change(db: Db) -> None:
    first = await db.q.page(db.conn, order_by=["created_at"], limit=5)
    cursor = first.next_cursor
    assert cursor is not None
    assert re.fullmatch(r"[A-Za-z0-9_-]+", cursor)
    await db.conn.execute(db.tasks.delete().where(db.tasks.c.id == first.items[-1]["id"]))
    second = await db.q.page(db.conn, order_by=["created_at"], after=cursor, limit=5)
    assert ids(second.items) == ref_order(ROWS, ["created_at"])[5:10]
    await db.conn.rollback()


def _retagged(cursor: str, mutate: Any) -> str:
    body = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    return base64.urlsafe_b64encode(json.dumps(mutate(body)).encode()).decode().rstrip("=")


async def test_tampered_malformed_or_foreign_cursors_raise_invalid_cursor(db: Db) -> None:
    q, c = db.q, db.conn
    page = await q.page(c, order_by=["-priority", "due_at"], limit=3)
    cursor = page.next_cursor
    assert cursor is not None

    def flip(i: int) -> str:
        return cursor[:i] + ("A" if cursor[i] != "A" else "B") + cursor[i + 1 :]

    def set_values(values: list[Any]) -> Any:
        return lambda body: [body[0], values, body[2]]

    bad = [
        flip(len(cursor) // 2),
        flip(5),
        cursor[:-4],
        "",
        "!!!",
        "x" * 5000,
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b'{"a": 1}').decode(),
        _retagged(cursor, lambda b: [2, b[1], b[2]]),
        _retagged(cursor, set_values([99, None, "zz"])),
        _retagged(cursor, lambda b: [b[0], b[1][:2], b[2]]),
        base64.urlsafe_b64encode(b"[" * 3000).decode(),
    ]
    for after in bad:
        with pytest.raises(InvalidCursor):
            await q.page(c, order_by=["-priority", "due_at"], after=after, limit=3)
    with pytest.raises(InvalidCursor, match="another table or ordering"):
        await q.page(c, order_by=["priority", "due_at"], after=cursor, limit=3)
    with pytest.raises(InvalidCursor):
        await q.page(c, order_by=["-priority"], after=cursor, limit=3)
    members_cursor = (await Query(db.members).page(c, limit=1)).next_cursor
    assert members_cursor is not None
    with pytest.raises(InvalidCursor):
        await q.page(c, order_by=["-priority", "due_at"], after=members_cursor, limit=3)


async def test_a_cursor_with_a_valid_checksum_is_still_type_checked(db: Db) -> None:
    """The checksum is not a secret: a recomputed one must not let bad values through."""
    q, c = db.q, db.conn
    keys = q._keys(["priority"])  # forging needs the internals
    for values in ([2**40, "t00"], ["high", "t00"], [1, None], [True, "t00"]):
        forged = _retagged("W10", lambda _, v=values: [1, v, q._sign(keys, v)])
        with pytest.raises(InvalidCursor, match="invalid"):
            await q.page(c, order_by=["priority"], after=forged, limit=3)


@pytest.mark.parametrize("limit", [0, MAX_LIMIT + 1, None])
async def test_page_requires_a_limit_in_range(db: Db, limit: Any) -> None:
    with pytest.raises(InvalidPagination):
        await db.q.page(db.conn, limit=limit)


# -- properties ------------------------------------------------------------------------

PATTERN_OPS = ["like", "ilike", "startswith", "contains"]
FRAGMENTS = [
    "x' OR 1=1 --", "'; DROP TABLE tasks; --", "%", "_", "\\", "\\%", "%\\", "a\\", "*", "?",
    "[", "]", "[br]", "\"", "\x00", "\ud800", "é", "É", "cole", "Alpha", "alpha", "ALPHA",
    "todo", "Done", "p1", "",
]  # fmt: skip
texts = st.one_of(
    st.sampled_from(FRAGMENTS + TITLES),
    st.lists(st.sampled_from(FRAGMENTS + list("aAbBlLpPhHx ")), max_size=4).map("".join),
    st.text(max_size=5),
)
scalars = st.one_of(
    texts,
    st.integers(-3, 5),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.sampled_from([r["due_at"] for r in ROWS if r["due_at"]] + [BASE, BASE.replace(tzinfo=None)]),
    st.datetimes(timezones=st.sampled_from([None, UTC, dt.timezone(dt.timedelta(hours=-7))])),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.tuples(scalars, scalars),
    st.sets(st.integers(-2, 4), max_size=3),
    st.dictionaries(st.text(max_size=2), scalars, max_size=2),
)
datetimes = st.one_of(
    st.sampled_from([r["due_at"] for r in ROWS if r["due_at"]] + [BASE]),
    st.datetimes(timezones=st.sampled_from([UTC, dt.timezone(dt.timedelta(hours=-7))])),
)
FITTING = {
    "text": texts,
    "int": st.integers(-3, 5),
    "float": st.one_of(
        st.sampled_from([0.5, 1.25, 2.0, -3.5]), st.floats(-5, 5), st.integers(-4, 4)
    ),
    "bool": st.booleans(),
    "datetime": datetimes,
    "opaque": st.none(),
}


@st.composite
def filter_items(draw: st.DrawFn) -> tuple[str, Any]:
    """Mostly well-typed values for the drawn field and operator, sometimes anything."""
    field = draw(st.sampled_from([*KIND] * 5 + ["nope", "title__x"]))
    kind = KIND.get(field, "text")
    fitting_ops = [op for op in OPERATORS if kind == "text" or op not in PATTERN_OPS]
    op = draw(st.sampled_from([None, *fitting_ops] * 3 + [*PATTERN_OPS, "regex", ""]))
    fitting = FITTING[kind]
    shaped = {
        "in": st.lists(fitting, max_size=4),
        "not_in": st.lists(fitting, max_size=4),
        "between": st.tuples(fitting, fitting),
        "isnull": st.booleans(),
    }.get(op or "eq", fitting)
    well_typed = draw(st.sampled_from([True] * 5 + [False]))
    value = draw(shaped if well_typed else values)
    return (field if op is None else f"{field}__{op}"), value


filter_maps = st.lists(filter_items(), min_size=1, max_size=2).map(dict)
PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("TIU_QUERY_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@PROPERTY_SETTINGS
@given(filters=filter_maps)
async def test_generated_filters_match_the_reference_or_raise_invalid_filter(
    db: Db, filters: dict[str, Any]
) -> None:
    try:
        expected: set[str] | None = ref_filter(ROWS, filters)
    except Invalid:
        expected = None
    try:
        got: set[str] | None = set(await db.ids(filters))
    except InvalidFilter:
        got = None
    event("valid" if expected is not None else "invalid")
    event(f"rows: {'-' if expected is None else min(len(expected), 2)}")
    assert got == expected
    if expected is not None:
        assert await db.q.count(db.conn, filters) == len(expected)


orderable = ["title", "status", "priority", "due_at", "project_id", "created_at", "done", "points"]
orderings = st.lists(st.sampled_from(orderable), unique=True, max_size=3).flatmap(
    lambda names: st.tuples(*(st.sampled_from([n, "-" + n]) for n in names)).map(list)
)


@PROPERTY_SETTINGS
@given(
    order_by=orderings,
    limit=st.integers(1, 9),
    filters=st.sampled_from(
        [{}, {"status": "todo"}, {"points__gte": 0}, {"due_at__isnull": False}]
    ),
)
async def test_generated_orderings_page_exactly_like_the_reference(
    db: Db, order_by: list[str], limit: int, filters: dict[str, Any]
) -> None:
    matching = ref_filter(ROWS, filters)
    expected = [i for i in ref_order(ROWS, order_by) if i in matching]
    assert await db.ids(filters, order_by=order_by) == expected
    assert await walk(db.q, db.conn, filters, order_by, limit) == expected
