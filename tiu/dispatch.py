"""The write path, in two stages: prepare, then write.

*Prepare* holds no write lock: load the streams the command's decision reads
(snapshot, then events; one statement that also finds a processed ``command_id``),
do the slow work the decision asks for off the event loop (a password verified or
hashed on a worker thread: ``domain.passwords.PasswordWorkNeeded``), and decide.
*Write* is one short transaction (:class:`CommandUnit`): check that every stream the
decision read is still at the version it read, run the inline projectors on the same
connection, buffer the events; the store appends them as the last statement (with
their expected versions and those of the streams only read) and commits. On SQLite
``BEGIN IMMEDIATE`` starts only there. A version conflict sends the command back to
prepare (bounded, then ``ConcurrencyError``); password outcomes are kept across the
retries, so a password verified against a hash the stream still holds is not
verified again.

Personal data (``Event.personal_fields``) is encrypted with the data subject's key as
events are encoded for the append (keys are created on first use, in the same
transaction), and decrypted wherever stored events are decoded here (folding a
stream, replaying a processed command). An event that erases a subject
(``routing.erasures``) destroys their keys in the transaction that appends it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any, Final, TypeVar

from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import security
from domain.base import Command, CommandContext, Event, decode_event, encode_event
from domain.errors import AlreadyExists, DomainError
from domain.passwords import (
    NO_PASSWORD_WORK,
    BcryptHasher,
    PasswordHasher,
    PasswordOutcomes,
    PasswordWorkNeeded,
    perform,
)
from domain.routing import SESSIONS, Decider, Route, claims, erasures, route
from eventstore import telemetry
from eventstore.crypto import DEFAULT_TTL, KeyWriter, SubjectKeys, keyring
from eventstore.dialects import CheckpointsNotMoved
from eventstore.engine import UnitConnection, checked_out, driver_round_trip
from eventstore.errors import (
    CommandInFlight,
    ConcurrencyError,
    InvalidAppend,
    KeyAlreadyClaimed,
    WrongExpectedVersion,
)
from eventstore.grouping import GroupQueue, Waiting, settle, until_done, whole_round_trip
from eventstore.prepared import execute
from eventstore.records import ANY, AppendResult, EventContext, ExpectedVersion, NewEvent
from eventstore.schema import events as events_table
from eventstore.schema import processed_commands, snapshots, unique_keys
from eventstore.store import EncodedAppend, EventStore, UnitOfWork
from eventstore.translate import translate_errors
from projections.errors import InlineProjectionBehind, ProjectionFailed
from projections.projector import Envelope
from projections.runner import SHARED_LOOP_CHUNK, InlineRunner, Worker
from tiu.errors import CommandIdReused
from tiu.idempotency import leaves_trace, refusal_outcome, replayed_refusal
from tiu.password_threads import PASSWORD_THREADS

# Statements of every command, built once (building them per command was a third of a
# command's time, profiled); executed with parameters, they hit the compiled cache.
_REMEMBER = {
    # DO NOTHING keeps the transaction usable; a concurrent duplicate finds no row
    # inserted and raises CommandInFlight (see Dispatcher.remember), and, prepared again,
    # finds this row.
    "postgresql": pg_insert(processed_commands).on_conflict_do_nothing(),
    "sqlite": sqlite_insert(processed_commands).on_conflict_do_nothing(),
}

log = logging.getLogger("tiu.dispatch")
T = TypeVar("T")

#: On SQLite a group takes no further command once its commands have used this much of
#: the loop thread's CPU (seconds): they run inline, so the group holds the host's event
#: loop (and the write lock) that long. The rest lead the next group. CPU time, not the
#: clock: on a busy machine a command's clock time grows with the time its thread waits
#: for a core, and a budget by the clock shrank groups to ~1.3 commands there (8 callers,
#: 2 ms), which cost ~50% more CPU per command without shortening any stall.
GROUP_BUDGET: Final = 0.004
#: On SQLite a group's write gives the event loop a turn, in its transaction, between
#: two of its commands (and before its events and COMMIT) once it has used this much of
#: the loop thread's CPU since it last did: a group of 8 callers' commands is ~2-2.5 ms,
#: in one callback of the loop without it, the longest of all (bench case 9's
#: ``commands x8``). The write lock stays held across those turns: see
#: :class:`GroupCommitter`.
WRITE_SLICE: Final = 0.00075


def command_type_of(command: Command) -> str:
    """The name a command's idempotency record holds (``processed_commands``'s
    ``command_type``), which a resend of its command id is checked against."""
    return type(command).__name__


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a processed command produced. ``position`` is that of its last event
    (``None`` when it appended nothing); pass it to ``wait_for`` for read-your-writes
    against worker projections. ``duplicate`` is True for a repeated ``command_id``."""

    command_id: str
    stream_id: str
    events: tuple[Event, ...]
    version: int
    position: int | None = None
    duplicate: bool = False


@dataclass
class _Loaded:
    decider: Decider
    state: Any
    version: int
    loaded_version: int  # what the log held when this unit first read the stream
    snapshot_version: int = 0
    kept: bool = False  # taken from Dispatcher.states without reading the log

    def copy(self) -> _Loaded:
        # dataclasses.replace inspects the fields on every call (~5 us, profiled)
        return _Loaded(
            self.decider,
            self.state,
            self.version,
            self.loaded_version,
            self.snapshot_version,
            self.kept,
        )


@dataclass
class _Mark:
    streams: dict[str, _Loaded]
    unverified: set[str]
    appended: set[str]
    results: int
    uow: tuple[int, dict[str, int], int]
    keys: Any


@dataclass(frozen=True, slots=True)
class Decision:
    """A command prepared for the write stage: what it was decided on and the outcome.

    ``streams`` are the states the decision read, at the versions it read them; ``ctx``
    carries the password outcomes it was decided with. ``previous`` is set when the
    command was processed already; otherwise ``error`` (a refusal that leaves a record)
    or ``events``."""

    command: Command
    ctx: CommandContext
    target: Route
    streams: Mapping[str, _Loaded]
    events: tuple[Event, ...] = ()
    error: DomainError | None = None
    previous: CommandResult | None = None
    #: ``events`` validated and encoded for the log ahead of the write transaction
    #: (:meth:`Dispatcher.encode_ahead`), where they hold no personal field.
    encoded: EncodedAppend | None = None


class WriteLockTimes:
    """How long command transactions held the write lock: one sample per committed
    transaction that wrote, ``(seconds, commands in it)``, the newest ``maxlen`` kept.
    On SQLite from ``BEGIN IMMEDIATE`` to the end of COMMIT (the database's write
    lock); on PostgreSQL from the append (its advisory lock) to the end of COMMIT."""

    __slots__ = ("samples",)

    def __init__(self, maxlen: int = 100_000) -> None:
        self.samples: deque[tuple[float, int]] = deque(maxlen=maxlen)

    def clear(self) -> None:
        self.samples.clear()


#: Deciders whose folded states are not kept in :class:`FoldedStates`: a session's
#: events hold its user's personal data, whose erasure is appended to the user's
#: stream, not the session's, so a kept session state could outlive the erasure.
UNCACHED_DECIDERS: Final = frozenset({SESSIONS.name})


