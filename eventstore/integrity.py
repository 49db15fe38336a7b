"""Recheck the whole log in one pass in position order; name the first position affected.

Every event's chain hash is recomputed from its content and its stream's previous
hash, every stream's versions must follow each other, positions must have no hole, and
every event's Merkle leaf (:mod:`eventstore.merkle`) must equal the stored tree's. With a
kept checkpoint (:func:`verify` ``checkpoint=``), the root of the log's first
``checkpoint.size`` leaves must equal the checkpoint's, and the stored tree must prove
itself an append-only extension of it (an RFC 9162 consistency proof): an operator with
write access who rewrites, reorders, removes or recomputes anything the checkpoint
covers is caught, and the first position they changed is named.

Retention (:mod:`eventstore.retention`) is the one path that removes events. Its
``AuditArchived`` records say which positions left the log and, per archived stream,
the last archived version and hash: a stream whose start was archived is verified from
that hash, a hole is accepted exactly where a record says events were removed, and the
tree keeps their leaves (archived events stay provable).

Memory grows with the number of streams (each one's last version and hash), not with
the log. The events can be checked in child processes (:func:`verify` ``processes=``;
``tiu verify`` does), a contiguous range of positions each, over their own read-only
connections: the caller's process does no per-event work and shares no GIL with them.
Each range starts every stream from its last event before the range, read as stored;
the ranges' results are taken in order, so the first range with a failure names the
first position affected, as one pass would: every range before it checked out, so the
heads it started from were sound. Without children (the default; a database no other
process can open, one CPU, a small log), the check runs on a worker thread, page by
page, so the caller's loop stays free.
The rows' checks live in :mod:`eventstore.log_check`, which a child imports alone.
Children are started by ``spawn`` (never a fork of a process running an event loop):
as with any ``spawn``, the host's main module must guard what it runs with
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
from typing import Any, Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import StaticPool

from eventstore import merkle
from eventstore.dialects import dialect_for, raw_connection
from eventstore.log_check import (
    _HOP_CANONICAL,
    _NO_END,
    _POSTGRES_PAGE,
    _SQLITE_FAST,
    _TRIP_SQLITE,
    Archive,
    BrokenLink,
    VerifyReport,
    _check_range,
    _Pass,
    _Range,
    _RangeResult,
    _sqlite_trip,
)
from eventstore.offline_verify import Checkpoint, ProofError, node_hash, verify_consistency
from eventstore.retention import ArchiveRecord, load_records


async def verify(
    conn: AsyncConnection,
    *,
    page_size: int | None = None,
    checkpoint: Checkpoint | None = None,
    processes: int | None = 1,
) -> VerifyReport:
    """Recheck every event, stream chain, position and Merkle leaf in position order,
    and the log against ``checkpoint`` (already checked for its signature) if given.
    Stops at the first position affected.

    By default (``processes=1``) the check runs in this process, on a worker thread:
    a library call does not start processes in its host, whose main module ``spawn``
    would import. ``processes=N`` checks in N child processes at once (at most one per
    CPU), each over its own read-only connection and a contiguous range of positions,
    so the caller's process does no per-event work; ``None`` (what ``tiu verify``
    does) means one per CPU, up to 8, from a log of 200,000 events. A database another
    process cannot open (an in-memory SQLite database, an engine with a
    ``StaticPool``), one CPU, or a child that fails (say, a file it may not open
    read-only) means the check runs in this process, on a worker thread."""
    archive = _archive(await load_records(conn))
    state = await merkle.load_state(conn)
    suspect = None if checkpoint is None else await _check_tree(conn, state, checkpoint)

    def new_pass() -> _Pass:
        return _Pass(
            archive, state.size, checkpoint, fast=conn.dialect.name == "sqlite",
            tree_suspect=suspect,
        )  # fmt: skip

    check = new_pass()
    try:
        in_ranges = False
        if processes is None or processes > 1:
            try:
                in_ranges = await _ranges_pass(conn, check, processes, page_size)
            except _RangeFailed:
                await _drop(check.versions)
                await _drop(check.hashes)
                check = new_pass()
        if not in_ranges and check.fast:
            await _sqlite_pass(conn, check, page_size or _TRIP_SQLITE)
        elif not in_ranges:
            await _canonical_pass(conn, check, page_size or 1000)
        if check.broken is None:
            await check.finish(lambda position: merkle.stored_leaf_run(conn, position - 1, 1))
        return check.report()
    finally:
        await _drop(check.versions)
        await _drop(check.hashes)


async def _sqlite_pass(conn: AsyncConnection, check: _Pass, size: int) -> None:
    """SQLite: each trip to a worker thread reads the next rows and their stored leaves
    and checks them (~3 ms), so the caller's loop does nothing per row and waits for
    no more than one other thread: it runs between trips at once, rather than waiting
    for the GIL (up to the 5 ms switch interval per turn, per runnable thread)."""
    dialect = dialect_for(conn.engine)
    raw = await raw_connection(conn)
    db = raw.driver_connection
    after: int | None = 0
    while after is not None and check.broken is None:
        with dialect.driver_errors(raw, _SQLITE_FAST):
            after = await raw.dbapi_connection.run(
                _sqlite_trip, db, check, after, _NO_END, size, offload=True
            )


async def _canonical_pass(conn: AsyncConnection, check: _Pass, size: int) -> None:
    """PostgreSQL: pages read on the loop (asyncpg decodes there, so pages are smaller:
    the loop's longest wait scales with them), the next one while this one is checked
    on a worker thread in slices of ~2 ms (see :func:`_sqlite_pass`)."""
    dialect = dialect_for(conn.engine)

    async def fetch(after: int) -> list[tuple[Any, ...]]:
        # Plain tuples of plain values: the collector untracks them at once, where
        # asyncpg's records, held while the page is checked, would be promoted and
        # bring on full collections (tens of ms each, on whichever thread).
        page = await dialect.fetch(conn, _POSTGRES_PAGE, (after, _NO_END, size))
        return [tuple(r) for r in page]

    after = 0
    pending: asyncio.Future[list[tuple[Any, ...]]] | None = asyncio.ensure_future(fetch(after))
    try:
        while pending is not None:
            rows = await pending
            pending = None
            if not rows:
                break
            last = int(rows[-1][0])
            count = max(0, min(last, check.tree_size) - after)
            stored = await merkle.stored_leaf_run(conn, after, count)
            pending = asyncio.ensure_future(fetch(last))
            for start in range(0, len(rows), _HOP_CANONICAL):
                end = min(len(rows), start + _HOP_CANONICAL)
                await asyncio.to_thread(check.canonical_rows, rows, stored, after, start, end)
                if check.broken is not None:
                    break
            if check.broken is not None:
                break
            after = last
    finally:
        if pending is not None:
            await pending  # never leave a read running on the caller's connection


#: Below this many events, the default is to check in this process: a log this small
#: takes seconds at most, and starting a child (a new interpreter importing
#: eventstore.log_check, ~0.15 s of CPU) costs what checking ~20k events does.
_RANGES_FROM: Final = 200_000
#: At most this many children by default (measured with two, on a 2-core machine).
_PROCESSES_DEFAULT: Final = 8
#: How much longer the first range is than each of the others: a later range also
#: looks up the head before it of every stream it meets first (~2.8 us a stream), which
#: made the second half of a 1M-event SQLite log cost 9.4 us an event against 7.8 for the
#: first (335k streams; measured per range, in one process).
_FIRST_RANGE: Final = 1.2
#: The position of the last event, where the ranges end.
_HEAD_SQL: Final = "SELECT max(position) FROM events"


class _RangeFailed(Exception):
    """A child process could not check its range (it reports why)."""


def _join(acc: merkle.RootAccumulator, node: bytes, height: int) -> None:
    """Add to ``acc`` the root of ``2**height`` leaves (``acc.size`` a multiple of it)."""
    rest = acc.size >> height
    while rest & 1:
        node = node_hash(acc.stack.pop(), node)
        rest >>= 1
    acc.stack.append(node)
    acc.size += 1 << height


async def _child_location(conn: AsyncConnection) -> tuple[str, str | None] | None:
    """Where a child process finds the database (and PostgreSQL's search path), or None
    if it cannot (in-memory SQLite, an engine sharing one connection)."""
    if isinstance(conn.engine.pool, StaticPool):
        return None
    if conn.dialect.name == "sqlite":
        raw = await raw_connection(conn)
        listed = raw.driver_connection.execute("PRAGMA database_list").fetchall()
        path = next((str(row[2]) for row in listed if row[1] == "main"), "")
        return (path, None) if path else None
    url = conn.engine.url.set(drivername="postgresql")
    search_path = (await conn.execute(text("SELECT current_setting('search_path')"))).scalar()
    return url.render_as_string(hide_password=False), search_path


def _ranges(head: int, processes: int) -> tuple[int, list[tuple[int, int]]]:
    """Positions ``1 .. head`` in at most ``processes`` contiguous ranges of near equal
    cost, each starting after a multiple of the chunk (a power of two, ~1/16 of one):
    the first range, which looks up no stream's earlier head, is :data:`_FIRST_RANGE`
    times as long as each of the others."""
    per = -(-head // processes)
    chunk = 1 << max(0, (per // 16).bit_length() - 1)
    chunks = -(-head // chunk)
    shares = _FIRST_RANGE + processes - 1
    cuts = [0.0] + [_FIRST_RANGE + i for i in range(processes)]
    bounds = sorted({min(head, round(cut * chunks / shares) * chunk) for cut in cuts})
    return chunk, [(a + 1, b) for a, b in itertools.pairwise(bounds) if b > a]


async def _ranges_pass(
    conn: AsyncConnection, check: _Pass, processes: int | None, page: int | None
) -> bool:
    """Check the log in ranges, one child process each (started by ``spawn``: a fork
    would copy the caller's loop and open connections); False if it was not split.
    The ranges' results are taken in order: the first one with a failure names the
    first position affected, as one pass would (each range starts every stream where
    the ranges before it, all sound, left it: :meth:`_Pass.seed`). The leaves'
    subtrees are joined into the root the checkpoint is compared with. Leaving, by
    return, error or cancellation, ends every child still running."""
    cpus = os.cpu_count() or 1
    head = int((await conn.execute(text(_HEAD_SQL))).scalar() or 0)
    wanted = min(cpus, processes if processes is not None else _PROCESSES_DEFAULT)
    if wanted < 2 or head < 2 or (processes is None and head < _RANGES_FROM):
        return False
    location = await _child_location(conn)
    if location is None:
        return False
    chunk, spans = _ranges(head, wanted)
    if len(spans) < 2:
        return False
    context = multiprocessing.get_context("spawn")
    check.processes = len(spans)
    started: list[tuple[Any, Any]] = []
    try:
        for start, end in spans:
            spec = _Range(
                conn.dialect.name, location[0], location[1], check.archive, check.tree_size,
                check.checkpoint, check.tree_suspect, start, end, chunk, page,
            )  # fmt: skip
            reader, writer = context.Pipe(duplex=False)
            child = context.Process(target=_check_range, args=(spec, writer), daemon=True)
            try:
                child.start()
            except BaseException:
                reader.close()
                raise
            finally:
                writer.close()
            started.append((child, reader))
        cp, acc, height = check.checkpoint, check.accumulator, chunk.bit_length() - 1
        for _, reader in started:
            result = await _receive(reader)
            for root in result.roots:
                _join(acc, root, height)
            size = result.rest_size
            heights = [h for h in reversed(range(size.bit_length())) if size >> h & 1]
            for node, h in zip(result.rest, heights, strict=True):
                _join(acc, node, h)
            check.count += result.count
            check.placeholders += result.placeholders
            check.new_streams += result.new_streams
            check.expected = result.expected
            if cp is not None and 0 < cp.size == acc.size and acc.root() != cp.root:
                check.broken = check.root_differs()
                check.expected = cp.size
                return True
            if result.broken is not None:
                check.broken = result.broken
                return True
        return True
    finally:
        for child, reader in started:
            if child.is_alive():
                child.terminate()
            reader.close()
        for child, _ in started:
            await asyncio.to_thread(child.join)


async def _receive(reader: Any) -> _RangeResult:
    """A child's result, waited for without blocking the loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(reader.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(reader.fileno())
    try:
        result = reader.recv()
    except EOFError:
        raise _RangeFailed("a child process ended without a result") from None
    if not isinstance(result, _RangeResult):
        raise _RangeFailed(str(result))
    return result


async def _drop(heads: dict[str, Any]) -> None:
    """Empty a map of streams' heads in slices: freeing one of a million streams at once
    holds the loop for tens of ms (one C call, no switch between threads)."""
    while heads:
        for _ in range(min(len(heads), 2_000)):
            heads.popitem()
        await asyncio.sleep(0)


async def _check_tree(
    conn: AsyncConnection, state: merkle.TreeState, checkpoint: Checkpoint
) -> BrokenLink | None:
    """Whether the stored tree is an append-only extension of ``checkpoint``: its root
    at the checkpoint's size, and a consistency proof up to its own size."""
    if state.size < checkpoint.size:
        return BrokenLink(
            None, None, state.size + 1, "the stored tree is smaller than the checkpoint",
            str(checkpoint.size), str(state.size),
        )  # fmt: skip
    try:
        old_root = await merkle.root_at(conn, checkpoint.size)
        proof = await merkle.consistency_proof(conn, checkpoint.size, state.size)
        verify_consistency(checkpoint.size, state.size, checkpoint.root, state.root, proof)
        if old_root != checkpoint.root:
            raise ProofError("root differs")
    except (ProofError, KeyError, ValueError) as error:
        return BrokenLink(
            None, None, 1, "the stored tree does not extend the checkpoint",
            checkpoint.root_hex, str(error),
        )  # fmt: skip
    return None


def _archive(records: list[ArchiveRecord]) -> Archive:
    heads: dict[str, tuple[int, str]] = {}
    for record in records:
        for s in record.streams:
            if s.to_version > heads.get(s.stream_id, (0, ""))[0]:
                heads[s.stream_id] = (s.to_version, s.last_hash)
    spans = _merge([span for r in records for span in r.positions])
    return Archive(spans, heads, sum(r.count for r in records), len(records))


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


__all__ = ["BrokenLink", "VerifyReport", "verify"]
