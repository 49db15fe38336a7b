"""Idempotency through the repositories users hold, on both backends: a write sent
again with its ``command_id`` returns the first outcome and appends nothing, refusals
included."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from domain import users
from domain.permissions import SYSTEM_ACTOR
from eventstore.schema import events
from tests.conftest import PASSWORD
from tiu import (
    AccountLocked,
    AlreadyExists,
    BulkOperationError,
    CommandIdReused,
    InvalidCommand,
    InvalidCredentials,
    NotFound,
    PermissionDenied,
)
from tiu.dispatch import CommandResult

pytestmark = pytest.mark.least_privilege

_names = itertools.count()


async def log_size(service) -> int:
    async with service.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(events)) or 0)


async def security_events(service) -> int:
    async with service.engine.connect() as conn:
        found = await conn.scalar(
            select(func.count()).select_from(events).where(events.c.stream_category == "security")
        )
    return int(found or 0)


async def make_user(service, name: str | None = None, **extra):
    name = name or f"user{next(_names)}"
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        return await repos.users.create_user(
            email=f"{name}@example.com", username=name, password=PASSWORD, **extra
        )


async def outcome(call: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
    """What a call answered: its value, or its error's class, message and fields."""
    try:
        value = await call()
    except Exception as error:
        fields = {k: v for k, v in vars(error).items() if k not in {"replayed", "__notes__"}}
        return type(error).__name__, (str(error), fields)
    if isinstance(value, CommandResult):  # the same result, marked as a resend's
        value = dataclasses.replace(value, duplicate=False)
    return "ok", value


async def test_every_write_method_resent_with_its_key_returns_the_first_outcome(service):
    owner = await make_user(service)
    other = await make_user(service)
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Apollo", command_id="k-project")
        task = await repos.tasks.create_task(project.id, "Land", command_id="k-task")
        session = await repos.sessions.create_session(f"{owner.username}@example.com", PASSWORD)
    pid, tid = project.id, task.id
    calls: list[tuple[str, Callable[[Any], Awaitable[Any]]]] = [
        ("k-project", lambda r: r.projects.create_project("Apollo", command_id="k-project")),
        ("k-task", lambda r: r.tasks.create_task(pid, "Land", command_id="k-task")),
        ("k1", lambda r: r.projects.update_project(pid, name="Apollo 11", command_id="k1")),
        ("k2", lambda r: r.projects.change_visibility(pid, "public", command_id="k2")),
        ("k3", lambda r: r.projects.add_member(pid, other.id, "viewer", command_id="k3")),
        ("k4", lambda r: r.projects.change_member_role(pid, other.id, "editor", command_id="k4")),
        ("k5", lambda r: r.tasks.edit_task(tid, title="Land softly", command_id="k5")),
        ("k6", lambda r: r.tasks.assign_task(tid, other.id, command_id="k6")),
        ("k7", lambda r: r.tasks.unassign_task(tid, command_id="k7")),
        ("k8", lambda r: r.tasks.update_task_status(tid, "in_progress", command_id="k8")),
        ("k9", lambda r: r.tasks.bulk_update_task_status([tid], "review", command_id="k9")),
        ("k10", lambda r: r.tasks.bulk_assign([tid], other.id, command_id="k10")),
        (
            "k11",
            lambda r: r.tasks.create_tasks(
                [{"project_id": pid, "title": "Orbit"}, {"project_id": pid, "title": "Return"}],
                command_id="k11",
            ),
        ),
        ("k12", lambda r: r.audit.log_action("export", "project", pid, command_id="k12")),
        ("k13", lambda r: r.sessions.touch(session.session.id, command_id="k13")),
        ("k14", lambda r: r.projects.remove_member(pid, other.id, command_id="k14")),
        ("k15", lambda r: r.projects.archive_project(pid, command_id="k15")),
        ("k16", lambda r: r.projects.restore_project(pid, command_id="k16")),
        ("k17", lambda r: r.tasks.delete_task(tid, command_id="k17")),
        ("k18", lambda r: r.sessions.revoke(session.session.id, command_id="k18")),
        (
            "k19",
            lambda r: r.users.change_password(owner.id, PASSWORD, PASSWORD + "!", command_id="k19"),
        ),
        ("k20", lambda r: r.sessions.revoke_all(owner.id, command_id="k20")),
        ("k21", lambda r: r.projects.delete_project(pid, command_id="k21")),
    ]
    for key, call in calls:
        async with service.get_repositories(actor_id=owner.id) as repos:
            first = await outcome(lambda call=call: call(repos))
            assert first[0] == "ok", (key, first)
            before = await log_size(service)
            again = await outcome(lambda call=call: call(repos))
        assert await log_size(service) == before, f"{key}: the resend appended"
        if key not in {"k17", "k21"}:  # a deleted task or project reads as None now
            assert again == first, key


