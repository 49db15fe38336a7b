"""Shared plumbing: where each system's data lives, timing, results.

Every system gets a place of its own, reset per case:

* PostgreSQL: database ``tiu_bench_<pid>`` (created by the run, dropped at its end), one
  schema per system: ``tiu`` (tiu-core, built by its Alembic migrations), ``es``
  (eventsourcing's own tables), ``raw`` (the tiu schema again, written by hand-written
  asyncpg statements).
* SQLite: one file per system in a temporary directory, WAL, ``synchronous`` as given
  (``--sqlite-synchronous``, default NORMAL) on all three systems.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from eventstore import EngineOptions, EventStore, create_engine

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("BENCH_PG_ADMIN_DB", "test")
#: A database per run (set in the environment, so child processes use the same one):
#: a bench run drops its database at the end, and must never drop another run's.
PG_DB = os.environ.setdefault("BENCH_PG_DB", f"tiu_bench_{os.getpid()}")
#: Each system's place; "raw-writes" is case 3's second raw baseline (tiu's statements).
SYSTEMS = ("tiu", "eventsourcing", "raw", "raw-writes")
BACKENDS = ("sqlite", "postgresql")


def raw_systems(systems: list[str]) -> list[str]:
    """The raw baselines among a case's systems, in the order given: ``raw``, or several
    named ``raw (what it does)`` (case 3 has two)."""
    return [s for s in systems if s == "raw" or s.startswith("raw (")]


def raw_label(system: str) -> str:
    """What a named raw baseline does (``raw (tiu's writes)``: ``tiu's writes``)."""
    return system[5:-1] if system.startswith("raw (") else ""


@dataclass
class Config:
    quick: bool
    runs: int
    backends: tuple[str, ...]
    sqlite_synchronous: str = "NORMAL"
    profile: bool = False
    keep: bool = False


@dataclass
class Result:
    case: str
    backend: str
    system: str
    unit: str  # what one run measures: "s" (seconds per run)
    median: float
    min: float
    max: float
    runs: int
    items: int  # events (or operations) per run
    rate_unit: str  # "events/s" or "ops/s"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.items / self.median if self.median > 0 else 0.0

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["rate"] = round(self.rate, 1)
        return out


def summarise(
    case: str,
    backend: str,
    system: str,
    times: list[float],
    items: int,
    rate_unit: str = "events/s",
    note: str = "",
    **extra: Any,
) -> Result:
    return Result(
        case,
        backend,
        system,
        "s",
        statistics.median(times),
        min(times),
        max(times),
        len(times),
        items,
        rate_unit,
        note,
        dict(extra),
    )


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


def timed_sync(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def timed_threads(target: Callable[[int], Any], count: int) -> float:
    """The time for ``count`` threads running ``target(k)`` to finish, started together."""

    def go() -> None:
        threads = [threading.Thread(target=target, args=(k,)) for k in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return timed_sync(go)


# -- PostgreSQL -------------------------------------------------------------------------


def pg_dsn(db: str = PG_DB) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{db}"


def pg_url(db: str = PG_DB) -> str:
    return f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{db}"


async def pg_create_database() -> None:
    conn = await asyncpg.connect(pg_dsn(PG_ADMIN_DB))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", PG_DB)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{PG_DB}"')
    finally:
        await conn.close()


async def pg_drop_database() -> None:
    conn = await asyncpg.connect(pg_dsn(PG_ADMIN_DB))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
    finally:
        await conn.close()


async def pg_execute(statement: str, db: str = PG_ADMIN_DB) -> None:
    """One statement on its own connection (CREATE/DROP DATABASE cannot run in a
    transaction, nor on the database they drop)."""
    conn = await asyncpg.connect(pg_dsn(db))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def pg_reset_schema(schema: str) -> None:
    conn = await asyncpg.connect(pg_dsn())
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()


async def pg_version() -> str:
    conn = await asyncpg.connect(pg_dsn(PG_ADMIN_DB))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


# -- places -------------------------------------------------------------------------------


class Place:
    """Where one system keeps its data on one backend, for one case."""

    def __init__(
        self, cfg: Config, backend: str, system: str, tmpdir: Path, schema: str | None = None
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.system = system
        self.schema = (
            schema
            or {
                "tiu": "tiu",
                "eventsourcing": "es",
                "raw": "raw",
                "raw-writes": "raw_writes",
            }[system]
        )
        self.sqlite_path = tmpdir / f"{self.schema}.db"

    @property
    def postgres(self) -> bool:
        return self.backend == "postgresql"

    async def reset(self) -> None:
        if self.postgres:
            await pg_reset_schema(self.schema)
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.sqlite_path}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240

    # tiu
    def url(self) -> str:
        return pg_url() if self.postgres else f"sqlite+aiosqlite:///{self.sqlite_path}"

    def engine_options(self, **overrides: Any) -> EngineOptions:
        values: dict[str, Any] = {"sqlite_synchronous": self.cfg.sqlite_synchronous}
        if self.postgres:
            values["search_path"] = self.schema
            values["pool_size"] = 10
        values.update(overrides)
        return EngineOptions(**values)

    def engine(self, **overrides: Any) -> Any:
        return create_engine(self.url(), self.engine_options(**overrides))

    async def migrate(self) -> None:
        """Build tiu's schema (events, read models, checkpoints) in this place."""
        from migrations import runner  # noqa: PLC0415

        engine = self.engine()
        try:
            await runner.upgrade(engine)
        finally:
            await engine.dispose()

    async def store(self, **overrides: Any) -> EventStore:
        return EventStore(self.engine(**overrides))

    # raw drivers
    async def asyncpg_conn(self) -> asyncpg.Connection:
        return await asyncpg.connect(pg_dsn(), server_settings={"search_path": self.schema})

    def sqlite_conn(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.sqlite_path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.cfg.sqlite_synchronous}")
        return conn

    # eventsourcing
    def es_env(self) -> dict[str, str]:
        if self.postgres:
            return {
                "PERSISTENCE_MODULE": "eventsourcing.postgres",
                "POSTGRES_DBNAME": PG_DB,
                "POSTGRES_HOST": PG_HOST,
                "POSTGRES_PORT": str(PG_PORT),
                "POSTGRES_USER": PG_USER,
                "POSTGRES_PASSWORD": "",
                "POSTGRES_SCHEMA": self.schema,
                "POSTGRES_POOL_SIZE": "10",
                "POSTGRES_MAX_OVERFLOW": "10",
            }
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(self.sqlite_path),
            "SQLITE_LOCK_TIMEOUT": "30",
        }


class Workspace:
    """The temporary directory for SQLite files; PostgreSQL schemas live in :data:`PG_DB`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.tmpdir = Path(tempfile.mkdtemp(prefix="tiu-bench-"))

    def place(self, backend: str, system: str) -> Place:
        return Place(self.cfg, backend, system, self.tmpdir)

    async def reset(self, backend: str) -> None:
        for system in SYSTEMS:
            await self.place(backend, system).reset()

    def cleanup(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


# -- the machine ----------------------------------------------------------------------------


def machine_info(pg: str | None) -> dict[str, str]:
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import eventsourcing  # noqa: PLC0415
    import sqlalchemy  # noqa: PLC0415

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "postgresql": pg or "n/a",
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "asyncpg": asyncpg.__version__,
        "eventsourcing": getattr(eventsourcing, "__version__", "9.5+"),
        "os": platform.platform(),
    }


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]
