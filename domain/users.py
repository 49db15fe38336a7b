"""The user decider: registration, login with lockout, passwords and their reset,
roles, activation and the revocation of all of a user's sessions.

Stream ``user-<user_id>``. Commands acting on another user take the acting user's
state as ``related["actor"]``. Email and username uniqueness is not decided here: the
events imply unique-key claims (``domain.routing.claims``) that the store enforces.

Deciders never hash: a decision that needs a password verified or hashed raises
``PasswordWorkNeeded``, and the dispatcher computes it off the event loop and decides
again with the outcomes in ``ctx.passwords``. Login for an unknown account still asks
for one verification (against the hasher's dummy hash) and answers exactly like a
wrong password. A wrong password is refused but
its ``LoginFailed`` is recorded (``DomainError.record``); reaching
``lockout_threshold`` failures within ``lockout_window`` also records
``AccountLocked``. A lock expires on its own or is lifted by an admin or a password
reset. ``sessions_valid_after`` moves on a password change, a deactivation or an
explicit revocation; sessions started before it are invalid.

``ForgetUser`` (users:manage, or the system) records ``UserForgotten``: the dispatcher
then destroys the user's data keys, so every personal field of theirs in the log
decodes as erased, and frees their email and username. A forgotten user's stream
refuses every later command with ``SubjectForgotten``; forgetting again is a no-op.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr

from domain import errors
from domain.base import (
    EMPTY,
    MAX_TRACKED_FAILURES,
    Command,
    CommandContext,
    EntityId,
    Event,
    clean_text,
    new_id,
    register_upcaster,
)
from domain.passwords import NewHash, Verify, check_password_strength, hash_token
from domain.permissions import SYSTEM_ACTOR, Permission, Role, permissions_for

CATEGORY: Final = "user"
UNKNOWN_USER: Final = "_unknown"
"""Stream id suffix used for a login whose email matched no user; never registered,
since ids must start with a letter or digit."""

MIN_TOKEN_LENGTH: Final = 22  # 128 bits in URL-safe base64
DISPLAY_NAME_MAX: Final = 100

_USERNAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,31}$")
_EMAIL_LOCAL_RE: Final = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$"
)
_DOMAIN_LABEL_RE: Final = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def stream_id(entity_id: str) -> str:
    return f"{CATEGORY}-{entity_id}"


# --- events -------------------------------------------------------------------------


class UserRegistered(Event):
    """v2 renamed v1's ``name`` to ``display_name`` and made it optional."""

    event_type = "UserRegistered"
    schema_version = 2
    personal_fields = frozenset({"email", "username", "display_name", "password_hash"})
    subject_field = "user_id"

    user_id: EntityId
    email: str
    username: str
    display_name: str | None
    password_hash: str
    roles: tuple[Role, ...]
    at: AwareDatetime


@register_upcaster("UserRegistered", 1)
def _user_registered_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    lifted = {k: v for k, v in data.items() if k != "name"}
    lifted["display_name"] = data.get("name") or None
    return lifted


class LoginSucceeded(Event):
    event_type = "LoginSucceeded"
    personal_fields = frozenset({"ip", "user_agent"})
    subject_field = "user_id"

    user_id: EntityId
    at: AwareDatetime
    ip: str | None
    user_agent: str | None


class LoginFailed(Event):
    event_type = "LoginFailed"
    personal_fields = frozenset({"ip", "user_agent"})
    subject_field = "user_id"

    user_id: EntityId
    at: AwareDatetime
    ip: str | None
    user_agent: str | None


class AccountLocked(Event):
    event_type = "AccountLocked"

    user_id: EntityId
    until: AwareDatetime
    failed_attempts: int


class AccountUnlocked(Event):
    event_type = "AccountUnlocked"

    user_id: EntityId
    by: str
    at: AwareDatetime


class PasswordChanged(Event):
    """Also revokes every session the user started before ``at``; ``via="reset"``
    also lifts a lockout."""

    event_type = "PasswordChanged"
    personal_fields = frozenset({"password_hash"})
    subject_field = "user_id"

    user_id: EntityId
    password_hash: str
    via: Literal["change", "reset"]
    at: AwareDatetime


class PasswordResetRequested(Event):
    event_type = "PasswordResetRequested"

    user_id: EntityId
    token_hash: str
    expires_at: AwareDatetime


class RoleAssigned(Event):
    event_type = "RoleAssigned"

    user_id: EntityId
    role: Role
    by: str


class RoleRevoked(Event):
    event_type = "RoleRevoked"

    user_id: EntityId
    role: Role
    by: str


