"""The numbers behind the SQLite driver's choice (README, "What runs on the loop").

Three ways to drive SQLite from asyncio, one small read and one scan each, on a file
database of 200,000 rows, with the loop probe running:

* inline: ``eventstore.sqlite_driver`` (sqlite3 on the loop);
* a hop per statement: the same driver with ``off_loop=True``;
* a thread per connection: stock aiosqlite (every call a hop to the connection's thread).

    python -m bench.driver_choice
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.probe import LoopProbe
from eventstore import create_engine

ROWS = 200_000
POINT = text("SELECT id, title FROM items WHERE id = :id")
SCAN = text("SELECT count(*) FROM items WHERE title LIKE '%99999%'")


async def _fill(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT)"))
        await conn.execute(
            text(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :n)"
                " INSERT INTO items SELECT i, 'task ' || i FROM n"
            ),
            {"n": ROWS},
        )


async def _measure(engine: AsyncEngine, off_loop: bool, probe: LoopProbe) -> dict[str, Any]:
    opts = {"off_loop": True} if off_loop else {}
    async with engine.connect() as conn:
        for i in range(200):  # warm
            await conn.execute(POINT.execution_options(**opts), {"id": i + 1})
        times = []
        for i in range(2000):
            started = time.perf_counter()
            await conn.execute(POINT.execution_options(**opts), {"id": i * 97 % ROWS + 1})
            times.append(time.perf_counter() - started)
        await probe.settle()
        mark = probe.mark()
        started = time.perf_counter()
        for _ in range(3):
            await conn.execute(SCAN.execution_options(**opts))
        scan = (time.perf_counter() - started) / 3
        await probe.settle()
        lag = probe.since(mark)
    return {
        "point read median us": round(statistics.median(times) * 1e6),
        "point read p99 us": round(statistics.quantiles(times, n=100)[98] * 1e6),
        "scan ms": round(scan * 1000, 1),
        "loop stall during scan, max ms": round(lag.max_ms, 1),
    }


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "choice.db"
        inline = create_engine(f"sqlite+aiosqlite:///{path}")
        await _fill(inline)
        stock = create_async_engine(f"sqlite+aiosqlite:///{path}")
        async with LoopProbe() as probe:
            rows = {
                "inline (sqlite3 on the loop)": await _measure(inline, False, probe),
                "a hop per statement (off_loop)": await _measure(inline, True, probe),
                "a thread per connection (aiosqlite)": await _measure(stock, False, probe),
            }
        await inline.dispose()
        await stock.dispose()
    for name, row in rows.items():
        print(f"{name:38} " + ", ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    asyncio.run(main())
