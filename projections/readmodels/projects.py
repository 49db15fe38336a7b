"""The ``projects`` read model: one row per project, and its members.

``project_members`` holds members only, as the decider does: the owner is
``projects.owner_id`` and never a member row. A deleted project (``ProjectDeleted``)
loses its row and its members' rows; the log keeps its history.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    Index,
    String,
    Table,
    Text,
    delete,
    insert,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import projects
from eventstore.types import UTCDateTime
from projections.batching import BatchedProjector, KeyedRows, field, keys_param
from projections.projector import Envelope, Tables, metadata
from projections.readmodels._common import ID_LENGTH, occurred_at

projects_table = Table(
    "projects",
    metadata,
    Column("project_id", String(ID_LENGTH), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False),
    Column("visibility", String(20), nullable=False),
    Column("owner_id", String(ID_LENGTH), nullable=False),
    Column("archived", Boolean, nullable=False),
    Column("archived_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index(None, "owner_id"),
    Index(None, "visibility"),
    Index(None, "name"),
    Index(None, "created_at"),
    # Project searches and pages by name, in projections.query's code-point order
    # (COLLATE "C" on PostgreSQL; see the same kind of index on tasks).
    Index(
        None,
        "name",
        "project_id",
        postgresql_ops={"name": 'COLLATE "C"', "project_id": 'COLLATE "C"'},
    ),
)

project_members = Table(
    "project_members",
    metadata,
    Column("project_id", String(ID_LENGTH), primary_key=True),
    Column("user_id", String(ID_LENGTH), primary_key=True),
    Column("role", String(20), nullable=False),
    Column("added_at", UTCDateTime, nullable=False),
    Index(None, "user_id"),
)


class ProjectsProjector(BatchedProjector):
    name = "projects"
    tables: ClassVar = (projects_table, project_members)
    handles = frozenset(
        cls.event_type
        for cls in (
            projects.ProjectCreated,
            projects.ProjectUpdated,
            projects.ProjectVisibilityChanged,
            projects.MemberAdded,
            projects.MemberRemoved,
            projects.MemberRoleChanged,
            projects.ProjectArchived,
            projects.ProjectRestored,
            projects.ProjectDeleted,
        )
    )

    async def apply(self, conn: AsyncConnection, envelope: Envelope, t: Tables) -> None:
        at = occurred_at(envelope)
        event = envelope.event
        match event:
            case projects.ProjectCreated():
                await conn.execute(
                    insert(t["projects"]).values(
                        project_id=event.project_id,
                        name=event.name,
                        description=event.description,
                        visibility=str(event.visibility),
                        owner_id=event.owner_id,
                        archived=False,
                        archived_at=None,
                        created_at=at,
                        updated_at=at,
                    )
                )
            case projects.ProjectUpdated():
                await _update(
                    conn, t, event.project_id, at, name=event.name, description=event.description
                )
            case projects.ProjectVisibilityChanged():
                await _update(conn, t, event.project_id, at, visibility=str(event.visibility))
            case projects.ProjectArchived():
                await _update(conn, t, event.project_id, at, archived=True, archived_at=at)
            case projects.ProjectRestored():
                await _update(conn, t, event.project_id, at, archived=False, archived_at=None)
            case projects.ProjectDeleted():
                members = t["project_members"]
                await conn.execute(delete(members).where(members.c.project_id == event.project_id))
                table = t["projects"]
                await conn.execute(delete(table).where(table.c.project_id == event.project_id))
            case projects.MemberAdded():
                await conn.execute(
                    insert(t["project_members"]).values(
                        project_id=event.project_id,
                        user_id=event.user_id,
                        role=str(event.role),
                        added_at=at,
                    )
                )
                await _update(conn, t, event.project_id, at)
            case projects.MemberRoleChanged():
                members = t["project_members"]
                await conn.execute(
                    update(members)
                    .where(
                        members.c.project_id == event.project_id,
                        members.c.user_id == event.user_id,
                    )
                    .values(role=str(event.role))
                )
                await _update(conn, t, event.project_id, at)
            case projects.MemberRemoved():
                members = t["project_members"]
                await conn.execute(
                    delete(members).where(
                        members.c.project_id == event.project_id,
                        members.c.user_id == event.user_id,
                    )
                )
                await _update(conn, t, event.project_id, at)

    async def fold(self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables) -> None:
        rows = KeyedRows(t["projects"])
        members = KeyedRows(t["project_members"])
        deleted = []
        for envelope in envelopes:
            project_id = field(envelope, "project_id")
            rows.want(project_id)
            if isinstance(envelope.event, _MEMBER_EVENTS):
                members.want((project_id, field(envelope, "user_id")))
            elif isinstance(envelope.event, projects.ProjectDeleted):
                deleted.append(project_id)
        await rows.load(conn)
        await members.load(conn)
        # A deleted project's members are found by project.
        await members.load_by(conn, "by_project", _by_project, deleted)
        for envelope in envelopes:
            at = occurred_at(envelope)
            event = envelope.event
            match event:
                case projects.ProjectCreated():
                    rows.insert(
                        {
                            "project_id": event.project_id,
                            "name": event.name,
                            "description": event.description,
                            "visibility": str(event.visibility),
                            "owner_id": event.owner_id,
                            "archived": False,
                            "archived_at": None,
                            "created_at": at,
                            "updated_at": at,
                        }
                    )
                case projects.ProjectUpdated():
                    rows.update(
                        event.project_id,
                        updated_at=at,
                        name=event.name,
                        description=event.description,
                    )
                case projects.ProjectVisibilityChanged():
                    rows.update(event.project_id, updated_at=at, visibility=str(event.visibility))
                case projects.ProjectArchived():
                    rows.update(event.project_id, updated_at=at, archived=True, archived_at=at)
                case projects.ProjectRestored():
                    rows.update(event.project_id, updated_at=at, archived=False, archived_at=None)
                case projects.MemberAdded():
                    members.insert(
                        {
                            "project_id": event.project_id,
                            "user_id": event.user_id,
                            "role": str(event.role),
                            "added_at": at,
                        }
                    )
                    rows.update(event.project_id, updated_at=at)
                case projects.MemberRoleChanged():
                    members.update((event.project_id, event.user_id), role=str(event.role))
                    rows.update(event.project_id, updated_at=at)
                case projects.MemberRemoved():
                    members.delete((event.project_id, event.user_id))
                    rows.update(event.project_id, updated_at=at)
                case projects.ProjectDeleted():
                    rows.delete(event.project_id)
                    for member in list(members.rows()):
                        if member["project_id"] == event.project_id:
                            members.delete(members.key_of(member))
        await members.flush(conn)
        await rows.flush(conn)


def _by_project(table: Table) -> ColumnElement[bool]:
    return table.c.project_id.in_(keys_param())


_MEMBER_EVENTS = (projects.MemberAdded, projects.MemberRoleChanged, projects.MemberRemoved)


async def _update(
    conn: AsyncConnection, t: Tables, project_id: str, at: datetime, **values: Any
) -> None:
    table = t["projects"]
    await conn.execute(
        update(table).where(table.c.project_id == project_id).values(updated_at=at, **values)
    )
