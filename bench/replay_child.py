"""One replay in a process of its own, so its peak RSS can be measured.

Run by the replay case as ``python -m bench.replay_child '<json>'``; prints one JSON
line ``{"seconds", "applied", "maxrss_mb"}``. The peak is this process's own
high-water mark (``VmHWM``), the interpreter and imports included.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Config, Place

PAGE = 1000
TASK_TYPES = ["TaskAssigned", "TaskCreated", "TaskStatusChanged"]


def _place(args: dict[str, Any]) -> Place:
    cfg = Config(quick=False, runs=1, backends=(args["backend"],))
    cfg.sqlite_synchronous = args["sync"]
    return Place(cfg, args["backend"], args.get("place", args["system"]), Path(args["tmpdir"]))


async def _tiu(place: Place, mode: str) -> int:
    from projections import replay  # noqa: PLC0415
    from projections.readmodels import ALL_PROJECTORS, TasksProjector  # noqa: PLC0415

    store = await place.store()
    try:
        if mode == "tasks":
            report = await replay.rebuild(store, TasksProjector(), freeze_heap=True)
            return report.applied
        reports = await replay.rebuild_all(store, ALL_PROJECTORS, freeze_heap=True)
        return sum(r.applied for r in reports)
    finally:
        await store.aclose()
        await store.engine.dispose()


RAW_DDL = (
    "DROP TABLE IF EXISTS raw_tasks",
    "DROP TABLE IF EXISTS raw_checkpoint",
    "CREATE TABLE raw_tasks (task_id TEXT PRIMARY KEY, project_id TEXT NOT NULL, "
    "title TEXT NOT NULL, status TEXT NOT NULL, assignee_id TEXT, updated_at TEXT NOT NULL)",
    "CREATE TABLE raw_checkpoint (name TEXT PRIMARY KEY, position BIGINT NOT NULL)",
    "INSERT INTO raw_checkpoint VALUES ('tasks', 0)",
)


def _split(rows: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    created, status, assigned = [], [], []
    for _, event_type, raw_data in rows:
        d = json.loads(raw_data)
        if event_type == "TaskCreated":
            created.append((d["task_id"], d["project_id"], d["title"], d["at"]))
        elif event_type == "TaskStatusChanged":
            status.append((d["to_status"], d["at"], d["task_id"]))
        else:
            assigned.append((d["assignee_id"], d["task_id"]))
    return created, status, assigned


async def _raw_pg(place: Place) -> int:
    conn = await place.asyncpg_conn()
    for ddl in RAW_DDL:
        await conn.execute(ddl)
    read = await conn.prepare(
        "SELECT position, event_type, data FROM events WHERE position > $1 "
        "AND event_type = ANY($2::text[]) ORDER BY position LIMIT $3"
    )
    applied, position = 0, 0
    while True:
        async with conn.transaction():
            rows = await read.fetch(position, TASK_TYPES, PAGE)
            if not rows:
                break
            created, status, assigned = _split(rows)
            if created:
                await conn.executemany(
                    "INSERT INTO raw_tasks VALUES ($1, $2, $3, 'todo', NULL, $4)", created
                )
            if status:
                await conn.executemany(
                    "UPDATE raw_tasks SET status = $1, updated_at = $2 WHERE task_id = $3", status
                )
            if assigned:
                await conn.executemany(
                    "UPDATE raw_tasks SET assignee_id = $1 WHERE task_id = $2", assigned
                )
            position = rows[-1][0]
            await conn.execute(
                "UPDATE raw_checkpoint SET position = $1 WHERE name = 'tasks'", position
            )
        applied += len(rows)
    await conn.close()
    return applied


def _raw_sqlite(place: Place) -> int:
    conn = place.sqlite_conn()
    for ddl in RAW_DDL:
        conn.execute(ddl)
    applied, position = 0, 0
    marks = ",".join("?" * len(TASK_TYPES))
    while True:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            # +event_type: scan in position order (the event_type index plus a sort per
            # page made this quadratic; tiu reads the same way).
            "SELECT position, event_type, data FROM events WHERE position > ? "
            f"AND +event_type IN ({marks}) ORDER BY position LIMIT ?",
            (position, *TASK_TYPES, PAGE),
        ).fetchall()
        if not rows:
            conn.execute("COMMIT")
            break
        created, status, assigned = _split(rows)
        conn.executemany("INSERT INTO raw_tasks VALUES (?, ?, ?, 'todo', NULL, ?)", created)
        conn.executemany(
            "UPDATE raw_tasks SET status = ?, updated_at = ? WHERE task_id = ?", status
        )
        conn.executemany("UPDATE raw_tasks SET assignee_id = ? WHERE task_id = ?", assigned)
        position = rows[-1][0]
        conn.execute("UPDATE raw_checkpoint SET position = ? WHERE name = 'tasks'", (position,))
        conn.execute("COMMIT")
        applied += len(rows)
    conn.close()
    return applied


def _es(place: Place, target: int) -> int:
    from eventsourcing.projection import ProjectionRunner  # noqa: PLC0415

    from bench import es  # noqa: PLC0415

    es.set_sqlite_synchronous(place.cfg.sqlite_synchronous)
    env = place.es_env()
    if not place.postgres:
        return _es_sqlite(env)
    view = es.PgTaskView
    with ProjectionRunner(
        application_class=es.BenchApp,
        projection_class=es.TaskProjection,
        view_class=view,
        env=env,
    ) as runner:
        runner.wait(target, timeout=3600)
    return target


def _es_sqlite(env: dict[str, str]) -> int:
    """eventsourcing's SQLite recorder has no subscriptions, so no ProjectionRunner:
    the same loop by hand (pages of notifications filtered by topic, mapped to domain
    events, ``process_event`` per event with its tracking record)."""
    from eventsourcing.persistence import InfrastructureFactory, Tracking  # noqa: PLC0415

    from bench import es  # noqa: PLC0415

    app = es.BenchApp(env=env)
    view_env = {**env}
    factory = InfrastructureFactory.construct(
        env=ProjectionEnv.construct_env(es.TaskProjection.name, view_env)
    )
    view = factory.tracking_recorder(es.SQLiteTaskView)
    projection = es.TaskProjection(view=view)
    start = (view.max_tracking_id(app.name) or 0) + 1
    applied = 0
    while True:
        page = app.recorder.select_notifications(start, PAGE, topics=es.TASK_TOPICS)
        for n in page:
            projection.process_event(app.mapper.to_domain_event(n), Tracking(app.name, n.id))
        applied += len(page)
        if len(page) < PAGE:
            break
        start = page[-1].id + 1
    app.close()
    return applied


class ProjectionEnv:
    @staticmethod
    def construct_env(name: str, env: dict[str, str]) -> Any:
        from eventsourcing.projection import ProjectionRunner  # noqa: PLC0415

        return ProjectionRunner._construct_env(name, env)


def _es_reset(place: Place) -> int:
    """Drop the view and tracking tables; return the last task notification id."""
    if place.postgres:
        import psycopg  # noqa: PLC0415

        from bench.common import pg_dsn  # noqa: PLC0415

        with psycopg.connect(pg_dsn(), autocommit=True) as conn:
            conn.execute(f"SET search_path = {place.schema}")
            conn.execute("DROP TABLE IF EXISTS es_tasks")
            conn.execute("DROP TABLE IF EXISTS taskprojection_tracking")
            row = conn.execute(
                "SELECT max(notification_id) FROM benchapp_events WHERE topic LIKE %s",
                ("bench.es:Task%",),
            ).fetchone()
            return int(row[0] or 0)
    import sqlite3  # noqa: PLC0415

    conn = sqlite3.connect(place.sqlite_path, isolation_level=None)
    conn.execute("DROP TABLE IF EXISTS es_tasks")
    conn.execute("DROP TABLE IF EXISTS tracking")
    row = conn.execute(
        "SELECT max(rowid) FROM stored_events WHERE topic LIKE ?", ("bench.es:Task%",)
    ).fetchone()
    conn.close()
    return int(row[0] or 0)


#: What each system's replay imports, loaded before its clock starts: the time is the
#: replay's alone (tiu's imports took ~0.2 s). Only the chosen system's modules are
#: loaded, so its peak RSS holds no other system's.
_MODULES = {
    "tiu": ("projections.replay", "projections.readmodels"),
    "eventsourcing": ("eventsourcing.projection", "eventsourcing.persistence", "bench.es"),
    "raw": (),
}


def main() -> None:
    args = json.loads(sys.argv[1])
    place = _place(args)
    for module in _MODULES[args["system"]]:
        importlib.import_module(module)
    if args["system"] == "eventsourcing":
        target = _es_reset(place)
        started = time.perf_counter()
        applied = _es(place, target)
    elif args["system"] == "raw":
        started = time.perf_counter()
        applied = asyncio.run(_raw_pg(place)) if place.postgres else _raw_sqlite(place)
    else:
        started = time.perf_counter()
        applied = asyncio.run(_tiu(place, args["mode"]))
    seconds = time.perf_counter() - started
    peak = _peak_rss_mb()
    print(json.dumps({"seconds": seconds, "applied": applied, "maxrss_mb": round(peak, 1)}))


def _peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM belongs to the address space that exec made.

    ``ru_maxrss`` is not: Linux carries the parent's high-water mark across fork and
    exec, so every child reported at least the RSS of the bench process that spawned it.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


if __name__ == "__main__":
    main()
