"""Group commit: concurrent commands share a transaction, yet each is isolated."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time

import pytest
from pydantic import SecretStr
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from domain import (
    AlreadyExists,
    IllegalTransition,
    PermissionDenied,
    WeakPassword,
    projects,
    tasks,
    users,
)
from domain.passwords import BcryptHasher
from domain.permissions import SYSTEM_ACTOR
from eventstore import (
    EngineOptions,
    EventStore,
    InvalidEventData,
    StoreUnavailable,
    TransactionConflict,
    create_engine,
    verify,
)
from eventstore import store as store_module
from eventstore.schema import events
from tests.conftest import PASSWORD, sqlite_write_lock_free
from tiu import DatabaseService, Settings
from tiu import dispatch as dispatch_module
from tiu.dispatch import Dispatcher

# These storage tests also run as the least-privilege role of sql/app_role.sql.
pytestmark = pytest.mark.least_privilege


@pytest.fixture
def commits(service) -> list[int]:
    counted: list[int] = []

    async def count(streams) -> None:
        counted.append(len(streams))
        if len(counted) == 1:
            # Callers prepare in tasks of their own: holding the first commit (after each
            # clear) a moment lets the others queue into one group, however the machine
            # schedules them.
            await asyncio.sleep(0.2)

    service.store.before_commit = count
    return counted


async def test_concurrent_commands_share_transactions_and_each_gets_its_own_outcome(
    service, commits
):
    ctx = service.context(SYSTEM_ACTOR)
    outcomes = await asyncio.gather(
        *(
            service.dispatch(
                users.RegisterUser(
                    user_id=f"user{n}",
                    email="taken@example.com" if n % 3 == 0 else f"u{n}@example.com",
                    username=f"user{n}",
                    password=SecretStr(PASSWORD if n % 5 else "short"),
                ),
                ctx,
            )
            for n in range(30)
        ),
        return_exceptions=True,
    )
    assert len(commits) < 30, "no group was formed"
    ok = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(ok) + len(refused) == 30
    assert all(isinstance(e, AlreadyExists | WeakPassword) for e in refused), refused
    positions = [r.position for r in ok]
    assert len(set(positions)) == len(positions)
    async with service.engine.connect() as conn:
        registered = (await conn.execute(text("SELECT user_id FROM users"))).scalars().all()
        keys = await conn.scalar(text("SELECT count(*) FROM unique_keys WHERE scope = 'email'"))
        logged = await conn.scalar(select(func.count()).select_from(events))
    assert sorted(registered) == sorted(r.stream_id.removeprefix("user-") for r in ok)
    assert keys == len(ok)  # refused commands' claims were rolled back with them
    assert logged == len(ok)


async def test_a_refused_command_in_a_group_undoes_only_itself(service, commits):
    async with service.get_repositories() as repos:
        owner = await repos.users.create_user(
            email="own@example.com", username="owner", password=PASSWORD
        )
        stranger = await repos.users.create_user(
            email="str@example.com", username="stranger", password=PASSWORD
        )
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Grouped")
        task = await repos.tasks.create_task(project.id, "Existing")
    commits.clear()

    owner_ctx = service.context(owner.id)
    stranger_ctx = service.context(stranger.id)
    moves = [
        service.dispatch(
            tasks.CreateTask(task_id=f"g{n}", project_id=project.id, title=f"G{n}"), owner_ctx
        )
        for n in range(6)
    ]
    moves.insert(
        2,
        service.dispatch(
            tasks.CreateTask(task_id="intruder", project_id=project.id, title="No"), stranger_ctx
        ),
    )
    moves.insert(
        4,
        service.dispatch(
            tasks.ChangeTaskStatus(task_id=task.id, project_id=project.id, to="done"), owner_ctx
        ),
    )
    outcomes = await asyncio.gather(*moves, return_exceptions=True)
    assert isinstance(outcomes[2], PermissionDenied)
    assert isinstance(outcomes[4], IllegalTransition)
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 6
    assert len(commits) < len(moves)
    async with service.get_repositories(actor_id=owner.id) as repos:
        titles = sorted(t.title for t in await repos.tasks.get_project_tasks(project.id))
        assert titles == ["Existing", "G0", "G1", "G2", "G3", "G4", "G5"]
        assert (await repos.tasks.get_task(task.id)).status == "todo"
    async with service.engine.connect() as conn:
        security = await conn.scalar(
            text("SELECT count(*) FROM events WHERE event_type = 'CommandRejected'")
        )
        stats = (await conn.execute(text("SELECT total FROM project_stats"))).scalar()
    assert security == 1  # the permission denial is in the log; the illegal move is not
    assert stats == 7


async def test_a_group_that_conflicts_with_another_process_is_retried_command_by_command(
    engine, service, monkeypatch
):
    if engine.dialect.name != "postgresql":
        pytest.skip("on SQLite the group's flush holds the write lock: no one can get in")
    async with service.get_repositories() as repos:
        owner = await repos.users.create_user(
            email="own@example.com", username="owner", password=PASSWORD
        )
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Contended")
    outsider = Dispatcher(EventStore(engine))  # another process: no inline projections
    interfered: list[bool] = []
    original = store_module.UnitOfWork.flush

    async def interfere(uow):
        if not interfered and len(uow.pending_streams) > 1:
            interfered.append(True)
            # Another process changes the project the group's decisions read, before
            # the group appends: the group's flush must fail as a whole.
            await outsider.dispatch_alone(
                projects.UpdateProject(project_id=project.id, description="changed elsewhere"),
                service.context(owner.id),
            )
        return await original(uow)

    monkeypatch.setattr(store_module.UnitOfWork, "flush", interfere)
    retried: list[str] = []
    alone = service.dispatcher.write

    async def count_alone(decision, conn=None, **options):
        retried.append(decision.command.command_id)
        return await alone(decision, conn, **options)

    monkeypatch.setattr(service.dispatcher, "write", count_alone)

    async def slow_first(_streams) -> None:
        service.store.before_commit = None
        await asyncio.sleep(0.1)  # the first group is written: the others queue behind it

    service.store.before_commit = slow_first
    ctx = service.context(owner.id)
    outcomes = await asyncio.gather(
        *(
            service.dispatch(
                tasks.CreateTask(task_id=f"c{n}", project_id=project.id, title=f"C{n}"), ctx
            )
            for n in range(5)
        ),
        return_exceptions=True,
    )
    assert interfered
    assert len(retried) >= 2  # the failed group's commands, settled one by one
    assert not any(isinstance(o, BaseException) for o in outcomes), outcomes
    async with service.engine.connect() as conn:
        created = await conn.scalar(
            text("SELECT count(*) FROM events WHERE event_type = 'TaskCreated'")
        )
    assert created == 5
    await outsider.store.aclose()


async def test_a_lone_command_takes_the_ordinary_path(service, commits):
    result = await service.dispatch(
        projects.CreateProject(project_id="p", name="Alone"), service.context(SYSTEM_ACTOR)
    )
    assert result.position == 1
    assert commits == [1]


async def test_a_lone_callers_command_is_written_in_its_task_on_sqlite_and_later_ones_queue(
    service,
):
    """A caller who finds the group queue idle writes its own command on a SQLite file
    (a writer task does on PostgreSQL); callers arriving while that write waits (here:
    for a commit held back) queue behind it and share the next group, written by a
    writer task once it ends."""
    ctx = service.context(SYSTEM_ACTOR)
    await service.dispatch(projects.CreateProject(project_id="p", name="Lone"), ctx)
    release = asyncio.Event()
    held = asyncio.Event()
    written_by: list[tuple[list[str], asyncio.Task[object] | None]] = []

    async def hold(streams: list[str]) -> None:
        written_by.append((sorted(streams), asyncio.current_task()))
        if streams == ["task-first"]:
            held.set()
            await release.wait()

    service.store.before_commit = hold

    def create(task_id: str) -> asyncio.Future[object]:
        command = tasks.CreateTask(task_id=task_id, project_id="p", title=task_id)
        return asyncio.ensure_future(service.dispatch(command, ctx))

    first = create("first")
    await asyncio.wait_for(held.wait(), 5)
    later = [create(f"later{n}") for n in range(3)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in later)  # queued behind the write that waits
    release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *later), 10)
    assert results[0].position == 2  # the group's order is that of its preparations
    assert sorted(r.position for r in results[1:]) == [3, 4, 5]
    assert (written_by[0][1] is first) is service.store.dialect.writes_in_caller
    assert all(task not in (first, *later) for _, task in written_by[1:])  # a writer task
    if service.store.dialect.writes_in_caller:
        # (On PostgreSQL each caller prepares on a pooled connection: how many of them
        # are ready when the first group ends depends on the pool.)
        assert [streams for streams, _ in written_by[1:]] == [
            ["task-later0", "task-later1", "task-later2"]
        ]


@pytest.mark.sqlite
async def test_lone_commands_cancelled_at_their_commit_leave_no_lock_and_the_head_known(
    sqlite_template, tmp_path
):
    """A lone caller writes its own command on SQLite. Cancelled as its COMMIT begins
    (``synchronous=FULL``: the COMMIT goes to a worker thread), either the cancellation
    waited for that COMMIT, and the store's known head moves past the command at once,
    or it came before the thread took the COMMIT, and the transaction is rolled back
    (its connection, which SQLAlchemy then counts out of any transaction, goes back to
    the pool rolled back, not holding the write lock). Either way, once the queue is
    idle the write lock is free, the known head is the log's and no connection was
    dropped. Which of the two happens is the threads' timing: ten commands see both."""
    path = tmp_path / "full.db"
    shutil.copyfile(sqlite_template, path)
    url = f"sqlite+aiosqlite:///{path}"
    engine = create_engine(url, EngineOptions(sqlite_synchronous="FULL"))
    service = DatabaseService(
        Settings(database_url=url, bcrypt_rounds=4), engine=engine, hasher=BcryptHasher(rounds=4)
    )
    await service.start(migrate=False)
    observer = sqlite3.connect(path)
    try:
        ctx = service.context(SYSTEM_ACTOR)
        await service.dispatch(projects.CreateProject(project_id="p", name="First"), ctx)
        dropped: list[object] = []
        event.listen(engine.sync_engine, "invalidate", lambda *args: dropped.append(args))
        caller: asyncio.Future[object] | None = None

        async def cancel_the_caller(_streams: list[str]) -> None:
            assert caller is not None
            caller.cancel()

        service.store.before_commit = cancel_the_caller
        assert service.dispatcher.group is not None
        queue = service.dispatcher.group._queue
        for n in range(10):
            caller = asyncio.ensure_future(
                service.dispatch(projects.CreateProject(project_id=f"gone{n}", name="Gone"), ctx)
            )
            with pytest.raises(asyncio.CancelledError):
                await caller
            async with asyncio.timeout(5):  # what a writer task took on is done
                while queue.busy:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert sqlite_write_lock_free(path)
            (logged,) = observer.execute("SELECT max(position) FROM events").fetchone()
            assert service.store.dialect.known_head == logged
        assert dropped == []
    finally:
        observer.close()
        await service.store.aclose()
        await engine.dispose()


