"""A caller cancelled at any await point leaves no lock, transaction or connection
behind: the command either completed or left nothing, on both backends."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from domain import WeakPassword, projects, tasks, users
from domain.passwords import BcryptHasher
from domain.permissions import SYSTEM_ACTOR
from eventstore import EngineOptions, EventStore, NewEvent, create_engine
from eventstore.crypto import keyring
from eventstore.schema import events
from tests.conftest import PASSWORD, PG_URL, Clock, _empty_schema, sqlite_write_lock_free
from tiu import DatabaseService, Settings
from tiu.replicas import ReplicaReads
from tiu.service import _read_engine

#: Cancel after 0..TURNS-1 turns of the loop (every await point that does not wait
#: for I/O), then after 0.5 ms steps up to STEPS (every round trip of a command on
#: PostgreSQL, every wait on SQLite), from before its preparation to after its COMMIT.
TURNS = 40
STEPS = 40
POINTS = [("turns", n) for n in range(TURNS)] + [("ms", n * 0.5) for n in range(STEPS)]


async def _setup(service: DatabaseService) -> tuple[str, str]:
    async with service.get_repositories() as repos:
        owner = await repos.users.create_user(
            email="owner@example.com", username="owner", password=PASSWORD
        )
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Cancelled")
    return owner.id, project.id


async def _cancel_after(work, point: tuple[str, float]) -> object:
    task = asyncio.ensure_future(work)
    kind, amount = point
    if kind == "turns":
        for _ in range(int(amount)):
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(amount / 1000)
    task.cancel()
    return (await asyncio.gather(task, return_exceptions=True))[0]


async def _cancelled_at_every_point(call: Callable[[], Awaitable[object]]) -> None:
    """Start ``call()`` again and again, cancelling it after 0, 1, ... ``TURNS`` turns of
    the loop, then after 0, 0.5, 1, ... ms until one ends first; at least one was cut
    off (a test whose call always ended first would prove nothing)."""
    outcomes = [await _cancel_after(call(), ("turns", n)) for n in range(TURNS)]
    late = 0.0
    while isinstance(outcomes[-1], BaseException):
        assert late < 5000
        outcomes.append(await _cancel_after(call(), ("ms", late)))
        late += 0.5
    assert any(isinstance(o, asyncio.CancelledError) for o in outcomes)


async def _all_idle(engine: AsyncEngine) -> None:
    """No pooled connection left in a transaction; on PostgreSQL every session of the
    pool idle on the server too."""
    assert not any(await _pooled_in_transaction(engine))
    if engine.dialect.name == "postgresql":
        assert set(await _server_states(engine)) <= {"idle"}


async def _settled(service: DatabaseService, engine: AsyncEngine) -> None:
    """Every connection back in the pool once the writers are idle, none left in a
    transaction, and the write lock free (another process could write at once)."""
    if service.dispatcher.group is not None:
        await service.dispatcher.group.aclose()
    for _ in range(500):
        if engine.pool.checkedout() == 0:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    if engine.dialect.name == "sqlite":
        assert sqlite_write_lock_free(engine.url.database)  # no lock left behind
    else:
        async with engine.connect() as conn:
            stuck = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND objid = 'events'::regclass::oid::int AND granted"
                )
            )
        assert stuck == 0


@pytest.fixture(autouse=True)
def _earlier_garbage_collected(caplog: pytest.LogCaptureFixture) -> None:
    # A future whose exception nobody retrieved is reported when it is collected, in
    # whichever test runs then: one an earlier test left (an asyncpg connection lost in
    # another module, once reported in a SQLite test here) is not this test's.
    gc.collect()
    caplog.clear()


def _no_loop_errors(caplog: pytest.LogCaptureFixture) -> None:
    gc.collect()  # this test's own unretrieved futures are reported now, in its records
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def test_a_command_cancelled_at_any_point_completed_or_left_nothing(service, engine, caplog):
    owner, project = await _setup(service)
    ctx = service.context(owner)
    outcomes = {}
    for n, point in enumerate(POINTS):
        command = tasks.CreateTask(task_id=f"t{n}", project_id=project, title=f"T{n}")
        outcomes[command.task_id] = await _cancel_after(service.dispatch(command, ctx), point)
    await _settled(service, engine)
    async with engine.connect() as conn:
        created = set(
            (
                await conn.execute(
                    select(events.c.stream_id).where(events.c.event_type == "TaskCreated")
                )
            ).scalars()
        )
        rows = set((await conn.execute(text("SELECT task_id FROM tasks"))).scalars())
    assert {f"task-{t}" for t in rows} == created  # read model and log agree
    for task_id, outcome in outcomes.items():
        if not isinstance(outcome, BaseException):
            assert f"task-{task_id}" in created  # answered: committed
    assert any(isinstance(o, asyncio.CancelledError) for o in outcomes.values())
    # ... and the service goes on: nothing left in a transaction on a pooled connection.
    await service.dispatch(
        tasks.CreateTask(task_id="after", project_id=project, title="After"), ctx
    )
    _no_loop_errors(caplog)


async def test_a_unit_of_work_cancelled_at_any_point_is_all_or_nothing(service, engine, caplog):
    owner, project = await _setup(service)
    for n, point in enumerate(POINTS):

        async def two(repos, n=n):
            repo = repos.get_task_repository()
            await repo.create_task(project, f"First {n}")
            await repo.create_task(project, f"Second {n}")

        await _cancel_after(service.execute_in_transaction(two, actor_id=owner), point)
    await _settled(service, engine)
    async with engine.connect() as conn:
        titles = list((await conn.execute(text("SELECT title FROM tasks"))).scalars())
    firsts = {t.removeprefix("First ") for t in titles if t.startswith("First")}
    seconds = {t.removeprefix("Second ") for t in titles if t.startswith("Second")}
    assert firsts == seconds  # never one without the other
    _no_loop_errors(caplog)


async def test_an_append_cancelled_at_any_point_completed_or_left_nothing(store, engine, caplog):
    for n, point in enumerate(POINTS):
        await _cancel_after(store.append(f"c-{n}", "c", [NewEvent("E", {"n": n})]), point)
    await store.aclose()
    for _ in range(500):
        if engine.pool.checkedout() == 0:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        positions = list(
            (await conn.execute(select(events.c.position).order_by(events.c.position))).scalars()
        )
        count = await conn.scalar(select(func.count()).select_from(events))
    assert positions == list(range(1, count + 1))  # gap-free: nothing half-written
    _no_loop_errors(caplog)


async def _pooled_in_transaction(engine: AsyncEngine) -> list[bool]:
    """Whether each connection the pool holds is inside a transaction, as its driver
    last heard from the database (all checked out at once, so each is seen)."""
    async with contextlib.AsyncExitStack() as stack:
        seen = []
        for _ in range(engine.pool.checkedin()):  # type: ignore[attr-defined]
            conn = await stack.enter_async_context(engine.connect())
            driver = (await conn.get_raw_connection()).driver_connection
            sqlite = engine.dialect.name == "sqlite"
            seen.append(driver.in_transaction if sqlite else driver.is_in_transaction())
        return seen


async def test_an_audit_read_cancelled_at_any_point_leaves_its_connection_idle_in_the_pool(
    service, engine, caplog
):
    # More rows than one fetch of the streamed result: cancellations land between
    # fetches, while the read's transaction and server-side cursor are open.
    await service.store.append(
        "audit-c1", "audit", [NewEvent("Probed", {"n": n}) for n in range(600)]
    )
    # The append's connection back in the pool: the reads cancelled here reuse it. (A
    # read cancelled while its checkout opens a new connection loses that connection.)
    await _settled(service, engine)
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        audit = repos.get_audit_repository()

        def read():
            return audit.get_events(event_types=["Probed"], limit=10_000)

        await _cancelled_at_every_point(read)
        await _settled(service, engine)
        assert not any(await _pooled_in_transaction(engine))
        assert len(await read()) == 600
    _no_loop_errors(caplog)


async def test_an_audit_read_cancelled_while_it_loads_subject_keys_leaves_its_connection_idle(
    service, engine, caplog
):
    """An audit read whose pages open personal fields loads their subjects' keys (a
    round trip each page, on the read's connection): cancelled at any point, key loads
    included, its connection goes back to the pool idle, none dropped."""
    async with service.get_repositories() as repos:
        for n in range(40):
            await repos.users.create_user(
                email=f"u{n}@example.com", username=f"user{n}", password=PASSWORD
            )
    await _settled(service, engine)
    pool = _pool_events(engine)
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        audit = repos.get_audit_repository()

        async def read() -> object:
            keyring(service.reader).cache.clear()  # every read loads the keys again
            return await audit.get_events(event_types=["UserRegistered"], limit=10_000)

        await _cancelled_at_every_point(read)
        await _settled(service, engine)
        assert pool["invalidate"] == 0
        await _all_idle(engine)
        entries = await read()
    assert isinstance(entries, list) and len(entries) == 40
    assert all("@example.com" in str(e.data.get("email")) for e in entries)  # opened
    _no_loop_errors(caplog)


@pytest.mark.sqlite
async def test_a_command_cancelled_while_another_process_holds_the_lock_leaves_it_free(
    sqlite_engine, clock, caplog
):
    service = DatabaseService(
        Settings(database_url=str(sqlite_engine.url), bcrypt_rounds=4, busy_timeout=5),
        engine=sqlite_engine,
        clock=clock,
    )
    await service.start(migrate=False)
    owner, project = await _setup(service)
    locked, release, released = threading.Event(), threading.Event(), threading.Event()

    def other_process() -> None:
        db = sqlite3.connect(sqlite_engine.url.database, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        db.execute("COMMIT")
        db.close()
        released.set()

    holder = threading.Thread(target=other_process)
    holder.start()
    try:
        await asyncio.to_thread(locked.wait, 5)
        waiting = [
            asyncio.create_task(
                service.dispatch(
                    tasks.CreateTask(task_id=f"w{n}", project_id=project, title="W"),
                    service.context(owner),
                )
            )
            for n in range(3)
        ]
        waiting.append(
            asyncio.create_task(service.store.append("audit-c1", "audit", [NewEvent("E", {})]))
        )

        async def one(repos):
            await repos.get_task_repository().create_task(project, "In a unit")

        # In the caller's own task: a unit of work, and a command without group commit.
        waiting.append(asyncio.create_task(service.execute_in_transaction(one, actor_id=owner)))
        waiting.append(
            asyncio.create_task(
                service.dispatcher.dispatch_alone(
                    tasks.CreateTask(task_id="alone", project_id=project, title="Alone"),
                    service.context(owner),
                )
            )
        )
        await asyncio.sleep(0.2)  # all of them wait for the other process's lock
        assert not any(t.done() for t in waiting)
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        release.set()
        await asyncio.to_thread(released.wait, 5)
        await asyncio.sleep(0.2)  # a waiter left on a thread would take the lock now
        await _settled(service, sqlite_engine)
        # The pooled connections are usable (no "transaction within a transaction").
        for n in range(3):
            await service.dispatch(
                projects.CreateProject(project_id=f"p{n}", name="After"),
                service.context(SYSTEM_ACTOR),
            )
        async with sqlite_engine.connect() as conn:
            created = await conn.scalar(
                select(func.count()).where(events.c.event_type == "TaskCreated")
            )
            rows = await conn.scalar(text("SELECT count(*) FROM tasks"))
        # A command already taken by the group writer completes (as any cancelled
        # database call may); one not taken yet left nothing. Either way, whole.
        assert rows == created
    finally:
        release.set()
        holder.join()
        await service.store.aclose()
    _no_loop_errors(caplog)


async def _server_states(engine: AsyncEngine) -> list[str]:
    """PostgreSQL: the state the server reports for each connection the pool holds (all
    checked out at once), asked on a connection of another engine."""
    async with contextlib.AsyncExitStack() as stack:
        pids = []
        for _ in range(engine.pool.checkedin()):  # type: ignore[attr-defined]
            conn = await stack.enter_async_context(engine.connect())
            pids.append((await conn.get_raw_connection()).driver_connection.get_server_pid())
        other = create_engine(PG_URL)
        try:
            async with other.connect() as conn:
                states = await conn.execute(
                    text("SELECT state FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                    {"pids": pids},
                )
                return list(states.scalars())
        finally:
            await other.dispose()


def _pool_events(engine: AsyncEngine) -> dict[str, int]:
    """How often ``engine``'s pool opened a connection and dropped one, from now on."""
    seen = {"connect": 0, "invalidate": 0}
    for name in seen:

        def count(*_: object, name: str = name) -> None:
            seen[name] += 1

        event.listen(engine.sync_engine, name, count)
    return seen


