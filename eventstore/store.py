"""The SQL event store shared by both dialects.

The contract is documented on :class:`eventstore.protocols.EventStoreProtocol`;
this module implements it with SQLAlchemy Core. What differs per dialect (how
appends are serialised, how readers are woken) lives in :mod:`eventstore.dialects`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from time import perf_counter
from typing import Any, Final
from uuid import UUID

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from eventstore import telemetry
from eventstore.dialects import Dialect, HeldConnection, dialect_for, pooled_while
from eventstore.engine import driver_round_trip
from eventstore.errors import (
    InvalidEventData,
    InvalidExpectedVersion,
    InvalidStreamId,
    KeyAlreadyClaimed,
    LogIntegrityError,
    UnknownCategory,
    WrongExpectedVersion,
)
from eventstore.grouping import GroupQueue, Waiting, settle
from eventstore.hashing import (
    GENESIS,
    canonical_json,
    context_tail,
    event_tail,
    json_text,
    link_hash,
    recorded_at_text,
)
from eventstore.prepared import Deferred, deferring
from eventstore.records import (
    ANY,
    DECODED,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    EventContext,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    StreamData,
    StreamHead,
    StreamsLoad,
    WantedStream,
)
from eventstore.schema import MAX_STREAM_ID_LENGTH, events, unique_keys
from eventstore.translate import translate_errors

_CATEGORY_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,49}")
_EVENT_TYPE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,199}")
#: Names already found to match each (a set lookup costs a tenth of the match, and an
#: append checks two), up to :data:`_MATCHED_MAX`: names are few, but a caller may
#: send any.
_MATCHED_CATEGORIES: Final[set[str]] = set()
_MATCHED_EVENT_TYPES: Final[set[str]] = set()
_MATCHED_MAX: Final = 1024


def _matches(name: object, pattern: re.Pattern[str], matched: set[str]) -> bool:
    """Whether ``name`` is a string ``pattern`` matches whole (remembered in ``matched``)."""
    if type(name) is str and name in matched:
        return True
    if not isinstance(name, str) or not pattern.fullmatch(name):
        return False
    if type(name) is str and len(matched) < _MATCHED_MAX:
        matched.add(name)
    return True


#: A NUL in JSON text: ``\u0000`` whose backslash is not itself escaped (an even
#: run of backslashes before it). The text ``\\u0000`` is a backslash, then "u0000".
_NUL_ESCAPE: Final = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
DEFAULT_MAX_EVENT_BYTES: Final = 1_000_000
_NO_HEAD: Final = StreamHead(0, None)  # a stream with no event

_EVENT_COLUMNS: Final = (
    events.c.position,
    events.c.event_id,
    events.c.stream_id,
    events.c.stream_category,
    events.c.version,
    events.c.event_type,
    events.c.schema_version,
    events.c.data,
    events.c.metadata,
    events.c.actor_id,
    events.c.correlation_id,
    events.c.causation_id,
    events.c.command_id,
    events.c.recorded_at,
    events.c.hash,
)


class _PendingAppend:
    __slots__ = (
        "category",
        "context",
        "events",
        "expected",
        "recorded_at",
        "stream_id",
        "tails_ahead",
    )

    def __init__(
        self,
        stream_id: str,
        category: str,
        events: list[tuple[NewEvent, str, str]],
        expected: ExpectedVersion,
        context: EventContext,
        *,
        recorded_at: datetime | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.category = category
        self.events = events  # (event, canonical data, canonical metadata)
        self.expected = expected
        self.context = context
        self.recorded_at = recorded_at
        #: :meth:`tails` worked out ahead of the transaction, with the stamp they were
        #: made for (:meth:`EventStore.encode_append`).
        self.tails_ahead: tuple[datetime, list[str]] | None = None

    def tails(self, recorded_at: str) -> list[str]:
        """The hashed text of each event after its version (:func:`hashing.hash_tail`),
        ``recorded_at`` as :func:`hashing.recorded_at_text` writes it."""
        ctx = self.context
        context = context_tail(
            ctx.actor_id, ctx.correlation_id, ctx.causation_id, ctx.command_id, recorded_at
        )
        return [
            event_tail(str(e.event_id), e.event_type, e.schema_version, data, meta, context=context)
            for e, data, meta in self.events
        ]

    def stamped(self, now: datetime, now_text: str) -> tuple[datetime, list[str]]:
        """The stamp of this append's events (``recorded_at`` if given, else the
        group's ``now``) and their hash tails."""
        if self.recorded_at is None:
            return now, self.tails(now_text)
        ahead = self.tails_ahead
        if ahead is not None and ahead[0] == self.recorded_at:
            return self.recorded_at, ahead[1]
        return self.recorded_at, self.tails(recorded_at_text(self.recorded_at))


