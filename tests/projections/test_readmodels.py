"""The read-model projectors, applied event by event on SQLite and PostgreSQL.

Events come from the real deciders where that is short (registration) and are built
directly otherwise; each is wrapped in an ``Envelope`` without a position, as the
inline runner hands them over, and applied inside one transaction per batch.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import SecretStr
from sqlalchemy import MetaData, Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import quoted_name

from domain import Event, Permission, ProjectRole, Role, registered_event_types, users
from domain import projects as projects_domain
from domain import sessions as sessions_domain
from domain import tasks as tasks_domain
from domain.permissions import ROLE_PERMISSIONS, SYSTEM_ACTOR
from domain.routing import USERS
from domain.tasks import TRANSITIONS, Priority, TaskStatus
from eventstore.schema import NAMING_CONVENTION
from migrations.metadata import target_metadata
from projections.projector import Envelope, Projector, Tables, metadata
from projections.readmodels import ALL_PROJECTORS, by_name
from projections.readmodels.project_stats import project_stats
from projections.readmodels.projects import project_members, projects_table
from projections.readmodels.sessions import sessions_table
from projections.readmodels.tasks import tasks_table
from projections.readmodels.user_activity import user_activity
from projections.readmodels.users import user_permissions, user_roles, users_table
from tests.domain.domain_support import PASSWORD, T0, ctx, decide

RECORDED = T0 + timedelta(hours=1)
"""``recorded_at`` of every envelope; what events without an ``at`` are timed by."""

_STREAM_KEYS = {
    "domain.users": (users.stream_id, "user_id"),
    "domain.projects": (projects_domain.stream_id, "project_id"),
    "domain.tasks": (tasks_domain.stream_id, "task_id"),
    "domain.sessions": (sessions_domain.stream_id, "session_id"),
}


class Log:
    """Feeds events to projectors the way a runner does: in order, versions per stream."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.versions: Counter[str] = Counter()

    def envelope(self, event: Event) -> Envelope:
        to_stream, key = _STREAM_KEYS[type(event).__module__]
        stream_id = to_stream(getattr(event, key))
        self.versions[stream_id] += 1
        return Envelope(
            event, stream_id, self.versions[stream_id], None, RECORDED, None, uuid.uuid4()
        )

    async def apply(
        self,
        *events: Event,
        projectors: Sequence[Projector] = ALL_PROJECTORS,
        tables: Mapping[str, Table] | None = None,
    ) -> None:
        async with self.engine.begin() as conn:
            for event in events:
                envelope = self.envelope(event)
                for projector in projectors:
                    if envelope.event_type in projector.handles:
                        t = Tables(tables) if tables is not None else projector.live_tables()
                        await projector.apply(conn, envelope, t)


async def rows(engine: AsyncEngine, table: Table, **where: Any) -> list[dict[str, Any]]:
    query = select(table).where(*(table.c[k] == v for k, v in where.items()))
    query = query.order_by(*table.primary_key.columns)
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(query)]


async def one(engine: AsyncEngine, table: Table, **where: Any) -> dict[str, Any]:
    (found,) = await rows(engine, table, **where)
    return found


@pytest.fixture
def log(engine: AsyncEngine) -> Log:
    return Log(engine)


# --- event builders -----------------------------------------------------------------------


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def registered(user_id: str, *roles: Role) -> users.UserRegistered:
    return users.UserRegistered(
        user_id=user_id,
        email=f"{user_id}@example.org",
        username=user_id,
        display_name=None,
        password_hash="fake$irrelevant",
        roles=roles or (Role.MEMBER,),
        at=T0,
    )


def project_created(project_id: str = "p1", owner_id: str = "owen") -> Event:
    return projects_domain.ProjectCreated(
        project_id=project_id,
        owner_id=owner_id,
        name="Apollo",
        description="To the moon",
        visibility=projects_domain.Visibility.PRIVATE,
        at=at(1),
    )


