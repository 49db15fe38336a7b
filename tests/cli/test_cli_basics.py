"""migrate, health, stats, demo: through CliRunner and as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from eventstore import create_engine
from migrations import runner as migrations
from tests.conftest import PG_URL

from .conftest import Cli, sql

SCRIPT = Path(sys.executable).with_name("tiu")


def tiu(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [str(SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
    )


def test_migrate_check_and_upgrade(tmp_path: Path):
    cli = Cli(["--database-url", f"sqlite+aiosqlite:///{tmp_path}/x.db"])
    missing = cli("migrate", "--check")
    assert missing.exit_code == 1
    assert "does not exist" in missing.stderr
    done = cli("migrate")
    assert done.exit_code == 0, done.output
    assert f"-> {migrations.head_revision()}" in done.stdout
    check = cli("migrate", "--check", "--json")
    assert check.exit_code == 0
    assert json.loads(check.stdout)["pending"] is False

    async def down() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
        await migrations.downgrade(engine, "0001")
        await engine.dispose()

    asyncio.run(down())
    pending = cli("migrate", "--check")
    assert pending.exit_code == 1
    assert "pending" in pending.stdout


def test_health_json_and_table(sqlite_cli: Cli):
    result = sqlite_cli("health", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["healthy"] is True
    assert report["backend"] == "sqlite"
    assert report["pending_migrations"] is False
    assert "pool" in report
    assert sqlite_cli("health").exit_code == 0


def test_bad_url_is_one_line_error():
    result = Cli(["--database-url", "mysql://x/y"])("health")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: unsupported database 'mysql'")
    assert "Traceback" not in result.output


def test_stats_flags_bumped_projector_version_and_replay_fixes_it(cli: Cli):
    fresh = json.loads(cli("stats", "--json").stdout)
    assert not any(p["needs_rebuild"] for p in fresh["projectors"].values())
    assert fresh["events_by_category"]["security"] > 0
    assert cli("replay").stdout.startswith("nothing to rebuild")
    # The live tables were built by an older version of the tasks projector.
    sql(cli, "UPDATE projection_checkpoints SET version = 0 WHERE name = 'tasks'")
    bumped = json.loads(cli("stats", "--json").stdout)
    assert bumped["projectors"]["tasks"]["needs_rebuild"] is True
    assert bumped["projectors"]["users"]["needs_rebuild"] is False
    table = cli("stats")
    assert table.exit_code == 0
    assert "needs_rebuild" in table.stdout
    dry = json.loads(cli("replay", "--dry-run", "--json").stdout)
    assert [p["projector"] for p in dry["plans"]] == ["tasks"]
    assert dry["plans"][0]["events_to_apply"] > 0
    assert dry["rebuilt"] == []
    done = cli("replay", "--json")
    assert done.exit_code == 0, done.output
    assert [r["projector"] for r in json.loads(done.stdout)["rebuilt"]] == ["tasks"]
    after = json.loads(cli("stats", "--json").stdout)
    assert after["projectors"]["tasks"]["needs_rebuild"] is False


def test_unknown_projector_is_named(sqlite_cli: Cli):
    result = sqlite_cli("replay", "nope")
    assert result.exit_code == 1
    assert "no projector 'nope'" in result.stderr


def test_demo_runs_twice_as_a_subprocess(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path}/demo.db"
    first = tiu("demo", "--database-url", url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "fresh file each run" in first.stdout
    assert "bcrypt rounds lowered to 4" in first.stdout
    assert "AccountLocked" in first.stdout
    assert "is archived" in first.stdout
    assert "account_failures" in first.stdout
    second = tiu("demo", "--database-url", url, "--json", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "deleted the previous demo database" in second.stderr
    summary = json.loads(second.stdout)
    assert summary["verified"] is True
    assert summary["seconds"] < 10
    verify = tiu("verify", "--database-url", url)
    assert verify.returncode == 0
    assert " ok" in verify.stdout


def test_demo_never_deletes_a_database_it_did_not_create(sqlite_cli: Cli, tmp_path: Path):
    sqlite_cli("migrate")
    url = sqlite_cli.args[sqlite_cli.args.index("--database-url") + 1]
    path = Path(url.removeprefix("sqlite+aiosqlite:///"))
    before = path.read_bytes()
    result = Cli([])("demo", "--database-url", url)
    assert result.exit_code == 1
    assert "not a demo database" in result.stderr
    assert path.read_bytes() == before


def test_demo_refuses_postgres():
    result = Cli([])("demo", "--database-url", "postgresql+asyncpg://u@h/db")
    assert result.exit_code == 1
    assert "SQLite file" in result.stderr


@pytest.mark.parametrize("command", ["verify", "stats", "audit"])
def test_missing_sqlite_file_is_reported(tmp_path: Path, command: str):
    result = Cli(["--database-url", f"sqlite+aiosqlite:///{tmp_path}/none.db"])(command)
    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_forget_erases_a_person_and_verify_still_passes(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path}/demo.db"
    assert tiu("demo", "--database-url", url, cwd=tmp_path).returncode == 0
    forgot = tiu("forget", "linus@example.com", "--database-url", url, "--json")
    assert forgot.returncode == 0, forgot.stderr
    user_id = json.loads(forgot.stdout)["user_id"]
    again = tiu("forget", user_id, "--database-url", url)
    assert again.returncode == 0, again.stderr  # forgetting twice is harmless
    assert tiu("verify", "--database-url", url).returncode == 0
    raw = (tmp_path / "demo.db").read_bytes()
    assert b"linus@example.com" not in raw


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "archive"],  # a required option missing
        ["audit", "--bogus"],  # an unknown option
        ["no-such-command"],
        ["audit", "--limit", "many"],  # a value of the wrong type
        ["audit", "--limit", "0"],  # out of the option's range
    ],
)
def test_usage_errors_print_one_error_line_and_exit_1(sqlite_cli: Cli, argv):
    result = sqlite_cli(*argv)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    assert "--help" in result.stderr
    assert "╭" not in result.output  # no usage box


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "--since", "9999999d"],
        ["audit", "--until", "99999999999999999999999999w"],
        ["audit", "--suspicious", "--window", "99999999999999d"],
        ["audit", "--suspicious", "--lockout-lookback", "9" * 5000 + "s"],
        ["audit", "--suspicious", "--since", "0001-01-01T00:00", "--window", "1000w"],
        ["audit", "archive", "--before", "9999999d"],
    ],
)
def test_times_and_durations_out_of_range_are_one_error_line(cli: Cli, argv):
    result = cli(*argv)
    assert result.exit_code in (0, 1)
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        assert result.stderr.startswith("error: ")
        assert result.stderr.count("\n") == 1


def test_a_driver_error_is_said_in_the_drivers_words_not_sqlalchemys(sqlite_db: Path):
    sqlite_db.write_text("not a database")
    result = Cli(["--database-url", f"sqlite+aiosqlite:///{sqlite_db}"])("stats")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "file is not a database" in result.stderr
    assert "sqlalchemy" not in result.stderr.lower()
    assert "sqlalche.me" not in result.stderr


@pytest.mark.postgres
def test_health_reports_a_missing_postgres_database_without_the_driver_wrapper():
    url = make_url(PG_URL).set(database="tiu_no_such_db").render_as_string(hide_password=False)
    result = Cli(["--database-url", url])("health", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert "tiu_no_such_db" in error
    assert "sqlalchemy" not in error.lower()
