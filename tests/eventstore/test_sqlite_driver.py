"""The inline SQLite driver: sqlite3 on the event loop, leaving it only to wait for a lock."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, Table, event, func, insert, select, text

from eventstore import (
    AppendTimeout,
    DuplicateEventId,
    EngineOptions,
    EventStore,
    NewEvent,
    StoreUnavailable,
    create_engine,
)
from eventstore.engine import begin_write
from eventstore.hashing import canonical_json, chain_hash, event_hash, parse_json
from eventstore.integrity import verify
from eventstore.prepared import execute
from eventstore.schema import metadata
from eventstore.sqlite_driver import BACKGROUND_THREADS, _on_thread
from eventstore.threads import NICENESS
from projections.runner import sharing_the_loop
from tests.conftest import sqlite_write_lock_free

pytestmark = pytest.mark.sqlite


def ev(n: int = 0) -> NewEvent:
    return NewEvent("Happened", {"n": n})


@pytest.fixture
def db_path(sqlite_template, tmp_path):
    path = tmp_path / "driver.db"
    path.write_bytes(sqlite_template.read_bytes())
    return path


def _hold_the_lock(store: EventStore) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``store``'s appends stop before COMMIT, holding the write lock: ``holding``
    is set then, and they go on when ``release`` is set."""
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold(_streams: object) -> None:
        holding.set()
        await release.wait()

    store.before_commit = hold
    return holding, release


async def _ticks_while(work: asyncio.Future | asyncio.Task) -> int:
    """How often a 10 ms ticker ran while ``work`` was pending: 0 means a blocked loop."""
    ticks = 0
    while not work.done():
        await asyncio.sleep(0.01)
        ticks += 1
    return ticks


async def test_writers_of_one_process_queue_for_the_lock_without_blocking_the_loop(db_path):
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    slow = EventStore(store.engine)
    holding, release = _hold_the_lock(slow)
    try:
        first = asyncio.create_task(slow.append("user-a", "user", [ev(1)]))
        await asyncio.wait_for(holding.wait(), 5)
        second = asyncio.create_task(store.append("user-b", "user", [ev(2)]))
        await asyncio.sleep(0.1)
        assert not second.done()  # waiting for the first writer...
        asyncio.get_running_loop().call_later(0.2, release.set)
        assert await _ticks_while(second) >= 5  # ...while the loop kept running
        done, after = await first, await second
        assert after.first_position == done.last_position + 1
    finally:
        release.set()
        await store.engine.dispose()


async def test_a_writer_of_this_process_holding_the_lock_past_the_busy_timeout_times_out(
    db_path,
):
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}", EngineOptions(busy_timeout=0.2))
    stuck, other = EventStore(engine), EventStore(engine)
    holding, release = _hold_the_lock(stuck)
    try:
        first = asyncio.create_task(stuck.append("user-a", "user", [ev(1)]))
        await asyncio.wait_for(holding.wait(), 5)
        with pytest.raises(AppendTimeout, match=r"driver\.db"):
            await other.append("user-b", "user", [ev(2)])
        release.set()
        await first
        assert (await other.append("user-b", "user", [ev(2)])).first_position == 2
    finally:
        release.set()
        await engine.dispose()


async def test_a_lock_held_by_another_connection_is_waited_for_off_the_loop(db_path):
    """Another process (here: a plain sqlite3 connection on a thread) holds the write lock:
    the append waits on a worker thread, the loop keeps running, and it then succeeds."""
    locked, done = threading.Event(), threading.Event()

    def other_process() -> None:
        db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        db.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(0.3)
        db.execute("COMMIT")
        db.close()
        done.set()

    holder = threading.Thread(target=other_process)
    holder.start()
    locked.wait(5)
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}", EngineOptions(busy_timeout=5))
    try:
        append = asyncio.create_task(EventStore(engine).append("user-1", "user", [ev()]))
        assert await _ticks_while(append) >= 10
        assert done.is_set()
        assert (await append).first_position == 1
    finally:
        holder.join()
        await engine.dispose()


