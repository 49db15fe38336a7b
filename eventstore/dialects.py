"""What differs between SQLite and PostgreSQL: serialising appends, claims, wake-ups.

PostgreSQL: a transaction-scoped advisory lock, taken just before the insert,
serialises appends so positions follow commit order (docs/ordering.md). A store append is
one call of ``tiu_append`` (migration 0008), sent outside a transaction: lock, heads,
version checks, hash chain and insert in one statement, committed as it ends. A unit
of work (a command's write) flushes in one call of ``tiu_command`` (migration 0012):
the writes it held back, then ``tiu_append``, then the inline checkpoints' move; sent
outside a transaction when nothing of the unit reached the server before, so that it
commits as it ends, else as the transaction's last statement before COMMIT. Either
way the heads are read by a later statement of the function than the lock, with a
snapshot taken after the lock was granted, as docs/ordering.md requires. Readers in other processes
are woken by NOTIFY, sent by a throttled background task after commit, never
inside the append transaction.

SQLite: ``BEGIN IMMEDIATE`` already holds the database's single write lock for
the whole transaction, so nothing more is needed. Commits of this process wake
its readers at once; commits of other processes are noticed by polling (a short
read of the head position every ``poll_interval``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import StaticPool
from sqlalchemy.util import greenlet_spawn

from eventstore import telemetry
from eventstore.engine import (
    SCHEMA_OPTION,
    begin_write,
    driver_round_trip,
    read_parameters,
    search_path_statement,
)
from eventstore.errors import (
    EventStoreError,
    KeyAlreadyClaimed,
    StoreUnavailable,
    WrongExpectedVersion,
)
from eventstore.grouping import whole
from eventstore.hashing import json_text, parse_json, recorded_at_text
from eventstore.records import (
    ANY,
    DECODED,
    EVENT_FIELDS,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    RecordedEvent,
    RowCodec,
    StreamData,
    StreamHead,
    StreamsLoad,
    WantedStream,
    uuid_from_hex,
)
from eventstore.schema import unique_keys
from eventstore.sqlite_driver import OFF_LOOP, TEXT_COLUMN, fetch_all
from eventstore.sqlite_driver import Connection as InlineConnection
from eventstore.translate import translate_errors
from eventstore.types import sqlite_datetime, sqlite_text

if TYPE_CHECKING:
    from uuid import UUID

    from eventstore.prepared import Deferred, DeferredStatement
    from eventstore.store import EventStore, _PendingAppend

log = logging.getLogger("eventstore")

#: First key of the two-int advisory lock: a project constant ("tiu" in ASCII).
#: The second is the OID of the ``events`` table, so two stores in one cluster
#: (different databases or schemas) never serialise each other.
ADVISORY_LOCK_CLASS: Final = 0x746975
NOTIFY_CHANNEL: Final = "tiu_events"
#: Session-level advisory locks of the projection workers take one bigint key hashed
#: from a scope, the current schema and a name, so that tenants (schemas) of one
#: database never contend for them. Bigint keys and the append lock's two-int keys are
#: apart in ``pg_locks`` (``objsubid`` 1 and 2), so the two can never collide.
LEADER_SCOPE: Final = "tiu-leader"
_SCHEMA_KEY: Final = "hashtextextended(:scope || ':' || current_schema() || ':' || :name, 0)"
NOTIFY_INTERVAL: Final = 0.01
_NUMBERED: Final = re.compile(r"\$(\d+)")


#: The columns of an appended row, in the order :meth:`Dialect.insert_events` takes them:
#: a record's fields (the category is kept in ``stream_category``).
EVENT_ROW_COLUMNS: Final = tuple(
    "stream_category" if name == "category" else name for name in EVENT_FIELDS
)
_COLUMN_LIST: Final = ", ".join(EVENT_ROW_COLUMNS)
_loads = parse_json


_MAYBE_EMPTY: Final = frozenset({"actor_id", "correlation_id", "causation_id", "command_id"})
_NUMBERS: Final = frozenset({"position", "version", "schema_version"})
#: The columns a record is read from, by "is it PostgreSQL". There the documents are
#: selected as jsonb's text, which the record parses only if it is read and which
#: ``decode_event`` validates without building a dict: the driver's JSONB codec parsed
#: both documents of every row (100k records: 1.11 s with the codec, 0.61 s as text;
#: raw asyncpg 0.54). On SQLite the text columns an append never leaves NULL or empty
#: are read by a converter (:data:`eventstore.sqlite_driver.TEXT_COLUMN`), which costs no
#: GIL round trip; the audit columns may hold NULL or "".
_READ_COLUMNS: Final = {
    False: ", ".join(
        c if c in _MAYBE_EMPTY or c in _NUMBERS else f'{c} AS "{c} [{TEXT_COLUMN}]"'
        for c in EVENT_ROW_COLUMNS
    ),
    True: ", ".join(
        f"{c}::text AS {c}" if c in {"data", "metadata"} else c for c in EVENT_ROW_COLUMNS
    ),
}


def _utc_time(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _pg_document(value: Any) -> Any:
    # SQLAlchemy's asyncpg adapter installs a JSONB codec on its connections, which
    # already decodes with the engine's deserializer; be ready for text too.
    return _loads(value) if isinstance(value, str) else value


def _read_all_sql(postgres: bool, until: bool, categories: int | None, types: int | None) -> str:
    """``SELECT <columns> FROM events WHERE ... ORDER BY position LIMIT ..`` with the
    parameters in this order: after, [until], [categories...], [types...], limit."""
    taken = 0

    def param() -> str:
        nonlocal taken
        taken += 1
        return f"${taken}" if postgres else "?"

    def any_of(count: int) -> str:
        if postgres:  # one array parameter
            return f"= ANY({param()}::text[])"
        return f"IN ({', '.join(param() for _ in range(count))})"

    # Pages must be read in position order from an index on position: SQLite would
    # otherwise pick the event_type index (or several stream_category ranges) and sort
    # every matching event of the log for each page, which made a replay quadratic
    # (measured: 8 s at 100k events, 203 s at 1M). A unary + keeps SQLite off an index;
    # one category is an ordered range of the (stream_category, position) index.
    no_index = "" if postgres else "+"
    where = [f"position > {param()}"]
    if until:
        where.append(f"position <= {param()}")
    if categories is not None:
        column = "stream_category" if categories == 1 else f"{no_index}stream_category"
        where.append(f"{column} {any_of(categories)}")
    if types is not None:
        where.append(f"{no_index}event_type {any_of(types)}")
    return (
        f"SELECT {_READ_COLUMNS[postgres]} FROM events WHERE {' AND '.join(where)} "  # noqa: S608
        f"ORDER BY position LIMIT {param()}"
    )


class Pooled:
    """The pooled connection of a connection in a store's write transaction on SQLite,
    with its inline driver connection and that one's ``sqlite3`` connection, found
    once for the transaction (:func:`pooled_while`)."""

    __slots__ = ("conn", "db", "driver", "raw", "sync")

    def __init__(self, conn: AsyncConnection, raw: Any) -> None:
        # Held, so its id names no other connection while the entry lives.
        self.conn = conn
        self.sync = conn.sync_connection
        self.raw = raw
        self.driver: InlineConnection = raw.dbapi_connection
        self.db = self.driver.driver_connection


#: The connections in a store's write transaction on SQLite (by ``id``: an
#: ``AsyncConnection`` hashes in Python) and their pooled connections
#: (:func:`pooled_while`). Reaching the pooled connection through SQLAlchemy's
#: properties (four calls) at each of a command's nine statements cost more than some
#: of the statements.
_pooled: dict[int, Pooled] = {}


def _entry(conn: AsyncConnection) -> Pooled | None:
    """``conn``'s entry, if it is in a store's write transaction on SQLite, whether or
    not its pooled connection is still valid."""
    if not _pooled:
        return None
    known = _pooled.get(id(conn))
    return known if known is not None and known.conn is conn else None


def pooled(conn: AsyncConnection) -> Pooled | None:
    """``conn``'s pooled connection, if it is in a store's write transaction on SQLite
    and still valid (invalidated meanwhile: see :func:`raw_connection`)."""
    known = _entry(conn)
    # Invalidated, the pooled connection has no driver connection any more; ``conn`` may
    # have a new one since (SQLAlchemy reconnects a connection it sees in no transaction).
    if known is None or known.raw.dbapi_connection is None:
        return None
    return known


class pooled_while:  # lower case: it reads as a function, ``with pooled_while(...):``
    """While the block runs, ``conn``'s pooled connection is ``raw`` (its SQLite inline
    driver's), known to :func:`raw_connection` and :func:`pooled` without a look
    through SQLAlchemy. For a store's write transaction, whose connection is neither
    closed nor invalidated while it runs: an error that would invalidate it ends the
    transaction. A class, not a generator-based context manager: one a transaction."""

    __slots__ = ("conn", "raw")

    def __init__(self, conn: AsyncConnection, raw: Any) -> None:
        self.conn = conn
        self.raw = raw  # None: nothing to know (another dialect)

    def __enter__(self) -> None:
        if self.raw is not None:
            _pooled[id(self.conn)] = Pooled(self.conn, self.raw)

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        if self.raw is not None:
            _pooled.pop(id(self.conn), None)


async def raw_connection(conn: AsyncConnection) -> Any:
    """The pooled DBAPI connection of ``conn`` (its ``driver_connection`` is the driver's)."""
    known = _entry(conn)
    if known is not None:
        if known.raw.dbapi_connection is not None:
            return known.raw
        # Lost inside a store's write transaction, which SQLite rolled back as the
        # connection closed: a new connection would run what follows outside it, each
        # statement committed alone and the earlier writes gone without an error.
        raise StoreUnavailable(
            "the connection was lost during the write transaction: it was rolled back"
        )
    sync = conn.sync_connection
    if sync is not None and not sync.closed and not sync.invalidated:
        # Connected: no I/O needed, so no greenlet hop (get_raw_connection makes one).
        return sync.connection
    return await conn.get_raw_connection()


def schema_of(engine: AsyncEngine) -> str | None:
    """The schema of ``engine``'s view (:data:`eventstore.engine.SCHEMA_OPTION`), or
    ``None`` for an engine that is no such view (an engine's options never change)."""
    return engine.get_execution_options().get(SCHEMA_OPTION)


#: :func:`follow_schema`'s default: the schema of the engine given.
_OF_ENGINE: Final[Any] = object()


async def follow_schema(engine: AsyncEngine, raw: Any, wanted: str | None = _OF_ENGINE) -> None:
    """Set ``raw``, checked out bare through ``engine`` (``engine.raw_connection()``,
    which fires no ``engine_connect`` event), to the schema of ``engine``'s view
    (``wanted``, if the caller knows it: :func:`schema_of`) if it last served another:
    the pool may be shared with other schemas' views. A no-op for an engine that is no
    such view."""
    if wanted is _OF_ENGINE:
        wanted = schema_of(engine)
    if raw.info.get(SCHEMA_OPTION) == wanted:
        return
    statement = search_path_statement(wanted)
    # Unknown until the SET is known to have run: one cut off after the server ran it
    # (a cancellation) must not leave the connection passing for its former schema.
    raw.info[SCHEMA_OPTION] = _PATH_UNKNOWN
    with driver_errors(engine, raw, statement):
        await raw.driver_connection.execute(statement)
    raw.info[SCHEMA_OPTION] = wanted


#: A pooled connection's path while a SET of it is in flight: equal to no schema.
_PATH_UNKNOWN: Final = object()


async def try_advisory_lock(conn: AsyncConnection, name: str, scope: str = LEADER_SCOPE) -> bool:
    """PostgreSQL: take the session lock ``(scope, current schema, name)`` if free."""
    got = await conn.scalar(
        text(f"SELECT pg_try_advisory_lock({_SCHEMA_KEY})"), {"scope": scope, "name": name}
    )
    return bool(got)


async def advisory_xact_lock(conn: AsyncConnection, name: str, scope: str) -> None:
    """PostgreSQL: wait for the lock ``(scope, current schema, name)`` and hold it until
    this transaction ends."""
    await conn.execute(
        text(f"SELECT pg_advisory_xact_lock({_SCHEMA_KEY})"), {"scope": scope, "name": name}
    )


async def advisory_unlock(conn: AsyncConnection, name: str, scope: str = LEADER_SCOPE) -> None:
    """PostgreSQL: give back a lock :func:`try_advisory_lock` took on this session."""
    await conn.execute(
        text(f"SELECT pg_advisory_unlock({_SCHEMA_KEY})"), {"scope": scope, "name": name}
    )


#: Projection workers of one schema each hold one of these slots (a session lock,
#: ``(WORKER_SCOPE, schema, slot)``) while they run, so each can count the others in
#: ``pg_locks`` and lead its share of the projectors; more workers than slots still
#: run, uncounted.
WORKER_SCOPE: Final = "tiu-worker"
WORKER_SLOTS: Final = 64
_SLOT_KEY: Final = "hashtextextended(:scope || ':' || current_schema() || ':' || g, 0)"


async def join_workers(conn: AsyncConnection) -> int | None:
    """PostgreSQL: take the lowest free worker slot on this session; ``None`` if all
    are taken. LIMIT 1 stops the scan at the first slot granted."""
    slot = await conn.scalar(
        text(
            f"SELECT g FROM generate_series(0, {WORKER_SLOTS - 1}) g "  # noqa: S608  # constants
            f"WHERE pg_try_advisory_lock({_SLOT_KEY}) LIMIT 1"
        ),
        {"scope": WORKER_SCOPE},
    )
    return None if slot is None else int(slot)


async def count_workers(conn: AsyncConnection) -> int:
    """PostgreSQL: how many sessions hold a worker slot of the current schema. A
    bigint advisory key shows in ``pg_locks`` as ``classid`` (high 32 bits) and
    ``objid`` (low 32 bits) with ``objsubid`` 1."""
    count = await conn.scalar(
        text(
            "SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "  # noqa: S608  # constants
            "AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) IN "
            f"(SELECT {_SLOT_KEY} FROM generate_series(0, {WORKER_SLOTS - 1}) g)"
        ),
        {"scope": WORKER_SCOPE},
    )
    return int(count or 0)


class CheckpointsNotMoved(Exception):  # a signal inside the library, never raised to callers
    """An inline checkpoint was not where a unit's append started: it missed events
    (:meth:`Dialect.command_write`); the write was rolled back."""


async def give_back(raw: Any) -> None:
    """Return ``raw``, checked out bare (``engine.raw_connection()``), to the pool.

    In SQLAlchemy's greenlet, as its own ``AsyncConnection.close`` does: a connection
    the pool does not keep (an overflow connection coming back to a full pool) is
    closed there, and closing an asyncpg connection awaits. Returned outside one, the
    close failed ("MissingGreenlet", logged by the pool) and left the server session
    open until the object was collected."""
    await greenlet_spawn(raw.close)


class HeldConnection:
    """The pooled driver connection the store's group writer keeps from one group to
    the next while callers keep it busy (:class:`eventstore.grouping.GroupQueue`),
    given back when the writer goes idle. Only the task writing the group (the writer,
    or a caller alone: ``GroupQueue``'s ``alone_inline``) touches it."""

    __slots__ = ("_closing", "_in_task", "raw")

    def __init__(self, dialect: Dialect) -> None:
        self.raw: Any = None
        #: Whether the driver's close awaits (asyncpg), so the connection is given back
        #: in a task; SQLite's inline driver closes at once, before the writer ends (an
        #: engine disposed right after finds it back in the pool, and closes it).
        self._in_task = dialect.round_trips
        self._closing: set[asyncio.Task[None]] = set()

    def release(self) -> None:
        """Give the connection back (from the writer's synchronous end: where closing
        it awaits, in a task of its own, which :meth:`aclose` waits for)."""
        raw, self.raw = self.raw, None
        if raw is None:
            return
        if not self._in_task:
            raw.close()
            return
        task = asyncio.get_running_loop().create_task(give_back(raw))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing)