async def test_a_caller_sending_commands_one_after_another_checks_out_no_connection_each(
    service,
):
    """The group writer keeps its connection from one group to the next, and a caller's
    next command is queued before the writer, answered, goes idle: a loop of commands
    does not pay a pool checkout (and return) per command."""
    ctx = service.context(SYSTEM_ACTOR)
    await service.dispatch(projects.CreateProject(project_id="p", name="Loop"), ctx)
    checkouts: list[int] = []
    event.listen(service.store.engine.sync_engine, "checkout", lambda *_: checkouts.append(1))
    for n in range(30):
        result = await service.dispatch(
            tasks.CreateTask(task_id=f"t{n}", project_id="p", title=f"T{n}"), ctx
        )
        assert result.position is not None
    if service.store.dialect.name == "sqlite":
        assert len(checkouts) <= 1
    else:  # PostgreSQL's throttled NOTIFY checks out a connection of its own now and then
        assert len(checkouts) < 30


async def test_a_command_that_minted_its_ids_is_prepared_without_reading_the_log(
    service, monkeypatch
):
    """A CreateTask whose task id and command id were left to their defaults (minted for
    it) names a stream no one can have written and a key no one can have recorded: with
    its project's state kept, it decides without a read. One given its ids reads."""
    ctx = service.context(SYSTEM_ACTOR)
    await service.dispatch(projects.CreateProject(project_id="p", name="Minted"), ctx)
    reads: list[int] = []
    store = service.store
    load_streams, read_streams_data = store.load_streams, store.read_streams_data

    async def counted_load(*args, **kwargs):
        reads.append(1)
        return await load_streams(*args, **kwargs)

    async def counted_read(*args, **kwargs):
        reads.append(1)
        return await read_streams_data(*args, **kwargs)

    monkeypatch.setattr(store, "load_streams", counted_load)
    monkeypatch.setattr(store, "read_streams_data", counted_read)
    minted = await service.dispatch(tasks.CreateTask(project_id="p", title="New"), ctx)
    assert minted.version == 1
    assert reads == []
    given = await service.dispatch(
        tasks.CreateTask(command_id="c1", task_id="t1", project_id="p", title="Given"), ctx
    )
    assert given.version == 1
    assert reads == [1]


