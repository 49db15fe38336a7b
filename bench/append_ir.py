"""Instructions per grouped append: bench case 2's shape (8 writers, one event per
append, each on its own stream) on SQLite, counted by callgrind on the loop thread.

    python -m bench.append_ir            # both runs under callgrind, then the figure
    python -m bench.append_ir --child N  # N appends, once (what callgrind runs)

The figure is ``(Ir(1200) - Ir(400)) / 800``: the loop thread's instructions for appends
401..1200, start-up, migrations and the first groups left out (two runs, the heap frozen
after set-up, ``PYTHONHASHSEED=0``). Run to run it moves by ~1% (the WAL checkpointer's
timing). Under callgrind the loop thread runs ~50x slower, so the group queue's CPU
slices (:data:`eventstore.grouping.ANSWER_SLICE`, :data:`~eventstore.grouping.INLINE_SLICE`)
are scaled by ``--scale`` (default 50): unscaled, the queue wakes one caller per turn of
the loop, which an unhindered run never does (it wakes the 8 in one turn) and which
costs ~20k instructions an append more.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from bench.cases.store import WRITERS, task_data
from eventstore import EngineOptions, EventContext, EventStore, NewEvent, create_engine, grouping

FIRST, LAST = 400, 1200


async def _appends(total: int) -> None:
    from migrations import runner  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/tiu.db"
        engine = create_engine(url, EngineOptions())
        await runner.upgrade(engine)
        await engine.dispose()
        store = EventStore(create_engine(url, EngineOptions()))
        async with store.engine.connect() as conn:  # connected first, as case 2 is
            await store.head_position(conn)
        per = total // WRITERS
        datas = [[task_data(v) for v in range(per)] for _ in range(WRITERS)]
        gc.collect()
        gc.freeze()

        async def writer(w: int) -> None:
            stream_id = f"task-{uuid.uuid4().hex}"
            for v in range(per):
                event = NewEvent("TaskCreated", datas[w][v], 1, {"command": "Bench"})
                context = EventContext(actor_id=f"writer{w}")
                await store.append(stream_id, "task", [event], v, context=context)

        await asyncio.gather(*(writer(w) for w in range(WRITERS)))
        await store.aclose()
        await store.engine.dispose()


def _loop_thread_ir(total: int, scale: float, out: Path) -> int:
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "bench.append_ir",
            "--child",
            str(total),
            "--scale",
            str(scale),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    text = Path(f"{out}-01").read_text()  # thread 1: the loop's
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no total in {out}-01")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, help="run this many appends, once")
    parser.add_argument("--scale", type=float, default=50.0)
    args = parser.parse_args()
    if args.child:
        grouping.ANSWER_SLICE *= args.scale
        grouping.INLINE_SLICE *= args.scale
        asyncio.run(_appends(args.child))
        return
    with tempfile.TemporaryDirectory() as tmp:
        first = _loop_thread_ir(FIRST, args.scale, Path(tmp) / "first")
        last = _loop_thread_ir(LAST, args.scale, Path(tmp) / "last")
    print(f"{(last - first) / (LAST - FIRST):,.0f} instructions per grouped append (loop thread)")


if __name__ == "__main__":
    main()
