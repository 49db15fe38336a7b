"""Bytes on disk per event, and what each index of the log costs.

    python -m bench.storage --events 1000000 --backends sqlite,postgresql

The same seeded scenario log (bench/scenario.py) is written into tiu's ``events``
table (through ``EventStore`` transactions of 2,000 events, as case 5 fills its log)
and into the ``eventsourcing`` recorder's table (``insert_events``, as case 5 fills
its one); the log is then settled (SQLite: ``wal_checkpoint(TRUNCATE)``; PostgreSQL:
``VACUUM ANALYZE``) and measured:

* SQLite: the ``dbstat`` virtual table, pages of each table and index;
* PostgreSQL: ``pg_table_size`` (heap, TOAST, free-space and visibility maps) of each
  table and ``pg_relation_size`` of each index.

Only the log's own tables count (tiu: ``events``; eventsourcing: its stored-events
table); read models, checkpoints and the Merkle tree are reported apart by tiu's
``tiu stats`` and are not part of the comparison. PostgreSQL data lives in a database
of its own (``tiu_storage``, dropped at the end); SQLite in a temporary directory.
Prints a table and writes ``bench/results/storage-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import pg_dsn, pg_execute, pg_url
from bench.context import RESULTS
from bench.scenario import Scenario, es_fill, fill
from eventstore import EngineOptions, EventStore, create_engine
from migrations import runner

DATABASE = "tiu_storage"
SEED = 7
#: eventsourcing names its table of stored events after the application on PostgreSQL
#: (``benchapp_events``) and ``stored_events`` on SQLite: found by this suffix.
ES_SUFFIX = "_events"


async def _fill_tiu(url: str, options: EngineOptions, events: int) -> None:
    engine = create_engine(url, options)
    try:
        await runner.upgrade(engine)
        store = EventStore(engine)
        try:
            await fill(store, Scenario(SEED), events, as_commands=True)
        finally:
            await store.aclose()
    finally:
        await engine.dispose()


def _fill_es(env: dict[str, str], events: int) -> None:
    from bench.es import BenchApp  # noqa: PLC0415

    app = BenchApp(env=env)
    try:
        es_fill(app, Scenario(SEED), events)
    finally:
        app.close()


def _sqlite_sizes(path: Path, table: str | None = None) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if table is None:
            (table,) = conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE ?",
                (f"%{ES_SUFFIX}",),
            ).fetchone()
        names = [table] + [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = ?", (table,)
            )
        ]
        sizes = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
        return {name: int(sizes.get(name, 0)) for name in names}
    finally:
        conn.close()


async def _pg_sizes(schema: str, table: str | None = None) -> dict[str, int]:
    conn = await asyncpg.connect(pg_dsn(DATABASE))
    try:
        if table is None:
            table = await conn.fetchval(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1 AND tablename LIKE $2",
                schema,
                f"%{ES_SUFFIX}",
            )
        assert table is not None
        await conn.execute(f'VACUUM ANALYZE "{schema}"."{table}"')
        qualified = f'"{schema}"."{table}"'
        out = {table: int(await conn.fetchval("SELECT pg_table_size($1::regclass)", qualified))}
        for name, size in await conn.fetch(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) "
            "FROM pg_index WHERE indrelid = $1::regclass ORDER BY 1",
            qualified,
        ):
            out[name.split(".")[-1].strip('"')] = int(size)
        return out
    finally:
        await conn.close()


async def measure(backend: str, events: int, tmp: Path) -> dict[str, Any]:
    if backend == "sqlite":
        tiu_path, es_path = tmp / "tiu.db", tmp / "es.db"
        await _fill_tiu(f"sqlite+aiosqlite:///{tiu_path}", EngineOptions(), events)
        await asyncio.to_thread(
            _fill_es,
            {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(es_path)},
            events,
        )
        tiu = _sqlite_sizes(tiu_path, "events")
        es = _sqlite_sizes(es_path)
    else:
        await pg_execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await pg_execute(f'CREATE DATABASE "{DATABASE}"')
        for schema in ("tiu", "es"):
            await pg_execute(f'CREATE SCHEMA "{schema}"', DATABASE)
        await _fill_tiu(pg_url(DATABASE), EngineOptions(search_path="tiu"), events)
        host, port = pg_dsn().split("@", 1)[1].split("/", 1)[0].split(":")
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": DATABASE,
            "POSTGRES_HOST": host,
            "POSTGRES_PORT": port,
            "POSTGRES_USER": pg_dsn().split("//", 1)[1].split("@", 1)[0],
            "POSTGRES_PASSWORD": "",
            "POSTGRES_SCHEMA": "es",
        }
        await asyncio.to_thread(_fill_es, env, events)
        tiu = await _pg_sizes("tiu", "events")
        es = await _pg_sizes("es")
    return {"backend": backend, "events": events, "tiu": tiu, "eventsourcing": es}


def report(result: dict[str, Any]) -> str:
    events = result["events"]
    lines = [f"{result['backend']}, {events:,} events"]
    for system in ("tiu", "eventsourcing"):
        sizes: dict[str, int] = result[system]
        total = sum(sizes.values())
        lines.append(f"  {system}: {total / events:,.0f} bytes/event ({total / 2**20:,.1f} MiB)")
        for name, size in sizes.items():
            per_event, mib = size / events, size / 2**20
            lines.append(f"    {name:<40} {per_event:>7,.1f} bytes/event {mib:>9,.1f} MiB")
    return "\n".join(lines)


async def main_async(backends: list[str], events: int) -> list[dict[str, Any]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="tiu-storage-") as tmp:
        for backend in backends:
            print(f"[{backend}] filling {events:,} events per system ...", flush=True)
            try:
                result = await measure(backend, events, Path(tmp))
            finally:
                if backend == "postgresql":
                    await pg_execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            print(report(result), flush=True)
            out.append(result)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    results = asyncio.run(main_async(args.backends.split(","), args.events))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"storage-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
