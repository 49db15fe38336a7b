"""SQLite's WAL checkpoint runs on a worker thread, never inside a COMMIT on the loop."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import event, text

from eventstore import EventStore, NewEvent, create_engine
from eventstore.engine import begin_write
from eventstore.sqlite_driver import (
    WAL_CHECKPOINT_BYTES,
    WAL_CUT_STEP,
    WAL_SIZE_LIMIT,
    WalCheckpointer,
    _writer_lock,
)
from migrations import runner
from tiu.privacy import reclaim

pytestmark = pytest.mark.sqlite

#: Text per event: an append then writes ~25 KiB of WAL frames (the event's pages and
#: its indexes').
PAYLOAD = "x" * 2000


@pytest.fixture
def db_path(sqlite_template, tmp_path):
    path = tmp_path / "wal.db"
    path.write_bytes(sqlite_template.read_bytes())
    return path


def _wal_size(path: Path) -> int:
    try:
        return os.stat(f"{path}-wal").st_size
    except FileNotFoundError:
        return 0


def _wal_generation(path: Path) -> int:
    """The WAL header's checkpoint sequence number: one more each time the WAL is
    started again (the -wal file holds no lock of SQLite's: reading it here is safe)."""
    try:
        with open(f"{path}-wal", "rb") as wal:
            return int.from_bytes(wal.read(16)[12:16], "big")
    except FileNotFoundError:
        return -1


def _checkpointer(store: EventStore) -> WalCheckpointer:
    (checkpointer,) = store.engine.dialect.loaded_dbapi.checkpointers.values()
    return checkpointer


async def _append(store: EventStore, n: int) -> None:
    await store.append(f"item-{n % 50}", "item", [NewEvent("Noted", {"n": n, "text": PAYLOAD})])


async def _append_until_a_checkpoint_starts(store: EventStore, path: Path, start: int = 0) -> int:
    await _append(store, start)
    checkpointer = _checkpointer(store)  # made with the engine's first connection
    n = start + 1
    while not checkpointer.running:
        await _append(store, n)
        n += 1
        assert n - start < 5000, f"no checkpoint started; WAL at {_wal_size(path)} bytes"
    return n


async def _pragma(store: EventStore, name: str) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(text(f"PRAGMA {name}"))).scalar_one())


async def test_commits_leave_the_wal_checkpoint_to_a_worker_thread(db_path):
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    try:
        assert await _pragma(store, "wal_autocheckpoint") == 0  # no checkpoint in a COMMIT
        assert await _pragma(store, "journal_size_limit") == WAL_SIZE_LIMIT
        await _append_until_a_checkpoint_starts(store, db_path)
        checkpointer = _checkpointer(store)
        await checkpointer.ended()
        busy, frames, copied = checkpointer.last  # type: ignore[misc]
        assert (busy, copied) == (0, frames)
        # Every frame is in the database file: a checkpoint now has nothing to copy, or
        # the WAL was started again.
        db = sqlite3.connect(db_path)
        try:
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            db.close()
        assert (busy, copied) == (0, frames)
    finally:
        await store.engine.dispose()


async def test_the_wal_is_started_again_in_place_under_a_long_append_run(db_path):
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    try:
        assert await _pragma(store, "wal_autocheckpoint") == 0
        # The WAL is started again after each completed checkpoint, not left to grow:
        # within appends that write ~20 times WAL_CHECKPOINT_BYTES, it starts over 3
        # times, and its file is reused in place (never cut back, never past the limit).
        started_again, generation, n = 0, _wal_generation(db_path), 0
        sizes = []
        while started_again < 3:
            await _append(store, n)
            n, previous, generation = n + 1, generation, _wal_generation(db_path)
            started_again += previous >= 0 and generation != previous  # not its creation
            sizes.append(_wal_size(db_path))
            assert n < 20 * WAL_CHECKPOINT_BYTES // len(PAYLOAD), (started_again, sizes[-1])
        assert max(sizes) <= WAL_SIZE_LIMIT
        grown = [size for size in sizes if size > WAL_CHECKPOINT_BYTES]
        assert grown == sorted(grown)  # past its first cycle, the file never shrank
    finally:
        await store.engine.dispose()