async def test_a_failed_or_cancelled_append_leaves_no_transaction_lock_or_connection_behind(
    db_path,
):
    """Appends on a file run as one transaction on a pooled driver connection (no
    SQLAlchemy connection around it); whatever ends it, the connection goes back to the
    pool idle and the write lock is free for this process and for others. A caller
    cancelled while its append waits for the lock does not abandon it half-way: it
    runs to its end on the group writer's task."""
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}", EngineOptions(busy_timeout=5))
    store, holder = EventStore(engine), EventStore(engine)
    holding, release = _hold_the_lock(holder)
    try:
        twice = ev(1)
        with pytest.raises(DuplicateEventId):  # the same event id twice: rolled back
            await store.append("user-a", "user", [twice, twice])
        first = asyncio.create_task(holder.append("user-b", "user", [ev(2)]))
        await asyncio.wait_for(holding.wait(), 5)
        waiting = asyncio.create_task(store.append("user-c", "user", [ev(3)]))
        await asyncio.sleep(0.05)
        waiting.cancel()  # while its transaction waits for this process's write lock
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        assert (await first).first_position == 1
        await store.aclose()  # waits for the group writer
        assert engine.pool.checkedout() == 0
        assert sqlite_write_lock_free(db_path)  # no lock left behind in the file
        assert (await store.append("user-a", "user", [ev(4)])).first_position == 3
        async with engine.connect() as conn:
            streams = [e.stream_id for e in await store.read_all(conn)]
        assert streams == ["user-b", "user-c", "user-a"]
    finally:
        release.set()
        await engine.dispose()


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_appends_read_back_and_verify_with_inline_and_offloaded_commits(db_path, synchronous):
    engine = create_engine(
        f"sqlite+aiosqlite:///{db_path}", EngineOptions(sqlite_synchronous=synchronous)
    )
    store = EventStore(engine)
    try:
        for n in range(5):
            await store.append(f"user-{n % 2}", "user", [ev(n), ev(n + 10)])
        async with engine.connect() as conn:
            events = await store.read_all(conn)
            report = await verify(conn)
        assert [e.position for e in events] == list(range(1, 11))
        assert all(e.recorded_at.tzinfo is not None for e in events)
        assert isinstance(events[0].event_id, uuid.UUID)
        assert report.ok, report
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def _background_threads_taken() -> AsyncIterator[threading.Event]:
    """Keep every one of the driver's background threads busy (the reads a service
    sends off the loop: audits, counts, log pages) until the event is set, at the
    latest in 60 s (work queued behind them then runs, and a test can tell it did not
    run before; a loaded machine takes seconds for the counts these tests run)."""
    gate = threading.Event()
    held = [
        asyncio.ensure_future(BACKGROUND_THREADS.run(gate.wait))
        for _ in range(BACKGROUND_THREADS.size)
    ]
    timer = asyncio.get_running_loop().call_later(60, gate.set)
    await asyncio.sleep(0.05)
    try:
        yield gate
    finally:
        timer.cancel()
        gate.set()
        await asyncio.gather(*held)


async def test_a_commit_sent_off_the_loop_does_not_queue_behind_reads_holding_the_lock(db_path):
    """A COMMIT that fsyncs runs on a worker thread; the write lock is held until it
    ends, so it must not wait for the threads the service's reads have taken."""
    engine = create_engine(
        f"sqlite+aiosqlite:///{db_path}", EngineOptions(sqlite_synchronous="FULL")
    )
    store = EventStore(engine)
    try:
        async with _background_threads_taken() as gate:
            written = await store.append("user-1", "user", [ev()])
            assert not gate.is_set(), "the COMMIT waited for the reads' threads"
        assert written.last_position == 1
    finally:
        await store.aclose()
        await engine.dispose()


