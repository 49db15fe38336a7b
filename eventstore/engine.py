"""Building the async engine: one function, two dialects.

SQLite runs as a real backend: a file in WAL mode, foreign keys on, a busy timeout,
and writers serialised by ``BEGIN IMMEDIATE`` so that a transaction that reads and
then writes never fails with SQLITE_BUSY half-way (and so positions follow commit
order). Readers use a plain deferred ``BEGIN``. PostgreSQL gets a QueuePool and
server-side timeouts that bound how long a stuck transaction can hold the append lock.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, CursorResult, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool
from sqlalchemy.sql.base import Executable
from sqlalchemy.util.concurrency import in_greenlet

from eventstore.errors import StoreUnavailable
from eventstore.grouping import whole, whole_round_trip
from eventstore.hashing import canonical_json, parse_json
from eventstore.sqlite_driver import (
    ANALYSIS_LIMIT,
    OFF_LOOP,
    InlineSQLiteDBAPI,
    await_,
)
from eventstore.sqlite_driver import Connection as InlineConnection
from eventstore.translate import describe, translate_errors

Result = TypeVar("Result")

#: Execution option that makes a SQLite transaction take the write lock at BEGIN.
WRITE_OPTION: Final = "tiu_write"

#: Execution option of a view of a PostgreSQL engine whose connections work in one
#: schema (``tiu.tenants``): a pooled connection is set to that schema's path before
#: the view uses it, whether through a ``Connection`` (an ``engine_connect`` hook) or
#: checked out bare (:func:`eventstore.dialects.follow_schema`). The pooled
#: connection's ``info`` under this key is the schema it was last set to.
SCHEMA_OPTION: Final = "tiu_tenant_schema"


def search_path_statement(schema: str | None) -> str:
    """The ``SET`` that gives a session ``schema``'s path (``None``: the server's
    default), the name quoted as an identifier whatever it holds."""
    if not schema:
        return "SET search_path TO DEFAULT"
    return 'SET search_path TO "{}"'.format(schema.replace('"', '""'))


class CountingQueuePool(AsyncAdaptedQueuePool):
    """SQLAlchemy's async queue pool, also counting the requests for a connection in
    progress (:attr:`pending`: waiting for one to come back, or for a new one to
    open), which its public status (``checkedout()``, ``checkedin()``) does not say.
    Read by the ``db.client.connection.pending_requests`` gauge."""

    pending = 0

    def connect(self) -> Any:
        # Checkouts run on the event loop (in SQLAlchemy's greenlets): no lock needed.
        self.pending += 1
        try:
            return super().connect()
        finally:
            self.pending -= 1


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Pool and timeout settings (pre-ping and recycle apply to PostgreSQL only).

    ``pool_pre_ping`` is off by default: it costs a round trip per transaction (~25% of
    a one-event append, measured). Without it, a connection the server dropped (a
    restart) fails one transaction with :class:`StoreUnavailable`, which is safe to
    retry, and SQLAlchemy then discards every pooled connection older than the failure.
    """

    pool_size: int = 10
    max_overflow: int = 10
    pool_timeout: float = 30.0
    pool_recycle: int = 1800
    pool_pre_ping: bool = False
    #: SQLite: how long a writer waits for the write lock before failing.
    busy_timeout: float = 5.0
    #: SQLite ``synchronous``: NORMAL is durable against application crashes in WAL
    #: mode; FULL also against power loss.
    sqlite_synchronous: str = "NORMAL"
    #: PostgreSQL: how long a statement waits for any lock (the append lock included).
    lock_timeout_ms: int = 5000
    #: PostgreSQL: a transaction left idle this long is ended by the server, freeing its locks.
    idle_in_transaction_timeout_ms: int = 60_000
    #: PostgreSQL: the schema search path (a schema per tenant, or per test run).
    search_path: str | None = None
    echo: bool = False


#: The options each engine of :func:`create_engine` was built with (weakly held).
_BUILT_WITH: weakref.WeakKeyDictionary[AsyncEngine, EngineOptions] = weakref.WeakKeyDictionary()


