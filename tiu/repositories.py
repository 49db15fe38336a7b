"""The repositories users hold: write methods issue commands, read methods query read
models (the audit repository reads the log itself).

A repository is bound to an *actor* (who is acting; ``None`` is an anonymous caller)
and to a *channel*: standalone (each write is its own transaction, each read a short
connection) or a unit of work (``execute_in_transaction``: every write joins one
transaction and reads see its writes).

Every write method takes an optional keyword ``command_id``: the idempotency key of the
command it issues (a client's Idempotency-Key, at most 64 characters). Sent again, it
returns what the first call returned and appends nothing; a refused first call is
refused again the same way (see :mod:`tiu.idempotency`). A method that issues several
commands (a bulk method, a login and its session) takes one key per call and derives
one per command from it (:func:`tiu.idempotency.derived_command_id`).
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import secrets
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pydantic import SecretStr
from sqlalchemy import ColumnElement, Select, and_, bindparam, func, or_, select, true
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import audit, projects, security, sessions, tasks, users
from domain.base import Command, CommandContext, check_caller
from domain.errors import (
    AlreadyExists,
    DomainError,
    InvalidCommand,
    InvalidCredentials,
    NotFound,
    PermissionDenied,
    SubjectForgotten,
    shown,
)
from domain.passwords import hash_token
from domain.permissions import SYSTEM_ACTOR, Permission
from eventstore import retention, telemetry
from eventstore.errors import SubjectKeysDestroyed
from eventstore.schema import unique_keys
from eventstore.translate import sqlstate, translate_errors
from projections.query import Query
from projections.readmodels.project_stats import project_stats
from projections.readmodels.projects import project_members, projects_table
from projections.readmodels.sessions import sessions_table
from projections.readmodels.tasks import tasks_table
from projections.readmodels.user_activity import user_activity
from projections.readmodels.users import lookup_key, user_permissions, user_roles, users_table
from tiu import audit as audit_queries
from tiu.arguments import checked
from tiu.dispatch import CommandResult, CommandUnit
from tiu.idempotency import derived_command_id, leaves_trace
from tiu.models import (
    AuditEntry,
    Member,
    NewSession,
    Page,
    Project,
    ProjectStatistics,
    Session,
    SessionValidation,
    Task,
    TokenCheck,
    User,
    UserActivity,
)

if TYPE_CHECKING:
    from projections.redis_sessions import CachedSession
    from tiu.service import DatabaseService

V = TypeVar("V")
C = TypeVar("C", bound=Command)
W = TypeVar("W")

USERS_Q = Query(users_table)
PROJECTS_Q = Query(projects_table)
MEMBERS_Q = Query(project_members)
TASKS_Q = Query(
    tasks_table, ranks={"priority": ("priority_rank", {p.value: p.rank for p in tasks.Priority})}
)
ACTIVITY_Q = Query(user_activity)
SESSIONS_Q = Query(
    sessions_table, fields=[c.name for c in sessions_table.c if c.name != "token_hash"]
)
_PG_INSUFFICIENT_PRIVILEGE: Final = "42501"
#: The longest idempotency key a caller may pass (``Command.command_id``'s limit).
MAX_KEY_LENGTH: Final = 64
#: The only category retention may archive: nothing is rebuilt from it.
ARCHIVABLE_CATEGORY: Final = security.CATEGORY
#: The furthest ahead get_due_soon_tasks looks (beyond it, a date would not be a date).
_MAX_WITHIN: Final = timedelta(days=365_250)
OPEN_STATUSES = (tasks.TaskStatus.TODO, tasks.TaskStatus.IN_PROGRESS, tasks.TaskStatus.REVIEW)


class BulkOperationError(DomainError):
    """One item of a bulk operation was refused; nothing of the batch was applied.
    ``command`` is the refused item's command (None when it was refused before one was
    issued, e.g. an unknown task)."""

    code = "bulk_refused"

    def __init__(
        self, index: int, item: str, error: DomainError, command: Command | None = None
    ) -> None:
        super().__init__(f"item {index} ({shown(item)}) refused: {error}")
        self.index = index
        self.item = item
        self.error = error
        self.command = command


def _keyed(command_id: str | None) -> dict[str, str]:
    """The ``command_id`` argument of a command: the caller's key, or a fresh one."""
    return {} if command_id is None else {"command_id": _checked_key(command_id)}


def _item_key(command_id: str | None, part: object) -> dict[str, str]:
    """The key of one command of a call that issues several (one key per call)."""
    if command_id is None:
        return {}
    return {"command_id": derived_command_id(_checked_key(command_id), part)}


def _checked_key(command_id: object) -> str:
    """A caller's idempotency key: 1 to 64 characters, none of them a control
    character or a lone surrogate (it is stored as text and echoed in the log)."""
    if (
        not isinstance(command_id, str)
        or not 1 <= len(command_id) <= MAX_KEY_LENGTH
        or any(unicodedata.category(c).startswith("C") for c in command_id)
    ):
        raise InvalidCommand("command_id", f"must be 1 to {MAX_KEY_LENGTH} printable characters")
    return command_id


def _entity_id(result: CommandResult) -> str:
    """The id of the aggregate a command wrote: the first call's for a resend."""
    return result.stream_id.split("-", 1)[1]


def _created(view: W | None, kind: str, id: str) -> W:
    # A create_* returns what it created; None would mean the creator cannot read it.
    if view is None:
        raise NotFound(kind, id)
    return view


@dataclass(frozen=True)
class Caller:
    """Who is acting and from where; becomes the command context."""

    actor_id: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    correlation_id: str | None = None

    def __post_init__(self) -> None:
        # Reads use the actor too (the permission lookup, the visibility filter): a
        # value no command could carry is refused here, before any of them.
        check_caller(
            actor_id=self.actor_id,
            correlation_id=self.correlation_id,
            ip=self.ip,
            user_agent=self.user_agent,
        )