async def test_a_repository_read_cancelled_at_any_point_leaves_its_connection_idle_in_the_pool(
    service, engine, caplog
):
    owner, project = await _setup(service)
    async with service.get_repositories(actor_id=owner) as repos:
        task = await repos.tasks.create_task(project, "Read")
    # The write's connection back in the pool: the reads cancelled here reuse it.
    await _settled(service, engine)
    pool = _pool_events(engine)

    async def get_task():  # the actor's permissions on the driver, then a query
        async with service.get_repositories(actor_id=owner) as repos:
            return await repos.tasks.get_task(task.id)

    async def get_user():  # two queries
        async with service.get_repositories(actor_id=owner) as repos:
            return await repos.users.get_by_id(owner)

    for read in (get_task, get_user):
        await _cancelled_at_every_point(read)
    await _settled(service, engine)
    assert pool == {"connect": 0, "invalidate": 0}  # none dropped, none opened anew
    await _all_idle(engine)
    assert (await get_task()).id == task.id
    assert (await get_user()).id == owner
    assert pool == {"connect": 0, "invalidate": 0}
    _no_loop_errors(caplog)


async def test_a_read_through_a_view_of_the_reader_cancelled_anywhere_leaves_its_connection_idle(
    service, engine, caplog
):
    """``service.reader.execution_options(...)`` (a view with options of its own) reads
    as the reader does: on PostgreSQL a round trip is never abandoned midway, so a
    cancelled read drops no connection and leaves none in a transaction."""
    await _setup(service)
    await _settled(service, engine)
    pool = _pool_events(engine)
    view = service.reader.execution_options(tiu_probe=True)

    async def read() -> int:
        async with view.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(events)) or 0)

    await _cancelled_at_every_point(read)
    await _settled(service, engine)
    assert pool == {"connect": 0, "invalidate": 0}  # none dropped, none opened anew
    await _all_idle(engine)
    assert await read() > 0
    _no_loop_errors(caplog)


