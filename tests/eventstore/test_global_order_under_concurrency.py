"""No reader can skip an event: the harness of docs/ordering.md, on both backends.

Writers on two stores append through both production paths (the direct append and
the unit of work), with random delays at the store's fault point (between allocating
positions and committing, or just before PostgreSQL's one-statement append), and some
roll back; two checkpointing readers (one projector, batch 25) run throughout,
writing every event id they apply into ``seen(event_id PRIMARY KEY)`` so a double
apply fails loudly. Afterwards the readers must have seen exactly the committed
events, in position order, at positions 1..N.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Identity,
    Integer,
    MetaData,
    String,
    Table,
    Uuid,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from eventstore import AppendResult, AppendTimeout, EventStore, NewEvent, WrongExpectedVersion
from eventstore.engine import begin_write
from eventstore.schema import events

harness = MetaData()
seen = Table(
    "seen_harness",
    harness,
    Column("event_id", Uuid(), primary_key=True),
    Column("position", BigInteger().with_variant(Integer(), "sqlite"), nullable=False),
)
checkpoint = Table(
    "checkpoint_harness",
    harness,
    Column("name", String(20), primary_key=True),
    Column("position", BigInteger().with_variant(Integer(), "sqlite"), nullable=False),
)
# The naive appender the harness must catch: positions from an identity column.
naive = Table(
    "naive_events_harness",
    harness,
    Column("position", BigInteger, Identity(), primary_key=True),
    Column("event_id", Uuid(), nullable=False),
)


class InjectedFailure(Exception):
    pass


@dataclass
class Outcome:
    committed: set[uuid.UUID] = field(default_factory=set)
    applied: list[int] = field(default_factory=list)
    busy_errors: int = 0


ReadBatch = Callable[[AsyncConnection, int, int], Awaitable[list[tuple[int, uuid.UUID]]]]


async def read_tiu(conn: AsyncConnection, after: int, limit: int) -> list[tuple[int, uuid.UUID]]:
    rows = await conn.execute(
        select(events.c.position, events.c.event_id)
        .where(events.c.position > after)
        .order_by(events.c.position)
        .limit(limit)
    )
    return [(r.position, r.event_id) for r in rows]


async def read_naive(conn: AsyncConnection, after: int, limit: int) -> list[tuple[int, uuid.UUID]]:
    rows = await conn.execute(
        select(naive.c.position, naive.c.event_id)
        .where(naive.c.position > after)
        .order_by(naive.c.position)
        .limit(limit)
    )
    return [(r.position, r.event_id) for r in rows]


async def reader(
    engine: AsyncEngine, read: ReadBatch, outcome: Outcome, stop: asyncio.Event
) -> None:
    """One worker instance: claim the checkpoint row, apply a batch, move it, commit."""
    postgres = engine.dialect.name == "postgresql"
    while not stop.is_set():
        async with engine.connect() as conn:
            await begin_write(conn)  # BEGIN IMMEDIATE on SQLite: exclusive batches
            query = select(checkpoint.c.position).where(checkpoint.c.name == "p")
            if postgres:
                query = query.with_for_update(skip_locked=True)
            position = await conn.scalar(query)
            if position is None:  # the other instance holds this batch
                await conn.rollback()
                await asyncio.sleep(0.002)
                continue
            batch = await read(conn, position, 25)
            if batch:
                await conn.execute(insert(seen), [{"event_id": i, "position": p} for p, i in batch])
                moved = await conn.execute(
                    update(checkpoint)
                    .where(checkpoint.c.name == "p", checkpoint.c.position == position)
                    .values(position=batch[-1][0])
                )
                assert moved.rowcount == 1
                await conn.commit()
                outcome.applied.extend(p for p, _ in batch)
            else:
                await conn.rollback()
                await asyncio.sleep(0.005)


async def run_harness(engine: AsyncEngine, *, seed: int, appender: str = "tiu") -> Outcome:
    rng = random.Random(seed)
    outcome = Outcome()
    # Two stores (two processes' worth of group writers), each racing both of its
    # production paths: the direct append (tiu_append on PostgreSQL, the inline SQLite
    # transaction) and the unit of work commands use. The fault point sits on both.
    stores = [EventStore(engine), EventStore(engine)]

    async def delay_and_maybe_fail() -> None:
        await asyncio.sleep(rng.uniform(0, 0.015))
        if rng.random() < 0.10:
            raise InjectedFailure

    async def hook(_streams: object) -> None:
        await delay_and_maybe_fail()

    for store in stores:
        store.before_commit = hook

    async def append_directly(store: EventStore, n: int, own: list[NewEvent]) -> None:
        await store.append(f"w-{n}", "w", own)
        outcome.committed.update(e.event_id for e in own)
        if rng.random() < 0.2:
            async with engine.connect() as conn:
                version = await store.stream_version(conn, "hot-1")
            hot = [NewEvent("H", {"w": n})]
            await store.append("hot-1", "hot", hot, version)
            outcome.committed.update(e.event_id for e in hot)

    async def append_in_unit(store: EventStore, n: int, own: list[NewEvent]) -> None:
        hot: list[NewEvent] = []
        async with store.transaction() as uow:
            uow.append(f"w-{n}", "w", own)
            if rng.random() < 0.2:
                version = await store.stream_version(uow.conn, "hot-1")
                hot = [NewEvent("H", {"w": n})]
                uow.append("hot-1", "hot", hot, version)
        outcome.committed.update(e.event_id for e in own + hot)

    async def tiu_writer(n: int) -> None:
        store = stores[n % 2]
        append = append_directly if n % 4 < 2 else append_in_unit
        for k in range(40):
            own = [NewEvent("E", {"w": n, "k": k}) for _ in range(rng.randint(1, 3))]
            try:
                await append(store, n, own)
            except (InjectedFailure, WrongExpectedVersion):
                pass
            except AppendTimeout:
                outcome.busy_errors += 1
            await asyncio.sleep(rng.uniform(0, 0.002))

    async def naive_writer(n: int) -> None:
        for _ in range(40):
            ids = [uuid.uuid4() for _ in range(rng.randint(1, 3))]
            try:
                async with engine.begin() as conn:
                    await conn.execute(insert(naive), [{"event_id": i} for i in ids])
                    await delay_and_maybe_fail()
            except InjectedFailure:
                pass
            else:
                outcome.committed.update(ids)
            await asyncio.sleep(rng.uniform(0, 0.002))

    read = read_tiu if appender == "tiu" else read_naive
    writer = tiu_writer if appender == "tiu" else naive_writer
    stop = asyncio.Event()
    readers = [asyncio.create_task(reader(engine, read, outcome, stop)) for _ in range(2)]
    try:
        await asyncio.gather(*(writer(n) for n in range(8)))
        async with engine.connect() as conn:
            head = await conn.scalar(
                select(events.c.position if appender == "tiu" else naive.c.position)
                .order_by(text("1 DESC"))
                .limit(1)
            )
        deadline = asyncio.get_running_loop().time() + 15
        while asyncio.get_running_loop().time() < deadline:
            async with engine.connect() as conn:
                cp = await conn.scalar(select(checkpoint.c.position))
            if cp == head:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*readers)
        for store in stores:
            await store.aclose()  # its NOTIFY task may still hold a pooled connection
    return outcome


@pytest.fixture
async def harness_tables(engine: AsyncEngine):
    async with engine.begin() as conn:
        await conn.run_sync(harness.create_all)
        await conn.execute(insert(checkpoint).values(name="p", position=0))
    yield engine
    async with engine.begin() as conn:
        await conn.run_sync(harness.drop_all)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_checkpointing_readers_see_every_committed_event_exactly_once(
    harness_tables: AsyncEngine, seed: int
):
    engine = harness_tables
    outcome = await run_harness(engine, seed=seed)
    async with engine.connect() as conn:
        seen_ids = set((await conn.execute(select(seen.c.event_id))).scalars())
        positions = sorted((await conn.execute(select(events.c.position))).scalars())
        cp = await conn.scalar(select(checkpoint.c.position))
    assert outcome.committed, "the harness committed nothing"
    assert seen_ids == outcome.committed
    assert outcome.applied == sorted(outcome.applied)
    assert len(set(outcome.applied)) == len(outcome.applied)
    assert positions == list(range(1, len(positions) + 1))
    assert cp == len(positions) == len(outcome.committed)
    assert outcome.busy_errors == 0


@pytest.mark.postgres
async def test_harness_catches_a_naive_identity_column_appender(postgres_engine: AsyncEngine):
    async with postgres_engine.begin() as conn:
        await conn.run_sync(harness.create_all)
        await conn.execute(insert(checkpoint).values(name="p", position=0))
    try:
        missing = 0
        for seed in (1, 2, 3):
            async with postgres_engine.begin() as conn:
                await conn.execute(text("TRUNCATE seen_harness, naive_events_harness"))
                await conn.execute(update(checkpoint).values(position=0))
            outcome = await run_harness(postgres_engine, seed=seed, appender="naive")
            async with postgres_engine.connect() as conn:
                seen_ids = set((await conn.execute(select(seen.c.event_id))).scalars())
            missing += len(outcome.committed - seen_ids)
            if missing:
                break
        assert missing > 0, "the harness failed to notice skipped events"
    finally:
        async with postgres_engine.begin() as conn:
            await conn.run_sync(harness.drop_all)


async def test_a_paused_allocation_holds_back_later_appends_and_readers(store: EventStore):
    """Deterministic companion: T1 (a unit of work, as commands write) allocates and
    pauses; T2 (a direct append, on another store) must wait; order is kept.

    T1's transaction has run a statement before its append (a command that claims a
    key does): on PostgreSQL a unit whose only statement is its append sends it
    outside a transaction, allocating and committing at once, with nothing to pause
    in between (see the next test)."""
    paused = asyncio.Event()
    release = asyncio.Event()

    async def hold_first(_streams: object) -> None:
        if not paused.is_set():
            paused.set()
            await release.wait()

    async def first_in_unit() -> AppendResult:
        async with store.transaction() as uow:
            await uow.conn.execute(select(events.c.position).limit(1))
            uow.append("a-1", "a", [NewEvent("First", {})])
        return uow.results[0]

    store.before_commit = hold_first
    other = EventStore(store.engine)
    t1 = asyncio.create_task(first_in_unit())
    await asyncio.wait_for(paused.wait(), 5)
    t2 = asyncio.create_task(other.append("b-1", "b", [NewEvent("Second", {})]))
    done, _ = await asyncio.wait({t2}, timeout=0.2)
    assert not done, "T2 appended while T1 held the append lock"
    async with store.engine.connect() as conn:
        assert await store.read_all(conn) == []
    release.set()
    first, second = await asyncio.gather(t1, t2)
    async with store.engine.connect() as conn:
        log = await store.read_all(conn)
    assert [(e.event_type, e.position) for e in log] == [("First", 1), ("Second", 2)]
    assert (first.first_position, second.first_position) == (1, 2)
    await other.aclose()


async def test_a_unit_whose_only_statement_is_its_append_commits_it_as_it_allocates(
    store: EventStore,
):
    """Where a unit of work sends its append (with what it held back) as one statement
    outside a transaction (PostgreSQL), the fault point comes before that statement:
    paused there, T1 holds no lock and has allocated nothing, so T2 goes first."""
    if store.dialect.name != "postgresql":
        pytest.skip("SQLite's unit holds the write lock from BEGIN IMMEDIATE on")
    paused = asyncio.Event()
    release = asyncio.Event()

    async def hold_first(_streams: object) -> None:
        if not paused.is_set():
            paused.set()
            await release.wait()

    async def first_in_unit() -> AppendResult:
        async with store.transaction() as uow:
            uow.append("a-1", "a", [NewEvent("First", {})])
        return uow.results[0]

    store.before_commit = hold_first
    other = EventStore(store.engine)
    t1 = asyncio.create_task(first_in_unit())
    await asyncio.wait_for(paused.wait(), 5)
    second = await asyncio.wait_for(other.append("b-1", "b", [NewEvent("Second", {})]), 5)
    release.set()
    first = await t1
    async with store.engine.connect() as conn:
        log = await store.read_all(conn)
    assert [(e.event_type, e.position) for e in log] == [("Second", 1), ("First", 2)]
    assert (second.first_position, first.first_position) == (1, 2)
    await other.aclose()