async def test_user_methods_resent_with_their_key_append_nothing(service):
    admin = await make_user(service, roles=["admin"])
    target = await make_user(service)
    async with service.get_repositories(actor_id=admin.id) as repos:
        users = repos.users
        calls = [
            lambda: users.create_user(
                email="zed@example.com", username="zed", password=PASSWORD, command_id="u0"
            ),
            lambda: users.assign_role(target.id, "admin", command_id="u1"),
            lambda: users.revoke_role(target.id, "admin", command_id="u2"),
            lambda: users.deactivate(target.id, command_id="u3"),
            lambda: users.reactivate(target.id, command_id="u4"),
            lambda: users.change_email(target.id, "new@example.com", command_id="u5"),
            lambda: users.unlock(target.id, command_id="u6"),
            lambda: users.forget_user(target.id, command_id="u7"),
        ]
        for call in calls:
            first = await outcome(call)
            before = await log_size(service)
            assert await outcome(call) == first
            assert await log_size(service) == before


async def test_a_resent_permission_denied_appends_no_second_audit_event(service):
    owner = await make_user(service)
    stranger = await make_user(service)
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Private", visibility="private")
    async with service.get_repositories(actor_id=stranger.id) as repos:
        with pytest.raises(PermissionDenied):
            await repos.projects.archive_project(project.id, command_id="deny-1")
        audited = await security_events(service)
        for _ in range(3):
            with pytest.raises(PermissionDenied) as again:
                await repos.projects.archive_project(project.id, command_id="deny-1")
            assert again.value.replayed == "deny-1"
            assert again.value.actor_id == stranger.id
    assert await security_events(service) == audited == 1


async def test_a_resent_locked_login_appends_nothing_and_keeps_its_until(service):
    user = await make_user(service)
    email = f"{user.username}@example.com"
    async with service.get_repositories(ip="203.0.113.5") as repos:
        for n in range(service.policy.lockout_threshold):
            with pytest.raises(InvalidCredentials):
                await repos.users.authenticate(email, "wrong-password-000", command_id=f"w{n}")
        with pytest.raises(AccountLocked) as locked:
            await repos.sessions.create_session(email, PASSWORD, command_id="locked")
        before = await log_size(service)
        with pytest.raises(AccountLocked) as again:
            await repos.sessions.create_session(email, PASSWORD, command_id="locked")
        # Resending a wrong password counts no second failure either.
        with pytest.raises(InvalidCredentials):
            await repos.users.authenticate(email, "wrong-password-000", command_id="w0")
    assert again.value.until == locked.value.until
    assert await log_size(service) == before