#: An append made ready ahead of its transaction (:meth:`EventStore.encode_append`).
EncodedAppend = _PendingAppend


class UnitOfWork:
    """One write transaction: reads, key claims and buffered appends, committed once.

    Appends are buffered and flushed by the store as the last statement before
    COMMIT (docs/ordering.md: nothing may run while the append lock is held). Obtain one
    from :meth:`EventStore.transaction`; it is not safe to share between tasks.
    """

    def __init__(self, store: EventStore, conn: AsyncConnection) -> None:
        self.store = store
        self.conn = conn
        self.results: list[AppendResult] = []
        self._pending: list[_PendingAppend] = []
        self._expected: dict[str, int] = {}
        #: The writes held back to go with the append, where the dialect does that
        #: (PostgreSQL: :meth:`Dialect.command_write`); ``None`` elsewhere.
        self.held: Deferred | None = Deferred() if store.dialect.holds_writes else None
        #: Checkpoints to move with the append where :attr:`held` is set: from just
        #: before its first position to its last (:attr:`checkpoints_moved` then).
        self.checkpoints: tuple[str, ...] = ()
        self.checkpoints_moved = False
        #: Whether the flush committed the transaction itself (one statement sent
        #: outside a transaction): COMMIT then has nothing left to send.
        self.committed = False
        #: Whether the write transaction has begun (:meth:`begin`).
        self.writing = False
        #: When the write lock was taken (``perf_counter``): at BEGIN IMMEDIATE on
        #: SQLite, at the append on PostgreSQL (its advisory lock).
        self.locked_at: float | None = None
        #: Seconds the write lock was held, from :attr:`locked_at` to the end of COMMIT.
        self.lock_held: float | None = None
        #: Stream heads and the log's highest position read under the write lock
        #: (SQLite's version checks), kept up to date by the flush: the append does not
        #: read them again. This holds because only the flush writes to ``events`` in a
        #: unit's transaction; a unit that wrote there by another path would need them
        #: read again.
        self._heads: dict[str, StreamHead] = {}
        self._position: int | None = None
        #: The id of the last event the flush wrote where the store writes the rows
        #: itself (not :attr:`held`): what shows whether a COMMIT cut short committed.
        self.last_event_id: UUID | None = None

    async def begin(self) -> None:
        """Begin the write transaction, if it has not begun: ``BEGIN IMMEDIATE`` on
        SQLite (the database's write lock). What the connection read before ran
        without the write lock; :meth:`check_versions` and the append's version checks
        make sure no decision rests on it if it changed since."""
        if self.writing:
            return
        with (
            translate_errors(self.store.dialect.database_label),
            telemetry.write_stage("begin", self.conn),
        ):
            await self.store.dialect.begin_write(self.conn)
        self.writing = True
        if self.store.dialect.name == "sqlite":
            self.locked_at = perf_counter()

    async def check_versions(self, expected: Mapping[str, int]) -> None:
        """Raise :class:`WrongExpectedVersion` if a stream is no longer at the version
        given, where that can be known now: on SQLite, under the write lock this
        transaction holds. Every such stream is also checked under the append lock
        (:meth:`expect`), which is what PostgreSQL relies on."""
        if expected:
            heads = self._heads
            if self.writing and all(stream_id in heads for stream_id in expected):
                # Read under this transaction's write lock (:meth:`read_heads`, or an
                # earlier check): no other writer has moved them since.
                for stream_id, version in expected.items():
                    _check_expected(stream_id, version, heads[stream_id].version)
                return
            with translate_errors(self.store.dialect.database_label):
                heads, position = await self.store.dialect.check_versions(self.conn, expected)
            if self.writing:
                self._heads.update(heads)
                if position is not None:
                    self._position = position

    async def read_heads(self, stream_ids: Iterable[str]) -> None:
        """Read the heads of ``stream_ids`` (and the log's position) in one statement,
        under the write lock this transaction holds, for :meth:`check_versions` to
        check against: a group of commands checks its streams with one statement
        instead of one a command. Only where that lock makes them final (SQLite);
        elsewhere nothing is read."""
        if not self.writing or self.store.dialect.holds_writes:
            return
        wanted = [s for s in dict.fromkeys(stream_ids) if s not in self._heads]
        if not wanted:
            return
        with translate_errors(self.store.dialect.database_label):
            heads, position = await self.store.dialect.heads_and_position(self.conn, wanted)
        for stream_id in wanted:
            self._heads[stream_id] = heads.get(stream_id) or _NO_HEAD
        self._position = position

    @property
    def pending_streams(self) -> list[str]:
        return [p.stream_id for p in self._pending]

    def append(
        self,
        stream_id: str,
        category: str,
        new_events: Sequence[NewEvent],
        expected_version: ExpectedVersion = ANY,
        *,
        context: EventContext | None = None,
        recorded_at: datetime | None = None,
    ) -> None:
        """Buffer events for ``stream_id``; validated now, written at commit.

        ``recorded_at`` (default: the store's clock at commit) lets a caller stamp the
        events with the time it already handed to inline projectors, so a replay
        reproduces exactly what they wrote.
        """
        pending = self.store.validate_append(
            stream_id, category, new_events, expected_version, context or EventContext()
        )
        if recorded_at is not None:
            _check_stamp(recorded_at)
            pending.recorded_at = recorded_at
        self._pending.append(pending)

    def append_encoded(self, pending: _PendingAppend, expected_version: ExpectedVersion) -> None:
        """:meth:`append` of what :meth:`EventStore.encode_append` made ahead, outside
        this transaction (its write lock): the events' JSON and hash tails."""
        _check_expected_version(expected_version)
        pending.expected = expected_version
        self._pending.append(pending)

    def mark(self) -> tuple[int, dict[str, int], int]:
        """Where the buffer stands, to :meth:`restore` after a rolled-back savepoint."""
        held = 0 if self.held is None else len(self.held.statements)
        return len(self._pending), dict(self._expected), held

    def restore(self, mark: tuple[int, dict[str, int], int]) -> None:
        pending, expected, held = mark
        del self._pending[pending:]
        self._expected = dict(expected)
        if self.held is not None:
            del self.held.statements[held:]

    def expect(self, stream_id: str, version: int) -> None:
        """Require ``stream_id`` to still be at ``version`` when this transaction appends.

        For streams a decision read but does not write (the project a task is created
        in): checked under the append lock with the appended streams, so a decision
        never rests on state that changed before it committed.
        """
        current = self._expected.get(stream_id)
        if current is not None and current != version:
            raise WrongExpectedVersion(stream_id, version, current)
        self._expected[stream_id] = version

    async def reading(self) -> AsyncConnection:
        """:attr:`conn`, to read through: the writes it holds back for the append
        (:attr:`held`) are sent first, so that a read sees every write before it."""
        held = self.held
        if held is not None and held.statements:
            await driver_round_trip(self.conn, held.run(self.conn))
        return self.conn

    async def read_stream(self, stream_id: str, **kwargs: Any) -> list[RecordedEvent]:
        return await self.store.read_stream(await self.reading(), stream_id, **kwargs)

    async def claim(self, scope: str, key: str, stream_id: str) -> None:
        """Claim a unique key for ``stream_id`` in this transaction.

        Raises :class:`KeyAlreadyClaimed` if another stream holds it. Claiming a key
        the same stream already holds is a no-op.
        """
        await self.store.dialect.claim_key(self.conn, scope, key, stream_id, self.store.now())

    async def release(self, scope: str, key: str, stream_id: str) -> None:
        """Release a key held by ``stream_id`` (a changed email frees the old one)."""
        with translate_errors():
            await self.conn.execute(
                delete(unique_keys).where(
                    unique_keys.c.scope == scope,
                    unique_keys.c.key == key,
                    unique_keys.c.stream_id == stream_id,
                )
            )

    async def flush(self) -> list[AppendResult]:
        """Write every buffered append: lock, check versions, allocate positions, insert;
        with the writes held back (:attr:`held`) and the checkpoints' move where the
        dialect sends them together."""
        held = self.held
        if not self._pending and not (held is not None and held.statements):
            return []
        await self.begin()
        if self.locked_at is None and self._pending:
            self.locked_at = perf_counter()
        pending, self._pending = self._pending, []
        expected, self._expected = self._expected, {}
        if held is None:
            results = await self.store.write(
                self.conn, pending, expected, heads=self._heads, position=self._position
            )
            if results:
                self._position = results[-1].last_position
                self.last_event_id = pending[-1].events[-1][0].event_id
        else:
            # Streams only read are checked as appends of no events, first (as plan()
            # checks them); also where nothing is appended: what is held (a command's
            # idempotency record, of a refusal or of a decision of no events) was
            # decided on them, and must not commit if they moved.
            checks = [
                _PendingAppend(stream_id, "", [], version, EventContext())
                for stream_id, version in expected.items()
            ]
            with translate_errors(self.store.dialect.database_label):
                results, self.committed = await self.store.dialect.command_write(
                    self.conn,
                    self.store,
                    [*checks, *pending],
                    checks=len(checks),
                    held=held,
                    checkpoints=self.checkpoints if pending else (),
                )
            self.checkpoints_moved = bool(self.checkpoints and pending)
        self.results.extend(results)
        return results

    @property
    def last_position(self) -> int | None:
        return self.results[-1].last_position if self.results else None