async def test_a_writer_that_never_pauses_still_lets_the_wal_start_over(db_path):
    # An import: units of work of many events, one after another, nothing else to wait
    # for. Each transaction writes more frames (~6 MiB) than a round may leave for the
    # round that holds writers back, so every round the writer lets run has fallen
    # behind again: the WAL must still be started again, not grow for as long as the
    # import goes on.
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    try:
        started_again, generation, n = 0, -1, 0
        while started_again < 2:
            async with store.transaction() as uow:
                for i in range(250):
                    uow.append(f"item-{n}x{i}", "item", [NewEvent("Noted", {"text": PAYLOAD})])
            n, previous, generation = n + 1, generation, _wal_generation(db_path)
            started_again += previous >= 0 and generation != previous  # not its creation
            # ~1 MiB of frames a transaction: 220 of them are ~55 times the checkpoint's
            assert n < 220, (started_again, _wal_size(db_path))
    finally:
        await store.engine.dispose()


async def test_a_cancellation_requested_in_a_unit_of_work_leaves_its_end_whole(db_path):
    # The turn of the loop a SQLite unit of work takes comes before it begins: a
    # cancellation requested in the block reaches its caller only once the COMMIT and
    # what follows it are done (the head that readers in this process wait on).
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    try:

        async def unit() -> None:
            async with store.transaction() as uow:
                uow.append("item-1", "item", [NewEvent("Noted", {"n": 1})])
                asyncio.current_task().cancel()  # type: ignore[union-attr]

        task = asyncio.create_task(unit())
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store.dialect.known_head == 1
    finally:
        await store.engine.dispose()


async def test_a_failing_background_checkpoint_does_not_fail_commands(db_path, monkeypatch, caplog):
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    connect = sqlite3.connect

    def refuse_the_checkpointer(database, *args, **kwargs):
        if "mode=rw" in str(database):  # the checkpointer's own connection
            raise sqlite3.OperationalError("disk I/O error")
        return connect(database, *args, **kwargs)

    try:
        await _append(store, 0)  # the engine's connection is open before the fault
        monkeypatch.setattr(sqlite3, "connect", refuse_the_checkpointer)
        with caplog.at_level(logging.WARNING, logger="eventstore.sqlite"):
            n = await _append_until_a_checkpoint_starts(store, db_path, 1)
            await _checkpointer(store).ended()
            await _append(store, n)  # commands go on
        assert isinstance(_checkpointer(store).last, sqlite3.OperationalError)
        assert "WAL checkpoint of" in caplog.text
        assert "disk I/O error" in caplog.text
        # Tried again once the WAL has grown further, and then it succeeds.
        monkeypatch.setattr(sqlite3, "connect", connect)
        await _append_until_a_checkpoint_starts(store, db_path, n + 1)
        await _checkpointer(store).ended()
        last = _checkpointer(store).last
        assert isinstance(last, tuple)
        assert last[0] == 0
    finally:
        await store.engine.dispose()


def _open_files(path: Path) -> list[str]:
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            names.append(target)
    return names


async def test_disposing_the_engine_stops_its_checkpoint_and_leaves_no_connection_open(db_path):
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    await _append_until_a_checkpoint_starts(store, db_path)
    checkpointer = _checkpointer(store)
    await asyncio.wait_for(store.engine.dispose(), 5)
    assert not checkpointer.running
    assert _open_files(db_path) == []


async def test_checkpoints_one_after_another_share_one_connection(db_path, monkeypatch):
    # Opening a connection reads the whole schema: most of a round's CPU.
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    opened = []
    connect = sqlite3.connect

    def counted(database, *args, **kwargs):
        if "mode=rw" in str(database):  # the checkpointer's own connection
            opened.append(database)
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", counted)
    try:
        n = 0
        for _ in range(3):
            n = await _append_until_a_checkpoint_starts(store, db_path, n)
            await _checkpointer(store).ended()
            assert isinstance(_checkpointer(store).last, tuple)
        assert len(opened) == 1
    finally:
        await store.engine.dispose()


async def test_disposing_the_engine_after_a_checkpoint_leaves_no_file_open(db_path):
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    await _append_until_a_checkpoint_starts(store, db_path)
    await _checkpointer(store).ended()
    await store.engine.dispose()
    assert _open_files(db_path) == []


def _inherited_connection_open_after_rounds_in_a_fork(checkpointer: WalCheckpointer) -> bool:
    """Whether the checkpointer's connection a forked process inherited is still there
    and open after two checkpoint rounds of that process. (Looked for by its id among
    the objects the garbage collector tracks: a reference held here would keep it.)"""
    inherited = id(checkpointer._db)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            checkpointer._passive()
            checkpointer._passive()
            gc.collect()
            found = [
                o
                for o in gc.get_objects()
                if id(o) == inherited and isinstance(o, sqlite3.Connection)
            ]
            try:
                is_open = found[0].total_changes >= 0
            except IndexError:  # dropped, which closes it
                is_open = False
            except sqlite3.ProgrammingError:  # closed
                is_open = False
            os.write(write, b"1" if is_open else b"0")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as report:
        answer = report.read()
    os.waitpid(child, 0)
    return answer == "1"