async def test_an_off_loop_statement_of_a_write_transaction_does_not_queue_behind_reads(
    db_path,
):
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    try:
        async with _background_threads_taken() as gate, engine.connect() as conn:
            await begin_write(conn)
            await conn.execute(text("CREATE TABLE kept (x INTEGER)"))
            count = text(_COUNT_UP_TO).execution_options(off_loop=True)
            counted = await conn.execute(count, {"top": 3_000_000})
            await conn.commit()
            assert not gate.is_set(), "the write transaction waited for the reads' threads"
            assert counted.scalar_one() == 3_000_000
    finally:
        await engine.dispose()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(value=json_values)
@example(value={"big": 2**70, "small": -(2**64)})
@example(value={"big": 2**70 + 1, "small": -(2**63) - 1, "u64": 2**64 + 7, "list": [3**41]})
@example(value=["\ud800 lone surrogate", 1e16, 0.1])
def test_stored_json_parses_back_exactly_as_the_stdlib_parses_it(value):
    text = canonical_json(value)
    parsed = parse_json(text)
    assert parsed == json.loads(text)
    assert canonical_json(parsed) == text  # so hashes verify after reading back


@given(
    data=st.dictionaries(st.text(), json_values, max_size=4),
    metadata=st.dictionaries(st.text(), json_values, max_size=2),
    actor=st.none() | st.text(),
)
def test_the_spliced_chain_hash_equals_the_hash_of_the_whole_canonical_record(
    data, metadata, actor
):
    fields = {
        "prev_hash": "0" * 64,
        "stream_id": "user-é",
        "version": 3,
        "event_id": str(uuid.UUID(int=7)),
        "event_type": "Happened",
        "schema_version": 2,
        "actor_id": actor,
        "correlation_id": None,
        "causation_id": "c",
        "command_id": None,
        "recorded_at": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    }
    record = [*list(fields.values())[:6], data, metadata, *list(fields.values())[6:-1]]
    record.append(fields["recorded_at"].isoformat(timespec="microseconds"))
    whole = hashlib.sha256(canonical_json(record).encode()).hexdigest()  # the definition
    spliced = chain_hash(
        data_json=canonical_json(data), metadata_json=canonical_json(metadata), **fields
    )
    assert spliced == whole == event_hash(data=data, metadata=metadata, **fields)


@pytest.mark.parametrize(
    ("categories", "types"), [(None, 3), (2, None), (1, None), (2, 2), (None, None)]
)
def test_log_pages_are_read_in_position_order_without_sorting_the_log(db_path, categories, types):
    """A filtered page read must walk an index in position order: the event_type index
    plus a sort of every matching event per page made replays quadratic."""
    from eventstore.dialects import _read_all_sql

    sql = _read_all_sql(False, False, categories, types)
    params = [0, *(["task"] * (categories or 0)), *(["TaskCreated"] * (types or 0)), 1000]
    with sqlite3.connect(db_path) as db:
        plan = " ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    assert "TEMP B-TREE" not in plan, plan


# -- statements sent off the loop -----------------------------------------------------------

_SLOW_COUNT = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) "
    "SELECT count(*) FROM n"
)


async def test_an_off_loop_statement_lets_other_tasks_run_and_returns_its_rows(db_path):
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    try:
        async with engine.connect() as conn:
            slow = text(_SLOW_COUNT).execution_options(off_loop=True)
            work = asyncio.ensure_future(conn.execute(slow))
            assert await _ticks_while(work) > 0
            assert (await work).scalar_one() == 3_000_000
            # the same statement inline holds the loop for its whole run
            inline = asyncio.ensure_future(conn.execute(text(_SLOW_COUNT)))
            assert await _ticks_while(inline) <= 1  # the tick before the task started
            assert (await inline).scalar_one() == 3_000_000
    finally:
        await engine.dispose()


