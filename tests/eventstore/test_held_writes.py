"""PostgreSQL: writes a unit of work holds back (``eventstore.prepared.Deferred``) and
sends with its append in one statement (``tiu_command``) write exactly the rows
``conn.execute`` writes, in the order they were made, with the same errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Boolean, Column, Integer, MetaData, String, Table, insert, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from eventstore import EventStore
from eventstore.errors import CommandInFlight
from eventstore.prepared import execute, held_back
from eventstore.records import NewEvent
from eventstore.types import JsonDocument, UTCDateTime

pytestmark = pytest.mark.postgres


@pytest.fixture
async def twins(postgres_engine: AsyncEngine) -> AsyncIterator[tuple[Table, Table]]:
    """Two identical tables: one written by SQLAlchemy, one by held writes."""
    metadata = MetaData()
    suffix = uuid.uuid4().hex[:8]
    tables = tuple(
        Table(
            f"held_{name}_{suffix}",
            metadata,
            Column("id", String(64), primary_key=True),
            Column("label", String(200)),
            Column("count", Integer, nullable=False),
            Column("flag", Boolean, nullable=False),
            Column("at", UTCDateTime),
            Column("doc", JsonDocument),
        )
        for name in ("sa", "held")
    )
    async with postgres_engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield tables  # type: ignore[misc]
    async with postgres_engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)


async def _rows(engine: AsyncEngine, table: Table) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        result = await conn.exec_driver_sql(f"SELECT * FROM {table.name} ORDER BY id")
        return [tuple(r) for r in result]


_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=30)
_row = st.fixed_dictionaries(
    {
        "id": st.uuids().map(str),
        "label": st.none() | _text,
        "count": st.integers(-(2**31), 2**31 - 1),
        "flag": st.booleans(),
        "at": st.none()
        | st.datetimes(
            min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
        ).map(lambda d: d.astimezone(timezone(timedelta(hours=5)))),
        "doc": st.none()
        | st.dictionaries(_text, st.none() | st.integers(-(2**53), 2**53) | _text, max_size=3),
    }
)
_INSERTS: dict[str, object] = {}


def _insert(table: Table) -> object:
    return _INSERTS.setdefault(table.name, insert(table))


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=st.lists(_row, min_size=1, max_size=4, unique_by=lambda r: r["id"]))
async def test_rows_sent_with_the_append_equal_rows_written_by_sqlalchemy(
    postgres_engine, twins, rows
):
    by_sa, held_table = twins
    store = EventStore(postgres_engine)
    try:
        async with postgres_engine.begin() as conn:
            await conn.execute(by_sa.delete())
            await conn.execute(held_table.delete())
            for row in rows:
                await conn.execute(_insert(by_sa), row)
        async with store.transaction() as uow:
            assert uow.held is not None
            with uow.held.taking_from(None):
                for row in rows:
                    assert await execute(uow.conn, _insert(held_table), row) == -1
            assert len(uow.held.statements) == len(rows), "every row held for the append"
            uow.append("task-t1", "task", [NewEvent("Noted", {"n": 1})])
        assert uow.committed, "one statement outside a transaction: no COMMIT to send"
    finally:
        await store.aclose()
    assert await _rows(postgres_engine, held_table) == await _rows(postgres_engine, by_sa)


async def test_a_statement_that_cannot_wait_runs_after_what_is_held(postgres_engine, twins):
    """An executemany is never held: the rows held before it are written first, so it
    finds them (here it updates a row a held insert wrote)."""
    _, table = twins
    bump = update(table).where(table.c.id == "a").values(count=table.c.count + 1)
    store = EventStore(postgres_engine)
    try:
        async with store.transaction() as uow:
            assert uow.held is not None
            with uow.held.taking_from(None):
                await execute(uow.conn, _insert(table), {"id": "a", "count": 1, "flag": True})
                assert len(uow.held.statements) == 1
                await execute(uow.conn, bump, [{}, {}])  # executemany: runs now
            assert uow.held.statements == []
    finally:
        await store.aclose()
    assert [r[:3] for r in await _rows(postgres_engine, table)] == [("a", None, 3)]


async def test_a_held_write_that_must_change_a_row_and_does_not_rolls_back_the_append(
    postgres_engine, twins
):
    _, table = twins
    async with postgres_engine.begin() as conn:
        await conn.execute(_insert(table), {"id": "taken", "count": 0, "flag": True})
    store = EventStore(postgres_engine)
    missing = CommandInFlight("c1")
    try:
        with pytest.raises(CommandInFlight) as raised:
            async with store.transaction() as uow:
                await execute(
                    uow.conn,
                    _insert_ignoring(table),
                    {"id": "taken", "count": 1, "flag": False},
                    none_changed=missing,
                )
                assert uow.held is not None and len(uow.held.statements) == 1
                uow.append("task-t2", "task", [NewEvent("Noted", {"n": 1})])
        assert raised.value is missing
        async with postgres_engine.connect() as conn:
            events = await store.read_stream(conn, "task-t2")
    finally:
        await store.aclose()
    assert events == []


_IGNORING: dict[str, object] = {}


def _insert_ignoring(table: Table) -> object:
    return _IGNORING.setdefault(table.name, pg_insert(table).on_conflict_do_nothing())


async def test_a_connection_holds_no_write_back_once_its_transaction_ends_however_it_ends(
    postgres_engine, twins
):
    """What a connection holds back is looked up by the connection itself (a caller's
    connection outlives the transaction): once the block has ended, committed, raised or
    cancelled, a write on it that must change a row runs at once, not held for an
    append that will never come."""
    _, table = twins
    store = EventStore(postgres_engine)
    try:
        async with postgres_engine.connect() as conn:
            async with store.transaction(conn=conn, keep_open=True) as uow:
                assert held_back(conn) is uow.held is not None
            row = {"id": "after", "count": 1, "flag": True}
            assert await execute(conn, _insert(table), row, none_changed=CommandInFlight("c")) == 1
            await conn.rollback()
        async with postgres_engine.connect() as conn:
            with pytest.raises(LookupError):
                async with store.transaction(conn=conn, keep_open=True):
                    raise LookupError
            assert held_back(conn) is None
        inside: asyncio.Future[AsyncConnection] = asyncio.get_running_loop().create_future()

        async def waiting() -> None:
            async with store.transaction() as uow:
                inside.set_result(uow.conn)
                await asyncio.Event().wait()

        task = asyncio.create_task(waiting())
        conn = await inside
        assert held_back(conn) is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert held_back(conn) is None
    finally:
        await store.aclose()