async def test_a_command_with_minted_ids_sent_again_answers_as_the_first_time(service, commits):
    """The same command object sent again (its minted ids the same) is prepared as new,
    and the write finds it was processed: it answers with the first result, in a group
    too, and nothing is written twice (not the task's read-model row either). A copy
    under another command id finds its task stream taken at the version check."""
    ctx = service.context(SYSTEM_ACTOR)
    await service.dispatch(projects.CreateProject(project_id="p", name="Again"), ctx)
    command = tasks.CreateTask(project_id="p", title="Once")
    first = await service.dispatch(command, ctx)
    commits.clear()
    outcomes = await asyncio.gather(
        *(
            service.dispatch(tasks.CreateTask(project_id="p", title=f"Other {n}"), ctx)
            for n in range(3)
        ),
        service.dispatch(command, ctx),
        service.dispatch(command.model_copy(update={"command_id": "copy"}), ctx),
        return_exceptions=True,
    )
    again, copy = outcomes[3], outcomes[4]
    assert not isinstance(again, BaseException), again
    assert again.duplicate
    assert (again.position, again.version, again.events) == (
        first.position,
        first.version,
        first.events,
    )
    assert isinstance(copy, AlreadyExists), copy
    assert all(not isinstance(o, BaseException) for o in outcomes[:3]), outcomes
    async with service.engine.connect() as conn:
        created = await conn.scalar(
            select(func.count()).select_from(events).where(events.c.event_type == "TaskCreated")
        )
        rows = await conn.scalar(text("SELECT count(*) FROM tasks"))
    assert created == rows == 4