class Channel:
    """How repositories read and write: standalone, or inside one unit of work."""

    def __init__(self, service: DatabaseService, caller: Caller, unit: CommandUnit | None) -> None:
        self.service = service
        self.caller = caller
        self.unit = unit
        self._reads_all: bool | None = None

    def context(
        self, *, actor_id: str | None = None, now: datetime | None = None
    ) -> CommandContext:
        caller = self.caller
        return self.service.context(
            actor_id if actor_id is not None else caller.actor_id,
            ip=caller.ip,
            user_agent=caller.user_agent,
            correlation_id=caller.correlation_id,
            now=now,
        )

    @asynccontextmanager
    async def read(self, *, streamed: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection to read through; ``streamed``: one whose results may be streamed
        (:meth:`DatabaseService.read_connection`)."""
        if self.unit is not None:
            yield await self.unit.uow.reading()
            return
        # Reads fail as the store's writes do: StoreUnavailable, never a driver error.
        with translate_errors(self.service.store.dialect.database_label):
            async with self.service.read_connection(streamed=streamed) as conn:
                yield conn

    async def send(self, command: Command, *, actor_id: str | None = None) -> CommandResult:
        ctx = self.context(actor_id=actor_id)
        if self.unit is not None:
            return await self.unit.handle(command, ctx)
        result = await self.service.dispatcher.dispatch(command, ctx)
        await self.service.caught_up(result)
        return result

    async def batch(self, work: Callable[[Channel], Awaitable[V]]) -> V:
        """Run ``work`` with every write in one transaction (this unit, or a new one)."""
        if self.unit is not None:
            return await work(self)

        async def in_unit(unit: CommandUnit) -> V:
            return await work(Channel(self.service, self.caller, unit))

        value, unit = await self.service.dispatcher.run(in_unit)
        positions = [r.position for r in unit.results if r.position is not None]
        if positions:
            await self.service.wait_for(max(positions))
        return value

    async def bulk(self, work: Callable[[Channel], Awaitable[V]]) -> V:
        """:meth:`batch` for a bulk method: when an item is refused (and the batch rolled
        back), its refusal is still recorded as a lone command's would be: in the
        idempotency record of its command id and, if security relevant, in the
        actor's security stream. Inside ``execute_in_transaction`` the caller's
        transaction decides, as for every refusal there."""
        try:
            return await self.batch(work)
        except BulkOperationError as failed:
            command, refusal = failed.command, failed.error
            if self.unit is None and command is not None and leaves_trace(refusal):
                ctx = self.context()

                async def record(unit: CommandUnit) -> None:
                    await unit.record_refusal(command, ctx, refusal)

                await self.service.dispatcher.run(record)
            raise

    async def actor_permissions(self, conn: AsyncConnection | None = None) -> frozenset[str]:
        """The actor's permissions as they are now (on ``conn`` if given, which saves a
        connection checkout)."""
        actor = self.caller.actor_id
        if actor is None:
            return frozenset()
        if actor == SYSTEM_ACTOR:
            return frozenset(Permission)
        if conn is not None:
            return await self.permissions_of(conn, actor)
        async with self.read() as own:
            return await self.permissions_of(own, actor)

    async def permissions_of(self, conn: AsyncConnection, user_id: str) -> frozenset[str]:
        """``user_id``'s permissions, read on ``conn``."""
        # On the driver: this lookup precedes most reads, and SQLAlchemy's execution
        # was most of its cost (~110 of ~870 us of a 50-task list on SQLite, profiled).
        with telemetry.read(conn, user_permissions.name, "permissions"):
            rows = await self.service.store.dialect.fetch(conn, _PERMISSIONS_SQL, (user_id,))
        return frozenset(row[0] for row in rows)

    async def reads_all_projects(self, conn: AsyncConnection) -> bool:
        """Whether the actor holds ``projects:read_all``, for the visibility filter of
        reads: looked up once per repositories session (every time inside a unit of
        work, whose commands may change it). Authorisation checks of writes and audit
        reads use :meth:`actor_permissions`, never this cached answer."""
        if self._reads_all is None or self.unit is not None:
            self._reads_all = Permission.PROJECTS_READ_ALL in await self.actor_permissions(conn)
        return self._reads_all


class _Repository:
    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A public method refuses an argument of the wrong type with InvalidCommand
        # naming it, before it reaches a query, a hash or a driver (tiu.arguments).
        super().__init_subclass__(**kwargs)
        for name, method in list(vars(cls).items()):
            if not name.startswith("_") and inspect.iscoroutinefunction(method):
                setattr(cls, name, checked(method))

    @property
    def actor_id(self) -> str | None:
        return self._channel.caller.actor_id

    def _now(self) -> datetime:
        return self._channel.service.now()

    async def _reads_all(self, conn: AsyncConnection) -> bool:
        return await self._channel.reads_all_projects(conn)