def options_of(engine: AsyncEngine) -> EngineOptions | None:
    """The options :func:`create_engine` built ``engine`` with; ``None`` for any other
    engine, a view of one (``execution_options``) included. What a process of its own
    (a rebuild's child) needs to connect exactly as ``engine`` does."""
    return _BUILT_WITH.get(engine)


class ReadEngine(AsyncEngine):
    """A view of a PostgreSQL engine whose connections are each a :class:`GuardedConnection`:
    what repository reads go through (``DatabaseService.reader``, and a replica's)."""

    __slots__ = ()

    def connect(self) -> AsyncConnection:
        return GuardedConnection(self)

    def execution_options(self, **opt: Any) -> ReadEngine:
        # SQLAlchemy's builds a plain AsyncEngine, whose connections are not guarded.
        return ReadEngine(self.sync_engine.execution_options(**opt))


class GuardedConnection(AsyncConnection):
    """A PostgreSQL connection whose round trips are never abandoned midway
    (:func:`eventstore.grouping.whole`): its checkout, which may open a connection
    for the pool, and each statement: a reader's (:class:`ReadEngine`), and that of
    ``execute_in_transaction``'s unit of work (``tiu.dispatch.Dispatcher.run``), whose
    function may cancel what it awaits. A caller cancelled meanwhile waits for the round
    trip to end, then is cancelled, and the connection goes back to the pool idle.
    Abandoned, a statement's connection would be invalidated by SQLAlchemy (dropped,
    opened again by a later checkout), a connection being opened would be left
    unclosed, and asyncpg would report either lost round trip as an exception nobody
    retrieved.

    Each round trip costs a task (~100,000 instructions, by callgrind). SQLite needs none:
    its inline driver has no round trip in flight at an await (``Dialect.round_trips``).
    A reader's statements sent on the driver connection itself (``Dialect.fetch``) need
    none either: asyncpg cancels its own round trip cleanly (a cancel request; the
    connection stays pooled and its next statement waits for the cancel to end), and
    the read ends with it. A unit of work goes on after a cut: :class:`UnitConnection`.
    """

    __slots__ = ()

    async def start(self, is_ctxmanager: bool = False) -> AsyncConnection:
        return await checked_out(super().start(is_ctxmanager))

    async def execute(
        self,
        statement: Executable,
        parameters: Any = None,
        *,
        execution_options: Any = None,
    ) -> CursorResult[Any]:
        # conn.scalar() and conn.scalars() come here too.
        return await whole(
            super().execute(statement, parameters, execution_options=execution_options)
        )


class UnitConnection(GuardedConnection):
    """The connection of ``execute_in_transaction``'s unit of work, whose function may
    cut what it awaits and go on in the same transaction: the statements sent on its
    driver connection directly (:func:`driver_round_trip`: a permission lookup, a
    command's stream load, a write not held back) are never abandoned midway either.
    Cut short while PostgreSQL still runs one (a lock wait), asyncpg's cancel request
    would abort the transaction, and the unit's next statement fail (SQLSTATE 25P02).
    Nor is a ROLLBACK (a command's ``end_read`` before its password work): abandoned,
    SQLAlchemy dropped the connection."""

    __slots__ = ()

    async def rollback(self) -> None:
        await whole(super().rollback())


def driver_round_trip(
    conn: AsyncConnection, work: Coroutine[Any, Any, Result]
) -> Awaitable[Result]:
    """``work``, round trips on ``conn`` (a statement sent on its driver connection
    directly, or a command's write), to await: never abandoned midway
    (:func:`eventstore.grouping.whole`) on a :class:`UnitConnection`; anywhere else
    ``work`` itself (no task, no coroutine more)."""
    return whole(work) if type(conn) is UnitConnection else work


async def checked_out(
    starting: Awaitable[AsyncConnection], *, round_trips: bool = True
) -> AsyncConnection:
    """``starting`` (a connection's start: its checkout, which may open a connection
    for the pool), never abandoned midway where it has round trips
    (:func:`eventstore.grouping.whole_round_trip`): one opened after its caller was
    cancelled is closed, which gives it back to the pool."""
    return await whole_round_trip(round_trips, starting, undo=AsyncConnection.close)


