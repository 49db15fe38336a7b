"""Batched projection gives exactly the rows of applying the events one by one.

For generated histories over a few users, projects, tasks and sessions (so the same
rows are touched many times within a batch, created and deleted within one, and
user-wide session revocations meet sessions started before and after them), every
projector's ``apply_batch``, fed the log in batches of random sizes into shadow
tables, must leave exactly the rows its ``apply``, fed one envelope at a time, leaves
in the live tables.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import Table, delete, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain import Event, ProjectRole, Role, users
from domain import projects as projects_domain
from domain import sessions as sessions_domain
from domain import tasks as tasks_domain
from domain.permissions import SYSTEM_ACTOR
from domain.tasks import TRANSITIONS, Priority, TaskStatus
from projections.batching import ARRAY_CHUNK, IN_CHUNK, KeyedRows, _json_text_keys
from projections.projector import Envelope, Projector, Tables
from projections.readmodels import ALL_PROJECTORS
from projections.readmodels.tasks import tasks_table
from projections.replay import shadow_tables
from tests.domain.domain_support import T0

USERS = ("u0", "u1", "u2", "u3")
PROJECTS = ("p0", "p1", "p2")
TASKS = ("t0", "t1", "t2", "t3", "t4", "t5")
ROLES = tuple(Role)


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


@dataclass
class Model:
    """Just enough state to keep a generated history free of duplicate creations
    (which fail one by one and batched alike) and its task moves real."""

    registered: set[str] = field(default_factory=set)
    roles: dict[str, set[Role]] = field(default_factory=dict)
    projects: set[str] = field(default_factory=set)
    members: set[tuple[str, str]] = field(default_factory=set)
    tasks: dict[str, tuple[str, TaskStatus]] = field(default_factory=dict)
    sessions: list[tuple[str, str]] = field(default_factory=list)


Step = tuple[int, int, int, int]
"""(kind, a, b, minute): what to emit, two choices, and the event's clock."""


