"""Cases 5 and 7: replay a seeded scenario log, and how appends and replays grow with it.

One log per backend grows through the sizes of case 7 (10k, 100k, 1M in the full
run). At each size the append rate is measured (1,000 new streams x 1 event), and at
the replay sizes every replay runs in a child process (:mod:`bench.replay_child`) for
its peak RSS:

* tiu ``tasks``: ``projections.replay.rebuild(store, TasksProjector())``, shadow
  tables and swap included: the one-row-per-task read model;
* tiu ``all``: ``rebuild_all`` of the six projectors (case 5b, tiu only);
* raw: pages of 1,000 task events, ``executemany`` into a one-row-per-task table and
  the checkpoint, one transaction per page (it reads tiu's log rows);
* eventsourcing: ``ProjectionRunner`` + a one-row-per-task view (one transaction
  per event: view row + tracking row), on its own log of the same seeded events.

Events/s is the log's size over the replay's wall time, the same denominator for all.

Growth is measured in pairs: a second log (``tiu_small``) holds the same first 10k
scenario events, and once the main log is at 1M, runs alternate between the two, one
run on each per round. Measured minutes apart, as they were, the two rates moved with
the machine (the 10k rate alone differed by 24% between two full runs); side by side
they share its state. Each measurement appends to its log, so the small one ends a
full run at ~28k events.

Before each measurement its log is settled: the bulk fill before it leaves deferred
work proportional to the fill, not to the log (SQLite: a WAL of the whole fill
waiting for its checkpoint; PostgreSQL: dirty buffers and unvacuumed pages), which
the first measured appends would otherwise pay for. Both logs are settled the same
way: ``PRAGMA wal_checkpoint(TRUNCATE)``, or ``VACUUM ANALYZE events`` then
``CHECKPOINT``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from bench import es
from bench.cases.store import _tiu_streams, random_id
from bench.common import Place, Result, summarise
from bench.context import Context
from bench.scenario import Scenario, es_fill, fill
from domain import new_id

SEED = 42
#: Appends per growth measurement: 1,000 (~0.2 s on SQLite) moved by up to 20% between
#: runs on this shared machine; 3,000 per run, 3 runs, narrow that.
GROWTH_APPENDS = 3000
#: Stream and command ids of the growth appends: what tiu's commands make (``new_id``,
#: time-ordered), and random ones a caller may bring. Random keys land on a random
#: leaf of the ``(stream_id, version)`` and ``command_id`` indexes, which at 1M events
#: is cold: the raw driver loses ~13% there too.
GROWTH_IDS = {"new_id": new_id, "uuid4": random_id}


#: What case 5 replays: the system and its mode.
_REPLAYS: dict[str, tuple[str, str]] = {
    "tiu": ("tiu", "tasks"),
    "all": ("tiu", "all"),
    "raw": ("raw", "tasks"),
    "eventsourcing": ("eventsourcing", "tasks"),
}


async def _child(ctx: Context, system: str, mode: str = "tasks") -> dict[str, Any]:
    args = {
        "backend": ctx.backend,
        "system": system,
        "place": "tiu" if system == "raw" else system,
        "mode": mode,
        "sync": ctx.cfg.sqlite_synchronous,
        "tmpdir": str(ctx.ws.tmpdir),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.replay_child",
        json.dumps(args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"replay child {system}/{mode} failed:\n{err.decode()[-3000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def _head(ctx: Context) -> int:
    store = await ctx.place("tiu").store()
    try:
        async with store.engine.connect() as conn:
            return await store.head_position(conn)
    finally:
        await store.aclose()
        await store.engine.dispose()


async def _settle(place: Place) -> None:
    if place.postgres:
        conn = await place.asyncpg_conn()
        try:
            # VACUUM first: it sets hint bits and the visibility map on every page the
            # fill wrote, dirtying them again; the CHECKPOINT after it writes them out,
            # instead of the measured appends' checkpoints.
            await conn.execute("VACUUM ANALYZE events")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()
        return
    sconn = place.sqlite_conn()
    try:
        sconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        sconn.close()


async def case5(ctx: Context) -> list[Result]:
    quick = ctx.cfg.quick
    points = [10_000, 20_000] if quick else [10_000, 100_000, 1_000_000]
    replays: dict[int, tuple[str, ...]] = (
        {20_000: ("tiu", "all", "raw", "eventsourcing")}
        if quick
        else {100_000: ("tiu", "all", "raw", "eventsourcing"), 1_000_000: ("tiu", "raw")}
    )
    out: list[Result] = []
    await ctx.fresh(migrate=("tiu",))
    small = Place(ctx.cfg, ctx.backend, "tiu", ctx.ws.tmpdir, schema="tiu_small")
    await small.reset()
    await small.migrate()
    store = await small.store()
    try:
        await fill(store, Scenario(SEED), points[0])
    finally:
        await store.aclose()
        await store.engine.dispose()
    store = await ctx.place("tiu").store()
    scenario = Scenario(SEED)
    size = 0
    try:
        for point in points:
            print(f"  log: appending {point - size} scenario events (up to {point})", flush=True)
            await fill(store, scenario, point - size)
            size = point
            if point == points[-1]:
                out.extend(await _growth(ctx, small, points[0], point))
            chosen = replays.get(point, ())
            if not chosen:
                continue
            head = await _head(ctx)
            if "eventsourcing" in chosen:
                app = es.BenchApp(env=ctx.place("eventsourcing").es_env())
                await asyncio.to_thread(es_fill, app, Scenario(SEED), point)
                app.close()
            # Every replay ``runs`` times, the systems in turns (as the other cases):
            # one replay each varied by up to 20% between full runs.
            runs: dict[str, list[dict[str, Any]]] = {what: [] for what in chosen}
            for round_ in range(1, ctx.cfg.runs + 1):
                for what in chosen:
                    system, mode = _REPLAYS[what]
                    print(f"  replay {what} at {point:,}, run {round_}", flush=True)
                    runs[what].append(await _child(ctx, system, mode))
            for what, done in runs.items():
                system, mode = _REPLAYS[what]
                label = (
                    f"5b replay all 6 projections, log {point:,}"
                    if mode == "all"
                    else f"5 replay tasks read model, log {point:,}"
                )
                peak = max(r["maxrss_mb"] for r in done)
                out.append(
                    summarise(
                        label,
                        ctx.backend,
                        system,
                        [r["seconds"] for r in done],
                        point if system == "eventsourcing" else head,
                        note=f"peak RSS {peak} MB; {len(done)} runs in turns",
                        peak_rss_mb=peak,
                        applied=done[0]["applied"],
                    )
                )
    finally:
        await store.aclose()
        await store.engine.dispose()
        await small.reset()
    return out


async def _growth(ctx: Context, small: Place, small_size: int, size: int) -> list[Result]:
    """Append rates on the small log and on the big one, alternating run by run."""
    big = ctx.place("tiu")
    out = []
    for ids, make_id in GROWTH_IDS.items():
        places = (small, big)

        async def settle(i: int, places: tuple[Place, Place] = places) -> None:
            await _settle(places[i])

        streams = [_tiu_streams(place, GROWTH_APPENDS, 1, make_id) for place in places]
        if ids == next(iter(GROWTH_IDS)):
            # One run on each log first, not recorded: the first pair measured after the
            # fill ran the big log 24-29% slower than the small one, and a second pair of
            # the same ids in the same process +38% (the machine settling after the fill,
            # not the ids).
            for i, stream in enumerate(streams):
                await settle(i)
                await anext(stream)
        runs = await ctx.take_turns(f"7 growth {ids}", *streams, before_run=settle)
        for at, measured in zip((small_size, size), runs, strict=True):
            label = (
                f"7 growth: append {GROWTH_APPENDS} streams x 1 event, {ids} ids, "
                f"{at:,} events in log"
            )
            note = "paired with the other size, run by run"
            out.append(summarise(label, ctx.backend, "tiu", measured, GROWTH_APPENDS, note=note))
    return out