async def test_a_forked_process_checkpointing_leaves_the_connection_it_inherited_open(db_path):
    """A process forked after a checkpoint carries the checkpointer's kept connection:
    its own rounds open their own and never close (nor drop) the inherited one, whose
    close could disturb the parent's use of the file."""
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    try:
        await _append_until_a_checkpoint_starts(store, db_path)
        await _checkpointer(store).ended()
        assert _checkpointer(store)._db is not None  # kept after the round
        assert _inherited_connection_open_after_rounds_in_a_fork(_checkpointer(store))
    finally:
        await store.engine.dispose()


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"])
async def test_a_database_in_memory_has_no_checkpointer(url):
    engine = create_engine(url)
    try:
        await runner.upgrade(engine)
        store = EventStore(engine)
        for n in range(20):
            await _append(store, n)
        assert engine.dialect.loaded_dbapi.checkpointers == {}
    finally:
        await engine.dispose()


async def test_reclaim_waits_for_a_checkpoint_in_progress_and_truncates_the_wal(db_path):
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    try:
        # One large commit: its checkpoint has ~40 MiB to copy, and holds SQLite's
        # checkpoint lock meanwhile (a TRUNCATE then reports itself busy).
        big = [NewEvent("Noted", {"n": n, "text": PAYLOAD * 10}) for n in range(2000)]
        await store.append("item-big", "item", big)
        assert _checkpointer(store).running
        await asyncio.sleep(0.005)  # its thread is copying
        assert await reclaim(store.engine) == "WAL checkpointed and truncated"
        assert _wal_size(db_path) == 0
    finally:
        await store.engine.dispose()


async def test_reclaim_truncates_the_wal_on_a_worker_thread_not_the_loop(db_path):
    engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    threads: set[int] = set()

    def on_statement(sql: str) -> None:
        if "wal_checkpoint(TRUNCATE)" in sql:
            threads.add(threading.get_ident())

    @event.listens_for(engine.sync_engine, "connect")
    def trace(dbapi_connection, _record) -> None:
        dbapi_connection.driver_connection.set_trace_callback(on_statement)

    try:
        await _write_a_checkpoints_worth(engine)
        assert await reclaim(engine) == "WAL checkpointed and truncated"
        assert threads and threading.get_ident() not in threads
    finally:
        await engine.dispose()


