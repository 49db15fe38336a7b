"""The WAL checkpoint and the event loop: two source trees side by side, alternating.

Each round runs, in a fresh child process per tree, 20,000 single-event
``EventStore.append`` calls one after another on a new SQLite file while the loop probe
runs, and a thread samples the size of the ``-wal`` file every 2 ms. Reported per
tree: the max and p99 loop lag, appends per second and the largest ``-wal`` seen; then
the ratios new/old of the medians over the rounds.

    python bench/wal_checkpoint.py --old /work/main --new . [--rounds 3] [--appends 20000]
        [--prefill 300000]

(run as a script: each child imports ``eventstore`` from its tree, ``PYTHONPATH``.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


async def _fill(path: Path, events: int) -> None:
    """A log of ``events`` events (500 to an append), so that a checkpoint writes pages
    spread over a large file, as on a service's long-lived log."""
    from eventstore import EventStore, NewEvent, create_engine  # noqa: PLC0415
    from migrations import runner  # noqa: PLC0415

    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    await runner.upgrade(engine)
    store = EventStore(engine)
    for start in range(0, events, 500):
        batch = [NewEvent("ItemNoted", {"n": n, "text": "x" * 200}) for n in range(500)]
        await store.append(f"filler-{start}", "filler", batch)
    await engine.dispose()


async def _child(appends: int, template: Path | None) -> dict[str, Any]:
    from bench.probe import LoopProbe  # noqa: PLC0415
    from eventstore import EventStore, NewEvent, create_engine  # noqa: PLC0415
    from migrations import runner  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wal.db"
        wal = Path(f"{path}-wal")
        if template is None:
            engine = create_engine(f"sqlite+aiosqlite:///{path}")
            await runner.upgrade(engine)
        else:
            shutil.copyfile(template, path)
            engine = create_engine(f"sqlite+aiosqlite:///{path}")
        store = EventStore(engine)
        biggest = 0
        sampling = True

        def sample() -> None:
            nonlocal biggest
            while sampling:
                with contextlib.suppress(OSError):
                    biggest = max(biggest, wal.stat().st_size)
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            async with LoopProbe() as probe:
                await probe.settle()
                mark = probe.mark()
                started = time.perf_counter()
                for i in range(appends):
                    await store.append(
                        f"item-{i % 500}",
                        "item",
                        [NewEvent("ItemNoted", {"n": i, "text": "x" * 200})],
                    )
                elapsed = time.perf_counter() - started
                await probe.settle()
                lag = probe.since(mark)
        finally:
            sampling = False
            sampler.join()
        final = os.stat(wal).st_size if os.path.exists(wal) else 0  # noqa: ASYNC240
        await engine.dispose()
        return {
            "source": str(Path(sys.modules["eventstore"].__file__ or "").parent.parent),
            "max_ms": round(lag.max_ms, 2),
            "p99_ms": round(lag.p99_ms, 2),
            "appends_per_s": round(appends / elapsed),
            "wal_max_mib": round(biggest / 2**20, 2),
            "wal_end_mib": round(final / 2**20, 2),
        }


def _run_child(tree: Path, appends: int, template: Path | None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    extra = ["--template", str(template)] if template else []
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(appends), *extra],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", type=Path)
    parser.add_argument("--new", type=Path, default=Path())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--appends", type=int, default=20_000)
    parser.add_argument("--prefill", type=int, default=0, help="events in the log first")
    parser.add_argument("--child", type=int)
    parser.add_argument("--template", type=Path)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(asyncio.run(_child(args.child, args.template))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        template = None
        if args.prefill:
            template = Path(tmp) / "template.db"
            asyncio.run(_fill(template, args.prefill))
        _compare(args, template)


def _compare(args: argparse.Namespace, template: Path | None) -> None:
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    results: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            row = _run_child(tree, args.appends, template)
            results[name].append(row)
            print(name, json.dumps(row), flush=True)
    medians = {
        name: {key: statistics.median(r[key] for r in rows) for key in rows[0] if key != "source"}
        for name, rows in results.items()
    }
    for name, row in medians.items():
        print(f"median {name}: {row}")
    print(
        "new/old: "
        + ", ".join(
            f"{key} {medians['new'][key] / medians['old'][key]:.2f}"
            for key in medians["new"]
            if medians["old"][key]
        )
    )


if __name__ == "__main__":
    main()
