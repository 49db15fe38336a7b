"""tiu-core: an event-sourced domain core for a multi-user task tracker.

from tiu import create_database_service

service = await create_database_service()
async with service.get_repositories() as repos:
    user = await repos.get_user_repository().create_user(...)

Everything a caller types against is exported here: the service, the repositories'
models, the enums their arguments take, and every error a call can raise
(docs/errors.md says which call raises which).
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
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
        CommandInFlight,
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
    from tiu.errors import CommandIdReused, DuplicateRejectedCommand
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

    __version__: str

# Each name is imported on first use (PEP 562), so `import tiu` (and the `tiu` command's
# start-up) does not pay for SQLAlchemy, pydantic and the whole service stack.
_SOURCES: dict[str, str] = {
    "AccountInactive": "domain.errors",
    "AccountLocked": "domain.errors",
    "AlreadyExists": "domain.errors",
    "AuthenticationError": "domain.errors",
    "Conflict": "domain.errors",
    "DomainError": "domain.errors",
    "IllegalTransition": "domain.errors",
    "InvalidCommand": "domain.errors",
    "InvalidCredentials": "domain.errors",
    "NotFound": "domain.errors",
    "PermissionDenied": "domain.errors",
    "ResetTokenInvalid": "domain.errors",
    "SessionInvalid": "domain.errors",
    "SubjectForgotten": "domain.errors",
    "UnknownEventType": "domain.errors",
    "WeakPassword": "domain.errors",
    "SYSTEM_ACTOR": "domain.permissions",
    "Permission": "domain.permissions",
    "ProjectRole": "domain.permissions",
    "Role": "domain.permissions",
    "Visibility": "domain.projects",
    "Priority": "domain.tasks",
    "TaskStatus": "domain.tasks",
    "AppendTimeout": "eventstore.errors",
    "CommandInFlight": "eventstore.errors",
    "ConcurrencyError": "eventstore.errors",
    "DuplicateEventId": "eventstore.errors",
    "EventStoreError": "eventstore.errors",
    "InvalidAppend": "eventstore.errors",
    "InvalidEventData": "eventstore.errors",
    "InvalidExpectedVersion": "eventstore.errors",
    "InvalidStreamId": "eventstore.errors",
    "KeyAlreadyClaimed": "eventstore.errors",
    "LogIntegrityError": "eventstore.errors",
    "PoolExhausted": "eventstore.errors",
    "SchemaNotReady": "eventstore.errors",
    "StoreUnavailable": "eventstore.errors",
    "SubjectKeysDestroyed": "eventstore.errors",
    "TransactionConflict": "eventstore.errors",
    "UndecryptableField": "eventstore.errors",
    "UnknownCategory": "eventstore.errors",
    "WrongExpectedVersion": "eventstore.errors",
    "CheckpointMoved": "projections.errors",
    "InlineProjectionBehind": "projections.errors",
    "InvalidCursor": "projections.errors",
    "InvalidFilter": "projections.errors",
    "InvalidOrdering": "projections.errors",
    "InvalidPagination": "projections.errors",
    "InvalidQuery": "projections.errors",
    "InvalidSkip": "projections.errors",
    "ProjectionError": "projections.errors",
    "ProjectionFailed": "projections.errors",
    "ProjectionParked": "projections.errors",
    "ProjectionTimeout": "projections.errors",
    "RebuildError": "projections.errors",
    "CommandResult": "tiu.dispatch",
    "CommandIdReused": "tiu.errors",
    "DuplicateRejectedCommand": "tiu.errors",
    "AuditEntry": "tiu.models",
    "Member": "tiu.models",
    "NewSession": "tiu.models",
    "Page": "tiu.models",
    "Project": "tiu.models",
    "ProjectStatistics": "tiu.models",
    "Session": "tiu.models",
    "SessionValidation": "tiu.models",
    "Task": "tiu.models",
    "User": "tiu.models",
    "AuditRepository": "tiu.repositories",
    "BulkOperationError": "tiu.repositories",
    "ProjectRepository": "tiu.repositories",
    "Repositories": "tiu.repositories",
    "SessionRepository": "tiu.repositories",
    "TaskRepository": "tiu.repositories",
    "UserRepository": "tiu.repositories",
    "DatabaseService": "tiu.service",
    "ProjectionMode": "tiu.service",
    "create_database_service": "tiu.service",
    "Settings": "tiu.settings",
}


if not _typing.TYPE_CHECKING:  # mypy checks the imports above, not a catch-all

    def __getattr__(name: str) -> _typing.Any:
        if name == "__version__":
            value = _version()
        elif name in _SOURCES:
            value = getattr(_importlib.import_module(_SOURCES[name]), name)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _version() -> str:
    import importlib.metadata  # noqa: PLC0415  # only when asked: it costs 30 ms

    try:
        return importlib.metadata.version("tiu-core")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


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
    "CommandIdReused",
    "CommandInFlight",
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
