"""The ``users`` read model: one row per account, its roles and the permissions they grant.

No password hash and no reset-token hash is ever copied here: credentials are checked
against the user's stream. ``email_lower`` and ``username_lower`` hold the casefolded
values that the write side's unique-key claims use, so lookups are case-insensitive;
uniqueness itself is enforced by those claims, not by these indexes.

``UserForgotten`` replaces every personal column of the user's row with
``domain.base.ERASED`` (ids, roles and times stay), so the live tables and a replay
(where the destroyed keys decode as erased anyway) end up the same.
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
    Integer,
    String,
    Table,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import users
from domain.base import ERASED
from domain.permissions import permissions_for
from eventstore.types import UTCDateTime
from projections.batching import BatchedProjector, KeyedRows, field, keys_param
from projections.projector import Envelope, Tables, metadata
from projections.readmodels._common import ID_LENGTH, occurred_at

users_table = Table(
    "users",
    metadata,
    Column("user_id", String(ID_LENGTH), primary_key=True),
    Column("email", String(254), nullable=False),
    Column("email_lower", String(254), nullable=False),
    Column("username", String(32), nullable=False),
    Column("username_lower", String(32), nullable=False),
    Column("display_name", String(100)),
    Column("active", Boolean, nullable=False),
    Column("locked_until", UTCDateTime),
    # Failures since the last success, lock, unlock or reset, as the decider counts them.
    Column("failed_logins", Integer, nullable=False),
    Column("last_login_at", UTCDateTime),
    Column("sessions_valid_after", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index(None, "email_lower"),
    Index(None, "username_lower"),
    Index(None, "created_at"),
)

user_roles = Table(
    "user_roles",
    metadata,
    Column("user_id", String(ID_LENGTH), primary_key=True),
    Column("role", String(20), primary_key=True),
    Index(None, "role"),
)

user_permissions = Table(
    "user_permissions",
    metadata,
    Column("user_id", String(ID_LENGTH), primary_key=True),
    Column("permission", String(50), primary_key=True),
    Index(None, "permission"),
)

#: The personal columns a forgotten user's row keeps only as ERASED (live and replayed).
_FORGOTTEN = dict.fromkeys(
    ("email", "email_lower", "username", "username_lower", "display_name"), ERASED
)


def lookup_key(value: str) -> str:
    """The value stored in ``email_lower`` / ``username_lower`` for ``value``."""
    return value.strip().casefold()


class UsersProjector(BatchedProjector):
    name = "users"
    tables: ClassVar = (users_table, user_roles, user_permissions)
    handles = frozenset(
        cls.event_type
        for cls in (
            users.UserRegistered,
            users.LoginSucceeded,
            users.LoginFailed,
            users.AccountLocked,
            users.AccountUnlocked,
            users.PasswordChanged,
            users.RoleAssigned,
            users.RoleRevoked,
            users.UserDeactivated,
            users.UserReactivated,
            users.UserSessionsRevoked,
            users.EmailChanged,
            users.UserForgotten,
        )
    )

    async def apply(self, conn: AsyncConnection, envelope: Envelope, t: Tables) -> None:
        at = occurred_at(envelope)
        event = envelope.event
        match event:
            case users.UserRegistered():
                await conn.execute(
                    insert(t["users"]).values(
                        user_id=event.user_id,
                        email=event.email,
                        email_lower=lookup_key(event.email),
                        username=event.username,
                        username_lower=lookup_key(event.username),
                        display_name=event.display_name,
                        active=True,
                        locked_until=None,
                        failed_logins=0,
                        last_login_at=None,
                        sessions_valid_after=None,
                        created_at=at,
                        updated_at=at,
                    )
                )
                if event.roles:
                    await conn.execute(
                        insert(t["user_roles"]),
                        [{"user_id": event.user_id, "role": str(r)} for r in set(event.roles)],
                    )
                await self._derive_permissions(conn, event.user_id, t)
            case users.LoginSucceeded():
                await self._update(
                    conn, t, event.user_id, at, failed_logins=0, locked_until=None, last_login_at=at
                )
            case users.LoginFailed():
                column = t["users"].c.failed_logins
                await self._update(conn, t, event.user_id, at, failed_logins=column + 1)
            case users.AccountLocked():
                await self._update(
                    conn, t, event.user_id, at, failed_logins=0, locked_until=event.until
                )
            case users.AccountUnlocked():
                await self._update(conn, t, event.user_id, at, failed_logins=0, locked_until=None)
            case users.PasswordChanged():
                unlock = {"failed_logins": 0, "locked_until": None} if event.via == "reset" else {}
                await self._revoke_sessions(conn, t, event.user_id, at, **unlock)
            case users.UserDeactivated():
                await self._revoke_sessions(conn, t, event.user_id, at, active=False)
            case users.UserSessionsRevoked():
                await self._revoke_sessions(conn, t, event.user_id, at)
            case users.UserReactivated():
                await self._update(conn, t, event.user_id, at, active=True)
            case users.EmailChanged():
                await self._update(
                    conn,
                    t,
                    event.user_id,
                    at,
                    email=event.email,
                    email_lower=lookup_key(event.email),
                )
            case users.UserForgotten():
                await self._revoke_sessions(
                    conn,
                    t,
                    event.user_id,
                    at,
                    active=False,
                    **_FORGOTTEN,
                )
            case users.RoleAssigned():
                await conn.execute(
                    insert(t["user_roles"]).values(user_id=event.user_id, role=str(event.role))
                )
                await self._derive_permissions(conn, event.user_id, t)
                await self._update(conn, t, event.user_id, at)
            case users.RoleRevoked():
                roles = t["user_roles"]
                await conn.execute(
                    delete(roles).where(
                        roles.c.user_id == event.user_id, roles.c.role == str(event.role)
                    )
                )
                await self._derive_permissions(conn, event.user_id, t)
                await self._update(conn, t, event.user_id, at)

    @staticmethod
    async def _update(
        conn: AsyncConnection, t: Tables, user_id: str, at: datetime, **values: Any
    ) -> None:
        table = t["users"]
        await conn.execute(
            update(table).where(table.c.user_id == user_id).values(updated_at=at, **values)
        )

    async def _revoke_sessions(
        self, conn: AsyncConnection, t: Tables, user_id: str, at: datetime, **values: Any
    ) -> None:
        """Move ``sessions_valid_after`` forward to ``at`` (never back), as the decider does."""
        table = t["users"]
        current = (
            await conn.execute(
                select(table.c.sessions_valid_after).where(table.c.user_id == user_id)
            )
        ).scalar_one_or_none()
        valid_after = at if current is None else max(current, at)
        await self._update(conn, t, user_id, at, sessions_valid_after=valid_after, **values)

    @staticmethod
    async def _derive_permissions(conn: AsyncConnection, user_id: str, t: Tables) -> None:
        roles, granted = t["user_roles"], t["user_permissions"]
        held = (
            await conn.execute(select(roles.c.role).where(roles.c.user_id == user_id))
        ).scalars()
        permissions = sorted(permissions_for(held))
        await conn.execute(delete(granted).where(granted.c.user_id == user_id))
        if permissions:
            await conn.execute(
                insert(granted),
                [{"user_id": user_id, "permission": str(p)} for p in permissions],
            )

    async def fold(self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables) -> None:
        rows = KeyedRows(t["users"], load=("failed_logins", "sessions_valid_after"))
        roles = KeyedRows(t["user_roles"])
        granted = KeyedRows(t["user_permissions"])
        role_users: set[str] = set()
        for envelope in envelopes:
            user_id = field(envelope, "user_id")
            rows.want(user_id)
            if isinstance(envelope.event, _ROLE_EVENTS):
                role_users.add(user_id)
        await rows.load(conn)
        # Permissions are derived from all of a user's roles: load those by user.
        await roles.load_by(conn, "by_user", _by_user, role_users)
        await granted.load_by(conn, "by_user", _by_user, role_users)
        held: dict[str, set[str]] = {u: set() for u in role_users}
        for found in roles.rows():
            held[found["user_id"]].add(found["role"])
        permitted: dict[str, set[str]] = {u: set() for u in role_users}
        for found in granted.rows():
            permitted[found["user_id"]].add(found["permission"])

        def derive_permissions(user_id: str) -> None:
            wanted = {str(p) for p in permissions_for(held[user_id])}
            for permission in permitted[user_id] - wanted:
                granted.delete((user_id, permission))
            for permission in sorted(wanted - permitted[user_id]):
                granted.insert({"user_id": user_id, "permission": permission})
            permitted[user_id] = wanted

        def revoke_sessions(user_id: str, at: datetime, **values: Any) -> None:
            row = rows.get(user_id)
            if row is not None:
                current = row["sessions_valid_after"]
                valid_after = at if current is None else max(current, at)
                rows.update(user_id, updated_at=at, sessions_valid_after=valid_after, **values)

        for envelope in envelopes:
            at = occurred_at(envelope)
            event = envelope.event
            match event:
                case users.UserRegistered():
                    rows.insert(
                        {
                            "user_id": event.user_id,
                            "email": event.email,
                            "email_lower": lookup_key(event.email),
                            "username": event.username,
                            "username_lower": lookup_key(event.username),
                            "display_name": event.display_name,
                            "active": True,
                            "locked_until": None,
                            "failed_logins": 0,
                            "last_login_at": None,
                            "sessions_valid_after": None,
                            "created_at": at,
                            "updated_at": at,
                        }
                    )
                    for role in {str(r) for r in event.roles}:
                        roles.insert({"user_id": event.user_id, "role": role})
                        held[event.user_id].add(role)
                    derive_permissions(event.user_id)
                case users.LoginSucceeded():
                    rows.update(
                        event.user_id,
                        updated_at=at,
                        failed_logins=0,
                        locked_until=None,
                        last_login_at=at,
                    )
                case users.LoginFailed():
                    row = rows.get(event.user_id)
                    if row is not None:
                        rows.update(
                            event.user_id, updated_at=at, failed_logins=row["failed_logins"] + 1
                        )
                case users.AccountLocked():
                    rows.update(
                        event.user_id, updated_at=at, failed_logins=0, locked_until=event.until
                    )
                case users.AccountUnlocked():
                    rows.update(event.user_id, updated_at=at, failed_logins=0, locked_until=None)
                case users.PasswordChanged():
                    unlock = (
                        {"failed_logins": 0, "locked_until": None} if event.via == "reset" else {}
                    )
                    revoke_sessions(event.user_id, at, **unlock)
                case users.UserDeactivated():
                    revoke_sessions(event.user_id, at, active=False)
                case users.UserSessionsRevoked():
                    revoke_sessions(event.user_id, at)
                case users.UserReactivated():
                    rows.update(event.user_id, updated_at=at, active=True)
                case users.EmailChanged():
                    rows.update(
                        event.user_id,
                        updated_at=at,
                        email=event.email,
                        email_lower=lookup_key(event.email),
                    )
                case users.UserForgotten():
                    revoke_sessions(
                        event.user_id,
                        at,
                        active=False,
                        **_FORGOTTEN,
                    )
                case users.RoleAssigned():
                    roles.insert({"user_id": event.user_id, "role": str(event.role)})
                    held[event.user_id].add(str(event.role))
                    derive_permissions(event.user_id)
                    rows.update(event.user_id, updated_at=at)
                case users.RoleRevoked():
                    roles.delete((event.user_id, str(event.role)))
                    held[event.user_id].discard(str(event.role))
                    derive_permissions(event.user_id)
                    rows.update(event.user_id, updated_at=at)
        await rows.flush(conn)
        await roles.flush(conn)
        await granted.flush(conn)


_ROLE_EVENTS = (users.UserRegistered, users.RoleAssigned, users.RoleRevoked)


def _by_user(table: Table) -> ColumnElement[bool]:
    return table.c.user_id.in_(keys_param())