@contextlib.asynccontextmanager
async def _service_of_its_own(pg_schema: str, clock: Clock) -> AsyncIterator[DatabaseService]:
    """A started PostgreSQL service on an engine of its own, whose pool a test may
    empty, in an empty schema; closed as the block ends."""
    engine = create_engine(PG_URL, EngineOptions(search_path=pg_schema))
    service = DatabaseService(
        Settings(database_url=PG_URL, bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )
    try:
        await _empty_schema(engine, pg_schema)
        await service.start(migrate=False)
        yield service
    finally:
        await service.aclose()


@pytest.mark.postgres
async def test_a_read_cancelled_while_the_pool_opens_its_connection_leaves_it_in_the_pool(
    pg_schema, clock, caplog, recwarn
):
    async with _service_of_its_own(pg_schema, clock) as service:
        engine = service.engine
        owner, _ = await _setup(service)
        # The NOTIFY after the setup's commits checks a connection out later: one it
        # opens while the pool is disposed below goes back to the old pool, uncounted
        # by the new one, and is never closed.
        await asyncio.wait([service.store.dialect._notify_task])  # type: ignore[attr-defined]
        pool = _pool_events(engine)

        async def read():
            async with service.get_repositories(actor_id=owner) as repos:
                return await repos.users.get_by_id(owner)

        outcomes: list[object] = []
        late = 0.0
        while not outcomes or isinstance(outcomes[-1], BaseException):
            assert late < 5000
            await engine.dispose()  # an empty pool: the read's checkout opens a connection
            opened = pool["connect"]
            point = ("turns", len(outcomes)) if len(outcomes) < TURNS else ("ms", late)
            late += 0.5 if point[0] == "ms" else 0
            outcomes.append(await _cancel_after(read(), point))
            await _settled(service, engine)
            assert engine.pool.checkedin() == pool["connect"] - opened  # type: ignore[attr-defined]
        assert any(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert pool["connect"] > 1
        assert pool["invalidate"] == 0
        assert set(await _server_states(engine)) <= {"idle"}
        assert (await read()).id == owner
    _no_loop_errors(caplog)
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


@pytest.mark.postgres
async def test_a_command_cancelled_while_the_pool_opens_its_connections_leaves_them_in_the_pool(
    pg_schema, clock, caplog, recwarn
):
    async with _service_of_its_own(pg_schema, clock) as service:
        engine = service.engine
        owner, project = await _setup(service)
        ctx = service.context(owner)
        pool = _pool_events(engine)

        async def settled() -> None:
            # The NOTIFY after a commit opens a connection of its own, later.
            await asyncio.sleep(0.05)
            notifying = service.store.dialect._notify_task
            if notifying is not None:
                await asyncio.gather(notifying, return_exceptions=True)
            await _settled(service, engine)

        outcomes: list[object] = []
        late = 0.0
        while not outcomes or isinstance(outcomes[-1], BaseException):
            assert late < 5000
            await settled()
            await engine.dispose()  # an empty pool: each checkout opens a connection
            opened = pool["connect"]
            point = ("turns", len(outcomes)) if len(outcomes) < TURNS else ("ms", late)
            late += 0.5 if point[0] == "ms" else 0
            command = tasks.CreateTask(
                task_id=f"t{len(outcomes)}", project_id=project, title="Opened"
            )
            outcomes.append(await _cancel_after(service.dispatch(command, ctx), point))
            await settled()
            assert engine.pool.checkedin() == pool["connect"] - opened  # type: ignore[attr-defined]
            gc.collect()
            assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)], point
            assert not [r for r in caplog.records if r.name == "asyncio"], point
        assert any(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert pool["invalidate"] == 0
        assert set(await _server_states(engine)) <= {"idle"}
        await service.dispatch(
            tasks.CreateTask(task_id="after", project_id=project, title="After"), ctx
        )
    _no_loop_errors(caplog)
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


@pytest.mark.postgres
async def test_a_notify_cancelled_while_the_pool_opens_its_connection_leaves_it_in_the_pool(
    pg_schema, clock, caplog, recwarn
):
    async with _service_of_its_own(pg_schema, clock) as service:
        engine = service.engine
        store = service.store
        pool = _pool_events(engine)
        await store.append("audit-n", "audit", [NewEvent("E", {})])
        await _settled(service, engine)
        # The NOTIFY after a commit is a task of its own (cancelled when the loop shuts
        # down): it waits NOTIFY_INTERVAL, then checks a connection out. Run here alone,
        # so that no other checkout races the emptying of the pool.
        await asyncio.wait([store.dialect._notify_task])  # type: ignore[attr-defined]
        for n in range(STEPS):
            await engine.dispose()  # an empty pool: its checkout opens a connection
            opened = pool["connect"]
            notifying = asyncio.ensure_future(store.dialect._notify())  # type: ignore[attr-defined]
            await asyncio.sleep(n * 0.5 / 1000)
            notifying.cancel()
            await asyncio.gather(notifying, return_exceptions=True)
            await _settled(service, engine)
            assert engine.pool.checkedin() == pool["connect"] - opened  # type: ignore[attr-defined]
            gc.collect()
            assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)], n
        assert pool["connect"] > 1
        assert pool["invalidate"] == 0
        assert set(await _server_states(engine)) <= {"idle"}
        # ... and the store closes after a NOTIFY cancelled (as at the loop's shutdown).
        await store.append("audit-n", "audit", [NewEvent("E", {})])
        store.dialect._notify_task.cancel()  # type: ignore[attr-defined]
    _no_loop_errors(caplog)
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


