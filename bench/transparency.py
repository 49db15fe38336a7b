"""Bench 8: the Merkle tree and signed checkpoints (issue #23), on its own.

    python -m bench.transparency                       # 1M events, SQLite and PostgreSQL
    python -m bench.transparency --events 50000 --backends sqlite --appends 1000

Per backend, on a log of the seeded scenario (bench.scenario):

* **append cost with the tree maintained**: single-event appends (``EventStore.append``,
  new streams) with the worker's Merkle step running beside them in its own process
  (``transparency.keep_up``: the tree grown and a checkpoint signed every 1,000 events)
  against the same appends without it; the two take turns in alternating order, and the
  median of the pairs' ratios is reported (target: at most 1.05), with the appends' CPU
  time with and without, and the keeper's CPU time an event;
* **checkpoint time**: the first ``tiu checkpoint`` of the whole log (the tree built
  from nothing), then one after 1,000 more events;
* **proof size**: the inclusion proof of the first, a middle and the last event, and the
  consistency proof from half the log to all of it (hashes and bytes: O(log n));
* **verify throughput**: ``verify(checkpoint=...)`` of the whole log in child processes
  (``processes=None``, as ``tiu verify``: one per CPU) and in this process (the default,
  ``processes=1``: a worker thread),
  taking turns, the better of two runs each: events/s (target on SQLite at 1M: at
  least 200,000/s), CPU time per event (this process, every thread, and the children:
  the stable figures on a shared machine), and how late a 1 ms loop probe woke
  meanwhile (bench.probe: max, p99, longest garbage collection; target max 20 ms).

Results print as a table and land in ``bench/results/transparency-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SEED = 23
PG_DB = "tiu_bench_transparency"

# verify's child processes (``spawn``) run this main module's top level again (as
# ``__mp_main__``) before their range: there it imports nothing, as the children of
# ``tiu verify`` import only its light ``tiu.cli``, so a child starts here as it does
# there (importing the bench's dependencies cost each ~0.4 s of CPU more).
if __name__ != "__mp_main__":
    from bench.common import pg_execute, pg_url
    from bench.probe import LoopProbe
    from bench.scenario import Scenario, fill
    from eventstore import (
        EngineOptions,
        EventStore,
        NewEvent,
        create_engine,
        merkle,
        transparency,
        verify,
    )
    from migrations import runner

    KEY = transparency.SigningKey.generate("bench.example/tiu")


async def _appends(store: EventStore, n: int, tag: str) -> float:
    start = time.perf_counter()
    for i in range(n):
        await store.append(f"task-{tag}{i}", "task", [NewEvent("Noted", {"i": i})])
    return time.perf_counter() - start


async def _keeper(url: str, schema: str | None, key: str) -> None:
    """The worker's Merkle step alone (``tiu worker`` runs it beside the projectors),
    until SIGTERM; prints its CPU time when ready and when it stops."""
    engine = create_engine(url, EngineOptions(search_path=schema))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with engine.connect() as conn:
        await transparency.status(conn)
    print("ready", time.process_time(), flush=True)
    try:
        await transparency.keep_up(
            engine, transparency.SigningKey.parse(key), stop, every=1000, interval=1.0
        )
    finally:
        await engine.dispose()
        print("done", time.process_time(), flush=True)


async def _keeper_run(store: EventStore, url: str, n: int, tag: str) -> tuple[float, float, float]:
    """``n`` appends with the Merkle step running in a process of its own: (wall s, this
    process's CPU s, the keeper's CPU s while it ran, start-up excluded)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.transparency", "--keeper", url, "-",
        KEY.encoded(), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None
    ready = float((await child.stdout.readline()).split()[1])  # imported, connected
    await asyncio.sleep(0.5)
    cpu = time.process_time()
    wall = await _appends(store, n, tag)
    cpu = time.process_time() - cpu
    child.send_signal(signal.SIGTERM)
    done = float((await child.stdout.readline()).split()[1])
    await child.wait()
    return wall, cpu, done - ready


