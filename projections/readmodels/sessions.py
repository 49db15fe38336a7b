"""The ``sessions`` read model: one row per session, found by its token's SHA-256.

Besides a session's own revocation, the user-wide revocations (password change,
deactivation, revoke-all) mark every session the user started before them as revoked,
with the reason, so that validating a token needs this table alone. Idle and absolute
expiry depend on "now" and the policy and are decided by the reader
(``domain.sessions.session_status``). The login's IP and user agent are copied
(``ip``, ``user_agent``); forgetting the user (``UserForgotten``) sets them to
``domain.base.ERASED``, as a replay after the erasure reads them from the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import ClassVar

from sqlalchemy import (
    Column,
    ColumnElement,
    Index,
    String,
    Table,
    Text,
    and_,
    case,
    insert,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import sessions, users
from domain.base import ERASED
from eventstore.types import UTCDateTime
from projections.batching import BatchedProjector, KeyedRows, field, keys_param
from projections.projector import Envelope, Tables, metadata
from projections.readmodels._common import ID_LENGTH, occurred_at


class RevokedReason(StrEnum):
    """Why ``revoked_at`` is set."""

    LOGOUT = "logout"
    """The session's own user revoked it."""
    REVOKED = "revoked"
    """Someone else (an admin) revoked it."""
    PASSWORD_CHANGED = "password_changed"  # noqa: S105 -- a reason, not a secret
    PASSWORD_RESET = "password_reset"  # noqa: S105 -- a reason, not a secret
    USER_DEACTIVATED = "user_deactivated"
    ALL_SESSIONS_REVOKED = "all_sessions_revoked"
    USER_FORGOTTEN = "user_forgotten"


sessions_table = Table(
    "sessions",
    metadata,
    Column("session_id", String(ID_LENGTH), primary_key=True),
    Column("user_id", String(ID_LENGTH), nullable=False),
    Column("token_hash", String(64), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime),
    Column("revoked_by", String(ID_LENGTH)),
    Column("revoked_reason", String(50)),
    Column("ip", Text),
    Column("user_agent", Text),
    Index(None, "token_hash", unique=True),
    Index(None, "user_id", "started_at"),
    Index(None, "expires_at"),
    Index(None, "last_seen_at"),
)