@pytest.mark.postgres
async def test_a_replica_read_cancelled_while_its_connection_closes_closes_it_whole(
    postgres_engine, pg_schema, caplog
):
    """A replica read's connection given back to a full pool is closed (an overflow
    connection: a round trip). A read cancelled there waits for the close to end: the
    pool logs no error, and nothing is left open. (The primary stands in for the
    replica: it has nothing to replay.)"""
    replica = create_engine(PG_URL, EngineOptions(search_path=pg_schema, pool_size=1))
    closed = _pool_events(replica)
    closed["close"] = 0

    def count_close(*_: object) -> None:
        closed["close"] += 1

    event.listen(replica.sync_engine, "close", count_close)
    reads = ReplicaReads(
        EventStore(postgres_engine), _read_engine(postgres_engine), _read_engine(replica)
    )
    try:
        for turns in range(6):
            closed["close"] = 0
            release = asyncio.Event()

            async def held_read(release: asyncio.Event = release) -> None:
                async with reads.connect() as conn:
                    await conn.scalar(text("SELECT 1"))
                    await release.wait()

            held = asyncio.ensure_future(held_read())
            await asyncio.sleep(0.05)  # the pool's one connection is the held read's
            async with reads.connect() as conn:  # an overflow connection, back at once
                await conn.scalar(text("SELECT 2"))
            release.set()  # the held read's connection goes back to a full pool: closed
            for _ in range(turns):
                await asyncio.sleep(0)
            held.cancel()
            await asyncio.gather(held, return_exceptions=True)
            assert closed["close"] == 1, turns
            assert replica.pool.checkedout() == 0  # type: ignore[attr-defined]
            assert replica.pool.overflow() == 0  # type: ignore[attr-defined]
            gc.collect()
            pool_errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert not pool_errors, (turns, [r.getMessage() for r in pool_errors])
        assert closed["invalidate"] == 0
    finally:
        await replica.dispose()
    _no_loop_errors(caplog)