async def test_an_off_loop_statement_runs_on_a_thread_below_the_loop_s_priority(db_path):
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    seen: list[tuple[str, int]] = []
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            raw.driver_connection.set_trace_callback(  # type: ignore[union-attr]
                lambda sql: (
                    seen.append(
                        (
                            threading.current_thread().name,
                            os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                        )
                    )
                    if "marked" in sql
                    else None
                )
            )
            marked = text("SELECT count(*) AS marked FROM events").execution_options(off_loop=True)
            await conn.execute(marked)
    finally:
        await engine.dispose()
    ((name, niceness),) = seen
    assert name.startswith("tiu-sqlite")
    if sys.platform == "linux":  # elsewhere a thread's priority is left as it is
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert niceness == min(19, base + NICENESS)  # 19: the lowest there is


def _threads_of(conn_raw: object, marker: str) -> list[int]:
    """The threads each statement holding ``marker`` runs on, as SQLite traces them."""
    threads: list[int] = []
    conn_raw.driver_connection.set_trace_callback(  # type: ignore[attr-defined]
        lambda sql: threads.append(threading.get_ident()) if marker in sql else None
    )
    return threads


_COUNT_UP_TO = (
    "SELECT count(*) FROM (WITH RECURSIVE n(i) AS "
    "(SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :top) SELECT i FROM n)"
)


async def test_an_off_loop_read_that_ended_within_the_inline_budget_runs_on_the_loop_next(
    db_path,
):
    """A statement whose cost may grow with the data, cheap as the data is now, costs no
    hop to a worker thread and back (longer than a count bounded by an index)."""
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    try:
        async with engine.connect() as conn:
            threads = _threads_of(await conn.get_raw_connection(), "FROM n")
            quick = text(_COUNT_UP_TO).execution_options(off_loop=True)
            for _ in range(3):
                assert (await conn.execute(quick, {"top": 50})).scalar_one() == 50
        assert threads[0] != threading.get_ident()  # first on a thread, timed there
        assert threads[1:] == [threading.get_ident()] * 2
    finally:
        await engine.dispose()


async def test_an_off_loop_read_past_the_inline_budget_is_run_again_on_a_worker_thread(db_path):
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    try:
        async with engine.connect() as conn:
            count = text(_COUNT_UP_TO).execution_options(off_loop=True)
            await conn.execute(count, {"top": 50})  # ended within the budget
            threads = _threads_of(await conn.get_raw_connection(), "FROM n")
            started = time.perf_counter()
            work = asyncio.ensure_future(conn.execute(count, {"top": 3_000_000}))
            await asyncio.sleep(0)
            held = time.perf_counter() - started  # the inline attempt held the loop this long
            assert await _ticks_while(work) > 0
            assert (await work).scalar_one() == 3_000_000
            assert (await conn.execute(count, {"top": 50})).scalar_one() == 50
        assert held < 0.1
        loop_thread = threading.get_ident()
        assert threads[0] == loop_thread  # interrupted at the budget...
        assert threads[1] != loop_thread  # ...run again on a thread...
        assert threads[2] != loop_thread  # ...and sent there until it ends in time again
    finally:
        await engine.dispose()


async def test_an_off_loop_read_that_waited_on_its_thread_stays_there_however_little_cpu_it_used(
    db_path,
):
    """A read that spent little CPU but long waiting on its thread (for the disk; here a
    function that sleeps) would stall the loop inline where SQLite cannot look at the
    clock: it is not run inline next time."""
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            raw.driver_connection.create_function("wait_ms", 1, lambda ms: time.sleep(ms / 1000))
            threads = _threads_of(raw, "wait_ms")
            waits = text("SELECT wait_ms(20)").execution_options(off_loop=True)
            for _ in range(3):
                await conn.execute(waits)
        assert threading.get_ident() not in threads
    finally:
        await engine.dispose()