class FoldedStates:
    """The folded states of the streams this process's commands read: stream id ->
    ``(decider, version, state, snapshot version)``, the least recently used dropped
    beyond ``maxsize`` (0: none kept).

    A command prepared on its own (not inside a unit of work) decides on the kept
    state without reading the stream, and its write checks, under the write lock,
    that the stream is still at the kept version: a decision on a state the log has
    moved past is never committed, and goes back to prepare. Every decision reaches
    the write, refusals included (they are recorded), except one refused with
    ``InvalidCommand``, which can depend on the state too (a password that contains
    the user's email): decided on kept states, it is decided again on them brought
    up to the log before it is raised. Elsewhere a
    load starts from the kept state and reads only the events after it (and a
    snapshot only if newer).

    Only states of committed events are put: those a load folded, and the states of
    streams a committed write appended to. A stream whose new events erase a data
    subject is folded again from the log, where the personal data reads as erased;
    a stream that failed its version check is dropped (the next load folds it from
    the log, whatever happened to it).

    A kept state holds the personal data its events opened to, so it lives no longer
    than a cached key (``ttl`` seconds from its fold, as
    :class:`eventstore.crypto.KeyCache`): an erasure another process commits reaches
    this one as its keys do. This process's own erasure evicts the stream (:meth:`evict`)
    when it destroys the keys and again when its transaction ends; a load that began
    before an eviction puts nothing (``generation``), since it may have opened the
    data just before the keys went.
    """

    __slots__ = ("_clock", "_entries", "_swept", "generation", "maxsize", "ttl")

    def __init__(
        self,
        maxsize: int = 10_000,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self._clock = clock
        #: Bumped by every :meth:`evict`: a load that began before one must not put.
        self.generation = 0
        self._entries: OrderedDict[str, tuple[Decider, int, Any, int, float]] = OrderedDict()
        self._swept = clock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, decider: Decider, stream_id: str) -> tuple[int, Any, int] | None:
        """``(version, state, snapshot version)`` of ``stream_id`` folded by ``decider``."""
        entry = self._entries.get(stream_id)
        if entry is None or entry[0] is not decider:
            return None
        if self._clock() - entry[4] > self.ttl:
            del self._entries[stream_id]
            return None
        self._entries.move_to_end(stream_id)
        return entry[1], entry[2], entry[3]

    def put(
        self,
        decider: Decider,
        stream_id: str,
        version: int,
        state: Any,
        snapshot: int,
        *,
        generation: int | None = None,
    ) -> None:
        """Keep a state; ``generation``: :attr:`generation` when its load began."""
        if version == 0 or self.maxsize <= 0 or decider.name in UNCACHED_DECIDERS:
            return
        if generation is not None and generation != self.generation:
            return  # a load that began before an erasure's eviction
        entries = self._entries
        now = self._clock()
        if now - self._swept > self.ttl:  # entries nobody asks for expire too
            self._swept = now
            for key in [k for k, e in entries.items() if now - e[4] > self.ttl]:
                del entries[key]
        known = entries.get(stream_id)
        if known is not None and known[0] is decider and known[1] > version:
            return  # a load that began before a later write put its state
        entries[stream_id] = (decider, version, state, snapshot, now)
        entries.move_to_end(stream_id)
        while len(entries) > self.maxsize:
            entries.popitem(last=False)

    def discard(self, stream_id: str) -> None:
        self._entries.pop(stream_id, None)

    def evict(self, stream_id: str) -> None:
        """Drop ``stream_id``'s state, and keep out the states of loads running now."""
        self.generation += 1
        self._entries.pop(stream_id, None)

    def clear(self) -> None:
        self._entries.clear()


class GroupRerun(Exception):  # a signal, not an error anyone sees
    """A command of a group failed after it began writing rows: roll the group back
    and run its commands one by one."""