def task_created(
    task_id: str,
    project_id: str = "p1",
    *,
    by: str = "owen",
    assignee_id: str | None = None,
    due: datetime | None = None,
    minute: int = 2,
) -> Event:
    return tasks_domain.TaskCreated(
        task_id=task_id,
        project_id=project_id,
        title=f"Task {task_id}",
        description="",
        priority=Priority.HIGH,
        due_date=due,
        assignee_id=assignee_id,
        created_by=by,
        at=at(minute),
    )


def moved(
    task_id: str,
    frm: TaskStatus,
    to: TaskStatus,
    *,
    project_id: str = "p1",
    by: str = "owen",
    minute: int = 10,
) -> Event:
    return tasks_domain.TaskStatusChanged(
        task_id=task_id,
        project_id=project_id,
        from_status=frm,
        to_status=to,
        by=by,
        at=at(minute),
    )


def session_started(session_id: str, user_id: str, minute: int) -> Event:
    return sessions_domain.SessionStarted(
        session_id=session_id,
        user_id=user_id,
        token_hash=f"{session_id:0>64}",
        started_at=at(minute),
        expires_at=at(minute + 720),
        ip="203.0.113.7",
        user_agent="pytest",
    )


TODO, IN_PROGRESS, REVIEW, DONE, CANCELLED = (
    TaskStatus.TODO,
    TaskStatus.IN_PROGRESS,
    TaskStatus.REVIEW,
    TaskStatus.DONE,
    TaskStatus.CANCELLED,
)


def full_history() -> list[Event]:
    """A little of everything: every read-model table gets at least one row."""
    return [
        registered("owen"),
        registered("bob"),
        users.RoleAssigned(user_id="bob", role=Role.VIEWER, by=SYSTEM_ACTOR),
        users.LoginSucceeded(user_id="bob", at=at(1), ip=None, user_agent=None),
        session_started("s1", "bob", 1),
        project_created(),
        projects_domain.MemberAdded(
            project_id="p1", user_id="bob", role=ProjectRole.EDITOR, by="owen"
        ),
        task_created("t1", assignee_id="bob"),
        moved("t1", TODO, IN_PROGRESS, by="bob"),
    ]


# --- the registry -------------------------------------------------------------------------


def test_projectors_have_unique_names_and_are_found_by_name() -> None:
    names = [p.name for p in ALL_PROJECTORS]
    assert len(set(names)) == len(names)
    assert all(by_name(name) is p for name, p in zip(names, ALL_PROJECTORS, strict=True))
    assert all(p.version >= 1 for p in ALL_PROJECTORS)
    with pytest.raises(KeyError, match="no projector 'nope'"):
        by_name("nope")


def test_every_read_model_table_belongs_to_exactly_one_projector() -> None:
    owned = [table for p in ALL_PROJECTORS for table in p.tables]
    assert len(owned) == len(set(owned))
    assert set(owned) == set(metadata.tables.values())


def test_projectors_handle_only_registered_event_types() -> None:
    known = registered_event_types().keys()
    for projector in ALL_PROJECTORS:
        assert projector.handles, projector.name
        assert projector.handles <= known, projector.name


def test_read_models_keep_no_credentials() -> None:
    for table in (users_table, user_roles, user_permissions, user_activity):
        assert not [c.name for c in table.c if {"hash", "password"} & set(c.name.split("_"))]
    # Sessions are found by the token's SHA-256 only, never the token. (The login's IP
    # and user agent are kept, and erased with the user: tests/privacy.)
    assert "token_hash" in sessions_table.c
    assert "token" not in sessions_table.c


async def test_migrated_schema_matches_the_read_model_tables(engine: AsyncEngine) -> None:
    def differences(connection: Any) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, cast(Any, target_metadata)))  # takes a list too

    async with engine.connect() as conn:
        assert await conn.run_sync(differences) == []


# --- users, roles and permissions ---------------------------------------------------------