async def test_an_off_loop_read_that_ends_late_inline_goes_to_the_thread_next_time(db_path):
    """SQLite looks at the clock between steps of a statement's program; a bare count
    is one step (it counts the table's b-tree), so it ends late rather than interrupted."""
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    try:
        async with engine.connect() as conn:
            await conn.execute(text("CREATE TABLE wide (pad BLOB)"))
            await conn.commit()
            count = text("SELECT count(*) FROM wide").execution_options(off_loop=True)
            await conn.execute(count)  # an empty table: ended within the budget
            await conn.execute(
                text(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                    "WHERE i < 100000) INSERT INTO wide SELECT zeroblob(300) FROM n"
                )
            )
            await conn.commit()
            threads = _threads_of(await conn.get_raw_connection(), "FROM wide")
            assert (await conn.execute(count)).scalar_one() == 100_000  # inline, late
            assert (await conn.execute(count)).scalar_one() == 100_000
        assert threads[0] == threading.get_ident()
        assert threads[1] != threading.get_ident()
    finally:
        await engine.dispose()


async def test_a_read_interrupted_at_the_inline_budget_leaves_its_write_transaction_whole(
    db_path,
):
    """SQLite rolls back the transaction of an interrupted write, not of a read."""
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    try:
        async with engine.connect() as conn:
            await begin_write(conn)
            await conn.execute(text("CREATE TABLE kept (x INTEGER)"))
            await conn.execute(text("INSERT INTO kept VALUES (1)"))
            count = text(_COUNT_UP_TO).execution_options(off_loop=True)
            await conn.execute(count, {"top": 50})  # ended within the budget: inline next
            assert (await conn.execute(count, {"top": 3_000_000})).scalar_one() == 3_000_000
            await conn.execute(text("INSERT INTO kept VALUES (2)"))
            await conn.commit()
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT sum(x) FROM kept"))).scalar_one() == 3
    finally:
        await engine.dispose()


async def test_a_streamed_result_fetches_every_page_off_the_loop(db_path):
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    try:
        async with engine.connect() as conn:
            query = text(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500) "
                "SELECT i FROM n"
            )
            result = await conn.stream(query)
            seen = [row[0] async for row in result]
            assert seen == list(range(1, 2501))
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


async def test_a_cancelled_off_loop_statement_is_interrupted_and_leaves_the_connection_idle(
    db_path,
):
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}", EngineOptions(pool_size=1))
    opened: list[str] = []
    for name in ("connect", "invalidate"):
        event.listen(engine.sync_engine, name, lambda *_, name=name: opened.append(name))
    try:
        async with engine.connect() as conn:
            never = text(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                "SELECT count(*) FROM n"
            ).execution_options(off_loop=True)
            work = asyncio.ensure_future(conn.execute(never))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            work.cancel()
            with pytest.raises(asyncio.CancelledError):
                await work
            assert time.monotonic() - started < 1.0  # interrupted, not run to its end
        async with engine.connect() as conn:  # the pool's only connection, reusable
            assert (await conn.execute(text("SELECT 2"))).scalar_one() == 2
        assert opened == ["connect"]  # kept in the pool, not dropped and opened again
    finally:
        await engine.dispose()


async def test_a_statement_cancelled_while_it_waits_for_a_thread_never_runs(db_path):
    """Interrupting reaches only a statement already running: one still queued for a
    thread is taken off the queue, and its caller is cancelled at once."""
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}", EngineOptions(pool_size=1))
    ran: list[str] = []
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            raw.driver_connection.set_trace_callback(  # type: ignore[union-attr]
                lambda sql: ran.append(sql) if "never_ran" in sql else None
            )
            queued = text("SELECT count(*) AS never_ran FROM events").execution_options(
                off_loop=True
            )
            async with _background_threads_taken() as gate:
                work = asyncio.ensure_future(conn.execute(queued))
                await asyncio.sleep(0.05)
                work.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await work
                assert not gate.is_set(), "the cancelled caller waited for a thread"
            await BACKGROUND_THREADS.run(lambda: None)  # the threads free: a queued one ran
        async with engine.connect() as conn:  # the pool's only connection, reusable
            assert (await conn.execute(text("SELECT 2"))).scalar_one() == 2
        assert ran == []
    finally:
        await engine.dispose()


