"""The session decider: start, touch (sliding idle expiry) and revoke.

Stream ``session-<session_id>``. The session's user state comes as
``related["user"]`` (for ``sessions_valid_after`` and activation), the acting user as
``related["actor"]``. The caller generates the token with ``secrets`` and must issue
``StartSession`` only right after a successful ``AttemptLogin``; events keep only the
token's SHA-256.

A session is valid until the first of: its absolute ``expires_at`` (start +
``session_lifetime``), ``session_idle_timeout`` without a touch, its own revocation,
or the user's ``sessions_valid_after`` (password change, deactivation, revoke-all)
moving past its start. Touches are throttled to one event per
``session_touch_interval`` so that validating a busy session does not flood the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr

from domain import errors, users
from domain.base import (
    EMPTY,
    Command,
    CommandContext,
    EntityId,
    Event,
    SecurityPolicy,
    new_id,
)
from domain.passwords import hash_token
from domain.permissions import Permission

CATEGORY: Final = "session"

SessionStatus = Literal["active", "expired", "idle", "revoked", "unknown"]


def stream_id(entity_id: str) -> str:
    return f"{CATEGORY}-{entity_id}"


# --- events -------------------------------------------------------------------------


class SessionStarted(Event):
    event_type = "SessionStarted"
    personal_fields = frozenset({"ip", "user_agent"})
    subject_field = "user_id"

    session_id: EntityId
    user_id: EntityId
    token_hash: str
    started_at: AwareDatetime
    expires_at: AwareDatetime
    ip: str | None
    user_agent: str | None


class SessionTouched(Event):
    event_type = "SessionTouched"

    session_id: EntityId
    user_id: EntityId
    at: AwareDatetime


class SessionRevoked(Event):
    event_type = "SessionRevoked"

    session_id: EntityId
    user_id: EntityId
    by: str
    at: AwareDatetime


# --- commands -----------------------------------------------------------------------


class StartSession(Command):
    session_id: EntityId = Field(default_factory=new_id)
    user_id: EntityId
    token: SecretStr


class TouchSession(Command):
    """Validate the session and record activity; the caller resolved ``session_id`` and
    ``user_id`` from the token's hash."""

    session_id: EntityId
    user_id: EntityId


class RevokeSession(Command):
    """By the session's own user (logout) or a holder of ``sessions:manage``."""

    session_id: EntityId
    user_id: EntityId


# --- state --------------------------------------------------------------------------


class State(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    started: bool = False
    session_id: str | None = None
    user_id: str | None = None
    token_hash: str | None = None
    started_at: datetime | None = None
    expires_at: datetime | None = None
    last_seen_at: datetime | None = None
    revoked_at: datetime | None = None


def initial_state() -> State:
    return State()


def evolve(state: State, event: Event) -> State:
    match event:
        case SessionStarted():
            return State(
                started=True,
                session_id=event.session_id,
                user_id=event.user_id,
                token_hash=event.token_hash,
                started_at=event.started_at,
                expires_at=event.expires_at,
                last_seen_at=event.started_at,
            )
        case SessionTouched():
            return state.model_copy(update={"last_seen_at": event.at})
        case SessionRevoked():
            return state.model_copy(update={"revoked_at": event.at})
        case _:
            return state


def session_status(
    state: State,
    user_sessions_valid_after: datetime | None,
    now: datetime,
    policy: SecurityPolicy,
) -> SessionStatus:
    """Whether the session may be used at ``now``; revocation wins over expiry."""
    if (
        not state.started
        or state.started_at is None
        or state.expires_at is None
        or state.last_seen_at is None
    ):
        return "unknown"
    if state.revoked_at is not None or (
        user_sessions_valid_after is not None and state.started_at < user_sessions_valid_after
    ):
        return "revoked"
    if now >= state.expires_at:
        return "expired"
    if now - state.last_seen_at >= policy.session_idle_timeout:
        return "idle"
    return "active"


# --- decide -------------------------------------------------------------------------


def _user(related: Mapping[str, Any], user_id: str) -> users.State | None:
    user = related.get("user")
    if isinstance(user, users.State) and user.registered and user.user_id == user_id:
        return user
    return None


def decide(
    command: Command, state: State, ctx: CommandContext, related: Mapping[str, Any] = EMPTY
) -> list[Event]:
    match command:
        case StartSession():
            if state.started:
                raise errors.AlreadyExists("session", command.session_id)
            user = _user(related, command.user_id)
            if user is None:
                raise errors.NotFound("user", command.user_id)
            if not user.active:
                raise errors.AccountInactive(command.user_id)
            if user.locked_until is not None and user.is_locked(ctx.now):
                raise errors.AccountLocked(user.locked_until)
            token = command.token.get_secret_value()
            if len(token) < users.MIN_TOKEN_LENGTH:
                raise errors.InvalidCommand(
                    "token", f"must have at least {users.MIN_TOKEN_LENGTH} characters"
                )
            return [
                SessionStarted(
                    session_id=command.session_id,
                    user_id=command.user_id,
                    token_hash=hash_token(token),
                    started_at=ctx.now,
                    expires_at=ctx.now + ctx.policy.session_lifetime,
                    ip=ctx.ip,
                    user_agent=ctx.user_agent,
                )
            ]

        case TouchSession():
            if state.user_id != command.user_id:
                raise errors.SessionInvalid("unknown")
            user = _user(related, command.user_id)
            if user is None or not user.active:
                raise errors.SessionInvalid("revoked")
            status = session_status(state, user.sessions_valid_after, ctx.now, ctx.policy)
            if status != "active":
                raise errors.SessionInvalid(status)
            assert state.last_seen_at is not None
            if ctx.now - state.last_seen_at < ctx.policy.session_touch_interval:
                return []
            return [
                SessionTouched(session_id=command.session_id, user_id=command.user_id, at=ctx.now)
            ]

        case RevokeSession():
            if not state.started or state.user_id != command.user_id:
                raise errors.NotFound("session", command.session_id)
            if ctx.actor_id != state.user_id:
                users.require(
                    Permission.SESSIONS_MANAGE,
                    ctx,
                    related,
                    "revoke",
                    f"session {command.session_id}",
                )
            if state.revoked_at is not None:
                return []
            assert ctx.actor_id is not None  # the checks above refuse anonymous actors
            return [
                SessionRevoked(
                    session_id=command.session_id,
                    user_id=command.user_id,
                    by=ctx.actor_id,
                    at=ctx.now,
                )
            ]

        case _:
            raise TypeError(f"sessions.decide cannot handle {type(command).__name__}")
