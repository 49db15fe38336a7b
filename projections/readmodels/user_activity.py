"""The ``user_activity`` read model: per-user activity counters.

The counters only grow; they count events, not current state (a task completed,
reopened and completed again counts twice; current assignments are in ``tasks``).
``tasks_completed`` counts moves to ``done`` made by the user; ``tasks_assigned``
counts assignments to the user. ``last_active_at`` is the time of the user's last
login, session touch or task change. Actors that are not registered users (the
``system`` actor) have no row, and their events change nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import Column, Index, Integer, String, Table, bindparam, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import sessions, tasks, users
from domain.tasks import TaskStatus
from eventstore.prepared import execute
from eventstore.types import UTCDateTime
from projections.batching import BatchedProjector, KeyedRows
from projections.projector import Envelope, Tables, metadata, statement
from projections.readmodels._common import ID_LENGTH, occurred_at

user_activity = Table(
    "user_activity",
    metadata,
    Column("user_id", String(ID_LENGTH), primary_key=True),
    Column("logins", Integer, nullable=False),
    Column("failed_logins", Integer, nullable=False),
    Column("tasks_created", Integer, nullable=False),
    Column("tasks_completed", Integer, nullable=False),
    Column("tasks_assigned", Integer, nullable=False),
    Column("last_active_at", UTCDateTime),
    Index(None, "last_active_at"),
)

_COUNTERS = ("logins", "failed_logins", "tasks_created", "tasks_completed", "tasks_assigned")


class UserActivityProjector(BatchedProjector):
    name = "user_activity"
    tables: ClassVar = (user_activity,)
    only_writes = True  # apply: prepared writes, no reads
    handles = frozenset(
        cls.event_type
        for cls in (
            users.UserRegistered,
            users.LoginSucceeded,
            users.LoginFailed,
            sessions.SessionTouched,
            tasks.TaskCreated,
            tasks.TaskEdited,
            tasks.TaskAssigned,
            tasks.TaskUnassigned,
            tasks.TaskStatusChanged,
        )
    )

    async def apply(self, conn: AsyncConnection, envelope: Envelope, t: Tables) -> None:
        at = occurred_at(envelope)
        event = envelope.event
        match event:
            case users.UserRegistered():
                await execute(
                    conn,
                    statement(t["user_activity"], "insert", insert),
                    {"user_id": event.user_id, "last_active_at": at, **dict.fromkeys(_COUNTERS, 0)},
                )
            case users.LoginSucceeded():
                await _record(conn, t, event.user_id, at, "logins")
            case users.LoginFailed():
                await _record(conn, t, event.user_id, None, "failed_logins")
            case sessions.SessionTouched():
                await _record(conn, t, event.user_id, at)
            case tasks.TaskCreated():
                await _record(conn, t, event.created_by, at, "tasks_created")
                if event.assignee_id is not None:
                    await _record(conn, t, event.assignee_id, None, "tasks_assigned")
            case tasks.TaskAssigned():
                await _record(conn, t, event.by, at)
                await _record(conn, t, event.assignee_id, None, "tasks_assigned")
            case tasks.TaskStatusChanged():
                done = event.to_status is TaskStatus.DONE
                await _record(conn, t, event.by, at, *(["tasks_completed"] if done else []))
            case tasks.TaskEdited() | tasks.TaskUnassigned():
                await _record(conn, t, event.by, at)

    async def fold(self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables) -> None:
        rows = KeyedRows(t["user_activity"], load=_COUNTERS)
        # (user_id, active_at, counters), or (user_id, at, None) for a registration.
        steps: list[tuple[str, datetime | None, tuple[str, ...] | None]] = []
        for envelope in envelopes:
            at = occurred_at(envelope)
            event = envelope.event
            match event:
                case users.UserRegistered():
                    steps.append((event.user_id, at, None))
                case users.LoginSucceeded():
                    steps.append((event.user_id, at, ("logins",)))
                case users.LoginFailed():
                    steps.append((event.user_id, None, ("failed_logins",)))
                case sessions.SessionTouched():
                    steps.append((event.user_id, at, ()))
                case tasks.TaskCreated():
                    steps.append((event.created_by, at, ("tasks_created",)))
                    if event.assignee_id is not None:
                        steps.append((event.assignee_id, None, ("tasks_assigned",)))
                case tasks.TaskAssigned():
                    steps.append((event.by, at, ()))
                    steps.append((event.assignee_id, None, ("tasks_assigned",)))
                case tasks.TaskStatusChanged():
                    done = event.to_status is TaskStatus.DONE
                    steps.append((event.by, at, ("tasks_completed",) if done else ()))
                case tasks.TaskEdited() | tasks.TaskUnassigned():
                    steps.append((event.by, at, ()))
        for user_id, _, _ in steps:
            rows.want(user_id)
        await rows.load(conn)
        for user_id, active_at, counters in steps:
            if counters is None:
                rows.insert(
                    {"user_id": user_id, "last_active_at": active_at, **dict.fromkeys(_COUNTERS, 0)}
                )
                continue
            row = rows.get(user_id)
            if row is None:
                continue
            values: dict[str, Any] = {name: row[name] + 1 for name in counters}
            if active_at is not None:
                values["last_active_at"] = active_at
            rows.update(user_id, **values)
        await rows.flush(conn)


async def _record(
    conn: AsyncConnection, t: Tables, user_id: str, active_at: datetime | None, *counters: str
) -> None:
    """Add one to each of ``counters`` and, when ``active_at`` is given, mark activity."""
    query = statement(t["user_activity"], counters, lambda table: _count_statement(table, counters))
    params: dict[str, Any] = {"key_user_id": user_id}
    if active_at is not None:
        params["last_active_at"] = active_at
    await execute(conn, query, params)


def _count_statement(table: Table, counters: tuple[str, ...]) -> Any:
    """Add one to each counter; ``last_active_at`` is set when given as a parameter."""
    values: dict[str, Any] = {name: table.c[name] + 1 for name in counters}
    return update(table).where(table.c.user_id == bindparam("key_user_id")).values(**values)