async def test_a_caller_cancelled_with_every_task_returns_only_once_its_thread_let_go():
    """What ``asyncio.run`` does at shutdown: cancel every task. The caller must still
    wait for the thread that runs its work (it holds the caller's connection)."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        release.wait(5)
        finished.set()

    caller = asyncio.ensure_future(_on_thread(work))
    await asyncio.to_thread(started.wait, 5)
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is not me:
            task.cancel()
    asyncio.get_running_loop().call_later(0.2, release.set)
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished.is_set(), "the caller returned while its thread still ran"


async def test_log_pages_are_fetched_on_a_worker_thread(db_path):
    """``read_all`` runs its page's statement (and builds its rows) off the event loop's
    thread, so a loop paging through a large log is free while each page is read."""
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    try:
        await store.append("s-1", "s", [ev(n) for n in range(20)])
        threads: list[int] = []
        async with store.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            raw.driver_connection.set_trace_callback(
                lambda sql: threads.append(threading.get_ident()) if "FROM events" in sql else None
            )
            try:
                page = await store.read_all(conn, 0, 15)
                rest = await store.read_all(conn, page[-1].position, 15)
            finally:
                raw.driver_connection.set_trace_callback(None)
        assert [e.version for e in page + rest] == list(range(1, 21))
        assert len(threads) == 2
        assert threading.get_ident() not in threads
    finally:
        await store.aclose()
        await store.engine.dispose()


async def test_a_logged_text_that_is_not_utf8_fails_its_read_as_store_unavailable(db_path):
    """The record's text columns are read by a converter (``TEXT_COLUMN``), whose
    ``UnicodeDecodeError`` must fail a read as sqlite3's own reading of the column does."""
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    try:
        await store.append("s-1", "s", [ev()])
        with sqlite3.connect(db_path) as db:
            db.execute(
                "INSERT INTO events (position, event_id, stream_id, stream_category, version, "
                "event_type, schema_version, data, metadata, recorded_at, hash) VALUES (2, ?, "
                "'s-1', 's', 2, 'Happened', 1, CAST(x'7b226e223a22ff227d' AS TEXT), '{}', "
                "'2026-01-01 00:00:00.000000', ?)",
                ("0" * 32, "0" * 64),
            )
        async with store.engine.connect() as conn:
            with pytest.raises(StoreUnavailable, match="UTF-8"):
                await store.read_all(conn, 0, 10)  # on a worker thread
            with pytest.raises(StoreUnavailable, match="UTF-8"):
                await store.read_stream(conn, "s-1")  # inline
    finally:
        await store.aclose()
        await store.engine.dispose()


async def test_a_cancelled_log_read_leaves_its_connection_idle(db_path):
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}", EngineOptions(pool_size=1)))
    try:
        async with store.transaction() as uow:
            for n in range(200):
                uow.append(f"s-{n}", "s", [ev(i) for i in range(50)])
        async with store.engine.connect() as conn:
            read = asyncio.ensure_future(store.read_all(conn, 0, 10_000))
            await asyncio.sleep(0)  # on its worker thread now
            read.cancel()
            with pytest.raises(asyncio.CancelledError):
                await read
            assert len(await store.read_all(conn, 0, 10)) == 10
        async with store.engine.connect() as conn:  # the pool's only connection
            assert not conn.sync_connection.connection.dbapi_connection.in_transaction
            assert (await conn.execute(text("SELECT count(*) FROM events"))).scalar_one() == 10_000
    finally:
        await store.aclose()
        await store.engine.dispose()


async def test_a_cancelled_log_read_on_a_shared_memory_database_leaves_other_readers_alone():
    # :memory: has one connection for every caller: a page read on a worker thread and
    # cancelled would interrupt another caller's page running on it.
    store = EventStore(create_engine("sqlite+aiosqlite:///:memory:"))
    try:
        async with store.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        for n in range(10):
            await store.append(f"s-{n}", "s", [ev(i) for i in range(1_000)])

        async def read() -> int:
            async with store.engine.connect() as conn:
                return len(await store.read_all(conn, 0, 10_000))

        cancelled, other = asyncio.ensure_future(read()), asyncio.ensure_future(read())
        await asyncio.sleep(0.005)
        cancelled.cancel()
        results = await asyncio.gather(cancelled, other, return_exceptions=True)
        assert results[1] == 10_000
    finally:
        await store.aclose()
        await store.engine.dispose()


