"""The write path through the real store, on both backends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr
from sqlalchemy import func, select

from domain import (
    AccountLocked,
    AlreadyExists,
    CommandContext,
    InvalidCredentials,
    PermissionDenied,
    Role,
    SecurityPolicy,
    WeakPassword,
    projects,
    tasks,
    users,
)
from domain.passwords import BcryptHasher
from domain.permissions import SYSTEM_ACTOR
from domain.routing import USERS
from eventstore import EventStore
from eventstore.schema import events, snapshots
from tests.conftest import PASSWORD
from tiu.dispatch import Dispatcher

# These storage tests also run as the least-privilege role of sql/app_role.sql.
pytestmark = pytest.mark.least_privilege

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
HASHER = BcryptHasher(rounds=4)


def ctx(actor: str | None = None, *, at: datetime = T0, **policy) -> CommandContext:
    return CommandContext(
        now=at,
        actor_id=actor,
        ip="198.51.100.4",
        user_agent="pytest",
        policy=SecurityPolicy(**policy),
    )


@pytest.fixture
def dispatcher(store: EventStore) -> Dispatcher:
    return Dispatcher(store, snapshot_every=5, retries=10, hasher=HASHER)


async def register(d: Dispatcher, user_id: str, email: str | None = None, **extra) -> None:
    await d.dispatch(
        users.RegisterUser(
            user_id=user_id,
            email=email or f"{user_id}@example.com",
            username=user_id,
            password=SecretStr(PASSWORD),
            **extra,
        ),
        ctx(SYSTEM_ACTOR),
    )


async def log_types(store: EventStore, category: str | None = None) -> list[str]:
    async with store.engine.connect() as conn:
        records = await store.read_all(conn, categories=[category] if category else None)
    return [r.event_type for r in records]


async def test_a_command_appends_its_events_and_returns_version_and_position(dispatcher, store):
    result = await dispatcher.dispatch(
        users.RegisterUser(
            user_id="alice",
            email="Alice@Example.com",
            username="alice",
            password=SecretStr(PASSWORD),
        ),
        ctx(),
    )
    assert result.stream_id == "user-alice"
    assert (result.version, result.position) == (1, 1)
    assert [e.event_type for e in result.events] == ["UserRegistered"]
    async with store.engine.connect() as conn:
        (record,) = await store.read_all(conn)
    assert record.command_id == result.command_id
    assert "password" not in str(record.data).replace("password_hash", "")


async def test_concurrent_registrations_with_one_email_have_exactly_one_winner(dispatcher, store):
    async def attempt(n: int) -> str:
        await register(dispatcher, f"user{n}", email="same@example.com")
        return f"user{n}"

    outcomes = await asyncio.gather(*(attempt(n) for n in range(8)), return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, str)]
    assert len(winners) == 1
    assert all(isinstance(o, AlreadyExists) for o in outcomes if o not in winners)
    assert await log_types(store, "user") == ["UserRegistered"]


async def test_wrong_password_is_refused_but_the_failure_is_recorded(dispatcher, store):
    await register(dispatcher, "bob")
    with pytest.raises(InvalidCredentials):
        await dispatcher.dispatch(
            users.AttemptLogin(user_id="bob", password=SecretStr("wrong-password-123")), ctx()
        )
    assert await log_types(store, "user") == ["UserRegistered", "LoginFailed"]
    assert await log_types(store, "security") == ["LoginRejected"]


async def test_lockout_count_is_exact_under_concurrent_wrong_passwords(dispatcher, store):
    await register(dispatcher, "carol")
    attempts = [
        dispatcher.dispatch(
            users.AttemptLogin(user_id="carol", password=SecretStr(f"wrong-password-{n:03}")),
            ctx(lockout_threshold=5),
        )
        for n in range(20)
    ]
    outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    assert all(isinstance(o, InvalidCredentials | AccountLocked) for o in outcomes), outcomes
    user_events = await log_types(store, "user")
    assert user_events.count("LoginFailed") == 5
    assert user_events.count("AccountLocked") == 1
    assert sum(isinstance(o, AccountLocked) for o in outcomes) == 15
    with pytest.raises(AccountLocked):  # even the right password
        await dispatcher.dispatch(
            users.AttemptLogin(user_id="carol", password=SecretStr(PASSWORD)), ctx()
        )


async def test_a_repeated_command_id_returns_the_first_result_and_appends_nothing(
    dispatcher, store
):
    command = users.RegisterUser(
        user_id="dan", email="dan@example.com", username="dan", password=SecretStr(PASSWORD)
    )
    first = await dispatcher.dispatch(command, ctx())
    again = await dispatcher.dispatch(command, ctx())
    assert again.duplicate
    assert (again.stream_id, again.version, again.position) == (
        first.stream_id,
        first.version,
        first.position,
    )
    assert again.events == first.events
    assert await log_types(store) == ["UserRegistered"]


async def test_a_repeated_refused_login_is_not_counted_twice(dispatcher, store):
    await register(dispatcher, "erin")
    command = users.AttemptLogin(user_id="erin", password=SecretStr("not-the-password-1"))
    with pytest.raises(InvalidCredentials):
        await dispatcher.dispatch(command, ctx())
    with pytest.raises(InvalidCredentials) as resent:
        await dispatcher.dispatch(command, ctx())
    assert resent.value.replayed == command.command_id
    assert (await log_types(store, "user")).count("LoginFailed") == 1
    assert (await log_types(store, "security")).count("LoginRejected") == 1


async def test_a_unit_of_work_that_fails_half_way_leaves_no_events(dispatcher, store):
    await register(dispatcher, "frank")

    async def work(unit):
        await unit.handle(
            projects.CreateProject(project_id="p1", name="Apollo", visibility="private"),
            ctx("frank"),
        )
        await unit.handle(
            users.RegisterUser(
                user_id="frank",
                email="f2@example.com",
                username="frank2",
                password=SecretStr(PASSWORD),
            ),
            ctx(),
        )

    with pytest.raises(AlreadyExists):
        await dispatcher.run(work)
    assert await log_types(store) == ["UserRegistered"]


async def test_commands_in_one_unit_see_each_others_events(dispatcher, store):
    async def work(unit):
        await unit.handle(
            users.RegisterUser(
                user_id="gina",
                email="gina@example.com",
                username="gina",
                password=SecretStr(PASSWORD),
            ),
            ctx(),
        )
        await unit.handle(
            projects.CreateProject(project_id="p2", name="Gemini", visibility="public"),
            ctx("gina"),
        )
        await unit.handle(
            tasks.CreateTask(task_id="t1", project_id="p2", title="Launch"), ctx("gina")
        )

    await dispatcher.run(work)
    assert await log_types(store) == ["UserRegistered", "ProjectCreated", "TaskCreated"]


async def test_a_refused_command_appends_no_domain_event_but_a_security_event(dispatcher, store):
    await register(dispatcher, "hank")
    with pytest.raises(PermissionDenied):
        await dispatcher.dispatch(users.AssignRole(user_id="hank", role=Role.ADMIN), ctx("hank"))
    assert await log_types(store, "user") == ["UserRegistered"]
    assert await log_types(store, "security") == ["CommandRejected"]
    async with store.engine.connect() as conn:
        (rejected,) = await store.read_all(conn, categories=["security"])
    assert rejected.stream_id == "security-hank"
    assert rejected.actor_id == "hank"


async def test_a_task_is_not_created_in_a_project_archived_concurrently(dispatcher, store):
    await register(dispatcher, "ivy")
    await dispatcher.dispatch(
        projects.CreateProject(project_id="p3", name="Hermes", visibility="private"), ctx("ivy")
    )
    outcomes = await asyncio.gather(
        *(
            dispatcher.dispatch(
                tasks.CreateTask(task_id=f"t{n}", project_id="p3", title=f"Task {n}"), ctx("ivy")
            )
            for n in range(6)
        ),
        dispatcher.dispatch(projects.ArchiveProject(project_id="p3"), ctx("ivy")),
        return_exceptions=True,
    )
    created_after_archive = 0
    async with store.engine.connect() as conn:
        log = await store.read_all(conn)
    archived_at = next(r.position for r in log if r.event_type == "ProjectArchived")
    created_after_archive = sum(
        1 for r in log if r.event_type == "TaskCreated" and r.position > archived_at
    )
    assert created_after_archive == 0, outcomes


async def test_snapshots_are_taken_and_give_the_same_state_as_a_full_fold(dispatcher, store):
    await register(dispatcher, "jack")
    for n in range(12):
        with pytest.raises(InvalidCredentials):
            await dispatcher.dispatch(
                users.AttemptLogin(user_id="jack", password=SecretStr(f"bad-password-{n:03}")),
                ctx(at=T0 + timedelta(hours=n), lockout_threshold=50),
            )
    async with store.engine.connect() as conn:
        snap_version = await conn.scalar(select(snapshots.c.version))
        assert snap_version == 10
        with_snapshot = await dispatcher.fold(conn, USERS, "user-jack")
        full = await Dispatcher(store, snapshot_every=0).fold(conn, USERS, "user-jack")
        count = await conn.scalar(select(func.count()).select_from(events))
    assert with_snapshot[:2] == full[:2]
    assert with_snapshot[2] == 10
    assert count == 13 + 12  # user stream + one security event per refusal


async def test_a_snapshot_of_another_decider_version_is_ignored(dispatcher, store):
    await register(dispatcher, "kim")
    async with store.engine.begin() as conn:
        await conn.execute(
            snapshots.insert().values(
                stream_id="user-kim",
                decider="users",
                decider_version=USERS.version + 1,
                version=1,
                state={"bogus": True},
                taken_at=T0,
            )
        )
    async with store.engine.connect() as conn:
        state, version, snap = await dispatcher.fold(conn, USERS, "user-kim")
    assert (version, snap) == (1, 0)
    assert state.registered


async def test_events_stored_in_an_old_schema_version_are_upcast_when_loaded(dispatcher, store):
    from eventstore import NewEvent

    old_shape = {
        "user_id": "olga",
        "email": "olga@example.com",
        "username": "olga",
        "name": "Olga K.",
        "password_hash": HASHER.hash(PASSWORD),
        "roles": ["member"],
        "at": T0.isoformat(),
    }
    await store.append("user-olga", "user", [NewEvent("UserRegistered", old_shape, 1)])
    async with store.engine.connect() as conn:
        state, version, _ = await dispatcher.fold(conn, USERS, "user-olga")
    assert (version, state.display_name, state.registered) == (1, "Olga K.", True)
    result = await dispatcher.dispatch(
        users.AttemptLogin(user_id="olga", password=SecretStr(PASSWORD)), ctx()
    )
    assert [e.event_type for e in result.events] == ["LoginSucceeded"]


async def test_two_commands_of_one_unit_on_one_stream_each_get_their_own_last_position(
    dispatcher, store
):
    await register(dispatcher, "olga")
    await dispatcher.dispatch(
        projects.CreateProject(project_id="p9", name="Mir", visibility="private"), ctx("olga")
    )

    async def work(unit):
        first = await unit.handle(
            projects.UpdateProject(project_id="p9", name="Mir 2"), ctx("olga")
        )
        # Another stream between them, so the stream's two appends are not adjacent.
        await unit.handle(
            tasks.CreateTask(task_id="t9", project_id="p9", title="Dock"), ctx("olga")
        )
        second = await unit.handle(
            projects.UpdateProject(project_id="p9", name="Mir 3"), ctx("olga")
        )
        return first.command_id, second.command_id

    (first_id, second_id), unit = await dispatcher.run(work)
    by_id = {r.command_id: r for r in unit.results}
    async with store.engine.connect() as conn:
        records = await store.read_stream(conn, "project-p9")
    names = {r.position: r.data["name"] for r in records if r.event_type == "ProjectUpdated"}
    assert names[by_id[first_id].position] == "Mir 2"
    assert names[by_id[second_id].position] == "Mir 3"
    # A resend answers with the same position.
    again = await dispatcher.dispatch(
        projects.UpdateProject(command_id=first_id, project_id="p9", name="Mir 2"), ctx("olga")
    )
    assert again.duplicate and again.position == by_id[first_id].position


async def test_write_lock_hold_times_are_recorded_per_committed_transaction(
    dispatcher: Dispatcher,
):
    await register(dispatcher, "timed")
    await register(dispatcher, "timed2")
    samples = list(dispatcher.lock_times.samples)
    assert len(samples) == 2
    assert all(seconds > 0 and commands == 1 for seconds, commands in samples)
    with pytest.raises(WeakPassword):  # refused before writing: no write transaction
        await dispatcher.dispatch(
            users.RegisterUser(
                user_id="weak", email="weak@example.com", username="weak", password="short"
            ),
            ctx(SYSTEM_ACTOR),
        )
    assert len(dispatcher.lock_times.samples) == 2