async def test_on_sqlite_a_group_reads_the_heads_of_its_commands_streams_in_one_statement(
    service, commits
):
    """Under the group's BEGIN IMMEDIATE the versions every command read are checked
    against heads read once for the group, not by a statement per command."""
    if service.engine.dialect.name != "sqlite":
        pytest.skip("SQLite's statements")
    ctx = service.context(SYSTEM_ACTOR)
    await service.dispatch(projects.CreateProject(project_id="p", name="Heads"), ctx)
    sent: list[str] = []

    def trace(dbapi_connection, _record, _proxy) -> None:
        dbapi_connection.driver_connection.set_trace_callback(sent.append)

    event.listen(service.engine.sync_engine, "checkout", trace)
    try:
        commits.clear()
        await asyncio.gather(
            *(
                service.dispatch(tasks.CreateTask(project_id="p", title=f"H{n}"), ctx)
                for n in range(6)
            )
        )
    finally:
        event.remove(service.engine.sync_engine, "checkout", trace)
    assert max(commits) > 1, "no group was formed"
    reads, transactions = 0, []
    for sql in sent:
        if sql == "BEGIN IMMEDIATE":
            reads = 0
        elif "coalesce(max(position), 0)" in sql:
            reads += 1
        elif sql == "COMMIT":
            transactions.append(reads)
    assert len(transactions) == len(commits)
    assert all(count == 1 for count in transactions), transactions


async def test_events_without_personal_data_are_encoded_before_the_write_transaction(
    service, monkeypatch
):
    """A command's events are encoded for the log (JSON, hash tails) when it is prepared,
    in its caller's task: the write transaction, which holds the write lock (and, on
    SQLite, the loop), only stores them; the log they make verifies."""
    encoded_in: list[bool] = []  # whether in a task whose write transaction is open
    writing: set[asyncio.Task[object] | None] = set()
    dialect = type(service.store.dialect)
    begin_write, commit = dialect.begin_write, dialect.commit
    original = store_module.event_tail

    async def begin(self, conn):
        await begin_write(self, conn)
        writing.add(asyncio.current_task())

    async def end(self, conn):
        await commit(self, conn)
        writing.discard(asyncio.current_task())

    def event_tail(*args, **kwargs):
        encoded_in.append(asyncio.current_task() in writing)
        return original(*args, **kwargs)

    monkeypatch.setattr(dialect, "begin_write", begin)
    monkeypatch.setattr(dialect, "commit", end)
    monkeypatch.setattr(store_module, "event_tail", event_tail)
    ctx = service.context(SYSTEM_ACTOR)
    await service.dispatch(projects.CreateProject(project_id="p", name="Ahead"), ctx)
    await asyncio.gather(
        *(
            service.dispatch(tasks.CreateTask(task_id=f"a{n}", project_id="p", title=f"A{n}"), ctx)
            for n in range(8)
        )
    )
    assert len(encoded_in) == 9
    assert not any(encoded_in)
    async with service.engine.connect() as conn:
        report = await verify(conn)
    assert report.ok, report


