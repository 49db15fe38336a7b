"""Group commit at the store: concurrent ``append`` calls share transactions, and no
caller's append is lost or refused because of another caller's."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore import (
    NO_STREAM,
    DuplicateEventId,
    EngineOptions,
    EventStore,
    NewEvent,
    StoreUnavailable,
    WrongExpectedVersion,
    create_engine,
    verify,
)
from eventstore.grouping import ANSWER_SLICE, GroupQueue, Waiting
from tests.conftest import sqlite_write_lock_free


def ev(n: int = 0, event_id: uuid.UUID | None = None) -> NewEvent:
    return NewEvent("Happened", {"n": n}, event_id=event_id or uuid.uuid4())


def _count_commits(store: EventStore) -> list[int]:
    """Count transactions; each holds its lock a moment, so that callers overlap (an
    inline SQLite append never waits, so without it nothing would ever be queued)."""
    commits: list[int] = []

    async def count(_streams: object) -> None:
        commits.append(1)
        await asyncio.sleep(0.005)

    store.before_commit = count
    return commits


async def _positions(store: EventStore) -> list[int]:
    async with store.engine.connect() as conn:
        return [e.position for e in await store.read_all(conn, 0, 10_000)]


async def test_concurrent_appends_share_transactions_and_keep_a_gap_free_order(store):
    commits = _count_commits(store)
    results = await asyncio.gather(
        *(store.append(f"user-{n}", "user", [ev(n), ev(n)], NO_STREAM) for n in range(40))
    )
    assert len(commits) < 40  # grouped
    spans = sorted((r.first_position, r.last_position) for r in results)
    assert [p for span in spans for p in range(span[0], span[1] + 1)] == list(range(1, 81))
    assert await _positions(store) == list(range(1, 81))
    assert all(r.last_version == 2 for r in results)


async def test_a_failed_version_check_in_a_group_refuses_only_that_append(store):
    await store.append("user-taken", "user", [ev()])
    commits = _count_commits(store)
    outcomes = await asyncio.gather(
        *(store.append(f"user-{n}", "user", [ev(n)], NO_STREAM) for n in range(10)),
        store.append("user-taken", "user", [ev(99)], NO_STREAM),
        *(store.append(f"user-{n}", "user", [ev(n)], NO_STREAM) for n in range(10, 20)),
        return_exceptions=True,
    )
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == 1
    assert isinstance(refused[0], WrongExpectedVersion)
    assert refused[0].stream_id == "user-taken"
    assert len(commits) < 20
    assert await _positions(store) == list(range(1, 22))


async def test_a_group_that_fails_as_a_whole_is_retried_append_by_append(store):
    """A duplicate event id fails the group's INSERT: the others still commit, and only
    the caller who sent the duplicate gets an error."""
    taken = uuid.uuid4()
    await store.append("user-first", "user", [ev(event_id=taken)])
    outcomes = await asyncio.gather(
        *(store.append(f"user-{n}", "user", [ev(n)]) for n in range(8)),
        store.append("user-dup", "user", [ev(event_id=taken)]),
        *(store.append(f"user-{n}", "user", [ev(n)]) for n in range(8, 16)),
        return_exceptions=True,
    )
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    assert failed == [8]
    assert await _positions(store) == list(range(1, 18))


async def test_without_group_appends_each_append_is_a_transaction(engine):
    store = EventStore(engine, group_appends=False)
    commits = _count_commits(store)
    await asyncio.gather(*(store.append(f"user-{n}", "user", [ev(n)]) for n in range(10)))
    assert len(commits) == 10
    await store.aclose()


@pytest.mark.parametrize("max_group", [1, 3])
async def test_groups_never_exceed_max_group(engine, max_group):
    store = EventStore(engine, max_group=max_group)
    sizes: list[int] = []

    async def size(streams: list[str]) -> None:
        sizes.append(len(streams))
        await asyncio.sleep(0.005)

    store.before_commit = size
    await asyncio.gather(*(store.append(f"user-{n}", "user", [ev(n)]) for n in range(12)))
    assert max(sizes) <= max_group
    assert sum(sizes) == 12
    await store.aclose()


async def test_a_group_whose_every_append_is_refused_writes_nothing(store):
    await store.append("user-taken", "user", [ev()])
    _count_commits(store)
    outcomes = await asyncio.gather(
        *(store.append("user-taken", "user", [ev(n)], NO_STREAM) for n in range(6)),
        return_exceptions=True,
    )
    assert all(isinstance(o, WrongExpectedVersion) for o in outcomes)
    assert await _positions(store) == [1]


async def test_appends_on_the_direct_driver_path_are_grouped_and_gap_free(store):
    """Appends run on a bare pooled driver connection:
    one checkout per transaction, so fewer checkouts than appends means grouping."""
    checkouts: list[int] = []
    event.listen(store.engine.sync_engine, "checkout", lambda *_: checkouts.append(1))
    results = await asyncio.gather(
        *(store.append(f"user-{n}", "user", [ev(n), ev(n)], NO_STREAM) for n in range(40))
    )
    assert 1 <= len(checkouts) < 40
    spans = sorted((r.first_position, r.last_position) for r in results)
    assert [p for span in spans for p in range(span[0], span[1] + 1)] == list(range(1, 81))
    assert await _positions(store) == list(range(1, 81))


async def test_cancelled_appends_leave_no_transaction_or_busy_connection_behind(store):
    """Callers cancelled at any point of their append: each append is all or nothing,
    no connection stays checked out, and the store goes on appending gap-free."""
    for delay in (0, 0.0005, 0.001, 0.002, 0.004):
        tasks = [
            asyncio.create_task(store.append(f"user-{delay}-{n}", "user", [ev(n), ev(n)]))
            for n in range(6)
        ]
        await asyncio.sleep(delay)
        for task in tasks[::2]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await store.aclose()  # a group taken before its callers were cancelled may still run
    assert store.engine.pool.checkedout() == 0
    last = await store.append("user-after", "user", [ev()])
    async with store.engine.connect() as conn:
        events = await store.read_all(conn, 0, 10_000)
        report = await verify(conn)
    assert [e.position for e in events] == list(range(1, last.last_position + 1))
    per_stream: dict[str, int] = {}
    for e in events:
        per_stream[e.stream_id] = per_stream.get(e.stream_id, 0) + 1
    assert per_stream.pop("user-after") == 1
    assert set(per_stream.values()) == {2}  # whole appends only
    assert report.ok, report


async def test_appends_one_after_another_share_the_writers_connection_and_give_it_back(
    store, monkeypatch
):
    """A caller appending again as soon as it is answered joins the same group writer,
    which keeps its pooled connection between groups (one checkout, not one per
    append) and returns it to the pool when no one is waiting."""
    # Which pooled connection each group is written on (a checkout makes a new one;
    # the list keeps them alive, so their ids stay distinct). Counting pool checkouts
    # instead also counted PostgreSQL's NOTIFY task, whose number grows with time.
    written_on: list[object] = []
    append_on = store.dialect._append_on

    async def recording(raw, *args):
        written_on.append(raw)
        return await append_on(raw, *args)

    monkeypatch.setattr(store.dialect, "_append_on", recording)
    results = [await store.append(f"user-{n}", "user", [ev(n)], NO_STREAM) for n in range(20)]
    assert [r.last_position for r in results] == list(range(1, 21))
    assert len(written_on) == 20
    assert len({id(raw) for raw in written_on}) == 1  # one checkout for the burst
    await store.aclose()  # waits for the writer to go idle
    assert store.engine.pool.checkedout() == 0


async def test_the_group_writer_returns_its_connection_after_a_failed_append(store):
    """A group that fails gives its connection back to the pool; the next group takes
    a fresh one, and nothing stays checked out once the writer is idle."""
    taken = uuid.uuid4()
    await store.append("user-first", "user", [ev(event_id=taken)])
    checkouts: list[int] = []
    event.listen(store.engine.sync_engine, "checkout", lambda *_: checkouts.append(1))
    with pytest.raises(DuplicateEventId):
        await store.append("user-dup", "user", [ev(event_id=taken)])
    after = await store.append("user-after", "user", [ev()])
    assert after.last_position == 2
    assert len(checkouts) >= 2  # the failed group's connection was not kept
    await store.aclose()
    assert store.engine.pool.checkedout() == 0
    assert await _positions(store) == [1, 2]


async def test_callers_arriving_while_a_lone_callers_append_waits_are_written_after_it(store):
    """A caller who finds the queue idle writes its own append (on SQLite, in its own
    task; on PostgreSQL a writer task does); callers arriving while that write waits
    (here: for a commit held back) queue behind it, and a writer writes them once it
    ends: none is left waiting."""
    release = asyncio.Event()
    held = asyncio.Event()
    written_by: list[tuple[list[str], asyncio.Task[object] | None]] = []

    async def hold(streams: list[str]) -> None:
        written_by.append((list(streams), asyncio.current_task()))
        if streams == ["user-first"]:
            held.set()
            await release.wait()

    store.before_commit = hold
    first = asyncio.ensure_future(store.append("user-first", "user", [ev()]))
    await asyncio.wait_for(held.wait(), 5)
    later = [asyncio.ensure_future(store.append(f"user-{n}", "user", [ev(n)])) for n in range(3)]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in later)  # queued behind the write that waits
    assert len(written_by) == 1
    release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *later), 5)
    assert [r.last_position for r in results] == [1, 2, 3, 4]
    assert (written_by[0][1] is first) is store.dialect.writes_in_caller
    assert [streams for streams, _ in written_by[1:]] == [["user-0", "user-1", "user-2"]]
    assert written_by[1][1] not in (first, *later)  # a writer task: one group for them
    await store.aclose()
    assert store.engine.pool.checkedout() == 0


async def test_aclose_waits_for_an_append_in_progress(store):
    """``aclose`` returns once every append already submitted is written (the service
    then disposes the engine): one written by its lone caller too, not only a group."""
    release = asyncio.Event()
    held = asyncio.Event()

    async def hold(_streams: object) -> None:
        held.set()
        await release.wait()

    store.before_commit = hold
    append = asyncio.ensure_future(store.append("user-first", "user", [ev()]))
    await asyncio.wait_for(held.wait(), 5)
    closing = asyncio.ensure_future(store.aclose())
    await asyncio.sleep(0.01)
    assert not closing.done()  # the append still holds its connection
    release.set()
    await asyncio.wait_for(closing, 5)
    assert append.done()
    assert (await append).last_position == 1
    assert store.engine.pool.checkedout() == 0


def _lock_elsewhere(engine: AsyncEngine) -> sqlite3.Connection:
    """Another process's writer (a connection outside the store's engine) holding the
    database's write lock."""
    other = sqlite3.connect(engine.url.database, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


@pytest.mark.sqlite
async def test_a_caller_arriving_while_a_lone_append_waits_for_another_process_is_written(
    sqlite_engine,
):
    store = EventStore(sqlite_engine)
    writers: list[asyncio.Task[object] | None] = []

    async def record(_streams: object) -> None:
        writers.append(asyncio.current_task())

    store.before_commit = record
    other = _lock_elsewhere(sqlite_engine)
    try:
        first = asyncio.ensure_future(store.append("user-first", "user", [ev()]))
        await asyncio.sleep(0.02)  # its BEGIN IMMEDIATE is refused, and tried again
        second = asyncio.ensure_future(store.append("user-second", "user", [ev()]))
        await asyncio.sleep(0.02)
        assert not first.done() and not second.done()
        other.execute("COMMIT")
    finally:
        other.close()
    results = await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert [r.last_position for r in results] == [1, 2]
    assert writers[0] is first and writers[1] not in (first, second)
    await store.aclose()
    assert store.engine.pool.checkedout() == 0


@pytest.mark.sqlite
async def test_a_lone_append_cancelled_while_another_process_holds_the_lock_runs_to_its_end(
    sqlite_engine, caplog
):
    """Cancelled while its own write waits for the lock another process holds: the
    write stops there, and a writer task writes the append once the lock is free,
    ahead of a caller queued behind it, as for an append a group writer had taken. No
    lock, transaction or connection is left behind."""
    store = EventStore(sqlite_engine)
    other = _lock_elsewhere(sqlite_engine)
    try:
        gone = asyncio.ensure_future(store.append("user-gone", "user", [ev()]))
        await asyncio.sleep(0.02)  # its BEGIN IMMEDIATE is refused, and tried again
        behind = asyncio.ensure_future(store.append("user-behind", "user", [ev()]))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        await asyncio.sleep(0.02)
        assert not behind.done()
        other.execute("COMMIT")
    finally:
        other.close()
    assert (await asyncio.wait_for(behind, 5)).last_position == 2
    await store.aclose()
    assert store.engine.pool.checkedout() == 0
    assert sqlite_write_lock_free(sqlite_engine.url.database)  # no lock left behind
    assert (await store.append("user-after", "user", [ev()])).last_position == 3
    async with store.engine.connect() as conn:
        streams = [e.stream_id for e in await store.read_all(conn, 0, 10)]
    assert streams == ["user-gone", "user-behind", "user-after"]
    await store.aclose()
    gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"]


@pytest.fixture
async def full_sync_store(sqlite_template, tmp_path) -> AsyncIterator[EventStore]:
    """A store on a copy of the template with ``synchronous=FULL``: its COMMIT runs on
    a worker thread."""
    path = tmp_path / "full.db"
    shutil.copyfile(sqlite_template, path)
    engine = create_engine(f"sqlite+aiosqlite:///{path}", EngineOptions(sqlite_synchronous="FULL"))
    store = EventStore(engine)
    try:
        yield store
    finally:
        await store.aclose()
        await engine.dispose()


def _append_cancelled_at_its_commit(
    store: EventStore, stream_id: str, *, unit: bool = False
) -> asyncio.Task[object]:
    """An append (``unit``: one of a unit of work, ``store.transaction()``) whose caller
    is cancelled as its COMMIT begins: the cancellation lands at the next wait, the
    COMMIT on its thread."""
    caller: asyncio.Task[object] | None = None

    async def cancel_caller(_streams: object) -> None:
        assert caller is not None
        caller.cancel()

    async def in_unit() -> None:
        async with store.transaction() as uow:
            uow.append(stream_id, "user", [ev()])

    store.before_commit = cancel_caller
    caller = asyncio.ensure_future(in_unit() if unit else store.append(stream_id, "user", [ev()]))
    return caller


@pytest.mark.sqlite
async def test_a_lone_append_cancelled_while_its_commit_runs_on_a_thread_is_committed(
    full_sync_store, caplog
):
    """With ``synchronous=FULL`` COMMIT runs on a worker thread: a caller cancelled
    there waits for it, so the append is committed (once: written again by the writer
    task, it is refused by its event id) and its connection goes back clean."""
    store = full_sync_store
    caller = _append_cancelled_at_its_commit(store, "user-gone")
    with pytest.raises(asyncio.CancelledError):
        await caller
    store.before_commit = None
    assert (await store.append("user-after", "user", [ev()])).last_position == 2
    await store.aclose()
    assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with store.engine.connect() as conn:
        assert [e.stream_id for e in await store.read_all(conn, 0, 10)] == [
            "user-gone",
            "user-after",
        ]
    await store.engine.dispose()
    gc.collect()  # an outcome nobody retrieved would be reported now
    assert not [r for r in caplog.records if r.name == "asyncio"]


@pytest.mark.sqlite
async def test_a_lone_append_cancelled_after_its_commit_on_a_thread_counts_as_appended(
    full_sync_store,
):
    """Cancelled while its COMMIT runs on a worker thread (``synchronous=FULL``), the
    caller waits for it, so the append is in the log: the store's known head moves
    past it at once, as after any COMMIT (waiters on new events wake, the session
    cache is not taken as current), and its connection, left free and out of any
    transaction, stays in the pool rather than being dropped and opened again."""
    store = full_sync_store
    pool: list[str] = []
    for name in ("connect", "invalidate"):
        event.listen(store.engine.sync_engine, name, lambda *_, name=name: pool.append(name))
    caller = _append_cancelled_at_its_commit(store, "user-gone")
    woken = asyncio.ensure_future(store.wait_for_append(0, timeout=5))
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert store.dialect.known_head == 1
    assert await asyncio.wait_for(woken, 1)
    store.before_commit = None
    assert (await store.append("user-after", "user", [ev()])).last_position == 2
    await store.aclose()
    assert pool == ["connect"]


@pytest.mark.sqlite
async def test_a_unit_of_work_cancelled_after_its_commit_on_a_thread_counts_as_appended(
    full_sync_store,
):
    """As a lone append: a unit of work (``store.transaction()``, every command's)
    whose caller is cancelled while its COMMIT runs on a worker thread is in the log,
    and the store's known head moves past it at once: waiters on new events wake now,
    not at the next append."""
    store = full_sync_store
    caller = _append_cancelled_at_its_commit(store, "user-gone", unit=True)
    woken = asyncio.ensure_future(store.wait_for_append(0, timeout=5))
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert store.dialect.known_head == 1
    assert await asyncio.wait_for(woken, 1)
    store.before_commit = None
    async with store.engine.connect() as conn:
        assert [e.stream_id for e in await store.read_all(conn, 0, 10)] == ["user-gone"]


async def test_a_caller_cancelled_while_its_group_fails_as_a_whole_is_not_written_after(store):
    """A group whose transaction fails as a whole is retried append by append, but for
    the callers still waiting only: one cancelled while the group was written was told
    so, and the group left nothing of its append, so nothing of it is written after."""
    gone: asyncio.Task[object] | None = None

    async def cancel_one_then_fail(streams: list[str]) -> None:
        if len(streams) > 1 and gone is not None and not gone.done():
            gone.cancel()
            await asyncio.wait([gone])  # its caller has been told it was cancelled
            raise RuntimeError("the group's transaction fails")

    store.before_commit = cancel_one_then_fail
    callers = [
        asyncio.ensure_future(store.append(f"user-{n}", "user", [ev(n)], NO_STREAM))
        for n in range(4)
    ]
    gone = callers[-1]
    outcomes = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
    assert isinstance(outcomes[-1], asyncio.CancelledError)
    assert not any(isinstance(o, BaseException) for o in outcomes[:-1]), outcomes
    store.before_commit = None
    await store.aclose()
    assert store.engine.pool.checkedout() == 0
    async with store.engine.connect() as conn:
        logged = [e.stream_id for e in await store.read_all(conn, 0, 10)]
    assert sorted(logged) == ["user-0", "user-1", "user-2"]


class _Turns:
    """Counts the turns of the loop while in use (``async with``): another task that
    adds one each time it runs."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Turns:
        self._task = asyncio.ensure_future(self._tick())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _tick(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)


async def test_other_tasks_run_during_a_loop_of_appends_by_a_lone_caller(store):
    """A caller alone whose appends never suspend (SQLite) still lets the loop turn."""
    async with _Turns() as turns:
        await asyncio.sleep(0)
        started = turns.count
        for n in range(100):
            await store.append(f"user-{n}", "user", [ev(n)], NO_STREAM)
        assert turns.count > started
    await store.aclose()


async def test_other_tasks_run_between_two_groups_of_a_writer_that_never_suspends():
    seen: list[int] = []
    async with _Turns() as turns:

        async def write(group: list[Waiting[int, int]]) -> None:
            seen.append(turns.count)  # no await: like a group of inline SQLite statements
            for item, future in group:
                future.set_result(item)

        queue: GroupQueue[int, int] = GroupQueue(write, max_group=1)
        assert await asyncio.gather(*(queue.submit(n) for n in range(4))) == [0, 1, 2, 3]
    assert seen == sorted(set(seen))  # the other task ran between every two groups


async def test_items_put_back_by_the_writer_lead_the_next_group():
    groups: list[list[int]] = []

    async def write(group: list[Waiting[int, int]]) -> None:
        groups.append([item for item, _ in group])
        written, rest = group[:2], group[2:]
        queue.put_back(rest)
        for item, future in written:
            future.set_result(item)

    queue: GroupQueue[int, int] = GroupQueue(write, max_group=64)
    assert await asyncio.gather(*(queue.submit(n) for n in range(5))) == [0, 1, 2, 3, 4]
    assert groups == [[0, 1, 2, 3, 4], [2, 3, 4], [4]]


async def _answered_turns(callers: int, step_cpu: float) -> list[tuple[int, int]]:
    """(caller, turn of the loop it resumed in) for ``callers`` written in one group,
    each running ``step_cpu`` seconds of CPU once resumed."""
    resumed: list[tuple[int, int]] = []

    async def write(group: list[Waiting[int, int]]) -> None:
        for item, future in group:  # no await: the whole group settled at once
            future.set_result(item)

    queue: GroupQueue[int, int] = GroupQueue(write, max_group=64)
    async with _Turns() as turns:

        async def caller(n: int) -> int:
            result = await queue.submit(n)
            resumed.append((n, turns.count))
            end = time.thread_time() + step_cpu
            while time.thread_time() < end:  # its next step: work on the loop
                pass
            return result

        assert await asyncio.gather(*(caller(n) for n in range(callers))) == list(range(callers))
    return resumed


async def test_callers_with_a_long_next_step_are_woken_one_per_turn_of_the_loop():
    """Woken together, a group's callers would run their next steps in one turn of the
    loop, every other task waiting for all of them: callers whose steps are long
    resume one per turn, in order."""
    resumed = await _answered_turns(5, step_cpu=2 * ANSWER_SLICE)
    assert [n for n, _ in resumed] == [0, 1, 2, 3, 4]
    assert len({turn for _, turn in resumed}) == 5  # each on a turn of its own


async def test_callers_with_a_short_next_step_are_woken_several_per_turn():
    """Callers whose steps are short (a loop of appends) are not given a turn of the
    loop each: how many resume per turn grows while the turns stay short."""
    resumed = await _answered_turns(16, step_cpu=0)
    assert [n for n, _ in resumed] == list(range(16))
    assert len({turn for _, turn in resumed}) < 16


async def test_a_caller_cancelled_before_its_answer_leaves_the_others_answered():
    """A caller cancelled once its group is written, before its turn to be answered:
    the others get their own outcomes, and the writer goes idle."""
    gone: asyncio.Task[int] | None = None

    async def write(group: list[Waiting[int, int]]) -> None:
        for item, future in group:
            future.set_result(item)
        assert gone is not None
        gone.cancel()

    idled: list[int] = []
    queue: GroupQueue[int, int] = GroupQueue(write, max_group=64, idle=lambda: idled.append(1))
    tasks = [asyncio.ensure_future(queue.submit(n)) for n in range(4)]
    gone = tasks[2]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert outcomes[:2] == [0, 1] and outcomes[3] == 3
    assert isinstance(outcomes[2], asyncio.CancelledError)
    await queue.aclose()
    assert idled == [1] and not queue.busy


async def test_callers_of_a_group_writer_stopped_by_the_loop_get_store_unavailable():
    """The writer task cancelled (the loop shutting down) while it writes a group, with
    callers queued behind it: none of them was cancelled, so none gets a
    CancelledError (its task would take it for its own cancellation) or an
    undocumented error, but StoreUnavailable; the queue is idle again."""
    writing = asyncio.Event()

    async def write(group: list[Waiting[int, int]]) -> None:
        writing.set()
        await asyncio.Event().wait()

    idled: list[int] = []
    queue: GroupQueue[int, int] = GroupQueue(write, max_group=2, idle=lambda: idled.append(1))
    callers = [asyncio.ensure_future(queue.submit(n)) for n in range(4)]
    await asyncio.wait_for(writing.wait(), 5)
    assert queue._writer is not None
    queue._writer.cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
    assert idled and not queue.busy


async def test_appends_whose_group_writer_is_stopped_get_store_unavailable(store):
    """As above, through the store on both backends: the held group's transaction is
    rolled back (none of its appends is in the log), no connection stays checked out,
    and the store appends again."""
    held = asyncio.Event()

    async def hold_groups_of_several(streams: list[str]) -> None:
        if len(streams) > 1:
            held.set()
            await asyncio.Event().wait()

    store.before_commit = hold_groups_of_several
    callers = [
        asyncio.ensure_future(store.append(f"user-{n}", "user", [ev(n)], NO_STREAM))
        for n in range(4)
    ]
    await asyncio.wait_for(held.wait(), 5)
    assert store._group is not None and store._group._writer is not None
    store._group._writer.cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
    stopped = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(stopped) > 1
    assert all(isinstance(o, StoreUnavailable) for o in stopped), outcomes
    store.before_commit = None
    await store.aclose()
    assert store.engine.pool.checkedout() == 0
    answered = [o.stream_id for o in outcomes if not isinstance(o, BaseException)]
    after = await store.append("user-after", "user", [ev()], NO_STREAM)
    async with store.engine.connect() as conn:
        logged = [e.stream_id for e in await store.read_all(conn, 0, 10)]
    assert logged == [*answered, "user-after"]
    assert after.last_position == len(answered) + 1


async def test_closing_the_queue_while_its_writer_is_stopped_by_the_loop_ends_without_error():
    """``aclose`` waits for the writer; the writer cancelled meanwhile (the loop
    shutting down every other task, then closing the service): ``aclose`` was not
    cancelled, so it ends normally, not with the writer's CancelledError."""
    writing = asyncio.Event()

    async def write(group: list[Waiting[int, int]]) -> None:
        writing.set()
        await asyncio.Event().wait()

    queue: GroupQueue[int, int] = GroupQueue(write, max_group=64)
    caller = asyncio.ensure_future(queue.submit(1))
    await asyncio.wait_for(writing.wait(), 5)
    closing = asyncio.ensure_future(queue.aclose())
    await asyncio.sleep(0)
    assert queue._writer is not None
    queue._writer.cancel()
    await asyncio.wait_for(closing, 5)  # no CancelledError
    assert isinstance((await asyncio.gather(caller, return_exceptions=True))[0], StoreUnavailable)
    assert not queue.busy


async def test_with_echo_on_an_append_logs_each_statement_it_sends_to_the_driver(store, caplog):
    """An append sends its statements to the driver, not through SQLAlchemy; with the
    engine's echo on they are logged all the same, each as it is sent, in order."""
    await store.append("user-warm", "user", [ev()])
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine.Engine")
    caplog.clear()
    await store.append("user-echo", "user", [ev()])
    sent = [r.getMessage() for r in caplog.records if "[driver statement" in r.getMessage()]
    if store.dialect.name == "sqlite":
        assert [s.split()[0] for s in sent] == ["BEGIN", "SELECT", "INSERT", "COMMIT"]
    else:
        assert len(sent) == 1
        assert "tiu_append" in sent[0]
