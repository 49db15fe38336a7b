"""Every Python block in the README runs as written: on a temporary SQLite file, and a
block that reads ``TIU_DATABASE_URL`` (the tenants' example: PostgreSQL only) with it
set to a database of its own, created for the run and dropped afterwards."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url, text

from eventstore import create_engine
from tests.conftest import PG_URL

ROOT = Path(__file__).resolve().parents[2]
#: What a block reads to be given a PostgreSQL database.
NEEDS_POSTGRES = "TIU_DATABASE_URL"


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def run_block(block: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = cwd / "example.py"
    script.write_text(block)
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
        check=False,
    )


@pytest.fixture
def pg_database(pg_schema: str) -> Iterator[str]:
    """The URL of an empty PostgreSQL database, dropped afterwards (pg_schema: reachable)."""
    name = f"tiu_readme_{os.getpid()}_{secrets.token_hex(3)}"

    async def admin(statement: str) -> None:
        engine = create_engine(PG_URL)
        try:
            async with engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text(statement))
        finally:
            await engine.dispose()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_the_readme_has_python_examples():
    blocks = python_blocks()
    assert [b for b in blocks if NEEDS_POSTGRES not in b]
    assert [b for b in blocks if NEEDS_POSTGRES in b]


def test_every_readme_python_example_runs(tmp_path):
    for block in python_blocks():
        if NEEDS_POSTGRES in block:
            continue
        done = run_block(block, tmp_path, {})
        assert done.returncode == 0, done.stderr
        if "refused, and the attempt is in the audit trail" in block:
            assert "refused, and the attempt is in the audit trail" in done.stdout


def test_the_readme_tenants_example_runs_on_postgresql(tmp_path, pg_database):
    (block,) = [b for b in python_blocks() if NEEDS_POSTGRES in b]
    done = run_block(block, tmp_path, {NEEDS_POSTGRES: pg_database})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["each tenant has its own users", "['acme', 'globex']"]