async def test_callers_are_answered_even_if_the_group_leader_is_cancelled(service):
    ctx = service.context(SYSTEM_ACTOR)
    calls = [
        asyncio.create_task(
            service.dispatch(projects.CreateProject(project_id=f"x{n}", name=f"X{n}"), ctx)
        )
        for n in range(6)
    ]
    queue = service.dispatcher.group._queue
    while queue._writer is None:  # noqa: ASYNC110  # callers prepare, then start the writer
        await asyncio.sleep(0)
    queue._writer.cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    assert len(outcomes) == 6  # nobody is left waiting
    assert all(
        not isinstance(o, BaseException) or isinstance(o, StoreUnavailable) for o in outcomes
    ), outcomes


async def test_commands_whose_group_writer_is_stopped_get_store_unavailable_not_its_cancellation(
    service, engine
):
    """The group writer cancelled (the loop shutting down) in the middle of a group of
    several: its callers were not cancelled, so none gets the writer's CancelledError
    (a caller's task takes it for its own cancellation) but the documented
    StoreUnavailable; the group's transaction is rolled back, and the service goes on."""
    held: list[int] = []  # the size of the group held

    async def hold_groups_of_several(streams: list[str]) -> None:
        if len(streams) > 1:
            held.append(len(streams))
            await asyncio.Event().wait()
        await asyncio.sleep(0.2)  # a group of one: the others queue behind it meanwhile

    ctx = service.context(SYSTEM_ACTOR)
    calls = [
        asyncio.create_task(
            service.dispatch(projects.CreateProject(project_id=f"x{n}", name=f"X{n}"), ctx)
        )
        for n in range(6)
    ]
    service.store.before_commit = hold_groups_of_several
    queue = service.dispatcher.group._queue
    async with asyncio.timeout(10):  # every call answered, held or queued: none preparing
        while not held or sum(c.done() for c in calls) + held[0] + len(queue._queue) < 6:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    queue._writer.cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    stopped = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(stopped) > 1
    assert all(isinstance(o, StoreUnavailable) for o in stopped), outcomes
    assert not any(c.cancelled() for c in calls)
    service.store.before_commit = None
    await service.dispatcher.group.aclose()
    for _ in range(500):  # the NOTIFY after the first group's commit takes one, later
        if engine.pool.checkedout() == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.pool.checkedout() == 0
    answered = {o.stream_id for o in outcomes if not isinstance(o, BaseException)}
    async with engine.connect() as conn:
        logged = set((await conn.execute(select(events.c.stream_id))).scalars())
    assert logged == answered  # the stopped group left nothing
    await service.dispatch(projects.CreateProject(project_id="after", name="After"), ctx)


async def test_a_service_closed_while_its_group_writer_is_stopped_closes_without_error(
    service, engine
):
    """What a host does at shutdown: cancel every other task (the group writer among
    them, mid-group), then close the service. The close was not cancelled: it ends
    normally, not with the writer's CancelledError; the commands waiting get
    StoreUnavailable, and no connection stays checked out."""
    held: list[int] = []  # the size of the group held

    async def hold(streams: list[str]) -> None:
        held.append(len(streams))
        await asyncio.Event().wait()

    service.store.before_commit = hold
    ctx = service.context(SYSTEM_ACTOR)
    await _pool_filled(service.engine, 4)
    calls = [
        asyncio.create_task(
            service.dispatch(projects.CreateProject(project_id=f"x{n}", name=f"X{n}"), ctx)
        )
        for n in range(3)
    ]
    queue = service.dispatcher.group._queue
    async with asyncio.timeout(10):  # every call held or queued: none still preparing
        while not held or held[0] + len(queue._queue) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    closing = asyncio.create_task(service.aclose())
    await asyncio.sleep(0)
    service.dispatcher.group._queue._writer.cancel()
    await asyncio.wait_for(closing, 10)  # no CancelledError
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
    for _ in range(500):
        if engine.pool.checkedout() == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.pool.checkedout() == 0