class UserRepository(_Repository):
    async def create_user(
        self,
        *,
        email: str,
        username: str,
        password: str,
        display_name: str | None = None,
        roles: Sequence[str] | None = None,
        user_id: str | None = None,
        command_id: str | None = None,
    ) -> User:
        """Register a user (unique email and username, password policy, bcrypt)."""
        command = users.RegisterUser(
            email=email,
            username=username,
            password=SecretStr(password),
            display_name=display_name,
            **({"roles": tuple(roles)} if roles is not None else {}),
            **({"user_id": user_id} if user_id is not None else {}),
            **_keyed(command_id),
        )
        result = await self._channel.send(command)
        user_id = _entity_id(result)
        return _created(await self.get_by_id(user_id), "user", user_id)

    async def get_by_id(self, user_id: str) -> User | None:
        async with self._channel.read() as conn:
            row = await USERS_Q.get(conn, user_id)
            return await _with_roles(conn, row) if row is not None else None

    async def get_by_email(self, email: str) -> User | None:
        return await self._find(users_table.c.email_lower == lookup_key(email))

    async def get_by_username(self, username: str) -> User | None:
        return await self._find(users_table.c.username_lower == lookup_key(username))

    async def _find(self, condition: ColumnElement[bool]) -> User | None:
        async with self._channel.read() as conn:
            rows = await USERS_Q.list(conn, where=condition, limit=1)
            return await _with_roles(conn, rows[0]) if rows else None

    async def list_users(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        order_by: Sequence[str] | None = ("created_at",),
        limit: int | None = 100,
        offset: int | None = None,
    ) -> list[User]:
        async with self._channel.read() as conn:
            rows = await USERS_Q.list(conn, filters, order_by=order_by, limit=limit, offset=offset)
            return User.from_table_rows(rows)

    async def count_users(self, filters: Mapping[str, Any] | None = None) -> int:
        async with self._channel.read() as conn:
            return await USERS_Q.count(conn, filters)

    async def get_user_activity(self, user_id: str) -> UserActivity | None:
        """The user's activity counters (logins, failed logins, tasks created, completed
        and assigned, last activity); None for an unknown user."""
        async with self._channel.read() as conn:
            row = await ACTIVITY_Q.get(conn, user_id)
        return UserActivity.from_row(row) if row is not None else None

    async def list_user_activity(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        order_by: Sequence[str] | None = ("-last_active_at",),
        limit: int | None = 100,
        offset: int | None = None,
    ) -> list[UserActivity]:
        """Activity counters of many users, e.g. ``{"failed_logins__gte": 3}`` or the
        most recently active first (the default order)."""
        async with self._channel.read() as conn:
            rows = await ACTIVITY_Q.list(
                conn, filters, order_by=order_by, limit=limit, offset=offset
            )
        return UserActivity.from_table_rows(rows)

    async def user_id_for_email(self, email: str) -> str | None:
        """Resolve an email through the unique-key table (the write side's truth)."""
        key = users.email_claim_key(email)
        async with self._channel.read() as conn:
            with telemetry.read(conn, unique_keys.name, "get"):
                stream = await conn.scalar(
                    select(unique_keys.c.stream_id).where(
                        unique_keys.c.scope == "email", unique_keys.c.key == key
                    )
                )
        return stream.removeprefix(f"{users.CATEGORY}-") if stream else None

    async def authenticate(
        self, email: str, password: str, *, command_id: str | None = None
    ) -> User:
        """Check a password. Unknown emails cost the same bcrypt work and get the same
        ``InvalidCredentials``; repeated failures lock the account (``AccountLocked``).
        A resent ``command_id`` counts no second failure."""
        user_id = await self.user_id_for_email(email) if "@" in email else None
        result = await self._channel.send(
            users.AttemptLogin(user_id=user_id, password=SecretStr(password), **_keyed(command_id))
        )
        # The user the login was for: a resent key answers with the first login's
        # account, whatever the email resolves to now (it may have changed since).
        if result.stream_id.startswith(f"{users.CATEGORY}-"):
            user = await self.get_by_id(_entity_id(result))
            if user is not None:
                return user
        raise InvalidCredentials

    async def change_password(
        self,
        user_id: str,
        old_password: str,
        new_password: str,
        *,
        command_id: str | None = None,
    ) -> None:
        """Also revokes every session of the user."""
        await self._channel.send(
            users.ChangePassword(
                user_id=user_id,
                old_password=SecretStr(old_password),
                new_password=SecretStr(new_password),
                **_keyed(command_id),
            ),
            actor_id=self.actor_id or user_id,
        )

    async def request_password_reset(
        self, email: str, *, command_id: str | None = None
    ) -> str | None:
        """A single-use reset token (``<user_id>.<secret>``), shown once; only its hash is
        stored. ``None`` when the email is unknown: tell the end user the same either way.
        ``None`` too for a resent ``command_id``: the first call's token stays the valid
        one, and it cannot be shown again."""
        user_id = await self.user_id_for_email(email)
        if user_id is None:
            return None
        token = f"{user_id}.{secrets.token_urlsafe(32)}"
        result = await self._channel.send(
            users.RequestPasswordReset(
                user_id=user_id, token=SecretStr(token), **_keyed(command_id)
            ),
            actor_id=self.actor_id or user_id,
        )
        return None if result.duplicate else token

    async def complete_password_reset(
        self, token: str, new_password: str, *, command_id: str | None = None
    ) -> None:
        user_id = token.split(".", 1)[0] if "." in token else ""
        if not user_id:
            raise InvalidCommand("token", "malformed reset token")
        await self._channel.send(
            users.CompletePasswordReset(
                user_id=user_id,
                token=SecretStr(token),
                new_password=SecretStr(new_password),
                **_keyed(command_id),
            ),
            actor_id=self.actor_id or user_id,
        )

    async def assign_role(self, user_id: str, role: str, *, command_id: str | None = None) -> None:
        await self._channel.send(users.AssignRole(user_id=user_id, role=role, **_keyed(command_id)))

    async def revoke_role(self, user_id: str, role: str, *, command_id: str | None = None) -> None:
        await self._channel.send(users.RevokeRole(user_id=user_id, role=role, **_keyed(command_id)))

    async def get_user_permissions(self, user_id: str) -> frozenset[str]:
        async with self._channel.read() as conn:
            return await self._channel.permissions_of(conn, user_id)

    async def unlock(self, user_id: str, *, command_id: str | None = None) -> None:
        await self._channel.send(users.UnlockUser(user_id=user_id, **_keyed(command_id)))

    async def deactivate(self, user_id: str, *, command_id: str | None = None) -> None:
        await self._channel.send(users.DeactivateUser(user_id=user_id, **_keyed(command_id)))

    async def reactivate(self, user_id: str, *, command_id: str | None = None) -> None:
        await self._channel.send(users.ReactivateUser(user_id=user_id, **_keyed(command_id)))

    async def change_email(
        self,
        user_id: str,
        new_email: str,
        password: str | None = None,
        *,
        command_id: str | None = None,
    ) -> None:
        await self._channel.send(
            users.ChangeEmail(
                user_id=user_id,
                new_email=new_email,
                password=SecretStr(password) if password is not None else None,
                **_keyed(command_id),
            )
        )

    async def forget_user(self, user_id: str, *, command_id: str | None = None) -> bool:
        """Erase the user's personal data (right to erasure; see docs/privacy.md):
        their keys are destroyed, so every personal field of theirs in the log and the
        read models reads as erased; ids, times and the hash chain stay. Needs
        users:manage (or the system actor). True if forgotten now, False if already."""
        result = await self._channel.send(users.ForgetUser(user_id=user_id, **_keyed(command_id)))
        return bool(result.events)

    async def rotate_key(self, user_id: str) -> str:
        """Give the user a new data key for new events (old events still open with
        the old keys until the user is forgotten); returns the new key id. Needs
        users:manage (or the system actor)."""
        if Permission.USERS_MANAGE not in await self._channel.actor_permissions():
            error = PermissionDenied(self.actor_id, "rotate the key of", f"user {user_id}")
            await self._channel.service.dispatcher.record_rejection(
                users.RotateUserKey(user_id=user_id), error, self._channel.context()
            )
            raise error
        if await self.get_by_id(user_id) is None:
            raise NotFound("user", user_id)

        async def work(channel: Channel) -> str:
            assert channel.unit is not None
            await channel.unit.begin()  # the key is written in the unit's write transaction
            try:
                return await channel.unit.keys.rotate(user_id)
            except SubjectKeysDestroyed as error:
                raise SubjectForgotten("user", user_id) from error

        return await self._channel.batch(work)


async def _with_roles(conn: AsyncConnection, row: Mapping[str, Any]) -> User:
    with telemetry.read(conn, user_roles.name, "list"):
        roles = await conn.execute(_ROLES_OF_USER, {"user_id": row["user_id"]})
    return User.from_row({**row, "roles": tuple(roles.scalars())})


_ENTITY_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _is_entity_id(value: object) -> bool:
    """Whether ``value`` can be an entity's id: one that cannot (a NUL, a lone
    surrogate, too long) names no row, and is answered without a query."""
    return isinstance(value, str) and _ENTITY_ID.fullmatch(value) is not None


# Statements of one shape are built once (module constants with their values bound):
# SQLAlchemy otherwise walks a new statement for its cache key on every call.
_ROLES_OF_USER: Final = (
    select(user_roles.c.role)
    .where(user_roles.c.user_id == bindparam("user_id"))
    .order_by(user_roles.c.role)
)
_PROJECT_OF_TASK: Final = select(tasks_table.c.project_id).where(
    tasks_table.c.task_id == bindparam("task_id")
)
_USER_LABEL: Final = "user__"
#: A session by its token hash, with its user's row (``user__<column>``, NULL if gone).
_SESSION_AND_USER: Final = (
    select(sessions_table, *(c.label(_USER_LABEL + c.name) for c in users_table.c))
    .select_from(
        sessions_table.outerjoin(users_table, users_table.c.user_id == sessions_table.c.user_id)
    )
    .where(sessions_table.c.token_hash == bindparam("token_hash"))
)


