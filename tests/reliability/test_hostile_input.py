"""Hostile input through the public API: a typed refusal or success, never a driver
error, never a partial write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from domain.errors import (
    AlreadyExists,
    DomainError,
    InvalidCommand,
    InvalidCredentials,
    NotFound,
)
from eventstore.errors import InvalidAppend
from eventstore.schema import events
from projections.errors import InvalidQuery
from tests.conftest import PASSWORD

# These storage tests also run as the least-privilege role of sql/app_role.sql.
pytestmark = pytest.mark.least_privilege

TYPED = (DomainError, InvalidAppend, InvalidQuery)

hostile_text = st.one_of(
    st.text(max_size=50),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=30),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "a\x00b",
            "\u202e\u200b",
            "x" * 100_000,
            "Robert'); DROP TABLE events;--",
            "%_\\",
            "\U0010ffff",
            "\ufffd",
            "\r\n\t",
            "😀" * 500,
        ]
    ),
)
hostile_value = st.one_of(
    hostile_text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.datetimes(),
    st.datetimes(timezones=st.just(UTC), min_value=datetime(9000, 1, 1)),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def _count(service) -> int:
    async with service.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(events)) or 0)


async def _attempt(service, action) -> tuple[bool, BaseException | None]:
    before = await _count(service)
    try:
        await action()
    except TYPED as error:
        assert await _count(service) == before, "a refused command wrote something"
        return False, error
    return True, None


@pytest.fixture
async def owner(service):
    async with service.get_repositories() as repos:
        user = await repos.get_user_repository().create_user(
            email="owner@example.com", username="owner", password=PASSWORD
        )
    async with service.get_repositories(actor_id=user.id) as repos:
        project = await repos.get_project_repository().create_project("Target", visibility="public")
    return user, project


@given(email=hostile_value, username=hostile_value, password=hostile_value, name=hostile_value)
@SETTINGS
async def test_registration_with_hostile_fields_is_typed(service, email, username, password, name):
    async def register() -> None:
        async with service.get_repositories() as repos:
            await repos.get_user_repository().create_user(
                email=email, username=username, password=password, display_name=name
            )

    await _attempt(service, register)


@given(title=hostile_value, description=hostile_value, priority=hostile_value, due=hostile_value)
@SETTINGS
async def test_task_creation_with_hostile_fields_is_typed(
    service, owner, title, description, priority, due
):
    user, project = owner

    async def create() -> None:
        async with service.get_repositories(actor_id=user.id) as repos:
            await repos.get_task_repository().create_task(
                project.id, title, description, priority=priority, due_date=due
            )

    await _attempt(service, create)


@given(
    field=st.one_of(st.sampled_from(["title", "status", "due_at", "priority_rank"]), hostile_text),
    op=st.one_of(
        st.sampled_from(["eq", "ne", "lt", "in", "like", "ilike", "between", "isnull"]),
        hostile_text,
    ),
    value=hostile_value,
)
@SETTINGS
async def test_hostile_filters_are_refused_or_answered_never_an_sql_error(
    service, owner, field, op, value
):
    user, _ = owner

    async def query() -> None:
        async with service.get_repositories(actor_id=user.id) as repos:
            await repos.get_task_repository().list_tasks({f"{field}__{op}": value})

    await _attempt(service, query)


@given(
    action=hostile_text,
    resource=hostile_text,
    details=st.dictionaries(hostile_text, hostile_value, max_size=4),
)
@SETTINGS
async def test_audit_actions_with_hostile_details_are_typed(
    service, owner, action, resource, details
):
    user, _ = owner

    async def log() -> None:
        async with service.get_repositories(actor_id=user.id) as repos:
            await repos.get_audit_repository().log_action(action, resource, None, details)

    await _attempt(service, log)


async def test_a_naive_due_date_is_refused_not_guessed(service, owner):
    user, project = owner
    ok, error = await _attempt(
        service,
        lambda: _create(service, user, project, due=datetime(2030, 1, 1)),  # naive
    )
    assert not ok
    assert "timezone" in str(error).lower() or "aware" in str(error).lower()


async def _create(service, user, project, **fields: Any):
    async with service.get_repositories(actor_id=user.id) as repos:
        return await repos.get_task_repository().create_task(
            project.id, "Title", due_date=fields.get("due", datetime.now(UTC) + timedelta(days=1))
        )


@pytest.mark.parametrize(
    ("field", "call"),
    [
        ("to", lambda tasks, projects, p, t, u: tasks.update_task_status(t.id, "bogus")),
        ("priority", lambda tasks, projects, p, t, u: tasks.create_task(p.id, "x", priority="x")),
        (
            "due_date",
            lambda tasks, projects, p, t, u: tasks.create_task(
                p.id, "x", due_date=datetime(2030, 1, 1)
            ),
        ),
        (
            "visibility",
            lambda tasks, projects, p, t, u: projects.create_project("x", visibility="x"),
        ),
        ("role", lambda tasks, projects, p, t, u: projects.add_member(p.id, u.id, "owner")),
        ("title", lambda tasks, projects, p, t, u: tasks.create_task(p.id, None)),
        (
            "x",
            lambda tasks, projects, p, t, u: tasks.create_tasks(
                [{"project_id": p.id, "title": "t", "x": 1}]
            ),
        ),
    ],
)
async def test_a_value_the_command_refuses_is_an_invalid_command_naming_its_field(
    service, owner, field, call
):
    user, project = owner
    async with service.get_repositories(actor_id=user.id) as repos:
        task = await repos.get_task_repository().create_task(project.id, "Existing")
    before = await _count(service)
    async with service.get_repositories(actor_id=user.id) as repos:
        with pytest.raises(InvalidCommand) as refused:
            await call(
                repos.get_task_repository(), repos.get_project_repository(), project, task, user
            )
    assert await _count(service) == before
    assert refused.value.field == field


@pytest.mark.parametrize("bad", ["a\x00b", "a\ud800b"])
async def test_reads_by_text_no_database_can_hold_answer_not_found_on_both_backends(
    service, owner, bad
):
    user, _ = owner
    async with service.get_repositories(actor_id=user.id) as repos:
        assert await repos.get_user_repository().get_by_email(bad) is None
        assert await repos.get_user_repository().get_by_username(bad) is None
        assert await repos.get_task_repository().get_task(bad) is None
        assert await repos.get_project_repository().get_project(bad) is None
    async with service.engine.connect() as conn:
        assert await service.store.read_stream(conn, f"task-{bad}") == []
        assert await service.store.stream_version(conn, f"task-{bad}") == 0
        assert await service.store.read_all(conn, types=[bad]) == []
        assert await service.store.read_all(conn, categories=[bad]) == []
        users_only = await service.store.read_all(conn, categories=["user", bad])
    assert [e.stream_id for e in users_only] == [f"user-{user.id}"]


async def test_a_lone_surrogate_in_a_login_email_is_invalid_credentials(service, owner):
    before = await _count(service)
    async with service.get_repositories(ip="203.0.113.9") as repos:
        with pytest.raises(InvalidCredentials):
            await repos.get_session_repository().create_session("ow\ud800ner@example.com", "x")
    # The unknown-email refusal is audited, as for any unknown email.
    assert await _count(service) >= before


@pytest.mark.parametrize(
    "details", [{"k": "\ud800"}, {"\udfff": 1}, {"k": ["a", "\x00"]}, {"k": {"n": "\ud800"}}]
)
async def test_text_that_cannot_be_stored_in_an_audit_detail_is_refused(service, owner, details):
    user, _ = owner
    before = await _count(service)
    async with service.get_repositories(actor_id=user.id) as repos:
        with pytest.raises(InvalidCommand) as refused:
            await repos.get_audit_repository().log_action("export", "report", None, details)
    assert refused.value.field == "details"
    assert await _count(service) == before


async def test_not_found_repeats_at_most_80_characters_of_the_input(service, owner):
    user, _ = owner
    async with service.get_repositories(actor_id=user.id) as repos:
        with pytest.raises(NotFound) as refused:
            await repos.get_task_repository().update_task_status("x" * 5_000_000, "done")
    assert len(str(refused.value)) < 120
    assert refused.value.id == "x" * 5_000_000  # the field keeps the value


async def test_a_taken_email_says_so_without_naming_it(service, owner):
    async with service.get_repositories() as repos:
        with pytest.raises(AlreadyExists) as refused:
            await repos.get_user_repository().create_user(
                email="OWNER@example.com", username="other", password=PASSWORD
            )
    assert str(refused.value) == "this email is taken"
    assert "(taken)" not in str(refused.value)
