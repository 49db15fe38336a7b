"""Case 4: rebuild one aggregate from a 100-event stream; read and decode the global log;
the same reads at the store level (4c, 4d), against the eventsourcing recorder.

raw reads tiu's own rows (same table, same schema) with the bare driver and
``json.loads``; its "state" is a dict updated per event.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bench import es
from bench.common import Place, Result, summarise, timed, timed_sync
from bench.context import Context
from bench.scenario import Scenario, es_fill, fill
from domain import tasks
from domain.base import decode_event, encode_event
from domain.routing import TASKS
from eventstore import NO_STREAM, NewEvent
from tiu.dispatch import Dispatcher

STREAM_EVENTS = 100
PAGE = 1000


def _task_events(task_id: str, project_id: str) -> list[tasks.Event]:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    out: list[tasks.Event] = [
        tasks.TaskCreated(
            task_id=task_id,
            project_id=project_id,
            title="A long-lived task",
            description="Moved back and forth many times.",
            priority=tasks.Priority.MEDIUM,
            due_date=None,
            assignee_id=None,
            created_by="owner",
            at=at,
        )
    ]
    status = tasks.TaskStatus.TODO
    for i in range(1, STREAM_EVENTS):
        new = (
            tasks.TaskStatus.IN_PROGRESS
            if status is tasks.TaskStatus.TODO
            else tasks.TaskStatus.TODO
        )
        out.append(
            tasks.TaskStatusChanged(
                task_id=task_id,
                project_id=project_id,
                from_status=status,
                to_status=new,
                by="owner",
                at=at + timedelta(minutes=i),
            )
        )
        status = new
    return out


async def _tiu_streams(place: Place, k: int) -> AsyncIterator[tuple[float, float]]:
    """Per run: the time to fold each stream (``Dispatcher.fold``), then to read its records."""
    store = await place.store()
    try:
        ids = []
        for _ in range(k):
            task_id = uuid.uuid4().hex
            stored = [
                NewEvent(t, d, v, {})
                for t, v, d in (encode_event(e) for e in _task_events(task_id, "p1"))
            ]
            await store.append(tasks.stream_id(task_id), "task", stored, NO_STREAM)
            ids.append(tasks.stream_id(task_id))
        dispatcher = Dispatcher(store, snapshot_every=0)
        while True:

            async def go() -> None:
                async with store.engine.connect() as conn:
                    for stream_id in ids:
                        _, version, _ = await dispatcher.fold(conn, TASKS, stream_id)
                        assert version == STREAM_EVENTS, version

            async def records() -> None:
                async with store.engine.connect() as conn:
                    for stream_id in ids:
                        assert len(await store.read_stream(conn, stream_id)) == STREAM_EVENTS

            yield await timed(go), await timed(records)
    finally:
        await store.aclose()
        await store.engine.dispose()


def _es_streams(place: Place, k: int) -> Iterator[tuple[float, float]]:
    """Per run: the time to rebuild each aggregate (``repository.get``), then to read
    its stored events from the recorder (``select_events``)."""
    app = es.BenchApp(env=place.es_env())
    try:
        ids = []
        for _ in range(k):
            task = es.EsTask("p1", "A long-lived task", "Moved back and forth.", "medium", "owner")
            for i in range(1, STREAM_EVENTS):
                to = "in_progress" if i % 2 else "todo"
                task.change_status(task.status, to, "owner")
            app.save(task)
            ids.append(task.id)
        while True:

            def go() -> None:
                for aggregate_id in ids:
                    task = app.repository.get(aggregate_id)
                    assert task.version == STREAM_EVENTS

            def records() -> None:
                for aggregate_id in ids:
                    assert len(app.recorder.select_events(aggregate_id)) == STREAM_EVENTS

            yield timed_sync(go), timed_sync(records)
    finally:
        app.close()


def _fold_raw(rows: list[Any]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for event_type, data in rows:
        payload = json.loads(data) if isinstance(data, str) else data
        if event_type == "TaskCreated":
            state = dict(payload, status="todo")
        else:
            state["status"] = payload["to_status"]
    return state


async def _raw_runs(
    place: Place,
    pg: Callable[[Any], Awaitable[Callable[[], Awaitable[None]]]],
    lite: Callable[[Any], Callable[[], None]],
) -> AsyncIterator[float]:
    """Timed runs of a raw reader on tiu's table: connected once (asyncpg or sqlite3),
    ``pg`` or ``lite`` sets up on the connection, off the clock, and returns a run."""
    if place.postgres:
        conn = await place.asyncpg_conn()
        try:
            go = await pg(conn)
            while True:
                yield await timed(go)
        finally:
            await conn.close()
        return
    sconn = place.sqlite_conn()
    try:
        sgo = lite(sconn)
        while True:
            yield timed_sync(sgo)
    finally:
        sconn.close()


def _raw_streams(tiu_place: Place) -> AsyncIterator[float]:
    """Reads the streams tiu wrote (same table): its first run follows tiu's first."""
    sql = "SELECT event_type, data FROM events WHERE stream_id = {} ORDER BY version"
    distinct = "SELECT DISTINCT stream_id FROM events"

    async def pg(conn: Any) -> Callable[[], Awaitable[None]]:
        ids = [r[0] for r in await conn.fetch(distinct)]
        stmt = await conn.prepare(sql.format("$1"))

        async def go() -> None:
            for stream_id in ids:
                rows = await stmt.fetch(stream_id)
                _fold_raw([(r[0], r[1]) for r in rows])

        return go

    def lite(sconn: Any) -> Callable[[], None]:
        ids = [r[0] for r in sconn.execute(distinct)]

        def go() -> None:
            for stream_id in ids:
                _fold_raw(sconn.execute(sql.format("?"), (stream_id,)).fetchall())

        return go

    return _raw_runs(tiu_place, pg, lite)