async def test_commands_resent_with_their_keys_in_a_group_answer_as_the_first_time(
    service, commits
):
    async with service.get_repositories() as repos:
        owner = await repos.users.create_user(
            email="own@example.com", username="owner", password=PASSWORD
        )
        stranger = await repos.users.create_user(
            email="str@example.com", username="stranger", password=PASSWORD
        )
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Grouped")
        task = await repos.tasks.create_task(project.id, "Existing")

    def commands():
        owner_ctx, stranger_ctx = service.context(owner.id), service.context(stranger.id)
        sent = [
            service.dispatch(
                projects.UpdateProject(
                    command_id=f"rename-{n}", project_id=project.id, name=f"Grouped {n}"
                ),
                owner_ctx,
            )
            for n in range(4)  # four commands of one group on one stream...
        ]
        sent.insert(  # ...with another stream's append between them
            2,
            service.dispatch(
                tasks.CreateTask(
                    command_id="between", task_id="between", project_id=project.id, title="B"
                ),
                owner_ctx,
            ),
        )
        sent.append(
            service.dispatch(
                tasks.CreateTask(
                    command_id="intrude", task_id="intruder", project_id=project.id, title="No"
                ),
                stranger_ctx,
            )
        )
        sent.append(
            service.dispatch(
                tasks.ChangeTaskStatus(
                    command_id="skip", task_id=task.id, project_id=project.id, to="done"
                ),
                owner_ctx,
            )
        )
        return sent

    def answer(outcome):
        if isinstance(outcome, BaseException):
            return type(outcome), str(outcome)
        return outcome.command_id, outcome.position, outcome.version, outcome.events

    commits.clear()
    # The first commit (held by ``commits``) is another project's: the seven prepare and
    # queue meanwhile, into one group, on the versions they read (held first, one of
    # them could be alone in its group, and make the others' decisions stale).
    blocker = asyncio.create_task(
        service.dispatch(
            projects.CreateProject(project_id="blocker", name="B"), service.context(owner.id)
        )
    )
    while not commits:  # noqa: ASYNC110  # until the blocker's commit is held
        await asyncio.sleep(0)
    first = [answer(o) for o in await asyncio.gather(*commands(), return_exceptions=True)]
    await blocker
    if service.engine.dialect.name == "postgresql":
        # On SQLite a loaded run once wrote these seven one by one although the first
        # commit was held (not understood yet); the answers below hold either way.
        # A transaction appended to several streams: some of these commands shared one.
        # (Counting transactions says less: those whose decisions the first commit made
        # stale are written alone, fail, and prepare again, as quickly as the machine
        # lets them.)
        assert max(commits) > 1, "no group was formed"
    async with service.engine.connect() as conn:
        logged = await conn.scalar(select(func.count()).select_from(events))
    again = [answer(o) for o in await asyncio.gather(*commands(), return_exceptions=True)]
    assert again == first
    assert [kind for kind, _ in first[5:]] == [PermissionDenied, IllegalTransition]
    async with service.engine.connect() as conn:
        names = dict(
            (
                await conn.execute(
                    select(events.c.position, events.c.data["name"].as_string()).where(
                        events.c.event_type == "ProjectUpdated"
                    )
                )
            ).all()
        )
    renames = [first[n] for n in (0, 1, 3, 4)]
    # each its own event, though four commands of one transaction wrote one stream
    assert [names[position] for _, position, _, _ in renames] == [f"Grouped {n}" for n in range(4)]
    async with service.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(events)) == logged


@pytest.fixture
def budgeted(engine, clock):
    """Services on the backend under test whose groups have the given budget."""

    async def make(budget: float | None, max_group: int = 64) -> DatabaseService:
        svc = DatabaseService(
            Settings(
                database_url=str(engine.url),
                bcrypt_rounds=4,
                group_budget=budget,
                max_group=max_group,
            ),
            engine=engine,
            hasher=BcryptHasher(rounds=4),
            clock=clock,
        )
        await svc.start(migrate=False)
        return svc

    return make


async def _pool_filled(engine: AsyncEngine, count: int) -> None:
    """Open ``count`` connections for ``engine``'s pool ahead of concurrent commands: a
    new connection opens on a worker thread while the loop turns, so commands that
    each opened one would come to the group in turns of their own, not together."""
    opened = await asyncio.gather(*(engine.connect().start() for _ in range(count)))
    for conn in opened:
        await conn.close()


async def _create_projects(svc: DatabaseService, prefix: str, count: int) -> list[int | None]:
    """``count`` concurrent commands; the first commit held a moment so the rest queue."""
    await _pool_filled(svc.engine, count + 1)
    held: list[bool] = []

    async def hold(_streams) -> None:
        if not held:
            held.append(True)
            await asyncio.sleep(0.2)

    svc.store.before_commit = hold
    ctx = svc.context(SYSTEM_ACTOR)
    results = await asyncio.gather(
        *(
            svc.dispatch(projects.CreateProject(project_id=f"{prefix}{n}", name=f"P{n}"), ctx)
            for n in range(count)
        )
    )
    svc.store.before_commit = None
    return [r.position for r in results]


