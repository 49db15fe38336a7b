"""Case 3: commands through the full path, 1 and 8 concurrent callers.

tiu: ``DatabaseService.dispatch(CreateTask)`` with inline projections: load the task,
project and actor streams, decide, write the read models (tasks, project_stats,
user_activity) and the checkpoints, record the command id, append. eventsourcing:
``Application.save`` of a new aggregate with one event (no read model: the library's
projections are asynchronous). Two raw baselines, each one transaction a command:

* ``raw (tiu's writes)``: the statements tiu's command sends, by hand (issue #20's
  "raw transaction doing the same writes", the one the target is stated against): the
  append lock, the log's position and the three streams' heads, the idempotency
  record, the tasks row, the project_stats and user_activity counters, the event with
  its hash chained on the head read, and the move of all six inline checkpoints;
* ``raw (event+task)``: the writes that matter for the result (event row, tasks row,
  the tasks checkpoint's move), a floor below tiu's contract.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
RAW_WRITES = "raw (tiu's writes)"
RAW_LIGHT = "raw (event+task)"


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


async def _raw_light(place: Place, n: int, callers: int) -> AsyncIterator[float]:
    owner, project = uuid.uuid4().hex, uuid.uuid4().hex
    if not place.postgres:
        await asyncio.to_thread(_raw_sqlite_setup, place)
        while True:
            yield await asyncio.to_thread(_raw_light_sqlite, place, n, callers, owner, project)
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

        yield await _callers_timed(conns, caller)


async def _callers_timed(conns: list[Any], caller: Callable[[Any, int], Awaitable[None]]) -> float:
    """One run: a caller per connection at once, timed; the connections closed after."""

    async def go() -> None:
        await asyncio.gather(*(caller(c, k) for k, c in enumerate(conns)))

    took = await timed(go)
    for c in conns:
        await c.close()
    return took


def _raw_sqlite_setup(place: Place) -> None:
    setup = place.sqlite_conn()
    setup.execute(
        "INSERT OR IGNORE INTO projection_checkpoints (name, version, position, active, "
        "updated_at) VALUES ('tasks', 1, 0, 1, '2026-01-01 00:00:00.000000')"
    )
    setup.close()


def _raw_light_sqlite(place: Place, n: int, callers: int, owner: str, project: str) -> float:
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


# -- raw (tiu's writes): the statements tiu's CreateTask sends, by hand ----------------------

#: The inline projections' checkpoints a command moves (tiu's default projectors).
CHECKPOINTS = ("users", "projects", "tasks", "sessions", "project_stats", "user_activity")
OUTCOME = '{"ok":true,"version":1}'
SQL_PROCESSED = (
    "INSERT INTO processed_commands (command_id, command_type, stream_id, outcome, "
    "recorded_at) VALUES ($1, 'CreateTask', $2, $3, $4) ON CONFLICT DO NOTHING"
)
SQL_TASK = (
    "INSERT INTO tasks (task_id, project_id, title, description, status, priority, "
    "priority_rank, due_at, assignee_id, created_by, created_at, updated_at, completed_at) "
    "VALUES ($1, $2, $3, '', 'todo', 'medium', 2, NULL, NULL, $4, $5, $5, NULL)"
)
SQL_STATS = (
    "UPDATE project_stats SET total = total + 1, todo = todo + 1, updated_at = $1 "
    "WHERE project_id = $2"
)
SQL_ACTIVITY = (
    "UPDATE user_activity SET tasks_created = tasks_created + 1, last_active_at = $1 "
    "WHERE user_id = $2"
)
# The log's position and each stream's head in one statement, as tiu reads them.
SQL_HEADS = " UNION ALL ".join(
    [
        "SELECT NULL, coalesce(max(position), 0), NULL FROM events",
        *(
            f"SELECT ${n}, * FROM (SELECT version, hash FROM events WHERE stream_id = ${n} "
            f"ORDER BY version DESC LIMIT 1) AS h{n}"
            for n in (1, 2, 3)
        ),
    ]
)
SQL_CHECKPOINTS = (
    "UPDATE projection_checkpoints SET position = $1, updated_at = $2 "
    "WHERE name IN ({}) AND active AND position = $3".format(
        ", ".join(f"'{name}'" for name in CHECKPOINTS)
    )
)


def _sqlite(sql: str) -> str:
    return re.sub(r"\$(\d+)", r"?\1", sql)


def _created(task_id: str, project: str, owner: str, title: str, at: datetime) -> dict[str, Any]:
    """TaskCreated's data as tiu writes it, built by hand."""
    return {
        "assignee_id": None,
        "at": at.isoformat().replace("+00:00", "Z"),
        "created_by": owner,
        "description": "",
        "due_date": None,
        "priority": "medium",
        "project_id": project,
        "task_id": task_id,
        "title": title,
    }


