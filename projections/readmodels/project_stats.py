"""The ``project_stats`` read model: task counts by status, one row per project.

Only counts that follow from the log are stored. The completion rate is derived by
the reader as ``done / (total - cancelled)``; the overdue count depends on "now", so
the repository computes it at query time from ``tasks`` (``due_at < now`` and status
not done or cancelled).

No task -> (project, status) helper table is kept: every ``TaskStatusChanged``
carries its ``project_id`` and ``from_status``, so each event moves one count to
another on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from sqlalchemy import Column, Integer, String, Table, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import projects, tasks
from domain.tasks import TaskStatus
from eventstore.types import UTCDateTime
from projections.batching import BatchedProjector, KeyedRows, field
from projections.projector import Envelope, Tables, metadata
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
    handles = frozenset(
        cls.event_type
        for cls in (projects.ProjectCreated, tasks.TaskCreated, tasks.TaskStatusChanged)
    )

    async def apply(self, conn: AsyncConnection, envelope: Envelope, t: Tables) -> None:
        table = t["project_stats"]
        at = occurred_at(envelope)
        event = envelope.event
        changes: dict[str, Any]
        match event:
            case projects.ProjectCreated():
                zeros = {status.value: 0 for status in TaskStatus}
                await conn.execute(
                    insert(table).values(
                        project_id=event.project_id, total=0, updated_at=at, **zeros
                    )
                )
                return
            case tasks.TaskCreated():
                todo = TaskStatus.TODO.value
                changes = {"total": table.c.total + 1, todo: table.c[todo] + 1}
            case tasks.TaskStatusChanged():
                old, new = event.from_status.value, event.to_status.value
                changes = {old: table.c[old] - 1, new: table.c[new] + 1}
            case _:
                return
        await conn.execute(
            update(table)
            .where(table.c.project_id == event.project_id)
            .values(updated_at=at, **changes)
        )

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
                case tasks.TaskStatusChanged():
                    row = rows.get(event.project_id)
                    if row is not None:
                        old, new = event.from_status.value, event.to_status.value
                        # As a dict, like apply's: when old == new, the increment wins.
                        changes = {old: row[old] - 1, new: row[new] + 1}
                        rows.update(event.project_id, updated_at=at, **changes)
        await rows.flush(conn)
