"""Typed refusals raised by the deciders.

Every error carries structured fields besides its message, a stable ``code`` for
callers and logs, and ``security_relevant`` telling the dispatcher to append an audit
event to the actor's security stream (see ``domain.security.rejection_event``).

``record`` holds events that must still be appended to the command's own stream even
though the command is refused: a wrong password refuses the login, yet the
``LoginFailed`` fact is stored so that lockout counting is exact under concurrency.

    DomainError
    ├── InvalidCommand(field, reason)
    │   └── WeakPassword(reasons)
    ├── AuthenticationError                      (security relevant)
    │   ├── InvalidCredentials
    │   ├── AccountLocked(until)
    │   ├── AccountInactive(user_id)
    │   ├── SessionInvalid(reason)
    │   └── ResetTokenInvalid(reason)
    ├── PermissionDenied(actor_id, action, resource)   (security relevant)
    ├── NotFound(kind, id)
    │   └── SubjectForgotten(kind, id)
    ├── Conflict(reason)
    │   ├── AlreadyExists(kind, id)
    │   └── IllegalTransition(from_status, to_status)
    └── UnknownEventType(event_type, schema_version, reason)
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from domain.base import Event

SessionInvalidReason = Literal["expired", "idle", "revoked", "unknown"]
ResetTokenInvalidReason = Literal["expired", "unknown"]


#: How much of a caller's value a message repeats (an id of 5 MB stays out of logs).
SHOWN_CHARS = 80


def shown(value: object) -> str:
    """``repr(value)``, cut to :data:`SHOWN_CHARS` characters with ``...`` when longer."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[: SHOWN_CHARS - 3]}..."


class DomainError(Exception):
    """Root of every refusal a decider raises."""

    code: ClassVar[str] = "domain_error"
    security_relevant: ClassVar[bool] = False
    record: tuple[Event, ...] = ()

    def __init__(self, message: str, *, record: Iterable[Event] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.record = tuple(record)


class InvalidCommand(DomainError):
    """A command field is malformed or breaks a rule that needs no stored state."""

    code = "invalid_command"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid {field}: {reason}")
        self.field = field
        self.reason = reason


class WeakPassword(InvalidCommand):
    """The new password breaks the password policy; ``reasons`` lists every problem."""

    code = "weak_password"

    def __init__(self, reasons: Iterable[str], field: str = "password") -> None:
        self.reasons = tuple(reasons)
        super().__init__(field, "; ".join(self.reasons))
        self.message = f"{field} is too weak: {'; '.join(self.reasons)}"
        self.args = (self.message,)


class AuthenticationError(DomainError):
    """Who the caller claims to be could not be established or is not allowed in."""

    code = "authentication_error"
    security_relevant = True


class InvalidCredentials(AuthenticationError):
    """Unknown account or wrong password: one message for both, so emails cannot be
    enumerated."""

    code = "invalid_credentials"

    def __init__(self, *, record: Iterable[Event] = ()) -> None:
        super().__init__("invalid email or password", record=record)


class AccountLocked(AuthenticationError):
    """Too many failed logins; refused until ``until`` or an admin unlocks."""

    code = "account_locked"

    def __init__(self, until: datetime, *, record: Iterable[Event] = ()) -> None:
        super().__init__(f"account locked until {until.isoformat()}", record=record)
        self.until = until


class AccountInactive(AuthenticationError):
    """The account is deactivated."""

    code = "account_inactive"

    def __init__(self, user_id: str) -> None:
        super().__init__("account is deactivated")
        self.user_id = user_id


class SessionInvalid(AuthenticationError):
    """The session cannot be used: ``reason`` is expired, idle, revoked or unknown."""

    code = "session_invalid"

    def __init__(self, reason: SessionInvalidReason) -> None:
        super().__init__(f"session is {reason}")
        self.reason: SessionInvalidReason = reason


class ResetTokenInvalid(AuthenticationError):
    """The password-reset token is unknown, already used, superseded or expired."""

    code = "reset_token_invalid"

    def __init__(self, reason: ResetTokenInvalidReason) -> None:
        super().__init__(f"password reset token is {reason}")
        self.reason: ResetTokenInvalidReason = reason


class PermissionDenied(DomainError):
    """The actor lacks the permission for ``action`` on ``resource``."""

    code = "permission_denied"
    security_relevant = True

    def __init__(self, actor_id: str | None, action: str, resource: str) -> None:
        super().__init__(f"{actor_id or 'anonymous'} may not {action} {resource}")
        self.actor_id = actor_id
        self.action = action
        self.resource = resource


class NotFound(DomainError):
    """The aggregate (or a member of it) the command names does not exist."""

    code = "not_found"

    def __init__(self, kind: str, id: str | None) -> None:
        super().__init__(f"{kind} {shown(id)} not found")
        self.kind = kind
        self.id = id


class SubjectForgotten(NotFound):
    """The aggregate's personal data was erased on request (``UserForgotten``): it
    takes no further commands."""

    code = "subject_forgotten"

    def __init__(self, kind: str, id: str | None) -> None:
        super().__init__(kind, id)
        self.message = f"{kind} {shown(id)} was forgotten (personal data erased on request)"
        self.args = (self.message,)


class Conflict(DomainError):
    """The command contradicts the aggregate's current state."""

    code = "conflict"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AlreadyExists(Conflict):
    """The aggregate (or member) the command would create already exists."""

    code = "already_exists"

    def __init__(self, kind: str, id: str | None) -> None:
        # id None: a unique value (an email, a username) that is not named, since it
        # may be personal data and only its hash is known where the clash is found.
        super().__init__(
            f"{kind} {shown(id)} already exists" if id is not None else f"this {kind} is taken"
        )
        self.kind = kind
        self.id = id


class IllegalTransition(Conflict):
    """The status machine has no edge from ``from_status`` to ``to_status``."""

    code = "illegal_transition"

    def __init__(self, from_status: str, to_status: str) -> None:
        super().__init__(f"illegal transition from '{from_status}' to '{to_status}'")
        self.from_status = from_status
        self.to_status = to_status


class UnknownEventType(DomainError):
    """A stored event cannot be decoded: no such type, or a version this code cannot
    upcast."""

    code = "unknown_event_type"

    def __init__(self, event_type: str, schema_version: int, reason: str) -> None:
        super().__init__(f"cannot decode {event_type} v{schema_version}: {reason}")
        self.event_type = event_type
        self.schema_version = schema_version
        self.reason = reason
