"""``eventstore.prepared.execute``: prebuilt DML on the driver must be indistinguishable
from ``conn.execute``: the same rows, row counts, errors and transaction."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    exc,
    insert,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore import NewEvent, StoreUnavailable, TransactionConflict
from eventstore.dialects import pooled
from eventstore.prepared import execute
from eventstore.translate import translate_errors
from eventstore.types import JsonDocument, UTCDateTime


def _twin(metadata: MetaData, name: str, *extra: Column[str]) -> Table:
    return Table(
        name,
        metadata,
        Column("id", String(64), primary_key=True),
        Column("label", String(200)),
        Column("count", Integer, nullable=False),
        Column("flag", Boolean, nullable=False),
        Column("at", UTCDateTime),
        Column("doc", JsonDocument),
        *extra,
    )


@pytest.fixture
async def twins(engine: AsyncEngine) -> AsyncIterator[tuple[Table, Table, Table]]:
    """Two identical tables: one written by SQLAlchemy, one by ``execute``."""
    metadata = MetaData()
    suffix = uuid.uuid4().hex[:8]
    tables = (
        _twin(metadata, f"prep_sa_{suffix}"),
        _twin(metadata, f"prep_drv_{suffix}"),
        _twin(metadata, f"prep_def_{suffix}", Column("stamped", String(20), default=_stamp)),
    )
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield tables
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)


def _stamp() -> str:
    return "by-python"


async def _rows(engine: AsyncEngine, table: Table) -> list[tuple[object, ...]]:
    """The rows as the driver returns them (stored text on SQLite, not re-parsed)."""
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
async def test_rows_written_on_the_driver_equal_rows_written_by_sqlalchemy(engine, twins, rows):
    by_sa, by_driver, _ = twins
    async with engine.begin() as conn:
        await conn.execute(by_sa.delete())
        await conn.execute(by_driver.delete())
        for row in rows:
            await conn.execute(_insert(by_sa), row)
            assert await execute(conn, _insert(by_driver), row) == 1
    assert await _rows(engine, by_driver) == await _rows(engine, by_sa)


async def test_executemany_writes_every_row(engine, twins):
    by_sa, by_driver, _ = twins
    rows = [{"id": f"r{n}", "label": None, "count": n, "flag": n % 2 == 0} for n in range(5)]
    async with engine.begin() as conn:
        await conn.execute(_insert(by_sa), rows)
        await execute(conn, _insert(by_driver), rows)
    assert await _rows(engine, by_driver) == await _rows(engine, by_sa)
    assert len(await _rows(engine, by_driver)) == 5


async def test_update_counts_the_rows_it_changed_with_literal_increments_and_expanding_in(
    engine, twins
):
    _, table, _ = twins
    rows = [{"id": f"r{n}", "count": 0, "flag": True} for n in range(4)]
    bump = (
        update(table)
        .where(table.c.id.in_(bindparam("ids", expanding=True)), table.c.flag.is_(True))
        .values(count=table.c.count + 5, label=bindparam("new_label"))
    )
    async with engine.begin() as conn:
        await execute(conn, _insert(table), rows)
        moved = await execute(conn, bump, {"ids": ["r0", "r2", "missing"], "new_label": "x"})
        moved_again = await execute(conn, bump, {"ids": ["r3"], "new_label": None})
    assert (moved, moved_again) == (2, 1)
    got = {r[0]: (r[1], r[2]) for r in await _rows(engine, table)}
    assert got == {"r0": ("x", 5), "r1": (None, 0), "r2": ("x", 5), "r3": (None, 5)}


async def test_a_driver_statement_is_rolled_back_with_its_transaction(engine, twins):
    """Also as the first statement of a transaction: on PostgreSQL, SQLAlchemy's asyncpg
    adapter begins lazily, so a statement sent to the driver before it would commit
    on its own."""
    _, table, _ = twins
    with pytest.raises(RuntimeError):
        async with engine.begin() as conn:
            await execute(conn, _insert(table), {"id": "a", "count": 1, "flag": False})
            await execute(conn, _insert(table), {"id": "b", "count": 1, "flag": False})
            raise RuntimeError("abandon")
    assert await _rows(engine, table) == []


async def test_driver_errors_are_the_errors_sqlalchemy_raises(engine, twins):
    by_sa, by_driver, _ = twins
    row = {"id": "dup", "count": 1, "flag": True}
    errors = []
    for table, run in ((by_sa, None), (by_driver, execute)):
        with pytest.raises(exc.IntegrityError) as raised:
            async with engine.begin() as conn:
                await conn.execute(_insert(table), row)
                if run is None:
                    await conn.execute(_insert(table), row)
                else:
                    await run(conn, _insert(table), row)
        errors.append(type(raised.value.orig).__name__)
    assert errors[0] == errors[1]
    assert len(await _rows(engine, by_driver)) == 0


async def test_python_side_defaults_are_filled_as_sqlalchemy_fills_them(engine, twins):
    _, _, table = twins
    async with engine.begin() as conn:
        await execute(conn, _insert(table), {"id": "d", "count": 0, "flag": True})
    assert (await _rows(engine, table))[0][-1] == "by-python"


async def test_executemany_with_rows_of_other_names_fails_as_sqlalchemy_does(engine, twins):
    by_sa, by_driver, _ = twins
    rows = [
        {"id": "a", "label": "x", "count": 1, "flag": True},
        {"id": "b", "count": 2, "flag": True},
    ]
    messages = []
    for table, run in ((by_sa, None), (by_driver, execute)):
        with pytest.raises(exc.StatementError) as raised:
            async with engine.begin() as conn:
                if run is None:
                    await conn.execute(_insert(table), rows)
                else:
                    await run(conn, _insert(table), rows)
        messages.append(str(raised.value.orig))
    assert messages[0] == messages[1]
    assert "label" in messages[0]


async def test_an_expanding_in_binds_each_length_of_list_with_its_own_sql(engine, twins):
    _, table, _ = twins
    rows = [{"id": f"r{n}", "count": 0, "flag": True} for n in range(4)]
    bump = (
        update(table)
        .where(table.c.id.in_(bindparam("ids", expanding=True)))
        .values(count=table.c.count + 1)
    )
    async with engine.begin() as conn:
        await execute(conn, _insert(table), rows)
        moved = [
            await execute(conn, bump, {"ids": ids})
            for ids in (["r0", "r1"], ["r2", "r3"], [], ["r0"], ["r1", "r2", "r3"])
        ]
    assert moved == [2, 2, 0, 1, 3]
    assert {r[0]: r[2] for r in await _rows(engine, table)} == {"r0": 2, "r1": 2, "r2": 2, "r3": 2}


async def test_a_missing_parameter_is_refused_as_sqlalchemy_refuses_it(engine, twins):
    _, table, _ = twins
    bump = (
        update(table)
        .where(table.c.id.in_(bindparam("ids", expanding=True)))
        .values(count=bindparam("to"))
    )
    plain = update(table).where(table.c.id == bindparam("key")).values(count=bindparam("to"))
    async with engine.begin() as conn:
        await execute(conn, _insert(table), {"id": "a", "count": 1, "flag": True})
        assert await execute(conn, bump, {"ids": ["a"], "to": 2}) == 1
        for statement, params in ((bump, {"ids": ["a"]}), (plain, {"key": "a"})):
            with pytest.raises(exc.StatementError, match="to"):
                await execute(conn, statement, params)
    assert {r[0]: r[2] for r in await _rows(engine, table)} == {"a": 2}


async def test_a_parameter_with_a_value_takes_it_when_left_out_as_in_sqlalchemy(engine, twins):
    by_sa, by_driver, _ = twins
    rows = [{"id": n, "count": 1, "flag": True} for n in ("a", "b", "c")]
    sa_bump, driver_bump = (
        update(t).where(t.c.id == bindparam("key")).values(count=bindparam("to", 7))
        for t in (by_sa, by_driver)
    )
    calls = [{"key": "a", "to": 9}, {"key": "b"}, {"key": "c", "to": 3}]
    async with engine.begin() as conn:
        for table in (by_sa, by_driver):
            await conn.execute(_insert(table), rows)
        for params in calls:
            await conn.execute(sa_bump, params)
            assert await execute(conn, driver_bump, params) == 1
    assert await _rows(engine, by_driver) == await _rows(engine, by_sa)
    assert {r[0]: r[2] for r in await _rows(engine, by_driver)} == {"a": 9, "b": 7, "c": 3}


# -- in a store's write transaction (SQLite: its statements go to the driver connection
# the transaction found once, eventstore.dialects.pooled) ----------------------------------


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=st.lists(_row, min_size=1, max_size=4, unique_by=lambda r: r["id"]))
async def test_rows_written_in_a_store_transaction_equal_rows_written_by_sqlalchemy(
    engine, store, twins, rows
):
    by_sa, by_driver, _ = twins
    async with engine.begin() as conn:
        await conn.execute(by_sa.delete())
        await conn.execute(by_driver.delete())
        for row in rows:
            await conn.execute(_insert(by_sa), row)
    async with store.transaction() as uow:
        for row in rows:
            assert await execute(uow.conn, _insert(by_driver), row) == 1
    assert await _rows(engine, by_driver) == await _rows(engine, by_sa)


async def test_an_error_in_a_store_transaction_is_sqlalchemys_and_rolls_it_back(
    engine, store, twins
):
    by_sa, by_driver, _ = twins
    row = {"id": "dup", "count": 1, "flag": True}
    with pytest.raises(exc.IntegrityError) as by_sqlalchemy:
        async with engine.begin() as conn:
            await conn.execute(_insert(by_sa), row)
            await conn.execute(_insert(by_sa), row)
    with pytest.raises(exc.IntegrityError) as by_execute:
        async with store.transaction() as uow:
            await execute(uow.conn, _insert(by_driver), row)
            await execute(uow.conn, _insert(by_driver), row)
    assert type(by_execute.value.orig) is type(by_sqlalchemy.value.orig)
    assert await _rows(engine, by_driver) == []


@pytest.mark.parametrize("ends", ["committed", "failed"])
async def test_a_store_transaction_leaves_its_connection_unknown_when_it_ends(store, twins, ends):
    """The driver connection a transaction found is known only while it runs: the
    connection is given back afterwards, and another transaction may be on it."""
    _, table, _ = twins
    with pytest.raises(RuntimeError) if ends == "failed" else contextlib.nullcontext():
        async with store.transaction() as uow:
            await execute(uow.conn, _insert(table), {"id": "a", "count": 1, "flag": True})
            known_inside = pooled(uow.conn) is not None
            if ends == "failed":
                raise RuntimeError("abandon")
    assert known_inside is (store.dialect.name == "sqlite")
    assert pooled(uow.conn) is None


async def test_a_store_transactions_connection_invalidated_is_no_longer_known(store, twins):
    """Invalidated in the middle of a store's write transaction, its connection is not
    written through any more: the driver connection found when it began is forgotten,
    and the statements that follow go through SQLAlchemy, which knows it is gone."""
    _, table, _ = twins
    known: list[bool] = []
    with contextlib.suppress(Exception):  # how the block then ends is SQLAlchemy's
        async with store.transaction() as uow:
            await execute(uow.conn, _insert(table), {"id": "a", "count": 1, "flag": True})
            known.append(pooled(uow.conn) is not None)
            await uow.conn.invalidate()
            known.append(pooled(uow.conn) is not None)
    assert known == [store.dialect.name == "sqlite", False]


@pytest.mark.parametrize("then", ["statement", "append"])
async def test_what_follows_a_lost_connection_in_a_store_transaction_is_store_unavailable(
    store, engine, twins, then
):
    """Code that catches a lost connection and carries on inside a store's write
    transaction: what it sends next (a statement, or the append at the end) raises
    StoreUnavailable on both backends, and nothing of the block is committed. Never
    sent on a new connection outside the transaction, where it would commit alone and
    the block's earlier writes would be lost without an error."""
    _, table, _ = twins
    with pytest.raises(StoreUnavailable):
        async with store.transaction() as uow:
            await execute(uow.conn, _insert(table), {"id": "a", "count": 1, "flag": True})
            await uow.conn.invalidate()  # as SQLAlchemy does on a disconnect error
            if then == "statement":
                with translate_errors(store.dialect.database_label):
                    await execute(uow.conn, _insert(table), {"id": "b", "count": 2, "flag": True})
            uow.append("user-after", "user", [NewEvent("Happened", {})])
    assert await _rows(engine, table) == []
    async with engine.connect() as conn:
        assert await store.read_all(conn, 0, 10) == []


async def test_a_block_going_on_after_a_failed_statement_is_a_transaction_conflict_on_postgres(
    store, engine, twins
):
    """Code that catches a failed statement and carries on inside a store's write
    transaction. PostgreSQL aborted the transaction at that statement: the append at the
    end raises TransactionConflict (retry the whole block), not the driver's
    InFailedSQLTransactionError, and nothing of the block is committed. SQLite undoes
    the failed statement only, and the block commits the rest."""
    _, table, _ = twins
    postgres = store.dialect.name == "postgresql"
    with pytest.raises(TransactionConflict) if postgres else contextlib.nullcontext():
        async with store.transaction() as uow:
            await execute(uow.conn, _insert(table), {"id": "a", "count": 1, "flag": True})
            with contextlib.suppress(Exception):
                await execute(uow.conn, _insert(table), {"id": "a", "count": 2, "flag": True})
            uow.append("user-after", "user", [NewEvent("Happened", {})])
    async with engine.connect() as conn:
        written = await store.read_all(conn, 0, 10)
    if postgres:
        assert await _rows(engine, table) == []
        assert written == []
    else:
        assert [row[0] for row in await _rows(engine, table)] == ["a"]
        assert [e.stream_id for e in written] == ["user-after"]
