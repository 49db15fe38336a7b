"""Runners: inline (inside the command's transaction) and worker (batches off the log).

Both apply events through :meth:`Projector.apply_batch` and move the checkpoint in
the same transaction. A worker batch on PostgreSQL claims its checkpoint row with
``FOR UPDATE SKIP LOCKED`` (ORDERING.md, "Checkpoints and several workers"), so two
workers never apply the same batch; on SQLite ``BEGIN IMMEDIATE`` gives the same
exclusivity. Leadership (one worker per projector, others standing by) is an
optimisation on top: a session-level advisory lock on PostgreSQL, released when the
leader's connection dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from eventstore import telemetry
from eventstore.engine import begin_write
from eventstore.errors import AppendTimeout, StoreUnavailable
from eventstore.records import RecordedEvent
from eventstore.schema import projection_checkpoints as cp
from eventstore.store import EventStore
from eventstore.translate import translate_errors
from projections import checkpoints
from projections.errors import InlineProjectionBehind, ProjectionTimeout
from projections.projector import Envelope, Projector, Tables, decode_records

log = logging.getLogger("projections")

LEADER_LOCK_CLASS = 0x746976  # "tiv": leadership locks, apart from the append lock


@contextlib.contextmanager
def long_lived_heap() -> Iterator[None]:
    """Leave the objects that exist now out of the garbage collector's scans while a
    batch loop (a rebuild, a catch-up) runs.

    Such a loop allocates a handful of objects per event, so the collector runs
    often, and its older generations walk every object the process holds: modules,
    SQLAlchemy metadata, pydantic schemas. A tasks rebuild of 94k events on SQLite
    ran 23k events/s as it was and 29k with that heap frozen (same run). The
    objects are put back (``gc.unfreeze``) when the loop ends; cyclic garbage among
    them waits until then. An application that froze its heap itself
    (``gc.get_freeze_count()`` above 0) is left as it is.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def handled_types(projectors: Sequence[Projector]) -> list[str]:
    return sorted({t for p in projectors for t in p.handles})


async def apply_records(
    conn: AsyncConnection,
    projector: Projector,
    records: Sequence[RecordedEvent],
    tables: Tables | None = None,
) -> None:
    handled = [r for r in records if r.event_type in projector.handles]
    with telemetry.projector_batch(conn, projector.name, handled, replay=tables is not None):
        envelopes = await decode_records(conn, handled) if handled else []
        if envelopes:
            await projector.apply_batch(conn, envelopes, tables or projector.live_tables())


class InlineRunner:
    """Applies the projectors inside the command's transaction: read-your-writes."""

    def __init__(self, projectors: Sequence[Projector]) -> None:
        self.projectors = tuple(projectors)

    async def apply(self, conn: AsyncConnection, envelopes: Sequence[Envelope]) -> None:
        for projector in self.projectors:
            relevant = [e for e in envelopes if e.event_type in projector.handles]
            if relevant:
                await projector.apply_batch(conn, relevant, projector.live_tables())

    async def advance(self, conn: AsyncConnection, first: int, last: int) -> None:
        """After the append: move every inline checkpoint from ``first - 1`` to ``last``.

        A checkpoint that was not at ``first - 1`` missed an event appended by some
        other path; raising rolls the command back so the caller can catch up first.
        """
        moved = await checkpoints.advance(conn, self.projectors, expected=first - 1, position=last)
        if moved != len(self.projectors):
            behind = []
            for p in self.projectors:
                row = await checkpoints.load_active(conn, p.name)
                if row is None or row.position != first - 1:
                    behind.append(p.name)
            raise InlineProjectionBehind(behind)


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
    ) -> None:
        self.store = store
        self.projectors = tuple(projectors)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.leader_election = leader_election and store.engine.dialect.name == "postgresql"
        self.stats = WorkerStats()
        self._leader_conn: AsyncConnection | None = None
        self._ready = False
        self._leading: set[str] = set()

    async def run_batch(self, projector: Projector) -> BatchResult:
        """Apply at most one batch for ``projector``; skipped if another worker holds it."""
        engine = self.store.engine
        postgres = engine.dialect.name == "postgresql"
        async with engine.connect() as conn:
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
                self.batch_size,
                types=sorted(projector.handles),
                until_position=head,
            )
            # Every position up to head is committed (gap-free order), so when the
            # batch is not full the checkpoint may move straight to head.
            new = records[-1].position if len(records) == self.batch_size else head
            telemetry.projector_lag(projector.name, head - new, records[-1:])
            if new == position:
                await conn.rollback()
                return BatchResult(projector.name, 0, position)
            await apply_records(conn, projector, records)
            await checkpoints.move(conn, projector.name, old=position, new=new)
            await conn.commit()
        self.stats.events += len(records)
        self.stats.batches += 1
        return BatchResult(projector.name, len(records), new)

    async def catch_up(self, projectors: Sequence[Projector] | None = None) -> int:
        """Run batches until every projector has reached the head; returns events applied."""
        chosen = tuple(projectors or self.projectors)
        # Without a checkpoint row every batch would be "skipped": loop forever.
        await self._ensure_checkpoints(chosen)
        total = 0
        with long_lived_heap():
            for projector in chosen:
                while True:
                    result = await self.run_batch(projector)
                    total += result.applied
                    if result.skipped:
                        await asyncio.sleep(0.01)
                        continue
                    async with self.store.engine.connect() as conn:
                        head = await self.store.head_position(conn)
                    if result.position >= head:
                        break
        return total

    async def _acquire_leadership(self) -> list[Projector]:
        if not self.leader_election:
            return list(self.projectors)
        if self._leader_conn is None:
            self._leader_conn = await self.store.engine.connect()
            await self._leader_conn.execution_options(isolation_level="AUTOCOMMIT")
        for projector in self.projectors:
            if projector.name in self._leading:
                continue
            got = await self._leader_conn.scalar(
                text("SELECT pg_try_advisory_lock(:k1, hashtext(:name))"),
                {"k1": LEADER_LOCK_CLASS, "name": projector.name},
            )
            if got:
                log.info("leading projector %s", projector.name)
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
                except (StoreUnavailable, AppendTimeout) as error:
                    # The database went away (a restart, a failover) or a lock timed
                    # out: nothing of the batch was committed. Drop leadership (its
                    # session may be gone) and try again, backing off.
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
            progressed = False
            for projector in leading:
                if stop.is_set():
                    return
                result = await self.run_batch(projector)
                progressed = progressed or result.applied > 0
            if progressed:
                return
            async with self.store.engine.connect() as conn:
                head = await self.store.head_position(conn)
        waiter = asyncio.ensure_future(self.store.wait_for_append(head, self.poll_interval))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            task.cancel()

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


async def wait_for(
    store: EventStore, projectors: Sequence[Projector], position: int, timeout: float = 5.0
) -> None:
    """Return once every projector's checkpoint is at least ``position``.

    Exact, because positions have no gaps. Raises :class:`ProjectionTimeout`.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        with translate_errors(store.dialect.database_label):
            async with store.engine.connect() as conn:
                reached = await lowest_position(conn, projectors)
        if reached >= position:
            return
        if time.monotonic() >= deadline:
            raise ProjectionTimeout(position, reached, timeout)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