async def test_a_sqlite_group_takes_no_further_command_once_its_budget_is_spent(budgeted):
    svc = await budgeted(0.0)  # spent by the first command of every group
    try:
        positions = await _create_projects(svc, "b", 8)
        committed = [commands for _, commands in svc.dispatcher.lock_times.samples]
    finally:
        await svc.store.aclose()
    assert sorted(positions) == list(range(1, 9))  # every caller answered, each once
    if svc.store.dialect.round_trips:  # PostgreSQL's write does not hold the loop
        assert max(committed) > 1
    else:
        assert committed == [1] * 8


async def test_groups_of_commands_never_exceed_max_group(budgeted):
    svc = await budgeted(None, max_group=3)
    try:
        positions = await _create_projects(svc, "m", 10)
        committed = [commands for _, commands in svc.dispatcher.lock_times.samples]
    finally:
        await svc.store.aclose()
    assert sorted(positions) == list(range(1, 11))
    assert sum(committed) == 10
    assert max(committed) == 3


async def _turns_of_writes(
    svc: DatabaseService, monkeypatch: pytest.MonkeyPatch, turn_cpu: float = 0.0
) -> tuple[list[int], list[int]]:
    """Eight concurrent commands (as :func:`_create_projects`) while another task counts
    the turns of the loop, running ``turn_cpu`` seconds of CPU in each once a command
    has been written: the turn each command's rows were written in (its inline
    projection), and the commands of each committed transaction."""
    assert svc.dispatcher.inline is not None
    turns = 0
    written_in: list[int] = []
    inline = svc.dispatcher.inline
    apply = inline.apply

    async def spied(conn, envelopes) -> None:
        written_in.append(turns)
        await apply(conn, envelopes)

    async def tick() -> None:
        nonlocal turns
        while True:
            turns += 1
            if written_in:
                end = time.thread_time() + turn_cpu
                while time.thread_time() < end:
                    pass
            await asyncio.sleep(0)

    monkeypatch.setattr(inline, "apply", spied)
    ticker = asyncio.create_task(tick())
    try:
        positions = await _create_projects(svc, "s", 8)
        committed = [commands for _, commands in svc.dispatcher.lock_times.samples]
    finally:
        ticker.cancel()
        await svc.store.aclose()
    assert sorted(positions) == list(range(1, 9))
    assert sum(committed) == 8
    return written_in, committed


async def test_a_sqlite_group_gives_the_loop_a_turn_between_its_commands_once_its_slice_is_spent(
    engine, budgeted, monkeypatch
):
    """SQLite's statements run on the loop: a group's write lets other tasks run between
    two of its commands, in its one transaction, once it has used its slice of the loop
    thread's CPU, instead of holding the loop for all of them."""
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's write awaits its round trips: the loop turns anyway")
    svc = await budgeted(None)
    assert svc.dispatcher.group is not None
    svc.dispatcher.group.slice = 0.0  # spent by every command
    written_in, committed = await _turns_of_writes(svc, monkeypatch)
    assert max(committed) > 1  # several commands in one transaction...
    assert len(set(written_in)) == 8  # ...each written in a turn of its own


async def test_a_sqlite_groups_budget_counts_its_own_work_not_the_turns_it_gives_the_loop(
    engine, budgeted, monkeypatch
):
    if engine.dialect.name != "sqlite":
        pytest.skip("the group budget bounds SQLite's groups only")
    svc = await budgeted(0.05)  # ten times a group of seven commands' work, or more
    assert svc.dispatcher.group is not None
    svc.dispatcher.group.slice = 0.0
    # Another task runs more than the budget in each turn the group gives the loop.
    written_in, committed = await _turns_of_writes(svc, monkeypatch, turn_cpu=0.06)
    assert len(set(written_in)) == 8  # the loop turned between every two commands...
    assert len(committed) <= 2  # ...and no group was cut: the first, then all the rest


async def test_a_sqlite_group_cancelled_at_a_turn_of_its_write_rolls_back_and_answers_its_callers(
    engine, budgeted, monkeypatch
):
    """The writer task cancelled (the loop shutting down) at a turn its group's write
    gives the loop: the transaction is rolled back, the write lock and the connection
    are let go, and every caller of the group gets an error instead of waiting."""
    if engine.dialect.name != "sqlite":
        pytest.skip("only SQLite's write gives the loop turns")
    svc = await budgeted(None)
    assert svc.dispatcher.group is not None
    svc.dispatcher.group.slice = 0.0
    turn = dispatch_module._WriteClock.turn
    cancelled: list[bool] = []

    async def cancelled_once(clock) -> None:
        if not cancelled:
            cancelled.append(True)
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
        await turn(clock)

    monkeypatch.setattr(dispatch_module._WriteClock, "turn", cancelled_once)
    outcomes = await asyncio.wait_for(
        asyncio.gather(_create_projects(svc, "c", 8), return_exceptions=True), 10
    )
    assert cancelled and isinstance(outcomes[0], BaseException)
    await svc.dispatcher.group.aclose()
    await svc.store.aclose()
    assert engine.pool.checkedout() == 0
    assert sqlite_write_lock_free(engine.url.database)  # the lock is not held
    # Whatever the cancelled group wrote is gone; the service goes on.
    positions = await _create_projects(svc, "after", 2)
    async with engine.connect() as conn:
        report = await verify(conn)
    assert report.ok, report
    assert sorted(positions) == list(range(max(positions) - 1, max(positions) + 1))


