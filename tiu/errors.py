"""Errors of the service face, and the ones it re-exports from the layers below.

DomainError (domain.errors)          a command was refused; nothing was appended
│   ├── CommandIdReused (InvalidCommand)  a command_id sent before with another command
│   └── DuplicateRejectedCommand     a retried command_id whose first run was refused
EventStoreError (eventstore.errors)
│   ├── ConcurrencyError             retries ran out (WrongExpectedVersion, AppendTimeout)
│   └── StoreUnavailable             the database is unreachable (PoolExhausted too)
ProjectionError (projections.errors)
    ├── InvalidFilter / InvalidCursor  a bad read-model query
    └── ProjectionTimeout            wait_for(position) gave up
"""

from __future__ import annotations

from domain.errors import DomainError, InvalidCommand


class CommandIdReused(InvalidCommand):
    """The ``command_id`` (an idempotency key) was processed before for a command of
    another class (``first_type``): a key names one command, and a resend must be that
    command. Nothing was decided or appended; the first command's outcome stands."""

    code = "command_id_reused"

    def __init__(self, command_id: str, first_type: str, command_type: str) -> None:
        super().__init__(
            "command_id",
            f"{command_id!r} was already used for a {first_type} command, not a "
            f"{command_type}: use a new command id",
        )
        self.command_id = command_id
        self.first_type = first_type
        self.command_type = command_type


class DuplicateRejectedCommand(DomainError):
    """The ``command_id`` was processed before and refused; nothing more was appended."""

    code = "duplicate_rejected"

    def __init__(self, command_id: str, original_code: str, message: str) -> None:
        super().__init__(f"command {command_id} was already refused: {message}")
        self.command_id = command_id
        self.original_code = original_code
