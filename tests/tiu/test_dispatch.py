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
    DomainError,
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
from domain.routing import PROJECTS, SESSIONS, TASKS, USERS
from eventstore import EventStore, WrongExpectedVersion
from eventstore.crypto import DEFAULT_TTL
from eventstore.schema import events, snapshots
from tests.conftest import PASSWORD
from tiu.dispatch import CommandUnit, Dispatcher, FoldedStates

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


async def test_a_command_decides_on_what_another_process_committed_after_it_kept_a_state(
    dispatcher, store
):
    """The kept (cached) project state is at version 1; another dispatcher (another
    process) archives the project: the next CreateTask reads the archive and is refused."""
    await register(dispatcher, "nia")
    await dispatcher.dispatch(projects.CreateProject(project_id="p9", name="Nyx"), ctx("nia"))
    await dispatcher.dispatch(
        tasks.CreateTask(task_id="t90", project_id="p9", title="Kept"), ctx("nia")
    )
    assert dispatcher.states.get(PROJECTS, "project-p9") is not None
    other = Dispatcher(store, snapshot_every=5, hasher=HASHER)
    await other.dispatch(projects.ArchiveProject(project_id="p9"), ctx("nia"))
    with pytest.raises(DomainError):
        await dispatcher.dispatch(
            tasks.CreateTask(task_id="t91", project_id="p9", title="Refused"), ctx("nia")
        )
    async with store.engine.connect() as conn:
        assert await store.read_stream(conn, "task-t91") == []
    version, _, _ = dispatcher.states.get(PROJECTS, "project-p9")  # type: ignore[misc]
    assert version == 2


async def test_a_kept_state_equals_a_full_fold_after_another_process_forgets_the_user(
    dispatcher, store
):
    """A state folded from a user's personal data is not carried past their erasure:
    the load that reads ``UserForgotten`` folds the stream again from the log."""
    await register(dispatcher, "uma")
    await dispatcher.dispatch(projects.CreateProject(project_id="p8", name="Uma's"), ctx("uma"))
    kept = dispatcher.states.get(USERS, "user-uma")
    assert kept is not None and kept[1].email == "uma@example.com"
    other = Dispatcher(store, snapshot_every=5, hasher=HASHER)
    await other.dispatch(users.ForgetUser(user_id="uma"), ctx(SYSTEM_ACTOR))
    async with store.engine.connect() as conn:
        (loaded, _) = await dispatcher.fold_many(conn, [(USERS, "user-uma")], cached=True)
        full = await Dispatcher(store, snapshot_every=0).fold(conn, USERS, "user-uma")
    assert loaded["user-uma"][:2] == full[:2]
    assert loaded["user-uma"][0].email != "uma@example.com"


async def test_a_stream_that_fails_its_version_check_is_folded_again_from_the_log(
    dispatcher, store
):
    """A kept state the log no longer agrees with (here: planted one version ahead) is
    dropped when the write's version check refuses it, and the retry decides on the log."""
    await register(dispatcher, "lea")
    await dispatcher.dispatch(projects.CreateProject(project_id="p7", name="Lea"), ctx("lea"))
    version, state, snap = dispatcher.states.get(PROJECTS, "project-p7")  # type: ignore[misc]
    dispatcher.states.put(PROJECTS, "project-p7", version + 1, state, snap)
    result = await dispatcher.dispatch(
        tasks.CreateTask(task_id="t70", project_id="p7", title="After"), ctx("lea")
    )
    assert result.version == 1
    assert dispatcher.states.get(PROJECTS, "project-p7")[0] == version  # type: ignore[index]


