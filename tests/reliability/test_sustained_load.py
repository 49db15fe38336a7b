"""Sustained load: mixed commands and queries from 8 callers for 5 minutes (set
TIU_SOAK_SECONDS to change it) with a projection worker running. Only expected domain
refusals occur, memory stays flat, and the projectors' lag stays bounded. Slow:
``make test-all``."""

from __future__ import annotations

import asyncio
import os
import random
import resource
import time
import tracemalloc
from dataclasses import replace

import pytest

from domain.errors import DomainError
from domain.passwords import BcryptHasher
from eventstore import EngineOptions, create_engine
from tests.conftest import PASSWORD, PG_URL, _empty_schema
from tiu import DatabaseService, Settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SECONDS = float(os.environ.get("TIU_SOAK_SECONDS", "300"))


async def test_mixed_load_with_a_worker_runs_clean_with_flat_memory_and_bounded_lag(pg_schema):
    engine = create_engine(PG_URL, replace(EngineOptions(pool_size=12), search_path=pg_schema))
    await _empty_schema(engine, pg_schema)
    service = DatabaseService(
        Settings(database_url=PG_URL, bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        projection_mode="worker",
    )
    await service.start(migrate=False, run_worker=True)
    refusals: dict[str, int] = {}
    operations = 0
    lags: list[int] = []
    memory: list[int] = []
    stop = time.monotonic() + SECONDS

    async def caller(n: int) -> None:
        nonlocal operations
        rnd = random.Random(n)
        async with service.get_repositories() as repos:
            me = await repos.users.create_user(
                email=f"soak{n}@example.com", username=f"soak{n}", password=PASSWORD
            )
        async with service.get_repositories(actor_id=me.id) as repos:
            project = await repos.projects.create_project(f"Soak {n}", visibility="public")
            task_ids: list[str] = []
            while time.monotonic() < stop:
                roll = rnd.random()
                try:
                    if roll < 0.35 or not task_ids:
                        task = await repos.tasks.create_task(project.id, f"t{operations}")
                        task_ids.append(task.id)
                    elif roll < 0.6:
                        status = rnd.choice(["in_progress", "review", "done", "todo", "cancelled"])
                        await repos.tasks.update_task_status(rnd.choice(task_ids), status)
                    elif roll < 0.8:
                        await repos.tasks.list_tasks({"status": "todo"}, limit=50)
                        await repos.projects.get_project_statistics(project.id)
                    elif roll < 0.9:
                        started = await repos.sessions.create_session(
                            f"soak{n}@example.com", PASSWORD
                        )
                        await repos.sessions.validate_session(started.token)
                    else:
                        await repos.projects.search_projects("Soak", limit=20)
                except DomainError as refused:  # illegal transitions are expected
                    refusals[type(refused).__name__] = refusals.get(type(refused).__name__, 0) + 1
                operations += 1

    async def monitor() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(max(1.0, SECONDS / 30))
            stats = await service.get_statistics()
            lags.append(stats["max_lag"])
            memory.append(tracemalloc.get_traced_memory()[0])

    tracemalloc.start()
    try:
        await asyncio.gather(*(caller(n) for n in range(8)), monitor())
    finally:
        tracemalloc.stop()
        await service.aclose()
    assert operations > 100
    assert set(refusals) <= {"IllegalTransition"}, refusals
    assert max(lags) < 5_000, lags  # bounded: the worker keeps up
    settled = memory[len(memory) // 3 :]
    assert max(settled) < 1.5 * min(settled) + 5_000_000, memory  # flat after warm-up
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"soak: {operations} operations in {SECONDS:.0f}s, refusals {refusals}, "
        f"lag max {max(lags)}, traced memory {min(settled)}..{max(settled)} bytes, "
        f"peak RSS {peak_rss_mb:.0f} MiB"
    )