class UserDeactivated(Event):
    """Also revokes every session the user started before ``at``."""

    event_type = "UserDeactivated"

    user_id: EntityId
    by: str
    at: AwareDatetime


class UserReactivated(Event):
    event_type = "UserReactivated"

    user_id: EntityId
    by: str
    at: AwareDatetime


class UserSessionsRevoked(Event):
    event_type = "UserSessionsRevoked"

    user_id: EntityId
    by: str
    at: AwareDatetime


class EmailChanged(Event):
    """Carries the previous email so its unique-key claim can be released."""

    event_type = "EmailChanged"
    personal_fields = frozenset({"previous_email", "email"})
    subject_field = "user_id"

    user_id: EntityId
    previous_email: str
    email: str
    by: str


class UserForgotten(Event):
    """The user's personal data is erased (right to erasure): their keys are destroyed,
    their unique keys freed and their sessions revoked. Ids, times and hashes remain."""

    event_type = "UserForgotten"

    user_id: EntityId
    by: str
    at: AwareDatetime


# --- commands -----------------------------------------------------------------------


class RegisterUser(Command):
    """Self-registration may ask for member/viewer; ``admin`` needs users:manage."""

    user_id: EntityId = Field(default_factory=new_id)
    email: str
    username: str
    password: SecretStr
    display_name: str | None = None
    roles: tuple[Role, ...] = (Role.MEMBER,)


class AttemptLogin(Command):
    """``user_id`` is whoever the login email resolved to, None if nobody."""

    user_id: EntityId | None
    password: SecretStr


class ChangePassword(Command):
    user_id: EntityId
    old_password: SecretStr
    new_password: SecretStr


class RequestPasswordReset(Command):
    """``token`` is generated by the caller (``secrets``) and mailed; only its hash is
    stored."""

    user_id: EntityId
    token: SecretStr


class CompletePasswordReset(Command):
    user_id: EntityId
    token: SecretStr
    new_password: SecretStr


class AssignRole(Command):
    user_id: EntityId
    role: Role


class RevokeRole(Command):
    user_id: EntityId
    role: Role


class DeactivateUser(Command):
    user_id: EntityId


class ReactivateUser(Command):
    user_id: EntityId


class UnlockUser(Command):
    user_id: EntityId


class RevokeAllSessions(Command):
    user_id: EntityId


class ChangeEmail(Command):
    """Changing one's own email requires the current ``password``; an admin needs none."""

    user_id: EntityId
    new_email: str
    password: SecretStr | None = None


class ForgetUser(Command):
    """Erase the user's personal data; needs users:manage (or the system actor)."""

    user_id: EntityId


class RotateUserKey(Command):
    """Not decided (keys are not domain state): named in the security stream when a
    key rotation is refused."""

    user_id: EntityId


# --- state --------------------------------------------------------------------------


