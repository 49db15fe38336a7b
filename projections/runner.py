"""Runners: inline (inside the command's transaction) and worker (batches off the log).

Both apply events through :meth:`Projector.apply_batch` and move the checkpoint in
the same transaction. A worker batch on PostgreSQL claims its checkpoint row with
``FOR UPDATE SKIP LOCKED`` (docs/ordering.md, "Checkpoints and several workers"), so two
workers never apply the same batch; on SQLite ``BEGIN IMMEDIATE`` gives the same
exclusivity. Leadership (one worker per projector) is an
optimisation on top: a session-level advisory lock on PostgreSQL, keyed by schema
and projector (``eventstore.dialects.try_advisory_lock``: tenants in other schemas
never contend for it), released when the leader's connection dies.

Leadership is spread: each worker holds a worker slot (another session lock), counts
the workers of its schema at every step and leads ``ceil(projectors / workers)`` of
them, preferring a different run of projectors per slot. A worker over its share
hands projectors back between batches; one under it takes free ones. A worker that
dies loses its locks with its session, and the others take its projectors at their
next step (docs/scaling.md states the bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.errors import InvalidCommand
from eventstore import telemetry
from eventstore.dialects import advisory_unlock, count_workers, join_workers, try_advisory_lock
from eventstore.engine import begin_write
from eventstore.errors import AppendTimeout, EventStoreError, StoreUnavailable, TransactionConflict
from eventstore.prepared import held_back
from eventstore.records import RecordedEvent
from eventstore.schema import events
from eventstore.schema import projection_checkpoints as cp
from eventstore.sqlite_driver import OFF_LOOP
from eventstore.store import EventStore
from eventstore.translate import translate_errors
from projections import checkpoints, parking
from projections.batching import BatchedProjector
from projections.errors import (
    InlineProjectionBehind,
    ProjectionFailed,
    ProjectionParked,
    ProjectionTimeout,
)
from projections.projector import Envelope, Projector, Tables, decode_records

log = logging.getLogger("projections")


#: While :func:`long_lived_heap` holds, the youngest generation is collected once this
#: many more container objects were allocated than freed (CPython's default: 700).
#: A batch of 10,000 events holds ~100k of them (records, envelopes, events, rows)
#: until it is written, then frees them together; at the default the collector
#: walked each several times, in three generations, finding no garbage: 0.2 s of
#: the 2.3 s CPU of a SQLite tasks rebuild of 94k events (no collection at all at
#: this threshold, 2.1 s). Cyclic garbage is still collected, after at most this
#: many objects.
BATCH_GC_THRESHOLD = 100_000


@contextlib.contextmanager
def long_lived_heap() -> Iterator[None]:
    """Leave the objects that exist now out of the garbage collector's scans while a
    batch loop (a rebuild, a catch-up) runs, and collect its young objects only after
    :data:`BATCH_GC_THRESHOLD` of them.

    Such a loop allocates a handful of objects per event, so the collector runs
    often, and its older generations walk every object the process holds: modules,
    SQLAlchemy metadata, pydantic schemas. A tasks rebuild of 94k events on SQLite
    ran 23k events/s as it was and 29k with that heap frozen (same run). The
    objects are put back (``gc.unfreeze``), and the thresholds, when the loop ends;
    cyclic garbage among the frozen objects waits until then. An application that
    froze its heap itself (``gc.get_freeze_count()`` above 0) is left as it is. The
    collector is the whole process's: only a caller that owns the process (the
    ``tiu`` commands) asks for this, never a service's start-up.
    """
    if gc.get_freeze_count():
        yield
        return
    thresholds = gc.get_threshold()
    gc.freeze()
    if thresholds[0]:  # 0: the application turned automatic collection off
        gc.set_threshold(max(thresholds[0], BATCH_GC_THRESHOLD), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def handled_types(projectors: Sequence[Projector]) -> list[str]:
    return sorted({t for p in projectors for t in p.handles})


async def apply_records(
    conn: AsyncConnection,
    projector: Projector,
    records: Sequence[RecordedEvent],
    tables: Tables | None = None,
    *,
    pause_every: int | None = None,
) -> None:
    """Apply the records ``projector`` handles, in one call or ``pause_every`` events at a
    time, suspending between chunks so the event loop's other tasks run (see
    :func:`sharing_the_loop`). Anything the projector raises (decoding included) becomes
    :class:`ProjectionFailed` naming the records; the database's own failures (a lost
    connection, a lock timeout, a deadlock) stay what they are, since no event is at
    fault."""
    handled = [r for r in records if r.event_type in projector.handles]
    step = pause_every or len(handled) or 1
    with telemetry.projector_batch(conn, projector.name, handled, replay=tables is not None):
        for start in range(0, len(handled), step):
            chunk = handled[start : start + step]
            try:
                with translate_errors():
                    envelopes = await decode_records(conn, chunk)
                    await projector.apply_batch(conn, envelopes, tables or projector.live_tables())
            except EventStoreError:  # the database's failure (lost, timed out, deadlocked)
                raise
            except Exception as error:
                raise ProjectionFailed(
                    projector.name,
                    chunk[0].position,
                    chunk[-1].position,
                    error,
                    chunk[0].event_type if len(chunk) == 1 else "several types",
                ) from error
            if pause_every:
                await asyncio.sleep(0)


#: Events a batch loop sharing a service's event loop applies between two suspensions:
#: ~3-8 ms of decoding and folding.
SHARED_LOOP_CHUNK = 200
#: Events such a loop reads per batch: a page the driver fetches inline (~3 ms on SQLite).
SHARED_LOOP_BATCH = 1_000
#: Events a worker reads per batch while it catches up (its last batch was full),
#: unless it shares a service's loop. Each batch costs a fixed handful of round trips,
#: and a fold writes each touched row once per batch however many events touched it.
#: One worker process catching all six projections up from 0 over a 100k-event
#: scenario log on PostgreSQL, two runs each, alternating: 44.8 and 47.9 s in batches
#: of 500, 25.5 and 15.6 s in catch-up batches of 10,000, the worker's CPU 11-13 s
#: against 7-8 s (``python -m bench.workers --events 100000 --workers 1
#: --catch-up-batch 500,10000 --runs 2``). Live tailing keeps ``batch_size``, so a
#: batch that follows a command stays short.
CATCH_UP_BATCH = 10_000


async def sharing_the_loop(conn: AsyncConnection, pause_every: int | None) -> None:
    """Make ``conn`` fit a batch loop that shares the event loop (``pause_every`` set):
    on SQLite its statements run on a worker thread (the driver's ``off_loop``)."""
    if pause_every:
        await conn.execution_options(**{OFF_LOOP: True})


@contextlib.contextmanager
def maybe_frozen_heap(freeze: bool) -> Iterator[None]:
    """:func:`long_lived_heap` when the caller owns the process (``freeze``)."""
    if freeze:
        with long_lived_heap():
            yield
    else:
        yield


#: The ``apply_batch`` of projectors that hand a lone envelope to ``apply``.
_BATCH_LAYERS: Final = (Projector.apply_batch, BatchedProjector.apply_batch)


def _failed(name: str, event_type: str) -> Callable[[BaseException], ProjectionFailed]:
    """What a projector's failure on ``event_type`` becomes: the command's refusal,
    naming the projector. Built where it is needed, not for every projector a command
    runs."""

    def failed(error: BaseException) -> ProjectionFailed:
        return ProjectionFailed(name, None, None, error, event_type)

    return failed


class InlineRunner:
    """Applies the projectors inside the command's transaction: read-your-writes."""

    def __init__(self, projectors: Sequence[Projector]) -> None:
        self.projectors = tuple(projectors)
        # Built once: every command applies its events to each of them.
        self._live = tuple((p, p.handles, p.live_tables()) for p in self.projectors)
        #: Per event type, the projectors that handle it, their live tables, and whether
        #: their ``apply_batch`` is the batch layer, which gives one envelope to
        #: ``apply``: a command's one event finds its projectors in one look.
        self._handling: dict[str, tuple[tuple[Projector, Tables, bool], ...]] = {}

    def _work(
        self, envelopes: Sequence[Envelope]
    ) -> Iterable[tuple[Projector, Sequence[Envelope], Tables, bool]]:
        """Each projector that handles some of ``envelopes``, with those, in order, and
        whether one of them may go to its ``apply`` straight."""
        if len(envelopes) != 1:
            return [
                (projector, relevant, tables, False)
                for projector, handles, tables in self._live
                if (relevant := [e for e in envelopes if e.event.event_type in handles])
            ]
        event_type = envelopes[0].event.event_type
        handling = self._handling.get(event_type)
        if handling is None:
            handling = self._handling[event_type] = tuple(
                (projector, tables, type(projector).apply_batch in _BATCH_LAYERS)
                for projector, handles, tables in self._live
                if event_type in handles
            )
        return [(projector, envelopes, tables, direct) for projector, tables, direct in handling]

    async def apply(self, conn: AsyncConnection, envelopes: Sequence[Envelope]) -> None:
        """Apply ``envelopes`` in the command's transaction on ``conn``. Where ``conn``
        holds writes back for the append (PostgreSQL, :func:`eventstore.prepared.held_back`),
        a projector that only writes (:attr:`Projector.only_writes`) has its rows held
        too, and sent with the append; any other runs after what is held has run.

        One envelope goes straight to the ``apply`` of a projector whose ``apply_batch``
        is the batch layer (:class:`Projector`'s or :class:`BatchedProjector`'s, which
        would hand it there), without that layer."""
        held = held_back(conn)
        for projector, relevant, tables, direct in self._work(envelopes):
            try:
                with translate_errors():
                    if held is None:
                        if direct:
                            await projector.apply(conn, relevant[0], tables)
                        else:
                            await projector.apply_batch(conn, relevant, tables)
                    elif len(relevant) == 1 and projector.only_writes:
                        with held.taking_from(_failed(projector.name, relevant[0].event_type)):
                            await projector.apply(conn, relevant[0], tables)
                    else:  # it may read what is held: run that first
                        await held.run(conn)
                        await projector.apply_batch(conn, relevant, tables)
            except (EventStoreError, ProjectionFailed):  # a deadlock is retried
                raise
            except Exception as error:  # the command is refused: nothing is appended
                raise _failed(projector.name, relevant[0].event_type)(error) from error

    async def advance(self, conn: AsyncConnection, first: int, last: int) -> None:
        """After the append: move every inline checkpoint from ``first - 1`` to ``last``.

        A checkpoint that was not at ``first - 1`` missed an event appended by some
        other path; raising rolls the command back so the caller can catch up first.
        (Where the append moves them itself, :meth:`behind` tells why it could not.)
        """
        moved = await checkpoints.advance(conn, self.projectors, expected=first - 1, position=last)
        if moved != len(self.projectors):
            raise await self.behind(conn, first - 1)

    async def behind(
        self, conn: AsyncConnection, expected: int | None = None
    ) -> InlineProjectionBehind | ProjectionParked:
        """The error for inline checkpoints not where an append started (at
        ``expected``; ``None``: not where the log's head is, the append rolled back)."""
        if expected is None:
            expected = int(await conn.scalar(select(func.max(events.c.position))) or 0)
        behind = []
        for p in self.projectors:
            row = await checkpoints.load_active(conn, p.name)
            if row is None or row.position != expected:
                behind.append(p.name)
        # A parked projector stays behind whatever a catch-up does: refuse.
        parked = await parking.load(conn, behind)
        if parked:
            return ProjectionParked({n: p.position for n, p in parked.items()})
        return InlineProjectionBehind(behind)


@dataclass
class BatchResult:
    projector: str
    applied: int
    position: int
    skipped: bool = False


@dataclass
class WorkerStats:
    events: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.events / elapsed if elapsed > 0 else 0.0


class Worker:
    """Projects the log in batches, one transaction per batch and projector."""

    def __init__(
        self,
        store: EventStore,
        projectors: Sequence[Projector],
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        leader_election: bool = True,
        pause_every: int | None = None,
        retries: int = 3,
        retry_delay: float = 0.5,
        catch_up_batch_size: int | None = None,
    ) -> None:
        """``pause_every``: share the event loop (:func:`sharing_the_loop`), suspending
        every that many events; for a worker inside a service.

        ``batch_size`` is a batch's size at the head; a projector whose last batch was
        full is behind, and its next batch reads ``catch_up_batch_size`` events
        (default :data:`CATCH_UP_BATCH`, or :data:`SHARED_LOOP_BATCH` when sharing
        the loop), never fewer than ``batch_size``."""
        self.store = store
        self.pause_every = pause_every
        self.projectors = tuple(projectors)
        self.batch_size = batch_size
        default = SHARED_LOOP_BATCH if pause_every else CATCH_UP_BATCH
        self.catch_up_batch_size = max(batch_size, catch_up_batch_size or default)
        #: Projectors whose last batch was full: they read catch-up batches.
        self._behind: set[str] = set()
        self.poll_interval = poll_interval
        #: A failing batch is tried again ``retries`` times, ``retry_delay`` doubling
        #: each time (0.5, 1, 2 s by default), before its projector is parked.
        self.retries = retries
        self.retry_delay = retry_delay
        self._failures: dict[str, int] = {}
        self._not_before: dict[str, float] = {}
        self.leader_election = leader_election and store.engine.dialect.name == "postgresql"
        self.stats = WorkerStats()
        self._leader_conn: AsyncConnection | None = None
        self._slot: int | None = None
        self._ready = False
        self._leading: set[str] = set()

    async def run_batch(self, projector: Projector, limit: int | None = None) -> BatchResult:
        """Apply at most one batch (of ``limit`` events, default the batch size, or the
        catch-up batch size after a full batch) for ``projector``; skipped if another
        worker holds it. Events an operator skipped for it are left out. Raises
        :class:`ProjectionFailed` if the projector raises."""
        if limit is None:
            behind = projector.name in self._behind
            limit = self.catch_up_batch_size if behind else self.batch_size
        engine = self.store.engine
        postgres = engine.dialect.name == "postgresql"
        async with engine.connect() as conn:
            await sharing_the_loop(conn, self.pause_every)
            await begin_write(conn)
            query = select(cp.c.position).where(cp.c.name == projector.name, cp.c.active.is_(True))
            if postgres:
                query = query.with_for_update(skip_locked=True)
            position = await conn.scalar(query)
            if position is None:
                await conn.rollback()
                return BatchResult(projector.name, 0, -1, skipped=True)
            head = await self.store.head_position(conn)
            records = await self.store.read_all(
                conn,
                position,
                limit,
                types=sorted(projector.handles),
                until_position=head,
            )
            # Every position up to head is committed (gap-free order), so when the
            # batch is not full the checkpoint may move straight to head.
            full = len(records) == limit
            new = records[-1].position if full else head
            if full:
                self._behind.add(projector.name)
            else:
                self._behind.discard(projector.name)
            telemetry.projector_lag(projector.name, head - new, records[-1:])
            if new == position:
                await conn.rollback()
                return BatchResult(projector.name, 0, position)
            if records:
                skip = await parking.skipped(conn, projector.name, position, new)
                if skip:
                    records = [r for r in records if r.position not in skip]
            await apply_records(conn, projector, records, pause_every=self.pause_every)
            await checkpoints.move(conn, projector.name, old=position, new=new)
            await conn.commit()
        self.stats.events += len(records)
        self.stats.batches += 1
        return BatchResult(projector.name, len(records), new)

    async def catch_up(
        self, projectors: Sequence[Projector] | None = None, *, freeze_heap: bool = False
    ) -> int:
        """Run batches until every projector has reached the head; returns events applied.

        ``freeze_heap``: :func:`long_lived_heap` meanwhile (for a process of its own)."""
        chosen = tuple(projectors or self.projectors)
        # Without a checkpoint row every batch would be "skipped": loop forever.
        await self._ensure_checkpoints(chosen)
        # A parked projector stays parked until an operator acts: retrying its event
        # here (at every start-up) would only repeat the back-off and the failure.
        async with self.store.engine.connect() as conn:
            parked = await parking.load(conn, [p.name for p in chosen])
        total = 0
        with maybe_frozen_heap(freeze_heap):
            for projector in chosen:
                if projector.name in parked:
                    continue
                while True:
                    result = await self._guarded_batch(projector)
                    if result is None:  # failed: parked, or to be retried after a pause
                        delay = self._not_before.get(projector.name)
                        if delay is None:
                            break
                        await asyncio.sleep(max(0.0, delay - time.monotonic()))
                        continue
                    total += result.applied
                    if result.skipped:
                        await asyncio.sleep(0.01)
                        continue
                    async with self.store.engine.connect() as conn:
                        head = await self.store.head_position(conn)
                    if result.position >= head:
                        break
        return total

    @property
    def leading(self) -> frozenset[str]:
        """The projectors this worker leads now (all of them without leader election)."""
        if not self.leader_election:
            return frozenset(p.name for p in self.projectors)
        return frozenset(self._leading)

    async def _acquire_leadership(self) -> list[Projector]:
        if not self.leader_election:
            return list(self.projectors)
        conn = self._leader_conn
        if conn is None:
            conn = self._leader_conn = await self.store.engine.connect()
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            # The server notices a leader whose host vanished (no FIN) by TCP
            # keepalives: ~5 + 3 x 2 s, after which its locks are free.
            await conn.execute(
                text(
                    "SELECT set_config('tcp_keepalives_idle', '5', false), "
                    "set_config('tcp_keepalives_interval', '2', false), "
                    "set_config('tcp_keepalives_count', '3', false)"
                )
            )
            self._slot = await join_workers(conn)
        workers = max(1, await count_workers(conn))
        count = len(self.projectors)
        share = -(-count // workers)
        start = ((self._slot or 0) * share) % max(count, 1)
        preferred = self.projectors[start:] + self.projectors[:start]
        for projector in reversed(preferred):  # hand back the least preferred first
            if len(self._leading) <= share:
                break
            if projector.name in self._leading:
                await advisory_unlock(conn, projector.name)
                self._leading.discard(projector.name)
                log.info("handing projector %s over (%d workers)", projector.name, workers)
        for projector in preferred:
            if len(self._leading) >= share:
                break
            if projector.name not in self._leading and await try_advisory_lock(
                conn, projector.name
            ):
                log.info("leading projector %s (%d workers)", projector.name, workers)
                self._leading.add(projector.name)
        return [p for p in self.projectors if p.name in self._leading]

    async def run(self, stop: asyncio.Event) -> None:
        """Project until ``stop`` is set; the batch in progress always finishes."""
        backoff = 0.1
        try:
            while not stop.is_set():
                try:
                    await self._step(stop)
                    backoff = 0.1
                except (StoreUnavailable, AppendTimeout, TransactionConflict) as error:
                    # The database went away (a restart, a failover), a lock timed
                    # out or a deadlock was broken: nothing of the batch was committed.
                    # Drop leadership (its session may be gone) and try again, backing
                    # off.
                    log.warning("worker paused: %s; retrying in %.1fs", error, backoff)
                    await self._drop_leadership()
                    await _sleep_unless(stop, backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            await self.aclose()

    async def _step(self, stop: asyncio.Event) -> None:
        with translate_errors(self.store.dialect.database_label):
            if not self._ready:
                await self._ensure_checkpoints()
                self._ready = True
            leading = await self._acquire_leadership()
            async with self.store.engine.connect() as conn:
                parked = await parking.load(conn)
            progressed = False
            for projector in leading:
                if stop.is_set():
                    return
                if projector.name in parked:
                    continue
                result = await self._guarded_batch(projector)
                progressed = progressed or (result is not None and result.applied > 0)
            if progressed:
                return
            async with self.store.engine.connect() as conn:
                head = await self.store.head_position(conn)
        waiter = asyncio.ensure_future(self.store.wait_for_append(head, self.poll_interval))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            task.cancel()

    async def _guarded_batch(self, projector: Projector) -> BatchResult | None:
        """:meth:`run_batch`, with a failing projector retried after a back-off and
        parked once the retries run out; ``None`` when no batch was applied for that
        reason (the other projectors are not held up)."""
        name = projector.name
        if self._not_before.get(name, 0.0) > time.monotonic():
            return None
        try:
            result = await self.run_batch(projector)
        except ProjectionFailed as failure:
            attempts = self._failures[name] = self._failures.get(name, 0) + 1
            if attempts <= self.retries:
                delay = self.retry_delay * 2 ** (attempts - 1)
                log.warning(
                    "projector %s failed (attempt %d of %d), retrying in %.1fs: %s",
                    name,
                    attempts,
                    self.retries + 1,
                    delay,
                    failure,
                )
                self._not_before[name] = time.monotonic() + delay
                return None
            self._failures.pop(name, None)
            self._not_before.pop(name, None)
            await self._park(projector, attempts)
            return None
        self._failures.pop(name, None)
        self._not_before.pop(name, None)
        return result

    async def _park(self, projector: Projector, attempts: int) -> None:
        # Apply event by event up to the one that fails, so the projector parks on
        # that event and every event before it is applied. A batch holds at most
        # batch_size events; if none fails now, the failure has passed.
        for _ in range(self.batch_size):
            try:
                result = await self.run_batch(projector, limit=1)
            except ProjectionFailed as failure:
                parked = await parking.park(self.store.engine, failure, attempts)
                log.error(
                    "projector %s parked at position %d (%s) after %d attempts: %s; "
                    "run `tiu projections retry %s` or `tiu projections skip %s %d`",
                    parked.name,
                    parked.position,
                    parked.event_type,
                    attempts,
                    parked.error,
                    parked.name,
                    parked.name,
                    parked.position,
                )
                return
            if result.skipped or result.applied == 0:
                return

    async def _drop_leadership(self) -> None:
        try:
            await self.aclose()
        except Exception:  # the session is already gone; the lock went with it
            log.debug("leader connection was already closed", exc_info=True)

    async def _ensure_checkpoints(self, projectors: Sequence[Projector] | None = None) -> None:
        async with self.store.engine.connect() as conn:
            await begin_write(conn)
            await checkpoints.ensure(conn, self.projectors if projectors is None else projectors)
            await conn.commit()

    async def aclose(self) -> None:
        conn, self._leader_conn = self._leader_conn, None
        self._leading.clear()
        self._slot = None
        if conn is not None:
            # Session-level locks survive close(): the pool would keep the session, and
            # its locks, alive. Invalidating ends the session, so standbys can lead.
            try:
                await conn.invalidate()
            finally:
                await conn.close()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def lowest_position(conn: AsyncConnection, projectors: Sequence[Projector]) -> int:
    positions = []
    for p in projectors:
        row = await checkpoints.load_active(conn, p.name)
        positions.append(row.position if row is not None else 0)
    return min(positions, default=0)


def check_wait(position: object, timeout: object) -> None:
    """Refuse a ``wait_for`` the loop could not keep: a position that is no int, a
    timeout that is no number, NaN (no deadline is ever passed: it waited forever) or
    an int too large for a float; ``InvalidCommand`` naming the argument. An infinite
    timeout waits as long as it takes."""
    if not isinstance(position, int) or isinstance(position, bool):
        raise InvalidCommand("position", f"must be an int, not {type(position).__name__}")
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise InvalidCommand("timeout", f"must be a number of seconds, not {timeout!r:.40}")
    try:
        seconds = float(timeout)  # an int past a float's range has no deadline to compare
    except OverflowError:
        # No repr: an int of more than 4,300 digits has none.
        raise InvalidCommand(
            "timeout", "is too large for seconds; math.inf waits as long as it takes"
        ) from None
    if math.isnan(seconds):
        raise InvalidCommand("timeout", f"must be a number of seconds, not {timeout!r:.40}")


async def wait_for(
    store: EventStore,
    projectors: Sequence[Projector],
    position: int,
    timeout: float = 5.0,
    *,
    event_types: Collection[str] | None = None,
) -> None:
    """Return once every projector's checkpoint is at least ``position``.

    Exact, because positions have no gaps. Raises :class:`ProjectionTimeout`, and
    :class:`ProjectionParked` at once for a parked projector that cannot reach
    ``position``. With ``event_types`` (what the caller wrote), a parked projector
    that handles none of them is not waited for: its read model holds nothing of the
    caller's write.
    """
    check_wait(position, timeout)
    deadline = time.monotonic() + timeout
    delay = 0.005
    waiting = list(projectors)
    while True:
        with translate_errors(store.dialect.database_label):
            async with store.engine.connect() as conn:
                reached = await lowest_position(conn, waiting)
                if reached < position:
                    blocked = {
                        n: p.position
                        for n, p in (await parking.load(conn, [p.name for p in waiting])).items()
                        if p.position <= position
                    }
                    if blocked:
                        touching = {
                            n: at
                            for n, at in blocked.items()
                            if event_types is None
                            or any(
                                t in p.handles for p in waiting if p.name == n for t in event_types
                            )
                        }
                        if touching:
                            raise ProjectionParked(touching)
                        waiting = [p for p in waiting if p.name not in blocked]
                        reached = await lowest_position(conn, waiting) if waiting else position
        if reached >= position:
            return
        if time.monotonic() >= deadline:
            raise ProjectionTimeout(position, reached, timeout)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