def build(steps: Sequence[Step]) -> list[Event]:
    m = Model()
    out: list[Event] = []
    for kind, a, b, minute in steps:
        user = USERS[a % len(USERS)]
        other = USERS[b % len(USERS)]
        project = PROJECTS[a % len(PROJECTS)]
        task = TASKS[b % len(TASKS)]
        role = ROLES[b % len(ROLES)]
        when = at(minute)
        match kind:
            case 0 | 1:
                if user in m.registered:
                    out.append(users.LoginFailed(user_id=user, at=when, ip=None, user_agent=None))
                    continue
                m.registered.add(user)
                m.roles[user] = {Role.MEMBER, role}
                out.append(
                    users.UserRegistered(
                        user_id=user,
                        email=f"{user}@Example.org",
                        username=user.upper(),
                        display_name=None if b % 2 else f"User {user}",
                        password_hash="fake$irrelevant",
                        roles=(Role.MEMBER, role, role),
                        at=when,
                    )
                )
            case 2:
                out.append(users.LoginSucceeded(user_id=user, at=when, ip=None, user_agent=None))
            case 3:
                out.append(users.LoginFailed(user_id=user, at=when, ip=None, user_agent=None))
            case 4:
                out.append(
                    users.AccountLocked(user_id=user, until=at(minute + 15), failed_attempts=3)
                )
            case 5:
                out.append(users.AccountUnlocked(user_id=user, by=other, at=when))
            case 6:
                via = "reset" if b % 2 else "change"
                out.append(
                    users.PasswordChanged(user_id=user, password_hash="fake$new", via=via, at=when)
                )
            case 7:
                if user not in m.registered:  # registration would then insert it again
                    continue
                held = m.roles[user]
                if role in held:
                    held.discard(role)
                    out.append(users.RoleRevoked(user_id=user, role=role, by=other))
                else:
                    held.add(role)
                    out.append(users.RoleAssigned(user_id=user, role=role, by=other))
            case 8:
                out.append(users.UserDeactivated(user_id=user, by=other, at=when))
            case 9:
                out.append(users.UserReactivated(user_id=user, by=other, at=when))
            case 10 | 11:  # user-wide revocations, as password changes and deactivation
                out.append(users.UserSessionsRevoked(user_id=user, by=other, at=when))
            case 12:
                out.append(
                    users.EmailChanged(
                        user_id=user,
                        previous_email="x@example.org",
                        email=f"{user}.{minute}@Example.net",
                        by=user,
                    )
                )
            case 13 | 14 | 15:
                session_id = f"s{len(m.sessions)}"
                m.sessions.append((session_id, user))
                out.append(
                    sessions_domain.SessionStarted(
                        session_id=session_id,
                        user_id=user,
                        token_hash=f"{session_id:0>64}",
                        started_at=when,
                        expires_at=at(minute + 720),
                        ip=None,
                        user_agent=None,
                    )
                )
            case 16 | 17:
                if m.sessions:
                    session_id, owner = m.sessions[b % len(m.sessions)]
                    out.append(
                        sessions_domain.SessionTouched(
                            session_id=session_id, user_id=owner, at=when
                        )
                    )
            case 18:
                if m.sessions:
                    session_id, owner = m.sessions[b % len(m.sessions)]
                    by = owner if a % 2 else other
                    out.append(
                        sessions_domain.SessionRevoked(
                            session_id=session_id, user_id=owner, by=by, at=when
                        )
                    )
            case 19:
                if project in m.projects:
                    out.append(
                        projects_domain.ProjectUpdated(
                            project_id=project, name=f"N{minute}", description=f"D{b}", by=user
                        )
                    )
                    continue
                m.projects.add(project)
                out.append(
                    projects_domain.ProjectCreated(
                        project_id=project,
                        owner_id=user,
                        name=f"Project {project}",
                        description="",
                        visibility=projects_domain.Visibility.PRIVATE,
                        at=when,
                    )
                )
            case 20:
                visibility = list(projects_domain.Visibility)[b % len(projects_domain.Visibility)]
                out.append(
                    projects_domain.ProjectVisibilityChanged(
                        project_id=project, visibility=visibility, by=user
                    )
                )
            case 21 | 22:
                key = (project, other)
                if key in m.members:
                    if kind == 21:
                        m.members.discard(key)
                        out.append(
                            projects_domain.MemberRemoved(
                                project_id=project, user_id=other, by=user
                            )
                        )
                    else:
                        prole = list(ProjectRole)[minute % len(ProjectRole)]
                        out.append(
                            projects_domain.MemberRoleChanged(
                                project_id=project, user_id=other, role=prole, by=user
                            )
                        )
                else:
                    m.members.add(key)
                    out.append(
                        projects_domain.MemberAdded(
                            project_id=project, user_id=other, role=ProjectRole.EDITOR, by=user
                        )
                    )
            case 23:
                cls = projects_domain.ProjectArchived if b % 2 else projects_domain.ProjectRestored
                out.append(cls(project_id=project, by=user, at=when))
            case 24 | 25:
                if task not in m.tasks:
                    m.tasks[task] = (project, TaskStatus.TODO)
                    out.append(
                        tasks_domain.TaskCreated(
                            task_id=task,
                            project_id=project,
                            title=f"Task {task}",
                            description="",
                            priority=list(Priority)[minute % len(Priority)],
                            due_date=at(minute + 600) if a % 2 else None,
                            assignee_id=other if minute % 2 else None,
                            created_by=user,
                            at=when,
                        )
                    )
                    continue
                in_project, status = m.tasks[task]
                to = sorted(TRANSITIONS[status])[minute % len(TRANSITIONS[status])]
                m.tasks[task] = (in_project, to)
                by = SYSTEM_ACTOR if minute % 7 == 0 else user
                out.append(
                    tasks_domain.TaskStatusChanged(
                        task_id=task,
                        project_id=in_project,
                        from_status=status,
                        to_status=to,
                        by=by,
                        at=when,
                    )
                )
            case 26:
                in_project = m.tasks.get(task, (project, TaskStatus.TODO))[0]
                out.append(
                    tasks_domain.TaskEdited(
                        task_id=task,
                        project_id=in_project,
                        title=f"Edited {minute}",
                        description=f"d{a}",
                        priority=list(Priority)[a % len(Priority)],
                        due_date=None if b % 2 else at(minute + 60),
                        by=user,
                    )
                )
            case 27:
                in_project = m.tasks.get(task, (project, TaskStatus.TODO))[0]
                out.append(
                    tasks_domain.TaskAssigned(
                        task_id=task, project_id=in_project, assignee_id=other, by=user
                    )
                )
            case 28:
                in_project = m.tasks.get(task, (project, TaskStatus.TODO))[0]
                out.append(
                    tasks_domain.TaskUnassigned(
                        task_id=task, project_id=in_project, previous_assignee_id=other, by=user
                    )
                )
            case 29:
                if minute % 3 == 0:  # rarely: it erases the user's fields for good
                    out.append(users.UserForgotten(user_id=user, by=other, at=when))
    return out


KINDS = 30
steps = st.lists(
    st.tuples(
        st.integers(0, KINDS - 1),
        st.integers(0, 11),
        st.integers(0, 11),
        st.integers(0, 90),  # not monotonic: clocks of other nodes, validity never moves back
    ),
    min_size=1,
    max_size=120,
)
batch_sizes = st.lists(st.integers(1, 60), min_size=1, max_size=8)

