"""Runners against real databases: a worker process killed mid-run, two workers on
PostgreSQL, ``wait_for``, and the inline runner catching up after a foreign append."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain import Role, users
from domain.base import encode_event
from domain.errors import InvalidCommand
from domain.passwords import BcryptHasher
from eventstore import EngineOptions, EventStore, create_engine
from eventstore.records import NewEvent
from eventstore.schema import events
from projections import checkpoints, replay
from projections.errors import ProjectionTimeout
from projections.projector import Envelope, Projector, Tables
from projections.readmodels import ALL_PROJECTORS
from projections.readmodels.project_stats import project_stats
from projections.readmodels.user_activity import user_activity
from projections.readmodels.users import users_table
from projections.runner import (
    BATCH_GC_THRESHOLD,
    Worker,
    long_lived_heap,
    lowest_position,
    wait_for,
)
from tests.conftest import PASSWORD, PG_URL
from tests.projections.worker_process import T0, append_events, read_models, workload
from tiu import DatabaseService, Settings
from tiu.service import ProjectionMode

ROOT = Path(__file__).resolve().parents[2]


async def head(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return await EventStore(engine).head_position(conn)


async def lowest(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return await lowest_position(conn, ALL_PROJECTORS)


async def schema_of(engine: AsyncEngine) -> str | None:
    if engine.dialect.name != "postgresql":
        return None
    async with engine.connect() as conn:
        return str(await conn.scalar(text("SELECT current_schema()")))


async def rebuilt(store: EventStore) -> dict[str, list[tuple[object, ...]]]:
    await replay.rebuild_all(store, ALL_PROJECTORS, batch_size=500)
    return await read_models(store.engine)


async def task_created_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(
            await conn.scalar(
                select(func.count()).select_from(events).where(events.c.event_type == "TaskCreated")
            )
            or 0
        )


async def counters(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:
        total = await conn.scalar(select(func.coalesce(func.sum(project_stats.c.total), 0)))
        created = await conn.scalar(
            select(func.coalesce(func.sum(user_activity.c.tasks_created), 0))
        )
    return int(total or 0), int(created or 0)


# -- a worker process killed with SIGKILL ---------------------------------------------------


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, engine: AsyncEngine, batch: int) -> WorkerProcess:
        url = engine.url.render_as_string(hide_password=False)
        args = [sys.executable, "-m", "tests.projections.worker_process", url]
        args += ["--batch", str(batch)]
        schema = await schema_of(engine)
        if schema is not None:
            args += ["--schema", schema]
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        worker = cls(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            await worker.finish(signal.SIGKILL)
            pytest.fail(f"worker did not start: {line!r}")
        return worker

    async def finish(self, sig: int) -> tuple[int, bytes]:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        _, err = await asyncio.wait_for(self.proc.communicate(), 30)
        return int(self.proc.returncode or 0), err


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_one_of_three_workers_killed_mid_run_is_covered_without_loss_or_double_apply(
    engine: AsyncEngine,
) -> None:
    # On PostgreSQL the three share the projectors (two each) and the two survivors
    # take over the killed one's; on SQLite all three run every projector, one batch
    # at a time under BEGIN IMMEDIATE.
    rnd = random.Random()
    seed = rnd.randrange(1 << 30)
    store = EventStore(engine)
    items = workload(1500, seed=seed)
    workers: list[WorkerProcess] = []
    try:
        await append_events(store, items[:300])
        for _ in range(3):
            workers.append(await WorkerProcess.start(engine, batch=40))
        # Keep appending while they work; kill one at a random point past the first
        # batch and before they can catch up (a point of their progress, not a moment:
        # appends are fast enough to be done before any fixed delay).
        kill_at = rnd.randrange(340, 1000)
        await wait_until(lambda: _started(engine), 30, "the first batch")
        appending = asyncio.create_task(append_events(store, items[300:1200]))
        await wait_until(lambda: _reached(engine, kill_at), 30, f"position {kill_at}")
        at_kill = await lowest(engine)
        victim = workers.pop(rnd.randrange(3))
        code, err = await victim.finish(signal.SIGKILL)
        assert code == -signal.SIGKILL, err.decode()
        await appending
        top = await head(engine)
        assert 0 < at_kill < top, f"seed {seed}: killed at {at_kill} of {top}"

        await append_events(store, items[1200:])
        top = await head(engine)
        await wait_until(lambda: _reached(engine, top), 60, "the two survivors")
        for worker in workers:
            code, err = await worker.finish(signal.SIGTERM)
            assert code == 0, err.decode()
        workers.clear()

        projected = await read_models(engine)
        n_created = await task_created_count(engine)
        assert await counters(engine) == (n_created, n_created), f"seed {seed}"
        assert projected == await rebuilt(store), f"seed {seed}"
    finally:
        for worker in workers:
            await worker.finish(signal.SIGKILL)
        await store.aclose()


async def _started(engine: AsyncEngine) -> bool:
    return await lowest(engine) > 0


async def _reached(engine: AsyncEngine, position: int) -> bool:
    return await lowest(engine) >= position


# -- two workers on PostgreSQL --------------------------------------------------------------


class Recording(Projector):
    """Wraps a projector and records which worker applied which positions."""

    def __init__(self, inner: Projector, worker: str, log: list[tuple[str, str, int]]) -> None:
        self.inner = inner
        self.worker = worker
        self.log = log
        self.name = inner.name  # type: ignore[misc]
        self.version = inner.version  # type: ignore[misc]
        self.tables = inner.tables  # type: ignore[misc]
        self.handles = inner.handles  # type: ignore[misc]

    async def apply_batch(
        self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables
    ) -> None:
        await self.inner.apply_batch(conn, envelopes, t)
        self.log.extend((self.worker, self.name, e.position or 0) for e in envelopes)


class RunningWorker:
    def __init__(self, name: str, schema: str, log: list[tuple[str, str, int]]) -> None:
        self.engine = create_engine(PG_URL, EngineOptions(search_path=schema))
        self.store = EventStore(self.engine)
        projectors = [Recording(p, name, log) for p in ALL_PROJECTORS]
        self.worker = Worker(self.store, projectors, batch_size=30, poll_interval=0.05)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.worker.run(self.stop))

    @property
    def leading(self) -> set[str]:
        return set(self.worker.leading)

    async def aclose(self) -> None:
        self.stop.set()
        if not self.task.done():
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.store.aclose()
        await self.engine.dispose()


@pytest.mark.postgres
async def test_three_workers_share_the_projectors_and_take_over_from_each_other(
    postgres_engine: AsyncEngine, pg_schema: str
) -> None:
    engine = postgres_engine
    store = EventStore(engine)
    items = workload(900, seed=5)
    log: list[tuple[str, str, int]] = []
    names = {p.name for p in ALL_PROJECTORS}
    a = RunningWorker("a", pg_schema, log)
    b = c = None

    def spread(*workers: RunningWorker) -> bool:
        # Each leads its share (6 projectors: 2 each of 3, 3 each of 2), none twice.
        share = -(-len(names) // len(workers))
        led = [w.leading for w in workers]
        return all(len(x) == share for x in led) and set().union(*led) == names

    try:
        await append_events(store, items[:150])
        await wait_until(lambda: _true(a.leading == names), 10, "a to lead alone")
        b = RunningWorker("b", pg_schema, log)
        c = RunningWorker("c", pg_schema, log)
        await append_events(store, items[150:400], per_transaction=10)
        await wait_until(lambda: _true(spread(a, b, c)), 10, "the projectors to spread")
        await wait_until(lambda: _reached(engine, 400), 10, "the three to catch up")

        # Stopping a worker (its batch finishes, its locks go) hands its share to the
        # others, which continue from the checkpoints.
        c.stop.set()
        await c.task
        await append_events(store, items[400:650], per_transaction=10)
        await wait_until(lambda: _true(spread(a, b)), 10, "a and b to take c's share")
        await wait_until(lambda: _reached(engine, 650), 10, "a and b to catch up")

        # Cancelling a worker's task hands over as well.
        b.task.cancel()
        await asyncio.gather(b.task, return_exceptions=True)
        await append_events(store, items[650:], per_transaction=10)
        await wait_until(lambda: _true(a.leading == names), 10, "a to take over")
        top = await head(engine)
        await wait_until(lambda: _reached(engine, top), 10, "a to catch up")
    finally:
        for w in (a, b, c):
            if w is not None:
                await w.aclose()

    by_worker = {w: {p for who, _, p in log if who == w} for w in "abc"}
    assert all(by_worker.values()), by_worker
    applied = [(name, position) for _, name, position in log]
    assert len(applied) == len(set(applied)), "an event was applied twice"
    async with engine.connect() as conn:
        for projector in ALL_PROJECTORS:
            handled = await conn.scalar(
                text("SELECT count(*) FROM events WHERE event_type = ANY(:types)"),
                {"types": sorted(projector.handles)},
            )
            assert sum(1 for n, _ in applied if n == projector.name) == handled
    projected = await read_models(engine)
    assert projected == await rebuilt(store)
    await store.aclose()


async def _true(value: bool) -> bool:
    return value


# -- wait_for ---------------------------------------------------------------------------------


@pytest.fixture
async def worker_service(engine: AsyncEngine) -> AsyncIterator[DatabaseService]:
    service = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        projection_mode=ProjectionMode.WORKER,
        clock=lambda: T0,
    )
    await service.start(migrate=False)
    yield service
    if service._worker_task is not None and service._worker_stop is not None:
        service._worker_stop.set()
        await service._worker_task
    await service.store.aclose()


def register(user_id: str) -> users.RegisterUser:
    return users.RegisterUser(
        user_id=user_id,
        email=f"{user_id}@example.com",
        username=user_id,
        password=SecretStr(PASSWORD),
    )


async def user_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(users_table.c.user_id).order_by(users_table.c.user_id))
        return list(rows.scalars())


async def test_wait_for_times_out_without_a_worker_and_returns_once_one_runs(
    worker_service: DatabaseService,
) -> None:
    service = worker_service
    result = await service.dispatcher.dispatch(register("ada"), service.context())
    assert result.position is not None
    with pytest.raises(ProjectionTimeout) as timed_out:
        await wait_for(service.store, service.projectors, result.position, timeout=0.2)
    assert await user_ids(service.engine) == []
    # It says what a caller needs to know: the write is in, a worker must run.
    assert f"write at position {result.position} is committed" in str(timed_out.value)
    assert "`tiu worker`" in str(timed_out.value)
    assert "run_worker=True" in str(timed_out.value)

    stop = asyncio.Event()
    worker = Worker(service.store, service.projectors, batch_size=10, poll_interval=0.05)
    running = asyncio.create_task(worker.run(stop))
    try:
        await service.wait_for(result.position, timeout=10)
        assert await user_ids(service.engine) == ["ada"]
    finally:
        stop.set()
        await running


async def test_wait_for_refuses_a_nan_or_unbounded_timeout_or_a_position_that_is_no_int(
    worker_service: DatabaseService, service: DatabaseService
) -> None:
    # In worker mode a NaN timeout waited forever (no deadline compares as passed) and
    # a str position was a TypeError; inline mode returned at once, whatever was given.
    for mode in (worker_service, service):
        for position, timeout, field in (
            (10**9, float("nan"), "timeout"),
            (10**9, 10**400, "timeout"),  # past a float's range: it raised OverflowError
            (10**9, 10**5000, "timeout"),  # and past repr's digit limit
            (10**9, "1", "timeout"),
            ("5", 0.1, "position"),
            (None, 0.1, "position"),
        ):
            with pytest.raises(InvalidCommand) as refused:
                async with asyncio.timeout(5):
                    await mode.wait_for(position, timeout)
            assert refused.value.field == field
    with pytest.raises(ProjectionTimeout):
        await worker_service.wait_for(10**9, 0)


async def test_a_command_returns_once_the_running_worker_reached_its_position(
    worker_service: DatabaseService,
) -> None:
    service = worker_service
    service._worker_stop = asyncio.Event()
    worker = Worker(service.store, service.projectors, batch_size=10, poll_interval=0.05)
    service._worker_task = asyncio.create_task(worker.run(service._worker_stop))
    for name in ("bea", "cyd", "dee"):
        result = await service.dispatch(register(name))
        assert result.position is not None
        async with service.engine.connect() as conn:
            assert await lowest_position(conn, service.projectors) >= result.position
        assert name in await user_ids(service.engine)


# -- the inline runner after an append it did not see ------------------------------------------


async def test_a_command_after_a_foreign_append_catches_the_inline_projections_up(
    engine: AsyncEngine,
) -> None:
    service = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=lambda: T0,
    )
    await service.start(migrate=False)
    try:
        await service.dispatch(register("alice"))
        foreign = users.UserRegistered(
            user_id="bob",
            email="bob@example.com",
            username="bob",
            display_name=None,
            password_hash="$2b$04$" + "x" * 53,
            roles=(Role.MEMBER,),
            at=T0,
        )
        event_type, schema_version, data = encode_event(foreign)
        await service.store.append(
            users.stream_id("bob"), users.CATEGORY, [NewEvent(event_type, data, schema_version)]
        )
        result = await service.dispatch(register("carol"))
        assert await user_ids(engine) == ["alice", "bob", "carol"]
        top = await head(engine)
        assert result.position == top
        async with engine.connect() as conn:
            rows = await checkpoints.all_checkpoints(conn)
        assert {c.position for c in rows if c.active} == {top}
    finally:
        await service.store.aclose()


def test_a_batch_loop_freezes_the_heap_only_while_it_runs_and_leaves_an_application_freeze():
    assert gc.get_freeze_count() == 0
    with long_lived_heap():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        with long_lived_heap():
            pass
        assert gc.get_freeze_count() == frozen  # the application's freeze is untouched
    finally:
        gc.unfreeze()


def test_a_batch_loop_collects_young_objects_less_often_only_while_it_runs():
    before = gc.get_threshold()
    with long_lived_heap():
        assert gc.get_threshold() == (BATCH_GC_THRESHOLD, *before[1:])
    assert gc.get_threshold() == before
    gc.freeze()
    try:
        with long_lived_heap():
            assert gc.get_threshold() == before  # the application's collector is its own
    finally:
        gc.unfreeze()
    gc.set_threshold(0, *before[1:])  # an application that collects only when it says so
    try:
        with long_lived_heap():
            assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)


# -- batch sizes: large while behind, small at the head -------------------------------------


async def handled_up_to(store: EventStore, projector: Projector, position: int) -> int:
    async with store.engine.connect() as conn:
        records = await store.read_all(conn, 0, 1_000_000, types=sorted(projector.handles))
    return sum(1 for r in records if r.position <= position)


async def test_a_projector_behind_reads_catch_up_batches_and_the_batch_size_at_the_head(
    store: EventStore,
) -> None:
    projector = next(p for p in ALL_PROJECTORS if p.name == "tasks")
    items = workload(600)
    await append_events(store, items[:400])
    handled = await handled_up_to(store, projector, await head(store.engine))
    assert handled > 5 + 40
    worker = Worker(store, [projector], batch_size=5, catch_up_batch_size=40)
    await worker._ensure_checkpoints()
    applied = []
    while not applied or applied[-1] in (5, 40):
        applied.append((await worker.run_batch(projector)).applied)
    # The first batch finds the projector behind; every later full one reads 40.
    rest = handled - 5
    assert applied == [5] + [40] * (rest // 40) + [rest % 40]
    assert await lowest_position_of(store, projector) == await head(store.engine)

    # At the head again: a batch reads the batch size, and a full one sends it back to
    # catch-up batches.
    await append_events(store, items[400:])
    more = await handled_up_to(store, projector, await head(store.engine)) - handled
    assert more > 5
    assert (await worker.run_batch(projector)).applied == 5
    assert (await worker.run_batch(projector)).applied == min(40, more - 5)


async def lowest_position_of(store: EventStore, projector: Projector) -> int:
    async with store.engine.connect() as conn:
        return await lowest_position(conn, [projector])