async def append_cost(engine: Any, n: int, runs: int) -> dict[str, Any]:
    """Appends with and without the Merkle step running in its own process, as ``tiu
    worker`` does. The two take turns, in alternating order (ABBA...), so a drift in the
    machine's load weighs on both; each pair's ratio is kept, and their median is the
    figure (on a shared machine, the ratio of medians moves with the load between
    runs). CPU times: this process's (the appends'), and the keeper's while it ran."""
    store = EventStore(engine)
    url = engine.url.render_as_string(hide_password=False)
    plain: list[tuple[float, float]] = []
    kept: list[tuple[float, float, float]] = []
    try:
        await _appends(store, 200, "warm")
        await transparency.write_checkpoint(engine, KEY)
        for run in range(runs):
            order = ("plain", "kept") if run % 2 == 0 else ("kept", "plain")
            for which in order:
                await transparency.write_checkpoint(engine, KEY)  # both start level
                if which == "plain":
                    cpu = time.process_time()
                    wall = await _appends(store, n, f"p{run}-")
                    plain.append((wall, time.process_time() - cpu))
                else:
                    kept.append(await _keeper_run(store, url, n, f"k{run}-"))
    finally:
        await store.aclose()
    ratios = [k[0] / p[0] for p, k in zip(plain, kept, strict=True)]
    without = statistics.median(p[0] for p in plain)
    with_tree = statistics.median(k[0] for k in kept)
    return {
        "appends": n,
        "runs": runs,
        "without_tree_per_s": n / without,
        "with_tree_per_s": n / with_tree,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "ratio_of_medians": with_tree / without,
        "append_cpu_us_without": 1e6 * statistics.median(p[1] for p in plain) / n,
        "append_cpu_us_with": 1e6 * statistics.median(k[1] for k in kept) / n,
        "keeper_cpu_us_per_event": 1e6 * statistics.median(k[2] for k in kept) / n,
    }