def driver_errors(engine: AsyncEngine, raw: Any, statement: str) -> _DriverErrors:
    """Re-raise a driver error of ``statement`` as the SQLAlchemy exception
    ``conn.execute`` would have raised (and log the statement when echo is on)."""
    return _DriverErrors(engine, raw, statement)


class _DriverErrors:
    """:func:`driver_errors`: a class, not a generator-based context manager, since a
    command enters several and ``contextlib``'s wrapper cost ~2 us each (profiled).

    One may also cover several statements sent in a row (an append's transaction: one
    scope instead of one a statement, ~5 Python calls less each): :meth:`at` names the
    statement that runs next, and logs it when echo is on; while no statement is named
    (``""``), an error raised is not the driver's and is left as it is."""

    __slots__ = ("echo", "engine", "raw", "statement")

    def __init__(self, engine: AsyncEngine, raw: Any, statement: str) -> None:
        self.engine = engine
        self.raw = raw
        self.statement = statement
        self.echo = False

    def __enter__(self) -> _DriverErrors:
        logger = self.engine.sync_engine.logger
        self.echo = logger.isEnabledFor(logging.INFO)
        if self.echo and self.statement:  # echo: log it as SQLAlchemy would
            logger.info("%s [driver statement; parameters hidden]", self.statement.strip())
        return self

    def at(self, statement: str) -> None:
        """``statement`` runs next, in this scope."""
        self.statement = statement
        if self.echo:
            self.engine.sync_engine.logger.info(
                "%s [driver statement; parameters hidden]", statement.strip()
            )

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        if not isinstance(error, Exception) or not self.statement:
            return  # no error, or one that is not the driver's to translate
        dialect = self.engine.dialect
        dbapi = dialect.loaded_dbapi
        raw = self.raw
        orig: BaseException = error
        handle = getattr(raw.dbapi_connection, "_handle_exception", None)
        if handle is not None and not isinstance(error, dbapi.Error):
            try:
                handle(error)  # asyncpg: raises the DBAPI-shaped twin of the error
            except Exception as translated:
                orig = translated
        if not isinstance(orig, dbapi.Error):
            return
        invalidated = dialect.is_disconnect(orig, raw.dbapi_connection, None)
        raise sa_exc.DBAPIError.instance(
            self.statement,
            None,
            orig,
            dbapi.Error,
            connection_invalidated=invalidated,
            dialect=dialect,
        ) from error


