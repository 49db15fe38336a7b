"""Case 9: an embedded service, its event loop watched by a probe.

One process of its own (``make bench`` starts it) holds a ``DatabaseService`` on a
generated log (1,000,000 events on SQLite, 300,000 on PostgreSQL; 20,000 with
``--quick``; 1% of them failed logins or lockouts) with its read models built, and
serves, while :class:`bench.probe.LoopProbe` wakes every 1 ms:

* ``commands x8``: ``create_task`` from 8 concurrent callers (25 each);
* ``logins x8``: ``authenticate`` at bcrypt cost 12 from 8 concurrent callers (2 each),
  ``login x1`` one caller (4 in a row);
* admin queries over every task (the system actor): ``contains`` filter, ``in`` filter
  at a deep offset, count, count by status;
* audit: ``get_events(types=[LoginFailed], limit=10000)``, ``stats``, ``suspicious``
  (also at 100,000 events while the log grows, for the memory comparison);
* ``replay tasks``: a rebuild of the tasks read model as a host triggers one
  (``service.rebuild("tasks")``, as ``DatabaseService.start`` runs one: in a child
  process, whose CPU time the operation's CPU column does not count);
* ``mixed``: all of the above at once.

Each operation runs alone first (its lag is its own), then all together. Reported per
operation: duration and the process's CPU time, the probe's max and p99 lateness while
it ran, and the process's
peak RSS during it (``VmHWM``, reset before each operation), the share of the time
the loop thread was runnable but waited for a core (another process's load: where it
is above a few percent, the lag measures the machine too), and the write lock's
hold per command transaction while it ran (``service.dispatcher.lock_times``: p99 and
max, on SQLite from ``BEGIN IMMEDIATE`` to the end of COMMIT).

    python -m bench --cases 9 --backends sqlite --runs 1
    python -m bench.cases.service --backend sqlite --events 200000   # alone, own JSON
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import Config, Place, Result, Workspace, pg_create_database, pg_drop_database
from bench.context import RESULTS, Context
from bench.probe import LoopProbe, peak_rss_mb, reset_peak_rss, summarize
from bench.scenario import Scenario, fill
from domain.passwords import BcryptHasher
from domain.permissions import SYSTEM_ACTOR
from eventstore.store import EventStore
from projections import replay
from projections.readmodels import ALL_PROJECTORS
from tiu import DatabaseService, InvalidCredentials, Settings
from tiu.dispatch import WriteLockTimes

SIZES = {"sqlite": 1_000_000, "postgresql": 300_000}
QUICK = 20_000
MEMORY_POINT = 100_000
PASSWORD = "violet-harbour-lantern-42"
CALLERS = 8


class _Run:
    def __init__(self, probe: LoopProbe) -> None:
        self.probe = probe
        self.rows: list[dict[str, Any]] = []
        self.lock_times: WriteLockTimes | None = None  # the service's, once it runs

    async def measure(self, label: str, items: int, work: Callable[[], Awaitable[Any]]) -> None:
        await self.probe.settle()
        reset_peak_rss()
        if self.lock_times is not None:
            self.lock_times.clear()
        mark = self.probe.mark()
        started, cpu = time.perf_counter(), time.process_time()
        await work()
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        await self.probe.settle()
        lag = self.probe.since(mark)
        stalls = self.probe.tracer.since(mark[1]) if self.probe.tracer is not None else []
        row = {
            "operation": label,
            "seconds": round(seconds, 4),
            "cpu_seconds": round(cpu, 4),
            "items": items,
            **lag.as_dict(),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            **self._lock_hold(),
        }
        self.rows.append(row)
        print(
            f"    {label:34} {seconds:8.3f}s ({cpu:6.3f}s CPU)  lag max {lag.max_ms:7.1f} ms"
            f"  p99 {lag.p99_ms:6.1f} ms (waiting for a core {lag.waiting_for_core:4.0%})"
            f"  longest gc {lag.gc_max_ms:6.1f} ms"
            f" ({lag.gc_cpu_max_ms:5.1f} ms CPU{', ' + lag.gc_where if lag.gc_where else ''})"
            f"  peak RSS {row['peak_rss_mb']:7.1f} MB"
            f"  write lock p99 {row['write_lock_p99_ms']} ms"
            f" (a command's share {row['write_lock_per_command_p99_ms']} ms)",
            flush=True,
        )
        if stalls:
            print(summarize(stalls), flush=True)

    def _lock_hold(self) -> dict[str, float | None]:
        """The write lock's hold per transaction (p99, max), and its share per command
        (a group's hold divided by its commands, one sample per command: p99)."""
        samples = list(self.lock_times.samples) if self.lock_times else []
        if not samples:
            return {
                "write_lock_p99_ms": None,
                "write_lock_max_ms": None,
                "write_lock_per_command_p99_ms": None,
            }
        held = sorted(s for s, _ in samples)
        shares = sorted(s / n for s, n in samples if n for _ in range(n))
        return {
            "write_lock_p99_ms": round(_p99(held) * 1000, 3),
            "write_lock_max_ms": round(held[-1] * 1000, 3),
            "write_lock_per_command_p99_ms": round(_p99(shares) * 1000, 3) if shares else None,
        }


def _p99(ordered: list[float]) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _audit(service: DatabaseService, run: _Run, suffix: str = "") -> None:
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        audit = repos.audit
        await run.measure(
            f"audit get_events LoginFailed{suffix}",
            1,
            lambda: audit.get_events(event_types=["LoginFailed"], limit=10_000),
        )
        await run.measure(f"audit stats{suffix}", 1, audit.stats)
        await run.measure(f"audit suspicious{suffix}", 1, audit.suspicious)


async def _serve(
    place: Place,
    n: int,
    *,
    freeze_gc: bool = False,
    trace_over: float | None = None,
    log_cache: Path | None = None,
) -> list[dict[str, Any]]:
    cached = log_cache / f"service-sqlite-{n}.db" if log_cache and not place.postgres else None
    reused = cached is not None and cached.exists()
    if reused:  # the log and read models of an earlier run (no audit at 100k then)
        assert cached is not None
        await place.reset()
        shutil.copyfile(cached, place.sqlite_path)
    store = await place.store()
    settings = Settings(database_url=place.url(), bcrypt_rounds=12)
    rows: list[dict[str, Any]] = []
    async with LoopProbe(trace_over=trace_over) as probe:
        run = _Run(probe)
        if not reused:
            await _build(store, settings, run, n)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                _backup(place.sqlite_path, cached)
        service = DatabaseService(settings, engine=store.engine, hasher=BcryptHasher(rounds=12))
        await service.start(migrate=False)
        # A full collection visits every object the GC tracks: its length (the probe's
        # "longest gc") grows with the process's heap, whoever's objects they are.
        print(f"    objects tracked by the GC: {len(gc.get_objects()):,}", flush=True)
        if freeze_gc:  # what a host may do after start-up: later collections skip these
            gc.freeze()
        run.lock_times = service.dispatcher.lock_times
        try:
            await _operations(service, run)
        finally:
            await service.store.aclose()
        rows = run.rows
    await store.engine.dispose()
    return rows


async def _build(store: EventStore, settings: Settings, run: _Run, n: int) -> None:
    """Generate the log (the audit measured at 100,000 events on the way) and build
    the read models."""
    scenario = Scenario(failed_logins=0.01)
    first = min(n, MEMORY_POINT)
    started = time.monotonic()
    await fill(store, scenario, first, sealed=True)
    if n > MEMORY_POINT:  # the audit at 100k, for the memory comparison with n
        early = DatabaseService(settings, engine=store.engine)
        await _audit(early, run, f" @{first:,}")
        await fill(store, scenario, n - first, sealed=True)
    # The generator's state (one entry per stream) is not the service's: a host
    # holding a million objects more would lengthen every full collection.
    del scenario
    gc.collect()
    print(f"    log of {n:,} events in {time.monotonic() - started:.0f}s", flush=True)
    started = time.monotonic()
    await replay.rebuild_all(store, ALL_PROJECTORS)
    print(f"    read models built in {time.monotonic() - started:.0f}s", flush=True)


def _backup(source: Path, target: Path) -> None:
    """A consistent copy of the SQLite file (its WAL folded in)."""
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


async def _operations(service: DatabaseService, run: _Run) -> None:
    async with service.get_repositories() as repos:
        owner = await repos.users.create_user(
            email="owner@bench.example", username="bench-owner", password=PASSWORD
        )
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Bench", "embedded service")

    async def commands() -> None:
        async def caller(c: int) -> None:
            async with service.get_repositories(actor_id=owner.id) as repos:
                for i in range(25):
                    await repos.tasks.create_task(project.id, f"caller {c} task {i}")

        await asyncio.gather(*(caller(c) for c in range(CALLERS)))

    async def login(times: int) -> None:
        async with service.get_repositories(ip="192.0.2.1") as repos:
            for _ in range(times):
                await repos.users.authenticate("owner@bench.example", PASSWORD)

    async def logins() -> None:
        await asyncio.gather(*(login(2) for _ in range(CALLERS)))

    async def wrong_password() -> None:
        async with service.get_repositories(ip="192.0.2.66") as repos:
            with contextlib.suppress(InvalidCredentials):
                await repos.users.authenticate("nobody@bench.example", "not-the-password")

    async def admin_queries() -> None:
        async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
            total = await repos.tasks.count_tasks()
            await repos.tasks.list_tasks({"title__contains": "999"}, limit=50)
            await repos.tasks.list_tasks(
                {"status__in": ["todo", "review"]}, limit=50, offset=total // 2
            )
            await repos.tasks.count_tasks({"status": "done"})

    async def rebuild() -> None:
        await service.rebuild("tasks")

    # The machine's own noise: the probe alone (a shared machine delays wakes too).
    await run.measure("idle: the probe alone for 1 s", 0, lambda: asyncio.sleep(1))
    await run.measure(f"commands x{CALLERS} (create_task)", CALLERS * 25, commands)
    await run.measure("login x1 (bcrypt 12)", 4, lambda: login(4))
    await run.measure(f"logins x{CALLERS} (bcrypt 12)", CALLERS * 2, logins)
    await run.measure("failed login, unknown email", 1, wrong_password)
    await run.measure("admin list/count over all tasks", 4, admin_queries)
    await _audit(service, run)
    await run.measure("replay tasks in the service", 1, rebuild)

    async def audit_all() -> None:
        async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
            await repos.audit.get_events(event_types=["LoginFailed"], limit=10_000)
            await repos.audit.stats()
            await repos.audit.suspicious()

    async def mixed() -> None:
        await asyncio.gather(commands(), logins(), admin_queries(), audit_all(), rebuild())

    await run.measure("mixed: all of the above at once", 1, mixed)


def _results(backend: str, n: int, rows: list[dict[str, Any]]) -> list[Result]:
    out = []
    for row in rows:
        note = (
            f"lag max {row['max_ms']} ms, p99 {row['p99_ms']} ms, "
            f"peak RSS {row['peak_rss_mb']} MB, write-lock hold p99 "
            + (f"{held} ms" if (held := row.get("write_lock_p99_ms")) is not None else "n/a")
        )
        out.append(
            Result(
                f"9 service {n:,}: {row['operation']}",
                backend,
                "tiu",
                "s",
                row["seconds"],
                row["seconds"],
                row["seconds"],
                1,
                row["items"],
                "ops/s",
                note,
                row,
            )
        )
    return out


async def case9(ctx: Context) -> list[Result]:
    """The service in a process of its own, as a host runs it: in the bench's process,
    every earlier case's leftovers were in the heap a full garbage collection walks
    (147-287k objects tracked at the service's start, against 111-133k alone)."""
    n = QUICK if ctx.cfg.quick else SIZES[ctx.backend]
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.cases.service",
            "--backend",
            ctx.backend,
            "--events",
            str(n),
            "--sqlite-synchronous",
            ctx.cfg.sqlite_synchronous,
            "--rows",
            str(rows_file),
            # A database of its own on PostgreSQL (named after its pid, as the bench's).
            env={k: v for k, v in os.environ.items() if k != "BENCH_PG_DB"},
        )
        if await child.wait() != 0:
            raise RuntimeError(f"case 9's service process ended with {child.returncode}")
        rows = json.loads(rows_file.read_text())["rows"]
    return _results(ctx.backend, n, rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cases.service")
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--events", type=int, default=QUICK)
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once the service has started, as a host may (longest gc shrinks)",
    )
    parser.add_argument(
        "--trace-stalls",
        type=float,
        metavar="MS",
        help="sample the loop thread's stack while the probe is more than MS late; "
        "print each operation's longest stalls with their most frequent stacks",
    )
    parser.add_argument(
        "--log-cache",
        type=Path,
        metavar="DIR",
        help="SQLite: keep the generated log with its read models in DIR and reuse it "
        "in later runs of the same size (no audit at 100,000 events then)",
    )
    parser.add_argument("--sqlite-synchronous", default="NORMAL")
    parser.add_argument(
        "--rows", type=Path, metavar="FILE", help="write the JSON there (else bench/results)"
    )
    args = parser.parse_args()
    cfg = Config(
        quick=True,
        runs=1,
        backends=(args.backend,),
        sqlite_synchronous=args.sqlite_synchronous,
    )
    ws = Workspace(cfg)

    async def go() -> list[dict[str, Any]]:
        if args.backend == "postgresql":
            await pg_create_database()
        try:
            ctx = Context(cfg, ws, args.backend)
            await ctx.fresh()
            return await _serve(
                ctx.place("tiu"),
                args.events,
                freeze_gc=args.gc_freeze,
                trace_over=args.trace_stalls / 1000 if args.trace_stalls else None,
                log_cache=args.log_cache,
            )
        finally:
            if args.backend == "postgresql":
                await pg_drop_database()

    try:
        rows = asyncio.run(go())
    finally:
        ws.cleanup()
    if args.rows is not None:
        path = args.rows
    else:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        frozen = "-gc-frozen" if args.gc_freeze else ""
        path = RESULTS / f"service-{args.backend}-{args.events}{frozen}-{stamp}.json"
    path.write_text(json.dumps({"backend": args.backend, "events": args.events, "rows": rows}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