@pytest.mark.postgres
async def test_a_command_cancelled_while_it_loads_on_a_connection_of_its_own_leaves_it_pooled(
    pg_schema, clock, caplog, recwarn
):
    """A command that gave its connection back for password work and is then refused
    on kept state (a new password equal to the old one: raised, no record) reads its
    streams again from the log on a connection of its own: checkout (here opening a
    connection: another task took the one given back), load and close, run as one
    piece. Cancelled anywhere in it, the command waits for that piece to end: every
    connection opened is back in the pool idle, none dropped, no warning."""
    async with _service_of_its_own(pg_schema, clock) as service:
        engine = service.engine
        async with service.get_repositories() as repos:
            user = await repos.users.create_user(
                email="own@example.com", username="own", password=PASSWORD
            )
        ctx = service.context(user.id)
        command = users.ChangePassword(
            user_id=user.id, old_password=SecretStr(PASSWORD), new_password=SecretStr(PASSWORD)
        )
        pool = _pool_events(engine)
        loop = asyncio.get_running_loop()
        #: This attempt's command, when to cancel it (seconds after its own connection
        #: starts opening), the task holding the connection it gave back, and how many
        #: connections the pool had opened before.
        plan: dict[str, Any] = {}
        release = asyncio.Event()

        async def take_a_connection() -> None:
            async with engine.connect():
                await release.wait()

        def on_checkin(*_: object) -> None:
            if "command" in plan and "thief" not in plan:  # given back for password work
                plan["thief"] = loop.create_task(take_a_connection())

        def on_do_connect(*_: object) -> None:
            if "thief" in plan and plan["delay"] is not None and "armed" not in plan:
                plan["armed"] = loop.call_later(plan["delay"], plan["command"].cancel)

        event.listen(engine.sync_engine, "checkin", on_checkin)
        event.listen(engine.sync_engine, "do_connect", on_do_connect)

        async def attempt(delay: float | None) -> object:
            await asyncio.sleep(0.05)  # the NOTIFY after the user's commit takes one
            await _settled(service, engine)
            await engine.dispose()  # an empty pool: the command opens its connection
            plan.clear()
            release.clear()
            plan.update(delay=delay, opened=pool["connect"])
            plan["command"] = asyncio.ensure_future(service.dispatch(command, ctx))
            outcome = (await asyncio.gather(plan["command"], return_exceptions=True))[0]
            release.set()
            await plan["thief"]
            return outcome

        # Not cancelled: refused, on a connection of its own (a second one opened).
        assert isinstance(await attempt(None), WeakPassword)
        assert pool["connect"] - plan["opened"] == 2
        outcomes: list[object] = []
        for step in range(STEPS):
            outcome = await attempt(step * 0.0005)
            outcomes.append(outcome)
            assert "armed" in plan, step  # cancelled from the own connection's opening on
            assert isinstance(outcome, asyncio.CancelledError | WeakPassword), outcome
            await _settled(service, engine)
            gc.collect()
            opened = pool["connect"] - plan["opened"]
            assert engine.pool.checkedin() == opened == 2, step  # type: ignore[attr-defined]
            assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)], step
            assert not [r for r in caplog.records if r.name == "asyncio"], step
        assert isinstance(outcomes[0], asyncio.CancelledError)
        assert pool["invalidate"] == 0
        assert set(await _server_states(engine)) <= {"idle"}
    _no_loop_errors(caplog)
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


