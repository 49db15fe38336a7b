"""Cases 1 and 2: store appends, one writer and eight concurrent writers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from bench import es, raw
from bench.common import Place, Result, summarise, timed, timed_sync, timed_threads
from bench.context import Context
from domain import tasks
from domain.base import encode_event
from eventstore import NO_STREAM, EventContext, NewEvent

WRITERS = 8


def task_data(i: int) -> dict[str, Any]:
    """A TaskCreated's data: the row shape every system writes in these cases."""
    now = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    event = tasks.TaskCreated(
        task_id=uuid.uuid4().hex,
        project_id=uuid.uuid4().hex,
        title=f"Task {i}: do the thing",
        description="Steps to reproduce, expected and actual behaviour.",
        priority=tasks.Priority.HIGH,
        due_date=None,
        assignee_id=None,
        created_by=uuid.uuid4().hex,
        at=now,
    )
    return encode_event(event)[2]


def es_event(data: dict[str, Any], stream: uuid.UUID, version: int) -> Any:
    return es.to_es_event("TaskCreated", data, stream, version, datetime.now(UTC))


# -- one writer ----------------------------------------------------------------------------


def random_id() -> str:
    return uuid.uuid4().hex


async def _tiu_streams(
    place: Place, n: int, per: int, new_id: Callable[[], str] = random_id
) -> AsyncIterator[float]:
    """tiu's appends, run after run; stream ids and command ids from ``new_id``
    (default: uuid4, as the other systems'; case 7 also measures ``domain.new_id``,
    what tiu's commands use)."""
    store = await place.store()
    try:
        async with store.engine.connect() as conn:  # connected before the clock, as raw is
            await store.head_position(conn)
        while True:
            work = [(f"task-{new_id()}", [task_data(i) for _ in range(per)]) for i in range(n)]

            async def go(work: list[tuple[str, list[dict[str, Any]]]] = work) -> None:
                for stream_id, datas in work:
                    await store.append(
                        stream_id,
                        "task",
                        [NewEvent("TaskCreated", d, 1, {"command": "Bench"}) for d in datas],
                        NO_STREAM,
                        context=EventContext(actor_id="bench", command_id=new_id()),
                    )

            yield await timed(go)
    finally:
        await store.aclose()
        await store.engine.dispose()


def _es_streams(place: Place, n: int, per: int) -> Iterator[float]:
    app = es.BenchApp(env=place.es_env())
    try:
        app.recorder.max_notification_id()  # connected before the clock
        while True:
            work = [(uuid.uuid4(), [task_data(i) for _ in range(per)]) for i in range(n)]

            def go(work: list[tuple[uuid.UUID, list[dict[str, Any]]]] = work) -> None:
                for stream, datas in work:
                    stored = [
                        app.mapper.to_stored_event(es_event(d, stream, v))
                        for v, d in enumerate(datas, start=1)
                    ]
                    app.recorder.insert_events(stored)

            yield timed_sync(go)
    finally:
        app.close()


