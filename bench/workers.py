"""Case 8: catch-up of all six projections by 1, 2 and 3 worker processes (PostgreSQL).

    python -m bench.workers --events 1000000 --workers 1,2,3 --runs 1

A seeded scenario log (bench.scenario, as case 5) is written once into a schema of
its own in the test database (``TIU_TEST_POSTGRES_URL``, dropped at the end). For
each run and worker count the read models are emptied and every checkpoint set back
to 0; then N ``projections.runner.Worker`` processes start, each connected with its
checkpoints registered before the clock starts, and are told to go at once. The
time is until the slowest checkpoint reaches the head. Leadership spreads the six
projectors over the workers (2 workers: 3 each; 3 workers: 2 each), so the speed-up
is bounded by the slowest projector's share, and by the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text, update

from bench.scenario import Scenario, fill
from eventstore import EngineOptions, EventStore, create_engine
from eventstore.dialects import LEADER_SCOPE
from eventstore.schema import projection_checkpoints
from migrations import runner as migrations
from projections import checkpoints
from projections.readmodels import ALL_PROJECTORS
from projections.runner import Worker, lowest_position

PG_URL = os.environ.get(
    "TIU_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
RESULTS = Path(__file__).resolve().parent / "results"


async def _child(
    url: str, schema: str, batch: int, catch_up: int | None, poll_interval: float
) -> None:
    engine = create_engine(url, EngineOptions(search_path=schema))
    store = EventStore(engine)
    worker = Worker(
        store,
        ALL_PROJECTORS,
        batch_size=batch,
        catch_up_batch_size=catch_up,
        poll_interval=poll_interval,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    try:
        await worker.run(stop)
    finally:
        await store.aclose()
        await engine.dispose()


async def _prepare(schema: str, events: int) -> int:
    admin = create_engine(PG_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    await admin.dispose()
    engine = create_engine(PG_URL, EngineOptions(search_path=schema))
    await migrations.upgrade(engine)
    store = EventStore(engine)
    started = time.monotonic()
    await fill(store, Scenario(seed=42), events)
    print(f"log of {events:,} events written in {time.monotonic() - started:.0f}s", flush=True)
    async with engine.connect() as conn:
        await checkpoints.ensure(conn, ALL_PROJECTORS)
        await conn.commit()
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM ANALYZE events"))
        head = await store.head_position(conn)
    await store.aclose()
    await engine.dispose()
    return head


async def _reset(engine: Any) -> None:
    tables = ", ".join(f'"{t.name}"' for p in ALL_PROJECTORS for t in p.tables)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables}"))
        await conn.execute(update(projection_checkpoints).values(position=0))
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f"VACUUM ANALYZE {tables}"))


async def _measure(
    schema: str, head: int, workers: int, batch: int, catch_up: int | None
) -> tuple[float, float]:
    engine = create_engine(PG_URL, EngineOptions(search_path=schema))
    await _reset(engine)
    procs = [await _start(schema, batch, catch_up) for _ in range(workers)]
    cpu = _children_cpu()
    started = time.monotonic()
    for proc in procs:
        await _go(proc)
    while True:
        async with engine.connect() as conn:
            if await lowest_position(conn, ALL_PROJECTORS) >= head:
                break
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        await proc.wait()
    await engine.dispose()
    return elapsed, _children_cpu() - cpu


async def _start(
    schema: str, batch: int, catch_up: int | None, poll_interval: float = 0.2
) -> asyncio.subprocess.Process:
    """A worker process, connected and waiting for :func:`_go`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.workers",
        "--child",
        "--schema",
        schema,
        "--batch",
        str(batch),
        "--poll-interval",
        str(poll_interval),
        *(["--catch-up-batch", str(catch_up)] if catch_up else []),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.strip() == b"ready", line
    return proc