# -- the global log ----------------------------------------------------------------------------


async def _tiu_log(place: Place, *, decode: bool = True) -> AsyncIterator[float]:
    store = await place.store()
    try:
        while True:

            async def go() -> None:
                position = 0
                async with store.engine.connect() as conn:
                    while True:
                        page = await store.read_all(conn, position, PAGE)
                        for r in page if decode else ():
                            # the text as stored, validated without building a dict
                            decode_event(r.event_type, r.schema_version, r.stored_data)
                        if len(page) < PAGE:
                            break
                        position = page[-1].position

            yield await timed(go)
    finally:
        await store.aclose()
        await store.engine.dispose()


def _es_log(place: Place, *, decode: bool = True) -> Iterator[float]:
    app = es.BenchApp(env=place.es_env())
    try:
        while True:

            def go() -> None:
                start = 1
                while True:
                    page = app.recorder.select_notifications(start, PAGE)
                    for n in page if decode else ():
                        app.mapper.to_domain_event(n)
                    if len(page) < PAGE:
                        break
                    start = page[-1].id + 1

            yield timed_sync(go)
    finally:
        app.close()


_RAW_LOG = (
    "SELECT position, event_type, data FROM events WHERE position > {} ORDER BY position LIMIT {}"
)


def _loaded(page: Sequence[Any]) -> int | None:
    """``json.loads`` of each row's data; the position after the page, None at the end."""
    for r in page:
        json.loads(r[2])
    return page[-1][0] if len(page) == PAGE else None


def _raw_log(tiu_place: Place) -> AsyncIterator[float]:
    async def pg(conn: Any) -> Callable[[], Awaitable[None]]:
        stmt = await conn.prepare(_RAW_LOG.format("$1", "$2"))

        async def go() -> None:
            position: int | None = 0
            while position is not None:
                position = _loaded(await stmt.fetch(position, PAGE))

        return go

    def lite(sconn: Any) -> Callable[[], None]:
        sql = _RAW_LOG.format("?", "?")

        def go() -> None:
            position: int | None = 0
            while position is not None:
                position = _loaded(sconn.execute(sql, (position, PAGE)).fetchall())

        return go

    return _raw_runs(tiu_place, pg, lite)


async def case4(ctx: Context) -> list[Result]:
    k = 20 if ctx.cfg.quick else 100
    log = 20_000 if ctx.cfg.quick else 100_000
    out: list[Result] = []
    label = f"4a rebuild state: {k} streams x {STREAM_EVENTS} events"
    await ctx.fresh(migrate=("tiu",))
    items = k * STREAM_EVENTS
    tiu_runs, es_runs, r = await ctx.take_turns(
        label,
        _tiu_streams(ctx.place("tiu"), k),
        _es_streams(ctx.place("eventsourcing"), k),
        _raw_streams(ctx.place("tiu")),
    )
    t, t_records = [fold for fold, _ in tiu_runs], [read for _, read in tiu_runs]
    e, e_records = [fold for fold, _ in es_runs], [read for _, read in es_runs]
    out.append(summarise(label, ctx.backend, "tiu", t, items, note="Dispatcher.fold, no snapshot"))
    out.append(summarise(label, ctx.backend, "eventsourcing", e, items, note="repository.get"))
    out.append(summarise(label, ctx.backend, "raw", r, items, note="fetch + json.loads"))
    # The store level: records as the store gives them (id, documents and timestamp
    # decoded when first read), against the recorder's stored events (bytes, not
    # decoded); raw is the same run as 4a's.
    label = f"4c read stream records: {k} streams x {STREAM_EVENTS} events"
    out.append(summarise(label, ctx.backend, "tiu", t_records, items, note="read_stream"))
    out.append(
        summarise(
            label, ctx.backend, "eventsourcing", e_records, items, note="recorder.select_events"
        )
    )
    out.append(summarise(label, ctx.backend, "raw", r, items, note="fetch + json.loads (4a's run)"))

    label = f"4b read global log: {log} events, pages of {PAGE}, decoded"
    await ctx.fresh(migrate=("tiu",))
    store = await ctx.place("tiu").store()
    await fill(store, Scenario(7), log)
    await store.aclose()
    await store.engine.dispose()
    app = es.BenchApp(env=ctx.place("eventsourcing").es_env())
    await asyncio.to_thread(es_fill, app, Scenario(7), log)
    app.close()
    tiu, es_place = ctx.place("tiu"), ctx.place("eventsourcing")
    t, e, r, t_records, e_records = await ctx.take_turns(
        label,
        _tiu_log(tiu),
        _es_log(es_place),
        _raw_log(tiu),
        _tiu_log(tiu, decode=False),
        _es_log(es_place, decode=False),
    )
    out.append(summarise(label, ctx.backend, "tiu", t, log, note="read_all + decode_event"))
    out.append(
        summarise(label, ctx.backend, "eventsourcing", e, log, note="select_notifications + mapper")
    )
    out.append(summarise(label, ctx.backend, "raw", r, log, note="fetch + json.loads"))
    label = f"4d read global log: {log} events, pages of {PAGE}, records"
    out.append(summarise(label, ctx.backend, "tiu", t_records, log, note="read_all"))
    out.append(
        summarise(
            label,
            ctx.backend,
            "eventsourcing",
            e_records,
            log,
            note="recorder.select_notifications",
        )
    )
    out.append(summarise(label, ctx.backend, "raw", r, log, note="fetch + json.loads (4b's run)"))
    return out
