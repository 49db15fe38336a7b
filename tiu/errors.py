"""Errors of the service face, and the ones it re-exports from the layers below.

DomainError (domain.errors)          a command was refused; nothing was appended
│   └── DuplicateRejectedCommand     a retried command_id whose first run was refused
EventStoreError (eventstore.errors)
│   ├── ConcurrencyError             retries ran out (WrongExpectedVersion, AppendTimeout)
│   └── StoreUnavailable             the database is unreachable (PoolExhausted too)
ProjectionError (projections.errors)
    ├── InvalidFilter / InvalidCursor  a bad read-model query
    └── ProjectionTimeout            wait_for(position) gave up
"""

from __future__ import annotations

from domain.errors import DomainError


class DuplicateRejectedCommand(DomainError):
    """The ``command_id`` was processed before and refused; nothing more was appended."""

    code = "duplicate_rejected"

    def __init__(self, command_id: str, original_code: str, message: str) -> None:
        super().__init__(f"command {command_id} was already refused: {message}")
        self.command_id = command_id
        self.original_code = original_code