def _heads(rows: list[Any], stream: str) -> tuple[int, int, str]:
    """The log's position and ``stream``'s version and hash from :data:`SQL_HEADS`' rows."""
    position, version, prev = 0, 0, raw.GENESIS
    for stream_id, number, hash_ in rows:
        if stream_id is None:
            position = number
        elif stream_id == stream:
            version, prev = number, hash_
    return position, version, prev


def _seed_rows(owner: str, project: str) -> list[tuple[Any, ...]]:
    """The owner's and the project's first events, as tiu's setup commands leave them."""
    return [
        raw.row(f"user-{owner}", "user", 1, "UserRegistered", {"user_id": owner}, raw.GENESIS),
        raw.row(f"project-{project}", "project", 1, "ProjectCreated", {"id": project}, raw.GENESIS),
    ]


async def _raw_writes(place: Place, n: int, callers: int) -> AsyncIterator[float]:
    owner, project = uuid.uuid4().hex, uuid.uuid4().hex
    if not place.postgres:
        await asyncio.to_thread(_raw_writes_sqlite_setup, place, owner, project)
        while True:
            yield await asyncio.to_thread(_raw_writes_sqlite, place, n, callers, owner, project)
    setup = await place.asyncpg_conn()
    await raw.pg_append(setup, _seed_rows(owner, project))
    await setup.execute("INSERT INTO project_stats VALUES ($1, 0, 0, 0, 0, 0, 0, now())", project)
    await setup.execute("INSERT INTO user_activity VALUES ($1, 0, 0, 0, 0, 0, NULL)", owner)
    await setup.executemany(
        "INSERT INTO projection_checkpoints (name, version, position, active, updated_at) "
        "VALUES ($1, 1, 2, true, now())",
        [(name,) for name in CHECKPOINTS],
    )
    await setup.close()
    streams = (f"user-{owner}", f"project-{project}")
    while True:
        conns = [await place.asyncpg_conn() for _ in range(callers)]

        async def caller(conn: Any, k: int) -> None:
            for i in range(n // callers):
                task_id, command_id = uuid.uuid4().hex, uuid.uuid4().hex
                stream, title, now = f"task-{task_id}", f"Task {k}.{i}", datetime.now(UTC)
                data = _created(task_id, project, owner, title, now)
                async with conn.transaction():
                    await conn.execute(SQL_PROCESSED, command_id, stream, OUTCOME, now)
                    await conn.execute(SQL_TASK, task_id, project, title, owner, now)
                    await conn.execute(SQL_STATS, now, project)
                    await conn.execute(SQL_ACTIVITY, now, owner)
                    await conn.execute(raw.PG_LOCK)
                    heads = await conn.fetch(SQL_HEADS, *streams, stream)
                    position, version, prev = _heads(heads, stream)
                    r = raw.row(stream, "task", version + 1, "TaskCreated", data, prev, owner)
                    await conn.execute(raw.PG_INSERT_AT, position + 1, *r[:8], command_id, *r[9:])
                    moved = await conn.execute(SQL_CHECKPOINTS, position + 1, now, position)
                    if moved != f"UPDATE {len(CHECKPOINTS)}":
                        raise RuntimeError(f"checkpoints not at {position}: {moved}")

        yield await _callers_timed(conns, caller)


def _raw_writes_sqlite_setup(place: Place, owner: str, project: str) -> None:
    setup = place.sqlite_conn()
    raw.sqlite_append(setup, _seed_rows(owner, project))
    stamp = "2026-01-01 00:00:00.000000"
    setup.execute("INSERT INTO project_stats VALUES (?, 0, 0, 0, 0, 0, 0, ?)", (project, stamp))
    setup.execute("INSERT INTO user_activity VALUES (?, 0, 0, 0, 0, 0, NULL)", (owner,))
    setup.executemany(
        "INSERT INTO projection_checkpoints (name, version, position, active, updated_at) "
        "VALUES (?, 1, 2, 1, ?)",
        [(name, stamp) for name in CHECKPOINTS],
    )
    setup.close()


def _raw_writes_sqlite(place: Place, n: int, callers: int, owner: str, project: str) -> float:
    processed, task, stats, activity, heads_sql, checkpoints = map(
        _sqlite, (SQL_PROCESSED, SQL_TASK, SQL_STATS, SQL_ACTIVITY, SQL_HEADS, SQL_CHECKPOINTS)
    )
    streams = (f"user-{owner}", f"project-{project}")

    def caller(k: int) -> None:
        conn = place.sqlite_conn()
        for i in range(n // callers):
            task_id, command_id = uuid.uuid4().hex, uuid.uuid4().hex
            stream, title, at = f"task-{task_id}", f"Task {k}.{i}", datetime.now(UTC)
            now = at.strftime("%Y-%m-%d %H:%M:%S.%f")
            data = _created(task_id, project, owner, title, at)
            conn.execute("BEGIN IMMEDIATE")
            try:
                heads = conn.execute(heads_sql, (*streams, stream)).fetchall()
                position, version, prev = _heads(heads, stream)
                conn.execute(processed, (command_id, stream, OUTCOME, now))
                conn.execute(task, (task_id, project, title, owner, now))
                conn.execute(stats, (now, project))
                conn.execute(activity, (now, owner))
                r = raw.row(stream, "task", version + 1, "TaskCreated", data, prev, owner)
                values = raw.sqlite_params(r)
                conn.execute(
                    raw.SQLITE_INSERT_AT, (position + 1, *values[:8], command_id, *values[9:])
                )
                moved = conn.execute(checkpoints, (position + 1, now, position)).rowcount
                if moved != len(CHECKPOINTS):
                    raise RuntimeError(f"checkpoints not at {position}: {moved} moved")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        conn.close()

    return timed_threads(caller, callers)


async def case3(ctx: Context) -> list[Result]:
    n = 400 if ctx.cfg.quick else 2000
    out: list[Result] = []
    for callers in CALLERS:
        label = f"3 command CreateTask: {n} commands, {callers} caller(s)"
        await ctx.fresh(migrate=("raw", "raw-writes"))
        t, e, w, r = await ctx.take_turns(
            label,
            _tiu(ctx.place("tiu"), n, callers),
            _es(ctx.place("eventsourcing"), n, callers),
            _raw_writes(ctx.place("raw-writes"), n, callers),
            _raw_light(ctx.place("raw"), n, callers),
        )
        out += [
            summarise(label, ctx.backend, "tiu", t, n, "ops/s", "dispatch + inline projections"),
            summarise(label, ctx.backend, "eventsourcing", e, n, "ops/s", "Application.save"),
            summarise(label, ctx.backend, RAW_WRITES, w, n, "ops/s", "tiu's statements by hand"),
            summarise(
                label, ctx.backend, RAW_LIGHT, r, n, "ops/s", "event + tasks row + checkpoint"
            ),
        ]
    return out
