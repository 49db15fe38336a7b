"""replay (equality with live tables, resume after an interruption) and the worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from eventstore import EngineOptions, EventStore, create_engine
from projections import replay
from projections.readmodels import ALL_PROJECTORS, by_name

from .conftest import Cli, sql
from .test_cli_basics import SCRIPT


def snapshot(cli: Cli) -> dict[str, list[tuple]]:
    tables = [t.name for p in ALL_PROJECTORS for t in p.tables]
    return {name: sorted(map(repr, sql(cli, f"SELECT * FROM {name}"))) for name in tables}


def test_replay_all_equals_live_tables(cli: Cli):
    before = snapshot(cli)
    result = cli("replay", "--all", "--batch-size", "7", "--json")
    assert result.exit_code == 0, result.output
    rebuilt = json.loads(result.stdout)["rebuilt"]
    assert {r["projector"] for r in rebuilt} == {p.name for p in ALL_PROJECTORS}
    assert snapshot(cli) == before
    assert sql(cli, "SELECT count(*) FROM projection_checkpoints WHERE name LIKE '%#rebuild'") == [
        (0,)
    ]


class Interrupt(Exception):
    pass


def test_replay_resumes_after_an_interrupted_run(cli: Cli):
    before = snapshot(cli)
    url, schema = cli.args[1], (cli.args[3] if len(cli.args) > 3 else None)

    async def interrupted() -> None:
        engine = create_engine(url, EngineOptions(search_path=schema))
        store = EventStore(engine)

        def boom(progress: replay.RebuildProgress) -> None:
            raise Interrupt(progress.position)

        try:
            with pytest.raises(Interrupt):
                await replay.rebuild(store, by_name("users"), batch_size=3, on_progress=boom)
        finally:
            await store.aclose()
            await engine.dispose()

    asyncio.run(interrupted())
    assert snapshot(cli) == before  # the live tables never saw the half-built shadow
    dry = json.loads(cli("replay", "users", "--dry-run", "--json").stdout)
    assert dry["plans"][0]["resume_from"] > 0
    result = cli("replay", "users", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    assert "resuming users from position" in result.stderr
    assert snapshot(cli) == before


@pytest.mark.sqlite
def test_worker_stops_on_sigterm_and_commits_its_checkpoint(sqlite_db: Path):
    url = f"sqlite+aiosqlite:///{sqlite_db}"
    cli = Cli(["--database-url", url])
    head = sql(cli, "SELECT max(position) FROM events")[0][0]
    sql(cli, "DELETE FROM user_activity")
    sql(cli, "UPDATE projection_checkpoints SET position = 0 WHERE name = 'user_activity'")
    proc = subprocess.Popen(
        [
            str(SCRIPT),
            "worker",
            "user_activity",
            "--batch-size",
            "5",
            "--poll-interval",
            "0.1",
            "--log-interval",
            "0.2",
            "--database-url",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            position = sql(
                cli, "SELECT position FROM projection_checkpoints WHERE name = 'user_activity'"
            )[0][0]
            if position == head:
                break
            time.sleep(0.1)
        assert position == head
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "worker started: user_activity" in stderr
    assert "lag" in stderr
    assert "worker stopped" in stderr
    assert sql(cli, "SELECT count(*) FROM user_activity")[0][0] == 4