async def test_log_pages_of_a_shared_memory_database_suspend_between_pages():
    store = EventStore(create_engine("sqlite+aiosqlite:///:memory:"))
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    try:
        async with store.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        await store.append("s-1", "s", [ev(i) for i in range(50)])
        other = asyncio.ensure_future(other_task())
        await asyncio.sleep(0)
        async with store.engine.connect() as conn:
            before, after = turns, 0
            for _ in range(5):
                after = (await store.read_all(conn, after, 10))[-1].position
            assert turns - before >= 5
        other.cancel()
    finally:
        await store.aclose()
        await store.engine.dispose()


async def test_prebuilt_statements_of_a_connection_sent_off_the_loop_run_off_it(db_path):
    """A batch loop sharing a service's loop (``sharing_the_loop``) writes its read-model
    rows with prebuilt statements (``eventstore.prepared``): those run on a worker
    thread too, and the same statements on another connection inline."""
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    tables = MetaData()
    table = Table("rows", tables, Column("id", Integer, primary_key=True))
    statement = insert(table)
    try:
        async with store.engine.begin() as conn:
            await conn.run_sync(tables.create_all)
        threads: dict[bool, list[int]] = {True: [], False: []}
        for shared in (True, False):
            async with store.engine.connect() as conn:
                await sharing_the_loop(conn, 200 if shared else None)
                await begin_write(conn)
                raw = await conn.get_raw_connection()
                raw.driver_connection.set_trace_callback(
                    lambda sql, seen=threads[shared]: (
                        seen.append(threading.get_ident())
                        if sql.startswith("INSERT INTO rows")
                        else None
                    )
                )
                try:
                    await execute(conn, statement, [{"id": n + 10 * shared} for n in range(3)])
                    await execute(conn, statement, {"id": 99 - shared})
                finally:
                    raw.driver_connection.set_trace_callback(None)
                await conn.commit()
        assert len(threads[True]) == 4
        assert threading.get_ident() not in threads[True]
        assert threads[False] == [threading.get_ident()] * 4
        async with store.engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(table))).scalar() == 8
    finally:
        await store.aclose()
        await store.engine.dispose()


async def test_a_disposed_engine_leaves_no_writer_thread_behind(tmp_path):
    """An engine's writer thread ends with its dispose (a service or a test suite
    making an engine per database must not keep a thread per engine ever made)."""

    def writers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("tiu-sqlite-writer")}

    before = writers()
    engines = []
    for i in range(20):
        engine = create_engine(
            f"sqlite+aiosqlite:///{tmp_path / f'{i}.db'}", EngineOptions(sqlite_synchronous="FULL")
        )
        async with engine.connect() as conn:
            await begin_write(conn)
            await conn.execute(text("CREATE TABLE kept (x INTEGER)"))
            await conn.commit()  # fsyncs: on the engine's writer thread
        await engine.dispose()
        engines.append(engine)  # still referenced, as a fixture or a service keeps it
    made = writers() - before
    for thread in made:  # each ends once it has seen the shutdown
        await asyncio.to_thread(thread.join, 5)
    left = [t for t in made if t.is_alive()]
    assert not left, f"{len(left)} writer threads left running"


