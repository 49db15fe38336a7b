"""Hostile input through the public API: a typed refusal or success, never a driver
error, never a partial write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import func, select

from domain.errors import DomainError
from eventstore.errors import InvalidAppend
from eventstore.schema import events
from projections.errors import InvalidQuery
from tests.conftest import PASSWORD

# These storage tests also run as the least-privilege role of sql/app_role.sql.
pytestmark = pytest.mark.least_privilege

TYPED = (DomainError, ValidationError, InvalidAppend, InvalidQuery)

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