class CommandUnit:
    """The write transaction of one or more commands. Obtain from :meth:`Dispatcher.unit`.

    The transaction begins writing (``BEGIN IMMEDIATE`` on SQLite) at the first write,
    so a command prepared in the unit before that reads without the write lock; the
    versions it read are checked when the write begins (:meth:`apply`).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        uow: UnitOfWork,
        passwords: dict[str, PasswordOutcomes] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.uow = uow
        self.keys = dispatcher.keys.writer(uow.conn, dispatcher.store.now)
        self._streams: dict[str, _Loaded] = {}
        self._unverified: set[str] = set()  # read before the write began, not checked yet
        self._appended: set[str] = set()
        self.results: list[CommandResult] = []
        self._writing = False  # whether the current command has begun writing rows
        #: Password outcomes by command id, kept across the retries of a unit.
        self.passwords: dict[str, PasswordOutcomes] = {} if passwords is None else passwords
        #: Set when the unit's caller was cancelled: stop at the next command.
        self.stop: asyncio.Event | None = None
        #: Streams whose events in this unit erase a data subject.
        self.erased: set[str] = set()
        #: Command ids this unit recorded (:meth:`remember`): their records may be held.
        self._remembered: set[str] = set()

    @property
    def conn(self) -> AsyncConnection:
        return self.uow.conn

    @property
    def streams(self) -> dict[str, _Loaded]:
        return self._streams

    @property
    def appended(self) -> set[str]:
        """The streams this unit appends to (as far as its commands got)."""
        return self._appended

    async def begin(self) -> None:
        """Begin the write transaction (and hold the write lock), if not yet."""
        if not self.uow.writing:
            await self.uow.begin()

    async def end_read(self) -> None:
        """Before slow work: end a read transaction the unit's reads opened, so that
        nothing is held while it waits (a no-op once the unit writes)."""
        if not self.uow.writing and self.conn.in_transaction():
            await self.conn.rollback()

    async def load(self, decider: Decider, stream_id: str) -> _Loaded:
        cached = self._streams.get(stream_id)
        if cached is not None:
            return cached
        await self.load_many([(decider, stream_id)])
        return self._streams[stream_id]

    async def load_many(
        self,
        wanted: Sequence[tuple[Decider, str]],
        *,
        command_id: str | None = None,
        command_type: str | None = None,
    ) -> CommandResult | None:
        """Load the streams not loaded yet by this unit, in one statement, which also
        tells whether ``command_id`` was processed: its first result if so."""
        before = len(self._streams)
        # Of what a unit holds back, a load reads only the idempotency record (it reads
        # the log, snapshots and keys otherwise): that is sent first when the command
        # id was recorded in this unit, so a resend answers as the first send did.
        # Sending it for every load would cost a multi-command unit (a bulk call) a
        # round trip per held row.
        conn = await self.uow.reading() if command_id in self._remembered else self.conn
        previous = await self.dispatcher.load_into(
            conn, self._streams, wanted, command_id=command_id, command_type=command_type
        )
        if not self.uow.writing and len(self._streams) != before:
            self._unverified.update(s for _, s in wanted)
        return previous

    async def prepare(self, command: Command, ctx: CommandContext) -> Decision:
        """Stage one in this unit: its streams, its connection (see :meth:`Dispatcher.prepare`)."""
        self.check_stop()
        return await self.dispatcher.prepare(command, ctx, self)

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise asyncio.CancelledError

    async def check_ahead(self, decisions: Iterable[Decision]) -> None:
        """Begin the write and read the heads of the streams ``decisions`` read that
        this unit holds no state of, in one statement where the write lock makes them
        final (:meth:`UnitOfWork.read_heads`): :meth:`apply` then checks each decision's
        versions against them without a statement of its own."""
        await self.begin()
        await self.uow.read_heads(
            stream_id
            for decision in decisions
            for stream_id in decision.streams
            if stream_id not in self._streams
        )

    async def handle(self, command: Command, ctx: CommandContext) -> CommandResult:
        """Prepare ``command`` and buffer its events in this unit; a refusal is raised."""
        return await self.apply(await self.prepare(command, ctx))

    async def apply(self, decision: Decision) -> CommandResult:
        """Stage two for one decision, in this unit's write transaction: check that the
        streams it read are where it read them, then record its events. A refusal is
        raised (the caller decides whether to record it).

        A decision prepared elsewhere (by a caller of the group committer) on a stream
        an earlier command of this unit has written since, or that a transaction of
        this process committed since (its state is kept: :class:`FoldedStates`), is
        decided again on that newer state, if the password outcomes it carries still
        apply; else, and for a stream another process moved, ``WrongExpectedVersion``
        sends it back to prepare. Without the kept states, callers that prepare while
        a group is written decide on the states before it: eight callers creating tasks
        while the same user logged in (each login moves the user's stream, which every
        command of that user reads) failed 1-5% of their commands after five retries."""
        if decision.previous is not None:
            return decision.previous
        self.check_stop()
        if not self.uow.writing:
            await self.uow.begin()
        stale = False
        for stream_id, seen in decision.streams.items():
            mine = self._streams.get(stream_id)
            if mine is None:
                kept = self.dispatcher.states.get(seen.decider, stream_id)
                if kept is not None and kept[0] > seen.version:
                    version, state, snapshot = kept
                    mine = _Loaded(seen.decider, state, version, version, snapshot, True)
                    stale = True
                else:
                    mine = seen.copy()
                self._streams[stream_id] = mine
                self._unverified.add(stream_id)
            elif mine is not seen and mine.version != seen.version:
                stale = True
        if self._unverified:
            await self.uow.check_versions(
                {s: self._streams[s].loaded_version for s in self._unverified}
            )
            self._unverified = set()
        if stale:
            decision = self.redecide(decision)
        if decision.error is not None:
            raise decision.error
        target = decision.target
        # In a unit of work the caller's function may cut what it awaits and commit the
        # rest: cut midway, the command's idempotency record (and claims) would commit
        # without its events. There it runs to its end, as a cancelled command does
        # elsewhere.
        return await driver_round_trip(
            self.conn,
            self.record(
                decision.command,
                decision.ctx,
                target.decider,
                target.stream_id,
                decision.events,
                encoded=decision.encoded,
            ),
        )

    def redecide(self, decision: Decision) -> Decision:
        streams = {stream_id: self._streams[stream_id] for stream_id in decision.streams}
        try:
            return self.dispatcher.decide(decision.command, decision.ctx, decision.target, streams)
        except PasswordWorkNeeded:
            pass
        except DomainError:
            # Raised, this refusal meets no version check (what is weak in a password
            # depends on the user's email), and a kept state may be one another process
            # has moved past (PostgreSQL checks versions only at the append): prepare
            # decides it again on the log.
            if not any(loaded.kept for loaded in streams.values()):
                raise
        seen = decision.streams[decision.target.stream_id].version
        now = streams[decision.target.stream_id].version
        raise WrongExpectedVersion(decision.target.stream_id, seen, now)

    async def record(
        self,
        command: Command,
        ctx: CommandContext,
        decider: Decider,
        stream_id: str,
        new_events: Sequence[Event],
        *,
        outcome: dict[str, Any] | None = None,
        encoded: EncodedAppend | None = None,
    ) -> CommandResult:
        """Fold, project and buffer ``new_events`` for ``stream_id`` (``encoded``: as
        :meth:`Dispatcher.encode_ahead` encoded them)."""
        if not self.uow.writing:
            await self.uow.begin()
        loaded = self._streams.get(stream_id) or await self.load(decider, stream_id)
        base = loaded.version
        events = tuple(new_events)
        # The idempotency record first: a command sent again whose first send
        # committed meanwhile (or that was prepared without reading its record,
        # Dispatcher.assume_minted) is stopped there, before its rows (a read model's
        # insert would fail on the first send's row), with nothing written.
        await self.remember(
            command,
            stream_id,
            outcome or {"ok": True, "version": base + len(events)},
            ctx.now,
        )
        self._writing = True
        claimed = [claims(event) for event in events]
        if any(claimed):
            # A claim is sent at once, and would refuse a copy whose first send's
            # stream gave the key up since (and another stream took it): send the
            # record where it is held back for the append (PostgreSQL) ahead of it.
            # After _writing: what is held may fail there and abort the transaction.
            await self.uow.reading()
        if events:
            if encoded is not None:
                stored = [event for event, _, _ in encoded.events]
            else:
                stored = [await self.encode(e, command) for e in new_events]
            for event, event_claims in zip(events, claimed, strict=True):
                for claim in event_claims:
                    if claim.release:
                        await self.uow.release(claim.scope, claim.key, stream_id)
                    else:
                        await self.uow.claim(claim.scope, claim.key, stream_id)
                for subject_id in erasures(event):
                    await self.erase(subject_id, stream_id)
            state = loaded.state
            for event in new_events:
                state = decider.evolve(state, event)
            loaded.state = state
            loaded.version = base + len(new_events)
            envelopes = [
                Envelope(e, stream_id, base + i, None, ctx.now, ctx.actor_id, s.event_id)
                for i, (e, s) in enumerate(zip(new_events, stored, strict=True), start=1)
            ]
            if self.dispatcher.inline is not None:
                with telemetry.write_stage("project", self.conn):
                    await self.dispatcher.inline.apply(self.conn, envelopes)
            expected: ExpectedVersion = (
                loaded.loaded_version if stream_id not in self._appended else ANY
            )
            if encoded is not None:
                self.uow.append_encoded(encoded, expected)
            else:
                self.uow.append(
                    stream_id,
                    decider.category,
                    stored,
                    expected,
                    context=_event_context(command, ctx),
                    recorded_at=ctx.now,
                )
            self._appended.add(stream_id)
            if self.dispatcher.snapshot_due(loaded):
                await self.dispatcher.maybe_snapshot(self.conn, stream_id, loaded)
        result = CommandResult(command.command_id, stream_id, events, loaded.version)
        self.results.append(result)
        return result

    async def remember(
        self, command: Command, stream_id: str, outcome: dict[str, Any], now: datetime
    ) -> None:
        """Record ``command``'s outcome under its id, in this unit."""
        self._remembered.add(command.command_id)
        await self.dispatcher.remember(self.conn, command, stream_id, outcome, now)

    async def encode(self, event: Event, command: Command) -> NewEvent:
        """``event`` as stored: its personal fields encrypted for its subject."""
        return await seal_event(self.keys, event, _to_new_event(event, command))

    async def erase(self, subject_id: str, stream_id: str) -> None:
        """Shred ``subject_id``'s keys, free the unique keys of ``stream_id`` (hashes of
        their email and username) and drop its snapshots (folded plaintext state)."""
        await self.keys.destroy(subject_id)
        self.erased.add(stream_id)
        self.dispatcher.states.evict(stream_id)
        await self.conn.execute(delete(unique_keys).where(unique_keys.c.stream_id == stream_id))
        await self.conn.execute(delete(snapshots).where(snapshots.c.stream_id == stream_id))

    async def append_security(
        self, command: Command, error: DomainError, ctx: CommandContext
    ) -> None:
        event = security.rejection_event(command, error, ctx)
        if event is None:
            return
        await self.begin()
        stored = await self.encode(event, command)
        self.uow.append(
            security.stream_id(ctx.actor_id),
            security.CATEGORY,
            [stored],
            "any",
            context=_event_context(command, ctx),
            recorded_at=ctx.now,
        )
        if self.dispatcher.inline is not None:
            envelope = Envelope(
                event,
                security.stream_id(ctx.actor_id),
                0,
                None,
                ctx.now,
                ctx.actor_id,
                stored.event_id,
            )
            await self.dispatcher.inline.apply(self.conn, [envelope])

    def mark(self) -> _Mark:
        """This unit's in-memory state, to :meth:`restore` when a command is refused.

        The streams' states are not copied, only the mapping: a command changes a state
        the unit holds only once it has begun writing rows (:meth:`record`), and a
        command that fails after that is not restored (:class:`GroupRerun`). Copying
        each state cost a group of n commands n^2/2 copies."""
        return _Mark(
            dict(self._streams),
            set(self._unverified),
            set(self._appended),
            len(self.results),
            self.uow.mark(),
            self.keys.mark(),
        )

    def restore(self, mark: _Mark) -> None:
        self._streams = dict(mark.streams)
        self._unverified = set(mark.unverified)
        self._appended = set(mark.appended)
        del self.results[mark.results :]
        self.uow.restore(mark.uow)
        self.keys.restore(mark.keys)

    async def isolated(self, decision: Decision) -> CommandResult:
        """:meth:`apply` for one decision of a group: a refusal or a conflict undoes this
        command alone (a refusal's recorded facts and security event are kept, as
        :meth:`Dispatcher.write` keeps them) and is raised; the unit stays usable for
        the next command.

        No SAVEPOINT: a command is refused or found stale before it writes a row, so
        undoing it is undoing its in-memory state (:meth:`mark`, :meth:`restore`). A
        SAVEPOINT and its RELEASE were two more statements per command (two round
        trips on PostgreSQL). A command that fails after it began writing (a unique
        key taken, say) raises :class:`GroupRerun`: the group's transaction is rolled
        back and each of its commands is written alone.
        """
        mark = self.mark()
        self._writing = False
        try:
            return await self.apply(decision)
        except (DomainError, ConcurrencyError) as error:
            if self._writing:
                raise GroupRerun(decision.command.command_id) from error
            if isinstance(error, DomainError) and leaves_trace(error):
                # Recorded against the versions it was decided on (kept, not restored):
                # a refusal decided on a stream that moved must fail its version check.
                try:
                    await self.record_refusal(decision.command, decision.ctx, error)
                except ConcurrencyError as conflict:  # its key recorded by another send
                    if self._writing:
                        raise GroupRerun(decision.command.command_id) from conflict
                    self.restore(mark)
                    raise conflict from error
            else:
                self.restore(mark)
            raise

    async def record_refusal(
        self, command: Command, ctx: CommandContext, error: DomainError
    ) -> None:
        """Append what a refusal must leave in the log: ``error.record`` to the command's
        stream and the security event to the actor's security stream; and remember the
        refusal under the command's id, so a resend answers with it and appends
        nothing (no second audit event, no second failed login)."""
        await self.begin()  # these are writes: a unit that only records one must commit
        target = route(command, ctx)
        outcome = refusal_outcome(error)
        if error.record:
            await self.record(
                command, ctx, target.decider, target.stream_id, error.record, outcome=outcome
            )
        else:
            await self.remember(command, target.stream_id, outcome, ctx.now)
        await self.append_security(command, error, ctx)

    def before_flush(self) -> None:
        # Streams a decision read but this unit does not write must not have moved.
        for stream_id, loaded in self._streams.items():
            if stream_id not in self._appended:
                self.uow.expect(stream_id, loaded.loaded_version)

    def finish(self) -> list[CommandResult]:
        """Attach the global positions allocated at commit to the results."""
        appends: dict[str, list[AppendResult]] = {}
        for appended in self.uow.results:
            appends.setdefault(appended.stream_id, []).append(appended)
        finished = []
        for result in self.results:
            position = None
            if result.events:
                # A stream written by two commands of this unit has two appends: the
                # command's own last version lies in exactly one of them, where
                # versions map to positions one-to-one.
                appended = next(
                    a
                    for a in appends[result.stream_id]
                    if a.first_version <= result.version <= a.last_version
                )
                position = appended.first_position + (result.version - appended.first_version)
            finished.append(
                CommandResult(
                    result.command_id,
                    result.stream_id,
                    result.events,
                    result.version,
                    position,
                    result.duplicate,
                )
            )
        self.results = finished
        return finished