_STREAM_OF = {
    "domain.users": "user_id",
    "domain.projects": "project_id",
    "domain.tasks": "task_id",
    "domain.sessions": "session_id",
}


def envelopes(events: Sequence[Event]) -> list[Envelope]:
    """In log order; ``recorded_at`` grows, so events without ``at`` differ in time."""
    out = []
    for i, e in enumerate(events):
        stream = f"{type(e).__module__}-{getattr(e, _STREAM_OF[type(e).__module__])}"
        out.append(Envelope(e, stream, 1, None, at(100 + i), None, uuid.uuid4()))
    return out


def split(items: Sequence[Envelope], sizes: Sequence[int]) -> list[Sequence[Envelope]]:
    out, i, n = [], 0, 0
    while i < len(items):
        size = sizes[n % len(sizes)]
        out.append(items[i : i + size])
        i, n = i + size, n + 1
    return out


@dataclass
class Db:
    engine: AsyncEngine
    shadows: dict[str, Tables]

    async def clear(self) -> None:
        async with self.engine.begin() as conn:
            for projector in ALL_PROJECTORS:
                for table in (*projector.tables, *self.shadows[projector.name].values()):
                    await conn.execute(delete(table))

    async def rows(self, conn: AsyncConnection, table: Table) -> list[dict[str, Any]]:
        query = select(table).order_by(*table.primary_key.columns)
        return [dict(r._mapping) for r in await conn.execute(query)]


@pytest.fixture
async def db(engine: AsyncEngine) -> AsyncIterator[Db]:
    shadows = {p.name: shadow_tables(p) for p in ALL_PROJECTORS}
    async with engine.begin() as conn:
        for tables in shadows.values():
            for table in tables.values():
                await conn.run_sync(table.create)
    yield Db(engine, shadows)
    async with engine.begin() as conn:
        for tables in shadows.values():
            for table in tables.values():
                await conn.run_sync(table.drop)


async def one_by_one(
    conn: AsyncConnection, projector: Projector, items: Sequence[Envelope]
) -> None:
    t = projector.live_tables()
    for envelope in items:
        if envelope.event_type in projector.handles:
            await projector.apply(conn, envelope, t)


async def assert_batched_equals_one_by_one(
    db: Db, items: Sequence[Envelope], sizes: Sequence[int]
) -> None:
    await db.clear()
    async with db.engine.begin() as conn:
        for projector in ALL_PROJECTORS:
            await one_by_one(conn, projector, items)
    for chunk in split(items, sizes):  # one transaction per batch, as the runners do
        async with db.engine.begin() as conn:
            for projector in ALL_PROJECTORS:
                await projector.apply_batch(conn, chunk, db.shadows[projector.name])
    async with db.engine.connect() as conn:
        for projector in ALL_PROJECTORS:
            for table in projector.tables:
                expected = await db.rows(conn, table)
                got = await db.rows(conn, db.shadows[projector.name][table.name])
                assert got == expected, (projector.name, table.name)


EXAMPLES = int(os.environ.get("TIU_BATCHING_EXAMPLES", "30"))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=steps, sizes=batch_sizes)
async def test_batches_of_random_sizes_give_the_rows_of_one_by_one(
    db: Db, steps: list[Step], sizes: list[int]
) -> None:
    events = build(steps)
    event(f"events: {min(len(events) // 40 * 40, 80)}+")
    await assert_batched_equals_one_by_one(db, envelopes(events), sizes)


def crowded_history() -> list[Event]:
    """Each kind of trouble at once, in one batch: a row touched many times, rows
    created and deleted, revocations before and after sessions start."""
    steps: list[Step] = []
    for minute in range(40):
        for kind in range(KINDS):
            steps.append((kind, minute % 5, (minute * 7 + kind) % 12, (minute * 13) % 91))
    return build(steps)


@pytest.mark.parametrize("sizes", [[1], [2], [7, 1, 3], [100_000]], ids=str)
async def test_a_crowded_history_in_fixed_batch_sizes(db: Db, sizes: list[int]) -> None:
    items = envelopes(crowded_history())
    assert len(items) > 1000
    await assert_batched_equals_one_by_one(db, items, sizes)


async def test_a_duplicate_creation_fails_batched_as_it_does_one_by_one(db: Db) -> None:
    created = build([(24, 0, 0, 1), (26, 0, 0, 2)])
    duplicate = envelopes([*created, created[0]])
    projector = next(p for p in ALL_PROJECTORS if p.name == "tasks")
    async with db.engine.begin() as conn:
        await projector.apply_batch(conn, duplicate[:2], projector.live_tables())
    with pytest.raises(IntegrityError):
        async with db.engine.begin() as conn:
            await projector.apply_batch(conn, duplicate[1:], projector.live_tables())


