"""One of three projector workers, and a replay, killed with SIGKILL at random points
20 times each: the read models end equal to a fresh rebuild and nothing is applied twice.
Slow (``make test-all``); the default run keeps one kill in tests/projections."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore import EventStore
from tests.projections.test_runner import (
    WorkerProcess,
    counters,
    head,
    lowest,
    rebuilt,
    schema_of,
    task_created_count,
    wait_until,
)
from tests.projections.worker_process import append_events, read_models, workload

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KILLS = 20


async def test_one_of_three_live_workers_killed_20_times_under_load_loses_and_repeats_nothing(
    engine: AsyncEngine,
):
    # Three workers run at all times: each round one of them, chosen at random, is
    # killed at a random moment and a new one starts (on PostgreSQL the survivors take
    # over its share of the projectors, then hand some to the newcomer).
    rnd = random.Random(20)
    store = EventStore(engine)
    items = workload(4000, seed=7)
    chunk = len(items) // (KILLS + 1)
    workers: list[WorkerProcess] = []
    try:
        await append_events(store, items[:chunk])
        for _ in range(3):
            workers.append(await WorkerProcess.start(engine, batch=rnd.choice([10, 40, 100])))
        for k in range(KILLS):
            appending = asyncio.create_task(
                append_events(store, items[chunk * (k + 1) : chunk * (k + 2)])
            )
            await asyncio.sleep(rnd.uniform(0.05, 0.6))
            code, err = await workers.pop(rnd.randrange(3)).finish(signal.SIGKILL)
            assert code == -signal.SIGKILL, err.decode()
            await appending
            workers.append(await WorkerProcess.start(engine, batch=rnd.choice([10, 40, 100])))
        await append_events(store, items[chunk * (KILLS + 1) :])
        top = await head(engine)
        await wait_until(lambda: _reached(engine, top), 120, "the last workers")
        for worker in workers:
            code, err = await worker.finish(signal.SIGTERM)
            assert code == 0, err.decode()
        workers.clear()
        created = await task_created_count(engine)
        assert await counters(engine) == (created, created)
        assert await read_models(engine) == await rebuilt(store)
    finally:
        for worker in workers:
            await worker.finish(signal.SIGKILL)
        await store.aclose()


async def test_a_replay_killed_20_times_resumes_and_swaps_in_a_correct_rebuild(
    engine: AsyncEngine,
):
    rnd = random.Random(21)
    store = EventStore(engine)
    try:
        await append_events(store, workload(6000, seed=8))
        live_before = await rebuilt(store)  # the live tables, correct, to compare against
        url = engine.url.render_as_string(hide_password=False)
        tiu = str(Path(sys.executable).parent / "tiu")
        args = [tiu, "replay", "--all", "--batch-size", "50"]
        args += ["--database-url", url]
        schema = await schema_of(engine)
        if schema is not None:
            args += ["--schema", schema]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for _ in range(KILLS):
            proc = await asyncio.create_subprocess_exec(
                *args,
                cwd=ROOT,
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await asyncio.sleep(rnd.uniform(0.3, 1.5))
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert await read_models(engine) == live_before
        assert await lowest(engine) == await head(engine)
    finally:
        await store.aclose()


async def _reached(engine: AsyncEngine, position: int) -> bool:
    return await lowest(engine) >= position