async def _go(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()


async def _leaders(engine: Any) -> list[int]:
    """How many projectors each session leading any in the schema leads, most first."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.objsubid = 1 "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND ((l.classid::bigint << 32) | l.objid::bigint) IN (SELECT "
                "hashtextextended(:scope || ':' || current_schema() || ':' || n, 0) "
                "FROM unnest(CAST(:names AS text[])) n) GROUP BY l.pid ORDER BY 1 DESC"
            ),
            {"scope": LEADER_SCOPE, "names": [p.name for p in ALL_PROJECTORS]},
        )
        return [int(r[0]) for r in rows]


async def _until(engine: Any, wanted: list[int], timeout: float) -> float:
    """Seconds until the leaders' shares are ``wanted`` (polled every 10 ms)."""
    started = time.monotonic()
    while await _leaders(engine) != wanted:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"leaders {await _leaders(engine)}, wanted {wanted}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def _handover(schema: str, rounds: int, busy: bool, poll_interval: float) -> list[float]:
    """Two worker processes split the six projectors 3/3; one is SIGKILLed at a random
    moment (``busy``: while both catch up from 0, else idle at the head), and the time
    is until the survivor leads all six."""
    engine = create_engine(PG_URL, EngineOptions(search_path=schema))
    times = []
    rng = random.Random(7)
    try:
        for _ in range(rounds):
            if busy:
                await _reset(engine)
            procs = [await _start(schema, 500, None, poll_interval) for _ in range(2)]
            for proc in procs:
                await _go(proc)
            await _until(engine, [3, 3], 60)
            await asyncio.sleep(rng.uniform(0.0, 2.0))
            victim, survivor = rng.sample(procs, 2)
            victim.kill()
            taken = await _until(engine, [6], 120)
            times.append(taken)
            print(f"hand-over {'while catching up' if busy else 'at the head'}: {taken:.2f}s")
            await victim.wait()
            survivor.send_signal(signal.SIGTERM)
            await survivor.wait()
    finally:
        await engine.dispose()
    return times


def _children_cpu() -> float:
    """CPU seconds of the waited-for worker processes (the database server's not included)."""
    usage = os.times()
    return usage.children_user + usage.children_system


async def _main(
    events: int, counts: list[int], runs: int, batch: int, catch_ups: list[int | None]
) -> None:
    schema = f"bench_workers_{os.getpid()}"
    setups = [(n, c) for c in catch_ups for n in counts]
    times: dict[tuple[int, int | None], list[float]] = {s: [] for s in setups}
    cpus: dict[tuple[int, int | None], list[float]] = {s: [] for s in setups}
    try:
        head = await _prepare(schema, events)
        for _ in range(runs):  # the set-ups take turns, run by run
            for n, catch_up in setups:
                seconds, cpu = await _measure(schema, head, n, batch, catch_up)
                times[n, catch_up].append(seconds)
                cpus[n, catch_up].append(cpu)
                print(
                    f"{n} worker(s), catch-up batch {catch_up or 'default'}: {seconds:.1f}s, "
                    f"{head / seconds:,.0f} events/s, workers' CPU {cpu:.1f}s",
                    flush=True,
                )
    finally:
        admin = create_engine(PG_URL)
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    base = median(times[setups[0]])
    rows = []
    print(f"\ncatch-up of all six projections, log of {head:,} events, PostgreSQL")
    print("| workers | catch-up batch | median s | events/s | vs first | workers' CPU s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, catch_up in setups:
        took = median(times[n, catch_up])
        cpu = median(cpus[n, catch_up])
        rows.append(
            {
                "workers": n,
                "catch_up_batch": catch_up,
                "seconds": times[n, catch_up],
                "cpu": cpus[n, catch_up],
                "median": took,
                "rate": head / took,
            }
        )
        print(
            f"| {n} | {catch_up or 'default'} | {took:.1f} | {head / took:,.0f} "
            f"| {base / took:.2f}x | {cpu:.1f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "workers-latest.json"
    out.write_text(json.dumps({"events": head, "batch": batch, "rows": rows}, indent=2))


async def _handovers(events: int, rounds: int, poll_interval: float) -> None:
    schema = f"bench_handover_{os.getpid()}"
    try:
        await _prepare(schema, events)
        idle = await _handover(schema, rounds, False, poll_interval)
        busy = await _handover(schema, rounds, True, poll_interval)
    finally:
        admin = create_engine(PG_URL)
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()
    print(f"\nhand-over of a SIGKILLed worker's projectors, poll_interval {poll_interval}s")
    print("| when | rounds | min s | median s | max s |")
    print("|---|---:|---:|---:|---:|")
    for what, times in (("at the head", idle), ("catching up", busy)):
        ordered = sorted(times)
        print(
            f"| {what} | {len(times)} | {ordered[0]:.2f} | {ordered[len(ordered) // 2]:.2f} "
            f"| {ordered[-1]:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500, help="batch size at the head")
    parser.add_argument(
        "--catch-up-batch",
        default="",
        help="batch sizes while behind, compared run by run (e.g. 500,10000; default: "
        "the worker's own; with --batch 500, 500 reads batches of 500 throughout)",
    )
    parser.add_argument(
        "--handover",
        type=int,
        default=0,
        help="instead: kill one of two workers this many times, idle and catching up, "
        "and time until the other leads every projector",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="the workers' (default 0.2; 1.0 with --handover, as tiu worker)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        catch_up = int(args.catch_up_batch or 0) or None
        asyncio.run(_child(PG_URL, args.schema, args.batch, catch_up, args.poll_interval or 0.2))
        return
    if args.handover:
        asyncio.run(_handovers(args.events, args.handover, args.poll_interval or 1.0))
        return
    counts = [int(n) for n in args.workers.split(",")]
    catch_ups: list[int | None] = [int(c) for c in args.catch_up_batch.split(",") if c] or [None]
    asyncio.run(_main(args.events, counts, args.runs, args.batch, catch_ups))


if __name__ == "__main__":
    main()
