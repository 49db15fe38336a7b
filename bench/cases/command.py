"""Case 3: commands through the full path, 1 and 8 concurrent callers.

tiu: ``DatabaseService.dispatch(CreateTask)`` with inline projections: load the task,
project and actor streams, decide, write the read models (tasks, project_stats,
user_activity) and the checkpoints, record the command id, append. eventsourcing:
``Application.save`` of a new aggregate with one event (no read model: the library's
projections are asynchronous). raw: one transaction with the same writes tiu's
command makes that matter for the result (event row, tasks row, checkpoint move).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr

from bench import es, raw
from bench.cases.store import task_data
from bench.common import Place, Result, summarise, timed, timed_threads
from bench.context import Context
from domain import projects, tasks, users
from domain.passwords import BcryptHasher
from tiu import DatabaseService, Settings

CALLERS = (1, 8)


async def _service(place: Place) -> tuple[DatabaseService, str, str]:
    service = DatabaseService(
        Settings(database_url=place.url(), bcrypt_rounds=4),
        engine=place.engine(),
        hasher=BcryptHasher(rounds=4),
    )
    await service.start(migrate=True)
    owner = uuid.uuid4().hex
    await service.dispatch(
        users.RegisterUser(
            user_id=owner,
            email="owner@example.com",
            username="owner",
            password=SecretStr("violet-harbour-lantern-42"),
        )
    )
    project = uuid.uuid4().hex
    await service.dispatch(
        projects.CreateProject(project_id=project, name="Bench"), service.context(owner)
    )
    return service, owner, project


async def _tiu(place: Place, n: int, callers: int) -> AsyncIterator[float]:
    service, owner, project = await _service(place)
    try:
        while True:

            async def caller(k: int) -> None:
                for i in range(n // callers):
                    await service.dispatch(
                        tasks.CreateTask(project_id=project, title=f"Task {k}.{i}"),
                        service.context(owner),
                    )

            async def go() -> None:
                await asyncio.gather(*(caller(k) for k in range(callers)))

            yield await timed(go)
    finally:
        await service.aclose()


def _es(place: Place, n: int, callers: int) -> Iterator[float]:
    app = es.BenchApp(env=place.es_env())
    owner, project = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        app.recorder.max_notification_id()  # connected before the clock
        while True:

            def caller(k: int) -> None:
                for i in range(n // callers):
                    app.save(es.EsTask(project, f"Task {k}.{i}", "", "medium", owner))

            yield timed_threads(caller, callers)
    finally:
        app.close()


PG_TASK = (
    "INSERT INTO tasks (task_id, project_id, title, description, status, priority, "
    "priority_rank, created_by, created_at, updated_at) "
    "VALUES ($1, $2, $3, '', 'todo', 'medium', 2, $4, $5, $5)"
)
PG_CHECKPOINT = (
    "UPDATE projection_checkpoints SET position = (SELECT max(position) FROM events), "
    "updated_at = $1 WHERE name = 'tasks' AND active"
)


async def _raw(place: Place, n: int, callers: int) -> AsyncIterator[float]:
    owner, project = uuid.uuid4().hex, uuid.uuid4().hex
    if not place.postgres:
        await asyncio.to_thread(_raw_sqlite_setup, place)
        while True:
            yield await asyncio.to_thread(_raw_sqlite, place, n, callers, owner, project)
    setup = await place.asyncpg_conn()
    await setup.execute(
        "INSERT INTO projection_checkpoints (name, version, position, active, updated_at) "
        "VALUES ('tasks', 1, 0, true, now()) ON CONFLICT DO NOTHING"
    )
    await setup.close()
    while True:
        conns = [await place.asyncpg_conn() for _ in range(callers)]

        async def caller(conn: Any, k: int) -> None:
            for i in range(n // callers):
                task_id = uuid.uuid4().hex
                data = task_data(i)
                r = raw.row(
                    f"task-{task_id}", "task", 1, "TaskCreated", data, raw.GENESIS, owner, task_id
                )
                now = datetime.now(UTC)
                async with conn.transaction():
                    await conn.execute(PG_TASK, task_id, project, f"Task {k}.{i}", owner, now)
                    await conn.execute(raw.PG_LOCK)
                    await conn.execute(raw.PG_INSERT, *r)
                    await conn.execute(PG_CHECKPOINT, now)

        async def go(conns: list[Any] = conns) -> None:
            await asyncio.gather(*(caller(c, k) for k, c in enumerate(conns)))

        took = await timed(go)
        for c in conns:
            await c.close()
        yield took


def _raw_sqlite_setup(place: Place) -> None:
    setup = place.sqlite_conn()
    setup.execute(
        "INSERT OR IGNORE INTO projection_checkpoints (name, version, position, active, "
        "updated_at) VALUES ('tasks', 1, 0, 1, '2026-01-01 00:00:00.000000')"
    )
    setup.close()


def _raw_sqlite(place: Place, n: int, callers: int, owner: str, project: str) -> float:
    task_sql = PG_TASK.replace("$1", "?").replace("$2", "?").replace("$3", "?")
    task_sql = task_sql.replace("$4", "?").replace("$5, $5", "?, ?")
    cp_sql = PG_CHECKPOINT.replace("$1", "?")

    def caller(k: int) -> None:
        conn = place.sqlite_conn()
        for i in range(n // callers):
            task_id = uuid.uuid4().hex
            r = raw.row(
                f"task-{task_id}",
                "task",
                1,
                "TaskCreated",
                task_data(i),
                raw.GENESIS,
                owner,
                task_id,  # a command id, as tiu's command writes one
            )
            now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(task_sql, (task_id, project, f"Task {k}.{i}", owner, now, now))
            conn.execute(raw.SQLITE_INSERT, raw.sqlite_params(r))
            conn.execute(cp_sql, (now,))
            conn.execute("COMMIT")
        conn.close()

    return timed_threads(caller, callers)


async def case3(ctx: Context) -> list[Result]:
    n = 400 if ctx.cfg.quick else 2000
    out: list[Result] = []
    for callers in CALLERS:
        label = f"3 command CreateTask: {n} commands, {callers} caller(s)"
        await ctx.fresh(migrate=("raw",))
        t, e, r = await ctx.take_turns(
            label,
            _tiu(ctx.place("tiu"), n, callers),
            _es(ctx.place("eventsourcing"), n, callers),
            _raw(ctx.place("raw"), n, callers),
        )
        out += [
            summarise(label, ctx.backend, "tiu", t, n, "ops/s", "dispatch + inline projections"),
            summarise(label, ctx.backend, "eventsourcing", e, n, "ops/s", "Application.save"),
            summarise(label, ctx.backend, "raw", r, n, "ops/s", "event + tasks row + checkpoint"),
        ]
    return out