async def test_registration_creates_the_user_with_roles_and_derived_permissions(
    log: Log, engine: AsyncEngine
) -> None:
    command = users.RegisterUser(
        user_id="alice",
        email="Alice.Smith@Example.ORG",
        username="Alice_S",
        password=SecretStr(PASSWORD),
        display_name="Alice Smith",
        roles=(Role.MEMBER, Role.VIEWER),
    )
    events = decide(USERS, command, users.initial_state(), ctx(), {})
    await log.apply(*events)

    user = await one(engine, users_table, user_id="alice")
    assert user == {
        "user_id": "alice",
        "email": "Alice.Smith@example.org",
        "email_lower": "alice.smith@example.org",
        "username": "Alice_S",
        "username_lower": "alice_s",
        "display_name": "Alice Smith",
        "active": True,
        "locked_until": None,
        "failed_logins": 0,
        "last_login_at": None,
        "sessions_valid_after": None,
        "created_at": T0,
        "updated_at": T0,
    }
    roles = await rows(engine, user_roles, user_id="alice")
    assert {r["role"] for r in roles} == {"member", "viewer"}
    granted = {r["permission"] for r in await rows(engine, user_permissions, user_id="alice")}
    assert granted == set(ROLE_PERMISSIONS[Role.MEMBER] | ROLE_PERMISSIONS[Role.VIEWER])


async def test_assigning_and_revoking_roles_rederives_permissions(
    log: Log, engine: AsyncEngine
) -> None:
    async def permissions() -> set[str]:
        return {r["permission"] for r in await rows(engine, user_permissions, user_id="bob")}

    await log.apply(registered("bob", Role.VIEWER))
    assert await permissions() == {Permission.USERS_READ}

    await log.apply(users.RoleAssigned(user_id="bob", role=Role.ADMIN, by="root"))
    assert await permissions() == set(Permission)
    assert (await one(engine, users_table, user_id="bob"))["updated_at"] == RECORDED

    await log.apply(users.RoleRevoked(user_id="bob", role=Role.ADMIN, by="root"))
    assert await permissions() == {Permission.USERS_READ}
    assert [r["role"] for r in await rows(engine, user_roles, user_id="bob")] == ["viewer"]

    await log.apply(users.RoleRevoked(user_id="bob", role=Role.VIEWER, by="root"))
    assert await permissions() == set()
    assert await rows(engine, user_roles, user_id="bob") == []


async def test_failed_logins_lock_and_unlock_and_a_success_resets_them(
    log: Log, engine: AsyncEngine
) -> None:
    await log.apply(
        registered("alice"),
        users.LoginFailed(user_id="alice", at=at(1), ip=None, user_agent=None),
        users.LoginFailed(user_id="alice", at=at(2), ip=None, user_agent=None),
    )
    assert (await one(engine, users_table, user_id="alice"))["failed_logins"] == 2

    await log.apply(
        users.LoginFailed(user_id="alice", at=at(3), ip=None, user_agent=None),
        users.AccountLocked(user_id="alice", until=at(18), failed_attempts=3),
    )
    user = await one(engine, users_table, user_id="alice")
    assert (user["locked_until"], user["failed_logins"]) == (at(18), 0)

    await log.apply(users.AccountUnlocked(user_id="alice", by="root", at=at(4)))
    user = await one(engine, users_table, user_id="alice")
    assert (user["locked_until"], user["updated_at"]) == (None, at(4))

    await log.apply(
        users.LoginFailed(user_id="alice", at=at(5), ip=None, user_agent=None),
        users.LoginSucceeded(user_id="alice", at=at(6), ip=None, user_agent=None),
    )
    user = await one(engine, users_table, user_id="alice")
    assert (user["failed_logins"], user["last_login_at"]) == (0, at(6))


