"""The event log: append with expected version, read streams and the global log, subscribe.

Knows nothing of users or tasks beyond "a stream has a category".

Names are imported on first use (PEP 562): a child process of ``verify`` imports
:mod:`eventstore.log_check` alone, without SQLAlchemy and the rest (~0.5 s of CPU).
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from eventstore.crypto import SubjectKeys, keyring
    from eventstore.engine import EngineOptions, backend_name, create_engine
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
    from eventstore.health import HealthReport, PoolStatus, health_check, pool_status
    from eventstore.integrity import BrokenLink, VerifyReport, verify
    from eventstore.records import (
        ANY,
        NO_STREAM,
        STREAM_EXISTS,
        AppendResult,
        EventContext,
        ExpectedVersion,
        NewEvent,
        RecordedEvent,
        StreamData,
    )
    from eventstore.schema import metadata
    from eventstore.store import EventStore, UnitOfWork

#: Where each name of the package's API is defined.
_SOURCES: dict[str, str] = {
    "SubjectKeys": "eventstore.crypto",
    "keyring": "eventstore.crypto",
    "EngineOptions": "eventstore.engine",
    "backend_name": "eventstore.engine",
    "create_engine": "eventstore.engine",
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
    "HealthReport": "eventstore.health",
    "PoolStatus": "eventstore.health",
    "health_check": "eventstore.health",
    "pool_status": "eventstore.health",
    "BrokenLink": "eventstore.integrity",
    "VerifyReport": "eventstore.integrity",
    "verify": "eventstore.integrity",
    "ANY": "eventstore.records",
    "NO_STREAM": "eventstore.records",
    "STREAM_EXISTS": "eventstore.records",
    "AppendResult": "eventstore.records",
    "EventContext": "eventstore.records",
    "ExpectedVersion": "eventstore.records",
    "NewEvent": "eventstore.records",
    "RecordedEvent": "eventstore.records",
    "StreamData": "eventstore.records",
    "metadata": "eventstore.schema",
    "EventStore": "eventstore.store",
    "UnitOfWork": "eventstore.store",
}


if not _typing.TYPE_CHECKING:  # mypy checks the imports above, not a catch-all

    def __getattr__(name: str) -> _typing.Any:
        if name not in _SOURCES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(_SOURCES[name]), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "AppendTimeout",
    "BrokenLink",
    "CommandInFlight",
    "ConcurrencyError",
    "DuplicateEventId",
    "EngineOptions",
    "EventContext",
    "EventStore",
    "EventStoreError",
    "ExpectedVersion",
    "HealthReport",
    "InvalidAppend",
    "InvalidEventData",
    "InvalidExpectedVersion",
    "InvalidStreamId",
    "KeyAlreadyClaimed",
    "LogIntegrityError",
    "NewEvent",
    "PoolExhausted",
    "PoolStatus",
    "RecordedEvent",
    "SchemaNotReady",
    "StoreUnavailable",
    "StreamData",
    "SubjectKeys",
    "SubjectKeysDestroyed",
    "TransactionConflict",
    "UndecryptableField",
    "UnitOfWork",
    "UnknownCategory",
    "VerifyReport",
    "WrongExpectedVersion",
    "backend_name",
    "create_engine",
    "health_check",
    "keyring",
    "metadata",
    "pool_status",
    "verify",
]