async def test_a_resent_refused_create_task_stays_refused_after_the_state_changed(service):
    owner = await make_user(service)
    helper = await make_user(service)
    later = f"later-{next(_names)}"
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Gemini")
        with pytest.raises(NotFound):
            await repos.tasks.create_task(later, "Dock", command_id="ct-2")
    async with service.get_repositories(actor_id=helper.id) as repos:
        with pytest.raises(PermissionDenied):
            await repos.tasks.create_task(project.id, "Dock", command_id="ct-1")
    async with service.get_repositories(actor_id=owner.id) as repos:
        await repos.projects.add_member(project.id, helper.id, "editor")
        await repos.projects.create_project("Later", project_id=later)
    before = await log_size(service)
    async with service.get_repositories(actor_id=helper.id) as repos:
        with pytest.raises(PermissionDenied):
            await repos.tasks.create_task(project.id, "Dock", command_id="ct-1")
        # A fresh key is decided against the state as it is now.
        assert await repos.tasks.create_task(project.id, "Dock", command_id="ct-3")
    async with service.get_repositories(actor_id=owner.id) as repos:
        with pytest.raises(NotFound):
            await repos.tasks.create_task(later, "Dock", command_id="ct-2")
    assert await log_size(service) == before + 1


async def test_a_resent_session_login_does_not_start_a_second_session(service):
    user = await make_user(service)
    async with service.get_repositories() as repos:
        started = await repos.sessions.create_session(
            f"{user.username}@example.com", PASSWORD, command_id="login-1"
        )
        before = await log_size(service)
        with pytest.raises(AlreadyExists) as again:
            await repos.sessions.create_session(
                f"{user.username}@example.com", PASSWORD, command_id="login-1"
            )
        assert again.value.id == started.session.id
        assert len(await repos.sessions.get_user_sessions(user.id)) == 1
    assert await log_size(service) == before


async def test_a_refused_bulk_item_is_remembered_though_the_batch_rolled_back(service):
    owner = await make_user(service)
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Skylab")
        done = await repos.tasks.create_task(project.id, "Launch")
        todo = await repos.tasks.create_task(project.id, "Dock")
        await repos.tasks.update_task_status(done.id, "in_progress")
        with pytest.raises(BulkOperationError) as first:
            # todo -> review is not a transition: item 1 refuses, nothing applies.
            await repos.tasks.bulk_update_task_status(
                [done.id, todo.id], "review", command_id="bulk-1"
            )
        assert first.value.index == 1
        await repos.tasks.update_task_status(todo.id, "in_progress")
        with pytest.raises(BulkOperationError) as again:
            await repos.tasks.bulk_update_task_status(
                [done.id, todo.id], "review", command_id="bulk-1"
            )
        assert (again.value.index, type(again.value.error)) == (1, type(first.value.error))
        assert (await repos.tasks.get_task(done.id)).status == "in_progress"
        # Under a new key the same call is decided afresh, and now succeeds.
        count = await repos.tasks.bulk_update_task_status(
            [done.id, todo.id], "review", command_id="bulk-2"
        )
        assert count == 2


# -- the property -------------------------------------------------------------------

