"""Views of read-model rows: built from a table's rows unvalidated only where that can
change nothing (``View.from_table_rows``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ConfigDict, field_validator
from sqlalchemy.types import TypeDecorator, TypeEngine

from projections.readmodels.projects import project_members, projects_table
from projections.readmodels.tasks import tasks_table
from projections.readmodels.user_activity import user_activity
from tests.conftest import PASSWORD
from tiu import models
from tiu.repositories import ACTIVITY_Q, MEMBERS_Q, PROJECTS_Q, SESSIONS_Q, TASKS_Q

MIRRORS = {
    models.Task: tasks_table,
    models.Project: projects_table,
    models.Member: project_members,
    models.UserActivity: user_activity,
}


def test_every_view_mirroring_a_table_has_its_columns_types_and_nullability():
    """What lets ``from_table_rows`` skip validation: a view whose fields are a table's
    columns takes each column's Python type, ``| None`` exactly where it is nullable."""
    tables = [projects_table, project_members, tasks_table, user_activity]
    mirroring = {
        view: table
        for view in models.View.__subclasses__()
        for table in tables
        if tuple(view.model_fields) == tuple(table.c.keys())
    }
    assert mirroring == MIRRORS
    for view, table in mirroring.items():
        for column in table.c:
            python_type = _python_type(column.type)
            expected = python_type | None if column.nullable else python_type
            assert view.model_fields[column.key].annotation == expected, (view, column.key)


def _python_type(type_: TypeEngine[Any]) -> type:
    # A TypeDecorator says ``object``; its values are its implementation's (UTCDateTime's
    # are datetimes, made aware on the way out).
    while isinstance(type_, TypeDecorator):
        type_ = type_.impl_instance
    return type_.python_type


def _as_validated(view_type, rows):
    return view_type.from_rows([dict(row) for row in rows])


def _same_views(built, validated):
    assert built == validated
    for one, other in zip(built, validated, strict=True):
        assert type(one) is type(other)
        assert one.model_fields_set == other.model_fields_set
        assert one.model_fields_set is not other.model_fields_set
        assert one.__pydantic_extra__ is None and other.__pydantic_extra__ is None
        assert one.__pydantic_private__ is None and other.__pydantic_private__ is None
        assert repr(one) == repr(other)
        for name, value in one:
            assert type(value) is type(getattr(other, name)), name


async def test_views_of_read_model_rows_are_the_views_validation_builds(service, clock):
    async with service.get_repositories() as repos:
        owner = await repos.users.create_user(
            email="owner@example.com", username="owner", password=PASSWORD
        )
        member = await repos.users.create_user(
            email="member@example.com", username="member", password=PASSWORD
        )
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Mirrored")
        await repos.projects.add_member(project.id, member.id, "editor")
        await repos.projects.archive_project(project.id)
        await repos.projects.restore_project(project.id)
        bare = await repos.tasks.create_task(project.id, "bare")
        full = await repos.tasks.create_task(
            project.id, "full", due_date=clock() + timedelta(days=2), assignee_id=member.id
        )
        await repos.tasks.update_task_status(full.id, "in_progress")
        await repos.tasks.update_task_status(full.id, "review")
        await repos.tasks.update_task_status(full.id, "done")
        await repos.tasks.create_task(project.id, "third", priority="urgent")
    async with service.read_connection() as conn:
        read = {
            models.Task: await TASKS_Q.list(conn, order_by="title"),
            models.Project: await PROJECTS_Q.list(conn),
            models.Member: await MEMBERS_Q.list(conn),
            models.UserActivity: await ACTIVITY_Q.list(conn),
        }
        sessions = await SESSIONS_Q.list(conn)
    assert {len(rows) > 0 for rows in read.values()} == {True}
    assert {task["title"] for task in read[models.Task]} == {"bare", "full", "third"}
    for view_type, rows in read.items():
        validated = _as_validated(view_type, rows)
        _same_views(view_type.from_table_rows(rows), validated)
    assert bare.id in {task.id for task in models.Task.from_table_rows(read[models.Task][:1])}
    # Rows that are not a mirrored table's (a session's token hash) are validated.
    assert models.Session.from_table_rows(sessions) == models.Session.from_rows(sessions)


class _ShoutedMember(models.Member):
    @field_validator("role")
    @classmethod
    def _shout(cls, role: str) -> str:
        return role.upper()


def test_views_with_validators_of_table_rows_are_validated():
    added = datetime(2026, 3, 2, tzinfo=UTC)
    rows = [{"project_id": "p1", "user_id": "u1", "role": "editor", "added_at": added}]
    assert [m.role for m in _ShoutedMember.from_table_rows(rows)] == ["EDITOR"]


class _StrippedMember(models.Member):
    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)


def test_views_whose_configuration_transforms_values_are_validated():
    added = datetime(2026, 3, 2, tzinfo=UTC)
    rows = [{"project_id": "p1", "user_id": "u1", "role": " editor ", "added_at": added}]
    assert [m.role for m in _StrippedMember.from_table_rows(rows)] == ["editor"]
