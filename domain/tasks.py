"""The task decider: creation, edits, assignment and the status machine.

Stream ``task-<task_id>``. Every task command names its ``project_id`` so the route
can load the project (``related["project"]``) along with the acting user
(``related["actor"]``) and, when assigning, the assignee (``related["assignee"]``).
The actor needs write access to the project (``projects.can_write``), the project must
not be archived, and an assignee must be the project's owner or a member with an
active account. Every task event carries ``project_id`` so read models can group.

``DeleteTask`` (anyone who may write the project's tasks) appends ``TaskDeleted``: the
read models drop the task, the log keeps its history, and the task refuses every
further command (``NotFound``). A deleted project (``projects.ProjectDeleted``) takes
its tasks with it: their commands find no project.

Priority is a named level (low < medium < high < urgent; ``Priority.rank`` orders
them). Status moves only along ``TRANSITIONS``::

    todo -> in_progress -> review -> done
    review -> in_progress,  in_progress -> todo
    todo | in_progress | review -> cancelled
    done | cancelled -> todo   (reopen)
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, assert_never

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from domain import errors, projects, users
from domain.base import (
    EMPTY,
    Command,
    CommandContext,
    EntityId,
    Event,
    StorableDatetime,
    clean_text,
    new_id,
)

CATEGORY: Final = "task"
TITLE_MAX: Final = 200
DESCRIPTION_MAX: Final = 10_000


def stream_id(entity_id: str) -> str:
    return f"{CATEGORY}-{entity_id}"


class Priority(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    URGENT = "urgent"

    @property
    def rank(self) -> int:
        """1 (low) .. 4 (urgent), for sorting."""
        return list(Priority).index(self) + 1


class TaskStatus(StrEnum):
    TODO = "todo"
    IN_PROGRESS = "in_progress"
    REVIEW = "review"
    DONE = "done"
    CANCELLED = "cancelled"


TRANSITIONS: Final[Mapping[TaskStatus, frozenset[TaskStatus]]] = MappingProxyType(
    {
        TaskStatus.TODO: frozenset({TaskStatus.IN_PROGRESS, TaskStatus.CANCELLED}),
        TaskStatus.IN_PROGRESS: frozenset(
            {TaskStatus.REVIEW, TaskStatus.TODO, TaskStatus.CANCELLED}
        ),
        TaskStatus.REVIEW: frozenset(
            {TaskStatus.DONE, TaskStatus.IN_PROGRESS, TaskStatus.CANCELLED}
        ),
        TaskStatus.DONE: frozenset({TaskStatus.TODO}),
        TaskStatus.CANCELLED: frozenset({TaskStatus.TODO}),
    }
)
"""Allowed status changes: from -> the statuses it may move to."""


# --- events -------------------------------------------------------------------------


class TaskCreated(Event):
    """A new task, always in status ``todo``."""

    event_type = "TaskCreated"

    task_id: EntityId
    project_id: EntityId
    title: str
    description: str
    priority: Priority
    due_date: AwareDatetime | None
    assignee_id: EntityId | None
    created_by: str
    at: AwareDatetime


class TaskEdited(Event):
    """Carries the full new title, description, priority and due date."""

    event_type = "TaskEdited"

    task_id: EntityId
    project_id: EntityId
    title: str
    description: str
    priority: Priority
    due_date: AwareDatetime | None
    by: str


class TaskAssigned(Event):
    event_type = "TaskAssigned"

    task_id: EntityId
    project_id: EntityId
    assignee_id: EntityId
    by: str


class TaskUnassigned(Event):
    event_type = "TaskUnassigned"

    task_id: EntityId
    project_id: EntityId
    previous_assignee_id: EntityId
    by: str


class TaskStatusChanged(Event):
    event_type = "TaskStatusChanged"

    task_id: EntityId
    project_id: EntityId
    from_status: TaskStatus
    to_status: TaskStatus
    by: str
    at: AwareDatetime


class TaskDeleted(Event):
    """``status`` is the task's status when deleted (read models keep counts by it)."""

    event_type = "TaskDeleted"

    task_id: EntityId
    project_id: EntityId
    status: TaskStatus
    by: str
    at: AwareDatetime


# --- commands -----------------------------------------------------------------------


class CreateTask(Command):
    task_id: EntityId = Field(default_factory=new_id)
    project_id: EntityId
    title: str
    description: str = ""
    priority: Priority = Priority.MEDIUM
    due_date: StorableDatetime | None = None
    assignee_id: EntityId | None = None


class EditTask(Command):
    """Only the fields given are changed; giving ``due_date=None`` clears it."""

    task_id: EntityId
    project_id: EntityId
    title: str | None = None
    description: str | None = None
    priority: Priority | None = None
    due_date: StorableDatetime | None = None


class AssignTask(Command):
    task_id: EntityId
    project_id: EntityId
    assignee_id: EntityId


class UnassignTask(Command):
    task_id: EntityId
    project_id: EntityId


class ChangeTaskStatus(Command):
    task_id: EntityId
    project_id: EntityId
    to: TaskStatus


class DeleteTask(Command):
    task_id: EntityId
    project_id: EntityId


# --- state --------------------------------------------------------------------------


