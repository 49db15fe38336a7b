"""PostgreSQL restarted under load: every acknowledged command survives, nothing is
half-written, the service recovers by itself, health goes red and back to green, and
the worker resumes. Slow and disruptive (it restarts the server): ``make test-all``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select

from domain.passwords import BcryptHasher
from eventstore import EngineOptions, StoreUnavailable, create_engine
from eventstore.schema import events
from tests.conftest import PASSWORD, PG_URL, _empty_schema
from tiu import DatabaseService, Settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _restart_postgres() -> None:
    version = sorted(Path("/etc/postgresql").iterdir())[-1].name
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.skipif(not Path("/etc/postgresql").is_dir(), reason="no local cluster to restart")
@pytest.mark.skipif(os.geteuid() != 0, reason="restarting the cluster needs root")
async def test_acknowledged_commands_survive_a_postgres_restart(pg_schema):
    engine = create_engine(
        PG_URL, replace(EngineOptions(pool_size=8, pool_timeout=5), search_path=pg_schema)
    )
    await _empty_schema(engine, pg_schema)
    service = DatabaseService(
        Settings(database_url=PG_URL, bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        projection_mode="worker",
    )
    await service.start(migrate=False, run_worker=True)
    async with service.get_repositories() as repos:
        owner = await repos.users.create_user(
            email="load@example.com", username="load", password=PASSWORD
        )
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Load")

    acknowledged: list[str] = []
    unavailable = 0
    health: list[bool] = []
    stop = time.monotonic() + 12

    async def caller(n: int) -> None:
        nonlocal unavailable
        k = 0
        while time.monotonic() < stop:
            k += 1
            task_id = f"c{n}-{k}"
            try:
                async with service.get_repositories(actor_id=owner.id) as repos:
                    await repos.tasks.create_task(project.id, f"T {task_id}", task_id=task_id)
            except StoreUnavailable:
                unavailable += 1
                await asyncio.sleep(0.1)
            else:
                acknowledged.append(task_id)

    async def watch_health() -> None:
        while time.monotonic() < stop + 5:
            health.append((await service.health_check())["healthy"])
            await asyncio.sleep(0.05)  # a restart can take well under a second

    async def restart_midway() -> None:
        await asyncio.sleep(4)
        await asyncio.to_thread(_restart_postgres)

    await asyncio.gather(*(caller(n) for n in range(8)), watch_health(), restart_midway())

    assert acknowledged, "no command got through"
    assert unavailable, "the restart was not noticed"
    assert False in health and health[-1] is True
    async with service.get_repositories(actor_id=owner.id) as repos:
        # the service recovered without being rebuilt, and the worker resumed
        await repos.tasks.create_task(project.id, "after the restart", task_id="after")
        stats = await service.get_statistics()
    async with engine.connect() as conn:
        created = set(
            (
                await conn.execute(
                    select(events.c.stream_id).where(events.c.event_type == "TaskCreated")
                )
            ).scalars()
        )
        per_command = await conn.execute(
            select(events.c.command_id, func.count()).group_by(events.c.command_id)
        )
        assert all(count == 1 for _, count in per_command)  # one event each: none half-written
    assert {f"task-{t}" for t in acknowledged} <= created  # none acknowledged is lost
    assert stats["max_lag"] == 0
    await service.aclose()