class State(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    registered: bool = False
    user_id: str | None = None
    email: str | None = None
    username: str | None = None
    display_name: str | None = None
    password_hash: str | None = None
    roles: frozenset[Role] = frozenset()
    active: bool = False
    failed_logins: tuple[datetime, ...] = ()
    """Times of failed logins since the last success, lock or unlock (newest last)."""
    locked_until: datetime | None = None
    last_login_at: datetime | None = None
    sessions_valid_after: datetime | None = None
    reset_token_hash: str | None = None
    reset_expires_at: datetime | None = None
    forgotten: bool = False

    def is_locked(self, now: datetime) -> bool:
        return self.locked_until is not None and self.locked_until > now


def initial_state() -> State:
    return State()


def _revoke_sessions(state: State, at: datetime) -> datetime:
    current = state.sessions_valid_after
    return at if current is None else max(current, at)


def evolve(state: State, event: Event) -> State:
    match event:
        case UserRegistered():
            return State(
                registered=True,
                user_id=event.user_id,
                email=event.email,
                username=event.username,
                display_name=event.display_name,
                password_hash=event.password_hash,
                roles=frozenset(event.roles),
                active=True,
            )
        case LoginSucceeded():
            return state.model_copy(
                update={"failed_logins": (), "locked_until": None, "last_login_at": event.at}
            )
        case LoginFailed():
            failures = (*state.failed_logins, event.at)[-MAX_TRACKED_FAILURES:]
            return state.model_copy(update={"failed_logins": failures})
        case AccountLocked():
            return state.model_copy(update={"failed_logins": (), "locked_until": event.until})
        case AccountUnlocked():
            return state.model_copy(update={"failed_logins": (), "locked_until": None})
        case PasswordChanged():
            update: dict[str, Any] = {
                "password_hash": event.password_hash,
                "sessions_valid_after": _revoke_sessions(state, event.at),
                "reset_token_hash": None,
                "reset_expires_at": None,
            }
            if event.via == "reset":
                update |= {"failed_logins": (), "locked_until": None}
            return state.model_copy(update=update)
        case PasswordResetRequested():
            return state.model_copy(
                update={"reset_token_hash": event.token_hash, "reset_expires_at": event.expires_at}
            )
        case RoleAssigned():
            return state.model_copy(update={"roles": state.roles | {event.role}})
        case RoleRevoked():
            return state.model_copy(update={"roles": state.roles - {event.role}})
        case UserDeactivated():
            return state.model_copy(
                update={"active": False, "sessions_valid_after": _revoke_sessions(state, event.at)}
            )
        case UserReactivated():
            return state.model_copy(update={"active": True})
        case UserSessionsRevoked():
            return state.model_copy(
                update={"sessions_valid_after": _revoke_sessions(state, event.at)}
            )
        case EmailChanged():
            return state.model_copy(update={"email": event.email})
        case UserForgotten():
            return state.model_copy(
                update={
                    "forgotten": True,
                    "active": False,
                    "email": None,
                    "username": None,
                    "display_name": None,
                    "password_hash": None,
                    "reset_token_hash": None,
                    "reset_expires_at": None,
                    "sessions_valid_after": _revoke_sessions(state, event.at),
                }
            )
        case _:
            return state


# --- validation and keys ------------------------------------------------------------


def normalize_email(raw: str) -> str:
    """Strip and lower-case the domain; raise ``InvalidCommand`` if it is not a plain
    ``local@domain.tld`` address (ASCII dot-atom local part, IDNA-valid domain)."""
    email = raw.strip()
    local, at, domain = email.rpartition("@")
    domain = domain.lower()
    if not at or not _EMAIL_LOCAL_RE.fullmatch(local) or len(local) > 64 or len(email) > 254:
        raise errors.InvalidCommand("email", "must look like name@example.org")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise errors.InvalidCommand("email", "has an invalid domain") from None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or labels[-1].isdigit() or not all(map(_DOMAIN_LABEL_RE.fullmatch, labels)):
        raise errors.InvalidCommand("email", "has an invalid domain")
    return f"{local}@{domain}"


def validate_username(raw: str) -> str:
    username = raw.strip()
    if not _USERNAME_RE.fullmatch(username):
        raise errors.InvalidCommand(
            "username",
            "must be 3-32 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return username


def email_claim_key(email: str) -> str:
    """Unique key of an email (raw or normalised): SHA-256 of its case-folded form."""
    return hash_token(email.strip().casefold())


def username_claim_key(username: str) -> str:
    """Unique key of a username: SHA-256 of its case-folded form."""
    return hash_token(username.strip().casefold())


# --- actors -------------------------------------------------------------------------


def acting_user(
    ctx: CommandContext, related: Mapping[str, Any]
) -> tuple[str | None, frozenset[Role]]:
    """``(actor id, roles)`` of the acting user, read from ``related["actor"]`` (a user
    State). Anonymous, unknown or deactivated actors are ``(None, {})``;
    ``SYSTEM_ACTOR`` holds every role."""
    if ctx.actor_id == SYSTEM_ACTOR:
        return SYSTEM_ACTOR, frozenset(Role)
    actor = related.get("actor")
    if (
        ctx.actor_id is None
        or not isinstance(actor, State)
        or not actor.active
        or actor.user_id != ctx.actor_id
    ):
        return None, frozenset()
    return ctx.actor_id, actor.roles


def actor_permissions(ctx: CommandContext, related: Mapping[str, Any]) -> frozenset[Permission]:
    """Permissions of the acting user (see ``acting_user``)."""
    return permissions_for(acting_user(ctx, related)[1])


def require(
    permission: Permission,
    ctx: CommandContext,
    related: Mapping[str, Any],
    action: str,
    resource: str,
) -> None:
    """Raise ``PermissionDenied`` unless the actor holds ``permission``."""
    if permission not in actor_permissions(ctx, related):
        raise errors.PermissionDenied(ctx.actor_id, action, resource)


def _require_self_or(
    permission: Permission,
    user_id: str,
    ctx: CommandContext,
    related: Mapping[str, Any],
    action: str,
) -> None:
    if ctx.actor_id != user_id:
        require(permission, ctx, related, action, f"user {user_id}")


def _registered(state: State, user_id: str) -> State:
    if not state.registered:
        raise errors.NotFound("user", user_id)
    return state


def _login_failure(state: State, ctx: CommandContext) -> tuple[Event, ...]:
    assert state.user_id is not None
    failed = LoginFailed(user_id=state.user_id, at=ctx.now, ip=ctx.ip, user_agent=ctx.user_agent)
    window_start = ctx.now - ctx.policy.lockout_window
    attempts = sum(1 for at in state.failed_logins if at > window_start) + 1
    if attempts < ctx.policy.lockout_threshold:
        return (failed,)
    until = ctx.now + ctx.policy.lockout_duration
    return failed, AccountLocked(user_id=state.user_id, until=until, failed_attempts=attempts)


def _authenticate(state: State, field: str, ctx: CommandContext) -> None:
    """Refuse a locked account, then check the command's password ``field`` against
    the stored hash, recording a failure."""
    assert state.password_hash is not None
    if state.locked_until is not None and state.is_locked(ctx.now):
        raise errors.AccountLocked(state.locked_until)
    if not ctx.passwords.matches(field, state.password_hash):
        raise errors.InvalidCredentials(record=_login_failure(state, ctx))


def _new_password(password: SecretStr, state: State, ctx: CommandContext, *, field: str) -> str:
    """Policy-check the replacement password in the command's ``field`` (it must also
    differ from the current one); its hash."""
    assert state.password_hash is not None
    plain = password.get_secret_value()
    reasons: list[str] = []
    try:
        check_password_strength(
            plain, username=state.username, email=state.email, policy=ctx.policy
        )
    except errors.WeakPassword as weak:
        reasons.extend(weak.reasons)
    current = Verify(field, state.password_hash)
    # A strong password will be hashed: ask for both at once (one trip off the loop).
    ctx.passwords.require(current, *([] if reasons else [NewHash(field)]))
    if ctx.passwords.matches(field, state.password_hash):
        reasons.append("must differ from the current password")
    if reasons:
        raise errors.WeakPassword(reasons, field=field)
    return ctx.passwords.hash_of(field)


def _actor(ctx: CommandContext) -> str:
    return ctx.actor_id or SYSTEM_ACTOR


# --- decide -------------------------------------------------------------------------


def decide(
    command: Command, state: State, ctx: CommandContext, related: Mapping[str, Any] = EMPTY
) -> list[Event]:
    if state.forgotten and not isinstance(command, RegisterUser | AttemptLogin | ForgetUser):
        raise errors.SubjectForgotten("user", state.user_id)
    match command:
        case RegisterUser():
            return _register(command, state, ctx, related)

        case AttemptLogin():
            if (
                command.user_id is None
                or not state.registered
                or state.forgotten
                or state.user_id != command.user_id
            ):
                # Same bcrypt work and the same answer as a wrong password.
                ctx.passwords.matches("password", None)
                raise errors.InvalidCredentials()
            _authenticate(state, "password", ctx)
            if not state.active:
                raise errors.AccountInactive(command.user_id)
            return [
                LoginSucceeded(
                    user_id=command.user_id, at=ctx.now, ip=ctx.ip, user_agent=ctx.user_agent
                )
            ]

        case ChangePassword():
            if ctx.actor_id != command.user_id:
                raise errors.PermissionDenied(
                    ctx.actor_id, "change the password of", f"user {command.user_id}"
                )
            _registered(state, command.user_id)
            if not state.active:
                raise errors.AccountInactive(command.user_id)
            _authenticate(state, "old_password", ctx)
            password_hash = _new_password(command.new_password, state, ctx, field="new_password")
            return [
                PasswordChanged(
                    user_id=command.user_id, password_hash=password_hash, via="change", at=ctx.now
                )
            ]

        case RequestPasswordReset():
            _registered(state, command.user_id)
            if not state.active:
                raise errors.AccountInactive(command.user_id)
            token = command.token.get_secret_value()
            if len(token) < MIN_TOKEN_LENGTH:
                raise errors.InvalidCommand(
                    "token", f"must have at least {MIN_TOKEN_LENGTH} characters"
                )
            return [
                PasswordResetRequested(
                    user_id=command.user_id,
                    token_hash=hash_token(token),
                    expires_at=ctx.now + ctx.policy.password_reset_ttl,
                )
            ]

        case CompletePasswordReset():
            presented = hash_token(command.token.get_secret_value())
            if (
                not state.registered
                or state.reset_token_hash is None
                or not hmac.compare_digest(presented, state.reset_token_hash)
            ):
                raise errors.ResetTokenInvalid("unknown")
            if state.reset_expires_at is None or ctx.now >= state.reset_expires_at:
                raise errors.ResetTokenInvalid("expired")
            if not state.active:
                raise errors.AccountInactive(command.user_id)
            password_hash = _new_password(command.new_password, state, ctx, field="new_password")
            return [
                PasswordChanged(
                    user_id=command.user_id, password_hash=password_hash, via="reset", at=ctx.now
                )
            ]

        case AssignRole():
            require(
                Permission.USERS_MANAGE, ctx, related, "assign roles to", f"user {command.user_id}"
            )
            _registered(state, command.user_id)
            if command.role in state.roles:
                return []
            return [RoleAssigned(user_id=command.user_id, role=command.role, by=_actor(ctx))]

        case RevokeRole():
            require(
                Permission.USERS_MANAGE, ctx, related, "revoke roles of", f"user {command.user_id}"
            )
            _registered(state, command.user_id)
            if command.role not in state.roles:
                return []
            if command.role is Role.ADMIN and ctx.actor_id == command.user_id:
                raise errors.Conflict("an admin cannot revoke their own admin role")
            return [RoleRevoked(user_id=command.user_id, role=command.role, by=_actor(ctx))]

        case DeactivateUser():
            require(Permission.USERS_MANAGE, ctx, related, "deactivate", f"user {command.user_id}")
            _registered(state, command.user_id)
            if ctx.actor_id == command.user_id:
                raise errors.Conflict("an admin cannot deactivate their own account")
            if not state.active:
                return []
            return [UserDeactivated(user_id=command.user_id, by=_actor(ctx), at=ctx.now)]

        case ReactivateUser():
            require(Permission.USERS_MANAGE, ctx, related, "reactivate", f"user {command.user_id}")
            _registered(state, command.user_id)
            if state.active:
                return []
            return [UserReactivated(user_id=command.user_id, by=_actor(ctx), at=ctx.now)]

        case UnlockUser():
            require(Permission.USERS_MANAGE, ctx, related, "unlock", f"user {command.user_id}")
            _registered(state, command.user_id)
            if not state.is_locked(ctx.now) and not state.failed_logins:
                return []
            return [AccountUnlocked(user_id=command.user_id, by=_actor(ctx), at=ctx.now)]

        case RevokeAllSessions():
            _require_self_or(
                Permission.SESSIONS_MANAGE, command.user_id, ctx, related, "revoke sessions of"
            )
            _registered(state, command.user_id)
            return [UserSessionsRevoked(user_id=command.user_id, by=_actor(ctx), at=ctx.now)]

        case ChangeEmail():
            _require_self_or(
                Permission.USERS_MANAGE, command.user_id, ctx, related, "change the email of"
            )
            _registered(state, command.user_id)
            assert state.email is not None
            if ctx.actor_id == command.user_id:
                if command.password is None:
                    raise errors.InvalidCommand("password", "is required to change your own email")
                _authenticate(state, "password", ctx)
            email = normalize_email(command.new_email)
            if email == state.email:
                return []
            return [
                EmailChanged(
                    user_id=command.user_id,
                    previous_email=state.email,
                    email=email,
                    by=_actor(ctx),
                )
            ]

        case ForgetUser():
            require(Permission.USERS_MANAGE, ctx, related, "forget", f"user {command.user_id}")
            _registered(state, command.user_id)
            if state.forgotten:
                return []
            if ctx.actor_id == command.user_id:
                raise errors.Conflict("an admin cannot forget their own account")
            return [UserForgotten(user_id=command.user_id, by=_actor(ctx), at=ctx.now)]

        case _:
            raise TypeError(f"users.decide cannot handle {type(command).__name__}")


def _register(
    command: RegisterUser, state: State, ctx: CommandContext, related: Mapping[str, Any]
) -> list[Event]:
    if Role.ADMIN in command.roles:
        require(Permission.USERS_MANAGE, ctx, related, "register", "an admin user")
    if state.registered:
        raise errors.AlreadyExists("user", command.user_id)
    email = normalize_email(command.email)
    username = validate_username(command.username)
    display_name = None
    if command.display_name is not None:
        text = clean_text(
            command.display_name, "display_name", max_length=DISPLAY_NAME_MAX, required=False
        )
        display_name = text or None
    password = command.password.get_secret_value()
    check_password_strength(password, username=username, email=email, policy=ctx.policy)
    return [
        UserRegistered(
            user_id=command.user_id,
            email=email,
            username=username,
            display_name=display_name,
            password_hash=ctx.passwords.hash_of("password"),
            roles=tuple(sorted(set(command.roles))),
            at=ctx.now,
        )
    ]
