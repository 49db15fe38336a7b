"""Property: for any command sequence, the read models built inline equal the read
models rebuilt from the log, by ``replay.rebuild`` (shadow + swap) and by a worker
catching up from position 0 into emptied tables. Both backends."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import delete, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from domain import ProjectRole, projects, sessions, tasks, users
from domain.base import Command
from domain.errors import DomainError
from domain.passwords import BcryptHasher
from domain.tasks import Priority, TaskStatus
from eventstore.schema import projection_checkpoints
from projections import replay
from projections.readmodels import ALL_PROJECTORS
from projections.runner import Worker
from tests.conftest import _empty_schema
from tests.projections.worker_process import read_models
from tiu import DatabaseService, Settings

PASSWORDS = ("violet-harbour-lantern-42", "amber-meadow-compass-17")
WRONG = "not-the-password-at-all-9"
N_USERS, N_PROJECTS, N_TASKS, N_SESSIONS = 4, 2, 4, 2


class Clock:
    """One settable clock for the commands and the store's ``recorded_at``."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


user = st.integers(0, N_USERS - 1)
project = st.integers(0, N_PROJECTS - 1)
task = st.integers(0, N_TASKS - 1)
session = st.integers(0, N_SESSIONS - 1)

operation = st.one_of(
    st.tuples(st.just("register"), user),
    st.tuples(st.just("login"), user, st.booleans()),
    st.tuples(st.just("password"), user),
    st.tuples(st.just("project"), user, project, st.booleans()),
    st.tuples(st.just("add_member"), user, project, user, st.sampled_from(ProjectRole)),
    st.tuples(st.just("remove_member"), user, project, user),
    st.tuples(st.just("task"), user, project, task, st.none() | user),
    st.tuples(st.just("edit"), user, task, st.integers(0, 2), st.sampled_from(Priority)),
    st.tuples(st.just("assign"), user, task, user),
    st.tuples(st.just("status"), user, task, st.sampled_from(TaskStatus)),
    st.tuples(st.just("session"), user, session),
    st.tuples(st.just("revoke"), user, user, session),
    st.tuples(st.just("delete_task"), user, task),
    st.tuples(st.just("delete_project"), user, project),
    st.tuples(st.just("tick"), st.integers(1, 4000)),
)

_examples = itertools.count()


async def _reset(engine: AsyncEngine) -> None:
    """Empty every table, the log included (each example starts from nothing)."""
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            schema = str(await conn.scalar(text("SELECT current_schema()")))
        await _empty_schema(engine, schema)
        return
    async with engine.begin() as conn:
        names = (
            await conn.execute(
                text(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%' AND name <> 'alembic_version'"
                )
            )
        ).scalars()
        # The append-only trigger lets a DELETE of events through only while
        # retention_pass holds a row (as retention's own transaction does).
        await conn.execute(text("INSERT INTO retention_pass VALUES ('wipe')"))
        for name in list(names):
            if name != "retention_pass":
                await conn.execute(text(f'DELETE FROM "{name}"'))
        await conn.execute(text("DELETE FROM retention_pass"))