_ACTIONS = st.sampled_from(
    [
        "create_task",
        "status_in_progress",
        "status_done",
        "assign",
        "delete_task",
        "archive",
        "restore",
        "delete_project",
        "as_stranger",
    ]
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(st.tuples(_ACTIONS, st.integers(0, 20)), min_size=1, max_size=8))
async def test_resending_any_command_with_its_key_returns_the_same_outcome_and_appends_nothing(
    service, steps
):
    owner = await make_user(service)
    stranger = await make_user(service)
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Prop")
        first_task = await repos.tasks.create_task(project.id, "Seed")
    pid = project.id
    task_ids = [first_task.id]
    sent: list[tuple[Callable[[], Awaitable[Any]], tuple[str, Any]]] = []
    for n, (action, pick) in enumerate(steps):
        key = f"prop-{next(_names)}-{n}"
        tid = task_ids[pick % len(task_ids)]
        actor = stranger.id if action == "as_stranger" else owner.id

        async def call(action=action, key=key, tid=tid, actor=actor):
            async with service.get_repositories(actor_id=actor) as repos:
                match action:
                    case "create_task":
                        task = await repos.tasks.create_task(pid, "T", command_id=key)
                        return task.id if task else None
                    case "status_in_progress" | "status_done":
                        status = action.removeprefix("status_")
                        task = await repos.tasks.update_task_status(tid, status, command_id=key)
                        return task.status if task else None
                    case "assign":
                        return bool(await repos.tasks.assign_task(tid, owner.id, command_id=key))
                    case "delete_task":
                        return await repos.tasks.delete_task(tid, command_id=key)
                    case "archive":
                        return await repos.projects.archive_project(pid, command_id=key)
                    case "restore":
                        return await repos.projects.restore_project(pid, command_id=key)
                    case "delete_project":
                        return await repos.projects.delete_project(pid, command_id=key)
                    case _:
                        return await repos.tasks.update_task_status(tid, "done", command_id=key)

        first = await outcome(call)
        if action == "create_task" and first[0] == "ok" and first[1]:
            task_ids.append(first[1])
        sent.append((call, first, action))
    for call, first, action in sent:
        before = await log_size(service)
        again = await outcome(call)
        assert await log_size(service) == before
        # A success answers with success again (the views it returns are read now: a
        # task deleted since reads as None, and a create_* whose task is gone, which
        # returns a view or nothing, says NotFound); a refusal with the same refusal.
        gone = action == "create_task" and again[0] == "NotFound"
        assert again[0] == first[0] or (first[0] == "ok" and gone)
        if first[0] != "ok":
            assert again == first


@pytest.mark.parametrize("key", ["", "k" * 65, "a\x00b", "\ud800", "tab\there", 7])
async def test_a_malformed_key_is_an_invalid_command_and_writes_nothing(service, key):
    owner = await make_user(service)
    before = await log_size(service)
    async with service.get_repositories(actor_id=owner.id) as repos:
        with pytest.raises(InvalidCommand) as refused:
            await repos.projects.create_project("Keyed", command_id=key)
        with pytest.raises(InvalidCommand):
            await repos.tasks.bulk_delete_tasks(["t"], command_id=key)
    assert refused.value.field == "command_id"
    assert await log_size(service) == before


async def test_a_resent_login_answers_for_the_first_logins_account_whatever_the_email_says_now(
    service,
):
    user = await make_user(service)
    async with service.get_repositories() as repos:
        first = await repos.users.authenticate(
            f"{user.username}@example.com", PASSWORD, command_id="login-key"
        )
        before = await log_size(service)
        # The same key with an email that resolves to no one: the first outcome, no trace.
        again = await repos.users.authenticate("not-an-email", PASSWORD, command_id="login-key")
    assert again.id == first.id == user.id
    assert await log_size(service) == before


async def test_one_key_sent_twice_at_once_is_written_once(service):
    owner = await make_user(service)
    stranger = await make_user(service)
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Race")

    async def intrude(key: str):
        async with service.get_repositories(actor_id=stranger.id) as repos:
            return await repos.tasks.create_task(project.id, "No", command_id=key)

    async def wrong_password(key: str):
        async with service.get_repositories() as repos:
            return await repos.users.authenticate(
                f"{owner.username}@example.com", "not-the-password-1", command_id=key
            )

    # What one of each leaves in the log, sent alone.
    before = await log_size(service)
    with pytest.raises(PermissionDenied):
        await intrude("alone")
    one_refusal = await log_size(service) - before
    before = await log_size(service)
    with pytest.raises(InvalidCredentials):
        await wrong_password("alone-login")
    one_failure = await log_size(service) - before
    assert one_refusal > 0 and one_failure > 0

    # The same keys sent twice at once: each written once, both callers refused alike.
    before = await log_size(service)
    outcomes = await asyncio.gather(
        intrude("race-refused"),
        intrude("race-refused"),
        wrong_password("race-login"),
        wrong_password("race-login"),
        return_exceptions=True,
    )
    assert [type(o) for o in outcomes] == [
        PermissionDenied,
        PermissionDenied,
        InvalidCredentials,
        InvalidCredentials,
    ]
    assert await log_size(service) - before == one_refusal + one_failure


