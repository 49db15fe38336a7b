"""The write path: load -> decide -> inline projections -> append -> commit.

One :class:`CommandUnit` is one transaction (STYLE.md "one transaction is the unit
of work"): every command handled in it folds state from the log (or from its own
earlier commands), decides, runs the inline projectors on the same connection and
buffers its events; the store appends them all as the last statement, checks that
every stream a decision *read* is still where it was, and commits once. A version
conflict anywhere rolls the whole unit back, and :meth:`Dispatcher.run` retries it.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import security
from domain.base import Command, CommandContext, Event, decode_event, encode_event
from domain.errors import AlreadyExists, DomainError
from domain.routing import Decider, claims, erasures, route
from eventstore import telemetry
from eventstore.crypto import SubjectKeys, keyring
from eventstore.errors import ConcurrencyError, KeyAlreadyClaimed
from eventstore.grouping import GroupQueue, Waiting, settle
from eventstore.prepared import execute
from eventstore.records import AppendResult, EventContext, NewEvent
from eventstore.schema import events as events_table
from eventstore.schema import processed_commands, snapshots, unique_keys
from eventstore.store import EventStore, UnitOfWork
from eventstore.translate import translate_errors
from projections.errors import InlineProjectionBehind, ProjectionFailed
from projections.projector import Envelope
from projections.runner import InlineRunner, Worker
from tiu.idempotency import leaves_trace, refusal_outcome, replayed_refusal

# Statements of every command, built once (building them per command was a third of a
# command's time, profiled); executed with parameters, they hit the compiled cache.
_REMEMBER = {
    # DO NOTHING keeps the transaction usable; a concurrent duplicate then loses on its
    # events' versions and, retried, finds this row.
    "postgresql": pg_insert(processed_commands).on_conflict_do_nothing(),
    "sqlite": sqlite_insert(processed_commands).on_conflict_do_nothing(),
}

log = logging.getLogger("tiu.dispatch")
T = TypeVar("T")


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


@dataclass
class _Mark:
    streams: dict[str, _Loaded]
    appended: set[str]
    results: int
    uow: tuple[int, dict[str, int]]
    keys: Any


class GroupRerun(Exception):  # a signal, not an error anyone sees
    """A command of a group failed after it began writing rows: roll the group back
    and run its commands one by one."""


class CommandUnit:
    """The commands of one transaction. Obtain from :meth:`Dispatcher.unit`."""

    def __init__(self, dispatcher: Dispatcher, uow: UnitOfWork) -> None:
        self.dispatcher = dispatcher
        self.uow = uow
        self.keys = dispatcher.keys.writer(uow.conn, dispatcher.store.now)
        self._streams: dict[str, _Loaded] = {}
        self._appended: set[str] = set()
        self.results: list[CommandResult] = []
        self._writing = False  # whether the current command has begun writing rows

    @property
    def conn(self) -> AsyncConnection:
        return self.uow.conn

    async def load(self, decider: Decider, stream_id: str) -> _Loaded:
        cached = self._streams.get(stream_id)
        if cached is not None:
            return cached
        await self.load_many([(decider, stream_id)])
        return self._streams[stream_id]

    async def load_many(
        self, wanted: Sequence[tuple[Decider, str]], *, command_id: str | None = None
    ) -> CommandResult | None:
        """Load the streams not loaded yet by this unit, in one statement, which also
        tells whether ``command_id`` was processed: its first result if so."""
        missing = [(d, s) for d, s in wanted if s not in self._streams]
        if not missing and command_id is None:
            return None
        folded, processed = await self.dispatcher.fold_many(
            self.conn, missing, command_id=command_id
        )
        for decider, stream_id in missing:
            state, version, snap = folded[stream_id]
            self._streams[stream_id] = _Loaded(decider, state, version, version, snap)
        if processed is None or command_id is None:
            return None
        return await self.dispatcher.previous_result(self.conn, command_id, *processed)

    async def handle(self, command: Command, ctx: CommandContext) -> CommandResult:
        """Decide ``command`` and buffer its events in this unit."""
        target = route(command, ctx)
        # Whether it was processed, the target and the streams the decision reads:
        # one statement.
        with telemetry.step("tiu.load", command):
            previous = await self.load_many(
                [(target.decider, target.stream_id), *target.related.values()],
                command_id=command.command_id,
            )
        if previous is not None:
            return previous
        loaded = await self.load(target.decider, target.stream_id)
        related = {
            name: (await self.load(decider, stream)).state
            for name, (decider, stream) in target.related.items()
        }
        with telemetry.step("tiu.decide", command):
            new_events = target.decider.decide(command, loaded.state, ctx, related)
        return await self.record(command, ctx, target.decider, target.stream_id, new_events)

    async def record(
        self,
        command: Command,
        ctx: CommandContext,
        decider: Decider,
        stream_id: str,
        new_events: Sequence[Event],
        *,
        outcome: dict[str, Any] | None = None,
    ) -> CommandResult:
        """Fold, project and buffer ``new_events`` for ``stream_id``."""
        self._writing = True
        loaded = await self.load(decider, stream_id)
        base = loaded.version
        result = CommandResult(command.command_id, stream_id, tuple(new_events), base)
        if new_events:
            stored = [await self.encode(e, command) for e in new_events]
            for event in new_events:
                for claim in claims(event):
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
            self.uow.append(
                stream_id,
                decider.category,
                stored,
                loaded.loaded_version if stream_id not in self._appended else "any",
                context=_event_context(command, ctx),
                recorded_at=ctx.now,
            )
            self._appended.add(stream_id)
            result = CommandResult(command.command_id, stream_id, tuple(new_events), loaded.version)
            await self.dispatcher.maybe_snapshot(self.conn, stream_id, loaded)
        await self.dispatcher.remember(
            self.conn,
            command,
            stream_id,
            outcome or {"ok": True, "version": result.version},
            ctx.now,
        )
        self.results.append(result)
        return result

    async def encode(self, event: Event, command: Command) -> NewEvent:
        """``event`` as stored: its personal fields encrypted for its subject."""
        new = _to_new_event(event, command)
        if not event.personal_fields or event.subject_field is None:
            return new
        subject = getattr(event, event.subject_field)
        data = await self.keys.seal(
            subject if isinstance(subject, str) else None,
            new.event_type,
            new.data,
            event.personal_fields,
        )
        return NewEvent(new.event_type, data, new.schema_version, new.metadata, new.event_id)

    async def erase(self, subject_id: str, stream_id: str) -> None:
        """Shred ``subject_id``'s keys, free the unique keys of ``stream_id`` (hashes of
        their email and username) and drop its snapshots (folded plaintext state)."""
        await self.keys.destroy(subject_id)
        await self.conn.execute(delete(unique_keys).where(unique_keys.c.stream_id == stream_id))
        await self.conn.execute(delete(snapshots).where(snapshots.c.stream_id == stream_id))

    async def append_security(
        self, command: Command, error: DomainError, ctx: CommandContext
    ) -> None:
        event = security.rejection_event(command, error, ctx)
        if event is None:
            return
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
        """This unit's in-memory state, to :meth:`restore` when a command is refused."""
        return _Mark(
            {k: replace(v) for k, v in self._streams.items()},
            set(self._appended),
            len(self.results),
            self.uow.mark(),
            self.keys.mark(),
        )

    def restore(self, mark: _Mark) -> None:
        self._streams = {k: replace(v) for k, v in mark.streams.items()}
        self._appended = set(mark.appended)
        del self.results[mark.results :]
        self.uow.restore(mark.uow)
        self.keys.restore(mark.keys)

    async def isolated(self, command: Command, ctx: CommandContext) -> CommandResult:
        """:meth:`handle` for one command of a group: a refusal undoes this command alone
        (its recorded facts and security event are kept, as :meth:`Dispatcher.dispatch`
        keeps them) and is raised; the unit stays usable for the next command.

        No SAVEPOINT: a command is refused while it decides, before it writes a row,
        so undoing it is undoing its in-memory state (:meth:`mark`, :meth:`restore`).
        A SAVEPOINT and its RELEASE were two more statements per command (two round
        trips on PostgreSQL). A command that fails after it began writing (a unique
        key taken, say) raises :class:`GroupRerun`: the group's transaction is rolled
        back and each of its commands runs alone.
        """
        mark = self.mark()
        self._writing = False
        try:
            return await self.handle(command, ctx)
        except DomainError as error:
            if self._writing:
                raise GroupRerun(command.command_id) from error
            self.restore(mark)
            if leaves_trace(error):
                await self.record_refusal(command, ctx, error)
            raise

    async def record_refusal(
        self, command: Command, ctx: CommandContext, error: DomainError
    ) -> None:
        """Append what a refusal must leave in the log: ``error.record`` to the command's
        stream and the security event to the actor's security stream; and remember the
        refusal under the command's id, so a resend answers with it and appends
        nothing (no second audit event, no second failed login)."""
        target = route(command, ctx)
        outcome = refusal_outcome(error)
        if error.record:
            await self.record(
                command, ctx, target.decider, target.stream_id, error.record, outcome=outcome
            )
        else:
            await self.dispatcher.remember(self.conn, command, target.stream_id, outcome, ctx.now)
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
    ) -> None:
        self.store = store
        self.group = GroupCommitter(self, max_group) if group_commit else None
        self.keys = keys or keyring(store.engine)
        self.inline = inline
        self.snapshot_every = snapshot_every
        self.retries = retries

    # -- the unit of work ---------------------------------------------------------------

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[CommandUnit]:
        """One transaction of commands; commits on exit, rolls back on any error."""

        async def after_flush(uow: UnitOfWork) -> None:
            if self.inline is not None:
                first = min(r.first_position for r in uow.results)
                last = max(r.last_position for r in uow.results)
                await self.inline.advance(uow.conn, first, last)

        unit: CommandUnit | None = None
        try:
            # Projector and key statements run on the unit's connection too: their
            # deadlocks and lost connections become typed (and retryable) errors.
            with (
                telemetry.span("tiu.write"),
                translate_errors(self.store.dialect.database_label),
            ):
                async with self.store.transaction(after_flush=after_flush) as uow:
                    unit = CommandUnit(self, uow)
                    yield unit
                    unit.before_flush()
        finally:
            if unit is not None:
                unit.keys.close()  # after COMMIT or ROLLBACK: its keys may be cached now
        unit.finish()

    async def run(self, work: Callable[[CommandUnit], Awaitable[T]]) -> tuple[T, CommandUnit]:
        """Run ``work`` in a unit, retrying the whole unit on a version conflict.

        Returns what ``work`` returned and the committed unit, whose ``results`` carry
        the positions allocated at commit.
        """
        attempt = 0
        while True:
            try:
                async with self.unit() as unit:
                    value = await work(unit)
                return value, unit
            except KeyAlreadyClaimed as error:
                raise AlreadyExists(error.scope, None) from error
            except InlineProjectionBehind:
                await self.catch_up_inline()
            except ConcurrencyError:
                attempt += 1
                telemetry.note(command_retries=attempt)
                if attempt > self.retries:
                    raise
                # jittered backoff so that colliding writers spread out
                await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311

    async def dispatch(self, command: Command, ctx: CommandContext) -> CommandResult:
        """Process one command in its own transaction.

        A refusal appends nothing to the command's stream, except the facts the
        refusal carries in ``record`` (a failed login); a security-relevant refusal
        also appends an audit event to the actor's security stream. Both are
        committed before the error is re-raised.
        """
        group = self.group
        work = group.dispatch(command, ctx) if group else self.dispatch_alone(command, ctx)
        return await telemetry.command(command, ctx, work)

    async def dispatch_alone(self, command: Command, ctx: CommandContext) -> CommandResult:
        """:meth:`dispatch` in a transaction of its own, never grouped."""
        rejected: list[DomainError] = []

        async def work(unit: CommandUnit) -> CommandResult:
            try:
                return await unit.handle(command, ctx)
            except DomainError as error:
                if not leaves_trace(error):
                    raise
                rejected.append(error)
                await unit.record_refusal(command, ctx, error)
                return CommandResult(command.command_id, route(command, ctx).stream_id, (), 0)

        result, unit = await self.run(work)
        if rejected:
            raise rejected[-1]
        if result.duplicate:
            return result
        return next(r for r in unit.results if r.command_id == command.command_id)

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
        await Worker(self.store, self.inline.projectors, leader_election=False).catch_up()

    # -- loading ------------------------------------------------------------------------

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
    ) -> tuple[dict[str, tuple[Any, int, int]], tuple[str, Any] | None]:
        """Fold several streams (a command loads its target and the streams its
        decision reads) from their snapshots and the events since, and tell whether
        ``command_id`` was processed (``(stream id, outcome)``): one statement."""
        deciders = {stream_id: decider for decider, stream_id in wanted}
        folded: dict[str, list[Any]] = {
            stream_id: [decider.initial_state(), 0, 0] for stream_id, decider in deciders.items()
        }
        snapshotted = [  # a decider's snapshot is used only by that decider and version
            (
                stream_id,
                deciders[stream_id].name
                if self.snapshot_every and isinstance(entry[0], BaseModel)
                else None,
                deciders[stream_id].version,
            )
            for stream_id, entry in folded.items()
        ]
        processed = None
        if command_id is None and all(decider is None for _, decider, _ in snapshotted):
            # Nothing but events to read: the plain per-stream read is the lighter
            # statement (the combined one cost ~2x per event on 100-event streams).
            records = await self.store.read_streams_data(conn, dict.fromkeys(folded, 1))
        else:
            loaded = await self.store.load_streams(conn, command_id, snapshotted)
            for stream_id, (version, state) in loaded.snapshots.items():
                entry = folded[stream_id]
                entry[:] = [type(entry[0]).model_validate(state), version, version]
            records, processed = loaded.events, loaded.processed
        opened = await self.keys.open_many(conn, [(r.event_type, r.data) for r in records])
        for record, data in zip(records, opened, strict=True):
            entry = folded[record.stream_id]
            event = decode_event(record.event_type, record.schema_version, data.data, data.erased)
            entry[0] = deciders[record.stream_id].evolve(entry[0], event)
            entry[1] = record.version
        states = {stream_id: (state, v, snap) for stream_id, (state, v, snap) in folded.items()}
        return states, processed

    async def maybe_snapshot(self, conn: AsyncConnection, stream_id: str, loaded: _Loaded) -> None:
        every = self.snapshot_every
        if not every or not isinstance(loaded.state, BaseModel):
            return
        if loaded.version // every <= loaded.snapshot_version // every:
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
        self, conn: AsyncConnection, command_id: str, stream_id: str, outcome: dict[str, Any]
    ) -> CommandResult:
        """The first result of ``command_id``, processed already (``outcome`` is what
        its idempotency record holds); a refusal is raised again, as its own class
        (:func:`tiu.idempotency.replayed_refusal`)."""
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
        await execute(
            conn,
            _REMEMBER[conn.dialect.name],
            {
                "command_id": command.command_id,
                "command_type": type(command).__name__,
                "stream_id": stream_id,
                "outcome": outcome,
                "recorded_at": now,
            },
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


class GroupCommitter:
    """Group commit: concurrent :meth:`Dispatcher.dispatch` calls of this process share
    one transaction (queued on :class:`eventstore.grouping.GroupQueue`).

    Appends are serialised (ORDERING.md), so one command per transaction caps the
    write rate at one commit (and one append lock) per command. Commands that arrive
    while a group is being written form the next group; a refused command undoes only
    itself (see :meth:`CommandUnit.isolated`) and gets its own error, and every caller is
    answered after the group's COMMIT. If the group as a whole fails on a conflict
    with another process, its commands are retried one by one, so no caller sees an
    error caused by another caller's command.
    """

    def __init__(self, dispatcher: Dispatcher, max_group: int = 64) -> None:
        self.dispatcher = dispatcher
        self._queue: GroupQueue[tuple[Command, CommandContext], CommandResult] = GroupQueue(
            telemetry.traced_group(self._write, lambda item: item[0]), max_group
        )

    @property
    def max_group(self) -> int:
        return self._queue.max_group

    async def dispatch(self, command: Command, ctx: CommandContext) -> CommandResult:
        return await self._queue.submit((command, ctx))

    async def aclose(self) -> None:
        await self._queue.aclose()

    async def _write(
        self, group: list[Waiting[tuple[Command, CommandContext], CommandResult]]
    ) -> None:
        if len(group) == 1:
            ((command, ctx), future) = group[0]
            await settle(future, self.dispatcher.dispatch_alone(command, ctx))
            return
        outcomes: list[CommandResult | BaseException] = []
        try:
            async with self.dispatcher.unit() as unit:
                for (command, ctx), _ in group:
                    try:
                        outcomes.append(await unit.isolated(command, ctx))
                    except DomainError as error:
                        outcomes.append(error)
        except (ConcurrencyError, InlineProjectionBehind, GroupRerun, ProjectionFailed):
            # Another process got in between, or a command failed after writing (an
            # inline projector raised): settle each command alone, with retries.
            for (command, ctx), future in group:
                await settle(future, self.dispatcher.dispatch_alone(command, ctx))
            return
        except BaseException as error:  # the database is gone: every caller learns it
            for _, future in group:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        positioned = {r.command_id: r for r in unit.results}
        for ((command, _), future), outcome in zip(group, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(positioned.get(command.command_id, outcome))
