"""The ``project_stats`` read model: task counts by status, one row per project.

Only counts that follow from the log are stored. The completion rate is derived by
the reader as ``done / (total - cancelled)``; the overdue count depends on "now", so
the repository computes it at query time from ``tasks`` (``due_at < now`` and status
not done or cancelled).

No task -> (project, status) helper table is kept: every ``TaskStatusChanged``
carries its ``project_id`` and ``from_status``, so each event moves one count to
another on its own; a ``TaskDeleted`` carries the status it leaves. A deleted project
(``ProjectDeleted``) loses its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from sqlalchemy import Column, Integer, String, Table, bindparam, delete, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import projects, tasks
from domain.tasks import TaskStatus
from eventstore.prepared import execute
from eventstore.types import UTCDateTime
from projections.batching import BatchedProjector, KeyedRows, field
from projections.projector import Envelope, Tables, metadata, statement
from projections.readmodels._common import ID_LENGTH, occurred_at

project_stats = Table(
    "project_stats",
    metadata,
    Column("project_id", String(ID_LENGTH), primary_key=True),
    Column("total", Integer, nullable=False),
    # One count per domain.tasks.TaskStatus value, named after it.
    *(Column(status.value, Integer, nullable=False) for status in TaskStatus),
    Column("updated_at", UTCDateTime, nullable=False),
)


_COUNTS = ("total", *(status.value for status in TaskStatus))


class ProjectStatsProjector(BatchedProjector):
    name = "project_stats"
    tables: ClassVar = (project_stats,)
    only_writes = True  # apply: prepared writes, no reads
    handles = frozenset(
        cls.event_type
        for cls in (
            projects.ProjectCreated,
            projects.ProjectDeleted,
            tasks.TaskCreated,
            tasks.TaskStatusChanged,
            tasks.TaskDeleted,
        )
    )

    async def apply(self, conn: AsyncConnection, envelope: Envelope, t: Tables) -> None:
        table = t["project_stats"]
        at = occurred_at(envelope)
        event = envelope.event
        changes: tuple[tuple[str, int], ...]
        match event:
            case projects.ProjectCreated():
                zeros = {status.value: 0 for status in TaskStatus}
                await execute(
                    conn,
                    statement(table, "insert", insert),
                    {"project_id": event.project_id, "total": 0, "updated_at": at, **zeros},
                )
                return
            case projects.ProjectDeleted():
                query = statement(table, "delete", _delete_statement)
                await execute(conn, query, {"key_project_id": event.project_id})
                return
            case tasks.TaskCreated():
                changes = (("total", 1), (TaskStatus.TODO.value, 1))
            case tasks.TaskDeleted():
                changes = (("total", -1), (event.status.value, -1))
            case tasks.TaskStatusChanged():
                old, new = event.from_status.value, event.to_status.value
                # As a dict: when old == new, the increment wins (as in fold).
                changes = tuple({old: -1, new: 1}.items())
            case _:
                return
        query = statement(table, changes, lambda table: _count_statement(table, changes))
        await execute(conn, query, {"key_project_id": event.project_id, "updated_at": at})

    async def fold(self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables) -> None:
        rows = KeyedRows(t["project_stats"], load=_COUNTS)
        for envelope in envelopes:
            rows.want(field(envelope, "project_id"))
        await rows.load(conn)
        todo = TaskStatus.TODO.value
        for envelope in envelopes:
            at = occurred_at(envelope)
            event = envelope.event
            match event:
                case projects.ProjectCreated():
                    zeros = {status.value: 0 for status in TaskStatus}
                    rows.insert(
                        {"project_id": event.project_id, "total": 0, "updated_at": at, **zeros}
                    )
                case tasks.TaskCreated():
                    row = rows.get(event.project_id)
                    if row is not None:
                        rows.update(
                            event.project_id,
                            updated_at=at,
                            total=row["total"] + 1,
                            **{todo: row[todo] + 1},
                        )
                case projects.ProjectDeleted():
                    rows.delete(event.project_id)
                case tasks.TaskDeleted():
                    row = rows.get(event.project_id)
                    if row is not None:
                        status = event.status.value
                        rows.update(
                            event.project_id,
                            updated_at=at,
                            total=row["total"] - 1,
                            **{status: row[status] - 1},
                        )
                case tasks.TaskStatusChanged():
                    row = rows.get(event.project_id)
                    if row is not None:
                        old, new = event.from_status.value, event.to_status.value
                        # As a dict, like apply's: when old == new, the increment wins.
                        changes = {old: row[old] - 1, new: row[new] + 1}
                        rows.update(event.project_id, updated_at=at, **changes)
        await rows.flush(conn)


def _delete_statement(table: Table) -> Any:
    return delete(table).where(table.c.project_id == bindparam("key_project_id"))


def _count_statement(table: Table, changes: tuple[tuple[str, int], ...]) -> Any:
    """``UPDATE project_stats SET count = count + delta, ...`` for one project
    (``updated_at`` is set from the parameter of that name)."""
    values: dict[str, Any] = {name: table.c[name] + delta for name, delta in changes}
    return update(table).where(table.c.project_id == bindparam("key_project_id")).values(values)