BeforeCommitHook = Callable[[UnitOfWork], Awaitable[None]]
#: A fault point: awaited with the streams being appended to.
FaultHook = Callable[[Sequence[str]], Awaitable[None]]


class EventStore:
    """The event log on one engine. See :class:`eventstore.protocols.EventStoreProtocol`."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        categories: Iterable[str] | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        clock: Callable[[], datetime] | None = None,
        group_appends: bool = True,
        max_group: int = 64,
    ) -> None:
        self.engine = engine
        self.categories = frozenset(categories) if categories is not None else None
        self.max_event_bytes = max_event_bytes
        self._clock = clock or (lambda: datetime.now(UTC))
        self.dialect: Dialect = dialect_for(engine)
        #: Fault point for tests, on every append path (``None`` in production): awaited
        #: with the appended streams once their positions are allocated, while the
        #: append lock is held, just before COMMIT. PostgreSQL's direct append
        #: (``tiu_append``), and a unit of work whose flush is its only statement
        #: (``tiu_command``), allocate and commit in one statement, so there it is
        #: awaited just before that statement. An exception it raises rolls back.
        self.before_commit: FaultHook | None = None
        #: The group writer's pooled connection, kept from one group to the next.
        self._held = HeldConnection(self.dialect)
        self._group: GroupQueue[_PendingAppend, AppendResult] | None = (
            GroupQueue(
                self._write_group,
                max_group,
                idle=self._held.release,
                alone_inline=self.dialect.writes_in_caller,
            )
            if group_appends
            else None
        )

    def now(self) -> datetime:
        return self._clock()

    # -- writing ---------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(
        self,
        *,
        after_flush: BeforeCommitHook | None = None,
        lazy: bool = False,
        conn: AsyncConnection | None = None,
        keep_open: bool = False,
        turned: bool = False,
    ) -> AsyncIterator[UnitOfWork]:
        """A write transaction. Buffered appends are flushed at the end, then COMMIT.

        If the block raises, everything is rolled back: no event, key or read-model
        row of this transaction remains. ``after_flush`` runs after the append and
        before COMMIT, while the append lock is held: keep it to one short statement
        on rows no other transaction locks before appending (checkpoints).

        ``lazy``: the write transaction begins only at :meth:`UnitOfWork.begin` (or
        the flush), so what the block reads first holds no write lock; a block that
        never begins writing commits nothing. ``conn``: a connection of this engine to
        run on (not in a write transaction), closed at the end as the store's own is,
        unless ``keep_open``: then, if the block succeeds, it is left open and out of
        any transaction for the caller to close (after an error it is closed).
        ``turned``: the caller's task comes straight from a turn of the loop (a group
        writer, which turns it after each group), or a group queue bounds its time
        since one (a caller writing alone, :data:`eventstore.grouping.INLINE_SLICE`):
        the transaction takes no other.
        """
        if not self.dialect.round_trips and not turned:
            # The inline SQLite driver never suspends: one turn of the loop before each
            # write transaction, or a loop of them (an import) would keep every other
            # task waiting, the WAL's checkpoint included. Before, not after: cancelled
            # there, nothing has begun (after its COMMIT, a cancellation would skip
            # what follows a transaction that committed).
            await asyncio.sleep(0)
        if conn is None:
            with translate_errors(self.dialect.database_label):
                conn = await self.engine.connect()
        kept = False
        try:
            with pooled_while(conn, await self.dialect.pooled_for_write(conn)):
                uow = UnitOfWork(self, conn)
                if not lazy:
                    await uow.begin()
                if uow.held is None:
                    yield uow
                else:
                    with deferring(conn, uow.held):
                        yield uow
                if uow.writing or uow.pending_streams or (uow.held and uow.held.statements):
                    with telemetry.write_stage("append", conn):
                        await uow.flush()
                    if after_flush is not None and uow.results:
                        await after_flush(uow)
                    if self.before_commit is not None and not uow.committed:
                        await self.before_commit([r.stream_id for r in uow.results])
                    with (
                        translate_errors(self.dialect.database_label),
                        telemetry.write_stage("commit", conn),
                    ):
                        try:
                            await self.dialect.commit(conn)
                        except asyncio.CancelledError:
                            if uow.last_event_id is not None:
                                self.dialect.commit_cancelled(
                                    self, conn, uow.last_event_id, uow.results[-1].last_position
                                )
                            raise
                    if uow.locked_at is not None:
                        uow.lock_held = perf_counter() - uow.locked_at
            if keep_open:
                if conn.in_transaction():  # what a block that wrote nothing read
                    with translate_errors(self.dialect.database_label):
                        await conn.rollback()
                kept = True
        finally:
            if not kept:
                with translate_errors(self.dialect.database_label):
                    await conn.close()  # rolls back anything not committed
        if uow.results:
            self.dialect.appended(self, max(r.last_position for r in uow.results))

    @telemetry.traced_append
    async def append(
        self,
        stream_id: str,
        category: str,
        new_events: Sequence[NewEvent],
        expected_version: ExpectedVersion = ANY,
        *,
        context: EventContext | None = None,
    ) -> AppendResult:
        """Append to one stream, atomically, committed before it returns.

        Concurrent calls on one store share a transaction (group commit, on unless the
        store was built with ``group_appends=False``): each append is still all or
        nothing with its own version check, and a grouped transaction that fails is
        retried append by append, so no caller sees an error caused by another's.
        """
        pending = self.validate_append(
            stream_id, category, new_events, expected_version, context or EventContext()
        )
        if self._group is not None:
            return await self._group.submit(pending)
        # Alone, the caller's own task runs the transaction: shielded, so that a
        # cancelled caller never abandons a half-done transaction or connection.
        return await asyncio.shield(self._append_alone(pending))

    async def _append_alone(
        self, pending: _PendingAppend, held: HeldConnection | None = None
    ) -> AppendResult:
        (outcome,) = await self._append_group([pending], held)
        if isinstance(outcome, WrongExpectedVersion):
            raise outcome
        return outcome

    async def _write_group(self, group: list[Waiting[_PendingAppend, AppendResult]]) -> None:
        """The group committer's writer: one transaction for the group; if it fails as a
        whole (whoever caused it), each append is retried alone and gets its own outcome.
        Not that of a caller cancelled meanwhile: told so, it was promised an append
        either written or leaving nothing, and the failed group left nothing of it."""
        telemetry.group_size("append", len(group))
        try:
            outcomes = await self._append_group([p for p, _ in group], self._held)
        except Exception:
            for pending, future in group:
                if not future.done():
                    await settle(future, self._append_alone(pending, self._held))
            return
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, WrongExpectedVersion):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _append_group(
        self, pending: list[_PendingAppend], held: HeldConnection | None = None
    ) -> list[AppendResult | WrongExpectedVersion]:
        """Several appends in one transaction; one whose version check fails is left out.
        ``held``: the group writer's connection (only the writer task passes it)."""
        outcomes = await self.dialect.append_group(self, pending, held)
        if outcomes is not None:
            written = [o.last_position for o in outcomes if isinstance(o, AppendResult)]
            if written:
                self.dialect.appended(self, max(written))
            return outcomes
        # Only a shared :memory: database (one connection, readers included) gets here.
        async with self.transaction() as uow:
            outcomes = await self.write_each(uow.conn, pending)
            uow.results.extend(o for o in outcomes if isinstance(o, AppendResult))
        return outcomes

    def validate_append(
        self,
        stream_id: str,
        category: str,
        new_events: Sequence[NewEvent],
        expected: ExpectedVersion,
        context: EventContext,
    ) -> _PendingAppend:
        if not _matches(category, _CATEGORY_RE, _MATCHED_CATEGORIES):
            raise UnknownCategory(str(category), self.categories)
        if self.categories is not None and category not in self.categories:
            raise UnknownCategory(category, self.categories)
        _check_stream_id(stream_id, category)
        _check_expected_version(expected)
        if not new_events:
            raise InvalidEventData("(none)", "an append needs at least one event")
        encoded = [self._encode(e) for e in new_events]
        return _PendingAppend(stream_id, category, encoded, expected, context)

    def encode_append(
        self,
        stream_id: str,
        category: str,
        new_events: Sequence[NewEvent],
        context: EventContext,
        recorded_at: datetime,
    ) -> _PendingAppend:
        """An append validated and encoded ahead of its transaction (JSON, hash tails),
        for :meth:`UnitOfWork.append_encoded`: work that then needs no write lock."""
        _check_stamp(recorded_at)
        pending = self.validate_append(stream_id, category, new_events, ANY, context)
        pending.recorded_at = recorded_at
        pending.tails_ahead = (recorded_at, pending.tails(recorded_at_text(recorded_at)))
        return pending

    def _encode(self, event: NewEvent) -> tuple[NewEvent, str, str]:
        name = event.event_type
        if not _matches(name, _EVENT_TYPE_RE, _MATCHED_EVENT_TYPES):
            raise InvalidEventData(str(name), "event_type must be 1-200 letters, digits or _.:-")
        if type(event.schema_version) is not int or not 1 <= event.schema_version <= 32767:
            raise InvalidEventData(name, "schema_version must be an int from 1 to 32767")
        data, meta = event.data, event.metadata
        # A dict first: the ABC's isinstance costs ~0.2 us each.
        if not (type(data) is dict or isinstance(data, Mapping)) or not (
            type(meta) is dict or isinstance(meta, Mapping)
        ):
            raise InvalidEventData(name, "data and metadata must be mappings")
        try:
            data_json = canonical_json(data)
            meta_json = canonical_json(meta)
        except (TypeError, ValueError) as error:
            raise InvalidEventData(name, f"not JSON-serialisable: {error}") from error
        if _has_nul(data_json) or _has_nul(meta_json):
            # PostgreSQL cannot store NUL in text or JSONB; refuse it on every backend.
            raise InvalidEventData(name, "strings must not contain NUL (\\u0000) characters")
        try:
            # ASCII text (most events) is as many bytes as characters, and holds no
            # surrogate: no copy encoded to count them.
            if data_json.isascii() and meta_json.isascii():
                size = len(data_json) + len(meta_json)
            else:
                size = len(data_json.encode()) + len(meta_json.encode())
        except UnicodeEncodeError as error:
            raise InvalidEventData(
                name, "strings must be valid Unicode (a lone surrogate cannot be stored)"
            ) from error
        if size > self.max_event_bytes:
            raise InvalidEventData(
                name, f"{size} bytes exceeds the limit of {self.max_event_bytes}"
            )
        return event, data_json, meta_json

    async def write(
        self,
        conn: AsyncConnection,
        pending: list[_PendingAppend],
        expected: Mapping[str, int] | None = None,
        *,
        heads: dict[str, StreamHead] | None = None,
        position: int | None = None,
    ) -> list[AppendResult]:
        """Lock, check every version, allocate positions and insert; all or nothing.

        ``heads``, ``position``: stream heads and the log's highest position this
        transaction already read under the append lock (not read again); ``heads`` is
        brought up to date with what is appended."""
        outcomes = await self._write(
            conn, pending, expected or {}, refuse=False, known=heads, position=position
        )
        return [o for o in outcomes if isinstance(o, AppendResult)]

    async def write_each(
        self, conn: AsyncConnection, pending: list[_PendingAppend]
    ) -> list[AppendResult | WrongExpectedVersion]:
        """Like :meth:`write`, but an append whose expected version does not hold is
        left out and its error returned in its place."""
        return await self._write(conn, pending, {}, refuse=True)

    async def _write(
        self,
        conn: AsyncConnection,
        pending: list[_PendingAppend],
        expected: Mapping[str, int],
        *,
        refuse: bool,
        known: dict[str, StreamHead] | None = None,
        position: int | None = None,
    ) -> list[AppendResult | WrongExpectedVersion]:
        streams = self.lock_list(pending, expected)
        known = {} if known is None else known
        unknown = [s for s in streams if s not in known]
        with translate_errors(self.dialect.database_label):
            with telemetry.write_stage("lock", conn):
                if unknown or position is None:
                    heads, position = await self.dialect.heads_and_position(conn, unknown)
                else:  # all read under the write lock already (SQLite's version checks)
                    heads = {}
            heads.update((s, known[s]) for s in streams if s in known)
            rows, results = self.plan(pending, expected, heads, position, refuse=refuse)
            if rows:
                await self.dialect.insert_events(conn, rows)
            known.update(heads)  # the plan moved the heads of the streams it appends to
            return results

    @staticmethod
    def lock_list(
        pending: list[_PendingAppend], expected: Mapping[str, int] | None = None
    ) -> list[str]:
        """The streams whose heads an append reads: appended ones, then checked ones."""
        if not expected:
            return list(dict.fromkeys([p.stream_id for p in pending]))
        return list(dict.fromkeys([*(p.stream_id for p in pending), *expected]))

    def plan(
        self,
        pending: list[_PendingAppend],
        expected: Mapping[str, int],
        heads: dict[str, StreamHead],
        position: int,
        *,
        refuse: bool,
    ) -> tuple[list[tuple[Any, ...]], list[AppendResult | WrongExpectedVersion]]:
        """The rows to insert and each append's outcome, given the heads read under the
        append lock: version checks, versions, positions and the hash chain.

        With ``refuse``, an append whose expected version does not hold is left out
        and its error returned in its place; otherwise that error is raised.
        """
        for stream_id, version in expected.items():
            _check_expected(stream_id, version, (heads.get(stream_id) or _NO_HEAD).version)
        now = self.now()
        # One stamp for the group's appends that bring none (a command's brings its own),
        # written out once, when the first of them is met.
        now_text = ""
        rows: list[tuple[Any, ...]] = []
        results: list[AppendResult | WrongExpectedVersion] = []
        for p in pending:
            head = heads.get(p.stream_id) or _NO_HEAD
            try:
                _check_expected(p.stream_id, p.expected, head.version)
            except WrongExpectedVersion as error:
                if not refuse:
                    raise
                results.append(error)
                continue
            prev = head.hash or GENESIS
            ctx = p.context
            if not now_text and p.recorded_at is None:
                now_text = recorded_at_text(now)
            stamp, tails = p.stamped(now, now_text)
            stream_json = json_text(p.stream_id)
            first_position = position + 1
            version = head.version
            for (ev, data, meta), tail in zip(p.events, tails, strict=True):
                version += 1
                position += 1
                prev = link_hash(prev, stream_json, version, tail)
                rows.append(
                    (
                        position,
                        ev.event_id,
                        p.stream_id,
                        p.category,
                        version,
                        ev.event_type,
                        ev.schema_version,
                        data,
                        meta,
                        ctx.actor_id,
                        ctx.correlation_id,
                        ctx.causation_id,
                        ctx.command_id,
                        stamp,
                        prev,
                    )
                )
            heads[p.stream_id] = StreamHead(head.version + len(p.events), prev)
            results.append(
                AppendResult(
                    p.stream_id,
                    head.version + 1,
                    head.version + len(p.events),
                    first_position,
                    position,
                )
            )
        return rows, results

    # -- reading ---------------------------------------------------------------------------

    async def read_stream(
        self,
        conn: AsyncConnection,
        stream_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        """Events of one stream with ``from_version <= version <= to_version``.

        Forwards in version order, or ``backwards`` from ``to_version`` (default: the
        last event) down to ``from_version``.
        """
        if to_version is None and not backwards and limit is None:
            # A whole stream forward: read on the driver, SQL prepared once.
            with translate_errors(self.dialect.database_label):
                return await self.dialect.read_stream_events(conn, stream_id, from_version)
        query = select(*_EVENT_COLUMNS).where(
            events.c.stream_id == stream_id, events.c.version >= from_version
        )
        if to_version is not None:
            query = query.where(events.c.version <= to_version)
        query = query.order_by(events.c.version.desc() if backwards else events.c.version)
        if limit is not None:
            query = query.limit(limit)
        with translate_errors(self.dialect.database_label):
            result = await conn.execute(query)
            # the selected columns are the fields, in order, decoded by SQLAlchemy
            return RecordedEvent.from_rows(result, DECODED)

    async def load_streams(
        self,
        conn: AsyncConnection,
        command_id: str | None,
        wanted: Sequence[WantedStream],
    ) -> StreamsLoad:
        """What a command reads before it decides (one statement on PostgreSQL, index
        seeks one by one on SQLite, where a statement has no round trip to save): whether
        ``command_id`` was processed (and its outcome), and for each wanted stream
        ``(stream id, decider name, decider version, held)`` its snapshot, if one was
        taken by that decider and version (a ``None`` name: never) after version
        ``held``, and its events after that snapshot, else after ``held`` (the version
        up to which the caller holds the stream folded already; 0: none).

        On PostgreSQL it may run before the transaction's BEGIN, on its own snapshot:
        under READ COMMITTED each statement takes a new one anyway, and the append's
        version check rejects a decision made on streams that moved since."""
        with translate_errors(self.dialect.database_label):
            return await self.dialect.load_streams(conn, command_id, wanted)

    async def read_streams_data(
        self, conn: AsyncConnection, from_versions: Mapping[str, int]
    ) -> list[StreamData]:
        """What folding needs of several streams' events (type, schema version, data,
        version), each stream from its own version on; grouped by stream, each in
        version order (one round trip on PostgreSQL). Lighter than :meth:`read_stream`:
        ids, metadata and timestamps are not read."""
        with translate_errors(self.dialect.database_label):
            return await self.dialect.read_streams_data(conn, from_versions)

    async def stream_version(self, conn: AsyncConnection, stream_id: str) -> int:
        """The version of the stream's last event; 0 if the stream has none."""
        with translate_errors(self.dialect.database_label):
            value = await conn.scalar(
                select(func.max(events.c.version)).where(events.c.stream_id == stream_id)
            )
        return int(value or 0)

    async def head_position(self, conn: AsyncConnection) -> int:
        """The highest position in the log (0 when empty)."""
        with translate_errors(self.dialect.database_label):
            value = await conn.scalar(select(func.max(events.c.position)))
        return int(value or 0)

    async def read_all(
        self,
        conn: AsyncConnection,
        after_position: int = 0,
        limit: int = 1000,
        *,
        categories: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        until_position: int | None = None,
    ) -> list[RecordedEvent]:
        """Events of the whole log with ``position > after_position``, in position order.

        The page is fetched off the event loop (SQLite: on a worker thread, see
        :mod:`eventstore.sqlite_driver`, but for a shared ``:memory:`` database, whose
        one connection serves every caller; PostgreSQL: the driver awaits the server),
        so each call suspends and a loop reading page after page lets the event loop's
        other tasks run."""
        with translate_errors(self.dialect.database_label):
            return await self.dialect.read_events(
                conn,
                after_position=after_position,
                limit=limit,
                until_position=until_position,
                categories=None if categories is None else list(categories),
                types=None if types is None else list(types),
            )

    async def subscribe(
        self,
        after_position: int = 0,
        *,
        batch_size: int = 500,
        categories: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        poll_interval: float = 1.0,
    ) -> AsyncIterator[RecordedEvent]:
        """Catch up from ``after_position``, then follow new events as they commit.

        Never ends by itself; cancel the consuming task (or break) to stop. Each
        batch is read on a short-lived connection of its own. An unfiltered
        subscription checks that positions are contiguous and raises
        :class:`LogIntegrityError` on a hole instead of skipping it, unless the
        audited retention path recorded that it removed exactly those positions.
        """
        cats = list(categories) if categories is not None else None
        kinds = list(types) if types is not None else None
        filtered = cats is not None or kinds is not None
        position = after_position
        while True:
            async with self.engine.connect() as conn:
                # Every position up to the head is committed (appends are serialised in
                # commit order), so a filtered reader may move its cursor to the head.
                head = await self.head_position(conn)
                batch = await self.read_all(
                    conn, position, batch_size, categories=cats, types=kinds, until_position=head
                )
            for event in batch:
                if not filtered and event.position != position + 1:
                    await self._check_archived(position + 1, event.position - 1)
                position = event.position
                yield event
            if len(batch) < batch_size:
                position = max(position, head)
                if not batch:
                    await self.wait_for_append(position, timeout=poll_interval)

    async def _check_archived(self, low: int, high: int) -> None:
        """Accept a hole ``low..high`` only where the retention path recorded removals."""
        from eventstore.retention import load_records  # noqa: PLC0415  # it imports this module

        async with self.engine.connect() as conn:
            removed = [span for record in await load_records(conn) for span in record.positions]
        missing = low
        for first, last in sorted(removed):
            if first <= missing <= last:
                missing = last + 1
        if missing <= high:
            raise LogIntegrityError(
                f"hole in the log: position {missing} is missing and was never archived"
            )

    async def wait_for_append(self, after_position: int, timeout: float) -> bool:
        """Wait until an append past ``after_position`` is seen, or ``timeout`` passes.

        True when woken by an append. In-process commits wake at once; commits of
        other processes wake through LISTEN/NOTIFY on PostgreSQL, else by polling.
        """
        return await self.dialect.wait_for_append(self, after_position, timeout)

    async def aclose(self) -> None:
        if self._group is not None:
            await self._group.aclose()
        await self._held.aclose()
        await self.dialect.aclose()


def _has_nul(text: str) -> bool:
    """Whether canonical JSON ``text`` holds a NUL character (written ``\\u0000``)."""
    return "\\u0000" in text and _NUL_ESCAPE.search(text) is not None


def _check_stream_id(stream_id: object, category: str) -> None:
    if not isinstance(stream_id, str) or not stream_id:
        raise InvalidStreamId(stream_id, "must be a non-empty string")
    if len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise InvalidStreamId(stream_id, f"longer than {MAX_STREAM_ID_LENGTH} characters")
    if not stream_id.isprintable() or stream_id != stream_id.strip():
        raise InvalidStreamId(stream_id, "control characters or surrounding whitespace")
    if not stream_id.startswith(f"{category}-") or len(stream_id) == len(category) + 1:
        raise InvalidStreamId(stream_id, f"must be '{category}-<id>' for category {category!r}")


def _check_expected_version(expected: object) -> None:
    """Refuse what is no expected version: a version (an int from 0, not a bool) or
    ``ANY``, ``NO_STREAM``, ``STREAM_EXISTS``."""
    if isinstance(expected, bool) or not (
        (isinstance(expected, int) and expected >= 0) or expected in (ANY, NO_STREAM, STREAM_EXISTS)
    ):
        raise InvalidExpectedVersion(expected)


def _check_stamp(recorded_at: datetime) -> None:
    if recorded_at.tzinfo is None:
        raise InvalidEventData("(any)", "recorded_at must be timezone-aware")


def _check_expected(stream_id: str, expected: ExpectedVersion, actual: int) -> None:
    if expected == ANY:
        return
    if expected == STREAM_EXISTS:
        if actual == 0:
            raise WrongExpectedVersion(stream_id, expected, actual)
        return
    wanted = 0 if expected == NO_STREAM else expected
    if wanted != actual:
        raise WrongExpectedVersion(stream_id, expected, actual)


__all__ = [
    "BeforeCommitHook",
    "EncodedAppend",
    "EventStore",
    "FaultHook",
    "KeyAlreadyClaimed",
    "UnitOfWork",
]
