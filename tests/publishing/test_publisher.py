"""The publisher against the real NATS server, on both backends: every event once, in
per-stream order, with its subject, body and headers; filters; the checkpoint moving
only past acknowledged events; a cut connection losing nothing."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore import EventStore, telemetry
from eventstore.records import EventContext, NewEvent, RecordedEvent
from projections.publishing import Publisher, PublisherOptions
from projections.publishing.nats import NatsSink
from projections.publishing.publisher import load_position, publisher_lag
from tests.publishing.support import JetStreamTarget, TcpProxy, check_delivery
from tests.telemetry.support import in_memory


async def append_round(store: EventStore, round_no: int, streams: int = 5, per: int = 4) -> int:
    """``streams`` streams in two categories, ``per`` events each, interleaved across
    transactions; returns the head."""
    last = 0
    for version in range(per):
        async with store.transaction() as uow:
            for s in range(streams):
                category = "task" if s % 2 else "project"
                uow.append(
                    f"{category}-r{round_no}s{s}",
                    category,
                    [NewEvent("Noted" if version % 2 else "Made", {"n": version, "s": s})],
                    "any",
                    context=EventContext(actor_id="a1", correlation_id=f"c{round_no}",
                                         causation_id="cause"),
                )  # fmt: skip
        last = max(r.last_position for r in uow.results)
    return last


async def log_of(store: EventStore) -> list[RecordedEvent]:
    async with store.engine.connect() as conn:
        return await store.read_all(conn, 0, 1_000_000)


async def head_of(store: EventStore) -> int:
    async with store.engine.connect() as conn:
        return await store.head_position(conn)


async def checkpoint_of(engine: AsyncEngine, name: str = "default") -> int | None:
    async with engine.connect() as conn:
        return await load_position(conn, f"publisher:{name}")


async def until(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


class Running:
    """A publisher running in a task of the test's loop."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(publisher.run(self.stop))

    async def caught_up(self, store: EventStore) -> None:
        async def reached() -> bool:
            if self.task.done():
                self.task.result()
            return self.publisher.status.checkpoint >= await head_of(store)

        await until(reached)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


def publisher_for(
    store: EventStore, target: JetStreamTarget, url: str = "nats://127.0.0.1:4222", **options
) -> Publisher:  # type: ignore[no-untyped-def]
    opts = PublisherOptions(
        subject_prefix=target.prefix, checkpoint_interval=0.05, poll_interval=0.05, **options
    )
    return Publisher(store, NatsSink(url, stream=target.stream, subject_prefix=target.prefix), opts)


async def test_every_event_is_published_once_in_order_with_its_subject_body_and_headers(
    store: EventStore, jetstream: JetStreamTarget
) -> None:
    await append_round(store, 0)
    running = Running(publisher_for(store, jetstream, page_size=7, max_in_flight=5))
    await running.caught_up(store)
    await append_round(store, 1)  # live, after the catch-up
    await running.caught_up(store)
    await running.finish()

    log = await log_of(store)
    received = await jetstream.messages()
    assert check_delivery(received, log) == []
    assert len(received) == len(log) == 40
    by_id = {str(r.event_id): r for r in log}
    for message in received:
        record = by_id[message.headers["Nats-Msg-Id"]]
        assert message.subject == f"{jetstream.prefix}.{record.category}.{record.event_type}"
        body = message.body
        assert body["position"] == record.position
        assert (body["stream_id"], body["version"]) == (record.stream_id, record.version)
        assert body["data"] == record.data
        assert body["metadata"] == record.metadata
        assert body["hash"] == record.hash
        assert (body["actor_id"], body["correlation_id"]) == ("a1", record.correlation_id)
        assert message.headers["Tiu-Correlation-Id"] == record.correlation_id
        assert message.headers["Tiu-Causation-Id"] == "cause"
        assert message.headers["Tiu-Stream-Id"] == record.stream_id
    assert await checkpoint_of(store.engine) == log[-1].position


