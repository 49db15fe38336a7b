"""Actions outside the domain model (an export, a download), recorded in the log.

Stream ``audit-<actor_id>``. ``LogAction`` is always accepted from a known actor:
the point is that the log stays the single audit trail, so services record such
actions through the same path as every other fact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, field_validator
from pydantic_core import PydanticCustomError

from domain.base import EMPTY, Command, CommandContext, Event, clean_text
from domain.errors import InvalidCommand

CATEGORY: Final = "audit"
MAX_DETAILS_BYTES: Final = 16_384


def stream_id(actor_id: str) -> str:
    return f"{CATEGORY}-{actor_id}"


class ActionLogged(Event):
    """``details`` is free text the service wrote; it may name the actor, so it is
    personal data of the actor."""

    event_type = "ActionLogged"
    personal_fields = frozenset({"details"})
    subject_field = "actor_id"

    actor_id: str
    action: str
    resource_type: str
    resource_id: str | None
    details: dict[str, JsonValue]
    at: AwareDatetime


class LogAction(Command):
    action: str = Field(max_length=100)
    resource_type: str = Field(max_length=100)
    resource_id: str | None = Field(default=None, max_length=200)
    details: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("details")
    @classmethod
    def _only_json(cls, details: dict[str, JsonValue]) -> dict[str, JsonValue]:
        # pydantic's JsonValue takes NaN and infinities, which JSON has not: stored,
        # they came back out of `tiu audit --format json` as tokens jq and strict
        # encoders (Starlette's JSONResponse) refuse.
        try:
            json.dumps(details, allow_nan=False)
        except ValueError:
            raise PydanticCustomError(
                "json_finite", "must hold only finite numbers (NaN and Infinity are not JSON)"
            ) from None
        return details


class ReadAuditLog(Command):
    """Not decided: named in the security stream when reading the log is refused."""

    query: str = Field(default="", max_length=500)


class State(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    actions: int = 0


def initial_state() -> State:
    return State()


def evolve(state: State, event: Event) -> State:
    if isinstance(event, ActionLogged):
        return State(actions=state.actions + 1)
    return state


def decide(
    command: Command, state: State, ctx: CommandContext, related: Mapping[str, Any] = EMPTY
) -> list[Event]:
    if not isinstance(command, LogAction):
        raise TypeError(f"the audit decider does not handle {type(command).__name__}")
    if ctx.actor_id is None:
        raise InvalidCommand("actor", "an audited action needs an actor")
    encoded = command.model_dump_json(include={"details"})
    if len(encoded.encode()) > MAX_DETAILS_BYTES:
        raise InvalidCommand("details", f"must encode to at most {MAX_DETAILS_BYTES} bytes")
    return [
        ActionLogged(
            actor_id=ctx.actor_id,
            action=clean_text(command.action, "action", max_length=100),
            resource_type=clean_text(command.resource_type, "resource_type", max_length=100),
            resource_id=command.resource_id,
            details=command.details,
            at=ctx.now,
        )
    ]