async def test_email_change_deactivation_and_reactivation_update_the_user(
    log: Log, engine: AsyncEngine
) -> None:
    await log.apply(
        registered("alice"),
        users.EmailChanged(
            user_id="alice",
            previous_email="alice@example.org",
            email="Ally@Example.net",
            by="alice",
        ),
        users.UserDeactivated(user_id="alice", by="root", at=at(5)),
    )
    user = await one(engine, users_table, user_id="alice")
    assert (user["email"], user["email_lower"]) == ("Ally@Example.net", "ally@example.net")
    assert (user["active"], user["sessions_valid_after"]) == (False, at(5))

    await log.apply(users.UserReactivated(user_id="alice", by="root", at=at(6)))
    user = await one(engine, users_table, user_id="alice")
    assert (user["active"], user["sessions_valid_after"], user["updated_at"]) == (
        True,
        at(5),
        at(6),
    )


# --- sessions -----------------------------------------------------------------------------


async def test_session_start_touch_and_logout(log: Log, engine: AsyncEngine) -> None:
    await log.apply(registered("alice"), session_started("s1", "alice", 1))
    session = await one(engine, sessions_table, session_id="s1")
    assert session == {
        "session_id": "s1",
        "user_id": "alice",
        "token_hash": f"{'s1':0>64}",
        "started_at": at(1),
        "expires_at": at(721),
        "last_seen_at": at(1),
        "revoked_at": None,
        "revoked_by": None,
        "revoked_reason": None,
        "ip": "203.0.113.7",
        "user_agent": "pytest",
    }

    await log.apply(sessions_domain.SessionTouched(session_id="s1", user_id="alice", at=at(9)))
    assert (await one(engine, sessions_table, session_id="s1"))["last_seen_at"] == at(9)

    await log.apply(
        sessions_domain.SessionRevoked(session_id="s1", user_id="alice", by="alice", at=at(10))
    )
    session = await one(engine, sessions_table, session_id="s1")
    assert (session["revoked_at"], session["revoked_by"], session["revoked_reason"]) == (
        at(10),
        "alice",
        "logout",
    )


async def test_a_session_revoked_by_someone_else_says_so(log: Log, engine: AsyncEngine) -> None:
    await log.apply(
        session_started("s1", "alice", 1),
        sessions_domain.SessionRevoked(session_id="s1", user_id="alice", by="root", at=at(2)),
    )
    session = await one(engine, sessions_table, session_id="s1")
    assert (session["revoked_by"], session["revoked_reason"]) == ("root", "revoked")


async def test_password_change_moves_sessions_valid_after_and_revokes_older_sessions(
    log: Log, engine: AsyncEngine
) -> None:
    await log.apply(
        registered("alice"),
        registered("bob"),
        session_started("old", "alice", 1),
        session_started("bobs", "bob", 1),
        users.PasswordChanged(user_id="alice", password_hash="fake$new", via="change", at=at(5)),
        session_started("new", "alice", 6),
    )
    user = await one(engine, users_table, user_id="alice")
    assert (user["sessions_valid_after"], user["updated_at"]) == (at(5), at(5))
    assert "fake$new" not in user.values()

    revoked = {
        s["session_id"]: (s["revoked_at"], s["revoked_reason"])
        for s in await rows(engine, sessions_table)
    }
    assert revoked == {
        "old": (at(5), "password_changed"),
        "new": (None, None),
        "bobs": (None, None),
    }


async def test_password_reset_lifts_a_lock_and_revoke_all_never_moves_validity_back(
    log: Log, engine: AsyncEngine
) -> None:
    await log.apply(
        registered("alice"),
        session_started("s1", "alice", 1),
        users.AccountLocked(user_id="alice", until=at(30), failed_attempts=5),
        users.PasswordChanged(user_id="alice", password_hash="fake$new", via="reset", at=at(10)),
        # Recorded later with an earlier clock (another node): validity never moves back.
        users.UserSessionsRevoked(user_id="alice", by="alice", at=at(8)),
    )
    user = await one(engine, users_table, user_id="alice")
    assert (user["locked_until"], user["sessions_valid_after"]) == (None, at(10))
    session = await one(engine, sessions_table, session_id="s1")
    assert (session["revoked_at"], session["revoked_reason"]) == (at(10), "password_reset")


