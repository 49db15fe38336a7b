"""On SQLite, queries whose cost grows with the table run on a worker thread; point
reads stay inline (the hop costs more than they do)."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from eventstore import create_engine
from projections.query import Query

pytestmark = pytest.mark.sqlite

_md = sa.MetaData()
items = sa.Table(
    "items",
    _md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("owner", sa.String(50), index=True),
    sa.Column("title", sa.String(200)),
)


async def _ticks_while(work: asyncio.Future) -> int:
    ticks = 0
    while not work.done():
        await asyncio.sleep(0)
        ticks += 1
    return ticks


@pytest.fixture
async def conn(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}")
    async with engine.begin() as c:
        await c.run_sync(_md.create_all)
        await c.execute(
            sa.text(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000)"
                " INSERT INTO items SELECT i, 'owner-' || (i % 100), 'task ' || i FROM n"
            )
        )
    async with engine.connect() as c:
        yield c
    await engine.dispose()


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda q, c: q.count(c), 200_000),
        (lambda q, c: q.count(c, {"title__contains": "99999"}), 2),
        (lambda q, c: q.list(c, {"title__contains": "199999"}, limit=10), 1),
        (lambda q, c: q.list(c, limit=10, offset=150_000), 10),
    ],
    ids=["count", "count-contains", "list-contains", "list-deep-offset"],
)
async def test_queries_that_scan_the_table_let_other_tasks_run(conn, call, expected):
    work = asyncio.ensure_future(call(Query(items), conn))
    assert await _ticks_while(work) > 1  # inline, it would finish on the first tick
    result = await work
    assert (result if isinstance(result, int) else len(result)) == expected


async def test_indexed_reads_stay_inline(conn):
    query = Query(items)
    for call in (
        lambda: query.get(conn, 7),
        lambda: query.list(conn, {"owner": "owner-7"}, limit=5),
        lambda: query.list(conn, {"id__in": [1, 2, 3]}, limit=5),
        lambda: query.list(conn, {"owner": "owner-7", "title__contains": "7"}, limit=5),
    ):
        work = asyncio.ensure_future(call())
        assert await _ticks_while(work) <= 1  # the tick before the task started
        assert await work
