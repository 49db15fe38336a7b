"""Request and response bodies. Responses are built from tiu-core's views; nothing
here holds a password hash or a stored token hash."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from domain.permissions import ProjectRole
from domain.projects import Visibility
from domain.tasks import Priority, TaskStatus


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Register(Body):
    email: str = Field(max_length=320)
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    display_name: str | None = Field(default=None, max_length=200)


class Login(Body):
    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)


class NewProject(Body):
    name: str = Field(max_length=500)
    description: str = Field(default="", max_length=10_000)
    visibility: Visibility = Visibility.PRIVATE


class NewMember(Body):
    user_id: str = Field(max_length=64)
    role: ProjectRole = ProjectRole.EDITOR


class NewTask(Body):
    title: str = Field(max_length=500)
    description: str = Field(default="", max_length=10_000)
    priority: Priority = Priority.MEDIUM
    due_date: datetime | None = None
    assignee_id: str | None = Field(default=None, max_length=64)


class Assignment(Body):
    user_id: str = Field(max_length=64)


class StatusChange(Body):
    status: TaskStatus


class UserOut(BaseModel):
    user_id: str
    email: str
    username: str
    display_name: str | None
    active: bool
    roles: list[str]
    created_at: datetime


class SessionOut(BaseModel):
    session_id: str
    user_id: str
    started_at: datetime
    expires_at: datetime
    last_seen_at: datetime


class LoginOut(BaseModel):
    token: str = Field(description="Send as `Authorization: Bearer <token>`; shown once")
    session: SessionOut
    user: UserOut


class ProjectOut(BaseModel):
    project_id: str
    name: str
    description: str
    visibility: str
    owner_id: str
    archived: bool
    created_at: datetime
    updated_at: datetime


class ProjectPage(BaseModel):
    items: list[ProjectOut]
    next_cursor: str | None = Field(description="Pass as `after` for the next page")


class MemberOut(BaseModel):
    project_id: str
    user_id: str
    role: str
    added_at: datetime


class TaskOut(BaseModel):
    task_id: str
    project_id: str
    title: str
    description: str
    status: str
    priority: str
    due_at: datetime | None
    assignee_id: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class TaskPage(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None = Field(description="Pass as `after` for the next page")


class AuditEntryOut(BaseModel):
    position: int
    recorded_at: datetime
    stream_id: str
    category: str
    version: int
    event_type: str
    actor_id: str | None
    correlation_id: str | None
    causation_id: str | None
    command_id: str | None
    data: dict[str, Any]


class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    healthy: bool
    backend: str
    pending_migrations: bool | None
    current_revision: str | None
    head_revision: str | None
    error: str | None = None
