"""The ``tasks`` read model: one row per task.

``priority_rank`` (1 low .. 4 urgent) sorts by priority, which the names cannot.
``completed_at`` is set when a task reaches ``done`` and cleared when it leaves it.
A deleted task (``TaskDeleted``) and the tasks of a deleted project
(``ProjectDeleted``) lose their rows; the log keeps their history.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    Column,
    ColumnElement,
    Index,
    SmallInteger,
    String,
    Table,
    Text,
    bindparam,
    delete,
    insert,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import projects, tasks
from domain.base import Event
from domain.tasks import Priority, TaskStatus
from eventstore.prepared import execute
from eventstore.types import UTCDateTime
from projections.batching import BatchedProjector, KeyedRows, keys_param
from projections.projector import Envelope, Tables, metadata, statement
from projections.readmodels._common import ID_LENGTH, occurred_at

tasks_table = Table(
    "tasks",
    metadata,
    Column("task_id", String(ID_LENGTH), primary_key=True),
    Column("project_id", String(ID_LENGTH), nullable=False),
    Column("title", String(200), nullable=False),
    Column("description", Text, nullable=False),
    Column("status", String(20), nullable=False),
    Column("priority", String(20), nullable=False),
    Column("priority_rank", SmallInteger, nullable=False),
    Column("due_at", UTCDateTime),
    Column("assignee_id", String(ID_LENGTH)),
    Column("created_by", String(ID_LENGTH), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime),
    Index(None, "project_id", "status"),
    Index(None, "project_id", "created_at"),
    Index(None, "project_id", "priority_rank"),
    Index(None, "assignee_id", "status"),
    Index(None, "created_by"),
    Index(None, "due_at"),
    # Task lists and pages across projects, in projections.query's order: created_at,
    # then task_id in code-point order. Query compares strings COLLATE "C" on PostgreSQL,
    # which an index in the default collation cannot serve (postgresql_ops puts the
    # collation on the index column); SQLite ignores it, its BINARY order already is.
    Index(None, "created_at", "task_id", postgresql_ops={"task_id": 'COLLATE "C"'}),
)


class TasksProjector(BatchedProjector):
    name = "tasks"
    tables: ClassVar = (tasks_table,)
    only_writes = True  # apply: prepared writes, no reads
    handles = frozenset(
        cls.event_type
        for cls in (
            tasks.TaskCreated,
            tasks.TaskEdited,
            tasks.TaskAssigned,
            tasks.TaskUnassigned,
            tasks.TaskStatusChanged,
            tasks.TaskDeleted,
            projects.ProjectDeleted,
        )
    )

    async def apply(self, conn: AsyncConnection, envelope: Envelope, t: Tables) -> None:
        event = envelope.event
        table = t["tasks"]
        if isinstance(event, tasks.TaskDeleted):
            await execute(conn, statement(table, "delete", _delete_task), {"key": event.task_id})
            return
        if isinstance(event, projects.ProjectDeleted):
            query = statement(table, "delete-project", _delete_project_tasks)
            await execute(conn, query, {"key": event.project_id})
            return
        change = _change(event, occurred_at(envelope))
        if change is None:
            return
        created, task_id, values = change
        if created:
            await execute(conn, statement(t["tasks"], "insert", insert), values)
        else:
            await _update(conn, t, task_id, **values)

    async def fold(self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables) -> None:
        # One pass finds the tasks the batch touches and the projects it deletes (a
        # replay folds ~100k events: each pass and call per event counts).
        task_ids: list[str] = []
        deleted_projects: list[str] = []
        for envelope in envelopes:
            event = envelope.event
            if isinstance(event, projects.ProjectDeleted):
                deleted_projects.append(event.project_id)
            else:
                task_ids.append(event.task_id)  # type: ignore[attr-defined]
        # The tasks of a deleted project are found by project: load them, with their
        # project_id, to drop them with the ones this batch creates.
        rows = KeyedRows(t["tasks"], load=("project_id",) if deleted_projects else ())
        rows.want_all(task_ids)
        await rows.load(conn)
        await rows.load_by(conn, "by_project", _by_project, deleted_projects)
        insert_row, update_row = rows.insert, rows.update
        for envelope in envelopes:
            event = envelope.event
            change = _change(event, occurred_at(envelope))
            if change is not None:
                created, task_id, values = change
                if created:
                    insert_row(values)
                else:
                    update_row(task_id, **values)
            elif isinstance(event, tasks.TaskDeleted):
                rows.delete(event.task_id)
            elif isinstance(event, projects.ProjectDeleted):
                for row in list(rows.rows()):
                    if row["project_id"] == event.project_id:
                        rows.delete(rows.key_of(row))
        await rows.flush(conn)


def _change(event: Event, at: datetime) -> tuple[bool, str, dict[str, Any]] | None:
    """What ``event`` does to its task's row, for ``apply`` and ``fold`` alike:
    ``(True, task_id, the new row)`` or ``(False, task_id, the columns it sets)``,
    ``updated_at`` included; None for the deletions. The commonest event first: a
    status change is most of a task's history."""
    match event:
        case tasks.TaskStatusChanged():
            return (
                False,
                event.task_id,
                {
                    "status": str(event.to_status),
                    "completed_at": at if event.to_status is _DONE else None,
                    "updated_at": at,
                },
            )
        case tasks.TaskCreated():
            return (
                True,
                event.task_id,
                {
                    "task_id": event.task_id,
                    "project_id": event.project_id,
                    "title": event.title,
                    "description": event.description,
                    "status": str(TaskStatus.TODO),
                    "priority": str(event.priority),
                    "priority_rank": _RANK[event.priority],
                    "due_at": event.due_date,
                    "assignee_id": event.assignee_id,
                    "created_by": event.created_by,
                    "created_at": at,
                    "updated_at": at,
                    "completed_at": None,
                },
            )
        case tasks.TaskAssigned():
            return False, event.task_id, {"assignee_id": event.assignee_id, "updated_at": at}
        case tasks.TaskEdited():
            return (
                False,
                event.task_id,
                {
                    "title": event.title,
                    "description": event.description,
                    "priority": str(event.priority),
                    "priority_rank": _RANK[event.priority],
                    "due_at": event.due_date,
                    "updated_at": at,
                },
            )
        case tasks.TaskUnassigned():
            return False, event.task_id, {"assignee_id": None, "updated_at": at}
    return None


_RANK = {priority: priority.rank for priority in Priority}
_DONE = TaskStatus.DONE


async def _update(conn: AsyncConnection, t: Tables, task_id: str, **values: Any) -> None:
    query = statement(t["tasks"], "update", _update_statement)
    await execute(conn, query, {"key_task_id": task_id, **values})


def _by_project(table: Table) -> ColumnElement[bool]:
    return table.c.project_id.in_(keys_param())


def _delete_task(table: Table) -> Any:
    return delete(table).where(table.c.task_id == bindparam("key"))


def _delete_project_tasks(table: Table) -> Any:
    return delete(table).where(table.c.project_id == bindparam("key"))


def _update_statement(table: Table) -> Any:
    # Every column but the key may be set; the parameters given decide which are.
    return update(table).where(table.c.task_id == bindparam("key_task_id"))