async def test_filters_publish_only_the_chosen_categories_and_types_and_move_past_the_rest(
    store: EventStore, jetstream: JetStreamTarget
) -> None:
    await append_round(store, 0)
    running = Running(
        publisher_for(store, jetstream, categories=frozenset({"task"}), types=frozenset({"Made"}))
    )
    await running.caught_up(store)
    await running.finish()
    log = await log_of(store)
    wanted = [r for r in log if r.category == "task" and r.event_type == "Made"]
    received = await jetstream.messages()
    assert [m.headers["Nats-Msg-Id"] for m in received] == [str(r.event_id) for r in wanted]
    assert await checkpoint_of(store.engine) == log[-1].position


async def test_the_checkpoint_never_passes_an_unacknowledged_event(
    store: EventStore, jetstream: JetStreamTarget, proxy: TcpProxy
) -> None:
    await append_round(store, 0)
    running = Running(publisher_for(store, jetstream, url=proxy.url, ack_timeout=1.0))
    await running.caught_up(store)
    before = await head_of(store)
    proxy.freeze()  # nothing reaches the server, no acknowledgement comes back
    await append_round(store, 1)
    await asyncio.sleep(0.6)
    assert await checkpoint_of(store.engine) == before
    assert running.publisher.status.acknowledged == before
    proxy.thaw()
    proxy.cut()  # the frozen connection is given up; the publisher reconnects
    await running.caught_up(store)
    await running.finish()
    assert check_delivery(await jetstream.messages(), await log_of(store)) == []
    assert running.publisher.status.reconnects >= 1


async def test_a_connection_cut_mid_stream_loses_nothing_and_keeps_stream_order(
    store: EventStore, jetstream: JetStreamTarget, proxy: TcpProxy
) -> None:
    running = Running(publisher_for(store, jetstream, url=proxy.url, max_in_flight=50))
    for round_no in range(6):
        await append_round(store, round_no, streams=10, per=5)
        await asyncio.sleep(0.01)
        proxy.cut()
    await running.caught_up(store)
    await running.finish()
    log = await log_of(store)
    assert check_delivery(await jetstream.messages(), log) == []
    assert proxy.connections >= 2


async def test_a_restart_resumes_from_the_checkpoint(
    store: EventStore, jetstream: JetStreamTarget
) -> None:
    await append_round(store, 0)
    first = Running(publisher_for(store, jetstream))
    await first.caught_up(store)
    await first.finish()
    await append_round(store, 1)
    second = Running(publisher_for(store, jetstream))
    await second.caught_up(store)
    await second.finish()
    received = await jetstream.messages()
    # The second run starts after the first one's checkpoint: nothing is sent twice.
    assert len(received) == 40
    assert check_delivery(received, await log_of(store)) == []


async def test_lag_counts_events_and_seconds_behind(
    store: EventStore, jetstream: JetStreamTarget
) -> None:
    await append_round(store, 0)
    running = Running(publisher_for(store, jetstream, name="lagging"))
    await running.caught_up(store)
    await running.finish()
    await append_round(store, 1)
    async with store.engine.connect() as conn:
        lag = (await publisher_lag(store, conn))["lagging"]
    assert lag["lag_events"] == 20
    assert lag["lag_seconds"] >= 0
    assert lag["position"] == 20


async def test_lag_metrics_report_a_publisher_falling_behind_and_catching_up(
    store: EventStore, jetstream: JetStreamTarget
) -> None:
    with in_memory() as otel:
        telemetry.publisher_lag("measured", 20)
        assert otel.value("tiu.publisher.lag.events", **{"tiu.publisher": "measured"}) == 20
        assert otel.value("tiu.publisher.lag.seconds", **{"tiu.publisher": "measured"}) >= 0

        await append_round(store, 0)
        running = Running(publisher_for(store, jetstream, name="measured"))
        await running.caught_up(store)

        async def caught_up() -> bool:
            lag = otel.value("tiu.publisher.lag.events", **{"tiu.publisher": "measured"})
            return bool(lag == 0)

        await until(caught_up)
        assert otel.value("tiu.publisher.lag.seconds", **{"tiu.publisher": "measured"}) == 0
        await running.finish()
