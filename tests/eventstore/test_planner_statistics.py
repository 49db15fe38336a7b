"""The query planner's statistics: SQLite's are gathered after migrations, in a rebuild's
swap and at a checkpoint once the log has outgrown them, off the loop; PostgreSQL's
shadow tables are analysed before the swap."""

from __future__ import annotations

import asyncio
import random
import shutil
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.passwords import BcryptHasher
from domain.permissions import Role, permissions_for
from eventstore import EventStore, NewEvent, create_engine, sqlite_driver
from eventstore.engine import EngineOptions, gather_statistics
from eventstore.errors import AppendTimeout
from eventstore.sqlite_driver import STATISTICS_GROWTH, WAL_CHECKPOINT_BYTES
from migrations import runner
from projections import replay
from projections.readmodels import ALL_PROJECTORS
from projections.readmodels.tasks import TasksProjector
from projections.runner import Worker
from tests.projections.worker_process import append_events, workload
from tiu import DatabaseService, Settings

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
#: Tasks in 100 projects, the caller a member of 10: enough that the statistics make
#: SQLite read a keyset page from the (created_at, task_id) index.
N_TASKS = 20_000


def _populate(path: Path) -> None:
    """Users, projects and tasks written by plain sqlite3 (no engine: no checkpoint, so
    no statistics), then checkpointed."""
    rng = random.Random(6)
    now = NOW.strftime("%Y-%m-%d %H:%M:%S.%f")
    db = sqlite3.connect(path)
    users = [f"u{i:04d}" for i in range(50)]
    projects = [f"p{i:04d}" for i in range(100)]
    db.executemany(
        "INSERT INTO users (user_id, email, email_lower, username, username_lower, "
        "display_name, active, failed_logins, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, 1, 0, ?, ?)",
        [(u, f"{u}@example.com", f"{u}@example.com", u, u, u, now, now) for u in users],
    )
    db.executemany("INSERT INTO user_roles (user_id, role) VALUES (?, 'member')", [(users[0],)])
    db.executemany(
        "INSERT INTO user_permissions (user_id, permission) VALUES (?, ?)",
        [(users[0], str(p)) for p in permissions_for([Role.MEMBER])],
    )
    db.executemany(
        "INSERT INTO projects (project_id, name, description, visibility, owner_id, archived, "
        "created_at, updated_at) VALUES (?, ?, '', 'private', ?, 0, ?, ?)",
        [(p, p, users[1 + i % 49], now, now) for i, p in enumerate(projects)],
    )
    db.executemany(
        "INSERT INTO project_members (project_id, user_id, role, added_at) "
        "VALUES (?, ?, 'editor', ?)",
        [(p, users[0], now) for p in projects[:10]],
    )
    statuses = ("todo", "in_progress", "review", "done", "cancelled")
    rows = []
    for i in range(N_TASKS):
        created = (NOW + timedelta(seconds=i)).strftime("%Y-%m-%d %H:%M:%S.%f")
        rows.append(
            (f"t{i:07d}", projects[i % 100], f"Task {i}", rng.choice(statuses), created, created)
        )
    db.executemany(
        "INSERT INTO tasks (task_id, project_id, title, description, status, priority, "
        "priority_rank, created_by, created_at, updated_at) "
        "VALUES (?, ?, ?, '', ?, 'medium', 2, 'u0001', ?, ?)",
        rows,
    )
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


async def _plan(conn: Any, statement: str, parameters: Any, asked: str) -> list[str]:
    # ``asked`` tells the two EXPLAINs apart: sqlite3 caches a statement by its text, and
    # an EXPLAIN, which reads no table, does not look whether the schema changed.
    rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement} -- {asked}", parameters)
    return [str(row[3]) for row in rows]


def _stat_tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {t for (t,) in db.execute("SELECT tbl FROM sqlite_stat1")}
    except sqlite3.OperationalError:  # no such table: never analysed
        return set()
    finally:
        db.close()


