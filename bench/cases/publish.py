"""Case 8: publishing the log to NATS JetStream (the server on 127.0.0.1:4222).

8a catch-up: a publisher starting at position 0 of a log of 100,000 events (20,000
quick), timed until the broker acknowledged the last one. 8b live: a writer appends
20,000 events (5,000 quick) in transactions of 100 while the publisher follows,
timed from the first append until the broker acknowledged the last event.

raw is a bare nats-py loop: ``publish_async`` of the same messages (built by the
publisher's encoder before the clock starts, so raw reads and encodes nothing), at
most 1,000 unacknowledged as the publisher's default, then awaiting every
acknowledgement; in 8b it publishes each batch right after appending it. Every run
publishes into a JetStream stream of its own (a stream that already held the ids
would drop them as duplicates, which costs the server less).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import nats
from sqlalchemy import insert

from bench.common import Result, summarise
from bench.context import Context
from bench.scenario import Scenario, append_batch, fill
from eventstore import EventStore
from eventstore.schema import projection_checkpoints
from projections.publishing import Message, Publisher, PublisherOptions
from projections.publishing.encoding import Encoder
from projections.publishing.nats import NatsSink
from projections.publishing.publisher import CHECKPOINT_PREFIX, CHECKPOINT_VERSION

NATS_URL = "nats://127.0.0.1:4222"
IN_FLIGHT = 1000
LIVE_BATCH = 100


class Broker:
    """A fresh stream per run, deleted after it."""

    def __init__(self, js: Any) -> None:
        self.js = js
        self.prefix = f"tiubench{secrets.token_hex(3)}"

    async def stream(self) -> str:
        name = f"TIU_BENCH_{secrets.token_hex(4).upper()}"
        await self.js.add_stream(NatsSink(stream=name, subject_prefix=self.prefix).config())
        return name

    async def drop(self, name: str) -> None:
        await self.js.delete_stream(name)


async def _head(store: EventStore) -> int:
    async with store.engine.connect() as conn:
        return await store.head_position(conn)


async def _start_at(store: EventStore, name: str, position: int) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(
            insert(projection_checkpoints).values(
                name=CHECKPOINT_PREFIX + name,
                version=CHECKPOINT_VERSION,
                position=position,
                active=True,
                updated_at=datetime.now(UTC),
            )
        )


async def _until_acknowledged(publisher: Publisher, position: int) -> None:
    while publisher.status.acknowledged < position:  # noqa: ASYNC110  # polled, as a user would
        await asyncio.sleep(0.002)


async def _tiu(
    store: EventStore, broker: Broker, live: Scenario | None, live_n: int
) -> AsyncIterator[float]:
    while True:
        stream = await broker.stream()
        name = secrets.token_hex(4)
        head = await _head(store)
        if live is not None:
            await _start_at(store, name, head)
        sink = NatsSink(NATS_URL, stream=stream, subject_prefix=broker.prefix)
        options = PublisherOptions(name=name, subject_prefix=broker.prefix, poll_interval=0.05)
        publisher = Publisher(store, sink, options)
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(publisher.run(stop))
        if live is not None:
            await fill(store, live, live_n, batch=LIVE_BATCH)
            head = await _head(store)
        await _until_acknowledged(publisher, head)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
        await broker.drop(stream)
        yield elapsed


async def _messages(store: EventStore, prefix: str, n: int) -> list[Message]:
    encoder = Encoder(prefix)
    async with store.engine.connect() as conn:
        return [encoder.encode(r) for r in await store.read_all(conn, 0, n)]


async def _raw(
    store: EventStore, broker: Broker, nc: Any, n: int, live: Scenario | None, live_n: int
) -> AsyncIterator[float]:
    js = nc.jetstream(publish_async_max_pending=IN_FLIGHT)
    while True:
        stream = await broker.stream()
        # Built for each run and dropped after it: held through the other system's
        # runs, 100k messages made every full garbage collection there longer.
        messages = await _messages(store, broker.prefix, n)
        started = time.perf_counter()
        futures = []
        if live is None:
            for m in messages:
                futures.append(await js.publish_async(m.subject, m.payload, headers=m.headers))
        else:
            for start in range(0, live_n, LIVE_BATCH):
                await append_batch(store, live.take(LIVE_BATCH))
                for m in messages[start : start + LIVE_BATCH]:
                    futures.append(await js.publish_async(m.subject, m.payload, headers=m.headers))
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
        del messages, futures
        await broker.drop(stream)
        yield elapsed


async def case8(ctx: Context) -> list[Result]:
    n = 20_000 if ctx.cfg.quick else 100_000
    live_n = 5_000 if ctx.cfg.quick else 20_000
    await ctx.fresh(migrate=("tiu",))
    store = await ctx.place("tiu").store()
    nc = await nats.connect(NATS_URL)
    broker = Broker(nc.jetstream())
    out: list[Result] = []
    try:
        await fill(store, Scenario(7), n)
        label = f"8a publish to JetStream, catch-up: log of {n} events"
        t, r = await ctx.take_turns(
            label, _tiu(store, broker, None, 0), _raw(store, broker, nc, n, None, 0)
        )
        out.append(summarise(label, ctx.backend, "tiu", t, n, note="Publisher from position 0"))
        out.append(summarise(label, ctx.backend, "raw", r, n, note="nats-py publish_async loop"))
        live = Scenario(8)
        label = f"8b publish to JetStream, live: {live_n} events appended 100 a transaction"
        t, r = await ctx.take_turns(
            label,
            _tiu(store, broker, live, live_n),
            _raw(store, broker, nc, live_n, live, live_n),
        )
        out.append(summarise(label, ctx.backend, "tiu", t, live_n, note="appends + Publisher"))
        out.append(
            summarise(label, ctx.backend, "raw", r, live_n, note="appends + publish_async each")
        )
    finally:
        await nc.close()
        await store.aclose()
        await store.engine.dispose()
    return out
