"""The event log: append with expected version, read streams and the global log, subscribe.

Knows nothing of users or tasks beyond "a stream has a category".
"""

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