async def test_deactivation_and_revoke_all_revoke_live_sessions_with_their_reason(
    log: Log, engine: AsyncEngine
) -> None:
    await log.apply(
        session_started("a1", "alice", 1),
        session_started("b1", "bob", 1),
        sessions_domain.SessionRevoked(session_id="b1", user_id="bob", by="bob", at=at(2)),
        session_started("b2", "bob", 3),
        users.UserDeactivated(user_id="alice", by="root", at=at(5)),
        users.UserSessionsRevoked(user_id="bob", by="root", at=at(5)),
    )
    reasons = {s["session_id"]: s["revoked_reason"] for s in await rows(engine, sessions_table)}
    # b1 keeps the reason it was first revoked for.
    assert reasons == {"a1": "user_deactivated", "b1": "logout", "b2": "all_sessions_revoked"}


# --- projects -----------------------------------------------------------------------------


async def test_project_creation_settings_members_archive_and_restore(
    log: Log, engine: AsyncEngine
) -> None:
    await log.apply(project_created())
    project = await one(engine, projects_table, project_id="p1")
    assert project == {
        "project_id": "p1",
        "name": "Apollo",
        "description": "To the moon",
        "visibility": "private",
        "owner_id": "owen",
        "archived": False,
        "archived_at": None,
        "created_at": at(1),
        "updated_at": at(1),
    }

    await log.apply(
        projects_domain.ProjectUpdated(
            project_id="p1", name="Artemis", description="Back to the moon", by="owen"
        ),
        projects_domain.ProjectVisibilityChanged(
            project_id="p1", visibility=projects_domain.Visibility.PUBLIC, by="owen"
        ),
        projects_domain.MemberAdded(
            project_id="p1", user_id="ann", role=ProjectRole.EDITOR, by="owen"
        ),
        projects_domain.MemberAdded(
            project_id="p1", user_id="bob", role=ProjectRole.VIEWER, by="owen"
        ),
        projects_domain.MemberRoleChanged(
            project_id="p1", user_id="bob", role=ProjectRole.MANAGER, by="owen"
        ),
        projects_domain.MemberRemoved(project_id="p1", user_id="ann", by="bob"),
    )
    project = await one(engine, projects_table, project_id="p1")
    assert (project["name"], project["description"], project["visibility"]) == (
        "Artemis",
        "Back to the moon",
        "public",
    )
    assert project["updated_at"] == RECORDED
    members = await rows(engine, project_members, project_id="p1")
    assert members == [
        {"project_id": "p1", "user_id": "bob", "role": "manager", "added_at": RECORDED}
    ]

    await log.apply(projects_domain.ProjectArchived(project_id="p1", by="owen", at=at(7)))
    project = await one(engine, projects_table, project_id="p1")
    assert (project["archived"], project["archived_at"], project["updated_at"]) == (
        True,
        at(7),
        at(7),
    )

    await log.apply(projects_domain.ProjectRestored(project_id="p1", by="owen", at=at(8)))
    project = await one(engine, projects_table, project_id="p1")
    assert (project["archived"], project["archived_at"], project["updated_at"]) == (
        False,
        None,
        at(8),
    )


# --- tasks --------------------------------------------------------------------------------