@pytest.mark.parametrize("n", [IN_CHUNK * 2 + 7, ARRAY_CHUNK + 7], ids=["in-lists", "arrays"])
async def test_keyed_rows_load_more_keys_than_fit_in_one_list_or_array(db: Db, n: int) -> None:
    events = [
        tasks_domain.TaskCreated(
            task_id=f"t{i}",
            project_id="p0",
            title="T",
            description="",
            priority=Priority.LOW,
            due_date=None,
            assignee_id=None,
            created_by="u0",
            at=at(1),
        )
        for i in range(n)
    ]
    projector = next(p for p in ALL_PROJECTORS if p.name == "tasks")
    async with db.engine.begin() as conn:
        await projector.apply_batch(conn, envelopes(events), projector.live_tables())
        rows = KeyedRows(tasks_table)
        for i in range(n + 3):
            rows.want(f"t{i}")
        await rows.load(conn)
        assert sum(rows.exists(f"t{i}") for i in range(n + 3)) == n
        assert await conn.scalar(select(func.count()).select_from(tasks_table)) == n


async def test_keyed_rows_load_finds_every_key_as_it_is_stored(db: Db) -> None:
    """Keys with JSON's special characters come back from the JSON array SQLite loads
    by; a key holding NUL (SQLite only: PostgreSQL text cannot) is loaded through an
    IN list, with the rest of its chunk."""
    keys = ["plain", 'quo"te', "back\\slash", "\\u0041", "emoji \U0001f600", "é", "tab\tnl\n"]
    keys += ["[1]", "1", " padded "]
    if db.engine.dialect.name == "sqlite":
        keys.append("nul\x00inside")
    async with db.engine.begin() as conn:
        await conn.execute(tasks_table.insert(), [task_row(k, "T") for k in keys])
        rows = KeyedRows(tasks_table, load=["title"])
        for key in [*keys, "missing", "PLAIN"]:
            rows.want(key)
        await rows.load(conn)
        assert [k for k in keys if not rows.exists(k)] == []
        assert [rows.get(k)["task_id"] for k in keys] == keys  # type: ignore[index]
        assert not rows.exists("missing")
        assert not rows.exists("PLAIN")


def test_keys_go_to_sqlite_as_json_only_where_json_each_gives_them_back() -> None:
    assert _json_text_keys(["a", 'b"', "\\"]) == '["a","b\\"","\\\\"]'
    assert _json_text_keys(["a", "nul\x00"]) is None  # json_each cuts at NUL
    assert _json_text_keys(["a", 1]) is None  # IN would compare it as text
    assert _json_text_keys(["a", "\ud800"]) is None  # not valid Unicode


def task_row(task_id: str, title: str) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "project_id": "p0",
        "title": title,
        "description": "",
        "status": "todo",
        "priority": "low",
        "priority_rank": 1,
        "due_at": None,
        "assignee_id": None,
        "created_by": "u0",
        "created_at": at(1),
        "updated_at": at(1),
        "completed_at": None,
    }


async def test_a_batched_write_of_a_value_too_long_for_its_column_is_never_truncated(
    db: Db,
) -> None:
    # PostgreSQL writes a batch as one statement over arrays (unnest); an explicit cast
    # to varchar(200) would cut a 201-character title silently, where a row-by-row
    # write refuses it. SQLite keeps what it is given.
    table = db.shadows["tasks"]["tasks"]
    long_title = "x" * 201
    postgres = db.engine.dialect.name == "postgresql"

    async def write(fold: Any) -> None:
        async with db.engine.begin() as conn:
            rows = KeyedRows(table)
            for key in ("t1", "t2"):
                rows.want(key)
            await rows.load(conn)
            fold(rows)
            await rows.flush(conn)

    def insert_long(rows: KeyedRows) -> None:
        rows.insert(task_row("t1", long_title))
        rows.insert(task_row("t2", "short"))

    def update_long(rows: KeyedRows) -> None:
        rows.update("t1", title=long_title)
        rows.update("t2", title=long_title)

    if postgres:
        with pytest.raises(DBAPIError, match="too long"):
            await write(insert_long)
    else:
        await write(insert_long)
        await db.clear()
    await write(lambda rows: [rows.insert(task_row(k, "short")) for k in ("t1", "t2")])
    if postgres:
        with pytest.raises(DBAPIError, match="too long"):
            await write(update_long)
    else:
        await write(update_long)
    async with db.engine.connect() as conn:
        titles = {r["task_id"]: r["title"] for r in await db.rows(conn, table)}
    assert titles == (
        {"t1": "short", "t2": "short"} if postgres else {"t1": long_title, "t2": long_title}
    )