@pytest.mark.sqlite
async def test_a_keyset_page_of_tasks_reads_the_created_at_index_once_statistics_are_gathered(
    sqlite_template: Path, tmp_path: Path
) -> None:
    # Without statistics SQLite takes every table for ~1M rows and every index for
    # selective: it reads a page through (project_id, created_at), one range per visible
    # project, and sorts them all (12-14 ms at 100,000 tasks, bench case 6b).
    path = tmp_path / "tasks.db"
    shutil.copyfile(sqlite_template, path)
    await asyncio.to_thread(_populate, path)
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    service = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
    )
    await service.start(migrate=False)
    sent: list[tuple[str, Any]] = []

    def record(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT tasks."):
            sent.append((statement, parameters))

    try:
        async with service.get_repositories("u0000") as repos:
            first = await repos.tasks.page_tasks(
                {"status": "in_progress"}, order_by=("created_at",), limit=100
            )
            event.listen(engine.sync_engine, "before_cursor_execute", record)
            await repos.tasks.page_tasks(
                {"status": "in_progress"},
                order_by=("created_at",),
                after=first.next_cursor,
                limit=100,
            )
            event.remove(engine.sync_engine, "before_cursor_execute", record)
        (page,) = sent
        # A connection open before the statistics are gathered plans with them after.
        async with engine.connect() as held:
            before = await _plan(held, *page, "before")
            await held.rollback()
            await gather_statistics(engine)
            await held.exec_driver_sql(*page)  # reads the new schema, statistics and all
            after = await _plan(held, *page, "after")
        assert "ix_tasks_project_id_created_at" in before[0]
        assert "ix_tasks_created_at_task_id" in after[0]
        assert "tasks" in _stat_tables(path)
    finally:
        await service.aclose()
        await engine.dispose()


@pytest.mark.sqlite
async def test_a_migration_gathers_statistics_and_an_upgrade_with_none_to_run_does_not(
    sqlite_template: Path, tmp_path: Path
) -> None:
    path = tmp_path / "migrated.db"
    shutil.copyfile(sqlite_template, path)
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        store = EventStore(engine)
        async with store.transaction() as uow:
            for i in range(50):
                uow.append(f"s-{i}", "s", [NewEvent("Noted", {"i": i})])
        await store.aclose()
        await runner.upgrade(engine)  # at head already: nothing to run
        assert "events" not in _stat_tables(path)
        await runner.downgrade(engine, "0011")
        await runner.upgrade(engine)
        assert "events" in _stat_tables(path)
    finally:
        await engine.dispose()


@pytest.mark.sqlite
async def test_statistics_refused_the_lock_raise_a_typed_error_and_keep_the_ones_before(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """Another process holding the write lock past the busy timeout: gathering fails with
    the store's typed error, not sqlite3's, and the statistics before it are kept."""
    path = tmp_path / "locked.db"
    shutil.copyfile(sqlite_template, path)
    engine = create_engine(f"sqlite+aiosqlite:///{path}", EngineOptions(busy_timeout=0.2))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await gather_statistics(engine)
        before = _stat_tables(path)
        assert before
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(AppendTimeout):
            await gather_statistics(engine)
        other.execute("ROLLBACK")
        assert _stat_tables(path) == before
    finally:
        other.close()
        await engine.dispose()


async def _statistics_of(engine: AsyncEngine, table: str) -> int:
    """How many statistics the planner has of ``table`` (SQLite: sqlite_stat1 rows;
    PostgreSQL: pg_stats columns, which only ANALYZE fills)."""
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            query = (
                "SELECT count(*) FROM pg_stats WHERE schemaname = current_schema() "
                "AND tablename = :t"
            )
        else:
            exists = await conn.scalar(
                text("SELECT count(*) FROM sqlite_schema WHERE name = 'sqlite_stat1'")
            )
            if not exists:
                return 0
            query = "SELECT count(*) FROM sqlite_stat1 WHERE tbl = :t"
        return int(await conn.scalar(text(query), {"t": table}) or 0)


async def test_a_rebuild_swaps_its_tables_in_with_their_statistics(engine: AsyncEngine) -> None:
    store = EventStore(engine)
    try:
        await append_events(store, workload(300, seed=3))
        await Worker(store, ALL_PROJECTORS, batch_size=100, leader_election=False).catch_up()
        await replay.rebuild(store, TasksProjector(), batch_size=50)
        assert await _statistics_of(engine, "tasks") > 0
    finally:
        await store.aclose()


@pytest.mark.sqlite
async def test_a_checkpoint_gathers_statistics_on_a_worker_thread_once_the_log_outgrew_them(
    sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "periodic.db"
    shutil.copyfile(sqlite_template, path)
    gathered_on: list[int] = []
    gather = sqlite_driver.gather_statistics

    def spy(db: sqlite3.Connection) -> None:
        gathered_on.append(threading.get_ident())
        gather(db)

    rounds: list[int] = []
    passive = sqlite_driver._passive_checkpoint

    def counted(db: sqlite3.Connection) -> tuple[int, int, int]:
        rounds.append(1)
        return passive(db)

    monkeypatch.setattr(sqlite_driver, "gather_statistics", spy)
    monkeypatch.setattr(sqlite_driver, "_passive_checkpoint", counted)
    store = EventStore(create_engine(f"sqlite+aiosqlite:///{path}"))
    appended = 0

    async def checkpoints_worth() -> None:
        nonlocal appended
        before = len(rounds)
        for _ in range(WAL_CHECKPOINT_BYTES // 20_000 + 50):
            appended += 1
            await store.append(f"s-{appended}", "s", [NewEvent("Noted", {"text": "x" * 2000})], 0)
        (checkpointer,) = store.engine.dialect.loaded_dbapi.checkpointers.values()
        await checkpointer.ended()
        assert len(rounds) > before  # a checkpoint ran

    try:
        await checkpoints_worth()  # the log has no statistics: gathered
        assert len(gathered_on) == 1
        assert gathered_on[0] != threading.get_ident()
        first = _events_counted(path)
        assert 0 < first <= appended
        # Gathered again at a checkpoint once the log has grown fourfold, not before.
        while len(gathered_on) == 1 and appended < STATISTICS_GROWTH * first + 1000:
            await checkpoints_worth()
        assert len(gathered_on) == 2
        assert gathered_on[1] != threading.get_ident()
        assert _events_counted(path) >= STATISTICS_GROWTH * first
    finally:
        await store.aclose()
        await store.engine.dispose()


def _events_counted(path: Path) -> int:
    """The events the statistics counted (the row count leading each index's row)."""
    db = sqlite3.connect(path)
    try:
        (counted,) = db.execute(
            "SELECT max(CAST(stat AS INTEGER)) FROM sqlite_stat1 WHERE tbl = 'events'"
        ).fetchone()
        return int(counted)
    finally:
        db.close()
