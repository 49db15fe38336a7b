"""The security stream: an audit record of every refused security-relevant command.

Stream ``security-<actor_id>`` (``security-anonymous`` when nobody is signed in). The
dispatcher appends ``rejection_event(command, error, ctx)`` there whenever decide
raises an error whose ``security_relevant`` is true, so that
failed actions are in the log even though the command appended nothing else. There is
no decider: nothing is ever decided on this stream, it is only written and audited.

``ip`` and ``user_agent`` are personal data. In a ``CommandRejected`` they are the
actor's; in a ``LoginRejected`` they belong to the account the login targeted when the
email matched one (``subject_id``: forgetting that user erases them), else to the
actor. With neither (an unknown email, nobody signed in) they have no subject and are
kept in plaintext, under retention (``tiu audit archive``).
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import AwareDatetime

from domain import users
from domain.base import Command, CommandContext, Event, register_upcaster
from domain.errors import DomainError

CATEGORY: Final = "security"
ANONYMOUS: Final = "anonymous"
_TARGET_FIELDS: Final = ("task_id", "session_id", "project_id", "user_id")


def stream_id(actor_id: str | None) -> str:
    return f"{CATEGORY}-{actor_id or ANONYMOUS}"


class LoginRejected(Event):
    """A refused ``AttemptLogin``; ``user_id`` is the account targeted, None when the
    email matched nobody. ``subject_id``, whose key encrypts ``ip`` and ``user_agent``,
    is that account, else the actor (v2; v1 encrypted them for the actor only, so a
    failed login on a known account kept them in plaintext)."""

    event_type = "LoginRejected"
    schema_version = 2
    personal_fields = frozenset({"ip", "user_agent"})
    subject_field = "subject_id"

    command_id: str
    user_id: str | None
    subject_id: str | None
    error_code: str
    reason: str
    actor_id: str | None
    ip: str | None
    user_agent: str | None
    at: AwareDatetime


class CommandRejected(Event):
    """Any other refused security-relevant command; ``target`` names what it was aimed
    at, e.g. ``project_id=...``."""

    event_type = "CommandRejected"
    personal_fields = frozenset({"ip", "user_agent"})
    subject_field = "actor_id"

    command_id: str
    command_type: str
    target: str | None
    error_code: str
    reason: str
    actor_id: str | None
    ip: str | None
    user_agent: str | None
    at: AwareDatetime


@register_upcaster("LoginRejected", 1)
def _login_rejected_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # v1 sealed the IP and user agent for the actor (when there was one).
    return {**data, "subject_id": data.get("actor_id")}


def _target(command: Command) -> str | None:
    for name in _TARGET_FIELDS:
        value = getattr(command, name, None)
        if isinstance(value, str):
            return f"{name}={value}"
    return None


def rejection_event(command: Command, error: DomainError, ctx: CommandContext) -> Event | None:
    """The audit event for ``error`` refusing ``command``, or None when the error is not
    security relevant. ``reason`` is the error's message, which never holds secrets."""
    if not error.security_relevant:
        return None
    if isinstance(command, users.AttemptLogin):
        return LoginRejected(
            command_id=command.command_id,
            user_id=command.user_id,
            subject_id=command.user_id or ctx.actor_id,
            error_code=error.code,
            reason=error.message,
            actor_id=ctx.actor_id,
            ip=ctx.ip,
            user_agent=ctx.user_agent,
            at=ctx.now,
        )
    return CommandRejected(
        command_id=command.command_id,
        command_type=type(command).__name__,
        target=_target(command),
        error_code=error.code,
        reason=error.message,
        actor_id=ctx.actor_id,
        ip=ctx.ip,
        user_agent=ctx.user_agent,
        at=ctx.now,
    )