def backend_name(url: str | URL) -> str:
    """``"sqlite"`` or ``"postgresql"``; anything else is refused."""
    name = make_url(url).get_backend_name()
    if name not in ("sqlite", "postgresql"):
        raise ValueError(
            f"unsupported database {name!r}: use sqlite+aiosqlite or postgresql+asyncpg"
        )
    return name


def create_engine(url: str | URL, options: EngineOptions | None = None) -> AsyncEngine:
    """Build the async engine for ``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``."""
    opts = options or EngineOptions()
    url = make_url(url)
    _quiet_secret_logging()
    common: dict[str, Any] = {
        "echo": opts.echo,
        # Bound parameters hold password hashes and token hashes: keep them out of log
        # lines and exception messages.
        "hide_parameters": True,
        "json_serializer": canonical_json,
        "json_deserializer": parse_json,
    }
    if backend_name(url) == "postgresql":
        if url.drivername != "postgresql+asyncpg":
            url = url.set(drivername="postgresql+asyncpg")
        server_settings = {
            "lock_timeout": str(opts.lock_timeout_ms),
            "idle_in_transaction_session_timeout": str(opts.idle_in_transaction_timeout_ms),
            "application_name": "tiu-core",
        }
        if opts.search_path:
            server_settings["search_path"] = opts.search_path
        pg_engine = create_async_engine(
            url,
            poolclass=CountingQueuePool,
            pool_size=opts.pool_size,
            max_overflow=opts.max_overflow,
            pool_timeout=opts.pool_timeout,
            pool_recycle=opts.pool_recycle,
            pool_pre_ping=opts.pool_pre_ping,
            connect_args={"server_settings": server_settings},
            **common,
        )
        _install_read_hook(pg_engine)
        _BUILT_WITH[pg_engine] = opts
        return pg_engine
    if url.drivername != "sqlite+aiosqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    memory = url.database in (None, "", ":memory:")
    # A pool for files: opening a connection starts a driver thread and runs the
    # pragmas, which costs more than a small transaction (profiled: ~60% of an append).
    # :memory: must share its only connection.
    pooling: dict[str, Any] = (
        {"poolclass": StaticPool}
        if memory
        else {
            "poolclass": CountingQueuePool,
            "pool_size": opts.pool_size,
            "max_overflow": opts.max_overflow,
            "pool_timeout": opts.pool_timeout,
        }
    )
    synchronous = opts.sqlite_synchronous.upper()
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"invalid sqlite_synchronous {opts.sqlite_synchronous!r}")
    driver = InlineSQLiteDBAPI()
    engine = create_async_engine(
        url,
        # The SQL dialect stays aiosqlite's; the driver underneath is sqlite3 run inline
        # on the event loop (eventstore.sqlite_driver: a thread hop per call cost more
        # than the SQLite work itself).
        module=driver,
        connect_args={
            "timeout": opts.busy_timeout,
            # An fsync per COMMIT (FULL, EXTRA) is waited for off the event loop.
            "offload_commit": synchronous in ("FULL", "EXTRA"),
            # Run by the driver as it opens each connection, off the loop.
            "pragmas": _sqlite_pragmas(synchronous, memory=memory),
        },
        **pooling,
        **common,
    )
    _install_sqlite_hooks(engine, driver)
    _install_read_hook(engine)
    _BUILT_WITH[engine] = opts
    return engine


def _sqlite_pragmas(synchronous: str, *, memory: bool) -> tuple[str, ...]:
    """What every SQLite connection of an engine runs as it opens. No busy_timeout: the
    driver keeps it at 0 on the loop and waits for a lock another process holds on a
    worker thread, with the busy timeout. Nor wal_autocheckpoint: the driver sets it
    (checkpoints run off the loop)."""
    return (
        *(() if memory else ("PRAGMA journal_mode=WAL",)),
        f"PRAGMA synchronous={synchronous}",
        "PRAGMA foreign_keys=ON",
        # Deleted and overwritten content is zeroed, not left in free pages: a forgotten
        # person's read-model rows and key material must not survive in the file. Many
        # builds default to this (SQLITE_SECURE_DELETE); not all do.
        "PRAGMA secure_delete=ON",
        # ANALYZE, tiu's (gather_statistics) or one sent through this engine, samples
        # the indexes: its cost, and the write lock it holds, stay flat in the data.
        f"PRAGMA analysis_limit={ANALYSIS_LIMIT}",
    )