async def test_task_creation_edits_and_assignment(log: Log, engine: AsyncEngine) -> None:
    await log.apply(project_created(), task_created("t1", assignee_id="ann", due=at(600)))
    task = await one(engine, tasks_table, task_id="t1")
    assert task == {
        "task_id": "t1",
        "project_id": "p1",
        "title": "Task t1",
        "description": "",
        "status": "todo",
        "priority": "high",
        "priority_rank": 3,
        "due_at": at(600),
        "assignee_id": "ann",
        "created_by": "owen",
        "created_at": at(2),
        "updated_at": at(2),
        "completed_at": None,
    }

    await log.apply(
        tasks_domain.TaskEdited(
            task_id="t1",
            project_id="p1",
            title="Renamed",
            description="Now with details",
            priority=Priority.LOW,
            due_date=None,
            by="owen",
        ),
        tasks_domain.TaskUnassigned(
            task_id="t1", project_id="p1", previous_assignee_id="ann", by="owen"
        ),
    )
    task = await one(engine, tasks_table, task_id="t1")
    assert (task["title"], task["description"], task["priority"], task["priority_rank"]) == (
        "Renamed",
        "Now with details",
        "low",
        1,
    )
    assert (task["due_at"], task["assignee_id"], task["updated_at"]) == (None, None, RECORDED)

    await log.apply(
        tasks_domain.TaskAssigned(task_id="t1", project_id="p1", assignee_id="bob", by="owen")
    )
    assert (await one(engine, tasks_table, task_id="t1"))["assignee_id"] == "bob"


async def test_task_status_moves_set_and_clear_completed_at(log: Log, engine: AsyncEngine) -> None:
    async def state() -> tuple[str, datetime | None, datetime]:
        task = await one(engine, tasks_table, task_id="t1")
        return task["status"], task["completed_at"], task["updated_at"]

    await log.apply(
        project_created(),
        task_created("t1"),
        moved("t1", TODO, IN_PROGRESS, minute=3),
        moved("t1", IN_PROGRESS, REVIEW, minute=4),
    )
    assert await state() == ("review", None, at(4))
    await log.apply(moved("t1", REVIEW, DONE, minute=5))
    assert await state() == ("done", at(5), at(5))
    await log.apply(moved("t1", DONE, TODO, minute=6))  # reopen
    assert await state() == ("todo", None, at(6))
    await log.apply(moved("t1", TODO, CANCELLED, minute=7))
    assert await state() == ("cancelled", None, at(7))


# --- project stats ------------------------------------------------------------------------


async def counts(engine: AsyncEngine, project_id: str) -> dict[str, int]:
    stats = await one(engine, project_stats, project_id=project_id)
    return {k: v for k, v in stats.items() if k not in {"project_id", "updated_at"}}


def expected(total: int = 0, **by_status: int) -> dict[str, int]:
    return {"total": total, **{s.value: by_status.get(s.value, 0) for s in TaskStatus}}


async def test_project_stats_move_counts_between_statuses_including_reopen_and_cancel(
    log: Log, engine: AsyncEngine
) -> None:
    await log.apply(project_created("p1"), project_created("p2"))
    assert await counts(engine, "p1") == expected()

    await log.apply(
        *(task_created(t) for t in ("a", "b", "c", "d")),
        task_created("x", "p2"),
        moved("a", TODO, IN_PROGRESS),
        moved("a", IN_PROGRESS, REVIEW),
        moved("a", REVIEW, DONE, minute=20),
        moved("b", TODO, CANCELLED),
        moved("c", TODO, IN_PROGRESS),
    )
    assert await counts(engine, "p1") == expected(4, todo=1, in_progress=1, done=1, cancelled=1)
    assert await counts(engine, "p2") == expected(1, todo=1)
    assert (await one(engine, project_stats, project_id="p1"))["updated_at"] == at(10)

    await log.apply(moved("a", DONE, TODO), moved("b", CANCELLED, TODO))
    assert await counts(engine, "p1") == expected(4, todo=3, in_progress=1)


async def test_project_stats_agree_with_the_tasks_after_a_random_walk(
    log: Log, engine: AsyncEngine
) -> None:
    rng = random.Random(20251128)
    status = {f"t{i}": TODO for i in range(12)}
    events: list[Event] = [project_created(), *(task_created(t) for t in status)]
    for _ in range(150):
        task = rng.choice(sorted(status))
        to = rng.choice(sorted(TRANSITIONS[status[task]]))
        events.append(moved(task, status[task], to))
        status[task] = to
    await log.apply(*events)

    query = select(tasks_table.c.status, func.count()).group_by(tasks_table.c.status)
    async with engine.connect() as conn:
        by_status: dict[str, int] = dict((await conn.execute(query)).all())
    assert by_status == Counter(s.value for s in status.values())
    assert await counts(engine, "p1") == expected(len(status), **by_status)


