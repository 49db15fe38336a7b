"""tiu-core: an event-sourced domain core for a multi-user task tracker.

from tiu import create_database_service

service = await create_database_service()
async with service.get_repositories() as repos:
    user = await repos.get_user_repository().create_user(...)
"""

from domain.errors import (
    AccountInactive,
    AccountLocked,
    AlreadyExists,
    Conflict,
    DomainError,
    IllegalTransition,
    InvalidCommand,
    InvalidCredentials,
    NotFound,
    PermissionDenied,
    ResetTokenInvalid,
    SessionInvalid,
    SubjectForgotten,
    WeakPassword,
)
from eventstore.errors import (
    AppendTimeout,
    ConcurrencyError,
    EventStoreError,
    PoolExhausted,
    StoreUnavailable,
    WrongExpectedVersion,
)
from projections.errors import (
    InvalidCursor,
    InvalidFilter,
    InvalidSkip,
    ProjectionError,
    ProjectionFailed,
    ProjectionParked,
    ProjectionTimeout,
)
from tiu.dispatch import CommandResult
from tiu.errors import DuplicateRejectedCommand
from tiu.repositories import BulkOperationError, Repositories
from tiu.service import DatabaseService, ProjectionMode, create_database_service
from tiu.settings import Settings

__all__ = [
    "AccountInactive",
    "AccountLocked",
    "AlreadyExists",
    "AppendTimeout",
    "BulkOperationError",
    "CommandResult",
    "ConcurrencyError",
    "Conflict",
    "DatabaseService",
    "DomainError",
    "DuplicateRejectedCommand",
    "EventStoreError",
    "IllegalTransition",
    "InvalidCommand",
    "InvalidCredentials",
    "InvalidCursor",
    "InvalidFilter",
    "InvalidSkip",
    "NotFound",
    "PermissionDenied",
    "PoolExhausted",
    "ProjectionError",
    "ProjectionFailed",
    "ProjectionMode",
    "ProjectionParked",
    "ProjectionTimeout",
    "Repositories",
    "ResetTokenInvalid",
    "SessionInvalid",
    "Settings",
    "StoreUnavailable",
    "SubjectForgotten",
    "WeakPassword",
    "WrongExpectedVersion",
    "create_database_service",
]