async def measure(
    engine: Any, events: int, appends: int, runs: int, *, append_only: bool = False
) -> dict[str, Any]:
    await runner.upgrade(engine)
    if append_only:
        return {"append": await append_cost(engine, appends, runs)}
    store = EventStore(engine)
    started = time.perf_counter()
    await fill(store, Scenario(SEED), events)
    await store.aclose()
    filled = time.perf_counter() - started

    start = time.perf_counter()
    first = await transparency.write_checkpoint(engine, KEY)
    first_s = time.perf_counter() - start
    store = EventStore(engine)
    await fill(store, Scenario(SEED + 1), 1000)
    await store.aclose()
    start = time.perf_counter()
    second = await transparency.write_checkpoint(engine, KEY)
    incremental_s = time.perf_counter() - start

    async with engine.connect() as conn:
        sizes = {}
        for position in (1, second.size // 2, second.size):
            proof = await merkle.inclusion_proof(conn, position - 1, second.size)
            sizes[f"inclusion@{position}"] = len(proof)
        consistency = await merkle.consistency_proof(conn, second.size // 2, second.size)
        sizes["consistency half->all"] = len(consistency)

    # In this process (one worker thread) and in child processes (one per CPU), taking
    # turns (ABBA), so a drift in the machine's load weighs on both.
    turns: dict[str, list[dict[str, Any]]] = {"thread": [], "processes": []}
    for way in ("thread", "processes", "processes", "thread"):
        turns[way].append(await _verify_run(engine, second, 1 if way == "thread" else None))
    verified = {way: min(rs, key=lambda r: r["verify_s"]) for way, rs in turns.items()}
    return {
        "events": second.size,
        "fill_s": filled,
        "checkpoint_first_s": first_s,
        "checkpoint_first_size": first.size,
        "checkpoint_after_1000_s": incremental_s,
        "proof_hashes": sizes,
        "proof_bytes_max": 32 * max(sizes.values()),
        # The better of two runs each way; "processes" is what `tiu verify` does.
        "verify": verified,
        "append": await append_cost(engine, appends, runs),
    }


async def _verify_run(engine: Any, checkpoint: Any, processes: int | None) -> dict[str, Any]:
    """One ``verify(checkpoint=...)`` of the whole log: its rate, the CPU time an event of
    this process (every thread) and of the child processes (joined when it returns),
    and how late a 1 ms loop probe woke meanwhile."""
    async with LoopProbe() as probe:
        await probe.settle()
        mark = probe.mark()
        start = time.perf_counter()
        cpu = time.process_time()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        async with engine.connect() as conn:
            report = await verify(conn, checkpoint=checkpoint, processes=processes)
        verify_s = time.perf_counter() - start
        cpu = time.process_time() - cpu
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        child_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
        await probe.settle()
        lag = probe.since(mark)
    assert report.ok, report.broken
    return {
        "processes": report.processes,
        "verify_s": verify_s,
        "verify_events_per_s": report.events / verify_s,
        "verify_cpu_us_per_event": 1e6 * cpu / report.events,
        "children_cpu_us_per_event": 1e6 * child_cpu / report.events,
        # The loop's lateness (bench.probe): max, p99, and the longest garbage
        # collection meanwhile (it stops every thread; its length is the whole heap's).
        "verify_loop": lag.as_dict(),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for backend in args.backends.split(","):
        if backend == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                engine = create_engine(f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}")
                try:
                    results[backend] = await measure(
                        engine, args.events, args.appends, args.runs, append_only=args.append_only
                    )
                finally:
                    await engine.dispose()
        else:
            # A database of its own: other benches create and drop bench.common's.
            await pg_execute(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
            await pg_execute(f'CREATE DATABASE "{PG_DB}"')
            engine = create_engine(pg_url(PG_DB))
            try:
                results[backend] = await measure(
                    engine, args.events, args.appends, args.runs, append_only=args.append_only
                )
            finally:
                await engine.dispose()
                if not args.keep:
                    await pg_execute(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument(
        "--append-only", action="store_true", help="Measure the append cost alone (no log)."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the PostgreSQL database.")
    parser.add_argument(
        "--keeper", nargs=3, metavar=("URL", "SCHEMA", "KEY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.keeper:
        url, schema, key = args.keeper
        asyncio.run(_keeper(url, None if schema == "-" else schema, key))
        return
    results = asyncio.run(main_async(args))
    for backend, r in results.items():
        a = r["append"]
        line = f"{backend}: "
        if "events" in r:
            line += (
                f"{r['events']} events | first checkpoint {r['checkpoint_first_s']:.2f}s, "
                f"after 1000 more {r['checkpoint_after_1000_s'] * 1000:.0f}ms | proofs "
                f"{r['proof_hashes']} (max {r['proof_bytes_max']} bytes) | "
            )
            for way, v in r["verify"].items():
                line += (
                    f"verify in {way} ({v['processes']}): {v['verify_events_per_s']:,.0f} ev/s "
                    f"({v['verify_s']:.1f}s; CPU/event {v['verify_cpu_us_per_event']:.1f} us "
                    f"here + {v['children_cpu_us_per_event']:.1f} us children), loop late by "
                    f"max {v['verify_loop']['max_ms']:.1f}ms, p99 "
                    f"{v['verify_loop']['p99_ms']:.1f}ms (longest GC "
                    f"{v['verify_loop']['gc_max_ms']:.1f}ms) | "
                )
        print(
            line + f"appends {a['without_tree_per_s']:,.0f}/s "
            f"without the tree, {a['with_tree_per_s']:,.0f}/s with it: ratio {a['ratio']:.3f} "
            f"(pairs {', '.join(f'{x:.3f}' for x in a['ratios'])}); CPU an append "
            f"{a['append_cpu_us_without']:.0f} / {a['append_cpu_us_with']:.0f} us, the "
            f"tree's {a['keeper_cpu_us_per_event']:.1f} us an event"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"transparency-{stamp}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