class State(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    created: bool = False
    task_id: str | None = None
    project_id: str | None = None
    title: str = ""
    description: str = ""
    priority: Priority = Priority.MEDIUM
    status: TaskStatus = TaskStatus.TODO
    due_date: datetime | None = None
    assignee_id: str | None = None
    created_by: str | None = None
    deleted: bool = False


def initial_state() -> State:
    return State()


def evolve(state: State, event: Event) -> State:
    match event:
        case TaskCreated():
            return State(
                created=True,
                task_id=event.task_id,
                project_id=event.project_id,
                title=event.title,
                description=event.description,
                priority=event.priority,
                due_date=event.due_date,
                assignee_id=event.assignee_id,
                created_by=event.created_by,
            )
        case TaskEdited():
            return state.model_copy(
                update={
                    "title": event.title,
                    "description": event.description,
                    "priority": event.priority,
                    "due_date": event.due_date,
                }
            )
        case TaskAssigned():
            return state.model_copy(update={"assignee_id": event.assignee_id})
        case TaskUnassigned():
            return state.model_copy(update={"assignee_id": None})
        case TaskStatusChanged():
            return state.model_copy(update={"status": event.to_status})
        case TaskDeleted():
            return state.model_copy(update={"deleted": True})
        case _:
            return state


# --- decide -------------------------------------------------------------------------


def _title(raw: str) -> str:
    return clean_text(raw, "title", max_length=TITLE_MAX)


def _description(raw: str) -> str:
    return clean_text(
        raw, "description", max_length=DESCRIPTION_MAX, required=False, multiline=True
    )


def _check_assignee(project: projects.State, assignee_id: str, related: Mapping[str, Any]) -> None:
    assignee = related.get("assignee")
    if not isinstance(assignee, users.State) or assignee.user_id != assignee_id:
        raise errors.NotFound("user", assignee_id)
    if not project.is_participant(assignee_id):
        raise errors.Conflict(
            f"user {assignee_id!r} is not a member of project {project.project_id!r}"
        )
    if not assignee.active:
        raise errors.Conflict(f"user {assignee_id!r} is deactivated")


def decide(
    command: Command, state: State, ctx: CommandContext, related: Mapping[str, Any] = EMPTY
) -> list[Event]:
    if not isinstance(
        command, CreateTask | EditTask | AssignTask | UnassignTask | ChangeTaskStatus | DeleteTask
    ):
        raise TypeError(f"tasks.decide cannot handle {type(command).__name__}")
    project = related.get("project")
    if (
        not isinstance(project, projects.State)
        or not project.created
        or project.deleted
        or project.project_id != command.project_id
    ):
        raise errors.NotFound("project", command.project_id)
    actor_id, roles = users.acting_user(ctx, related)
    if actor_id is None or not projects.can_write(project, actor_id, roles):
        raise errors.PermissionDenied(
            ctx.actor_id, "write tasks in", f"project {command.project_id}"
        )
    if project.archived:
        raise errors.Conflict(f"project {command.project_id!r} is archived")

    if isinstance(command, CreateTask):
        if state.created:
            raise errors.AlreadyExists("task", command.task_id)
        if command.assignee_id is not None:
            _check_assignee(project, command.assignee_id, related)
        return [
            TaskCreated(
                task_id=command.task_id,
                project_id=command.project_id,
                title=_title(command.title),
                description=_description(command.description),
                priority=command.priority,
                due_date=command.due_date,
                assignee_id=command.assignee_id,
                created_by=actor_id,
                at=ctx.now,
            )
        ]

    if not state.created or state.deleted or state.project_id != command.project_id:
        raise errors.NotFound("task", command.task_id)
    ids = {"task_id": command.task_id, "project_id": command.project_id, "by": actor_id}
    match command:
        case DeleteTask():
            return [TaskDeleted(**ids, status=state.status, at=ctx.now)]

        case EditTask():
            given = command.model_fields_set
            title = _title(command.title) if command.title is not None else state.title
            description = state.description
            if command.description is not None:
                description = _description(command.description)
            priority = command.priority or state.priority
            due_date = command.due_date if "due_date" in given else state.due_date
            if "title" in given and command.title is None:
                raise errors.InvalidCommand("title", "must not be empty")
            new = (title, description, priority, due_date)
            if new == (state.title, state.description, state.priority, state.due_date):
                return []
            return [
                TaskEdited(
                    **ids,
                    title=title,
                    description=description,
                    priority=priority,
                    due_date=due_date,
                )
            ]

        case AssignTask():
            _check_assignee(project, command.assignee_id, related)
            if command.assignee_id == state.assignee_id:
                return []
            return [TaskAssigned(**ids, assignee_id=command.assignee_id)]

        case UnassignTask():
            if state.assignee_id is None:
                return []
            return [TaskUnassigned(**ids, previous_assignee_id=state.assignee_id)]

        case ChangeTaskStatus():
            if command.to not in TRANSITIONS[state.status]:
                raise errors.IllegalTransition(state.status, command.to)
            return [
                TaskStatusChanged(**ids, from_status=state.status, to_status=command.to, at=ctx.now)
            ]

    assert_never(command)
