"""``verify`` in child processes: each checks a contiguous range of positions over its own
read-only connection, and the report is the one a single pass gives (the mutation test in
test_transparency.py runs every kind of change through both)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore import (
    EventStore,
    NewEvent,
    VerifyReport,
    create_engine,
    merkle,
    retention,
    transparency,
    verify,
)
from eventstore.integrity import _join, _ranges
from eventstore.log_check import _Chunks
from migrations import runner

KEY = transparency.SigningKey.generate("test.example/ranges")
CHILDREN = min(2, os.cpu_count() or 1)


async def interleaved_log(store: EventStore, streams: int, rounds: int) -> None:
    """Every stream has events on both sides of any cut of the positions."""
    for n in range(rounds):
        for s in range(streams):
            await store.append(f"task-{s}", "task", [NewEvent("Noted", {"n": n, "s": s})])


async def test_a_log_checked_in_ranges_reports_what_one_pass_does(store, engine: AsyncEngine):
    await interleaved_log(store, streams=7, rounds=9)
    await store.append("user-late", "user", [NewEvent("Noted", {"late": True})])
    checkpoint = await transparency.write_checkpoint(engine, KEY)
    async with engine.connect() as conn:
        one = await verify(conn, checkpoint=checkpoint, processes=1)
        ranges = await verify(conn, checkpoint=checkpoint, processes=2)
        paged = await verify(conn, checkpoint=checkpoint, processes=2, page_size=4)
    assert one.ok and one.processes == 1
    assert (one.streams, one.events, one.head_position) == (8, 64, 64)
    assert ranges.processes == paged.processes == CHILDREN
    for report in (ranges, paged):
        assert report == _with_processes(one, CHILDREN)


async def test_a_root_that_differs_from_the_checkpoint_is_found_across_ranges(
    store, engine: AsyncEngine
):
    # A checkpoint whose root is not the log's: only the leaves of every range joined
    # (not any one range's) can show it, at the checkpoint's size.
    await interleaved_log(store, streams=5, rounds=8)
    checkpoint = await transparency.write_checkpoint(engine, KEY)
    await interleaved_log(store, streams=5, rounds=2)
    later = await transparency.write_checkpoint(engine, KEY)
    forged = type(checkpoint)(
        checkpoint.origin, checkpoint.size, later.root, checkpoint.time, checkpoint.note
    )
    async with engine.connect() as conn:
        assert (await verify(conn, checkpoint=later, processes=2)).ok
        one = await verify(conn, checkpoint=forged, processes=1)
        ranges = await verify(conn, checkpoint=forged, processes=2)
    assert one.broken is not None
    assert ranges.processes == CHILDREN
    assert ranges.broken == one.broken


async def test_archived_positions_at_the_cut_between_ranges_verify(engine: AsyncEngine, tmp_path):
    store = EventStore(engine, categories={"security", "user", "retention"})
    try:
        for n in range(10):
            await store.append("security-u1", "security", [NewEvent("LoginRejected", {"n": n})])
            await store.append("user-u1", "user", [NewEvent("Noted", {"n": n})])
        await retention.archive(
            store, before=datetime.now(UTC) + timedelta(seconds=1), output=tmp_path / "a.jsonl.gz"
        )
        for n in range(3):
            await store.append("security-u1", "security", [NewEvent("LoginRejected", {"n": n})])
        checkpoint = await transparency.write_checkpoint(engine, KEY)
    finally:
        await store.aclose()
    async with engine.connect() as conn:
        one = await verify(conn, checkpoint=checkpoint, processes=1)
        ranges = await verify(conn, checkpoint=checkpoint, processes=2)
    assert one.ok and one.archived_events == 9
    assert ranges == _with_processes(one, CHILDREN)


async def test_an_in_memory_database_is_checked_in_this_process():
    engine = create_engine("sqlite+aiosqlite://")
    try:
        await runner.upgrade(engine)
        store = EventStore(engine)
        await interleaved_log(store, streams=3, rounds=4)
        await store.aclose()
        async with engine.connect() as conn:
            report = await verify(conn, processes=2)
    finally:
        await engine.dispose()
    assert (report.ok, report.events, report.processes) == (True, 12, 1)


async def test_cancelling_verify_ends_its_child_processes(store, engine: AsyncEngine):
    await interleaved_log(store, streams=4, rounds=5)
    assert not multiprocessing.active_children()

    async def check() -> None:
        async with engine.connect() as conn:
            await verify(conn, processes=2)

    task = asyncio.create_task(check())
    for _ in range(500):
        children = multiprocessing.active_children()
        if children:
            break
        await asyncio.sleep(0.01)
    assert children, "no child process started"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Ended, not waited for: a child reads its interpreter in for longer than it took
    # to be seen here and cancelled.
    assert not multiprocessing.active_children()
    assert [child.exitcode for child in children] == [-signal.SIGTERM] * len(children)


def test_a_child_process_imports_no_database_library_for_a_sqlite_range():
    # What a child imports before its range: the check's module, as spawn unpickles it.
    # The whole package (SQLAlchemy, asyncpg, pydantic) took ~0.5 s of CPU a child.
    code = (
        "import sys, eventstore.log_check; "
        "heavy = {'sqlalchemy', 'asyncpg', 'pydantic', 'eventstore.store'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _with_processes(report: VerifyReport, processes: int) -> VerifyReport:
    return replace(report, processes=processes)


@settings(max_examples=200, deadline=None)
@given(head=st.integers(2, 10**7), processes=st.integers(2, 64))
def test_the_ranges_cover_every_position_once_and_start_after_whole_chunks(
    head: int, processes: int
):
    chunk, spans = _ranges(head, processes)
    assert chunk & (chunk - 1) == 0
    assert 1 <= len(spans) <= processes
    assert (spans[0][0], spans[-1][1]) == (1, head)
    assert all(c == b + 1 for (_, b), (c, _) in pairwise(spans))
    assert all((start - 1) % chunk == 0 and start <= end for start, end in spans)


@settings(max_examples=200, deadline=None)
@given(head=st.integers(10**5, 10**7), processes=st.integers(2, 8))
def test_the_first_range_is_the_longest_as_it_looks_up_no_earlier_heads(head: int, processes: int):
    chunk, spans = _ranges(head, processes)
    lengths = [end - start + 1 for start, end in spans]
    assert all(lengths[0] >= n for n in lengths[1:])
    assert lengths[0] >= 1.2 * max(lengths[1:-1] or lengths[1:]) - 2 * chunk


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_the_ranges_leaves_joined_have_the_root_of_every_leaf(data: st.DataObject):
    # Each range folds its leaves into whole chunks' roots and a compact rest; joined in
    # order they give the root of the whole log's leaves, whatever the cuts.
    size = data.draw(st.integers(1, 300))
    processes = data.draw(st.integers(2, 6))
    leaves = [bytes([i % 251]) * 32 for i in range(size)]
    chunk, spans = _ranges(max(size, 2), processes)
    whole, joined = merkle.RootAccumulator(), merkle.RootAccumulator()
    whole.extend(leaves)
    for start, end in spans:
        part = _Chunks(chunk)
        run = leaves[start - 1 : min(end, size)]
        cut = data.draw(st.integers(0, len(run)))
        part.extend(run[:cut])
        for leaf in run[cut:]:
            part.add(leaf)
        for root in part.roots:
            _join(joined, root, chunk.bit_length() - 1)
        heights = [h for h in reversed(range(part.size.bit_length())) if part.size >> h & 1]
        for node, height in zip(part.stack, heights, strict=True):
            _join(joined, node, height)
    assert (joined.size, joined.root()) == (whole.size, whole.root())