def test_kept_states_are_bounded_least_recently_used_first():
    from tiu.dispatch import FoldedStates

    kept = FoldedStates(maxsize=2)
    for n in range(3):
        kept.put(TASKS, f"task-{n}", 1, n, 0)
        kept.get(TASKS, "task-0")
    assert len(kept) == 2
    assert kept.get(TASKS, "task-0") == (1, 0, 0)
    assert kept.get(TASKS, "task-1") is None
    assert kept.get(USERS, "task-0") is None  # kept for another decider
    kept.put(SESSIONS, "session-1", 1, "state", 0)
    assert kept.get(SESSIONS, "session-1") is None  # its user's erasure is elsewhere


async def test_a_refusal_decided_on_a_kept_state_the_log_moved_past_is_decided_again(
    dispatcher, store
):
    """The kept project state predates the membership another process added: decided
    on it, the member's CreateTask is refused, but a refusal is recorded by the write,
    whose version check sends it back to be decided on the log: it is accepted."""
    await register(dispatcher, "ola")
    await register(dispatcher, "pia")
    await dispatcher.dispatch(
        projects.CreateProject(project_id="p6", name="Ola's", visibility="private"), ctx("ola")
    )
    with pytest.raises(PermissionDenied):
        await dispatcher.dispatch(
            tasks.CreateTask(task_id="t60", project_id="p6", title="Not yet"), ctx("pia")
        )
    kept_version = dispatcher.states.get(PROJECTS, "project-p6")[0]  # type: ignore[index]
    other = Dispatcher(store, snapshot_every=5, hasher=HASHER)
    await other.dispatch(
        projects.AddMember(project_id="p6", user_id="pia", role="editor"), ctx("ola")
    )
    assert dispatcher.states.get(PROJECTS, "project-p6")[0] == kept_version  # type: ignore[index]
    result = await dispatcher.dispatch(
        tasks.CreateTask(task_id="t61", project_id="p6", title="Now"), ctx("pia")
    )
    assert result.version == 1


async def test_a_load_while_a_user_is_forgotten_keeps_no_state_with_their_personal_data(
    dispatcher, store
):
    """A command of this process loads the user's stream while their erasure is being
    written (after its keys were destroyed in that transaction, before its COMMIT): what
    it reads still opens, and must not stay kept once the erasure committed."""
    await register(dispatcher, "vic")

    async def forget(unit: CommandUnit) -> None:
        await unit.handle(users.ForgetUser(user_id="vic"), ctx(SYSTEM_ACTOR))
        async with store.engine.connect() as conn:
            decision = await dispatcher.prepare(
                users.AssignRole(user_id="vic", role=Role.MEMBER), ctx(SYSTEM_ACTOR), conn=conn
            )
        assert decision.streams["user-vic"].state.email == "vic@example.com"

    await dispatcher.run(forget)
    kept = dispatcher.states.get(USERS, "user-vic")
    assert kept is None or kept[1].email is None


async def test_kept_states_expire_like_cached_keys_so_another_process_s_erasure_reaches_them(
    dispatcher, store
):
    """Another process forgets a user whose state this one keeps: the kept state (their
    email, username, password hash) lives no longer than a cached key would."""
    clock = [0.0]
    dispatcher.states = FoldedStates(clock=lambda: clock[0])
    await register(dispatcher, "wes")
    assert dispatcher.states.get(USERS, "user-wes")[1].email == "wes@example.com"  # type: ignore[index]
    other = Dispatcher(store, snapshot_every=5, hasher=HASHER)
    await other.dispatch(users.ForgetUser(user_id="wes"), ctx(SYSTEM_ACTOR))
    clock[0] += DEFAULT_TTL + 1
    dispatcher.states.put(TASKS, "task-1", 1, "state", 0)  # a put sweeps what expired
    assert len(dispatcher.states) == 1
    assert dispatcher.states.get(USERS, "user-wes") is None


