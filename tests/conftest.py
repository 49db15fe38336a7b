"""One suite, two backends: storage tests take the ``engine`` fixture and run on both.

SQLite runs on a temporary file copied from a database migrated once per session.
PostgreSQL runs in a schema of its own (created and migrated once per session, emptied
before each test), so concurrent runs and other tests in the same database do not
interfere. PostgreSQL is skipped when unreachable, unless ``TIU_REQUIRE_POSTGRES=1``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.passwords import BcryptHasher
from eventstore import EngineOptions, EventStore, create_engine
from migrations import runner
from tiu import DatabaseService, Settings

PG_URL = os.environ.get(
    "TIU_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REQUIRE_PG = os.environ.get("TIU_REQUIRE_POSTGRES") == "1"


async def _pg_reachable() -> str | None:
    engine = create_engine(PG_URL)
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    finally:
        await engine.dispose()
    return None


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str]:
    problem = asyncio.run(_pg_reachable())
    if problem is not None:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL required (TIU_REQUIRE_POSTGRES=1) but unreachable: {problem}")
        pytest.skip(f"PostgreSQL unreachable: {problem}")
    schema = f"tiu_test_{os.getpid()}_{secrets.token_hex(3)}"

    async def create() -> None:
        admin = create_engine(PG_URL)
        async with admin.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        await admin.dispose()
        engine = create_engine(PG_URL, EngineOptions(search_path=schema))
        await runner.upgrade(engine)
        await engine.dispose()

    async def drop() -> None:
        admin = create_engine(PG_URL)
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()

    asyncio.run(create())
    yield schema
    asyncio.run(drop())


def sqlite_write_lock_free(database: str | Path) -> bool:
    """Whether another process could take ``database``'s write lock now: a
    connection of its own tries BEGIN IMMEDIATE without waiting."""
    other = sqlite3.connect(database, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    except sqlite3.OperationalError:  # "database is locked"
        return False
    finally:
        other.close()
    return True


async def _empty_schema(engine: AsyncEngine, schema: str) -> None:
    async with engine.begin() as conn:
        names = (
            await conn.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = :s "
                    "AND tablename <> 'alembic_version'"
                ),
                {"s": schema},
            )
        ).scalars()
        tables = ", ".join(f'"{schema}"."{name}"' for name in names)
        if tables:
            # Truncating events is refused by its trigger; the suite runs as superuser
            # and switches triggers off for this statement's transaction only.
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
            await conn.execute(text(f"TRUNCATE {tables}"))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"

    async def create() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{path}")
        await runner.upgrade(engine)
        await engine.dispose()

    asyncio.run(create())
    return path


@pytest.fixture
def pg_url(pg_schema: str) -> str:
    return PG_URL


@pytest.fixture
def engine_options() -> EngineOptions:
    """Override in a test module to change pool or timeout settings."""
    return EngineOptions()


@pytest.fixture
async def sqlite_engine(
    sqlite_template: Path, tmp_path: Path, engine_options: EngineOptions
) -> AsyncIterator[AsyncEngine]:
    path = tmp_path / "tiu.db"
    shutil.copyfile(sqlite_template, path)
    engine = create_engine(f"sqlite+aiosqlite:///{path}", engine_options)
    yield engine
    await engine.dispose()


@pytest.fixture
async def postgres_engine(
    pg_schema: str, engine_options: EngineOptions
) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(PG_URL, replace(engine_options, search_path=pg_schema))
    await _empty_schema(engine, pg_schema)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def pg_app_role(pg_schema: str) -> Iterator[str]:
    """A login role made by sql/app_role.sql: INSERT and SELECT on events, no more."""
    if shutil.which("psql") is None:
        pytest.skip("psql is needed to run sql/app_role.sql")
    role = f"tiu_app_{os.getpid()}"
    url = make_url(PG_URL)
    done = subprocess.run(
        [
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432),
            "-U", url.username or "postgres", "-d", url.database or "test",
            "-v", f"app={role}", "-v", f"schema={pg_schema}",
            "-f", str(Path(__file__).resolve().parents[1] / "sql" / "app_role.sql"),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"sql/app_role.sql failed: {done.stderr}")
    yield role

    async def drop() -> None:
        admin = create_engine(PG_URL)
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP OWNED BY "{role}"'))
            await conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        await admin.dispose()

    asyncio.run(drop())


@pytest.fixture
async def postgres_app_engine(
    pg_schema: str, pg_app_role: str, engine_options: EngineOptions
) -> AsyncIterator[AsyncEngine]:
    """PostgreSQL as the least-privilege application role (sql/app_role.sql)."""
    admin = create_engine(PG_URL, replace(engine_options, search_path=pg_schema))
    await _empty_schema(admin, pg_schema)
    await admin.dispose()
    url = make_url(PG_URL).set(username=pg_app_role)
    engine = create_engine(url, replace(engine_options, search_path=pg_schema))
    yield engine
    await engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite_engine", marks=pytest.mark.sqlite, id="sqlite"),
        pytest.param("postgres_engine", marks=pytest.mark.postgres, id="postgres"),
        pytest.param(
            "postgres_app_engine",
            marks=[pytest.mark.postgres, pytest.mark.app_role],
            id="postgres-app",
        ),
    ]
)
def engine(request: pytest.FixtureRequest) -> AsyncEngine:
    """The backend under test: every storage test runs once per backend. Modules
    marked ``least_privilege`` also run as the application role of sql/app_role.sql
    (tests marked ``needs_owner`` excepted: they tamper with the log on purpose)."""
    return request.getfixturevalue(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        as_app = callspec is not None and callspec.params.get("engine") == "postgres_app_engine"
        wanted = item.get_closest_marker("least_privilege") and not item.get_closest_marker(
            "needs_owner"
        )
        (dropped if as_app and not wanted else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
async def store(engine: AsyncEngine) -> AsyncIterator[EventStore]:
    event_store = EventStore(engine)
    yield event_store
    await event_store.aclose()


PASSWORD = "violet-harbour-lantern-42"


class Clock:
    """A settable clock for the service: time moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def service(engine: AsyncEngine, clock: Clock) -> AsyncIterator[DatabaseService]:
    """A service on the backend under test: inline projections, bcrypt cost 4, the
    settable clock, schema already migrated."""
    svc = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )
    await svc.start(migrate=False)
    yield svc
    await svc.store.aclose()  # the engine fixture disposes the engine
