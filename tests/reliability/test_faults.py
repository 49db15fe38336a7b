"""Faults that a caller must see as clear, typed errors, with nothing half-written."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import uuid
from dataclasses import replace

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from eventstore import (
    AppendResult,
    AppendTimeout,
    EngineOptions,
    EventStore,
    NewEvent,
    PoolExhausted,
    StoreUnavailable,
    create_engine,
)
from eventstore.dialects import ADVISORY_LOCK_CLASS
from eventstore.translate import translate_errors
from tests.conftest import PG_URL
from tiu import create_database_service


def ev(n: int = 0) -> NewEvent:
    return NewEvent("Happened", {"n": n})


@pytest.mark.postgres
async def test_pool_exhaustion_waits_then_fails_typed_and_recovers(pg_schema):
    options = EngineOptions(pool_size=1, max_overflow=0, pool_timeout=0.3, search_path=pg_schema)
    engine = create_engine(PG_URL, options)
    store = EventStore(engine)
    try:
        holder = await engine.connect()  # the only connection
        stream = f"pool-{uuid.uuid4()}"
        with pytest.raises(PoolExhausted) as exhausted:
            await store.append(stream, "pool", [ev()])
        assert exhausted.value.timeout == pytest.approx(0.3)
        await holder.close()
        result = await store.append(stream, "pool", [ev()])  # healthy again, nothing partial
        assert result.first_version == 1
    finally:
        await store.aclose()
        await engine.dispose()


@pytest.mark.postgres
async def test_a_stuck_lock_holder_makes_other_appends_time_out_with_a_retryable_error(
    pg_schema,
):
    options = EngineOptions(lock_timeout_ms=300, search_path=pg_schema)
    engine = create_engine(PG_URL, options)
    stuck = EventStore(engine)
    other = EventStore(engine)
    release = asyncio.Event()
    holding = asyncio.Event()

    async def hang(_streams: object) -> None:
        holding.set()
        await release.wait()

    stuck.before_commit = hang

    async def stuck_command() -> AppendResult:
        # A command's transaction (the append lock is taken by its append and held
        # until COMMIT; the hook holds it there). It reads before it appends, as a
        # command that claims a key does: a unit whose only statement is its append
        # sends it as one statement outside a transaction, committed as it
        # allocates, with no lock held at the hook.
        async with stuck.transaction() as uow:
            await uow.conn.execute(text("SELECT 1"))
            uow.append(f"stuck-{uuid.uuid4()}", "stuck", [ev(1)])
        return uow.results[0]

    try:
        first = asyncio.create_task(stuck_command())
        await asyncio.wait_for(holding.wait(), 5)
        with pytest.raises(AppendTimeout):
            await other.append(f"other-{uuid.uuid4()}", "other", [ev(2)])
        release.set()
        done = await first
        after = await other.append(f"other-{uuid.uuid4()}", "other", [ev(2)])
        assert after.first_position == done.last_position + 1
    finally:
        release.set()
        await stuck.aclose()
        await other.aclose()
        await engine.dispose()


@pytest.mark.postgres
async def test_idle_in_transaction_timeout_frees_the_append_lock(pg_schema):
    base = EngineOptions(search_path=pg_schema)
    idle_engine = create_engine(PG_URL, replace(base, idle_in_transaction_timeout_ms=400))
    engine = create_engine(PG_URL, replace(base, lock_timeout_ms=5000))
    store = EventStore(engine)
    try:
        conn = await idle_engine.connect()
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(:k, 'events'::regclass::oid::int)"),
            {"k": ADVISORY_LOCK_CLASS},
        )
        # ... and the caller wanders off without committing. The server ends that
        # session after 400 ms, which releases the lock for the waiting append.
        result = await asyncio.wait_for(store.append(f"idle-{uuid.uuid4()}", "idle", [ev()]), 5)
        assert result.first_version == 1
        with pytest.raises(StoreUnavailable), translate_errors():
            await conn.execute(text("SELECT 1"))
        await conn.invalidate()
    finally:
        await store.aclose()
        await engine.dispose()
        await idle_engine.dispose()


async def test_a_read_only_sqlite_file_is_a_clear_error_naming_the_file(sqlite_template, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions; see the immutable-directory variant")
    path = tmp_path / "ro.db"
    path.write_bytes(sqlite_template.read_bytes())
    path.chmod(stat.S_IRUSR)
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        with pytest.raises(StoreUnavailable, match=r"ro\.db"):
            await EventStore(engine).append("user-1", "user", [ev()])
    finally:
        await engine.dispose()


async def test_a_sqlite_database_opened_read_only_refuses_writes_naming_the_file(
    sqlite_template, tmp_path
):
    path = tmp_path / "ro.db"
    path.write_bytes(sqlite_template.read_bytes())
    engine = create_engine(f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true")
    try:
        with pytest.raises(StoreUnavailable, match=r"ro\.db") as refused:
            await EventStore(engine).append("user-1", "user", [ev()])
        assert "readonly" in str(refused.value).replace("-", "")
    finally:
        await engine.dispose()


async def test_a_sqlite_file_locked_by_another_process_times_out_naming_the_file(
    sqlite_template, tmp_path
):
    path = tmp_path / "locked.db"
    path.write_bytes(sqlite_template.read_bytes())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sqlite3, sys, time
                db = sqlite3.connect({str(path)!r}, isolation_level=None)
                db.execute("BEGIN EXCLUSIVE")
                print("locked", flush=True)
                time.sleep(10)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        engine = create_engine(f"sqlite+aiosqlite:///{path}", EngineOptions(busy_timeout=0.3))
        try:
            with pytest.raises(AppendTimeout, match=r"locked\.db"):
                await EventStore(engine).append("user-1", "user", [ev()])
        finally:
            await engine.dispose()
    finally:
        holder.kill()
        holder.communicate()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)


def _pg_url_with(**parts: str | int) -> str:
    return make_url(PG_URL).set(password="s3cret-pw", **parts).render_as_string(hide_password=False)


_UNOPENABLE = pytest.mark.parametrize(
    ("url", "names"),
    [
        pytest.param(lambda: _pg_url_with(port=1), "127.0.0.1:1", marks=pytest.mark.postgres),
        pytest.param(
            lambda: _pg_url_with(database="tiu_no_such_db"),
            "tiu_no_such_db",
            marks=pytest.mark.postgres,
        ),
        pytest.param(
            lambda: _pg_url_with(username="tiu_no_such_role"),
            "tiu_no_such_role",
            marks=pytest.mark.postgres,
        ),
    ],
    ids=["unreachable-host", "missing-database", "missing-role"],
)


@_UNOPENABLE
async def test_a_service_on_a_database_it_cannot_open_is_store_unavailable_naming_it(url, names):
    with pytest.raises(StoreUnavailable) as refused:
        await create_database_service(url(), pool_timeout=2)
    assert names in str(refused.value)
    assert "s3cret-pw" not in str(refused.value)


@_UNOPENABLE
async def test_an_append_on_a_database_it_cannot_open_is_store_unavailable_naming_it(url, names):
    # The direct append opens its connection outside a SQLAlchemy Connection, where
    # SQLAlchemy wraps no driver error.
    engine = create_engine(url(), EngineOptions(pool_timeout=2))
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await EventStore(engine).append("user-1", "user", [ev()])
    finally:
        await engine.dispose()
    assert names in str(refused.value)
    assert "s3cret-pw" not in str(refused.value)


async def test_a_file_that_is_not_a_database_is_store_unavailable_naming_it(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are notes, not an SQLite database\n" * 20)
    with pytest.raises(StoreUnavailable, match=r"notes\.db"):
        await create_database_service(f"sqlite+aiosqlite:///{path}")