async def test_two_engines_on_one_file_never_checkpoint_it_at_once(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    first, second = create_engine(url), create_engine(url)
    try:
        async with first.begin() as conn:  # ~40 MiB: its checkpoint is long
            for _ in range(8):
                await _fill(conn)
        (theirs,) = first.dialect.loaded_dbapi.checkpointers.values()
        assert theirs.running
        await _write_a_checkpoints_worth(second)
        (ours,) = second.dialect.loaded_dbapi.checkpointers.values()
        assert theirs.running and not ours.running  # the file is taken: none started
        await theirs.ended()
        await _write_a_checkpoints_worth(second)
        assert ours.running  # the file is free again
    finally:
        await first.dispose()
        await second.dispose()


async def _fill(conn) -> None:
    """Write a little more than WAL_CHECKPOINT_BYTES of new pages on ``conn``."""
    await conn.execute(text("CREATE TABLE IF NOT EXISTS t (x BLOB)"))
    await conn.execute(
        text(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n) "
            "INSERT INTO t SELECT randomblob(1000) FROM s"
        ),
        {"n": WAL_CHECKPOINT_BYTES // 1000 + 500},
    )


async def _write_a_checkpoints_worth(engine) -> None:
    async with engine.begin() as conn:
        await _fill(conn)


async def test_a_checkpoint_cancelled_before_its_first_step_leaves_the_file_to_the_next_one(
    tmp_path,
):
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    engine = create_engine(url)
    conn = await engine.connect()
    await _fill(conn)
    await conn.commit()  # starts a checkpoint's task
    await engine.dispose()  # in the same step of the loop: the task never ran
    await conn.close()
    again = create_engine(url)
    try:
        await _write_a_checkpoints_worth(again)
        (checkpointer,) = again.dialect.loaded_dbapi.checkpointers.values()
        assert checkpointer.running
    finally:
        await again.dispose()


def test_a_checkpoint_left_on_a_closed_loop_does_not_keep_the_next_loop_from_its_own(tmp_path):
    # A host that closes its loop without cancelling its tasks (``loop.close()`` after
    # ``run_until_complete``) while a checkpoint is in progress, then uses the engine on
    # a new loop: that task will never end, and must not keep the file taken.
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    engine = create_engine(url)
    first = asyncio.new_event_loop()
    try:

        async def start_a_long_checkpoint() -> WalCheckpointer:
            async with engine.begin() as conn:  # ~40 MiB: the copy outlasts this loop
                for _ in range(8):
                    await _fill(conn)
            (checkpointer,) = engine.dialect.loaded_dbapi.checkpointers.values()
            return checkpointer

        checkpointer = first.run_until_complete(start_a_long_checkpoint())
        assert checkpointer.running
    finally:
        first.close()
    assert not checkpointer.running  # its task is left on a closed loop

    async def go_on() -> None:
        try:
            for _ in range(20):
                await _write_a_checkpoints_worth(engine)
                assert checkpointer.running  # a new checkpoint, on this loop
                await checkpointer.ended()
                # Refused (busy) while the old loop's round still copies on its thread.
                if checkpointer.last[0] == 0:  # type: ignore[index]
                    break
        finally:
            await engine.dispose()

    asyncio.run(go_on())
    busy, frames, copied = checkpointer.last  # type: ignore[misc]
    assert (busy, copied) == (0, frames)


async def test_reclaim_cancelled_while_it_waits_for_a_checkpoint_is_cancelled(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:
        async with engine.begin() as conn:  # ~40 MiB for one checkpoint to copy
            for _ in range(8):
                await _fill(conn)
        (checkpointer,) = engine.dialect.loaded_dbapi.checkpointers.values()
        assert checkpointer.running
        waiter = asyncio.create_task(reclaim(engine))
        for _ in range(5):  # reclaim reaches its wait; the copy has barely begun
            await asyncio.sleep(0)
        assert checkpointer.running
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter  # not: the checkpoint waited for, then TRUNCATE on the loop
        assert not checkpointer.running  # it waited for the checkpoint's thread
    finally:
        await engine.dispose()


async def test_a_uri_filename_with_a_percent_escape_is_checkpointed(tmp_path):
    # %2541: SQLAlchemy decodes %25 to %, and SQLite opens x%41.db as xA.db.
    engine = create_engine(f"sqlite+aiosqlite:///file:{tmp_path}/x%2541.db?uri=true")
    try:
        await _write_a_checkpoints_worth(engine)
        assert [p.name for p in tmp_path.iterdir() if p.suffix == ".db"] == ["xA.db"]
        (checkpointer,) = engine.dialect.loaded_dbapi.checkpointers.values()
        assert checkpointer.running
        await checkpointer.ended()
        assert checkpointer.last is not None
    finally:
        await engine.dispose()


async def test_a_reader_holding_the_wal_keeps_the_checkpoint_from_holding_writers_back(
    tmp_path,
):
    # A reader's snapshot keeps frames from being copied: a round under the writers'
    # lock could not catch up, and would hold them for a copy as long as the reader
    # lasted. The checkpoint ends without it; a later one copies what is left.
    path = tmp_path / "x.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        await _write_a_checkpoints_worth(engine)
        (checkpointer,) = engine.dialect.loaded_dbapi.checkpointers.values()
        await checkpointer.ended()
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchone()
        for _ in range(3):  # until the WAL has grown enough since the last one began
            await _write_a_checkpoints_worth(engine)
            if checkpointer.running:
                break
        assert checkpointer.running
        lock = _writer_lock(checkpointer.path)
        held = False
        while checkpointer.running:
            held = held or lock.locked()
            await asyncio.sleep(0)
        assert not held
        _, frames, copied = checkpointer.last  # type: ignore[misc]
        assert frames - copied > 1000  # the reader's frames stayed behind
    finally:
        reader.close()
        await engine.dispose()


def _trace_commits(store: EventStore) -> list[int]:
    """The threads each COMMIT of ``store``'s connections runs on, from now on."""
    commits: list[int] = []

    def trace(statement: str) -> None:
        if statement.startswith("COMMIT"):
            commits.append(threading.get_ident())

    @event.listens_for(store.engine.sync_engine, "connect")
    def on_connect(dbapi_connection, _record):
        dbapi_connection.driver_connection.set_trace_callback(trace)

    return commits


async def _fill_past_the_limit_and_checkpoint(store: EventStore) -> None:
    """~25 MiB of frames in one transaction, then a checkpoint that copies them all."""
    async with store.transaction() as uow:
        for i in range(1200):
            uow.append(f"item-{i}", "item", [NewEvent("Noted", {"text": PAYLOAD * 10})])
    await _checkpointer(store).ended()
    busy, frames, copied = _checkpointer(store).last  # type: ignore[misc]
    assert (busy, copied) == (0, frames)


async def test_the_commit_that_cuts_the_wal_back_runs_on_a_worker_thread(db_path):
    # Cutting a large WAL back is an ftruncate as long as the file is large (139 ms for
    # 256 MiB on ext4 with discard): the COMMIT that does it must not hold the loop.
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    commits = _trace_commits(store)
    try:
        await _fill_past_the_limit_and_checkpoint(store)
        assert _wal_size(db_path) > WAL_SIZE_LIMIT
        loop_thread = threading.get_ident()
        commits.clear()
        before = _wal_size(db_path)
        await _append(store, 0)  # starts the WAL again and cuts it back
        assert _wal_size(db_path) < before
        assert len(commits) == 1
        assert commits[0] != loop_thread
        await _append(store, 1)  # the next COMMIT stays on the loop
        assert commits[1:] == [loop_thread]
    finally:
        await store.engine.dispose()


async def test_a_wal_left_large_is_cut_back_a_step_per_commit_not_in_one(db_path):
    # A rebuild's swap leaves a WAL of hundreds of MiB: cutting it back in one COMMIT
    # would hold the write lock, and the commands queued behind it, for the whole
    # ftruncate. Each COMMIT that starts the WAL again cuts at most WAL_CUT_STEP.
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    try:
        async with store.transaction() as uow:  # ~60 MiB of frames in one transaction
            for i in range(2000):
                uow.append(f"item-bulk{i}", "item", [NewEvent("Noted", {"text": PAYLOAD * 15})])
        large = _wal_size(db_path)
        assert large > WAL_SIZE_LIMIT + 3 * WAL_CUT_STEP
        sizes, n = [large], 0
        while sizes[-1] > WAL_SIZE_LIMIT:
            await _checkpointer(store).ended()
            await _append(store, n)  # a checkpoint every WAL_CHECKPOINT_BYTES of them
            n += 1
            sizes.append(_wal_size(db_path))
            assert n < 5000, sizes
        cuts = [before - after for before, after in itertools.pairwise(sizes) if after < before]
        assert len(cuts) >= 3
        assert max(cuts) <= WAL_CUT_STEP
    finally:
        await store.engine.dispose()


async def test_a_wal_within_its_limit_is_started_again_in_place_by_a_commit_on_the_loop(
    db_path,
):
    # Cut back at every start, each cycle of appends paid the ftruncate on a worker
    # thread (which the writer waited for) and the file's growth again in its COMMITs.
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    commits = _trace_commits(store)
    try:
        n = await _append_until_a_checkpoint_starts(store, db_path)
        checkpointer = _checkpointer(store)
        await checkpointer.ended()
        busy, frames, copied = checkpointer.last  # type: ignore[misc]
        assert (busy, copied) == (0, frames)
        size = _wal_size(db_path)
        assert WAL_CHECKPOINT_BYTES <= size <= WAL_SIZE_LIMIT
        generation = _wal_generation(db_path)
        commits.clear()
        await _append(store, n)  # starts the WAL again, in place
        assert commits == [threading.get_ident()]
        assert _wal_generation(db_path) == generation + 1
        assert _wal_size(db_path) == size
    finally:
        await store.engine.dispose()


async def test_a_write_transaction_that_writes_nothing_leaves_the_cut_to_the_next_write(db_path):
    # Only a COMMIT that writes frames starts the WAL again: one of a write transaction
    # that wrote nothing (a command answered from its idempotency record, say) must not
    # use up the worker-thread COMMIT, else the next write cuts the file on the loop.
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{db_path}"))
    commits = _trace_commits(store)
    try:
        await _fill_past_the_limit_and_checkpoint(store)
        before = _wal_size(db_path)
        assert before > WAL_SIZE_LIMIT
        async with store.engine.connect() as conn:
            await begin_write(conn)
            await conn.commit()
        assert _wal_size(db_path) == before
        commits.clear()
        await _append(store, 0)  # starts the WAL again and cuts it back
        assert before - WAL_CUT_STEP <= _wal_size(db_path) < before
        assert len(commits) == 1
        assert commits[0] != threading.get_ident()
    finally:
        await store.engine.dispose()
