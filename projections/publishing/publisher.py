"""Follows the log and publishes each event to a :class:`Sink`, at least once, in order.

The log is already the outbox: an event is committed exactly when its command is, so
the publisher needs no table of its own beyond a checkpoint (a row of
``projection_checkpoints`` named ``publisher:<name>``). It reads the log through
:meth:`EventStore.subscribe` (catch-up, then live; unfiltered, so a hole in the log
stops it instead of being skipped), encodes and sends each wanted event without
waiting for the broker, keeps at most ``max_in_flight`` unacknowledged, and moves
the checkpoint only to the last position before the first unacknowledged event.

After a failure (a refusal, a lost connection, an acknowledgement later than
``ack_timeout``, the database gone) it drops the connection, reconnects, and sends
again from its last acknowledged position; a crash resumes from the checkpoint.
What was sent twice carries the same message id (the event id), which the broker
drops inside its de-duplication window and consumers drop after it. Per-stream
order holds on the broker: each connection delivers in call order, so an event's
first copy always arrives before the first copy of any later event of its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from eventstore import telemetry
from eventstore.engine import begin_write
from eventstore.errors import AppendTimeout, LogIntegrityError, StoreUnavailable
from eventstore.records import RecordedEvent
from eventstore.schema import projection_checkpoints as cp
from eventstore.store import EventStore
from eventstore.translate import translate_errors
from projections.publishing.encoding import Encoder, PersonalData
from projections.publishing.sink import PublishError, Sink

log = logging.getLogger("projections.publishing")

CHECKPOINT_PREFIX: Final = "publisher:"
CHECKPOINT_VERSION: Final = 1

#: Failures after which the publisher reconnects and sends again; anything else is a bug
#: and ends :meth:`Publisher.run`.
RETRIED = (PublishError, StoreUnavailable, AppendTimeout, LogIntegrityError)


@dataclass(frozen=True, slots=True)
class PublisherOptions:
    name: str = "default"
    subject_prefix: str = "tiu"
    #: Only these categories / event types (None: all). Others are passed over, and
    #: the checkpoint moves past them.
    categories: frozenset[str] | None = None
    types: frozenset[str] | None = None
    personal_data: PersonalData = "encrypted"
    max_in_flight: int = 1000
    #: Events read per query, and encoded between two suspensions of the loop.
    page_size: int = 500
    ack_timeout: float = 10.0
    checkpoint_interval: float = 1.0
    poll_interval: float = 1.0
    max_backoff: float = 5.0


@dataclass
class PublisherStatus:
    name: str
    running: bool = False
    connected: bool = False
    #: Everything up to here is acknowledged (or filtered out).
    acknowledged: int = 0
    checkpoint: int = 0
    published: int = 0
    reconnects: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["started"]
        return data


class _Sent(NamedTuple):
    position: int
    future: asyncio.Future[Any]
    at: float


class Publisher:
    """Publishes the log to ``sink`` until :meth:`run`'s ``stop`` is set."""

    def __init__(
        self, store: EventStore, sink: Sink, options: PublisherOptions | None = None
    ) -> None:
        self.store = store
        self.sink = sink
        self.options = options or PublisherOptions()
        self.checkpoint_name = CHECKPOINT_PREFIX + self.options.name
        self.encoder = Encoder(self.options.subject_prefix, self.options.personal_data)
        self.status = PublisherStatus(self.options.name)
        self._window: deque[_Sent] = deque()
        self._seen = 0
        self._written = 0
        self._space = asyncio.Event()
        # A full window is refilled once a quarter of it is acknowledged, in one burst:
        # waking the reader at every acknowledgement cost a loop turn per message.
        self._resume_at = self.options.max_in_flight * 3 // 4
        self._empty = asyncio.Event()
        self._broken: asyncio.Future[BaseException] | None = None

    # -- the loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set, then wait (up to ``ack_timeout``) for the
        acknowledgements in flight and write the checkpoint. Retries every failure
        listed in :data:`RETRIED`, backing off; the status says what went wrong."""
        backoff = 0.1
        self.status.running = True
        try:
            while not stop.is_set():
                before = self.status.acknowledged
                try:
                    await self._session(stop)
                except RETRIED as error:
                    self.status.last_error = f"{type(error).__name__}: {error}"
                    self.status.last_error_at = datetime.now(UTC)
                    self.status.reconnects += 1
                    if self.status.acknowledged > before:
                        backoff = 0.1
                    log.warning("publisher %s paused: %s; retrying in %.1fs",
                                self.options.name, error, backoff)  # fmt: skip
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    backoff = min(backoff * 2, self.options.max_backoff)
        finally:
            self.status.running = False

    async def _session(self, stop: asyncio.Event) -> None:
        start = await self._load_checkpoint()
        self._window.clear()
        self._seen = self._written = self.status.acknowledged = self.status.checkpoint = start
        self._space.set()
        self._empty.set()
        self._broken = asyncio.get_running_loop().create_future()
        try:
            await self.sink.open()
            self.status.connected = True
            pump = asyncio.create_task(self._pump(start))
            keeper = asyncio.create_task(self._keep())
            stopper = asyncio.create_task(stop.wait())
            tasks: set[asyncio.Future[Any]] = {pump, keeper, stopper}
            try:
                await asyncio.wait({*tasks, self._broken}, return_when=asyncio.FIRST_COMPLETED)
                self._raise_if_broken()
                for task in (pump, keeper):
                    if task.done():
                        task.result()  # a store error, or a bug
                pump.cancel()  # stopping: finish what is in flight, read no more
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
                await self._drain()
            finally:
                for running in tasks:
                    running.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await self._write_checkpoint()
        finally:
            self.status.connected = False
            self._window.clear()
            await self.sink.close()

    async def _pump(self, start: int) -> None:
        options, window = self.options, self._window
        subscription = self.store.subscribe(
            start, batch_size=options.page_size, poll_interval=options.poll_interval
        )
        since_pause = 0
        try:
            async for record in subscription:
                if self._wanted(record):
                    message = self.encoder.encode(record)
                    while len(window) >= options.max_in_flight:
                        self._space.clear()
                        await self._space.wait()
                    future = await self._send(message)
                    window.append(_Sent(record.position, future, time.monotonic()))
                    self._empty.clear()
                    future.add_done_callback(self._acked)
                self._seen = record.position
                since_pause += 1
                if since_pause >= options.page_size:
                    # A page comes from one query with no suspension in between:
                    # give the host's other tasks their turn.
                    since_pause = 0
                    await asyncio.sleep(0)
        finally:
            if isinstance(subscription, AsyncGenerator):
                await subscription.aclose()

    async def _send(self, message: Any) -> asyncio.Future[Any]:
        try:
            return await self.sink.publish(message)
        except PublishError as error:
            self._fail(error)
            raise

    def _wanted(self, record: RecordedEvent) -> bool:
        options = self.options
        return (options.categories is None or record.category in options.categories) and (
            options.types is None or record.event_type in options.types
        )

    def _acked(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self._fail(PublishError("publish cancelled"))
            return
        if (error := future.exception()) is not None:
            if not isinstance(error, PublishError):
                error = PublishError(f"refused: {type(error).__name__}: {error}")
            self._fail(error)
            return
        window = self._window
        while window and window[0].future.done():
            head = window[0].future
            if head.cancelled() or head.exception() is not None:
                break
            sent = window.popleft()
            self.status.acknowledged = sent.position
            self.status.published += 1
        if len(window) <= self._resume_at:
            self._space.set()
        if not window:
            self._empty.set()

    def _fail(self, error: BaseException) -> None:
        if self._broken is not None and not self._broken.done():
            self._broken.set_result(error)

    def _raise_if_broken(self) -> None:
        if self._broken is not None and self._broken.done():
            raise self._broken.result()

    def done_position(self) -> int:
        """The last position before the first unacknowledged event."""
        return self._window[0].position - 1 if self._window else self._seen

    async def _keep(self) -> None:
        """Fail the session on an overdue acknowledgement; write the checkpoint."""
        options = self.options
        tick = min(options.checkpoint_interval, options.ack_timeout / 4)
        last_write = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self._window and now - self._window[0].at > options.ack_timeout:
                self._fail(PublishError(f"no acknowledgement within {options.ack_timeout}s"))
                return
            if now - last_write >= options.checkpoint_interval:
                await self._write_checkpoint()
                last_write = now
            behind = self.store.dialect.known_head - self.done_position()
            telemetry.publisher_lag(options.name, behind)

    async def _drain(self) -> None:
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._empty.wait())
        try:
            await asyncio.wait(
                {waiter, self._broken} if self._broken is not None else {waiter},
                timeout=self.options.ack_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiter.cancel()

    # -- the checkpoint -------------------------------------------------------------

    async def _load_checkpoint(self) -> int:
        name = self.checkpoint_name
        with translate_errors(self.store.dialect.database_label):
            async with self.store.engine.connect() as conn:
                await begin_write(conn)
                if (position := await load_position(conn, name)) is None:
                    await conn.execute(
                        insert(cp).values(
                            name=name,
                            version=CHECKPOINT_VERSION,
                            position=0,
                            active=True,
                            updated_at=datetime.now(UTC),
                        )
                    )
                    position = 0
                await conn.commit()
                return position

    async def _write_checkpoint(self) -> None:
        position = self.done_position()
        self.status.acknowledged = max(self.status.acknowledged, position)
        if position <= self._written:
            return
        with translate_errors(self.store.dialect.database_label):
            async with self.store.engine.connect() as conn:
                await begin_write(conn)
                # Forwards only: a second publisher of the same name (doing the same
                # work, de-duplicated by the broker) never moves it back.
                await conn.execute(
                    update(cp)
                    .where(
                        cp.c.name == self.checkpoint_name,
                        cp.c.version == CHECKPOINT_VERSION,
                        cp.c.position < position,
                    )
                    .values(position=position, updated_at=datetime.now(UTC))
                )
                await conn.commit()
        self._written = self.status.checkpoint = position


async def load_position(conn: AsyncConnection, checkpoint_name: str) -> int | None:
    value = await conn.scalar(
        select(cp.c.position).where(
            cp.c.name == checkpoint_name, cp.c.version == CHECKPOINT_VERSION
        )
    )
    return None if value is None else int(value)


async def publisher_lag(
    store: EventStore, conn: AsyncConnection, now: datetime | None = None
) -> dict[str, dict[str, Any]]:
    """Every publisher's checkpoint and lag: events behind the head, and seconds since
    the first event it has not published was recorded (0 when caught up)."""
    rows = await conn.execute(
        select(cp.c.name, cp.c.position, cp.c.updated_at).where(
            cp.c.name.startswith(CHECKPOINT_PREFIX), cp.c.version == CHECKPOINT_VERSION
        )
    )
    head = await store.head_position(conn)
    now = now or datetime.now(UTC)
    out: dict[str, dict[str, Any]] = {}
    for name, position, updated_at in rows.all():
        behind = await store.read_all(conn, int(position), 1)
        seconds = (now - behind[0].recorded_at).total_seconds() if behind else 0.0
        out[name.removeprefix(CHECKPOINT_PREFIX)] = {
            "position": int(position),
            "lag_events": head - int(position),
            "lag_seconds": round(max(seconds, 0.0), 3),
            "updated_at": updated_at,
        }
    return out