async def test_a_grouped_command_whose_kept_states_moved_is_decided_again_without_a_retry(
    store,
):
    """Another process moved both streams a grouped CreateTask decides on from kept
    states (the project and the acting user): the first write's version check sends it
    back, and it is decided again on both read from the log (not one stream per
    attempt), which costs none of its retries: with none allowed, it still succeeds."""
    grouped = Dispatcher(store, snapshot_every=5, retries=0, group_commit=True, hasher=HASHER)
    await register(grouped, "quy")
    await grouped.dispatch(projects.CreateProject(project_id="p5", name="Quy"), ctx("quy"))
    assert grouped.states.get(USERS, "user-quy") is not None
    other = Dispatcher(store, snapshot_every=5, hasher=HASHER)
    await other.dispatch(projects.UpdateProject(project_id="p5", name="Moved"), ctx("quy"))
    await other.dispatch(users.AssignRole(user_id="quy", role=Role.ADMIN), ctx(SYSTEM_ACTOR))
    result = await grouped.dispatch(
        tasks.CreateTask(task_id="t50", project_id="p5", title="Once"), ctx("quy")
    )
    assert result.version == 1
    assert grouped.group is not None
    await grouped.group.aclose()


async def test_a_decision_on_a_stream_this_process_moved_since_is_decided_again_at_the_write(
    dispatcher,
):
    """A CreateTask prepared, then its actor logs in (a write to the user's stream, which
    the decision read): the write decides it again on the state that login committed,
    instead of sending it back to prepare (where the next login could move it again)."""
    await register(dispatcher, "rex")
    await dispatcher.dispatch(projects.CreateProject(project_id="p7", name="Rex"), ctx("rex"))
    decision = await dispatcher.prepare(
        tasks.CreateTask(task_id="t70", project_id="p7", title="Prepared"), ctx("rex")
    )
    seen = decision.streams["user-rex"].version
    await dispatcher.dispatch(
        users.AttemptLogin(user_id="rex", password=SecretStr(PASSWORD)), ctx()
    )
    dispatcher.retries = 0
    result = await dispatcher.write(decision)
    assert result.version == 1
    async with dispatcher.store.engine.connect() as conn:
        head = await dispatcher.store.stream_version(conn, "user-rex")
    assert head == seen + 1


async def test_a_user_s_commands_succeed_while_the_same_user_logs_in_concurrently(store):
    """Each login moves the user's stream, which every command of that user reads: the
    commands of a group decided meanwhile are decided again on what the groups before
    committed, and none runs out of retries."""
    busy = Dispatcher(store, snapshot_every=5, group_commit=True, hasher=HASHER)
    await register(busy, "sam")
    await busy.dispatch(projects.CreateProject(project_id="p8", name="Sam"), ctx("sam"))

    async def create(caller: int) -> None:
        for n in range(10):
            task = tasks.CreateTask(task_id=f"t{caller}-{n}", project_id="p8", title="T")
            await busy.dispatch(task, ctx("sam"))

    async def log_in() -> None:
        for _ in range(4):
            login = users.AttemptLogin(user_id="sam", password=SecretStr(PASSWORD))
            await busy.dispatch(login, ctx())

    await asyncio.gather(*(create(c) for c in range(8)), *(log_in() for _ in range(8)))
    assert (await log_types(store, "task")).count("TaskCreated") == 80
    if busy.group is not None:
        await busy.group.aclose()


async def test_a_refusal_decided_again_at_the_write_never_rests_on_a_stale_kept_state(store):
    """A password change is prepared, then this process changes the user's email (its
    state is kept) and another process changes it again. At the write the decision is
    decided again on the kept state, where the new password contains the email; that
    refusal (a weak password: no version check follows it) must not be raised on a
    state the log has moved past: the decision goes back to prepare."""
    grouped = Dispatcher(store, snapshot_every=5, group_commit=True, hasher=HASHER)
    await register(grouped, "zed")
    change = users.ChangePassword(
        user_id="zed",
        old_password=SecretStr(PASSWORD),
        new_password=SecretStr("alphaomega-river-lantern-77"),
    )
    decision = await grouped.prepare(change, ctx("zed"))
    assert decision.events
    await grouped.dispatch(
        users.ChangeEmail(user_id="zed", new_email="alphaomega@example.com"), ctx(SYSTEM_ACTOR)
    )
    other = Dispatcher(store, snapshot_every=5, hasher=HASHER)
    await other.dispatch(
        users.ChangeEmail(user_id="zed", new_email="zz@example.com"), ctx(SYSTEM_ACTOR)
    )
    with pytest.raises(WrongExpectedVersion):
        await grouped.write(decision)
    assert grouped.group is not None
    await grouped.group.aclose()