async def test_an_event_the_store_refuses_at_the_write_fails_only_its_own_command(service, commits):
    """A user's events are encrypted and encoded in the write transaction, so the store
    refuses one (here: over ``max_event_bytes``) only there; its caller gets the error,
    and the other commands of its group are written."""
    service.store.max_event_bytes = 550
    ctx = service.context(SYSTEM_ACTOR)
    outcomes = await asyncio.gather(
        *(
            service.dispatch(
                users.RegisterUser(
                    user_id=f"user{n}" + "x" * (50 if n == 3 else 0),
                    email=f"u{n}@example.com",
                    username=f"user{n}",
                    password=SecretStr(PASSWORD),
                ),
                ctx,
            )
            for n in range(6)
        ),
        return_exceptions=True,
    )
    assert len(commits) < 6, "no group was formed"
    assert isinstance(outcomes[3], InvalidEventData), outcomes
    assert all(not isinstance(o, BaseException) for i, o in enumerate(outcomes) if i != 3), outcomes
    async with service.engine.connect() as conn:
        registered = (await conn.execute(text("SELECT user_id FROM users"))).scalars().all()
        logged = await conn.scalar(select(func.count()).select_from(events))
    assert sorted(registered) == [f"user{n}" for n in (0, 1, 2, 4, 5)]
    assert logged == 5


async def test_a_caller_cancelled_while_its_group_fails_as_a_whole_is_not_written_after(service):
    """As for appends: a group of commands whose transaction fails as a whole is written
    again command by command for the callers still waiting only. One cancelled while
    the group was written was told so, and the group left nothing of its command:
    nothing of it is written after."""
    ctx = service.context(SYSTEM_ACTOR)
    queue = service.dispatcher.group._queue
    first_held = asyncio.Event()
    others_queued = asyncio.Event()
    calls: dict[str, asyncio.Task[object]] = {}  # by the stream each creates
    failed: list[str] = []  # the streams of the group that failed as a whole

    async def hold_the_first_then_cancel_one_and_conflict(streams: list[str]) -> None:
        if not others_queued.is_set():
            # The first command, a group of one: the others queue behind it meanwhile.
            first_held.set()
            await others_queued.wait()
        elif len(streams) > 1 and not failed:
            # The next group (on SQLite its budget may leave some of the five to the
            # group after): one of its callers is cancelled, then it fails.
            failed.extend(streams)
            gone = calls[max(streams)]
            gone.cancel()
            await asyncio.wait([gone])  # its caller has been told it was cancelled
            raise TransactionConflict("the group's transaction conflicts")
        # Else a command written alone: the failed group's, again, or one after it.

    def create(n: int) -> None:
        command = projects.CreateProject(project_id=f"x{n}", name=f"X{n}")
        calls[projects.stream_id(command.project_id)] = asyncio.create_task(
            service.dispatch(command, ctx)
        )

    service.store.before_commit = hold_the_first_then_cancel_one_and_conflict
    create(0)
    async with asyncio.timeout(10):
        await first_held.wait()
    for n in range(1, 6):
        create(n)
    async with asyncio.timeout(10):  # the five prepared and queued: the next group
        while len(queue._queue) < 5:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    others_queued.set()
    outcomes = dict(
        zip(
            calls,
            await asyncio.wait_for(asyncio.gather(*calls.values(), return_exceptions=True), 10),
            strict=True,
        )
    )
    assert len(failed) > 1, failed
    gone = max(failed)
    assert isinstance(outcomes.pop(gone), asyncio.CancelledError)
    assert not any(isinstance(o, BaseException) for o in outcomes.values()), outcomes
    service.store.before_commit = None
    async with service.engine.connect() as conn:
        created = set(
            (
                await conn.execute(
                    select(events.c.stream_id).where(events.c.event_type == "ProjectCreated")
                )
            ).scalars()
        )
    assert created == set(outcomes)  # every command but the cancelled caller's