# --- user activity ------------------------------------------------------------------------


async def test_user_activity_counts_logins_failures_and_task_work(
    log: Log, engine: AsyncEngine
) -> None:
    await log.apply(
        registered("alice"),
        registered("bob"),
        users.LoginSucceeded(user_id="alice", at=at(1), ip=None, user_agent=None),
        users.LoginFailed(user_id="alice", at=at(2), ip=None, user_agent=None),
        users.LoginSucceeded(user_id="alice", at=at(3), ip=None, user_agent=None),
        project_created(owner_id="alice"),
        task_created("t1", by="alice", assignee_id="bob", minute=4),
        task_created("t2", by="alice", minute=5),
        tasks_domain.TaskAssigned(
            task_id="t2", project_id="p1", assignee_id="bob", by=SYSTEM_ACTOR
        ),
        moved("t1", TODO, IN_PROGRESS, by="bob", minute=6),
        moved("t1", IN_PROGRESS, REVIEW, by="bob", minute=7),
        moved("t1", REVIEW, DONE, by="bob", minute=8),
        sessions_domain.SessionTouched(session_id="s1", user_id="alice", at=at(9)),
    )
    activity = {a["user_id"]: a for a in await rows(engine, user_activity)}
    assert activity == {
        "alice": {
            "user_id": "alice",
            "logins": 2,
            "failed_logins": 1,
            "tasks_created": 2,
            "tasks_completed": 0,
            "tasks_assigned": 0,
            "last_active_at": at(9),
        },
        "bob": {
            "user_id": "bob",
            "logins": 0,
            "failed_logins": 0,
            "tasks_created": 0,
            "tasks_completed": 1,
            "tasks_assigned": 2,
            "last_active_at": at(8),
        },
    }  # and no row for the system actor


# --- shadow tables ------------------------------------------------------------------------


def shadow_copy(table: Table, into: MetaData) -> Table:
    """``table`` renamed ``<name>__shadow`` in ``into``. ``to_metadata`` keeps the live
    primary-key and index names, which must be unique in a database (SQLite) or schema
    (PostgreSQL), so they are renamed too."""
    shadow = table.to_metadata(into, name=f"{table.name}__shadow")
    shadow.primary_key.name = quoted_name(f"pk_{shadow.name}", None)
    for index in shadow.indexes:
        index.name = quoted_name(
            f"ix_{shadow.name}_{'_'.join(c.name for c in index.columns)}", None
        )
    return shadow


@pytest.mark.parametrize("projector", ALL_PROJECTORS, ids=lambda p: p.name)
async def test_projector_writes_only_through_the_tables_it_is_given(
    projector: Projector, log: Log, engine: AsyncEngine
) -> None:
    shadow_metadata = MetaData(naming_convention=NAMING_CONVENTION)
    shadows = {table.name: shadow_copy(table, shadow_metadata) for table in projector.tables}
    async with engine.begin() as conn:
        await conn.run_sync(shadow_metadata.create_all)
    try:
        await log.apply(*full_history(), projectors=[projector], tables=shadows)
        for name, shadow in shadows.items():
            assert await rows(engine, shadow), f"{name}'s shadow got no rows"
        for table in projector.tables:
            assert await rows(engine, table) == [], f"live {table.name} was written"
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(shadow_metadata.drop_all)


async def test_the_full_history_fills_every_live_read_model_table(
    log: Log, engine: AsyncEngine
) -> None:
    await log.apply(*full_history())
    for table in metadata.tables.values():
        assert await rows(engine, table), table.name