async def test_a_refusal_on_a_kept_state_another_process_moved_past_is_decided_on_the_log(store):
    """This process archived a project (its state is kept), another restored it. A task
    created in it is decided on the kept state and refused; the refusal appends nothing,
    yet it is recorded under its key, so it must meet the version check all the same:
    sent back to prepare, it is decided on the log and the task is created."""
    grouped = Dispatcher(store, snapshot_every=5, group_commit=True, hasher=HASHER)
    await register(grouped, "ann")
    await grouped.dispatch(projects.CreateProject(project_id="p9", name="Ann"), ctx("ann"))
    await grouped.dispatch(projects.ArchiveProject(project_id="p9"), ctx("ann"))
    other = Dispatcher(store, snapshot_every=5, hasher=HASHER)
    await other.dispatch(projects.RestoreProject(project_id="p9"), ctx("ann"))
    create = tasks.CreateTask(task_id="t9", project_id="p9", title="Go", command_id="c9")
    result = await grouped.dispatch(create, ctx("ann"))
    assert result.version == 1
    assert grouped.group is not None
    await grouped.group.aclose()


async def test_a_no_op_decided_on_a_kept_state_another_process_moved_past_is_decided_again(
    store,
):
    """This process titled a task "Old" (its state is kept), another retitled it "New".
    Retitling it "Old" decides no event on the kept state; that answer must meet the
    version check too, or the title stays "New" while the command reports success."""
    grouped = Dispatcher(store, snapshot_every=5, group_commit=True, hasher=HASHER)
    await register(grouped, "bea")
    await grouped.dispatch(projects.CreateProject(project_id="p10", name="Bea"), ctx("bea"))
    await grouped.dispatch(
        tasks.CreateTask(task_id="t10", project_id="p10", title="Old"), ctx("bea")
    )
    other = Dispatcher(store, snapshot_every=5, hasher=HASHER)
    await other.dispatch(tasks.EditTask(task_id="t10", project_id="p10", title="New"), ctx("bea"))
    result = await grouped.dispatch(
        tasks.EditTask(task_id="t10", project_id="p10", title="Old"), ctx("bea")
    )
    assert result.version == 3
    assert [type(e).__name__ for e in result.events] == ["TaskEdited"]
    assert grouped.group is not None
    await grouped.group.aclose()


async def test_a_refusal_raised_before_the_write_is_never_decided_on_a_stale_kept_state(store):
    """A weak password is refused before the write (no version check follows), and
    what is weak depends on the user's state (their email): another process changed
    the email this process keeps, so the refusal is decided again on the log, where
    the password is fine."""
    grouped = Dispatcher(store, snapshot_every=5, group_commit=True, hasher=HASHER)
    await register(grouped, "zed", email="alphaomega@example.com")
    assert grouped.states.get(USERS, "user-zed") is not None
    other = Dispatcher(store, snapshot_every=5, hasher=HASHER)
    await other.dispatch(
        users.ChangeEmail(user_id="zed", new_email="zz@example.com"), ctx(SYSTEM_ACTOR)
    )
    new_password = SecretStr("alphaomega-river-lantern-77")
    change = users.ChangePassword(
        user_id="zed", old_password=SecretStr(PASSWORD), new_password=new_password
    )
    result = await grouped.dispatch(change, ctx("zed"))
    assert result.version == 3
    assert grouped.group is not None
    await grouped.group.aclose()