async def test_a_call_cut_off_inside_a_unit_of_work_leaves_its_transaction_whole(
    service, engine, caplog
):
    """A cancellation inside ``execute_in_transaction``'s function (a timeout around a
    repository call, after 0, 0.1, 0.2 ... ms): no round trip of the unit's is
    abandoned midway, nor are the writes held back for the append (PostgreSQL: its
    commands' read-model rows, sent before a read) cut short. Abandoned, the
    connection and its transaction were dropped there (the unit's next statement
    failed with an undocumented error). Each timeout ends once the round trip has; the
    unit commits, the read models agree with the log, and the connection goes back
    idle."""
    owner, project = await _setup(service)
    await _settled(service, engine)
    pool = _pool_events(engine)
    cut: list[int] = []

    async def fn(repos):
        repo = repos.get_task_repository()
        for n in range(STEPS):
            try:
                await asyncio.wait_for(repo.create_task(project, f"T{n}"), n / 10_000)
            except TimeoutError:
                cut.append(n)
        await repo.create_task(project, "Last")

    await service.execute_in_transaction(fn, actor_id=owner)
    # Cut off at its start at least; on PostgreSQL also in flight (SQLite's inline
    # statements never suspend).
    assert cut and (len(cut) > 1 or engine.dialect.name == "sqlite")
    await _settled(service, engine)
    assert pool["invalidate"] == 0
    await _all_idle(engine)
    async with engine.connect() as conn:
        rows = set((await conn.execute(text("SELECT task_id FROM tasks"))).scalars())
        created = set(
            (
                await conn.execute(
                    select(events.c.stream_id).where(events.c.event_type == "TaskCreated")
                )
            ).scalars()
        )
    assert {f"task-{t}" for t in rows} == created  # read models and log agree
    assert len(created) > STEPS - len(cut)
    _no_loop_errors(caplog)


