"""One translator from driver errors to :mod:`eventstore.errors`."""

from __future__ import annotations

import sqlite3
from typing import Any, Final

from sqlalchemy import exc as sa_exc

from eventstore import telemetry
from eventstore.errors import (
    AppendTimeout,
    DuplicateEventId,
    EventStoreError,
    PoolExhausted,
    SchemaNotReady,
    StoreUnavailable,
    TransactionConflict,
)
from eventstore.sqlite_driver import is_busy

# SQLSTATE classes and codes (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_PG_DISCONNECT_PREFIXES: Final = ("08", "57P01", "57P02", "57P03", "53300")
_PG_LOCK_NOT_AVAILABLE: Final = "55P03"
_PG_IDLE_TX_TIMEOUT: Final = "25P03"
_PG_UNDEFINED_TABLE: Final = "42P01"
_PG_UNDEFINED_FUNCTION: Final = "42883"  # tiu_append / tiu_command before their migration
_PG_RETRYABLE: Final = ("40P01", "40001")  # deadlock detected, serialization failure
#: A statement sent in a transaction an earlier failed statement aborted (one the code
#: around it caught, or a round trip cut short in flight): the whole of it is lost.
_PG_IN_FAILED_TRANSACTION: Final = "25P02"
# No such database (3D000), no such role or a refused login (class 28): nothing to retry
# against until the configuration changes, but to a caller the database is unavailable.
_PG_CANNOT_CONNECT: Final = ("3D000", "28")
#: SQLAlchemy's code for a statement on a connection invalidated inside a transaction.
_LOST_IN_TRANSACTION: Final = "8s2b"
#: What a driver raises: sqlite3's errors, and asyncpg's as SQLAlchemy's dialect adapts them.
_BARE_DRIVER_ERRORS: Final = (sqlite3.Error, sa_exc.EmulatedDBAPIException)
#: sqlite3's words for a file that is not (or no longer) an SQLite database.
_SQLITE_NOT_A_DATABASE: Final = ("file is not a database", "database disk image is malformed")


def sqlstate(error: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE behind a SQLAlchemy error, if any."""
    orig = getattr(error, "orig", None)
    code = getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def is_unique_violation(error: sa_exc.IntegrityError) -> bool:
    code = sqlstate(error)
    if code is not None:
        return code == "23505"
    return "UNIQUE constraint failed" in str(error.orig)


class translate_errors:  # named as the function it was: ``with translate_errors():``
    """Map connection, pool, lock and schema failures to typed store errors.

    Anything not recognised propagates unchanged. ``database`` names the SQLite
    file (or server) in messages.

    A class, not a generator-based context manager: a command enters it several
    times, and ``contextlib``'s wrapper cost ~2 us each (profiled).
    """

    __slots__ = ("database",)

    def __init__(self, database: str | None = None) -> None:
        self.database = database

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any
    ) -> None:
        if error is not None and isinstance(error, Exception):
            _translate(error, self.database)
        # Not translated: it propagates unchanged.


def _translate(error: Exception, database: str | None) -> None:
    """Raise the typed store error for ``error``, if there is one."""
    where = f" ({database})" if database else ""
    if isinstance(error, EventStoreError):
        return  # already ours (StoreUnavailable is also an OSError)
    if isinstance(error, _BARE_DRIVER_ERRORS):
        # A driver's error SQLAlchemy did not wrap: it wraps only inside a Connection,
        # and a pool's connect for ``raw_connection()`` (the direct append) is outside.
        error = sa_exc.DBAPIError.instance(None, None, error, Exception)
    if isinstance(error, sa_exc.PendingRollbackError) and error.code == _LOST_IN_TRANSACTION:
        raise StoreUnavailable(
            f"database connection lost during a transaction{where}: it was rolled back"
        ) from error
    if isinstance(error, sa_exc.TimeoutError):
        telemetry.pool_exhausted()
        raise PoolExhausted(_pool_timeout(error)) from error
    if isinstance(error, sa_exc.DBAPIError):
        code = sqlstate(error)
        text = str(error.orig)
        if code == _PG_LOCK_NOT_AVAILABLE:
            raise AppendTimeout("lock_timeout expired") from error
        if code in _PG_RETRYABLE or code == _PG_IN_FAILED_TRANSACTION:
            raise TransactionConflict(_first_line(text)) from error
        if code is not None and code.startswith(_PG_CANNOT_CONNECT):
            raise StoreUnavailable(
                f"cannot connect to the database{where}: {_first_line(text)}"
            ) from error
        if code is None and any(words in text for words in _SQLITE_NOT_A_DATABASE):
            raise StoreUnavailable(f"SQLite error{where}: {_first_line(text)}") from error
        if code in (_PG_UNDEFINED_TABLE, _PG_UNDEFINED_FUNCTION) or "no such table" in text:
            raise SchemaNotReady(text.splitlines()[0]) from error
        if error.connection_invalidated or (
            code is not None
            and (code == _PG_IDLE_TX_TIMEOUT or code.startswith(_PG_DISCONNECT_PREFIXES))
        ):
            raise StoreUnavailable(
                f"database connection lost{where}: {_first_line(text)}"
            ) from error
        if (
            isinstance(error, sa_exc.IntegrityError)
            and is_unique_violation(error)
            and "event_id" in text
        ):
            raise DuplicateEventId(_first_line(text)) from error
        if code is None and isinstance(error, sa_exc.OperationalError):
            if is_busy(text):
                raise AppendTimeout(
                    f"SQLite write lock not granted within the busy timeout{where}"
                ) from error
            raise StoreUnavailable(f"SQLite error{where}: {_first_line(text)}") from error
        return
    if isinstance(error, OSError):
        raise StoreUnavailable(f"cannot reach the database{where}: {error}") from error


def describe(error: BaseException) -> str:
    """One line saying what went wrong; for a driver error, the driver's own words
    (never SQLAlchemy's wrapper class, the SQL or a link)."""
    orig = getattr(error, "orig", None) if isinstance(error, sa_exc.StatementError) else None
    text = str(orig if orig is not None else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no detail"


def _pool_timeout(error: sa_exc.TimeoutError) -> float:
    # "QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00"
    tail = str(error).rsplit("timeout", 1)[-1].strip(" ()")
    try:
        return float(tail.split()[0])
    except (ValueError, IndexError):
        return float("nan")
