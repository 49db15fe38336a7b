"""Rebuilds into shadow tables, on both backends: live tables serve throughout, an
interrupted rebuild resumes, a version bump is reported and fixed, names survive."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.passwords import BcryptHasher
from eventstore import EventStore
from eventstore.schema import events
from projections import checkpoints, replay
from projections.readmodels import ALL_PROJECTORS, UsersProjector
from projections.readmodels.tasks import tasks_table
from projections.readmodels.users import users_table
from projections.runner import Worker
from tests.projections.worker_process import append_events, read_models, workload
from tiu import DatabaseService, Settings
from tiu.service import ProjectionMode


@pytest.fixture
async def store(engine: AsyncEngine) -> AsyncIterator[EventStore]:
    event_store = EventStore(engine)
    yield event_store
    await event_store.aclose()


async def project_all(store: EventStore) -> None:
    worker = Worker(store, ALL_PROJECTORS, batch_size=100, leader_election=False)
    await worker.catch_up()


async def active_positions(store: EventStore) -> dict[str, tuple[int, int]]:
    async with store.engine.connect() as conn:
        rows = await checkpoints.all_checkpoints(conn)
    return {c.name: (c.version, c.position) for c in rows if c.active}


async def head(store: EventStore) -> int:
    async with store.engine.connect() as conn:
        return await store.head_position(conn)


def index_names(sync: Connection, table: str) -> set[str]:
    return {str(ix["name"]) for ix in inspect(sync).get_indexes(table)}


async def test_live_tables_serve_during_a_rebuild_which_ends_equal_at_the_head(
    store: EventStore,
) -> None:
    await append_events(store, workload(400, seed=1))
    await project_all(store)
    before = await read_models(store.engine)
    n_tasks = len(before["tasks"])
    seen: list[int] = []
    done = asyncio.Event()

    async def reader() -> None:
        while not done.is_set():
            async with store.engine.connect() as conn:
                seen.append(int(await conn.scalar(select(func.count()).select_from(tasks_table))))
            await asyncio.sleep(0)

    reading = asyncio.create_task(reader())
    try:
        reports = await replay.rebuild_all(store, ALL_PROJECTORS, batch_size=25)
    finally:
        done.set()
        await reading
    assert len(seen) > 1
    assert set(seen) == {n_tasks}  # never empty, never half-built
    assert await read_models(store.engine) == before
    top = await head(store)
    assert all(r.position == top for r in reports)
    assert await active_positions(store) == {p.name: (p.version, top) for p in ALL_PROJECTORS}
    async with store.engine.connect() as conn:
        names = {c.name for c in await checkpoints.all_checkpoints(conn)}
    assert names == {p.name for p in ALL_PROJECTORS}  # no "#rebuild" row left


class Interrupt(Exception):
    pass


async def test_an_interrupted_rebuild_resumes_from_its_checkpoint(store: EventStore) -> None:
    await append_events(store, workload(300, seed=2))
    await project_all(store)
    before = await read_models(store.engine)
    projector = ALL_PROJECTORS[2]  # tasks: most events
    progress: list[int] = []

    def stop_after_first_batch(p: replay.RebuildProgress) -> None:
        progress.append(p.position)
        raise Interrupt

    with pytest.raises(Interrupt):
        await replay.rebuild(store, projector, batch_size=20, on_progress=stop_after_first_batch)
    assert progress[0] > 0
    async with store.engine.connect() as conn:
        plan = await replay.plan(conn, projector)
    assert plan.resume_from == progress[0]
    # More events arrive (and are projected live) before the rebuild is resumed.
    await append_events(store, workload(360, seed=2)[300:])
    await project_all(store)
    expected = await read_models(store.engine)
    assert expected != before

    report = await replay.rebuild(store, projector, batch_size=20)
    assert report.resumed_from == progress[0]
    assert report.position == await head(store)
    assert await read_models(store.engine) == expected
    assert (await active_positions(store))[projector.name] == (1, report.position)


async def test_a_log_longer_than_swap_within_is_applied_in_bulk_batches_not_in_the_swap(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bulk batches may be large; the swap, which holds the live tables locked, is left
    # at most SWAP_WITHIN events (here 15), however large the batches.
    monkeypatch.setattr(replay, "SWAP_WITHIN", 15)
    await append_events(store, workload(200, seed=3))
    await project_all(store)
    expected = await read_models(store.engine)
    projector = ALL_PROJECTORS[2]
    progress: list[int] = []
    report = await replay.rebuild(
        store, projector, batch_size=1000, on_progress=lambda p: progress.append(p.position)
    )
    end = await head(store)
    # One bulk batch (1,000 > 200 events: all of them), then the swap with nothing left.
    assert progress == [end, end]
    assert report.position == end
    assert await read_models(store.engine) == expected


class UsersV2(UsersProjector):
    version = 2


async def test_a_bumped_version_is_stale_until_rebuilt(engine: AsyncEngine) -> None:
    projectors = (UsersV2(), *ALL_PROJECTORS[1:])
    service = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        projectors=projectors,
        projection_mode=ProjectionMode.WORKER,
    )
    store = service.store
    try:
        await append_events(store, workload(120, seed=3))
        await project_all(store)  # version 1 of everything is live
        before = await read_models(engine)
        await service.start(migrate=False)  # registers (users, 2) beside the live version 1
        async with engine.connect() as conn:
            stale = await replay.stale_projectors(conn, projectors)
        assert [p.name for p in stale] == ["users"]
        stats = await service.get_statistics()
        assert stats["projectors"]["users"]["needs_rebuild"] is True
        assert stats["projectors"]["users"]["active_version"] == 1
        assert stats["projectors"]["tasks"]["needs_rebuild"] is False

        report = await replay.rebuild(store, projectors[0], batch_size=30)
        assert report.version == 2
        async with engine.connect() as conn:
            assert await replay.stale_projectors(conn, projectors) == []
            users_rows = await checkpoints.all_checkpoints(conn)
        assert [(c.name, c.version, c.active) for c in users_rows if c.name == "users"] == [
            ("users", 2, True)
        ]
        stats = await service.get_statistics()
        assert stats["projectors"]["users"]["needs_rebuild"] is False
        assert stats["projectors"]["users"]["lag"] == 0
        assert await read_models(engine) == before
    finally:
        await store.aclose()


async def test_swapped_tables_keep_their_live_index_names(store: EventStore) -> None:
    await append_events(store, workload(80, seed=4))
    await project_all(store)
    live_indexes = {ix.name for ix in users_table.indexes}
    async with store.engine.connect() as conn:
        before = await conn.run_sync(index_names, "users")
    assert "ix_users_email_lower" in before
    projector = ALL_PROJECTORS[0]
    for _ in range(2):  # twice: a second rebuild must not trip over the first's names
        await replay.rebuild(store, projector, batch_size=10)
        async with store.engine.connect() as conn:
            after = await conn.run_sync(index_names, "users")
            tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        assert after == before
        assert not {t for t in tables if t.endswith(replay.SHADOW_SUFFIX)}
    # The swap must not have changed the application's table definitions.
    assert {ix.name for ix in users_table.indexes} == live_indexes
    assert len(users_table.indexes) == len(live_indexes)


async def test_secondary_indexes_are_built_after_the_bulk_and_all_swapped_in(
    store: EventStore,
) -> None:
    """A shadow table is filled with only its key, unique and rebuild indexes (the
    others were most of a replay's work, maintained row by row); every live index is
    back after the swap, for every projector."""
    await append_events(store, workload(80, seed=5))
    await project_all(store)
    for projector in ALL_PROJECTORS:
        shadows = replay.shadow_tables(projector)
        await replay._prepare(store, projector)
        async with store.engine.connect() as conn:
            for name, shadow in shadows.items():
                built = await conn.run_sync(index_names, shadow.name)
                deferred = {str(ix.name) for ix in replay.deferred_indexes(projector, shadow)}
                wanted = {str(ix.name) for ix in shadow.indexes} - deferred
                assert wanted <= built, name
                assert not built & deferred, name
            before = {t.name: await conn.run_sync(index_names, t.name) for t in projector.tables}
        if projector.name == "tasks":  # six secondary indexes and the cross-project one
            assert len(replay.deferred_indexes(projector, shadows["tasks"])) == 7
        await replay.rebuild(store, projector, batch_size=10)
        async with store.engine.connect() as conn:
            after = {t.name: await conn.run_sync(index_names, t.name) for t in projector.tables}
        assert after == before
        assert all(after[t.name] >= {str(ix.name) for ix in t.indexes} for t in projector.tables)


async def test_rebuild_of_an_empty_log_swaps_in_empty_tables(store: EventStore) -> None:
    report = await replay.rebuild(store, ALL_PROJECTORS[0])
    assert (report.position, report.applied) == (0, 0)
    assert (await active_positions(store))["users"] == (1, 0)
    assert (await read_models(store.engine))["users"] == []


async def test_a_swap_blocked_by_a_long_reader_waits_and_retries(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite readers never block the swap (WAL)")
    from sqlalchemy import text

    attempts: list[int] = []
    timed_out = asyncio.Event()
    swap = replay._swap

    async def counted(*args, **kwargs):
        attempts.append(1)
        try:
            return await swap(*args, **kwargs)
        except Exception:
            timed_out.set()
            raise

    monkeypatch.setattr(replay, "_swap", counted)

    await append_events(store, workload(200, seed=5))
    tasks = next(p for p in ALL_PROJECTORS if p.name == "tasks")
    await replay.rebuild(store, tasks)
    reader = await store.engine.connect()
    await reader.execute(text("SELECT count(*) FROM tasks"))  # holds ACCESS SHARE

    async def finish_reading() -> None:
        # The reader lets go only once a swap has given up on its 2 s lock_timeout, so a
        # slow rebuild on a loaded machine cannot reach the swap after the reader left.
        try:
            await asyncio.wait_for(timed_out.wait(), timeout=60)
        finally:
            await reader.rollback()
        await reader.close()

    release = asyncio.create_task(finish_reading())
    report = await replay.rebuild(store, tasks)
    await release
    assert report.position == await _head(store)
    assert len(attempts) >= 3  # the first rebuild's swap, then a timed-out one and a retry


async def _head(store: EventStore) -> int:
    async with store.engine.connect() as conn:
        return await store.head_position(conn)


async def test_a_rebuild_sharing_the_loop_lets_other_tasks_run_and_leaves_the_gc_alone(
    store: EventStore,
) -> None:
    """Inside a service (``pause_every``) the Python work suspends every that many
    events, and the host's garbage collector is left as it is; only a caller owning
    the process (``freeze_heap``, as ``tiu replay``) freezes it."""
    await append_events(store, workload(600, seed=9))
    await project_all(store)
    tasks = next(p for p in ALL_PROJECTORS if p.name == "tasks")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    frozen: list[int] = []
    running = asyncio.create_task(ticker())
    try:
        shared = await replay.rebuild(
            store,
            tasks,
            batch_size=10_000,
            pause_every=20,
            on_progress=lambda _: frozen.append(gc.get_freeze_count()),
        )
        shared_ticks, ticks = ticks, 0
        alone = await replay.rebuild(
            store,
            tasks,
            batch_size=10_000,
            freeze_heap=True,
            on_progress=lambda _: frozen.append(gc.get_freeze_count()),
        )
    finally:
        running.cancel()
    handled = shared.applied
    assert handled == alone.applied > 100
    assert shared_ticks >= handled // 20  # at least once per chunk of 20 events
    assert frozen[0] == 0 and frozen[-1] > 0


class TasksV2(type(ALL_PROJECTORS[2])):  # type: ignore[misc]
    version = 2


async def test_two_rebuilds_of_one_projector_at_once_both_end_with_the_tables_right(
    store: EventStore,
) -> None:
    # Two services starting together after a projector's version changed rebuild it
    # at once. They take turns batch by batch (each goes on from where the other's
    # last batch ended) and whichever swaps second finds the rebuild done: neither
    # applies an event twice (on PostgreSQL one failed on a duplicate key in the
    # shadow table, blaming the projector).
    await append_events(store, workload(400, seed=7))
    await project_all(store)
    expected = await read_models(store.engine)
    first, second = await asyncio.gather(
        replay.rebuild(store, TasksV2(), batch_size=20),
        replay.rebuild(store, TasksV2(), batch_size=20),
    )
    top = await head(store)
    assert first.position == second.position == top
    async with store.engine.connect() as conn:
        handled = await conn.scalar(
            select(func.count())
            .select_from(events)
            .where(events.c.event_type.in_(sorted(TasksV2().handles)))
        )
    assert first.applied + second.applied == handled  # each event applied once
    assert await read_models(store.engine) == expected
    assert (await active_positions(store))["tasks"] == (2, top)
    async with store.engine.connect() as conn:
        names = {c.name for c in await checkpoints.all_checkpoints(conn)}
    assert not any(name.endswith("#rebuild") for name in names)