class SessionsProjector(BatchedProjector):
    name = "sessions"
    version = 2  # v2: ip, user_agent
    tables: ClassVar = (sessions_table,)
    handles = frozenset(
        cls.event_type
        for cls in (
            sessions.SessionStarted,
            sessions.SessionTouched,
            sessions.SessionRevoked,
            users.PasswordChanged,
            users.UserDeactivated,
            users.UserSessionsRevoked,
            users.UserForgotten,
        )
    )
    # A user-wide revocation finds the user's sessions by user_id.
    rebuild_indexes = frozenset({("user_id", "started_at")})

    async def apply(self, conn: AsyncConnection, envelope: Envelope, t: Tables) -> None:
        table = t["sessions"]
        at = occurred_at(envelope)
        event = envelope.event
        match event:
            case sessions.SessionStarted():
                await conn.execute(
                    insert(table).values(
                        session_id=event.session_id,
                        user_id=event.user_id,
                        token_hash=event.token_hash,
                        started_at=event.started_at,
                        expires_at=event.expires_at,
                        last_seen_at=event.started_at,
                        revoked_at=None,
                        revoked_by=None,
                        revoked_reason=None,
                        ip=event.ip,
                        user_agent=event.user_agent,
                    )
                )
            case sessions.SessionTouched():
                await conn.execute(
                    update(table)
                    .where(table.c.session_id == event.session_id)
                    .values(last_seen_at=event.at)
                )
            case sessions.SessionRevoked():
                reason = (
                    RevokedReason.LOGOUT if event.by == event.user_id else RevokedReason.REVOKED
                )
                await conn.execute(
                    update(table)
                    .where(table.c.session_id == event.session_id, table.c.revoked_at.is_(None))
                    .values(revoked_at=event.at, revoked_by=event.by, revoked_reason=str(reason))
                )
            case users.PasswordChanged():
                reason = (
                    RevokedReason.PASSWORD_RESET
                    if event.via == "reset"
                    else RevokedReason.PASSWORD_CHANGED
                )
                await _revoke_all(conn, t, event.user_id, at, by=event.user_id, reason=reason)
            case users.UserDeactivated():
                await _revoke_all(
                    conn, t, event.user_id, at, by=event.by, reason=RevokedReason.USER_DEACTIVATED
                )
            case users.UserSessionsRevoked():
                await _revoke_all(
                    conn,
                    t,
                    event.user_id,
                    at,
                    by=event.by,
                    reason=RevokedReason.ALL_SESSIONS_REVOKED,
                )
            case users.UserForgotten():
                await _revoke_all(
                    conn, t, event.user_id, at, by=event.by, reason=RevokedReason.USER_FORGOTTEN
                )
                await conn.execute(
                    update(table)
                    .where(table.c.user_id == event.user_id)
                    .values(
                        ip=case((table.c.ip.is_(None), None), else_=ERASED),
                        user_agent=case((table.c.user_agent.is_(None), None), else_=ERASED),
                    )
                )

    async def fold(self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables) -> None:
        table = t["sessions"]
        rows = KeyedRows(table, load=("user_id", "started_at", "revoked_at", "ip", "user_agent"))
        revoking: set[str] = set()
        forgotten: set[str] = set()
        for envelope in envelopes:
            event = envelope.event
            if isinstance(event, _SESSION_EVENTS):
                rows.want(event.session_id)
            else:
                revoking.add(field(envelope, "user_id"))
                if isinstance(event, users.UserForgotten):
                    forgotten.add(event.user_id)
        await rows.load(conn)
        # A user-wide revocation revokes the user's live sessions started before it:
        # load those by user (sessions already revoked stay as they are). Forgetting
        # erases the IP and user agent of every session of the user: load them all.
        await rows.load_by(conn, "live_by_user", _live_by_user, revoking)
        await rows.load_by(conn, "by_user", _by_user, forgotten)
        by_user: dict[str, list[str]] = {u: [] for u in revoking}
        for found in rows.rows():
            if found["user_id"] in by_user:
                by_user[found["user_id"]].append(found["session_id"])

        def revoke_all(user_id: str, at: datetime, by: str, reason: RevokedReason) -> None:
            for session_id in by_user[user_id]:
                row = rows.get(session_id)
                if row is not None and row["started_at"] < at and row["revoked_at"] is None:
                    rows.update(
                        session_id, revoked_at=at, revoked_by=by, revoked_reason=str(reason)
                    )

        for envelope in envelopes:
            at = occurred_at(envelope)
            event = envelope.event
            match event:
                case sessions.SessionStarted():
                    rows.insert(
                        {
                            "session_id": event.session_id,
                            "user_id": event.user_id,
                            "token_hash": event.token_hash,
                            "started_at": event.started_at,
                            "expires_at": event.expires_at,
                            "last_seen_at": event.started_at,
                            "revoked_at": None,
                            "revoked_by": None,
                            "revoked_reason": None,
                            "ip": event.ip,
                            "user_agent": event.user_agent,
                        }
                    )
                    if event.user_id in by_user:
                        by_user[event.user_id].append(event.session_id)
                case sessions.SessionTouched():
                    rows.update(event.session_id, last_seen_at=event.at)
                case sessions.SessionRevoked():
                    row = rows.get(event.session_id)
                    if row is not None and row["revoked_at"] is None:
                        reason = (
                            RevokedReason.LOGOUT
                            if event.by == event.user_id
                            else RevokedReason.REVOKED
                        )
                        rows.update(
                            event.session_id,
                            revoked_at=event.at,
                            revoked_by=event.by,
                            revoked_reason=str(reason),
                        )
                case users.PasswordChanged():
                    reason = (
                        RevokedReason.PASSWORD_RESET
                        if event.via == "reset"
                        else RevokedReason.PASSWORD_CHANGED
                    )
                    revoke_all(event.user_id, at, event.user_id, reason)
                case users.UserDeactivated():
                    revoke_all(event.user_id, at, event.by, RevokedReason.USER_DEACTIVATED)
                case users.UserSessionsRevoked():
                    revoke_all(event.user_id, at, event.by, RevokedReason.ALL_SESSIONS_REVOKED)
                case users.UserForgotten():
                    revoke_all(event.user_id, at, event.by, RevokedReason.USER_FORGOTTEN)
                    for session_id in by_user[event.user_id]:
                        row = rows.get(session_id)
                        if row is not None:
                            rows.update(
                                session_id,
                                ip=None if row["ip"] is None else ERASED,
                                user_agent=None if row["user_agent"] is None else ERASED,
                            )
        await rows.flush(conn)


_SESSION_EVENTS = (sessions.SessionStarted, sessions.SessionTouched, sessions.SessionRevoked)


def _by_user(table: Table) -> ColumnElement[bool]:
    return table.c.user_id.in_(keys_param())


def _live_by_user(table: Table) -> ColumnElement[bool]:
    return and_(table.c.user_id.in_(keys_param()), table.c.revoked_at.is_(None))


async def _revoke_all(
    conn: AsyncConnection,
    t: Tables,
    user_id: str,
    at: datetime,
    *,
    by: str,
    reason: RevokedReason,
) -> None:
    """Revoke the user's live sessions started before ``at`` (as ``sessions_valid_after``)."""
    table = t["sessions"]
    await conn.execute(
        update(table)
        .where(
            table.c.user_id == user_id,
            table.c.started_at < at,
            table.c.revoked_at.is_(None),
        )
        .values(revoked_at=at, revoked_by=by, revoked_reason=str(reason))
    )