def _raw_rows(stream_id: str, datas: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    out, prev, command_id = [], raw.GENESIS, uuid.uuid4().hex  # as tiu's append
    for v, d in enumerate(datas, start=1):
        r = raw.row(stream_id, "task", v, "TaskCreated", d, prev, "bench", command_id)
        prev = r[-1]
        out.append(r)
    return out


async def _raw_streams(place: Place, n: int, per: int) -> AsyncIterator[float]:
    conn = await place.asyncpg_conn() if place.postgres else None
    sconn = None if place.postgres else place.sqlite_conn()
    try:
        while True:
            work = [
                (f"task-{uuid.uuid4().hex}", [task_data(i) for _ in range(per)]) for i in range(n)
            ]
            if conn is not None:

                async def go(work: Any = work) -> None:
                    for stream_id, datas in work:
                        await raw.pg_append(conn, _raw_rows(stream_id, datas))

                yield await timed(go)
            else:

                def sgo(work: Any = work) -> None:
                    for stream_id, datas in work:
                        raw.sqlite_append(sconn, _raw_rows(stream_id, datas))

                yield timed_sync(sgo)
    finally:
        if conn is not None:
            await conn.close()
        if sconn is not None:
            sconn.close()


async def case1(ctx: Context) -> list[Result]:
    n = 1000 if ctx.cfg.quick else 10_000
    streams10 = 200 if ctx.cfg.quick else 1000
    results: list[Result] = []
    for label, count, per in (
        (f"1a append: {n} streams x 1 event, 1 tx each", n, 1),
        (f"1b append: {streams10} streams x 10 events, 1 append each", streams10, 10),
    ):
        await ctx.fresh(migrate=("tiu", "raw"))
        tiu, e, r = await ctx.take_turns(
            label,
            _tiu_streams(ctx.place("tiu"), count, per),
            _es_streams(ctx.place("eventsourcing"), count, per),
            _raw_streams(ctx.place("raw"), count, per),
        )
        results.append(summarise(label, ctx.backend, "tiu", tiu, count * per))
        results.append(summarise(label, ctx.backend, "eventsourcing", e, count * per))
        results.append(summarise(label, ctx.backend, "raw", r, count * per))
    return results


# -- eight writers ----------------------------------------------------------------------------


async def _tiu_concurrent(place: Place, per_writer: int) -> AsyncIterator[float]:
    store = await place.store()
    try:
        async with store.engine.connect() as conn:  # connected before the clock
            await store.head_position(conn)
        while True:

            async def writer(w: int) -> None:
                stream_id = f"task-{uuid.uuid4().hex}"
                for v in range(per_writer):
                    await store.append(
                        stream_id,
                        "task",
                        [NewEvent("TaskCreated", task_data(v), 1, {"command": "Bench"})],
                        v,
                        context=EventContext(actor_id=f"writer{w}"),
                    )

            async def go() -> None:
                await asyncio.gather(*(writer(w) for w in range(WRITERS)))

            yield await timed(go)
    finally:
        await store.aclose()
        await store.engine.dispose()


def _es_concurrent(place: Place, per_writer: int) -> Iterator[float]:
    app = es.BenchApp(env=place.es_env())
    try:
        app.recorder.max_notification_id()  # connected before the clock
        while True:

            def writer(_: int) -> None:
                stream = uuid.uuid4()
                for v in range(1, per_writer + 1):
                    stored = app.mapper.to_stored_event(es_event(task_data(v), stream, v))
                    app.recorder.insert_events([stored])

            yield timed_threads(writer, WRITERS)
    finally:
        app.close()


async def _raw_concurrent(place: Place, per_writer: int) -> AsyncIterator[float]:
    while True:
        if place.postgres:
            conns = [await place.asyncpg_conn() for _ in range(WRITERS)]

            async def writer(conn: Any, w: int) -> None:
                stream_id, prev = f"task-{uuid.uuid4().hex}", raw.GENESIS
                for v in range(1, per_writer + 1):
                    data = task_data(v)
                    r = raw.row(stream_id, "task", v, "TaskCreated", data, prev, f"writer{w}")
                    prev = r[-1]
                    await raw.pg_append(conn, [r])

            async def go(conns: list[Any] = conns) -> None:
                await asyncio.gather(*(writer(c, w) for w, c in enumerate(conns)))

            took = await timed(go)
            for c in conns:
                await c.close()
            yield took
        else:

            def swriter(w: int) -> None:
                conn = place.sqlite_conn()
                stream_id, prev = f"task-{uuid.uuid4().hex}", raw.GENESIS
                for v in range(1, per_writer + 1):
                    data = task_data(v)
                    r = raw.row(stream_id, "task", v, "TaskCreated", data, prev, f"writer{w}")
                    prev = r[-1]
                    raw.sqlite_append(conn, [r])
                conn.close()

            yield timed_threads(swriter, WRITERS)


async def case2(ctx: Context) -> list[Result]:
    per = 100 if ctx.cfg.quick else 500
    label = f"2 append: {WRITERS} writers x {per} commands, 1 event each"
    await ctx.fresh(migrate=("tiu", "raw"))
    total = WRITERS * per
    t, e, r = await ctx.take_turns(
        label,
        _tiu_concurrent(ctx.place("tiu"), per),
        _es_concurrent(ctx.place("eventsourcing"), per),
        _raw_concurrent(ctx.place("raw"), per),
    )
    note = "asyncpg, 8 connections" if ctx.postgres else "sqlite3, 8 threads"
    return [
        summarise(label, ctx.backend, "tiu", t, total, note="asyncio tasks, pooled connections"),
        summarise(label, ctx.backend, "eventsourcing", e, total, note="8 threads"),
        summarise(label, ctx.backend, "raw", r, total, note=note),
    ]
