"""What repositories return: frozen views of read-model rows (never hashes or tokens)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter


class View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | Any) -> Self:
        return cls.model_validate(dict(row))

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> list[Self]:
        """Views of ``rows`` in one validation call: half the time of one call per row
        (measured: 34 us against 66 for 50 tasks)."""
        return _list_adapter(cls).validate_python(rows)  # type: ignore[no-any-return]

    @classmethod
    def from_table_rows(cls, rows: list[dict[str, Any]]) -> list[Self]:
        """Views of rows of the read-model table this view mirrors, as
        ``projections.query.Query`` returns them: a new dict per row, keyed by column in
        table order, which the views take over.

        Where those columns are this view's fields, in order, each dict becomes a view's
        fields as it is, unvalidated: each column's Python type and nullability are its
        field's (``tests/tiu/test_models.py`` checks every such view), so validation
        would hand back the same objects. It was ~13k of a task's ~18k instructions of
        a keyset page on PostgreSQL; building the view is ~6k (callgrind). Other rows,
        and views with validators or constraints, are validated (:meth:`from_rows`)."""
        fields = _field_names(cls)
        if fields is None or not rows or tuple(rows[0]) != fields:
            return cls.from_rows(rows)
        new, fields_set = cls.__new__, set(fields)
        views = []
        for row in rows:
            view = new(cls)
            _set_fields(view, row)
            _set_fields_set(view, fields_set.copy())
            _set_extra(view, None)
            _set_private(view, None)
            views.append(view)
        return views


V = TypeVar("V", bound="View")


@dataclass(frozen=True, slots=True)
class Page(Generic[V]):
    """One keyset page of views (``page_tasks``, ``page_projects``); pass
    ``next_cursor`` as ``after`` for the next one. ``None`` on the last page."""

    items: list[V]
    next_cursor: str | None


@functools.cache
def _list_adapter(cls: type[View]) -> TypeAdapter[Any]:
    return TypeAdapter(list[cls])  # type: ignore[valid-type]


@functools.cache
def _field_names(cls: type[View]) -> tuple[str, ...] | None:
    """The view's fields, if validating a row holding exactly them can only hand back its
    values: no validator, constraint, alias, private attribute or post-init to run, and
    :class:`View`'s configuration (one that transforms values, such as
    ``str_strip_whitespace`` or ``use_enum_values``, would change them)."""
    decorators = cls.__pydantic_decorators__
    if (
        cls.model_config != View.model_config
        or any(
            field.alias or field.validation_alias or field.default_factory or field.metadata
            for field in cls.model_fields.values()
        )
        or decorators.validators
        or decorators.field_validators
        or decorators.root_validators
        or decorators.model_validators
        or cls.__private_attributes__
        or cls.__pydantic_post_init__ is not None
    ):
        return None
    return tuple(cls.model_fields)


# What validation sets on a model it builds (BaseModel's slots), as pydantic's own
# model_construct sets them; called as descriptors, without its per-field Python.
_set_fields = vars(BaseModel)["__dict__"].__set__
_set_fields_set = vars(BaseModel)["__pydantic_fields_set__"].__set__
_set_extra = vars(BaseModel)["__pydantic_extra__"].__set__
_set_private = vars(BaseModel)["__pydantic_private__"].__set__


class User(View):
    user_id: str
    email: str
    username: str
    display_name: str | None
    active: bool
    locked_until: datetime | None
    failed_logins: int
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime
    roles: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.user_id


class Project(View):
    project_id: str
    name: str
    description: str
    visibility: str
    owner_id: str
    archived: bool
    archived_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @property
    def id(self) -> str:
        return self.project_id


class Member(View):
    project_id: str
    user_id: str
    role: str
    added_at: datetime


class Task(View):
    task_id: str
    project_id: str
    title: str
    description: str
    status: str
    priority: str
    priority_rank: int
    due_at: datetime | None
    assignee_id: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None

    @property
    def id(self) -> str:
        return self.task_id


class Session(View):
    session_id: str
    user_id: str
    started_at: datetime
    expires_at: datetime
    last_seen_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None
    ip: str | None = None
    """The login's IP and user agent, as the service passed them to
    ``get_repositories``; ``"[erased]"`` once the user is forgotten."""
    user_agent: str | None = None

    @property
    def id(self) -> str:
        return self.session_id


class UserActivity(View):
    """Counters of the ``user_activity`` read model; they only grow (they count events,
    not current state)."""

    user_id: str
    logins: int
    failed_logins: int
    tasks_created: int
    tasks_completed: int
    tasks_assigned: int
    last_active_at: datetime | None


class NewSession(BaseModel):
    """A started session. ``token`` is shown this once; only its SHA-256 is stored."""

    model_config = ConfigDict(frozen=True)

    token: str
    session: Session
    user: User


class SessionValidation(BaseModel):
    """The answer to "may this token act?": the user and permissions, or why not."""

    model_config = ConfigDict(frozen=True)

    valid: bool
    reason: str | None = None
    user: User | None = None
    permissions: frozenset[str] = frozenset()
    session: Session | None = None


class TokenCheck(BaseModel):
    """The answer of ``check_token``: whom a token acts for, or why it may not act.

    ``source`` names the read model that answered: ``redis`` (the session cache) or
    ``sql``."""

    model_config = ConfigDict(frozen=True)

    valid: bool
    reason: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    expires_at: datetime | None = None
    source: Literal["redis", "sql"]


class ProjectStatistics(BaseModel):
    model_config = ConfigDict(frozen=True)

    project_id: str
    total: int
    by_status: dict[str, int]
    completion_rate: float | None
    overdue: int


class AuditEntry(BaseModel):
    """One event of the log, as audit queries show it."""

    model_config = ConfigDict(frozen=True)

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