class Run:
    """Issues generated operations as commands; refusals are expected and ignored."""

    def __init__(self, service: DatabaseService, clock: Clock, prefix: str) -> None:
        self.service = service
        self.clock = clock
        self.prefix = prefix
        self.passwords: dict[str, str] = {}
        self.task_project: dict[str, str] = {}
        self.accepted = 0
        self.refused = 0

    def uid(self, n: int) -> str:
        return f"{self.prefix}u{n}"

    async def issue(self, command: Command, actor: str | None) -> None:
        try:
            await self.service.dispatch(command, self.service.context(actor))
        except DomainError:
            self.refused += 1
        else:
            self.accepted += 1

    async def apply(self, op: tuple[Any, ...]) -> None:
        p = self.prefix
        match op:
            case ("register", u):
                await self.issue(
                    users.RegisterUser(
                        user_id=self.uid(u),
                        email=f"{self.uid(u)}@Example.com",
                        username=self.uid(u),
                        password=SecretStr(PASSWORDS[0]),
                    ),
                    None,
                )
                self.passwords.setdefault(self.uid(u), PASSWORDS[0])
            case ("login", u, right):
                password = self.passwords.get(self.uid(u), PASSWORDS[0]) if right else WRONG
                await self.issue(
                    users.AttemptLogin(user_id=self.uid(u), password=SecretStr(password)), None
                )
            case ("password", u):
                old = self.passwords.get(self.uid(u), PASSWORDS[0])
                new = PASSWORDS[1] if old == PASSWORDS[0] else PASSWORDS[0]
                before = self.accepted
                await self.issue(
                    users.ChangePassword(
                        user_id=self.uid(u),
                        old_password=SecretStr(old),
                        new_password=SecretStr(new),
                    ),
                    self.uid(u),
                )
                if self.accepted > before:
                    self.passwords[self.uid(u)] = new
            case ("project", actor, n, public):
                visibility = projects.Visibility.PUBLIC if public else projects.Visibility.PRIVATE
                await self.issue(
                    projects.CreateProject(
                        project_id=f"{p}p{n}", name=f"project {n}", visibility=visibility
                    ),
                    self.uid(actor),
                )
            case ("add_member", actor, n, u, role):
                await self.issue(
                    projects.AddMember(project_id=f"{p}p{n}", user_id=self.uid(u), role=role),
                    self.uid(actor),
                )
            case ("remove_member", actor, n, u):
                await self.issue(
                    projects.RemoveMember(project_id=f"{p}p{n}", user_id=self.uid(u)),
                    self.uid(actor),
                )
            case ("task", actor, n, t, assignee):
                before = self.accepted
                await self.issue(
                    tasks.CreateTask(
                        task_id=f"{p}t{t}",
                        project_id=f"{p}p{n}",
                        title=f"task {t}",
                        assignee_id=None if assignee is None else self.uid(assignee),
                    ),
                    self.uid(actor),
                )
                if self.accepted > before:
                    self.task_project[f"{p}t{t}"] = f"{p}p{n}"
            case ("edit", actor, t, title, priority):
                await self.issue(
                    tasks.EditTask(
                        task_id=f"{p}t{t}",
                        project_id=self.task_project.get(f"{p}t{t}", f"{p}p0"),
                        title=f"title {title}",
                        priority=priority,
                    ),
                    self.uid(actor),
                )
            case ("assign", actor, t, u):
                await self.issue(
                    tasks.AssignTask(
                        task_id=f"{p}t{t}",
                        project_id=self.task_project.get(f"{p}t{t}", f"{p}p0"),
                        assignee_id=self.uid(u),
                    ),
                    self.uid(actor),
                )
            case ("status", actor, t, to):
                await self.issue(
                    tasks.ChangeTaskStatus(
                        task_id=f"{p}t{t}",
                        project_id=self.task_project.get(f"{p}t{t}", f"{p}p0"),
                        to=to,
                    ),
                    self.uid(actor),
                )
            case ("session", u, s):
                await self.issue(
                    sessions.StartSession(
                        session_id=f"{p}s{u}x{s}",
                        user_id=self.uid(u),
                        token=SecretStr(f"tok-{p}-{u}-{s}-" + "k" * 30),
                    ),
                    self.uid(u),
                )
            case ("revoke", actor, u, s):
                await self.issue(
                    sessions.RevokeSession(session_id=f"{p}s{u}x{s}", user_id=self.uid(u)),
                    self.uid(actor),
                )
            case ("delete_task", actor, t):
                await self.issue(
                    tasks.DeleteTask(
                        task_id=f"{p}t{t}",
                        project_id=self.task_project.get(f"{p}t{t}", f"{p}p0"),
                    ),
                    self.uid(actor),
                )
            case ("delete_project", actor, n):
                await self.issue(projects.DeleteProject(project_id=f"{p}p{n}"), self.uid(actor))
            case ("tick", seconds):
                self.clock.now += timedelta(seconds=seconds)
            case _:
                raise AssertionError(op)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(operation, min_size=20, max_size=40))
async def test_replay_from_the_log_equals_inline_projection(
    engine: AsyncEngine, ops: list[tuple[Any, ...]]
) -> None:
    await _reset(engine)
    clock = Clock()
    service = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )
    try:
        await service.start(migrate=False)
        # Everyone exists up front so that most generated commands are accepted.
        run = Run(service, clock, f"x{next(_examples)}")
        for n in range(N_USERS - 1):
            await run.apply(("register", n))
        await run.apply(("project", 0, 0, True))
        await run.apply(("project", 0, 1, False))
        await run.apply(("add_member", 0, 0, 1, ProjectRole.EDITOR))
        await run.apply(("add_member", 0, 1, 1, ProjectRole.EDITOR))
        await run.apply(("add_member", 0, 0, 2, ProjectRole.VIEWER))
        await run.apply(("task", 1, 0, 0, None))
        for op in ops:
            await run.apply(op)
        inline = await read_models(engine)

        # (a) rebuild into shadow tables and swap, in small batches
        await replay.rebuild_all(service.store, ALL_PROJECTORS, batch_size=7)
        assert await read_models(engine) == inline

        # (b) a worker catching up from position 0 into emptied tables
        async with engine.begin() as conn:
            for projector in ALL_PROJECTORS:
                for table in projector.tables:
                    await conn.execute(delete(table))
            await conn.execute(update(projection_checkpoints).values(position=0))
        worker = Worker(service.store, ALL_PROJECTORS, batch_size=5, leader_election=False)
        await worker.catch_up()
        assert await read_models(engine) == inline
    finally:
        await service.store.aclose()


class TickingClock(Clock):
    """A wall clock in miniature: every reading is a millisecond later."""

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


async def test_replay_equals_inline_with_a_clock_that_moves_during_a_command(
    engine: AsyncEngine,
) -> None:
    clock = TickingClock()
    service = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )
    try:
        await service.start(migrate=False)
        run = Run(service, clock, "w")
        for op in [
            ("register", 0),
            ("register", 1),
            ("project", 0, 0, True),
            ("add_member", 0, 0, 1, ProjectRole.EDITOR),  # MemberAdded has no time of its own
        ]:
            await run.apply(op)
        assert run.refused == 0
        inline = await read_models(engine)
        await replay.rebuild_all(service.store, ALL_PROJECTORS)
        assert await read_models(engine) == inline
    finally:
        await service.store.aclose()