async def _timed_out_after(call: Awaitable[object], point: tuple[str, float]) -> bool:
    """Await ``call`` under ``asyncio.timeout``, expiring after ``point`` (turns of the
    loop or ms, as :func:`_cancel_after`); whether it timed out."""
    loop = asyncio.get_running_loop()
    kind, amount = point
    try:
        async with asyncio.timeout(amount / 1000 if kind == "ms" else None) as deadline:
            if kind == "turns":
                pending = True

                def expire_after(turns: int) -> None:
                    if not pending:
                        pass
                    elif turns == 0:
                        deadline.reschedule(loop.time())
                    else:
                        loop.call_soon(expire_after, turns - 1)

                expire_after(int(amount))
            try:
                await call
            finally:
                pending = False
    except TimeoutError:
        return True
    return False


async def _locked_for_a_while(engine: AsyncEngine, table: str) -> asyncio.Task[None]:
    """PostgreSQL: another session holds ``table`` locked for 5 ms from now (as a
    migration or a rebuild's swap would): a read of it waits on the server meanwhile.
    The task that ends the lock."""
    holder = await engine.connect()
    await holder.begin()
    await holder.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))

    async def release() -> None:
        try:
            await asyncio.sleep(0.005)
        finally:
            await holder.close()  # rolled back

    return asyncio.ensure_future(release())