async def test_a_command_object_sent_again_after_its_new_email_was_taken_answers_as_the_first_time(
    service,
):
    """The same ChangeEmail object sent twice (its command id minted for it, as a host's
    retry after a lost answer sends it): the resend answers with the first result, though
    the email it claimed went to another user since. Its idempotency record must stop it
    before its claim does: PostgreSQL holds the record back while a claim is sent at once."""
    user = await make_user(service)
    system = service.context(SYSTEM_ACTOR)
    change = users.ChangeEmail(user_id=user.id, new_email="moved@example.com")
    first = await service.dispatch(change, system)
    await service.dispatch(
        users.ChangeEmail(user_id=user.id, new_email="again@example.com"), system
    )
    await make_user(service, "moved")  # moved@example.com
    before = await log_size(service)
    again = await service.dispatch(change, system)
    assert again.duplicate
    assert (again.version, again.position, again.events) == (
        first.version,
        first.position,
        first.events,
    )
    assert await log_size(service) == before


async def test_one_create_user_key_sent_twice_at_once_registers_one_user(service):
    """Each call mints its own user id, so the two sends' claims of the email name two
    streams: the second must be stopped by its idempotency record (answered with the
    first user), not by the email its first send took (AlreadyExists)."""

    async def create():
        async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
            return await repos.users.create_user(
                email="twice@example.com", username="twice", password=PASSWORD, command_id="k"
            )

    before = await log_size(service)
    first, again = await asyncio.gather(create(), create())
    assert first.id == again.id
    assert await log_size(service) == before + 1


async def test_a_key_sent_again_with_another_command_is_refused_and_runs_nothing(service):
    # A client that reuses its Idempotency-Key for another request must not be told
    # that request ran: answering with the first outcome would report a project
    # deleted, a status changed or a user forgotten when nothing was.
    owner = await make_user(service)
    bob = await make_user(service)
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Vostok")
        task = await repos.tasks.create_task(project.id, "Orbit", command_id="reused-1")
        before = await log_size(service)
        with pytest.raises(CommandIdReused) as refused:
            await repos.projects.delete_project(project.id, command_id="reused-1")
        assert (refused.value.first_type, refused.value.command_type) == (
            "CreateTask",
            "DeleteProject",
        )
        assert refused.value.field == "command_id"
        with pytest.raises(CommandIdReused):
            await repos.tasks.update_task_status(task.id, "done", command_id="reused-1")
        assert await repos.projects.get_project(project.id) is not None
        assert (await repos.tasks.get_task(task.id)).status == "todo"
        # The same command sent again still answers as the first time.
        again = await repos.tasks.create_task(project.id, "Orbit", command_id="reused-1")
        assert again.id == task.id
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        with pytest.raises(CommandIdReused):
            await repos.users.forget_user(bob.id, command_id="reused-1")
        assert (await repos.users.get_by_id(bob.id)).email == bob.email
    assert await log_size(service) == before


async def test_a_refused_command_s_key_sent_with_another_command_is_refused_as_reused(service):
    owner = await make_user(service)
    async with service.get_repositories(actor_id=owner.id) as repos:
        with pytest.raises(NotFound):
            await repos.tasks.create_task("no-such-project", "Dock", command_id="reused-2")
        before = await log_size(service)
        with pytest.raises(CommandIdReused) as refused:
            await repos.projects.create_project("Soyuz", command_id="reused-2")
        assert refused.value.first_type == "CreateTask"
    assert await log_size(service) == before


async def test_a_key_reused_inside_a_unit_of_work_is_refused_and_rolls_the_unit_back(service):
    owner = await make_user(service)
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Salyut", command_id="reused-3")
    before = await log_size(service)

    async def work(repos) -> None:
        await repos.tasks.create_task(project.id, "A")
        await repos.tasks.create_task(project.id, "B", command_id="reused-3")

    with pytest.raises(CommandIdReused):
        await service.execute_in_transaction(work, actor_id=owner.id)
    assert await log_size(service) == before
