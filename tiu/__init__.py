"""tiu-core: an event-sourced domain core for a multi-user task tracker.

from tiu import create_database_service

service = await create_database_service()
async with service.get_repositories() as repos:
    user = await repos.get_user_repository().create_user(...)

Everything a caller types against is exported here: the service, the repositories'
models, the enums their arguments take, and every error a call can raise
(docs/errors.md says which call raises which).
"""

import importlib.metadata as _metadata

from domain.errors import (
    AccountInactive,
    AccountLocked,
    AlreadyExists,
    AuthenticationError,
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
    UnknownEventType,
    WeakPassword,
)
from domain.permissions import SYSTEM_ACTOR, Permission, ProjectRole, Role
from domain.projects import Visibility
from domain.tasks import Priority, TaskStatus
from eventstore.errors import (
    AppendTimeout,
    ConcurrencyError,
    DuplicateEventId,
    EventStoreError,
    InvalidAppend,
    InvalidEventData,
    InvalidExpectedVersion,
    InvalidStreamId,
    KeyAlreadyClaimed,
    LogIntegrityError,
    PoolExhausted,
    SchemaNotReady,
    StoreUnavailable,
    SubjectKeysDestroyed,
    TransactionConflict,
    UndecryptableField,
    UnknownCategory,
    WrongExpectedVersion,
)
from projections.errors import (
    CheckpointMoved,
    InlineProjectionBehind,
    InvalidCursor,
    InvalidFilter,
    InvalidOrdering,
    InvalidPagination,
    InvalidQuery,
    InvalidSkip,
    ProjectionError,
    ProjectionFailed,
    ProjectionParked,
    ProjectionTimeout,
    RebuildError,
)
from tiu.dispatch import CommandResult
from tiu.errors import DuplicateRejectedCommand
from tiu.models import (
    AuditEntry,
    Member,
    NewSession,
    Page,
    Project,
    ProjectStatistics,
    Session,
    SessionValidation,
    Task,
    User,
)
from tiu.repositories import (
    AuditRepository,
    BulkOperationError,
    ProjectRepository,
    Repositories,
    SessionRepository,
    TaskRepository,
    UserRepository,
)
from tiu.service import DatabaseService, ProjectionMode, create_database_service
from tiu.settings import Settings

try:
    __version__ = _metadata.version("tiu-core")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "SYSTEM_ACTOR",
    "AccountInactive",
    "AccountLocked",
    "AlreadyExists",
    "AppendTimeout",
    "AuditEntry",
    "AuditRepository",
    "AuthenticationError",
    "BulkOperationError",
    "CheckpointMoved",
    "CommandResult",
    "ConcurrencyError",
    "Conflict",
    "DatabaseService",
    "DomainError",
    "DuplicateEventId",
    "DuplicateRejectedCommand",
    "EventStoreError",
    "IllegalTransition",
    "InlineProjectionBehind",
    "InvalidAppend",
    "InvalidCommand",
    "InvalidCredentials",
    "InvalidCursor",
    "InvalidEventData",
    "InvalidExpectedVersion",
    "InvalidFilter",
    "InvalidOrdering",
    "InvalidPagination",
    "InvalidQuery",
    "InvalidSkip",
    "InvalidStreamId",
    "KeyAlreadyClaimed",
    "LogIntegrityError",
    "Member",
    "NewSession",
    "NotFound",
    "Page",
    "Permission",
    "PermissionDenied",
    "PoolExhausted",
    "Priority",
    "Project",
    "ProjectRepository",
    "ProjectRole",
    "ProjectStatistics",
    "ProjectionError",
    "ProjectionFailed",
    "ProjectionMode",
    "ProjectionParked",
    "ProjectionTimeout",
    "RebuildError",
    "Repositories",
    "ResetTokenInvalid",
    "Role",
    "SchemaNotReady",
    "Session",
    "SessionInvalid",
    "SessionRepository",
    "SessionValidation",
    "Settings",
    "StoreUnavailable",
    "SubjectForgotten",
    "SubjectKeysDestroyed",
    "Task",
    "TaskRepository",
    "TaskStatus",
    "TransactionConflict",
    "UndecryptableField",
    "UnknownCategory",
    "UnknownEventType",
    "User",
    "UserRepository",
    "Visibility",
    "WeakPassword",
    "WrongExpectedVersion",
    "create_database_service",
]
