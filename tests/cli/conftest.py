"""CLI tests: a populated SQLite file (copied from a session template) and PostgreSQL
in the suite's schema, both filled by the demo scenario through the public API."""

from __future__ import annotations

import asyncio
import io
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import text
from typer.testing import CliRunner

from domain.passwords import BcryptHasher
from eventstore import EngineOptions, create_engine
from tests.conftest import PG_URL, _empty_schema
from tests.tamper import bypass_append_only
from tiu.cli import app
from tiu.demo import DemoClock, _scenario
from tiu.service import DatabaseService
from tiu.settings import Settings


async def populate(url: str, schema: str | None = None, *, migrate: bool = True) -> None:
    clock = DemoClock(datetime.now(UTC).replace(microsecond=0) - timedelta(days=2))
    service = DatabaseService(
        Settings(database_url=url, search_path=schema, bcrypt_rounds=4),
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )
    try:
        await service.start(migrate=migrate)
        await _scenario(service, clock, Console(file=io.StringIO()))
    finally:
        await service.aclose()


@pytest.fixture(scope="session")
def populated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "template.db"
    asyncio.run(populate(f"sqlite+aiosqlite:///{path}"))
    return path


class Cli:
    """Invoke ``tiu`` on one database; returns the click Result."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.runner = CliRunner()

    def __call__(self, *argv: str):
        return self.runner.invoke(app, [*argv, *self.args], catch_exceptions=False)


@pytest.fixture
def sqlite_db(populated_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "x.db"
    shutil.copyfile(populated_template, path)
    return path


@pytest.fixture
def sqlite_cli(sqlite_db: Path) -> Cli:
    return Cli(["--database-url", f"sqlite+aiosqlite:///{sqlite_db}"])


@pytest.fixture
def pg_cli(pg_schema: str) -> Cli:
    async def fill() -> None:
        engine = create_engine(PG_URL, EngineOptions(search_path=pg_schema))
        await _empty_schema(engine, pg_schema)
        await engine.dispose()
        await populate(PG_URL, pg_schema, migrate=False)

    asyncio.run(fill())
    return Cli(["--database-url", PG_URL, "--schema", pg_schema])


@pytest.fixture(
    params=[
        pytest.param("sqlite_cli", marks=pytest.mark.sqlite, id="sqlite"),
        pytest.param("pg_cli", marks=pytest.mark.postgres, id="postgres"),
    ]
)
def cli(request: pytest.FixtureRequest) -> Cli:
    return request.getfixturevalue(request.param)


def sql(cli: Cli, statement: str, *, superuser_bypass: bool = False) -> list[tuple]:
    """Run SQL on the CLI's database (PostgreSQL: in its schema)."""
    url = cli.args[1]
    schema = cli.args[3] if len(cli.args) > 3 else None

    async def go() -> list[tuple]:
        engine = create_engine(url, EngineOptions(search_path=schema))
        try:
            async with engine.begin() as conn:
                if superuser_bypass:
                    await bypass_append_only(conn)
                result = await conn.execute(text(statement))
                return [tuple(r) for r in result] if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(go())