async def test_a_call_cut_off_in_a_unit_of_work_while_the_database_runs_its_read_leaves_it_usable(
    service, engine, caplog, recwarn
):
    """A timeout inside ``execute_in_transaction``'s function that cuts a repository
    call at any point, on PostgreSQL while the server still runs a read the call sent
    to the driver directly (a permission lookup, a command's stream load; here waiting
    for a lock another session holds): the call ends once that read has, and the
    unit goes on with another command and commits. Abandoned, asyncpg cancelled the
    read, which aborted the transaction: the next command failed with a driver error
    (SQLSTATE 25P02) that is no documented one. A command cut once it began writing
    runs to its end: cut there, its idempotency record committed without its events."""
    owner, project = await _setup(service)
    async with service.get_repositories(actor_id=owner) as repos:
        task = await repos.tasks.create_task(project, "Read")
    await _settled(service, engine)
    pool = _pool_events(engine)
    postgresql = engine.dialect.name == "postgresql"
    #: What is cut, and the table whose lock its read on the driver waits for.
    calls: list[tuple[str, Callable[[Any, int], Awaitable[object]]]] = [
        # The actor's permissions (on the driver), then the task (through SQLAlchemy).
        ("user_permissions", lambda repos, n: repos.tasks.get_task(task.id)),
        # A command's load of its streams and idempotency record (on the driver).
        ("processed_commands", lambda repos, n: repos.tasks.create_task(project, f"Cut {n}")),
        # ... and one whose write claims keys (round trips) after its record.
        (
            "processed_commands",
            lambda repos, n: repos.users.create_user(
                email=f"cut{n}@example.com", username=f"cut{n}", password=PASSWORD
            ),
        ),
    ]
    cut_waiting = [0] * len(calls)
    for index, (table, call) in enumerate(calls):
        for n, point in enumerate(POINTS):
            unlocked: list[asyncio.Task[None]] = []

            async def fn(
                repos, index=index, table=table, call=call, n=n, point=point, unlocked=unlocked
            ):
                # Its transaction begins (a query through SQLAlchemy) before the lock.
                await repos.users.get_by_id(owner)
                if postgresql:
                    unlocked.append(await _locked_for_a_while(engine, table))
                if await _timed_out_after(call(repos, n), point) and unlocked:
                    # Cut while the read waited for the lock: ended once it had.
                    cut_waiting[index] += unlocked[0].done()
                await repos.tasks.create_task(project, f"After {index} {n}")

            await service.execute_in_transaction(fn, actor_id=owner)
            await asyncio.gather(*unlocked)
    if postgresql:
        assert all(cut_waiting), cut_waiting
    await _settled(service, engine)
    assert pool["invalidate"] == 0
    await _all_idle(engine)
    async with engine.connect() as conn:
        titles = set((await conn.execute(text("SELECT title FROM tasks"))).scalars())
        logged = dict(
            (
                await conn.execute(
                    select(events.c.event_type, func.count()).group_by(events.c.event_type)
                )
            ).all()
        )
        recorded = dict(
            (
                await conn.execute(
                    text("SELECT command_type, count(*) FROM processed_commands GROUP BY 1")
                )
            ).all()
        )
        users_ = await conn.scalar(text("SELECT count(*) FROM users"))
    assert {f"After {i} {n}" for i in range(len(calls)) for n in range(len(POINTS))} <= titles
    # Read models, log and idempotency records agree: each command whole, or absent.
    assert len(titles) == logged["TaskCreated"] == recorded["CreateTask"]
    assert users_ == logged["UserRegistered"] == recorded["RegisterUser"]
    _no_loop_errors(caplog)
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]
