"""Errors raised by the event store.

Driver exceptions never leave this package untranslated: one translator
(:func:`eventstore.translate.translate_errors`) maps them to the most specific
class below, chains the cause with ``raise ... from``, and lets everything it
does not recognise pass unchanged::

    EventStoreError
    ├── InvalidAppend (ValueError)           the request itself is malformed
    │   ├── InvalidStreamId
    │   ├── UnknownCategory
    │   ├── InvalidExpectedVersion
    │   └── InvalidEventData                 not JSON, NUL characters, too large
    ├── ConcurrencyError                     retry after reloading
    │   ├── WrongExpectedVersion             stream, expected, actual
    │   ├── KeyAlreadyClaimed                a unique key belongs to another stream
    │   ├── CommandInFlight                  one command id sent twice at once
    │   ├── TransactionConflict              deadlock or serialization failure
    │   └── AppendTimeout (TimeoutError)     the append lock was not granted in time
    ├── StoreUnavailable (ConnectionError)   cannot reach or keep the database
    │   └── PoolExhausted (TimeoutError)     no connection within the pool timeout
    ├── LogIntegrityError                    a hole or a broken hash chain
    │   └── UndecryptableField               ciphertext does not open with its key
    ├── SubjectKeysDestroyed                 no new key for a forgotten subject
    └── SchemaNotReady                       migrations have not been applied
"""

from __future__ import annotations

from typing import Literal

ExpectedVersionMode = Literal["any", "no_stream", "exists"]


class EventStoreError(Exception):
    """Root of every error raised by :mod:`eventstore`."""


class InvalidAppend(EventStoreError, ValueError):
    """An append was refused before touching the database; nothing was written."""


class InvalidStreamId(InvalidAppend):
    def __init__(self, stream_id: object, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason
        super().__init__(f"invalid stream id {stream_id!r:.80}: {reason}")


class UnknownCategory(InvalidAppend):
    def __init__(self, category: str, known: frozenset[str] | None) -> None:
        self.category = category
        self.known = known
        choices = f"; known categories: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"unknown stream category {category!r:.60}{choices}")


class InvalidExpectedVersion(InvalidAppend):
    def __init__(self, value: object) -> None:
        self.value = value
        super().__init__(
            f"invalid expected_version {value!r:.40}: use an int >= 0, 'any', 'no_stream' "
            "or 'exists'"
        )


class InvalidEventData(InvalidAppend):
    def __init__(self, event_type: str, reason: str) -> None:
        self.event_type = event_type
        self.reason = reason
        super().__init__(f"event {event_type!r:.80} cannot be stored: {reason}")


class DuplicateEventId(InvalidAppend):
    """An appended event's ``event_id`` is already in the log (ids are unique log-wide)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"an event with this event_id is already in the log: {detail}")


class ConcurrencyError(EventStoreError):
    """Another writer got there first. Reload, decide again, and retry."""


class WrongExpectedVersion(ConcurrencyError):
    def __init__(self, stream_id: str, expected: int | ExpectedVersionMode, actual: int) -> None:
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
        super().__init__(f"stream {stream_id!r} is at version {actual}, expected {expected}")


class KeyAlreadyClaimed(ConcurrencyError):
    def __init__(self, scope: str, holder: str | None) -> None:
        self.scope = scope
        self.holder = holder
        # The key itself is left out of the message: keys may be derived from personal data.
        super().__init__(f"a {scope} key is already claimed by another stream")


class AppendTimeout(ConcurrencyError, TimeoutError):
    """The append lock (or a row lock) was not granted within ``lock_timeout``."""

    def __init__(self, detail: str = "lock_timeout expired") -> None:
        super().__init__(f"append timed out waiting for a lock: {detail}")


class CommandInFlight(ConcurrencyError):
    """A concurrent transaction recorded the same command id first (two sends of one
    idempotency key at once); nothing of this one was written. Prepare again: the
    command then answers with the first one's outcome."""

    def __init__(self, command_id: str) -> None:
        self.command_id = command_id
        super().__init__("the same command id was processed concurrently; retry it")


class TransactionConflict(ConcurrencyError):
    """The database aborted the transaction to resolve a deadlock or a serialization
    conflict, or (PostgreSQL) at an earlier statement of it that failed and was caught
    by the code that went on; nothing of it was written. Retry it."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"transaction aborted by the database, retry it: {detail}")


class StoreUnavailable(EventStoreError, ConnectionError):
    """The database cannot be reached or dropped the connection mid-transaction.

    A transaction that fails this way was rolled back by the server; whether a
    COMMIT that raised this reached the disk is unknown, so callers that retry
    must use a ``command_id`` (idempotency key).
    """


class PoolExhausted(StoreUnavailable, TimeoutError):
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"no database connection became free within {timeout:g}s")


class LogIntegrityError(EventStoreError):
    """The log is not what was written: a hole in positions or a broken hash chain."""


class UndecryptableField(LogIntegrityError):
    """An encrypted field does not open with its key: tampered with, or moved to
    another event type or field (the AAD binds it to both)."""

    def __init__(self, context: str, field: str, key_id: str) -> None:
        self.context = context
        self.field = field
        self.key_id = key_id
        super().__init__(f"{context}.{field} does not decrypt with key {key_id}")


class SubjectKeysDestroyed(EventStoreError):
    """The subject's keys were destroyed (crypto-shredded): it never gets a new one."""

    def __init__(self, subject_id: str) -> None:
        self.subject_id = subject_id
        super().__init__(f"the keys of subject {subject_id!r} were destroyed")


class SchemaNotReady(EventStoreError):
    def __init__(self, detail: str) -> None:
        super().__init__(f"database schema is not ready ({detail}); run `tiu migrate`")
