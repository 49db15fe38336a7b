"""The project decider: creation, settings, membership and archiving, and the access
rules shared with tasks and the read side.

Stream ``project-<project_id>``. The acting user's state comes as
``related["actor"]``; ``AddMember`` also needs the new member's state as
``related["member"]``. Access:

- read: anyone on a public project; otherwise the owner, members and holders of
  ``projects:read_all``;
- write tasks: the owner and editor/manager members, provided their global roles grant
  ``tasks:write``; holders of ``projects:manage_all`` always;
- manage members and settings, archive and restore: the owner, manager members and
  holders of ``projects:manage_all``.

An archived project refuses every change except ``RestoreProject`` and
``DeleteProject``. Removing a member does not unassign their tasks; the read side can
show such assignments as stale.

``CreateProject(owner_id=...)`` creates a project for someone else (the seed's
``create_project(owner_id=user.id)``): allowed for the trusted service context (a
context without an actor) and for holders of ``projects:manage_all``; the owner,
``related["owner"]``, must be a registered, active user.

``DeleteProject`` (the owner, managers, ``projects:manage_all``) appends
``ProjectDeleted``: the read models drop the project, its members and its tasks; the
log keeps every event. A deleted project refuses every command (``NotFound``), and so
do its tasks, whose decisions read the project.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, assert_never

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from domain import errors, users
from domain.base import EMPTY, Command, CommandContext, EntityId, Event, clean_text, new_id
from domain.permissions import Permission, ProjectRole, Role, permissions_for

CATEGORY: Final = "project"
NAME_MAX: Final = 200
DESCRIPTION_MAX: Final = 10_000


def stream_id(entity_id: str) -> str:
    return f"{CATEGORY}-{entity_id}"


class Visibility(StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"


# --- events -------------------------------------------------------------------------


class ProjectCreated(Event):
    event_type = "ProjectCreated"

    project_id: EntityId
    owner_id: EntityId
    name: str
    description: str
    visibility: Visibility
    at: AwareDatetime


class ProjectUpdated(Event):
    """Carries the full new name and description."""

    event_type = "ProjectUpdated"

    project_id: EntityId
    name: str
    description: str
    by: str


class ProjectVisibilityChanged(Event):
    event_type = "ProjectVisibilityChanged"

    project_id: EntityId
    visibility: Visibility
    by: str


class MemberAdded(Event):
    event_type = "MemberAdded"

    project_id: EntityId
    user_id: EntityId
    role: ProjectRole
    by: str


class MemberRemoved(Event):
    event_type = "MemberRemoved"

    project_id: EntityId
    user_id: EntityId
    by: str


class MemberRoleChanged(Event):
    event_type = "MemberRoleChanged"

    project_id: EntityId
    user_id: EntityId
    role: ProjectRole
    by: str


class ProjectArchived(Event):
    event_type = "ProjectArchived"

    project_id: EntityId
    by: str
    at: AwareDatetime


class ProjectRestored(Event):
    event_type = "ProjectRestored"

    project_id: EntityId
    by: str
    at: AwareDatetime


class ProjectDeleted(Event):
    """The project and its tasks are gone from the read models; its history stays."""

    event_type = "ProjectDeleted"

    project_id: EntityId
    by: str
    at: AwareDatetime


# --- commands -----------------------------------------------------------------------


class CreateProject(Command):
    """The acting user becomes the owner (needs ``projects:create``), or ``owner_id``
    when given (see the module docstring)."""

    project_id: EntityId = Field(default_factory=new_id)
    owner_id: EntityId | None = None
    name: str
    description: str = ""
    visibility: Visibility = Visibility.PRIVATE


class UpdateProject(Command):
    """Rename and/or redescribe; a field left None is unchanged."""

    project_id: EntityId
    name: str | None = None
    description: str | None = None


class ChangeVisibility(Command):
    project_id: EntityId
    visibility: Visibility


class AddMember(Command):
    project_id: EntityId
    user_id: EntityId
    role: ProjectRole


class RemoveMember(Command):
    """Managers remove anyone; a member may always remove themself (leave)."""

    project_id: EntityId
    user_id: EntityId


class ChangeMemberRole(Command):
    project_id: EntityId
    user_id: EntityId
    role: ProjectRole


class ArchiveProject(Command):
    project_id: EntityId


class RestoreProject(Command):
    project_id: EntityId


class DeleteProject(Command):
    project_id: EntityId


# --- state and access ---------------------------------------------------------------


class State(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    created: bool = False
    project_id: str | None = None
    owner_id: str | None = None
    name: str = ""
    description: str = ""
    visibility: Visibility = Visibility.PRIVATE
    archived: bool = False
    archived_at: datetime | None = None
    deleted: bool = False
    members: dict[str, ProjectRole] = Field(default_factory=dict)
    """Member user id -> role; never holds the owner. Replaced, never mutated."""

    def is_participant(self, user_id: str | None) -> bool:
        """True for the owner and every member, whatever their role."""
        return user_id is not None and (user_id == self.owner_id or user_id in self.members)


def initial_state() -> State:
    return State()


def can_read(project: State, user_id: str | None, user_roles: Iterable[Role | str]) -> bool:
    if not project.created:
        return False
    return (
        project.visibility is Visibility.PUBLIC
        or project.is_participant(user_id)
        or Permission.PROJECTS_READ_ALL in permissions_for(user_roles)
    )


def can_write(project: State, user_id: str | None, user_roles: Iterable[Role | str]) -> bool:
    """May create and change tasks (archiving is checked separately)."""
    if not project.created:
        return False
    granted = permissions_for(user_roles)
    if Permission.PROJECTS_MANAGE_ALL in granted:
        return True
    if Permission.TASKS_WRITE not in granted or user_id is None:
        return False
    return user_id == project.owner_id or project.members.get(user_id) in {
        ProjectRole.EDITOR,
        ProjectRole.MANAGER,
    }


def can_manage(project: State, user_id: str | None, user_roles: Iterable[Role | str]) -> bool:
    if not project.created:
        return False
    if Permission.PROJECTS_MANAGE_ALL in permissions_for(user_roles):
        return True
    if user_id is None:
        return False
    return user_id == project.owner_id or project.members.get(user_id) is ProjectRole.MANAGER


def evolve(state: State, event: Event) -> State:
    match event:
        case ProjectCreated():
            return State(
                created=True,
                project_id=event.project_id,
                owner_id=event.owner_id,
                name=event.name,
                description=event.description,
                visibility=event.visibility,
            )
        case ProjectUpdated():
            return state.model_copy(update={"name": event.name, "description": event.description})
        case ProjectVisibilityChanged():
            return state.model_copy(update={"visibility": event.visibility})
        case MemberAdded() | MemberRoleChanged():
            members = state.members | {event.user_id: event.role}
            return state.model_copy(update={"members": members})
        case MemberRemoved():
            members = {u: r for u, r in state.members.items() if u != event.user_id}
            return state.model_copy(update={"members": members})
        case ProjectArchived():
            return state.model_copy(update={"archived": True, "archived_at": event.at})
        case ProjectRestored():
            return state.model_copy(update={"archived": False, "archived_at": None})
        case ProjectDeleted():
            return state.model_copy(update={"deleted": True})
        case _:
            return state


# --- decide -------------------------------------------------------------------------


def _existing(state: State, project_id: str) -> State:
    if not state.created or state.deleted:
        raise errors.NotFound("project", project_id)
    return state


_MANAGING: Final = (
    UpdateProject,
    ChangeVisibility,
    AddMember,
    RemoveMember,
    ChangeMemberRole,
    ArchiveProject,
    RestoreProject,
    DeleteProject,
)


def decide(
    command: Command, state: State, ctx: CommandContext, related: Mapping[str, Any] = EMPTY
) -> list[Event]:
    actor_id, roles = users.acting_user(ctx, related)
    if isinstance(command, CreateProject):
        return _create(command, state, ctx, related, actor=(actor_id, roles))
    if not isinstance(command, _MANAGING):
        raise TypeError(f"projects.decide cannot handle {type(command).__name__}")
    _existing(state, command.project_id)
    leaving = isinstance(command, RemoveMember) and command.user_id == actor_id
    if not leaving and not can_manage(state, actor_id, roles):
        raise errors.PermissionDenied(ctx.actor_id, "manage", f"project {command.project_id}")
    assert actor_id is not None
    if state.archived and not isinstance(command, ArchiveProject | RestoreProject | DeleteProject):
        raise errors.Conflict(f"project {command.project_id!r} is archived")
    project_id, by = command.project_id, actor_id
    match command:
        case DeleteProject():
            return [ProjectDeleted(project_id=project_id, by=by, at=ctx.now)]

        case ArchiveProject():
            return (
                []
                if state.archived
                else [ProjectArchived(project_id=project_id, by=by, at=ctx.now)]
            )

        case RestoreProject():
            if not state.archived:
                return []
            return [ProjectRestored(project_id=project_id, by=by, at=ctx.now)]

        case UpdateProject():
            name, description = state.name, state.description
            if command.name is not None:
                name = clean_text(command.name, "name", max_length=NAME_MAX)
            if command.description is not None:
                description = _description(command.description)
            if (name, description) == (state.name, state.description):
                return []
            return [
                ProjectUpdated(project_id=project_id, name=name, description=description, by=by)
            ]

        case ChangeVisibility():
            if command.visibility is state.visibility:
                return []
            return [
                ProjectVisibilityChanged(
                    project_id=project_id, visibility=command.visibility, by=by
                )
            ]

        case AddMember():
            if command.user_id == state.owner_id:
                raise errors.Conflict("the owner cannot also be a member")
            if command.user_id in state.members:
                raise errors.AlreadyExists("member", command.user_id)
            member = related.get("member")
            if not isinstance(member, users.State) or not member.registered:
                raise errors.NotFound("user", command.user_id)
            if not member.active:
                raise errors.Conflict(f"user {command.user_id!r} is deactivated")
            return [
                MemberAdded(
                    project_id=project_id, user_id=command.user_id, role=command.role, by=by
                )
            ]

        case RemoveMember():
            if command.user_id not in state.members:
                raise errors.NotFound("member", command.user_id)
            return [MemberRemoved(project_id=project_id, user_id=command.user_id, by=by)]

        case ChangeMemberRole():
            current = state.members.get(command.user_id)
            if current is None:
                raise errors.NotFound("member", command.user_id)
            if current is command.role:
                return []
            return [
                MemberRoleChanged(
                    project_id=project_id, user_id=command.user_id, role=command.role, by=by
                )
            ]

    assert_never(command)


def _description(raw: str) -> str:
    return clean_text(
        raw, "description", max_length=DESCRIPTION_MAX, required=False, multiline=True
    )


def _create(
    command: CreateProject,
    state: State,
    ctx: CommandContext,
    related: Mapping[str, Any],
    *,
    actor: tuple[str | None, frozenset[Role]],
) -> list[Event]:
    actor_id, roles = actor
    owner_id = command.owner_id or actor_id
    if command.owner_id is None or command.owner_id == actor_id:
        if actor_id is None or Permission.PROJECTS_CREATE not in permissions_for(roles):
            raise errors.PermissionDenied(ctx.actor_id, "create", "projects")
    elif ctx.actor_id is not None and Permission.PROJECTS_MANAGE_ALL not in permissions_for(roles):
        # A context without an actor is the service itself; anyone else naming another
        # owner must manage all projects.
        raise errors.PermissionDenied(ctx.actor_id, "create projects for", f"user {owner_id}")
    if state.created:
        raise errors.AlreadyExists("project", command.project_id)
    if command.owner_id is not None and command.owner_id != actor_id:
        owner = related.get("owner")
        if not isinstance(owner, users.State) or not owner.registered:
            raise errors.NotFound("user", command.owner_id)
        if not owner.active:
            raise errors.Conflict(f"user {command.owner_id!r} is deactivated")
    assert owner_id is not None
    return [
        ProjectCreated(
            project_id=command.project_id,
            owner_id=owner_id,
            name=clean_text(command.name, "name", max_length=NAME_MAX),
            description=_description(command.description),
            visibility=command.visibility,
            at=ctx.now,
        )
    ]
