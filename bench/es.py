"""The eventsourcing side: an application, aggregates, events mirroring tiu's, a view.

eventsourcing is synchronous (psycopg 3 on PostgreSQL, sqlite3 on SQLite); the bench
runs it in threads where it needs concurrency. Its SQLite connections get the same
``synchronous`` pragma as tiu's and the raw driver's (eventsourcing leaves SQLite's
default, FULL, in place otherwise): see :func:`set_sqlite_synchronous`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from functools import singledispatchmethod
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, DomainEvent, event
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresTrackingRecorder
from eventsourcing.projection import Projection
from eventsourcing.sqlite import SQLiteConnectionPool, SQLiteTrackingRecorder
from eventsourcing.utils import get_topic
from psycopg.sql import SQL, Identifier

_SYNCHRONOUS = {"value": "NORMAL"}
_original_create_connection = SQLiteConnectionPool._create_connection


def _create_connection(self: SQLiteConnectionPool) -> Any:
    conn = _original_create_connection(self)
    conn._sqlite_conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS['value']}")
    return conn


def set_sqlite_synchronous(value: str) -> None:
    """Give eventsourcing's SQLite connections the bench's ``synchronous`` setting."""
    _SYNCHRONOUS["value"] = value
    SQLiteConnectionPool._create_connection = _create_connection  # type: ignore[method-assign]


# -- an aggregate for the application-level cases ----------------------------------------


class EsTask(Aggregate):
    """The same facts as tiu's task stream (created, edited, status changes)."""

    @event("Created")
    def __init__(
        self, project_id: str, title: str, description: str, priority: str, created_by: str
    ) -> None:
        self.project_id = project_id
        self.title = title
        self.description = description
        self.priority = priority
        self.created_by = created_by
        self.status = "todo"

    @event("Edited")
    def edit(self, title: str, description: str, priority: str) -> None:
        self.title = title
        self.description = description
        self.priority = priority

    @event("StatusChanged")
    def change_status(self, from_status: str, to_status: str, by: str) -> None:
        self.status = to_status


class BenchApp(Application[uuid.UUID]):
    """The eventsourcing application; snapshotting off (as tiu's fold in the bench)."""

    is_snapshotting_enabled = False


# -- events mirroring tiu's, for the scenario log --------------------------------------------


class UserRegistered(DomainEvent):
    user_id: str
    email: str
    username: str
    display_name: str | None
    password_hash: str
    roles: list[str]
    at: datetime


class LoginSucceeded(DomainEvent):
    user_id: str
    at: datetime
    ip: str | None
    user_agent: str | None


class ProjectCreated(DomainEvent):
    project_id: str
    owner_id: str
    name: str
    description: str
    visibility: str
    at: datetime


class MemberAdded(DomainEvent):
    project_id: str
    user_id: str
    role: str
    by: str


class TaskCreated(DomainEvent):
    task_id: str
    project_id: str
    title: str
    description: str
    priority: str
    due_date: datetime | None
    assignee_id: str | None
    created_by: str
    at: datetime


class TaskStatusChanged(DomainEvent):
    task_id: str
    project_id: str
    from_status: str
    to_status: str
    by: str
    at: datetime


class TaskAssigned(DomainEvent):
    task_id: str
    project_id: str
    assignee_id: str
    by: str


class SessionStarted(DomainEvent):
    session_id: str
    user_id: str
    token_hash: str
    started_at: datetime
    expires_at: datetime
    ip: str | None
    user_agent: str | None


ES_EVENTS: dict[str, type[DomainEvent]] = {
    cls.__name__: cls
    for cls in (
        UserRegistered,
        LoginSucceeded,
        ProjectCreated,
        MemberAdded,
        TaskCreated,
        TaskStatusChanged,
        TaskAssigned,
        SessionStarted,
    )
}
_DATETIME_FIELDS = {"at", "due_date", "started_at", "expires_at"}
TASK_TOPICS = tuple(get_topic(c) for c in (TaskCreated, TaskStatusChanged, TaskAssigned))


def to_es_event(
    event_type: str, data: dict[str, Any], stream_uuid: uuid.UUID, version: int, ts: datetime
) -> DomainEvent:
    """The eventsourcing twin of one tiu event (same fields, datetimes as datetimes)."""
    cls = ES_EVENTS[event_type]
    fields = {
        k: (datetime.fromisoformat(v) if k in _DATETIME_FIELDS and v is not None else v)
        for k, v in data.items()
    }
    return cls(originator_id=stream_uuid, originator_version=version, timestamp=ts, **fields)


# -- the one-row-per-task view for the projection runner -----------------------------------


class PgTaskView(PostgresTrackingRecorder):
    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        schema = Identifier(self.datastore.schema)
        self.sql_create_statements.append(
            SQL(
                "CREATE TABLE IF NOT EXISTS {0}.es_tasks (task_id text PRIMARY KEY, "
                "project_id text NOT NULL, title text NOT NULL, status text NOT NULL, "
                "assignee_id text, updated_at timestamptz NOT NULL)"
            ).format(schema)
        )
        self._insert = SQL("INSERT INTO {0}.es_tasks VALUES (%s, %s, %s, 'todo', %s, %s)").format(
            schema
        )
        self._status = SQL(
            "UPDATE {0}.es_tasks SET status = %s, updated_at = %s WHERE task_id = %s"
        ).format(schema)
        self._assign = SQL("UPDATE {0}.es_tasks SET assignee_id = %s WHERE task_id = %s").format(
            schema
        )

    def _write(self, statement: Any, params: tuple[Any, ...], tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(statement, params, prepare=True)
            self._insert_tracking(curs, tracking)


class SQLiteTaskView(SQLiteTrackingRecorder):
    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.create_table_statements.append(
            "CREATE TABLE IF NOT EXISTS es_tasks (task_id TEXT PRIMARY KEY, "
            "project_id TEXT NOT NULL, title TEXT NOT NULL, status TEXT NOT NULL, "
            "assignee_id TEXT, updated_at TEXT NOT NULL)"
        )
        self._insert = "INSERT INTO es_tasks VALUES (?, ?, ?, 'todo', ?, ?)"
        self._status = "UPDATE es_tasks SET status = ?, updated_at = ? WHERE task_id = ?"
        self._assign = "UPDATE es_tasks SET assignee_id = ? WHERE task_id = ?"

    def _write(self, statement: Any, params: tuple[Any, ...], tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(statement, params)
            self._insert_tracking(curs, tracking)


class TaskProjection(Projection[Any]):
    """One transaction per event: the view's row and the tracking record together."""

    name = "taskprojection"
    topics = TASK_TOPICS

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.insert_tracking(tracking)

    @process_event.register
    def _(self, e: TaskCreated, tracking: Tracking) -> None:
        at = e.at if isinstance(self.view, PgTaskView) else e.at.isoformat()
        self.view._write(self.view._insert, (e.task_id, e.project_id, e.title, None, at), tracking)

    @process_event.register
    def _(self, e: TaskStatusChanged, tracking: Tracking) -> None:
        at = e.at if isinstance(self.view, PgTaskView) else e.at.isoformat()
        self.view._write(self.view._status, (e.to_status, at, e.task_id), tracking)

    @process_event.register
    def _(self, e: TaskAssigned, tracking: Tracking) -> None:
        self.view._write(self.view._assign, (e.assignee_id, e.task_id), tracking)