class Dispatcher:
    """Issues commands against the store, with retries, idempotency and snapshots."""

    def __init__(
        self,
        store: EventStore,
        *,
        inline: InlineRunner | None = None,
        snapshot_every: int = 100,
        retries: int = 5,
        keys: SubjectKeys | None = None,
        group_commit: bool = False,
        max_group: int = 64,
        group_budget: float | None = GROUP_BUDGET,
        hasher: PasswordHasher | None = None,
        cached_states: int = 10_000,
    ) -> None:
        """``cached_states``: how many folded stream states to keep (:class:`FoldedStates`);
        ``group_budget``: see :class:`GroupCommitter` (``None``: groups end only at
        ``max_group``)."""
        self.store = store
        self.group = GroupCommitter(self, max_group, group_budget) if group_commit else None
        self.keys = keys or keyring(store.engine)
        self.inline = inline
        #: The inline projectors' checkpoints, which a unit moves with its append.
        self._checkpoints = () if inline is None else tuple(p.name for p in inline.projectors)
        self.snapshot_every = snapshot_every
        self.retries = retries
        self.hasher: PasswordHasher = hasher or BcryptHasher()
        #: Write-lock hold times of committed command transactions (see the class).
        self.lock_times = WriteLockTimes()
        #: The folded states commands start their loads from (see the class).
        self.states = FoldedStates(cached_states)

    # -- stage one: prepare -------------------------------------------------------------

    async def prepare(
        self,
        command: Command,
        ctx: CommandContext,
        unit: CommandUnit | None = None,
        *,
        conn: AsyncConnection | None = None,
        release: Callable[[], Awaitable[None]] | None = None,
        minted: bool = False,
    ) -> Decision:
        """Load the streams ``command`` reads, do the password work its decision asks
        for on a worker thread, and decide. Holds no write lock: it reads in ``unit``
        (whose write lock it holds only if the unit already wrote), or on ``conn``
        (``release`` gives it back before the slow work), or on a connection of its
        own. A refusal that leaves no record is raised here; one that does is
        returned, to be recorded by the write stage.

        ``minted`` (not in a unit): take the ids the command minted for itself as new
        (see :meth:`assume_minted`), reading neither its idempotency record nor the
        stream it creates."""
        target = route(command, ctx)
        wanted = [(target.decider, target.stream_id), *target.related.values()]
        #: The command id whose idempotency record was not read (``minted``).
        unread: str | None = None
        command_type = command_type_of(command)
        with telemetry.step("tiu.load", command):
            if unit is not None:
                streams = unit.streams
                previous = await unit.load_many(
                    wanted, command_id=command.command_id, command_type=command_type
                )
                known = unit.passwords.get(command.command_id)
                if known is not None and ctx.passwords is NO_PASSWORD_WORK:
                    ctx = replace(ctx, passwords=known)
            else:
                streams = {}
                command_id: str | None = command.command_id
                if minted:
                    command_id = self.assume_minted(command, target, streams)
                    unread = command.command_id if command_id is None else None
                # Kept states first: a command that finds all it reads kept, and has no
                # record to look up, needs no load at all.
                if self.take_kept(streams, wanted) or command_id is not None:
                    previous = await self._load(
                        conn, streams, wanted, command_id, command_type=command_type, held=True
                    )
                else:
                    previous = None
        if previous is not None:
            return Decision(command, ctx, target, {}, previous=previous)
        read = {stream_id: streams[stream_id] for _, stream_id in wanted}
        while True:
            try:
                with telemetry.step("tiu.decide", command):
                    return self.encode_ahead(self.decide(command, ctx, target, read))
            except DomainError:
                # Raised here, the refusal meets no version check (what is weak in a
                # password depends on the user's state): one decided on kept states
                # is decided again on them brought up to the log, and one of a command
                # whose record was not read answers as the first send did, if any.
                kept = [(loaded.decider, s) for s, loaded in read.items() if loaded.kept]
                if not kept and unread is None:
                    raise
                fresh: dict[str, _Loaded] = {}
                previous = await self._load(conn, fresh, kept, unread, command_type=command_type)
                if previous is not None:
                    return Decision(command, ctx, target, {}, previous=previous)
                unread = None
                read = {**read, **fresh}
            except PasswordWorkNeeded as needed:
                if unread is not None:  # no slow work for a command already processed
                    previous = await self._load(conn, {}, [], unread, command_type=command_type)
                    if previous is not None:
                        return Decision(command, ctx, target, {}, previous=previous)
                    unread = None
                if unit is not None:
                    await unit.end_read()
                elif release is not None:
                    # Shielded: a cancelled caller must not abandon the close mid-way.
                    await asyncio.shield(release())
                    conn = None
                outcomes = await PASSWORD_THREADS.run(
                    perform, needed.tasks, command, self.hasher, ctx.passwords
                )
                ctx = replace(ctx, passwords=outcomes)
                if unit is not None:
                    unit.passwords[command.command_id] = outcomes

    @staticmethod
    def assume_minted(command: Command, target: Route, streams: dict[str, _Loaded]) -> str | None:
        """Put the stream ``command`` creates under an id minted for it
        (:attr:`domain.routing.Route.new`) into ``streams`` as empty, and return the
        command id to look up: ``None`` if it was minted for this command (a default
        the caller left out), which no transaction can have recorded yet.

        Both hold unless this command (or a copy of it) was sent before, and the write
        finds that: the created stream's version check fails, or its idempotency record
        conflicts; the command is then prepared again from the log (its caller does not
        pass ``minted`` again), and answers as the first send did. Such a stream counts
        as kept (:class:`FoldedStates`): a refusal decided on it is decided again on the
        log, and its first conflict is not counted against the retries."""
        if target.new:
            decider = target.decider
            streams[target.stream_id] = _Loaded(decider, decider.initial_state(), 0, 0, 0, True)
        return None if "command_id" not in command.model_fields_set else command.command_id

    async def _load(
        self,
        conn: AsyncConnection | None,
        streams: dict[str, _Loaded],
        wanted: Sequence[tuple[Decider, str]],
        command_id: str | None,
        *,
        command_type: str,
        held: bool = False,
    ) -> CommandResult | None:
        """:meth:`load_into` (``held``: as there; not held: from the log, no kept
        state), on ``conn`` while the caller still holds it (a second checkout per
        caller could exhaust the pool), else on a connection of its own."""

        load = partial(
            self.load_into,
            streams=streams,
            wanted=wanted,
            command_id=command_id,
            command_type=command_type,
            held=held,
        )

        async def load_on_own() -> CommandResult | None:
            async with self.store.engine.connect() as own:
                return await load(own)

        with translate_errors(self.store.dialect.database_label):
            # Never abandoned midway, its checkout (which may open a connection for the
            # pool) and close included: a caller cancelled meanwhile waits for it to end.
            return await whole_round_trip(
                self.store.dialect.round_trips, load(conn) if conn is not None else load_on_own()
            )

    @staticmethod
    def decide(
        command: Command, ctx: CommandContext, target: Route, streams: Mapping[str, _Loaded]
    ) -> Decision:
        """Decide ``command`` on ``streams``: pure, no I/O. A refusal that leaves no
        record is raised; ``PasswordWorkNeeded`` asks for password work first."""
        related = {
            name: streams[stream_id].state for name, (_, stream_id) in target.related.items()
        }
        try:
            events = target.decider.decide(command, streams[target.stream_id].state, ctx, related)
        except DomainError as error:
            if not leaves_trace(error):
                raise
            return Decision(command, ctx, target, streams, error=error)
        return Decision(command, ctx, target, streams, tuple(events))

    def encode_ahead(self, decision: Decision) -> Decision:
        """``decision`` with its events encoded for the log (JSON, hash tails) now, in
        the caller's task: in a write transaction that work would hold the write lock
        (and, on SQLite, the loop in the group's writer). Events with personal fields
        are sealed with their subject's key in the transaction, as before."""
        if not decision.events or any(e.personal_fields for e in decision.events):
            return decision
        command, ctx, target = decision.command, decision.ctx, decision.target
        encoded = self.store.encode_append(
            target.stream_id,
            target.decider.category,
            [_to_new_event(e, command) for e in decision.events],
            _event_context(command, ctx),
            ctx.now,
        )
        return Decision(command, ctx, target, decision.streams, decision.events, encoded=encoded)

    # -- stage two: write ---------------------------------------------------------------

    @asynccontextmanager
    async def unit(
        self,
        passwords: dict[str, PasswordOutcomes] | None = None,
        *,
        conn: AsyncConnection | None = None,
        keep_open: bool = False,
        turned: bool = False,
    ) -> AsyncIterator[CommandUnit]:
        """One write transaction of commands (on ``conn`` if given, which it closes
        unless ``keep_open``; ``turned``: see :meth:`EventStore.transaction`); begins
        writing at the first write, commits on exit, rolls back on any error."""

        unit: CommandUnit | None = None
        try:
            # Projector and key statements run on the unit's connection too: their
            # deadlocks and lost connections become typed (and retryable) errors.
            with (
                telemetry.write(),
                translate_errors(self.store.dialect.database_label),
            ):
                try:
                    async with self.store.transaction(
                        after_flush=self._after_flush,
                        lazy=True,
                        conn=conn,
                        keep_open=keep_open,
                        turned=turned,
                    ) as uow:
                        uow.checkpoints = self._checkpoints  # moved with the append where it can
                        unit = CommandUnit(self, uow, passwords)
                        yield unit
                        unit.before_flush()
                except CheckpointsNotMoved:
                    assert self.inline is not None
                    async with self.store.engine.connect() as own:
                        raise await self.inline.behind(own) from None
        finally:
            if unit is not None:
                unit.keys.close()  # after COMMIT or ROLLBACK: its keys may be cached now
                for stream_id in unit.erased:  # loads that read it before the COMMIT
                    self.states.evict(stream_id)
        if uow.lock_held is not None:
            self.lock_times.samples.append((uow.lock_held, len(unit.results)))
        unit.finish()
        for stream_id in unit.appended - unit.erased:  # committed: the log holds them now
            loaded = unit.streams.get(stream_id)
            if loaded is not None:
                self.states.put(
                    loaded.decider, stream_id, loaded.version, loaded.state, loaded.snapshot_version
                )

    async def _after_flush(self, uow: UnitOfWork) -> None:
        if self.inline is not None and not uow.checkpoints_moved:
            first = min(r.first_position for r in uow.results)
            last = max(r.last_position for r in uow.results)
            await self.inline.advance(uow.conn, first, last)

    async def run(
        self, work: Callable[[CommandUnit], Awaitable[T]], *, guarded: bool = False
    ) -> tuple[T, CommandUnit]:
        """Run ``work`` in a unit, retrying the whole unit on a version conflict.

        Returns what ``work`` returned and the committed unit, whose ``results`` carry
        the positions allocated at commit.

        The unit runs in a task of its own: a caller cancelled while a statement is
        in flight would otherwise abandon a connection mid-round-trip (on PostgreSQL
        its reset then fails and the connection is dropped under the driver's feet).
        The unit stops at its next command instead (rolled back, with no round trip
        in flight), and the caller is cancelled once it has.

        ``guarded``: ``work`` is the caller's own code (``execute_in_transaction``),
        which may cancel what it awaits (a timeout around a read): on PostgreSQL the
        unit's connection then never abandons a round trip midway
        (:class:`UnitConnection`), its statements sent on the driver directly included:
        abandoned, one dropped the connection and its transaction, and one PostgreSQL
        still ran was cancelled, which aborted the transaction.
        """
        stop = asyncio.Event()
        task = asyncio.ensure_future(self._run(work, stop, guarded))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            stop.set()
            await until_done(task)
            raise

    async def _run(
        self, work: Callable[[CommandUnit], Awaitable[T]], stop: asyncio.Event, guarded: bool
    ) -> tuple[T, CommandUnit]:
        attempt = 0
        passwords: dict[str, PasswordOutcomes] = {}
        while True:
            try:
                conn = None
                if guarded and self.store.dialect.round_trips:
                    with translate_errors(self.store.dialect.database_label):
                        conn = await UnitConnection(self.store.engine)
                async with self.unit(passwords, conn=conn) as unit:
                    unit.stop = stop
                    value = await work(unit)
                return value, unit
            except KeyAlreadyClaimed as error:
                raise AlreadyExists(error.scope, None) from error
            except InlineProjectionBehind:
                await self.catch_up_inline()
            except ConcurrencyError as error:
                self.forget(error)
                attempt += 1
                telemetry.note(command_retries=attempt)
                if attempt > self.retries:
                    raise
                await self.backoff(attempt)

    def forget(self, error: ConcurrencyError, read: Iterable[str] = ()) -> None:
        """After a conflict: drop the held state of the stream that moved, and those of
        the streams ``read`` (the failed decision's: others of them may have moved too,
        and the check names one)."""
        if isinstance(error, WrongExpectedVersion):
            self.states.discard(error.stream_id)
            for stream_id in read:
                self.states.discard(stream_id)

    @staticmethod
    async def backoff(attempt: int) -> None:
        # jittered, so that colliding writers spread out
        await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311

    async def dispatch(self, command: Command, ctx: CommandContext) -> CommandResult:
        """Process one command: prepare, then write.

        A refusal appends nothing to the command's stream, except the facts the
        refusal carries in ``record`` (a failed login); a security-relevant refusal
        also appends an audit event to the actor's security stream. Both are
        committed before the error is re-raised.
        """
        group = self.group
        work = group.dispatch(command, ctx) if group else self.dispatch_alone(command, ctx)
        return await telemetry.command(command, ctx, work)

    async def dispatch_alone(self, command: Command, ctx: CommandContext) -> CommandResult:
        """:meth:`dispatch` in a transaction of its own, never grouped: prepared on the
        unit's connection before its write begins."""
        rejected: list[DomainError] = []

        async def work(unit: CommandUnit) -> CommandResult:
            rejected.clear()
            decision = await unit.prepare(command, ctx)
            return await self._apply(unit, decision, rejected)

        result, unit = await self.run(work)
        if rejected:
            raise rejected[-1]
        if result.duplicate:
            return result
        return next(r for r in unit.results if r.command_id == command.command_id)

    async def write(
        self,
        decision: Decision,
        conn: AsyncConnection | None = None,
        *,
        keep_open: bool = False,
        turned: bool = False,
    ) -> CommandResult:
        """Stage two alone: one transaction for one decision prepared elsewhere (on
        ``conn`` if given: it is closed, unless ``keep_open`` and the write succeeds;
        ``turned``: see :meth:`EventStore.transaction`, for the first attempt).
        A conflict is raised (``ConcurrencyError``): the decision must be prepared again."""
        rejected: list[DomainError] = []
        while True:
            try:
                async with self.unit(
                    conn=conn, keep_open=keep_open and conn is not None, turned=turned
                ) as unit:
                    conn, turned = None, False
                    await self._apply(unit, decision, rejected)
            except KeyAlreadyClaimed as error:
                raise AlreadyExists(error.scope, None) from error
            except InlineProjectionBehind:
                await self.catch_up_inline()
                rejected.clear()
                continue
            if rejected:
                raise rejected[-1]
            command_id = decision.command.command_id
            return next(r for r in unit.results if r.command_id == command_id)

    @staticmethod
    async def _apply(
        unit: CommandUnit, decision: Decision, rejected: list[DomainError]
    ) -> CommandResult:
        try:
            return await unit.apply(decision)
        except DomainError as error:
            if not leaves_trace(error):
                raise
            rejected.append(error)
            await unit.record_refusal(decision.command, decision.ctx, error)
            return CommandResult(decision.command.command_id, decision.target.stream_id, (), 0)

    async def record_rejection(
        self, command: Command, error: DomainError, ctx: CommandContext
    ) -> None:
        """Append the security event for a refusal decided outside a decider (a read)."""

        async def work(unit: CommandUnit) -> None:
            await unit.append_security(command, error, ctx)

        await self.run(work)

    async def catch_up_inline(self) -> None:
        if self.inline is None:
            return
        log.warning("inline projections were behind the log; catching up")
        # On the host's loop: pages of SHARED_LOOP_BATCH, suspending between chunks.
        await Worker(
            self.store, self.inline.projectors, leader_election=False, pause_every=SHARED_LOOP_CHUNK
        ).catch_up()

    # -- loading ------------------------------------------------------------------------

    async def load_into(
        self,
        conn: AsyncConnection,
        streams: dict[str, _Loaded],
        wanted: Sequence[tuple[Decider, str]],
        *,
        command_id: str | None = None,
        command_type: str | None = None,
        held: bool = False,
    ) -> CommandResult | None:
        """Fold into ``streams`` those of ``wanted`` not in it yet, in one statement,
        which also tells whether ``command_id`` was processed: its first result if so
        (:meth:`previous_result`; ``command_type``: the class name of the command now
        sent under that id).

        ``held``: take a stream whose state is kept (:attr:`states`) as it is kept,
        without reading the log (see :class:`FoldedStates` for why that is safe)."""
        if held:
            missing = self.take_kept(streams, wanted)
        else:
            missing = [(d, s) for d, s in wanted if s not in streams]
        if not missing and command_id is None:
            return None
        folded, processed = await self.fold_many(conn, missing, command_id=command_id, cached=True)
        for decider, stream_id in missing:
            state, version, snap = folded[stream_id]
            streams[stream_id] = _Loaded(decider, state, version, version, snap)
        if processed is None or command_id is None:
            return None
        return await self.previous_result(conn, command_id, *processed, command_type=command_type)

    def take_kept(
        self, streams: dict[str, _Loaded], wanted: Sequence[tuple[Decider, str]]
    ) -> list[tuple[Decider, str]]:
        """Put into ``streams`` the kept states (:attr:`states`) of those of ``wanted``
        not in it yet, as :meth:`load_into` with ``held`` takes them; return those of
        which no state is kept (to be read from the log)."""
        missing = []
        for decider, stream_id in wanted:
            if stream_id in streams:
                continue
            kept = self.states.get(decider, stream_id)
            if kept is None:
                missing.append((decider, stream_id))
            else:
                version, state, snap = kept
                streams[stream_id] = _Loaded(decider, state, version, version, snap, True)
        return missing

    async def fold(
        self, conn: AsyncConnection, decider: Decider, stream_id: str
    ) -> tuple[Any, int, int]:
        """The state of one stream: ``(state, version, snapshot version)``."""
        return (await self.fold_many(conn, [(decider, stream_id)]))[0][stream_id]

    async def fold_many(
        self,
        conn: AsyncConnection,
        wanted: Sequence[tuple[Decider, str]],
        *,
        command_id: str | None = None,
        cached: bool = False,
    ) -> tuple[dict[str, tuple[Any, int, int]], tuple[str, Any, str] | None]:
        """Fold several streams (a command loads its target and the streams its
        decision reads) from their snapshots and the events since, and tell whether
        ``command_id`` was processed (``(stream id, outcome, command type)``): one
        statement.

        ``cached``: start from the states in :attr:`states` and read only the events
        after them (and a snapshot only if newer), and keep what was folded there."""
        deciders = {stream_id: decider for decider, stream_id in wanted}
        generation = self.states.generation
        folded: dict[str, list[Any]] = {}
        held: dict[str, int] = {}
        for stream_id, decider in deciders.items():
            kept = self.states.get(decider, stream_id) if cached else None
            if kept is None:
                folded[stream_id] = [decider.initial_state(), 0, 0]
            else:
                version, state, snap = kept
                folded[stream_id] = [state, version, snap]
                held[stream_id] = version
        snapshotted = [  # a decider's snapshot is used only by that decider and version
            (
                stream_id,
                deciders[stream_id].name
                if self.snapshot_every and isinstance(entry[0], BaseModel)
                else None,
                deciders[stream_id].version,
                entry[1],
            )
            for stream_id, entry in folded.items()
        ]
        processed = None
        if command_id is None and all(w[1] is None for w in snapshotted):
            # Nothing but events to read: the plain per-stream read is the lighter
            # statement (the combined one cost ~2x per event on 100-event streams).
            records = await self.store.read_streams_data(
                conn, {stream_id: entry[1] + 1 for stream_id, entry in folded.items()}
            )
        else:
            loaded = await self.store.load_streams(conn, command_id, snapshotted)
            for stream_id, (version, state) in loaded.snapshots.items():
                entry = folded[stream_id]
                entry[:] = [type(entry[0]).model_validate(state), version, version]
            records, processed = loaded.events, loaded.processed
        opened = await self.keys.open_many(conn, [(r.event_type, r.data) for r in records])
        refold: list[tuple[Decider, str]] = []
        for record, data in zip(records, opened, strict=True):
            entry = folded[record.stream_id]
            event = decode_event(record.event_type, record.schema_version, data.data, data.erased)
            if record.stream_id in held and erasures(event):
                # The held state was folded from the personal data this event erases:
                # fold the stream again from the log, where it reads as erased.
                refold.append((deciders[record.stream_id], record.stream_id))
                self.states.discard(record.stream_id)
            entry[0] = deciders[record.stream_id].evolve(entry[0], event)
            entry[1] = record.version
        states = {stream_id: (state, v, snap) for stream_id, (state, v, snap) in folded.items()}
        if refold:
            states.update((await self.fold_many(conn, list(dict.fromkeys(refold))))[0])
        if cached:
            for stream_id, (state, version, snap) in states.items():
                self.states.put(
                    deciders[stream_id], stream_id, version, state, snap, generation=generation
                )
        return states, processed

    def snapshot_due(self, loaded: _Loaded) -> bool:
        """Whether ``loaded`` has crossed a multiple of ``snapshot_every`` since its last
        snapshot (and its state can be one)."""
        every = self.snapshot_every
        return (
            bool(every)
            and loaded.version // every > loaded.snapshot_version // every
            and isinstance(loaded.state, BaseModel)
        )

    async def maybe_snapshot(self, conn: AsyncConnection, stream_id: str, loaded: _Loaded) -> None:
        if not self.snapshot_due(loaded):
            return
        values = {
            "stream_id": stream_id,
            "decider": loaded.decider.name,
            "decider_version": loaded.decider.version,
            "version": loaded.version,
            "state": loaded.state.model_dump(mode="json"),
            "taken_at": self.store.now(),
        }
        insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        statement = insert(snapshots).values(**values)
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=[snapshots.c.stream_id],
                set_={k: statement.excluded[k] for k in values if k != "stream_id"},
            )
        )
        loaded.snapshot_version = loaded.version

    # -- idempotency --------------------------------------------------------------------

    async def previous_result(
        self,
        conn: AsyncConnection,
        command_id: str,
        stream_id: str,
        outcome: dict[str, Any],
        recorded_type: str,
        *,
        command_type: str | None = None,
    ) -> CommandResult:
        """The first result of ``command_id``, processed already (``outcome`` is what
        its idempotency record holds); a refusal is raised again, as its own class
        (:func:`tiu.idempotency.replayed_refusal`). A command of another class than the
        one recorded (``command_type`` against ``recorded_type``) is refused with
        :class:`CommandIdReused`: answering with the first command's outcome would
        tell its caller that a command ran which never did."""
        if command_type is not None and command_type != recorded_type:
            raise CommandIdReused(command_id, recorded_type, command_type)
        if not outcome.get("ok", False):
            raise replayed_refusal(command_id, outcome)
        records = await conn.execute(
            select(
                events_table.c.event_type,
                events_table.c.schema_version,
                events_table.c.data,
                events_table.c.position,
            )
            .where(
                events_table.c.command_id == command_id,
                events_table.c.stream_id == stream_id,
            )
            .order_by(events_table.c.position)
        )
        rows = records.all()
        opened = await self.keys.open_many(conn, [(r.event_type, r.data) for r in rows])
        decoded = tuple(
            decode_event(r.event_type, r.schema_version, o.data, o.erased)
            for r, o in zip(rows, opened, strict=True)
        )
        position = rows[-1].position if rows else None
        return CommandResult(
            command_id, stream_id, decoded, int(outcome.get("version", 0)), position, True
        )

    async def remember(
        self,
        conn: AsyncConnection,
        command: Command,
        stream_id: str,
        outcome: dict[str, Any],
        now: datetime,
    ) -> None:
        """Record ``command``'s outcome under its id. A row already there was written by
        a concurrent send of the same id that committed first (DO NOTHING waited for
        it): this transaction must not write the command a second time. On PostgreSQL
        the record is sent with the append (:class:`eventstore.prepared.Deferred`), and
        ``CommandInFlight`` raised from there."""
        await execute(
            conn,
            _REMEMBER[self.store.dialect.name],  # the store's connections: its dialect
            {
                "command_id": command.command_id,
                "command_type": command_type_of(command),
                "stream_id": stream_id,
                "outcome": outcome,
                "recorded_at": now,
            },
            none_changed=CommandInFlight(command.command_id),
        )