@contextlib.contextmanager
def _file_held_exclusively(path: os.PathLike[str]) -> Iterator[sqlite3.Connection]:
    """A new database at ``path`` (rollback journal), locked exclusively by another
    connection as long as the block runs: a new connection cannot read its header."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")
        yield holder
    finally:
        holder.close()


def _descriptors_of(path: os.PathLike[str]) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    fds = "/proc/self/fd"
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            count += os.readlink(f"{fds}/{fd}") == target
    return count


async def test_a_connection_waits_off_the_loop_for_a_file_another_connection_holds(tmp_path):
    """Opening a connection (its pragmas read the file's header) waits on a worker
    thread, up to the busy timeout, for a lock another process holds: the loop runs
    meanwhile, and the connection opens once the lock is let go."""
    path = tmp_path / "held.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        with _file_held_exclusively(path):
            opening = asyncio.ensure_future(engine.connect().start())
            await asyncio.sleep(0.2)
            assert not opening.done(), opening
        conn = await opening
        assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
        await conn.close()
    finally:
        await engine.dispose()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
async def test_a_caller_cancelled_while_its_connection_opens_leaves_no_connection_open(
    tmp_path,
):
    """A checkout cancelled while the worker thread opens its connection ends at once;
    the connection the thread opens all the same is closed when it is."""
    path = tmp_path / "held.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        with _file_held_exclusively(path):
            opening = asyncio.ensure_future(engine.connect().start())
            await asyncio.sleep(0.2)
            assert _descriptors_of(path) == 2  # the holder's and the one being opened
            opening.cancel()
            # Held, as a host logging it would: it refers to the cancelled frames.
            with pytest.raises(asyncio.CancelledError) as cancelled:
                await opening
        for _ in range(3000):  # the thread opens it once the lock is let go
            if not _descriptors_of(path):
                break
            await asyncio.sleep(0.01)
        assert _descriptors_of(path) == 0, cancelled
    finally:
        await engine.dispose()


async def test_a_database_in_memory_checked_out_twice_at_once_is_one_database():
    """An engine on ``:memory:`` keeps one connection (a private database): two first
    checkouts at once must share it, not each open one of their own."""
    engine = create_engine("sqlite+aiosqlite://")

    async def write() -> None:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (x)"))
            await conn.execute(text("INSERT INTO t VALUES (1)"))

    async def look() -> None:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")

    try:
        await asyncio.gather(write(), look())
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1
    finally:
        await engine.dispose()


async def test_an_append_on_a_file_another_connection_holds_exclusively_is_an_append_timeout(
    tmp_path,
):
    """The direct append takes its connection outside a SQLAlchemy Connection, where
    SQLAlchemy wraps no driver error: the lock still comes out as the typed error."""
    path = tmp_path / "held.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}", EngineOptions(busy_timeout=0.3))
    store = EventStore(engine)
    try:
        with _file_held_exclusively(path), pytest.raises(AppendTimeout, match=r"held\.db"):
            await store.append("task-1", "task", [ev()])
    finally:
        await store.aclose()
        await engine.dispose()


async def test_a_pooled_connection_is_opened_and_set_up_off_the_event_loop_thread(db_path):
    """Opening a connection waits for the disk (the path resolved, the file opened, its
    header read by the pragmas): none of it runs on the loop's thread, as the
    profiler of that thread sees it while a checkout opens a new connection (the
    dialect's functions registered there read nothing)."""
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    seen: list[str] = []

    def profile(frame: Any, what: str, arg: Any) -> None:
        if what == "call" and frame.f_code.co_name in ("realpath", "resolve", "isdir"):
            seen.append(frame.f_code.co_name)  # a path resolved, a directory looked at
        elif what == "c_call" and (
            arg is sqlite3.connect
            or (
                isinstance(getattr(arg, "__self__", None), sqlite3.Connection | sqlite3.Cursor)
                and arg.__name__.startswith("execute")
            )
            or getattr(arg, "__self__", None) is os
        ):
            seen.append(arg.__qualname__)  # a file opened, a statement run, a stat

    try:
        async with engine.connect() as first:  # the engine's first connection: initialised
            sys.setprofile(profile)
            try:
                second = await engine.connect().start()
            finally:
                sys.setprofile(None)
            assert (await second.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
            await second.close()
            await first.exec_driver_sql("SELECT 1")
        assert not seen
    finally:
        await engine.dispose()