def _unencodable(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _pg_unstorable(text: str) -> bool:
    return "\x00" in text or _unencodable(text)


def _as_null(value: Any, unstorable: Callable[[str], bool]) -> Any:
    if type(value) is str:
        return None if unstorable(value) else value
    if type(value) is list:
        return [_as_null(v, unstorable) for v in value]
    return value


def _holds(value: Any, unstorable: Callable[[str], bool]) -> bool:
    if type(value) is str:
        return unstorable(value)
    return type(value) is list and any(type(v) is str and unstorable(v) for v in value)


def read_parameters(statement: str, parameters: Any, *, postgresql: bool) -> Any:
    """A read's parameters with every string the database cannot hold sent as NULL.

    No stored value holds a lone surrogate (not encodable as UTF-8) or, on PostgreSQL,
    NUL (its text cannot), yet the drivers refuse such a parameter outright: asyncpg
    with a server error, both with UnicodeEncodeError. Sent as NULL it equals nothing,
    so a lookup answers "not found" or an empty result on both backends. Reads only
    (statements starting with SELECT): the reads of the store and the repositories
    compare text by equality or ``ANY``, and filters refuse such strings themselves
    (``projections.query``). Writes keep the value and fail loudly.
    """
    unstorable = _pg_unstorable if postgresql else _unencodable
    if (
        type(parameters) not in (tuple, list)
        or not any(_holds(p, unstorable) for p in parameters)
        or statement.lstrip()[:6].upper() != "SELECT"
    ):
        return parameters
    return type(parameters)(_as_null(p, unstorable) for p in parameters)


def _install_read_hook(engine: AsyncEngine) -> None:
    postgresql = engine.dialect.name == "postgresql"

    def reads_of_unstorable_text_match_nothing(
        _conn: Any,
        _cursor: Any,
        statement: str,
        parameters: Any,
        _context: Any,
        executemany: bool,
    ) -> tuple[str, Any]:
        if executemany:
            return statement, parameters
        return statement, read_parameters(statement, parameters, postgresql=postgresql)

    event.listen(
        engine.sync_engine,
        "before_cursor_execute",
        reads_of_unstorable_text_match_nothing,
        retval=True,
    )


class _DropResultRows(logging.Filter):
    """SQLAlchemy logs fetched rows at DEBUG; rows hold hashes and personal data."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Row "))


_ROW_LOG_FILTER = _DropResultRows()


def _quiet_secret_logging() -> None:
    logger = logging.getLogger("sqlalchemy.engine.Engine")
    if _ROW_LOG_FILTER not in logger.filters:
        logger.addFilter(_ROW_LOG_FILTER)


def _install_sqlite_hooks(engine: AsyncEngine, driver: InlineSQLiteDBAPI) -> None:
    @event.listens_for(engine.sync_engine, "engine_disposed")
    def _stop_checkpoints(*_: Any) -> None:
        # A WAL checkpoint in progress on a worker thread is interrupted; AsyncEngine's
        # dispose (in SQLAlchemy's greenlet) waits, without blocking the loop, for its
        # thread to close its connection.
        driver.close_checkpointers()
        if in_greenlet():
            await_(driver.checkpoints_ended())

    @event.listens_for(engine.sync_engine, "reset")
    def _no_transaction_goes_back_to_the_pool(
        dbapi_connection: Any, _record: Any, state: Any
    ) -> None:
        # SQLAlchemy skips its rollback on return when it counts no transaction open. A
        # write begun on the driver, or one whose COMMIT was cancelled before it ran
        # (SQLAlchemy then counts the transaction ended), is still open: pooled so, it
        # would hold this process's writer lock and the file's for good.
        if state.transaction_was_reset and dbapi_connection.in_transaction:
            dbapi_connection.rollback()

    @event.listens_for(engine.sync_engine, "handle_error")
    def _cancelled_keeps_the_connection(context: Any) -> None:
        # SQLAlchemy takes a cancellation inside a statement for a lost connection and
        # drops it (opened again, with its pragmas, by a later checkout). The inline
        # driver lets a cancellation through only once the connection is its caller's
        # alone again (a statement on a worker thread interrupted and ended, a lock wait
        # given up): it stays pooled, as PostgreSQL's guarded reads' connections do.
        # Unless a statement's SQLite ended the transaction SQLAlchemy still counts
        # open (an interrupted write rolls it back): kept, its next statements would
        # commit one by one; dropped, they fail. A COMMIT or ROLLBACK (no statement)
        # that ended it is what SQLAlchemy was ending anyway.
        if isinstance(context.original_exception, asyncio.CancelledError):
            conn = context.connection
            context.is_disconnect = bool(
                context.statement is not None
                and conn is not None
                and conn.in_transaction()
                and not conn.connection.dbapi_connection.in_transaction
            )

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _off_loop(
        _conn: Any, cursor: Any, _sql: str, _params: Any, context: Any, _many: bool
    ) -> None:
        # Statements whose cost grows with the data ask for a worker thread (see
        # eventstore.sqlite_driver); the rest run inline.
        if context is not None and context.execution_options.get(OFF_LOOP):
            cursor.off_loop = True

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        driver = conn.connection.dbapi_connection
        if driver.write_begun and driver.in_transaction:
            # A write transaction begun on the driver (SQLiteDialect.begin_write):
            # SQLAlchemy's statements join it, and its COMMIT or ROLLBACK ends it.
            return
        # Straight to the driver (a statement through SQLAlchemy costs ~50 us more);
        # errors are wrapped as SQLAlchemy would, for translate_errors.
        statement = "BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN"
        try:
            driver.execute(statement)
        except sqlite3.Error as error:
            raise sa_exc.DBAPIError.instance(statement, None, error, sqlite3.Error) from error


async def gather_statistics(engine: AsyncEngine) -> None:
    """Gather SQLite's query-planner statistics of ``engine``'s database again
    (:func:`eventstore.sqlite_driver.gather_statistics`; its ``ANALYZE`` off the loop, with
    the write lock held 3-14 ms at 1,000,000 events). After migrations and a rebuild's
    swap, and at a WAL checkpoint once the log has grown fourfold, tiu does it itself
    (:data:`eventstore.sqlite_driver.STATISTICS_GROWTH`). Nothing on
    PostgreSQL: its autovacuum analyses tables as they change.

    Raises the store's typed errors: :class:`~eventstore.errors.AppendTimeout` if another
    writer held the lock past the busy timeout, else
    :class:`~eventstore.errors.StoreUnavailable`."""
    if not isinstance(engine.dialect.loaded_dbapi, InlineSQLiteDBAPI):
        return
    try:
        with translate_errors(engine.url.database):
            async with engine.connect() as conn:
                driver = (await conn.get_raw_connection()).dbapi_connection
                assert isinstance(driver, InlineConnection)
                try:
                    await driver.gather_statistics()
                except sqlite3.Error as error:
                    wrapped = sa_exc.DBAPIError.instance("ANALYZE", None, error, sqlite3.Error)
                    raise wrapped from error
    except sa_exc.DBAPIError as error:  # none translate_errors knows: still a typed error
        raise StoreUnavailable(f"planner statistics not gathered: {describe(error)}") from error


async def wal_checkpoints_ended(engine: AsyncEngine) -> None:
    """Wait for the WAL checkpoints ``engine`` runs off the loop to end (SQLite files;
    see :class:`eventstore.sqlite_driver.WalCheckpointer`): one in progress makes an
    explicit checkpoint report itself busy."""
    driver = engine.dialect.loaded_dbapi
    if isinstance(driver, InlineSQLiteDBAPI):
        await driver.checkpoints_ended()


async def begin_write(conn: AsyncConnection) -> None:
    """Begin a write transaction on ``conn`` (``BEGIN IMMEDIATE`` on SQLite)."""
    await conn.execution_options(**{WRITE_OPTION: True})
    await conn.begin()