def _event_context(command: Command, ctx: CommandContext) -> EventContext:
    return EventContext(
        actor_id=ctx.actor_id,
        correlation_id=ctx.correlation_id or command.command_id,
        causation_id=ctx.causation_id or command.command_id,
        command_id=command.command_id,
    )


def _to_new_event(event: Event, command: Command) -> NewEvent:
    event_type, schema_version, data = encode_event(event)
    metadata = {"command": type(command).__name__, **telemetry.trace_metadata(command)}
    return NewEvent(event_type, data, schema_version, metadata)


async def seal_event(keys: KeyWriter, event: Event, new: NewEvent) -> NewEvent:
    """``new``, ``event`` as appended, with ``event``'s personal fields encrypted for
    its subject by ``keys`` (a key made for a subject that has none yet)."""
    if not event.personal_fields or event.subject_field is None:
        return new
    subject = getattr(event, event.subject_field)
    data = await keys.seal(
        subject if isinstance(subject, str) else None,
        new.event_type,
        new.data,
        event.personal_fields,
    )
    return NewEvent(new.event_type, data, new.schema_version, new.metadata, new.event_id)


class GroupCommitter:
    """Group commit: concurrent :meth:`Dispatcher.dispatch` calls of this process share
    one write transaction (queued on :class:`eventstore.grouping.GroupQueue`), never
    their preparation.

    Appends are serialised (docs/ordering.md), so one command per transaction caps the
    write rate at one commit (and one append lock) per command. Each caller prepares
    its command in its own task (load, password work off the loop, decide) and queues
    the decision; decisions that arrive while a group is being written form the next
    group. A refused command undoes only itself (see :meth:`CommandUnit.isolated`) and
    gets its own error; a decision whose streams moved is decided again on the group's
    state, or sent back to its caller to prepare again; every caller is answered after
    the group's COMMIT. If the group as a whole fails (a conflict with another process,
    or a command that failed after writing), each decision is written alone, so no
    caller sees an error caused by another caller's command.

    ``budget`` (seconds of the loop thread's CPU, SQLite only; see :data:`GROUP_BUDGET`):
    a group whose commands have used that much takes no further command; the decisions
    left go back to the queue, ahead of the others, and the loop turns before the next
    group. Only the write's own work counts, not what other tasks run in the turns below.

    ``slice`` (SQLite only; see :data:`WRITE_SLICE`, ``None``: never): the write gives
    the loop a turn between two commands, and before its events and COMMIT, each time
    it has used that much of the loop thread's CPU since it last did, so that no
    callback of the loop is a whole group. The transaction, and SQLite's write lock,
    stay held across those turns: what the other tasks run there (the callers' next
    reads and decisions, on connections of their own) adds to the lock's hold, which
    other processes' writers wait for.
    """

    def __init__(
        self, dispatcher: Dispatcher, max_group: int = 64, budget: float | None = GROUP_BUDGET
    ) -> None:
        self.dispatcher = dispatcher
        # On PostgreSQL the write awaits its round trips and the lock is taken at the
        # append: there is nothing to bound.
        self.budget = None if dispatcher.store.dialect.round_trips else budget
        self.slice = None if dispatcher.store.dialect.round_trips else WRITE_SLICE
        # A lone caller on a SQLite file writes its own command (``alone_inline``, see
        # eventstore.grouping): no writer task, future and turn of the loop to answer
        # it, 1.2% of a command's instructions (callgrind, one caller's CreateTask).
        self._queue: GroupQueue[_Queued, CommandResult] = GroupQueue(
            telemetry.traced_group(self._write, _queued_record),
            max_group,
            idle=self._idle,
            alone_inline=dispatcher.store.dialect.writes_in_caller,
        )
        # Connections callers prepared on, kept for the next caller while the writer
        # runs (a burst), given back to the pool when it goes idle: a checkout and
        # return cost ~0.2 ms of loop time per command, more than a SQLite decision.
        self._spare: list[AsyncConnection] = []
        self._closing: set[asyncio.Task[None]] = set()

    async def _connect(self) -> AsyncConnection:
        if self._spare:
            return self._spare.pop()
        store = self.dispatcher.store
        with translate_errors(store.dialect.database_label):
            return await checked_out(
                store.engine.connect().start(), round_trips=store.dialect.round_trips
            )

    def _keep(self, conn: AsyncConnection) -> bool:
        """Keep ``conn`` (idle, out of any transaction) for the next caller or group if
        the writer is running. Synchronous: a caller that suspended here would let a
        writer with nothing queued end and give its connections back."""
        if (
            self._queue.busy
            and len(self._spare) < self.max_group
            and not conn.closed
            and not conn.in_transaction()
        ):
            self._spare.append(conn)
            return True
        return False

    def _idle(self) -> None:
        if self._spare:
            spare, self._spare = self._spare, []
            task = asyncio.get_running_loop().create_task(_close_all(spare))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @property
    def max_group(self) -> int:
        return self._queue.max_group

    async def dispatch(self, command: Command, ctx: CommandContext) -> CommandResult:
        attempt = 0
        # A decision on kept states (read from no log) that fails its version check
        # found them stale, not contended: the first such retry, on states all read
        # from the log, is not counted against ``retries``.
        free_retry = True
        while True:
            minted = attempt == 0 and free_retry
            queued = _Queued(await self._connect())
            try:
                decision = await self.dispatcher.prepare(
                    command, ctx, conn=queued.conn, release=queued.release, minted=minted
                )
                if decision.previous is not None:
                    return decision.previous
                ctx = decision.ctx  # its password outcomes serve the retries
                queued.decision = decision
                if self._queue.busy and queued.conn is not None:
                    # It will share a group: only the group's writer needs a connection.
                    spare = queued.take()
                    assert spare is not None
                    if not self._keep(spare):
                        await asyncio.shield(spare.close())
                return await self._queue.submit(queued)
            except ProjectionFailed:
                # On PostgreSQL a read model's row is written before the append checks
                # the versions: a decision that took its new stream as empty (minted)
                # fails there if a copy of the command created it. Prepared again from
                # the log, it is refused as it should be; a projector at fault fails
                # again.
                decided = queued.decision
                if not (minted and decided is not None and decided.target.new):
                    raise
                free_retry = False
            except ConcurrencyError as error:
                read = queued.decision.streams if queued.decision is not None else {}
                self.dispatcher.forget(error, read)
                if free_retry and any(loaded.kept for loaded in read.values()):
                    free_retry = False
                else:
                    attempt += 1
                if attempt > self.dispatcher.retries:
                    raise
            finally:
                if queued.conn is not None:  # not taken by the writer (refused, cancelled)
                    await asyncio.shield(queued.release())
            await self.dispatcher.backoff(attempt)

    async def aclose(self) -> None:
        await self._queue.aclose()
        self._idle()
        if self._closing:
            await asyncio.gather(*self._closing)

    async def _write(self, group: list[Waiting[_Queued, CommandResult]]) -> None:
        # A connection a caller prepared on (when the queue was idle): the writer's now.
        conn: AsyncConnection | None = None
        try:
            for queued, _ in group:
                taken = queued.take()
                if taken is not None and conn is None:
                    conn = taken
                elif taken is not None:
                    await taken.close()
        except BaseException:
            if conn is not None:
                await asyncio.shield(conn.close())
            raise
        if conn is None and self._spare:
            conn = self._spare.pop()
        try:
            await self._write_on(group, conn)
        finally:
            # Left open by a write that succeeded: the next group's, until the writer
            # goes idle (a checkout and return cost more than a SQLite command's write).
            if conn is not None and not conn.closed and not self._keep(conn):
                await asyncio.shield(conn.close())

    async def _write_on(
        self, group: list[Waiting[_Queued, CommandResult]], conn: AsyncConnection | None
    ) -> None:
        if len(group) == 1:
            queued, future = group[0]
            assert queued.decision is not None
            # Straight from a turn of the loop (see GroupQueue): no other before the write.
            write = self.dispatcher.write(queued.decision, conn, keep_open=True, turned=True)
            await settle(future, write)
            return
        outcomes: list[CommandResult | BaseException] = []
        decisions = [queued.decision for queued, _ in group]
        clock = _WriteClock()
        try:
            # A group of several takes its turn of the loop before its transaction:
            # without it, its write runs in the turn that answered the group before,
            # and eight callers' loop lag is ~1 ms longer at p99 (bench case 9's
            # commands on a 1M log: medians 5.7 against 4.6 ms, eight runs each).
            async with self.dispatcher.unit(conn=conn, keep_open=conn is not None) as unit:
                await unit.check_ahead(d for d in decisions if d is not None)
                for index, decision in enumerate(decisions):
                    assert decision is not None
                    if index and self._spent(clock):
                        self._queue.put_back(group[index:])
                        telemetry.leave_group([q.telemetry for q, _ in group[index:]])
                        group, decisions = group[:index], decisions[:index]
                        break
                    if index:
                        await self._maybe_turn(clock)
                    try:
                        outcomes.append(await unit.isolated(decision))
                    except (DomainError, ConcurrencyError) as error:
                        outcomes.append(error)
                await self._maybe_turn(clock)  # the events, checkpoints and COMMIT: ~0.5 ms
        except (
            ConcurrencyError,
            InlineProjectionBehind,
            GroupRerun,
            ProjectionFailed,
            InvalidAppend,
        ):
            # Another process got in between, or a command failed after writing (an
            # inline projector raised, or the store refused an event it could encode only
            # in the transaction: personal data is encrypted there): write each decision
            # alone, so only the command at fault fails. Not that of a caller cancelled
            # meanwhile: told so, and the group left nothing of it.
            for decision, (_, future) in zip(decisions, group, strict=True):
                assert decision is not None
                if not future.done():
                    await settle(future, self.dispatcher.write(decision))
            return
        except Exception as error:  # the database is gone: every caller learns it
            # Not a cancellation of the writer (the loop shutting down): its callers were
            # not cancelled, and the queue answers them with StoreUnavailable.
            for _, future in group:
                if not future.done():
                    future.set_exception(error)
            return
        positioned = {r.command_id: r for r in unit.results}
        for (queued, future), outcome in zip(group, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                assert queued.decision is not None
                future.set_result(positioned.get(queued.decision.command.command_id, outcome))

    def _spent(self, clock: _WriteClock) -> bool:
        """Whether the group has used its budget of the loop thread's CPU."""
        return self.budget is not None and clock.spent() >= self.budget

    async def _maybe_turn(self, clock: _WriteClock) -> None:
        """Give the loop a turn, in the group's transaction, if the write has used its
        slice since it last did."""
        if self.slice is not None and clock.since_turn() >= self.slice:
            await clock.turn()


class _WriteClock:
    """The loop thread's CPU a group's write has used, the turns it gave the loop
    (other tasks' work) left out."""

    __slots__ = ("_before", "_since")

    def __init__(self) -> None:
        self._before = 0.0  # used before the last turn
        self._since = time.thread_time()

    def since_turn(self) -> float:
        return time.thread_time() - self._since

    def spent(self) -> float:
        return self._before + self.since_turn()

    async def turn(self) -> None:
        self._before += self.since_turn()
        await asyncio.sleep(0)
        self._since = time.thread_time()


async def _close_all(conns: list[AsyncConnection]) -> None:
    for conn in conns:
        await conn.close()


class _Queued:
    """A caller's decision in the group queue, with the connection it was prepared on
    while the writer has not taken it (kept only when the queue was idle: a likely
    group of one then writes on it, saving a checkout)."""

    __slots__ = ("conn", "decision", "telemetry")

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn: AsyncConnection | None = conn
        self.decision: Decision | None = None
        #: The caller's dispatch, for the writer's telemetry to credit.
        self.telemetry = telemetry.dispatch_record()

    def take(self) -> AsyncConnection | None:
        conn, self.conn = self.conn, None
        return conn

    async def release(self) -> None:
        conn = self.take()
        if conn is not None:
            await conn.close()


def _queued_record(queued: _Queued) -> object:
    return queued.telemetry