def _session_and_user(found: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    row = {c.name: found[c.name] for c in sessions_table.c}
    if found[_USER_LABEL + "user_id"] is None:
        return row, None
    return row, {c.name: found[_USER_LABEL + c.name] for c in users_table.c}


def _refusal(
    row: Mapping[str, Any], user_row: Mapping[str, Any] | None, now: datetime, policy: Any
) -> str | None:
    """Why the session row may not act at ``now`` (``None``: it may)."""
    valid_after = user_row["sessions_valid_after"] if user_row is not None else None
    if row["revoked_at"] is not None or (
        valid_after is not None and row["started_at"] < valid_after
    ):
        return "revoked"
    if user_row is None or not user_row["active"]:
        return "inactive"
    if now >= row["expires_at"]:
        return "expired"
    if now - row["last_seen_at"] >= policy.session_idle_timeout:
        return "idle"
    return None


_PERMISSIONS_SQL: Final = f"SELECT permission FROM {user_permissions.name} WHERE user_id = $1"  # noqa: S608  # constant
_PUBLIC: Final = projects_table.c.visibility == projects.Visibility.PUBLIC.value


def _member_of(user_id: str | None) -> Select[tuple[str]]:
    """The ids of the projects ``user_id`` is a member of."""
    return select(project_members.c.project_id).where(project_members.c.user_id == user_id)


@functools.lru_cache(maxsize=4096)
def _visible_projects(actor: str | None, reads_all: bool) -> ColumnElement[bool]:
    """Which projects ``actor`` may read: all with ``projects:read_all``, else the public
    ones, the ones it owns and the ones it is a member of.

    The permission is resolved before the query (:meth:`Channel.reads_all_projects`,
    once per repositories session), not inside it: as a branch of the SQL (an EXISTS
    OR'ed with the rest) it kept both planners from reading tasks through the
    ``project_id`` indexes, or made PostgreSQL expect every project to be visible
    (EXPLAIN in ``tests/projections/test_query_plans.py``; bench case 6).

    Cached per actor: building the expression was a third of a short query's time
    (profiled); SQL expressions are immutable, so one can serve every call.
    """
    if actor == SYSTEM_ACTOR or reads_all:
        return true()
    if actor is None:
        return _PUBLIC
    return or_(
        _PUBLIC,
        projects_table.c.owner_id == actor,
        projects_table.c.project_id.in_(_member_of(actor)),
    )


@functools.lru_cache(maxsize=4096)
def _visible_tasks(actor: str | None, reads_all: bool) -> ColumnElement[bool]:
    """Tasks of the projects ``actor`` may read (see :func:`_visible_projects`).

    Not ``project_id IN (projects WHERE public OR owner OR member)``: an OR over a
    subquery uses no index, so PostgreSQL read every project to find the visible ones.
    The projects come from two index lookups (public or owned; member of), and the
    tasks of those projects through the ``project_id`` indexes.
    """
    if actor == SYSTEM_ACTOR or reads_all:
        return true()
    if actor is None:
        return tasks_table.c.project_id.in_(select(projects_table.c.project_id).where(_PUBLIC))
    public_or_owned = select(projects_table.c.project_id).where(
        or_(_PUBLIC, projects_table.c.owner_id == actor)
    )
    return tasks_table.c.project_id.in_(public_or_owned.union_all(_member_of(actor)))


class ProjectRepository(_Repository):
    """Reads are access-checked: owners, members, admins, and anyone for public projects."""

    async def _visible(self, conn: AsyncConnection) -> ColumnElement[bool]:
        return _visible_projects(self.actor_id, await self._reads_all(conn))

    async def create_project(
        self,
        name: str,
        description: str = "",
        visibility: str = "private",
        *,
        owner_id: str | None = None,
        project_id: str | None = None,
        command_id: str | None = None,
    ) -> Project:
        """Create a project owned by the actor, or by ``owner_id``: naming another owner
        is allowed to the trusted service context (repositories without an actor, as
        in ``execute_in_transaction``) and to holders of ``projects:manage_all``, and
        refused with ``PermissionDenied`` for anyone else."""
        command = projects.CreateProject(
            name=name,
            description=description,
            visibility=visibility,
            owner_id=owner_id,
            **({"project_id": project_id} if project_id is not None else {}),
            **_keyed(command_id),
        )
        result = await self._channel.send(command)
        project_id = _entity_id(result)
        return _created(await self._creator_view(project_id), "project", project_id)

    async def _creator_view(self, project_id: str) -> Project | None:
        """The project just created, as the system sees it: an actor-less creator sees
        a private project it created for someone else."""
        if self.actor_id is not None:
            return await self.get_project(project_id)
        async with self._channel.read() as conn:
            row = await PROJECTS_Q.get(conn, project_id)
        return Project.from_row(row) if row is not None else None

    async def get_project(self, project_id: str) -> Project | None:
        if not _is_entity_id(project_id):
            return None
        async with self._channel.read() as conn:
            row = await PROJECTS_Q.get(conn, project_id, where=await self._visible(conn))
        return Project.from_row(row) if row is not None else None

    async def get_user_projects(
        self, user_id: str | None = None, *, include_archived: bool = False, limit: int = 100
    ) -> list[Project]:
        """Projects ``user_id`` (default: the actor) owns or is a member of, plus public
        ones, as far as the actor may see them."""
        subject = user_id or self.actor_id
        involved = or_(
            projects_table.c.owner_id == subject,
            projects_table.c.project_id.in_(_member_of(subject)),
            _PUBLIC,
        )
        if not include_archived:
            involved = and_(involved, projects_table.c.archived.is_(False))
        async with self._channel.read() as conn:
            condition = and_(involved, await self._visible(conn))
            rows = await PROJECTS_Q.list(
                conn, where=condition, order_by=["-created_at"], limit=limit
            )
        return Project.from_table_rows(rows)

    async def search_projects(
        self,
        text: str | None = None,
        filters: Mapping[str, Any] | None = None,
        *,
        order_by: Sequence[str] | None = ("name",),
        limit: int | None = 50,
        offset: int | None = None,
    ) -> list[Project]:
        """Projects whose name contains ``text`` (case-insensitive, ASCII folding), narrowed
        by ``filters`` (``field__op=value``), among those the actor may see."""
        merged = dict(filters or {})
        if text:
            merged["name__ilike"] = "%" + _escape_like(text) + "%"
        async with self._channel.read() as conn:
            visible = await self._visible(conn)
            rows = await PROJECTS_Q.list(
                conn,
                merged,
                where=visible,
                order_by=order_by,
                limit=limit,
                offset=offset,
            )
        return Project.from_table_rows(rows)

    async def page_projects(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        order_by: Sequence[str] = ("-created_at",),
        after: str | None = None,
        limit: int = 50,
    ) -> Page[Project]:
        async with self._channel.read() as conn:
            visible = await self._visible(conn)
            rows = await PROJECTS_Q.page(
                conn, filters, order_by=order_by, after=after, limit=limit, where=visible
            )
        return Page(Project.from_table_rows(rows.items), rows.next_cursor)

    async def update_project(
        self,
        project_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        command_id: str | None = None,
    ) -> None:
        await self._channel.send(
            projects.UpdateProject(
                project_id=project_id, name=name, description=description, **_keyed(command_id)
            )
        )

    async def change_visibility(
        self, project_id: str, visibility: str, *, command_id: str | None = None
    ) -> None:
        await self._channel.send(
            projects.ChangeVisibility(
                project_id=project_id, visibility=visibility, **_keyed(command_id)
            )
        )

    async def archive_project(self, project_id: str, *, command_id: str | None = None) -> None:
        await self._channel.send(
            projects.ArchiveProject(project_id=project_id, **_keyed(command_id))
        )

    async def restore_project(self, project_id: str, *, command_id: str | None = None) -> None:
        await self._channel.send(
            projects.RestoreProject(project_id=project_id, **_keyed(command_id))
        )

    async def delete_project(self, project_id: str, *, command_id: str | None = None) -> None:
        """Delete the project and its tasks (``ProjectDeleted``; the owner, managers and
        ``projects:manage_all``): they leave the read models, their history stays in
        the log, and every later command on them is refused with ``NotFound``."""
        await self._channel.send(
            projects.DeleteProject(project_id=project_id, **_keyed(command_id))
        )

    async def bulk_delete_projects(
        self, project_ids: Iterable[str], *, command_id: str | None = None
    ) -> int:
        """Delete several projects in one transaction, all or none (``BulkOperationError``
        names the refused one); ``command_id`` is one key for the whole call."""

        async def work(channel: Channel) -> int:
            count = 0
            for index, project_id in enumerate(project_ids):
                command = projects.DeleteProject(
                    project_id=project_id, **_item_key(command_id, index)
                )
                await _bulk_step(index, project_id, channel, command)
                count += 1
            return count

        return await self._channel.bulk(work)

    async def add_member(
        self,
        project_id: str,
        user_id: str,
        role: str = "editor",
        *,
        command_id: str | None = None,
    ) -> None:
        await self._channel.send(
            projects.AddMember(
                project_id=project_id, user_id=user_id, role=role, **_keyed(command_id)
            )
        )

    async def change_member_role(
        self, project_id: str, user_id: str, role: str, *, command_id: str | None = None
    ) -> None:
        await self._channel.send(
            projects.ChangeMemberRole(
                project_id=project_id, user_id=user_id, role=role, **_keyed(command_id)
            )
        )

    async def remove_member(
        self, project_id: str, user_id: str, *, command_id: str | None = None
    ) -> None:
        await self._channel.send(
            projects.RemoveMember(project_id=project_id, user_id=user_id, **_keyed(command_id))
        )

    async def get_members(self, project_id: str) -> list[Member]:
        if await self.get_project(project_id) is None:
            raise NotFound("project", project_id)
        async with self._channel.read() as conn:
            rows = await MEMBERS_Q.list(
                conn, {"project_id": project_id}, order_by=["added_at"], limit=None
            )
        return Member.from_table_rows(rows)

    async def get_project_statistics(self, project_id: str) -> ProjectStatistics:
        if await self.get_project(project_id) is None:
            raise NotFound("project", project_id)
        now = self._now()
        async with self._channel.read() as conn:
            with telemetry.read(conn, project_stats.name, "get"):
                row = (
                    (
                        await conn.execute(
                            select(project_stats).where(project_stats.c.project_id == project_id)
                        )
                    )
                    .mappings()
                    .first()
                )
            with telemetry.read(conn, tasks_table.name, "count"):
                overdue = await conn.scalar(
                    select(func.count())
                    .select_from(tasks_table)
                    .where(
                        tasks_table.c.project_id == project_id,
                        tasks_table.c.status.in_([s.value for s in OPEN_STATUSES]),
                        tasks_table.c.due_at < now,
                    )
                )
        by_status = {s.value: int(row[s.value]) if row else 0 for s in tasks.TaskStatus}
        total = int(row["total"]) if row else 0
        counted = total - by_status[tasks.TaskStatus.CANCELLED.value]
        rate = by_status[tasks.TaskStatus.DONE.value] / counted if counted else None
        return ProjectStatistics(
            project_id=project_id,
            total=total,
            by_status=by_status,
            completion_rate=rate,
            overdue=int(overdue or 0),
        )


class TaskRepository(_Repository):
    async def _visible(self, conn: AsyncConnection) -> ColumnElement[bool]:
        return _visible_tasks(self.actor_id, await self._reads_all(conn))

    async def _project_of(self, task_id: str) -> str:
        """The project a task command names. Not in the read model (a deleted task, or
        one a worker has not projected yet), it comes from the task's ``TaskCreated``:
        the write side then decides (``NotFound`` for a deleted task) or, for a resent
        ``command_id``, returns the first outcome. An id no task can have (not an entity
        id: a NUL, a lone surrogate, too long) is ``NotFound`` without a query."""
        if not _is_entity_id(task_id):
            raise NotFound("task", task_id if isinstance(task_id, str) else None)
        async with self._channel.read() as conn:
            with telemetry.read(conn, tasks_table.name, "get"):
                project_id = await conn.scalar(_PROJECT_OF_TASK, {"task_id": task_id})
            if project_id is None:
                with telemetry.read(conn, "events", "stream"):
                    first = await self._channel.service.store.read_stream(
                        conn, tasks.stream_id(task_id), limit=1
                    )
                if first and first[0].event_type == tasks.TaskCreated.event_type:
                    project_id = first[0].data.get("project_id")
        if project_id is None:
            raise NotFound("task", task_id)
        return str(project_id)

    async def create_task(
        self,
        project_id: str,
        title: str,
        description: str = "",
        *,
        priority: str = "medium",
        due_date: datetime | None = None,
        assignee_id: str | None = None,
        task_id: str | None = None,
        command_id: str | None = None,
    ) -> Task:
        command = tasks.CreateTask(
            project_id=project_id,
            title=title,
            description=description,
            priority=priority,
            due_date=due_date,
            assignee_id=assignee_id,
            **({"task_id": task_id} if task_id is not None else {}),
            **_keyed(command_id),
        )
        result = await self._channel.send(command)
        task_id = _entity_id(result)
        return _created(await self.get_task(task_id), "task", task_id)

    async def get_task(self, task_id: str) -> Task | None:
        if not _is_entity_id(task_id):
            return None
        async with self._channel.read() as conn:
            row = await TASKS_Q.get(conn, task_id, where=await self._visible(conn))
        return Task.from_row(row) if row is not None else None

    async def edit_task(
        self, task_id: str, *, command_id: str | None = None, **fields: Any
    ) -> Task | None:
        await self._channel.send(
            tasks.EditTask(
                task_id=task_id,
                project_id=await self._project_of(task_id),
                **fields,
                **_keyed(command_id),
            )
        )
        return await self.get_task(task_id)

    async def assign_task(
        self, task_id: str, user_id: str, *, command_id: str | None = None
    ) -> Task | None:
        await self._channel.send(await self._assign_command(task_id, user_id, _keyed(command_id)))
        return await self.get_task(task_id)

    async def _assign_command(
        self, task_id: str, user_id: str, key: dict[str, str]
    ) -> tasks.AssignTask:
        project_id = await self._project_of(task_id)
        return tasks.AssignTask(task_id=task_id, project_id=project_id, assignee_id=user_id, **key)

    async def unassign_task(self, task_id: str, *, command_id: str | None = None) -> Task | None:
        await self._channel.send(
            tasks.UnassignTask(
                task_id=task_id, project_id=await self._project_of(task_id), **_keyed(command_id)
            )
        )
        return await self.get_task(task_id)

    async def update_task_status(
        self, task_id: str, status: str, *, command_id: str | None = None
    ) -> Task | None:
        await self._channel.send(await self._status_command(task_id, status, _keyed(command_id)))
        return await self.get_task(task_id)

    async def _status_command(
        self, task_id: str, status: str, key: dict[str, str]
    ) -> tasks.ChangeTaskStatus:
        project_id = await self._project_of(task_id)
        return tasks.ChangeTaskStatus(task_id=task_id, project_id=project_id, to=status, **key)

    async def delete_task(self, task_id: str, *, command_id: str | None = None) -> None:
        """Delete the task (``TaskDeleted``; anyone who may write the project's tasks):
        it leaves the read models, its history stays in the log, and every later
        command on it is refused with ``NotFound``."""
        await self._channel.send(await self._delete_command(task_id, _keyed(command_id)))

    async def _delete_command(self, task_id: str, key: dict[str, str]) -> tasks.DeleteTask:
        project_id = await self._project_of(task_id)
        return tasks.DeleteTask(task_id=task_id, project_id=project_id, **key)

    async def list_tasks(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        order_by: Sequence[str] | None = ("created_at",),
        limit: int | None = 100,
        offset: int | None = None,
        where: ColumnElement[bool] | None = None,
    ) -> list[Task]:
        async with self._channel.read() as conn:
            condition = await self._visible(conn)
            if where is not None:
                condition = and_(condition, where)
            rows = await TASKS_Q.list(
                conn, filters, where=condition, order_by=order_by, limit=limit, offset=offset
            )
        return Task.from_table_rows(rows)

    async def page_tasks(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        order_by: Sequence[str] = ("created_at",),
        after: str | None = None,
        limit: int = 100,
    ) -> Page[Task]:
        async with self._channel.read() as conn:
            visible = await self._visible(conn)
            rows = await TASKS_Q.page(
                conn, filters, order_by=order_by, after=after, limit=limit, where=visible
            )
        return Page(Task.from_table_rows(rows.items), rows.next_cursor)

    async def count_tasks(self, filters: Mapping[str, Any] | None = None) -> int:
        async with self._channel.read() as conn:
            visible = await self._visible(conn)
            return await TASKS_Q.count(conn, filters, where=visible)

    async def get_project_tasks(
        self, project_id: str, status: str | None = None, **options: Any
    ) -> list[Task]:
        filters: dict[str, Any] = {"project_id": project_id}
        if status is not None:
            filters["status"] = status
        return await self.list_tasks(filters, **options)

    async def get_user_tasks(
        self, user_id: str | None = None, status: str | None = None, **options: Any
    ) -> list[Task]:
        filters: dict[str, Any] = {"assignee_id": user_id or self.actor_id}
        if status is not None:
            filters["status"] = status
        return await self.list_tasks(filters, **options)

    async def get_overdue_tasks(self, project_id: str | None = None, **options: Any) -> list[Task]:
        filters: dict[str, Any] = {
            "due_at__lt": self._now(),
            "status__in": [s.value for s in OPEN_STATUSES],
        }
        if project_id is not None:
            filters["project_id"] = project_id
        return await self.list_tasks(filters, order_by=["due_at"], **options)

    async def get_due_soon_tasks(
        self, within: timedelta = timedelta(days=3), project_id: str | None = None, **options: Any
    ) -> list[Task]:
        now = self._now()
        if not timedelta(0) <= within <= _MAX_WITHIN:
            raise InvalidCommand("within", f"must be within 0..{_MAX_WITHIN.days} days")
        filters: dict[str, Any] = {
            "due_at__between": (now, now + within),
            "status__in": [s.value for s in OPEN_STATUSES],
        }
        if project_id is not None:
            filters["project_id"] = project_id
        return await self.list_tasks(filters, order_by=["due_at"], **options)

    # -- bulk: many commands, one transaction, all or nothing ------------------------
    # ``command_id`` is one key per call: item i's command gets
    # derived_command_id(command_id, i), so a resent call returns the first outcome.

    async def create_tasks(
        self, items: Sequence[Mapping[str, Any]], *, command_id: str | None = None
    ) -> list[Task | None]:
        """Create several tasks (each item: ``create_task``'s keyword arguments) in one
        transaction, all or none; ``command_id`` is one key for the whole call."""

        async def work(channel: Channel) -> list[str]:
            ids = []
            for index, item in enumerate(items):
                command = tasks.CreateTask(**{**item, **_item_key(command_id, index)})
                result = await _bulk_step(index, command.task_id, channel, command)
                ids.append(_entity_id(result))
            return ids

        ids = await self._channel.bulk(work)
        return [await self.get_task(i) for i in ids]

    async def bulk_update_task_status(
        self, task_ids: Iterable[str], status: str, *, command_id: str | None = None
    ) -> int:
        """Move several tasks to ``status`` in one transaction, all or none
        (``BulkOperationError`` names the refused item); ``command_id`` is one key for
        the whole call. Returns how many."""
        return await self._bulk(
            task_ids, command_id, lambda repo, t, key: repo._status_command(t, status, key)
        )

    async def bulk_assign(
        self, task_ids: Iterable[str], user_id: str, *, command_id: str | None = None
    ) -> int:
        """Assign several tasks to ``user_id`` in one transaction, all or none;
        ``command_id`` is one key for the whole call. Returns how many."""
        return await self._bulk(
            task_ids, command_id, lambda repo, t, key: repo._assign_command(t, user_id, key)
        )

    async def bulk_delete_tasks(
        self, task_ids: Iterable[str], *, command_id: str | None = None
    ) -> int:
        """Delete several tasks (see :meth:`delete_task`) in one transaction, all or
        none; ``command_id`` is one key for the whole call. Returns how many."""
        return await self._bulk(
            task_ids, command_id, lambda repo, t, key: repo._delete_command(t, key)
        )

    async def _bulk(
        self,
        task_ids: Iterable[str],
        command_id: str | None,
        build: Callable[[TaskRepository, str, dict[str, str]], Awaitable[Command]],
    ) -> int:
        """One command per task, built by ``build`` (item ``index`` keyed from
        ``command_id``), all in one transaction; returns how many."""

        async def work(channel: Channel) -> int:
            repo = TaskRepository(channel)
            count = 0
            for index, task_id in enumerate(task_ids):
                command = await _bulk_command(
                    index, task_id, build(repo, task_id, _item_key(command_id, index))
                )
                await _bulk_step(index, task_id, channel, command)
                count += 1
            return count

        return await self._channel.bulk(work)


async def _bulk_command(index: int, item: str, build: Awaitable[C]) -> C:
    """The command of a bulk item, whose building may refuse it (an unknown task)."""
    try:
        return await build
    except DomainError as error:
        raise BulkOperationError(index, item, error) from error


async def _bulk_step(
    index: int, item: str, channel: Channel, command: Command, *, actor_id: str | None = None
) -> CommandResult:
    try:
        return await channel.send(command, actor_id=actor_id)
    except DomainError as error:
        raise BulkOperationError(index, item, error, command) from error


class SessionRepository(_Repository):
    async def create_session(
        self, email: str, password: str, *, command_id: str | None = None
    ) -> NewSession:
        """Authenticate, then start a session; the token is returned once. A resent
        ``command_id`` answers a refused login with the first refusal (and counts no
        second failure); after a session was started it raises ``AlreadyExists``
        naming the session, since its token cannot be shown again."""
        user = await UserRepository(self._channel).authenticate(
            email, password, **_item_key(command_id, "login")
        )
        token = secrets.token_urlsafe(32)  # 256 bits
        command = sessions.StartSession(
            user_id=user.user_id, token=SecretStr(token), **_item_key(command_id, "session")
        )
        result = await self._channel.send(command, actor_id=user.user_id)
        if result.duplicate:
            raise AlreadyExists("session", _entity_id(result))
        session = await self.get_session(command.session_id)
        assert session is not None
        return NewSession(token=token, session=session, user=user)

    async def get_session(self, session_id: str) -> Session | None:
        async with self._channel.read() as conn:
            row = await SESSIONS_Q.get(conn, session_id)
        return Session.from_row(row) if row is not None else None

    async def validate_session(self, token: str, *, touch: bool = True) -> SessionValidation:
        """Who the token belongs to and what they may do, or why it is refused
        (``unknown``, ``revoked``, ``expired``, ``idle``, ``inactive``). Activity is
        recorded at most once per ``session_touch_interval``. With the Redis session
        cache, a refusal is answered from Redis alone (see :meth:`check_token`)."""
        service = self._channel.service
        now = service.now()
        token_hash = hash_token(token)
        answered, cached = await self._cached(token_hash)
        if answered:
            if cached is None:
                return SessionValidation(valid=False, reason="unknown")
            refused = cached.refusal(now)
            if refused is not None:
                view = Session(
                    session_id=cached.session_id,
                    user_id=cached.user_id,
                    started_at=cached.started_at,
                    expires_at=cached.expires_at,
                    last_seen_at=cached.last_seen_at,
                    revoked_at=cached.revoked_at,
                    revoked_reason=cached.revoked_reason,
                )
                return SessionValidation(valid=False, reason=refused, session=view)
        policy = service.policy
        async with self._channel.read() as conn:
            # The session and its user in one statement (they were two round trips).
            with telemetry.read(conn, sessions_table.name, "get_with_user"):
                found = (
                    (await conn.execute(_SESSION_AND_USER, {"token_hash": token_hash}))
                    .mappings()
                    .first()
                )
            if found is None:
                return SessionValidation(valid=False, reason="unknown")
            row, user_row = _session_and_user(found)
            permissions = await self._channel.permissions_of(conn, row["user_id"])
            user = await _with_roles(conn, user_row) if user_row is not None else None
        session = Session.from_row(row)
        reason = _refusal(row, user_row, now, policy)
        if reason is not None:
            return SessionValidation(valid=False, reason=reason, session=session)
        if touch and now - row["last_seen_at"] >= policy.session_touch_interval:
            await self._channel.send(
                sessions.TouchSession(session_id=row["session_id"], user_id=row["user_id"]),
                actor_id=row["user_id"],
            )
        return SessionValidation(valid=True, user=user, permissions=permissions, session=session)

    async def check_token(self, token: str) -> TokenCheck:
        """Whom ``token`` acts for, or why it may not (``unknown``, ``revoked``,
        ``expired``, ``idle``, ``inactive``): the hot path of a request, without the
        user's row or permissions and without recording activity.

        With ``redis_url`` set it is answered from the Redis session cache, one round
        trip, whenever the cache has reached the head this process has seen committed;
        otherwise, and whenever Redis fails, from the SQL read model. A revoked session
        is therefore never accepted: a revocation is in Redis before its command
        returns, or Redis is behind the head this process knows and SQL answers."""
        service = self._channel.service
        now = service.now()
        token_hash = hash_token(token)
        answered, cached = await self._cached(token_hash)
        if answered:
            if cached is None:
                return TokenCheck(valid=False, reason="unknown", source="redis")
            reason = cached.refusal(now)
            return TokenCheck(
                valid=reason is None,
                reason=reason,
                user_id=cached.user_id,
                session_id=cached.session_id,
                expires_at=cached.expires_at,
                source="redis",
            )
        async with self._channel.read() as conn:
            with telemetry.read(conn, sessions_table.name, "get_with_user"):
                found = (
                    (await conn.execute(_SESSION_AND_USER, {"token_hash": token_hash}))
                    .mappings()
                    .first()
                )
        if found is None:
            return TokenCheck(valid=False, reason="unknown", source="sql")
        row, user_row = _session_and_user(found)
        reason = _refusal(row, user_row, now, service.policy)
        return TokenCheck(
            valid=reason is None,
            reason=reason,
            user_id=row["user_id"],
            session_id=row["session_id"],
            expires_at=row["expires_at"],
            source="sql",
        )

    async def _cached(self, token_hash: str) -> tuple[bool, CachedSession | None]:
        """``(answered, session)`` from the Redis cache. It answers only when configured,
        reachable and at least at the head this process has seen committed; inside a
        unit of work, reads must see its own writes, so SQL answers."""
        service = self._channel.service
        cache = service.session_cache
        if cache is None or self._channel.unit is not None:
            return False, None
        from projections.redis_sessions import CACHE_ERRORS  # noqa: PLC0415  # optional extra

        try:
            session, checkpoint = await cache.lookup(token_hash)
        except CACHE_ERRORS:
            return False, None
        if checkpoint < service.store.dialect.known_head:
            return False, None
        return True, session

    async def touch(self, session_id: str, *, command_id: str | None = None) -> None:
        session = await self.get_session(session_id)
        if session is None:
            raise NotFound("session", session_id)
        await self._channel.send(
            sessions.TouchSession(
                session_id=session_id, user_id=session.user_id, **_keyed(command_id)
            ),
            actor_id=self.actor_id or session.user_id,
        )

    async def revoke(self, session_id: str, *, command_id: str | None = None) -> None:
        command = await self._revoke_command(session_id, _keyed(command_id))
        await self._channel.send(command, actor_id=self.actor_id or command.user_id)

    async def _revoke_command(self, session_id: str, key: dict[str, str]) -> sessions.RevokeSession:
        session = await self.get_session(session_id)
        if session is None:
            raise NotFound("session", session_id)
        return sessions.RevokeSession(session_id=session_id, user_id=session.user_id, **key)

    async def revoke_all(self, user_id: str, *, command_id: str | None = None) -> None:
        await self._channel.send(
            users.RevokeAllSessions(user_id=user_id, **_keyed(command_id)),
            actor_id=self.actor_id or user_id,
        )

    async def bulk_revoke_sessions(
        self, session_ids: Iterable[str], *, command_id: str | None = None
    ) -> int:
        """Revoke several sessions in one transaction, all or none; ``command_id`` is one
        key for the whole call."""

        async def work(channel: Channel) -> int:
            repo = SessionRepository(channel)
            count = 0
            for index, session_id in enumerate(session_ids):
                command = await _bulk_command(
                    index,
                    session_id,
                    repo._revoke_command(session_id, _item_key(command_id, index)),
                )
                # As revoke: without an actor, the session's own user revokes it.
                actor = self.actor_id or command.user_id
                await _bulk_step(index, session_id, channel, command, actor_id=actor)
                count += 1
            return count

        return await self._channel.bulk(work)

    async def get_user_sessions(self, user_id: str, *, active_only: bool = True) -> list[Session]:
        filters: dict[str, Any] = {"user_id": user_id}
        if active_only:
            filters["revoked_at__isnull"] = True
            filters["expires_at__gt"] = self._now()
        async with self._channel.read() as conn:
            rows = await SESSIONS_Q.list(conn, filters, order_by=["-started_at"], limit=None)
        return Session.from_table_rows(rows)

    async def cleanup_expired_sessions(self, *, command_id: str | None = None) -> int:
        """Revoke (as the system) sessions past their absolute or idle expiry that are
        still open; returns how many. Rows stay in the read model: the log is history.
        With ``command_id`` (one key per call), a resent call revokes nothing twice."""
        policy = self._channel.service.policy
        now = self._now()
        async with self._channel.read() as conn:
            with telemetry.read(conn, sessions_table.name, "expired"):
                rows = await conn.execute(
                    select(sessions_table.c.session_id, sessions_table.c.user_id).where(
                        sessions_table.c.revoked_at.is_(None),
                        or_(
                            sessions_table.c.expires_at <= now,
                            sessions_table.c.last_seen_at <= now - policy.session_idle_timeout,
                        ),
                    )
                )
                expired = rows.all()
        if not expired:
            return 0

        async def work(channel: Channel) -> int:
            for row in expired:
                await channel.send(
                    sessions.RevokeSession(
                        session_id=row.session_id,
                        user_id=row.user_id,
                        **_item_key(command_id, row.session_id),
                    ),
                    actor_id=SYSTEM_ACTOR,
                )
            return len(expired)

        return await self._channel.batch(work)


class AuditRepository(_Repository):
    """Queries straight off the event log; needs ``audit:read`` unless acting as the system."""

    async def _require(self, query: str) -> None:
        if Permission.AUDIT_READ in await self._channel.actor_permissions():
            return
        error = PermissionDenied(self.actor_id, "read", "the audit log")
        # In its own transaction: the denial stays in the log whatever the caller does.
        await self._channel.service.dispatcher.record_rejection(
            audit.ReadAuditLog(query=query[:500]), error, self._channel.context()
        )
        raise error

    async def log_action(
        self,
        action: str,
        resource_type: str,
        resource_id: str | None = None,
        details: Mapping[str, Any] | None = None,
        *,
        actor_id: str | None = None,
        command_id: str | None = None,
    ) -> CommandResult:
        """Record an action outside the domain model (an export, a download) in the log."""
        return await self._channel.send(
            audit.LogAction(
                action=action,
                resource_type=resource_type,
                resource_id=resource_id,
                details=dict(details or {}),
                **_keyed(command_id),
            ),
            actor_id=actor_id,
        )

    async def archive(
        self, *, before: datetime, output: str | Path | None = None
    ) -> retention.ArchiveReport:
        """Retention, as ``tiu audit archive`` does it: move security events recorded
        before ``before`` to a gzip JSONL file (``output``, default
        ``tiu-security-before-<cutoff>.jsonl.gz`` in the working directory), then
        remove them from the log in one transaction that appends an ``AuditArchived``
        record naming the actor (``tiu verify`` accepts exactly those holes). Each
        stream keeps its newest event. Needs ``audit:read`` (or the system actor), and a
        database role that may delete from ``events`` (the owner; the least-privilege
        role of ``sql/app_role.sql`` gets ``RetentionError``, and nothing changes)."""
        path = _archive_path(output)
        await self._require(f"archive before {before.isoformat()}")
        store = self._channel.service.store
        try:
            with translate_errors(store.dialect.database_label):
                return await retention.archive(
                    store,
                    before=before,
                    output=path,
                    category=ARCHIVABLE_CATEGORY,
                    actor_id=self.actor_id,
                )
        except DBAPIError as error:
            if sqlstate(error) != _PG_INSUFFICIENT_PRIVILEGE:
                raise
            raise retention.RetentionError(
                "this database role may not remove events (the least-privilege role of "
                "sql/app_role.sql); run retention as the schema's owner"
            ) from error

    async def get_events(
        self,
        *,
        actor_id: str | None = None,
        stream_id: str | None = None,
        category: str | None = None,
        event_types: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        correlation_id: str | None = None,
        limit: int = 100,
        newest_first: bool = True,
    ) -> list[AuditEntry]:
        where = audit_queries.AuditFilter(
            actor_id, stream_id, category, tuple(event_types or ()), since, until, correlation_id
        )
        await self._require(where.describe())
        async with self._channel.read(streamed=True) as conn:
            return await audit_queries.query(
                conn, where, limit=max(1, min(limit, 10_000)), newest_first=newest_first
            )

    async def failed(
        self,
        *,
        actor_id: str | None = None,
        stream_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        event_types: Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Security failures (``LoginRejected``, ``CommandRejected``, ``LoginFailed``,
        ``AccountLocked``), newest first; ``event_types`` narrows them further."""
        where = audit_queries.AuditFilter(
            actor_id, stream_id, None, tuple(event_types or ()), since, until
        ).narrowed(audit_queries.FAILED_TYPES)
        await self._require(f"failed {where.describe()}")
        async with self._channel.read(streamed=True) as conn:
            return await audit_queries.query(conn, where, limit=limit)

    async def suspicious(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        rules: audit_queries.SuspiciousRules | None = None,
    ) -> list[audit_queries.Finding]:
        """Findings of the suspicious-login rules (see :mod:`tiu.audit`)."""
        where = audit_queries.AuditFilter(since=since, until=until)
        await self._require(f"suspicious {where.describe()}")
        async with self._channel.read(streamed=True) as conn:
            return await audit_queries.suspicious(
                conn, where, rules or audit_queries.SuspiciousRules()
            )

    async def stats(
        self,
        *,
        actor_id: str | None = None,
        stream_id: str | None = None,
        category: str | None = None,
        event_types: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        correlation_id: str | None = None,
    ) -> audit_queries.AuditStats:
        """Counts by event type and by UTC day of the matching events."""
        where = audit_queries.AuditFilter(
            actor_id, stream_id, category, tuple(event_types or ()), since, until, correlation_id
        )
        await self._require(f"stats {where.describe()}")
        async with self._channel.read() as conn:
            return await audit_queries.stats(conn, where)


def _archive_path(output: object) -> Path | None:
    """The archive file a caller named, if the file system can take the name: a NUL
    failed as ValueError, a lone surrogate as UnicodeEncodeError, where the file was
    opened."""
    if output is None:
        return None
    if not isinstance(output, str | PurePath):
        raise InvalidCommand(
            "output", f"must be a str or Path or None, not {type(output).__name__}"
        )
    path = Path(output)
    try:
        name = os.fsencode(path)
    except UnicodeEncodeError:
        name = b"\0"
    if b"\0" in name:
        raise InvalidCommand("output", "must be a file name without NUL or lone surrogates")
    return path


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Repositories:
    """The repositories of one caller; from ``DatabaseService.get_repositories()``."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def as_actor(self, actor_id: str | None) -> Repositories:
        """The same channel (and transaction, inside ``execute_in_transaction``) acting
        as another user: e.g. a user registered a moment ago creating a project."""
        caller = self._channel.caller
        channel = Channel(
            self._channel.service,
            Caller(actor_id, caller.ip, caller.user_agent, caller.correlation_id),
            self._channel.unit,
        )
        return Repositories(channel)

    def get_user_repository(self) -> UserRepository:
        return UserRepository(self._channel)

    def get_project_repository(self) -> ProjectRepository:
        return ProjectRepository(self._channel)

    def get_task_repository(self) -> TaskRepository:
        return TaskRepository(self._channel)

    def get_session_repository(self) -> SessionRepository:
        return SessionRepository(self._channel)

    def get_audit_repository(self) -> AuditRepository:
        return AuditRepository(self._channel)

    @property
    def users(self) -> UserRepository:
        return self.get_user_repository()

    @property
    def projects(self) -> ProjectRepository:
        return self.get_project_repository()

    @property
    def tasks(self) -> TaskRepository:
        return self.get_task_repository()

    @property
    def sessions(self) -> SessionRepository:
        return self.get_session_repository()

    @property
    def audit(self) -> AuditRepository:
        return self.get_audit_repository()