class Dialect:
    name: str = "generic"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.database_label = engine.url.render_as_string(hide_password=True)
        self._schema = schema_of(engine)
        self._head = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- the append path ---------------------------------------------------------------------
    #
    # The statements under the append lock run on the driver connection of the
    # SQLAlchemy transaction, with SQL prepared once: SQLAlchemy's per-execution work
    # (~90 us a statement, profiled) was most of an append. Driver errors are wrapped
    # back into SQLAlchemy's exceptions, so translate_errors sees what it always saw.

    async def pooled_for_write(self, conn: AsyncConnection) -> Any:
        """The pooled connection a store's write transaction on ``conn`` keeps known
        (:class:`pooled_while`), or ``None``: only SQLite's inline driver, whose
        statements the store sends to it directly."""
        return None

    async def begin_write(self, conn: AsyncConnection) -> None:
        """Begin ``conn``'s write transaction. PostgreSQL takes no lock at BEGIN (the
        append lock comes with the append), so a transaction the connection's reads
        already began is kept."""
        if not conn.in_transaction():
            await begin_write(conn)

    async def commit(self, conn: AsyncConnection) -> None:
        """COMMIT the write transaction on ``conn``: none is open where the flush was
        the whole transaction (PostgreSQL's ``tiu_command`` sent outside one)."""
        if conn.in_transaction():
            await conn.commit()

    def commit_cancelled(
        self, store: EventStore, conn: AsyncConnection, event_id: UUID, head: int
    ) -> None:
        """After a store transaction's COMMIT on ``conn`` was cancelled, its last event
        ``event_id`` at position ``head``: :meth:`appended` if it committed all the same,
        where that can be known without a round trip (SQLite). Elsewhere the known
        head moves at the next append or wake-up."""

    async def check_versions(
        self, conn: AsyncConnection, expected: Mapping[str, int]
    ) -> tuple[dict[str, StreamHead], int | None]:
        """Raise :class:`WrongExpectedVersion` for a stream not at its expected version,
        where the transaction's lock makes the answer final, and return the heads read
        and the log's highest position (final too, until the transaction appends: the
        append takes them as they are). Not on PostgreSQL: before the append lock a
        read proves nothing, and the append checks them under it."""
        return {}, None

    async def heads_and_position(
        self, conn: AsyncConnection, stream_ids: Sequence[str]
    ) -> tuple[dict[str, StreamHead], int]:
        """Each stream's last version and hash, and the log's highest position, read
        under the append lock, which this transaction then holds until it ends."""
        raise NotImplementedError

    async def insert_events(self, conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        """Insert rows given in :data:`EVENT_ROW_COLUMNS` order (JSON as canonical text)."""
        raise NotImplementedError

    #: Whether a write transaction holds writes back to send them with its append
    #: (:class:`eventstore.prepared.Deferred`, :meth:`command_write`).
    holds_writes = False

    async def command_write(
        self,
        conn: AsyncConnection,
        store: EventStore,
        appends: list[_PendingAppend],
        *,
        checks: int,
        held: Deferred,
        checkpoints: Sequence[str],
    ) -> tuple[list[AppendResult], bool]:
        """A unit of work's flush where :attr:`holds_writes`: the writes ``held`` back,
        the appends, all or nothing (the first ``checks`` of them append no events:
        version checks of streams only read) and the move of the ``checkpoints`` from
        just before the first appended position to the last (:class:`CheckpointsNotMoved`
        if one was elsewhere). Returns the appends' results (checks left out) and
        whether it committed (sent outside a transaction: then ``before_commit`` was
        awaited before it)."""
        raise NotImplementedError

    #: Whether :meth:`append_group` may run appends on a bare pooled driver connection.
    direct_appends = True
    #: Whether a connection checked out bare may have to follow a view's schema
    #: (:func:`follow_schema`): tenants' views are PostgreSQL's; a SQLite engine is none.
    follows_schema = True
    #: Whether a statement can be in flight while its caller awaits (a network round
    #: trip); not with the inline SQLite driver, which waits only for locks.
    round_trips = True
    #: Whether a group committer's caller alone may write its own group of one, in its
    #: own task (:class:`eventstore.grouping.GroupQueue`'s ``alone_inline``): only where
    #: a cancellation that interrupts the write leaves its connection clean and nothing
    #: half-done. The inline SQLite driver on pooled connections (the transaction is
    #: rolled back or committed); not a shared :memory: connection, which every caller
    #: uses, nor a round trip in flight (PostgreSQL).
    writes_in_caller = False

    async def append_group(
        self,
        store: EventStore,
        pending: list[_PendingAppend],
        held: HeldConnection | None = None,
    ) -> list[AppendResult | WrongExpectedVersion] | None:
        """Appends in a transaction of their own, run on a pooled driver connection
        without an SQLAlchemy ``Connection`` around it: the general path's statements
        (:meth:`EventStore.transaction`: lock, heads, insert, commit) minus SQLAlchemy's
        per-transaction work (checkout, begin and commit events, result objects), which
        was ~100 us of a ~250 us SQLite append and ~300 us of a ~1 ms PostgreSQL one
        (profiled). ``None`` where it cannot be used: the store then takes the general
        path. A connection whose state is unknown after an error (lost, or cancelled
        mid-statement) is invalidated, not returned to the pool.

        With ``held`` (the group writer's), the connection is taken from it and left in
        it for the next group; after an error it goes back to the pool instead.
        """
        if not self.direct_appends:
            return None
        with translate_errors(self.database_label):
            raw = None
            if held is not None:
                raw, held.raw = held.raw, None  # the writer's again if this group succeeds
            if raw is None:
                raw = await self.engine.raw_connection()
            try:
                if self.follows_schema:
                    await follow_schema(self.engine, raw, self._schema)
                outcomes = await self._append_on(raw, store, pending)
            except BaseException as error:
                if getattr(error, "connection_invalidated", False) or (
                    # Cut off mid-round-trip, its session's state is unknown. SQLite's
                    # inline driver lets a cancellation through only once the
                    # connection is free, and _append_on rolls back what it began; any
                    # other interruption (KeyboardInterrupt) may leave a statement
                    # running on a thread.
                    not isinstance(error, Exception)
                    and (self.round_trips or not isinstance(error, asyncio.CancelledError))
                ):
                    raw.invalidate()
                await asyncio.shield(give_back(raw))  # a no-op once invalidated
                raise
            if held is None:
                await asyncio.shield(give_back(raw))
            else:
                held.raw = raw
            return outcomes

    async def _append_on(
        self, raw: Any, store: EventStore, pending: list[_PendingAppend]
    ) -> list[AppendResult | WrongExpectedVersion]:
        raise NotImplementedError

    async def read_events(
        self,
        conn: AsyncConnection,
        *,
        after_position: int,
        limit: int,
        until_position: int | None = None,
        categories: Sequence[str] | None = None,
        types: Sequence[str] | None = None,
    ) -> list[RecordedEvent]:
        """The log after ``after_position`` in position order (``EventStore.read_all``).

        On the driver, like the append: SQLAlchemy's per-row result processing was
        half of reading a page (profiled in replays).
        """
        sql = _read_all_sql(
            self.name == "postgresql",
            until_position is not None,
            None if categories is None else len(categories),
            None if types is None else len(types),
        )
        params: list[Any] = [after_position]
        if until_position is not None:
            params.append(until_position)
        for values in (categories, types):
            if values is not None:
                params.extend(self._any_of(values))
        params.append(limit)
        return await self._select(conn, sql, params, off_loop=True)

    async def read_stream_events(
        self, conn: AsyncConnection, stream_id: str, from_version: int
    ) -> list[RecordedEvent]:
        """One stream from ``from_version`` on, in version order."""
        return await self._select(conn, self._read_stream_sql, (stream_id, from_version))

    async def read_streams_data(
        self, conn: AsyncConnection, from_versions: Mapping[str, int]
    ) -> list[StreamData]:
        """What folding needs of several streams' events, grouped by stream, each in
        version order: five columns, without decoding ids, metadata or timestamps
        (most of the cost of reading a record, profiled on folds)."""
        raw = await raw_connection(conn)
        rows: list[Any] = []
        with self.driver_errors(raw, self._stream_data_sql):
            for stream_id, from_version in from_versions.items():
                rows.extend(
                    await driver_round_trip(
                        conn,
                        self._fetch(
                            raw.driver_connection, self._stream_data_sql, (stream_id, from_version)
                        ),
                    )
                )
        return self._stream_data(rows)

    async def load_streams(
        self,
        conn: AsyncConnection,
        command_id: str | None,
        wanted: Sequence[WantedStream],
    ) -> StreamsLoad:
        """See :meth:`EventStore.load_streams`."""
        raw = await raw_connection(conn)
        sql = self._load_sql
        with self.driver_errors(raw, sql):
            rows = await driver_round_trip(
                conn, self._fetch(raw.driver_connection, sql, (command_id, *self._wanted(wanted)))
            )
        document = self._codec.document
        processed = None
        snapshots: dict[str, tuple[int, Any]] = {}
        events: list[StreamData] = []
        for kind, stream_id, version, event_type, schema_version, doc in rows:
            if kind == 2:
                data = document(doc)
                events.append(StreamData(stream_id, version, event_type, schema_version, data))
            elif kind == 1:
                snapshots[stream_id] = (version, document(doc))
            else:
                processed = (stream_id, document(doc), event_type)
        return StreamsLoad(processed, snapshots, events)

    _load_sql: str

    @staticmethod
    def _wanted(wanted: Sequence[WantedStream]) -> tuple[Any, ...]:
        raise NotImplementedError

    async def fetch(self, conn: AsyncConnection, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        """The rows of ``sql`` (``$1``-style parameters) run on ``conn``'s driver
        connection, prepared once: for small hot reads, where SQLAlchemy's
        per-execution work (~90 us, profiled) would be most of the cost."""
        raw = await raw_connection(conn)
        sql = self._native(sql)
        with self.driver_errors(raw, sql):
            return await driver_round_trip(conn, self._fetch(raw.driver_connection, sql, params))

    @staticmethod
    def _native(sql: str) -> str:
        return sql

    def _stream_data(self, rows: Sequence[Any]) -> list[StreamData]:
        document = self._codec.document
        return [StreamData(r[0], r[1], r[2], r[3], document(r[4])) for r in rows]

    # What differs in a read: the SQL of one stream, how an IN list is passed, how rows
    # are fetched, and how the driver hands back event ids, JSON and timestamps.
    _read_stream_sql: str
    _stream_data_sql: str

    @staticmethod
    def _any_of(values: Sequence[str]) -> list[Any]:
        return list(values)  # one parameter per value

    async def _fetch(self, driver: Any, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        raise NotImplementedError

    #: How a read row's event id, documents and timestamp are decoded (a record does
    #: it on first access; a fold's and a command's reads decode documents at once).
    _codec: RowCodec

    async def _select(
        self, conn: AsyncConnection, sql: str, params: Sequence[Any], *, off_loop: bool = False
    ) -> list[RecordedEvent]:
        raw = await raw_connection(conn)
        with self.driver_errors(raw, sql):
            if off_loop:
                rows = await driver_round_trip(conn, self._fetch_off_loop(raw, sql, params))
            else:
                rows = await driver_round_trip(
                    conn, self._fetch(raw.driver_connection, sql, params)
                )
        return RecordedEvent.from_rows(rows, self._codec)

    async def _fetch_off_loop(self, raw: Any, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        """:meth:`_fetch` for a read whose rows are many (a page of the log): PostgreSQL's
        driver waits for the server off the loop anyway."""
        return await self._fetch(raw.driver_connection, sql, params)

    def driver_errors(self, raw: Any, statement: str) -> _DriverErrors:
        return driver_errors(self.engine, raw, statement)

    def _insert_keys(self) -> Any:
        return sqlite_insert(unique_keys).on_conflict_do_nothing()

    async def claim_key(
        self, conn: AsyncConnection, scope: str, key: str, stream_id: str, now: datetime
    ) -> None:
        with translate_errors(self.database_label):
            # ON CONFLICT DO NOTHING keeps a PostgreSQL transaction usable after a clash.
            result = await conn.execute(
                self._insert_keys().returning(unique_keys.c.stream_id),
                {"scope": scope, "key": key, "stream_id": stream_id, "claimed_at": now},
            )
            if result.first() is not None:
                return
            holder = await conn.scalar(
                select(unique_keys.c.stream_id).where(
                    unique_keys.c.scope == scope, unique_keys.c.key == key
                )
            )
        if holder != stream_id:
            raise KeyAlreadyClaimed(scope, holder)

    # -- wake-ups ----------------------------------------------------------------------------

    def appended(self, store: EventStore, head: int) -> None:
        """Called after a COMMIT that appended up to ``head``."""
        self._advance(head)

    def _advance(self, head: int) -> None:
        if head <= self._head:
            return
        self._head = head
        still: list[tuple[int, asyncio.Future[None]]] = []
        for after, future in self._waiters:
            if head > after:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((after, future))
        self._waiters = still

    async def wait_for_append(self, store: EventStore, after: int, timeout: float) -> bool:
        if self._head > after:
            return True
        await self._ensure_listening()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((after, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        finally:
            self._waiters = [(a, f) for a, f in self._waiters if f is not future]
        return True

    async def _ensure_listening(self) -> None:
        """Start cross-process wake-ups, where the dialect has them."""

    @property
    def known_head(self) -> int:
        """The highest position this process has seen committed: its own appends, and
        other processes' as NOTIFY (PostgreSQL) or a wait's polling report them."""
        return self._head

    async def follow_head(self) -> None:
        """Keep :attr:`known_head` up with other processes (PostgreSQL: LISTEN)."""
        await self._ensure_listening()

    async def aclose(self) -> None:
        for _, future in self._waiters:
            future.cancel()
        self._waiters.clear()


# What an append reads under the write lock, in one statement: the log's highest
# position (the arm with a NULL stream id), then each stream's head, an index seek on
# (stream_id, version) each. One statement, not one per stream and one for the
# position: three heads and the position in one took 5.6-5.8 us of sqlite3 against
# 6.5-6.8 for four (timed side by side), and one statement less for SQLAlchemy's
# error and telemetry wrappers around each. At most _HEADS_PER_STATEMENT streams in one, under
# SQLite's limit of 500 arms in a compound SELECT.
_HEADS_PER_STATEMENT: Final = 200
_SQLITE_POSITION_ARM: Final = "SELECT NULL, coalesce(max(position), 0), NULL FROM events"


@functools.lru_cache(maxsize=64)
def _sqlite_heads(streams: int, position: bool) -> str:
    """The statement reading ``streams`` heads (parameters ``?1``..), and the position."""
    arms = [_SQLITE_POSITION_ARM] if position else []
    arms += [
        f"SELECT ?{n}, * FROM (SELECT version, hash FROM events WHERE stream_id = ?{n} "  # noqa: S608  # numbered parameters only
        "ORDER BY version DESC LIMIT 1)"
        for n in range(1, streams + 1)
    ]
    return " UNION ALL ".join(arms)


_NO_HEAD: Final = StreamHead(0, None)  # a stream with no event
_SQLITE_INSERT: Final = (
    f"INSERT INTO events ({_COLUMN_LIST}) "  # noqa: S608  # constant column names
    f"VALUES ({', '.join('?' * len(EVENT_ROW_COLUMNS))})"
)


_READ_STREAM: Final = (
    "SELECT {} FROM events WHERE stream_id = $1 AND version >= $2 ORDER BY version"
)
_DATA_COLUMNS: Final = ("stream_id", "version", "event_type", "schema_version", "data")
_STREAM_DATA: Final = (
    f"SELECT {', '.join(_DATA_COLUMNS)} FROM events "  # noqa: S608  # constant column names
    "WHERE stream_id = $1 AND version >= $2 ORDER BY version"
)


# PostgreSQL: a command's reads before it decides, in one statement (one round trip;
# SQLite runs index seeks one by one instead, see SQLiteDialect.load_streams): its
# idempotency record (kind 0, its command type in the event type's column), the
# snapshots of the streams it loads that match their
# decider (kind 1), and the events after them (kind 2). "w" is the wanted streams: id,
# decider name (NULL: no snapshot), decider version, and the version the caller already
# holds folded (0: none): a snapshot at or below it is not read, nor are the events up
# to it.
_LOAD_TAIL: Final = """,
s AS (
    SELECT s.stream_id, s.version, s.state FROM w
    JOIN snapshots s ON s.stream_id = w.id AND s.decider = w.decider
        AND s.decider_version = w.dv AND s.version > w.since
)
SELECT 0, stream_id, 0, command_type, 0, outcome FROM processed_commands WHERE command_id = $1
UNION ALL
SELECT 1, stream_id, version, NULL, 0, state FROM s
UNION ALL
SELECT 2, e.stream_id, e.version, e.event_type, e.schema_version, e.data FROM w
JOIN events e ON e.stream_id = w.id
    AND e.version > coalesce((SELECT s.version FROM s WHERE s.stream_id = w.id), w.since)
ORDER BY 1, 2, 3"""
_PG_LOAD: Final = (
    "WITH w AS (SELECT * FROM unnest($2::text[], $3::text[], $4::int[], $5::int[]) "  # noqa: S608
    "AS w(id, decider, dv, since))" + _LOAD_TAIL
)


_SQLITE_PROCESSED: Final = (
    "SELECT stream_id, outcome, command_type FROM processed_commands WHERE command_id = ?"
)


# SQLite: a command's load of one stream in one statement, by (with the idempotency
# record, with a snapshot): each arm an index seek, tagged 0 (the record, its command
# type in the schema version's column), 1 (the
# snapshot) or 2 (events after the snapshot, if one is read, else after the version
# the caller holds). Parameters: command id, stream id, decider, decider version, held.
_SQLITE_SNAPSHOT_WHERE: Final = (
    "stream_id = ?2 AND decider = ?3 AND decider_version = ?4 AND version > ?5"
)
_SQLITE_LOAD_ARMS: Final = (
    "SELECT 0, 0, stream_id, command_type, outcome FROM processed_commands WHERE command_id = ?1",
    f"SELECT 1, version, NULL, 0, state FROM snapshots WHERE {_SQLITE_SNAPSHOT_WHERE}",  # noqa: S608
)
_SQLITE_LOAD: Final = {
    (processed, snapshot): " UNION ALL ".join(
        [
            *([_SQLITE_LOAD_ARMS[0]] if processed else []),
            *([_SQLITE_LOAD_ARMS[1]] if snapshot else []),
            "SELECT 2, version, event_type, schema_version, data FROM events "  # noqa: S608
            "WHERE stream_id = ?2 AND version > "
            + (
                f"coalesce((SELECT version FROM snapshots WHERE {_SQLITE_SNAPSHOT_WHERE}), ?5)"  # noqa: S608
                if snapshot
                else "?5"
            ),
        ]
    )
    for processed in (False, True)
    for snapshot in (False, True)
}
_KIND_AND_VERSION: Final = operator.itemgetter(0, 1)


def _logged(db: Any, event_id: Any) -> bool:
    """Whether the event ``event_id`` (a UUID) is in the log, read on sqlite3 ``db``."""
    with contextlib.suppress(Exception):  # unknown: taken as not logged
        found = db.execute("SELECT 1 FROM events WHERE event_id = ?", (event_id.hex,))
        return found.fetchone() is not None
    return False


def _numbered_qmarks(sql: str) -> str:
    """``$n`` parameters as SQLite's numbered ``?n``."""
    return _NUMBERED.sub(r"?\1", sql)


class SQLiteDialect(Dialect):
    name = "sqlite"
    round_trips = False
    follows_schema = False
    _read_stream_sql = _numbered_qmarks(_READ_STREAM.format(_READ_COLUMNS[False]))
    _stream_data_sql = _numbered_qmarks(_STREAM_DATA)
    _codec = RowCodec(uuid_from_hex, _loads, sqlite_datetime)  # CHAR(32) hex, JSON, UTC text

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.database_label = engine.url.database or ":memory:"
        # A shared :memory: database has one connection, which readers use too.
        self.direct_appends = not isinstance(engine.pool, StaticPool)
        self.writes_in_caller = self.direct_appends
        # Nor are its log pages read on a worker thread: every caller's statements run on
        # that one connection, and a cancelled page interrupts whatever statement another
        # caller's page is running on it at the time.
        self._pages_off_loop = self.direct_appends

    async def pooled_for_write(self, conn: AsyncConnection) -> Any:
        sync = conn.sync_connection
        if sync is not None and sync.get_execution_options().get(OFF_LOOP):
            return None  # its statements go to a worker thread: the general path
        return await raw_connection(conn)

    async def begin_write(self, conn: AsyncConnection) -> None:
        # A read transaction cannot become the writer safely (SQLITE_BUSY_SNAPSHOT once
        # another connection committed since it began): end it, then BEGIN IMMEDIATE.
        if conn.in_transaction():
            await conn.rollback()
        if not self.direct_appends:  # a shared :memory: connection: SQLAlchemy's begin
            await begin_write(conn)
            return
        # On the driver, as the direct append does: SQLAlchemy's begin (the transaction
        # object, its events, the execution options) cost ~70 us a command (profiled).
        # A statement sent through SQLAlchemy meanwhile joins this transaction (see
        # eventstore.engine); closing the connection rolls back whatever is left.
        raw = await raw_connection(conn)
        with self.driver_errors(raw, "BEGIN IMMEDIATE"):
            await raw.dbapi_connection.begin_write()

    async def commit(self, conn: AsyncConnection) -> None:
        # First: StoreUnavailable if the connection was lost inside the transaction,
        # rather than commit what SQLAlchemy sent on a new one since.
        raw = await raw_connection(conn)
        if conn.in_transaction():  # begun or joined by SQLAlchemy: it ends it
            await conn.commit()
            return
        driver: InlineConnection = raw.dbapi_connection
        if driver.in_transaction:
            with self.driver_errors(raw, "COMMIT"):
                await driver.commit_async()

    def commit_cancelled(
        self, store: EventStore, conn: AsyncConnection, event_id: UUID, head: int
    ) -> None:
        known = pooled(conn)
        if known is not None:
            self._appended_if_logged(store, known.driver, known.db, event_id, head)

    def _appended_if_logged(
        self, store: EventStore, driver: InlineConnection, db: Any, event_id: UUID, head: int
    ) -> None:
        """After a COMMIT whose caller was cancelled: if it committed on its thread
        before the cancellation came through (its caller waited for it), the log has
        ``event_id``, so the known head moves to ``head`` now, as after any COMMIT, not
        at the next append."""
        if not driver.in_transaction and _logged(db, event_id):
            self.appended(store, head)

    async def check_versions(
        self, conn: AsyncConnection, expected: Mapping[str, int]
    ) -> tuple[dict[str, StreamHead], int | None]:
        # Under BEGIN IMMEDIATE nobody else writes: the heads and position read now are
        # final until this transaction appends.
        raw = await raw_connection(conn)
        with self.driver_errors(raw, "") as errors:
            heads, position = self._heads_and_position(
                raw.driver_connection, list(expected), errors
            )
        for stream_id, version in expected.items():
            head = heads.setdefault(stream_id, _NO_HEAD)
            if head.version != version:
                raise WrongExpectedVersion(stream_id, version, head.version)
        return heads, position

    async def heads_and_position(
        self, conn: AsyncConnection, stream_ids: Sequence[str]
    ) -> tuple[dict[str, StreamHead], int]:
        raw = await raw_connection(conn)
        with self.driver_errors(raw, "") as errors:
            return self._heads_and_position(raw.driver_connection, stream_ids, errors)

    @staticmethod
    def _heads_and_position(
        db: Any, stream_ids: Sequence[str], errors: _DriverErrors
    ) -> tuple[dict[str, StreamHead], int]:
        """On sqlite3 connection ``db``, its statements in the scope of ``errors``."""
        # Inline sqlite3 (eventstore.sqlite_driver): see _sqlite_heads.
        heads: dict[str, StreamHead] = {}
        position = 0
        for start in range(0, max(len(stream_ids), 1), _HEADS_PER_STATEMENT):
            chunk = stream_ids[start : start + _HEADS_PER_STATEMENT]
            sql = _sqlite_heads(len(chunk), start == 0)
            errors.at(sql)
            rows = db.execute(sql, chunk).fetchall()
            for stream_id, version, hash_ in rows:
                if stream_id is None:
                    position = version
                else:
                    heads[stream_id] = StreamHead(version, hash_)
        return heads, position

    async def insert_events(self, conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
        raw = await raw_connection(conn)
        with self.driver_errors(raw, "") as errors:
            self._insert_events(raw.driver_connection, rows, errors)

    @staticmethod
    def _insert_events(db: Any, rows: list[tuple[Any, ...]], errors: _DriverErrors) -> None:
        values = [(*r[:1], r[1].hex, *r[2:13], sqlite_text(r[13]), r[14]) for r in rows]
        errors.at(_SQLITE_INSERT)
        db.executemany(_SQLITE_INSERT, values)

    async def _append_on(
        self, raw: Any, store: EventStore, pending: list[_PendingAppend]
    ) -> list[AppendResult | WrongExpectedVersion]:
        driver: InlineConnection = raw.dbapi_connection
        db = driver.driver_connection  # once: the pool's proxy reaches it through three calls
        # One scope for the transaction's statements, each named as it runs; what runs
        # between them raises no driver error (a fault hook's is not translated).
        try:
            with self.driver_errors(raw, "BEGIN IMMEDIATE") as errors:
                await driver.begin_write()
                heads, position = self._heads_and_position(db, store.lock_list(pending), errors)
                rows, outcomes = store.plan(pending, {}, heads, position, refuse=True)
                if rows:
                    self._insert_events(db, rows, errors)
                if store.before_commit is not None:
                    errors.statement = ""
                    await store.before_commit(store.lock_list(pending))
                errors.at("COMMIT")
                try:
                    await driver.commit_async()
                except asyncio.CancelledError:
                    if rows:
                        self._appended_if_logged(store, driver, db, rows[-1][1], rows[-1][0])
                    raise
        finally:
            if driver.in_transaction:
                driver.rollback()
        return outcomes

    async def _fetch(self, driver: Any, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        return fetch_all(driver, sql, read_parameters(sql, params, postgresql=False))

    async def load_streams(
        self,
        conn: AsyncConnection,
        command_id: str | None,
        wanted: Sequence[WantedStream],
    ) -> StreamsLoad:
        # A statement per stream, not PostgreSQL's one statement: with the inline driver
        # a statement has no round trip to save, and SQLite ran the combined statement
        # (json_each, a CTE, UNION ALL, ORDER BY) in ~190 us, several times the seeks
        # (profiled on CreateTask, whose load reads three streams). Each stream's
        # statement is its index seeks in a UNION ALL (the idempotency record with the
        # first): 7 us where the three seeks apart took 14 (timeit, CreateTask's load).
        raw = await raw_connection(conn)
        db = raw.driver_connection
        document = self._codec.document
        processed = None
        snapshots: dict[str, tuple[int, Any]] = {}
        events: list[StreamData] = []
        streams = sorted(set(wanted))
        with self.driver_errors(raw, _SQLITE_LOAD[True, True]):
            if command_id is not None and not streams:
                found = await self._fetch(db, _SQLITE_PROCESSED, (command_id,))
                if found:
                    processed = (found[0][0], document(found[0][1]), found[0][2])
            ask = command_id
            for stream_id, decider, decider_version, held in streams:
                sql = _SQLITE_LOAD[ask is not None, decider is not None]
                rows = list(
                    await self._fetch(db, sql, (ask, stream_id, decider, decider_version, held))
                )
                ask = None
                rows.sort(key=_KIND_AND_VERSION)  # in the order of the arms, by version
                for kind, version, text, schema_version, doc in rows:
                    if kind == 2:
                        events.append(
                            StreamData(stream_id, version, text, schema_version, document(doc))
                        )
                    elif kind == 1:
                        snapshots[stream_id] = (version, document(doc))
                    else:  # the record's arm: its command type where others' is
                        processed = (text, document(doc), schema_version)
        return StreamsLoad(processed, snapshots, events)

    async def _fetch_off_loop(self, raw: Any, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        # On a worker thread (eventstore.sqlite_driver): a page of 1,000 events is
        # ~2-5 ms of SQLite and row building, which inline held the loop for.
        if not self._pages_off_loop:
            rows = await self._fetch(raw.driver_connection, sql, params)
            await asyncio.sleep(0)  # a loop reading page after page lets others run
            return rows
        driver: InlineConnection = raw.dbapi_connection
        values = read_parameters(sql, params, postgresql=False)
        return await driver.off_loop(fetch_all, raw.driver_connection, sql, values)

    _native = staticmethod(functools.lru_cache(maxsize=64)(_numbered_qmarks))


_PG_STREAMS_DATA: Final = (
    f"SELECT {', '.join(f'e.{c}' for c in _DATA_COLUMNS)} "  # noqa: S608
    "FROM unnest($1::text[], $2::int[]) AS s(id, v) "
    "JOIN events AS e ON e.stream_id = s.id AND e.version >= s.v "
    "ORDER BY e.stream_id, e.version"
)
_PG_APPEND: Final = (
    "SELECT * FROM tiu_append($1::text[], $2::text[], $3::bigint[], $4::int[], $5::text[], "
    "$6::text[], $7::text[], $8::text[], $9::text[], $10::timestamptz[], $11::uuid[], "
    "$12::text[], $13::int[], $14::text[], $15::text[], $16::text[])"
)
#: tiu_append's codes for the expected versions that are not a number.
_PG_EXPECTED: Final[Mapping[object, int]] = {ANY: -1, STREAM_EXISTS: -2, NO_STREAM: 0}


def _append_arguments(store: EventStore, pending: list[_PendingAppend]) -> tuple[list[Any], ...]:
    """``tiu_append``'s arguments: per append, then per event (see migration 0008)."""
    now = store.now()
    now_text = recorded_at_text(now)  # one stamp for the group, unless given
    stream_ids, categories, expected, counts, stream_jsons = [], [], [], [], []
    actors, correlations, causations, commands, stamps = [], [], [], [], []
    event_ids, event_types, schema_versions, datas, metadatas, tails = [], [], [], [], [], []
    for p in pending:
        ctx = p.context
        stamp, event_tails = p.stamped(now, now_text)
        stream_ids.append(p.stream_id)
        categories.append(p.category)
        expected.append(_PG_EXPECTED.get(p.expected, p.expected))
        counts.append(len(p.events))
        stream_jsons.append(json_text(p.stream_id))
        actors.append(ctx.actor_id)
        correlations.append(ctx.correlation_id)
        causations.append(ctx.causation_id)
        commands.append(ctx.command_id)
        stamps.append(stamp)
        tails.extend(event_tails)
        for event, data, meta in p.events:
            event_ids.append(str(event.event_id))
            event_types.append(event.event_type)
            schema_versions.append(event.schema_version)
            datas.append(data)
            metadatas.append(meta)
    return (
        stream_ids, categories, expected, counts, stream_jsons,
        actors, correlations, causations, commands, stamps,
        event_ids, event_types, schema_versions, datas, metadatas, tails,
    )  # fmt: skip


_PG_NOTIFY: Final = "SELECT pg_notify($1, $2)"
_PG_COMMAND: Final = (
    "SELECT * FROM tiu_command($1::text[], $2::int[], $3::text[], $4::int[], "
    "$5::text[], $6::text[], $7::bigint[], $8::int[], $9::text[], $10::text[], $11::text[], "
    "$12::text[], $13::text[], $14::timestamptz[], $15::uuid[], $16::text[], $17::int[], "
    "$18::text[], $19::text[], $20::text[], $21::text[], $22::timestamptz)"
)
#: tiu_command's SQLSTATEs (migration 0012).
_TOO_FEW_ROWS: Final = "TIU01"
_WRONG_VERSION: Final = "TIU02"
_CHECKPOINT_ELSEWHERE: Final = "TIU03"


def _held_arguments(held: Deferred) -> tuple[list[Any], ...]:
    """``tiu_command``'s first four arguments: the held statements, the number of values
    of each, their values (as text, one array) and the rows each must change."""
    sqls, counts, args, least = [], [], [], []
    for statement in held.statements:
        sqls.append(statement.sql)
        counts.append(len(statement.args))
        args.extend(statement.args)
        least.append(0 if statement.none_changed is None else 1)
    return sqls, counts, args, least


class PostgresDialect(Dialect):
    name = "postgresql"
    _read_stream_sql = _READ_STREAM.format(_READ_COLUMNS[True])
    _stream_data_sql = _STREAM_DATA
    _load_sql = _PG_LOAD
    # asyncpg's UUID subclasses uuid.UUID (equal, same hash): kept as it is (~0.7 us an
    # event to copy); documents are read as text (or parsed by the JSONB codec where a
    # statement selects them as jsonb); timestamps come aware.
    _codec = DECODED._replace(document=_pg_document, timestamp=_utc_time)

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._channel: str | None = None
        self._notify_task: asyncio.Task[None] | None = None
        self._notify_pending = 0
        self._listener: Any = None
        self._listener_lock: asyncio.Lock | None = None

    def _insert_keys(self) -> Any:
        return pg_insert(unique_keys).on_conflict_do_nothing()

    async def _append_on(
        self, raw: Any, store: EventStore, pending: list[_PendingAppend]
    ) -> list[AppendResult | WrongExpectedVersion]:
        # tiu_append (migration 0008): lock, heads, checks, hash chain and insert in one
        # statement sent outside a transaction, so its commit ends it: one round trip
        # where BEGIN, lock and heads, INSERT and COMMIT took four.
        driver = raw.driver_connection  # asyncpg's, outside SQLAlchemy's adapter state
        if store.before_commit is not None:
            await store.before_commit(store.lock_list(pending))
        with self.driver_errors(raw, _PG_APPEND):
            found = await driver.fetch(_PG_APPEND, *_append_arguments(store, pending))
        outcomes: list[AppendResult | WrongExpectedVersion] = []
        for p, (before, first) in zip(pending, found, strict=True):
            if first is None:
                outcomes.append(WrongExpectedVersion(p.stream_id, p.expected, before))
                continue
            count = len(p.events)
            outcomes.append(
                AppendResult(p.stream_id, before + 1, before + count, first, first + count - 1)
            )
        return outcomes

    holds_writes = True

    async def begin_write(self, conn: AsyncConnection) -> None:
        # Nothing to send: PostgreSQL takes no lock at BEGIN, and a unit of work's
        # transaction begins with its first statement (SQLAlchemy's autobegin; the
        # driver's BEGIN goes with it), or is its flush's one statement.
        return

    async def command_write(
        self,
        conn: AsyncConnection,
        store: EventStore,
        appends: list[_PendingAppend],
        *,
        checks: int,
        held: Deferred,
        checkpoints: Sequence[str],
    ) -> tuple[list[AppendResult], bool]:
        # tiu_command (migration 0012): the held writes, then tiu_append and the
        # checkpoints' move, one statement. Sent outside a transaction (nothing of the
        # unit reached the server yet), it commits as it ends and the COMMIT that
        # follows has nothing to send; inside one, it is the last statement.
        raw = await raw_connection(conn)
        driver = raw.driver_connection
        commits = not driver.is_in_transaction()
        if commits and store.before_commit is not None:
            await store.before_commit([p.stream_id for p in appends[checks:]])
        statements = held.statements
        arguments = (*_held_arguments(held), *_append_arguments(store, appends))
        held.statements = []
        try:
            # Its "lock" stage is the whole statement: the wait for the append lock is
            # inside it, with what it writes before and after.
            with telemetry.write_stage("lock", conn), self.driver_errors(raw, _PG_COMMAND):
                found = await driver.fetch(_PG_COMMAND, *arguments, list(checkpoints), store.now())
        except sa_exc.DBAPIError as error:
            raise _command_failure(error, statements, appends) from error
        results: list[AppendResult] = []
        for p, (before, first) in zip(appends[checks:], found[checks:], strict=True):
            count = len(p.events)
            results.append(
                AppendResult(p.stream_id, before + 1, before + count, first, first + count - 1)
            )
        return results, commits

    @staticmethod
    def _any_of(values: Sequence[str]) -> list[Any]:
        return [list(values)]  # one text[] parameter

    async def _fetch(self, driver: Any, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        return await driver.fetch(sql, *read_parameters(sql, params, postgresql=True))  # type: ignore[no-any-return]

    @staticmethod
    def _wanted(wanted: Sequence[WantedStream]) -> tuple[Any, ...]:
        return tuple([w[i] for w in wanted] for i in range(4))

    async def read_streams_data(
        self, conn: AsyncConnection, from_versions: Mapping[str, int]
    ) -> list[StreamData]:
        if len(from_versions) == 1:
            return await super().read_streams_data(conn, from_versions)
        raw = await raw_connection(conn)
        with self.driver_errors(raw, _PG_STREAMS_DATA):
            rows = await driver_round_trip(
                conn,
                self._fetch(
                    raw.driver_connection,
                    _PG_STREAMS_DATA,
                    (list(from_versions), list(from_versions.values())),
                ),
            )
        return self._stream_data(rows)

    def appended(self, store: EventStore, head: int) -> None:
        super().appended(store, head)
        self._notify_pending = max(self._notify_pending, head)
        if self._notify_task is None or self._notify_task.done():
            self._notify_task = asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        # At most one NOTIFY per interval, outside the append transaction: NOTIFY takes
        # a cluster-wide lock at commit, which must stay off the serialised path.
        await asyncio.sleep(NOTIFY_INTERVAL)
        try:
            # Cancelled (the loop shutting down), it still ends its round trips and gives
            # its connection back: abandoned, one being opened would be left unclosed.
            await whole(self._send_notify(self._notify_pending))
        except Exception:  # a lost hint only delays readers until their next poll
            log.warning("NOTIFY failed; readers fall back to polling", exc_info=True)

    async def _send_notify(self, head: int) -> None:
        async with self.engine.connect() as conn:
            channel = await self.channel(conn)
            if conn.in_transaction():  # the first, which read the schema's name
                await conn.rollback()
            # On the driver, outside a transaction: one round trip, where BEGIN,
            # NOTIFY and COMMIT through SQLAlchemy took three.
            raw = await raw_connection(conn)
            with self.driver_errors(raw, _PG_NOTIFY):
                await raw.driver_connection.execute(_PG_NOTIFY, channel, str(head))

    async def channel(self, conn: AsyncConnection) -> str:
        # One channel per schema: a store in another schema of the same database must
        # not wake this one with its head position.
        if self._channel is None:
            schema = await conn.scalar(text("SELECT current_schema()"))
            self._channel = f"{NOTIFY_CHANNEL}:{schema}"
        return self._channel

    async def _ensure_listening(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        if self._listener_lock is None:
            self._listener_lock = asyncio.Lock()
        async with self._listener_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            import asyncpg  # noqa: PLC0415  # only PostgreSQL needs the driver here

            url = self.engine.url.set(drivername="postgresql")
            try:
                async with self.engine.connect() as conn:
                    channel = await self.channel(conn)
                # A dedicated connection outside the pool: LISTEN needs a session that
                # is never inside a transaction and never handed to another task.
                self._listener = await asyncpg.connect(url.render_as_string(hide_password=False))
                try:
                    await self._listener.add_listener(channel, self._on_notify)
                except Exception:
                    # Refused, not cancelled: no round trip is in flight, so the
                    # connection closes cleanly. A cancelled LISTEN keeps its
                    # connection for aclose(): closing it now would cut the round trip.
                    listener, self._listener = self._listener, None
                    with contextlib.suppress(Exception):
                        await listener.close(timeout=5)
                    raise
            except Exception:  # degrade to polling; the hint is an optimisation
                log.warning("LISTEN unavailable; readers poll", exc_info=True)
                self._listener = None

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._advance(int(payload))

    async def aclose(self) -> None:
        await super().aclose()
        if self._notify_task is not None:
            # Its outcome is moot (it logs its own failure), and one cancelled (the loop
            # shutting down) must not cancel this close.
            await asyncio.wait([self._notify_task])
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None


def _command_failure(
    error: sa_exc.DBAPIError,
    statements: Sequence[DeferredStatement],
    appends: Sequence[_PendingAppend],
) -> BaseException:
    """What a failed ``tiu_command`` raises: a version conflict, a held statement's
    own error (as the code that ran it raises it), or the database's failure."""
    code = getattr(error.orig, "sqlstate", None)
    detail = getattr(error.__cause__, "detail", None) or ""
    if code == _TOO_FEW_ROWS:
        held = statements[int(detail) - 1]
        return held.none_changed or error
    if code == _WRONG_VERSION:
        index, version = (int(part) for part in detail.split())
        append = appends[index - 1]
        return WrongExpectedVersion(append.stream_id, append.expected, version)
    if code == _CHECKPOINT_ELSEWHERE:
        return CheckpointsNotMoved()
    context = getattr(error.__cause__, "context", None) or ""
    for held in statements:
        if held.failed is not None and f'"{held.sql}"' in context:
            try:
                with translate_errors():
                    raise error
            except EventStoreError as translated:  # the database's failure
                return translated
            except sa_exc.DBAPIError:
                return held.failed(error)
    return error


def dialect_for(engine: AsyncEngine) -> Dialect:
    name = engine.dialect.name
    if name == "postgresql":
        return PostgresDialect(engine)
    if name == "sqlite":
        return SQLiteDialect(engine)
    raise ValueError(f"unsupported dialect {name!r}")
