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
Children are started by ``spawn`` (never a fork of a process running an event loop):
as with any ``spawn``, the host's main module must guard what it runs with
``if __name__ == "__main__"``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import multiprocessing
import os
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import StaticPool

from eventstore import merkle
from eventstore.dialects import dialect_for, raw_connection
from eventstore.hashing import (
    GENESIS,
    canonical_json,
    hash_tail,
    json_text,
    link_hash,
    parse_json,
)
from eventstore.offline_verify import Checkpoint, ProofError, node_hash, verify_consistency
from eventstore.retention import ArchiveRecord, load_records
from eventstore.types import sqlite_datetime, sqlite_text

_COLUMNS: Final = (
    "position, stream_id, stream_category, version, {event_id}, event_type, schema_version, "
    "{data}, {metadata}, actor_id, correlation_id, causation_id, command_id, recorded_at, hash"
)
#: The id as text: asyncpg's UUID objects are tracked by the collector, so a page of
#: rows holding them survives into the oldest generation and brings on full
#: collections (120-200 ms pauses of every thread at 100k events, measured).
_POSTGRES_PAGE: Final = (
    "SELECT "  # noqa: S608
    + _COLUMNS.format(event_id="event_id::text", data="data::text", metadata="metadata::text")
    + " FROM events WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3"
)
#: SQLite: the JSON pieces of the hashed text built by SQLite itself (compact, escaped
#: as Python escapes), the rest spliced in by :meth:`_Pass.sqlite_rows`: the documents
#: as stored (each must be one valid JSON value, so no stored text can pass for another
#: split of the same bytes), the 32-hex-digit id dashed and the UTC time in ISO form at
#: fixed offsets. A row that does not hash right this way is rechecked from all its
#: columns (_FULL_ROW) by the canonical path. Building the whole text in SQL (``||``)
#: was measured slower: each concatenation copies the row's text again.
_SQLITE_FAST: Final = (
    "SELECT position, stream_id, version, hash, stream_category, "
    "json_array(stream_id, version), event_id, json_array(event_type, schema_version), "
    "data, metadata, json_array(actor_id, correlation_id, causation_id, command_id), "
    "recorded_at, json_valid(data) AND json_valid(metadata) AND length(event_id) = 32 "
    "AND length(recorded_at) = 26 AND substr(recorded_at, 11, 1) = ' ' "
    "FROM events WHERE position > ? AND position <= ? ORDER BY position LIMIT ?"
)
#: _SQLITE_FAST for a page holding a blob where it builds a JSON array (json_array
#: refuses blobs, failing the whole statement): the same columns without the arrays, and
#: every row sent to the canonical path (which reports such a value, see _Pass._hash).
_SQLITE_NO_JSON: Final = (
    "SELECT position, stream_id, version, hash, stream_category, NULL, event_id, NULL, "
    "data, metadata, NULL, recorded_at, 0 FROM events WHERE position > ? AND position <= ? "
    "ORDER BY position LIMIT ?"
)
_JSON_REFUSED: Final = "JSON cannot hold BLOB values"
#: SQLite: rows read and checked per trip to a worker thread (~3 ms at ~6 us a row,
#: reading included); PostgreSQL: rows checked per trip (~2 ms, ~15 us a row
#: canonicalising the documents).
_TRIP_SQLITE: Final = 512
#: Rows checked between two moments a worker thread hands the GIL over (:func:`_let_go`):
#: ~1 ms of work. A thread running Python otherwise keeps the GIL until the caller's
#: loop has waited the whole 5 ms switch interval for it, at every wake of the loop
#: (200k events, side by side: every 256 rows, loop late by max 11-22 ms, p99 6-12;
#: never, 15-35 / 10-14; every 128 or 512 rows, worse on one or the other).
_YIELD_FAST: Final = 256
_YIELD_CANONICAL: Final = 64
_HOP_CANONICAL: Final = 128
#: The rows' upper bound when a pass has none (a PostgreSQL bigint).
_NO_END: Final = (1 << 63) - 1
#: A stream's last event before a range's first position: where the range's check of
#: that stream starts (:func:`_check_range`).
#: SQLite: one query for a trip's streams (a JSON array): ~3 us a stream, where a
#: query each cost ~10 us (measured).
_SEED_SQLITE: Final = (
    "SELECT e.stream_id, e.version, e.hash FROM json_each(?) AS s JOIN events AS e "
    "ON e.position = (SELECT max(position) FROM events WHERE stream_id = s.value "
    "AND position < ?)"
)
_SEED_POSTGRES: Final = (
    "SELECT DISTINCT ON (stream_id) stream_id, version, hash FROM events "
    "WHERE stream_id = ANY($1::text[]) AND position < $2 ORDER BY stream_id, position DESC"
)
_FULL_ROW: Final = (
    "SELECT "  # noqa: S608
    + _COLUMNS.format(event_id="event_id", data="data", metadata="metadata")
    + " FROM events WHERE position = $1"
)


@dataclass(frozen=True, slots=True)
class BrokenLink:
    """Where verification failed. ``expected``/``found`` are hashes, or versions/positions."""

    stream_id: str | None
    version: int | None
    position: int | None
    reason: str
    expected: str
    found: str

    def __str__(self) -> str:
        where = f"stream {self.stream_id!r} version {self.version} (position {self.position})"
        if self.stream_id is None:
            where = f"position {self.position}"
        return f"{where}: {self.reason} (expected {self.expected}, found {self.found})"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    streams: int
    events: int
    head_position: int
    broken: BrokenLink | None
    archived_events: int = 0
    archives: int = 0
    #: The stored Merkle tree's size, and the kept checkpoint's (None without one).
    tree_size: int = 0
    checkpoint_size: int | None = None
    #: Archived positions whose leaf is the stand-in for events archived before the
    #: tree existed (:data:`eventstore.merkle.PLACEHOLDER_LEAF`): not provable one by one.
    placeholder_leaves: int = 0
    #: How many processes checked the events: 1 when this one did (:func:`verify`).
    processes: int = 1

    @property
    def ok(self) -> bool:
        return self.broken is None

    @property
    def first_position(self) -> int | None:
        """The first position affected by what was found (None when nothing was)."""
        return None if self.broken is None else self.broken.position


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
    records = await load_records(conn)
    state = await merkle.load_state(conn)
    suspect = None if checkpoint is None else await _check_tree(conn, state, checkpoint)

    def new_pass() -> _Pass:
        return _Pass(
            records, state.size, checkpoint, fast=conn.dialect.name == "sqlite",
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
            await check.finish(conn)
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


def _sqlite_trip(db: Any, check: _Pass, after: int, end: int, size: int) -> int | None:
    """Read and check the rows after position ``after`` (up to ``end``, at most ``size``)
    on the sqlite3 connection ``db``; the last position read, or None past the last."""
    try:
        rows = db.execute(_SQLITE_FAST, (after, end, size)).fetchall()
    except sqlite3.OperationalError as error:
        if _JSON_REFUSED not in str(error):
            raise
        rows = db.execute(_SQLITE_NO_JSON, (after, end, size)).fetchall()
    if not rows:
        return None
    if not check.whole:
        fresh = check.unseen(rows)
        found = []
        if fresh and check.start > 1:
            found = db.execute(_SEED_SQLITE, (json.dumps(fresh), check.start)).fetchall()
        check.seed(fresh, found)
    last = int(rows[-1][0])
    count = max(0, min(last, check.tree_size) - after)
    tiles = db.execute(merkle.LEVEL0_SQL, merkle.level0_span(after, count))
    stored = merkle.leaf_run(tiles, after, count)
    start = 0
    full_row = _FULL_ROW.replace("$1", "?")
    while start < len(rows):
        slow = check.sqlite_rows(rows, stored, after, start)
        if slow is None:
            break
        check.slow_row(db.execute(full_row, (rows[slow][0],)).fetchone(), stored, after)
        if check.broken is not None:
            break
        start = slow + 1
    return last


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


#: Below this many events, the default is to check in this process: starting a child
#: (a new interpreter importing this package) costs about what checking ~50k events does.
_RANGES_FROM: Final = 200_000
#: At most this many children by default (measured with two, on a 2-core machine).
_PROCESSES_DEFAULT: Final = 8
#: The position of the last event, where the ranges end.
_HEAD_SQL: Final = "SELECT max(position) FROM events"


class _RangeFailed(Exception):
    """A child process could not check its range (it reports why)."""


@dataclass(frozen=True, slots=True)
class _Range:
    """What a child process checks: positions ``start .. end`` of the log at ``location``
    (a SQLite file, or a PostgreSQL DSN with its ``search_path``)."""

    backend: str
    location: str
    search_path: str | None
    records: list[ArchiveRecord]
    tree_size: int
    checkpoint: Checkpoint | None
    tree_suspect: BrokenLink | None
    start: int
    end: int
    #: Leaves per subtree root handed back: a power of two dividing ``start - 1``.
    chunk: int
    page: int | None


@dataclass(frozen=True, slots=True)
class _RangeResult:
    broken: BrokenLink | None
    count: int
    expected: int
    placeholders: int
    new_streams: int
    #: The roots of the range's whole chunks of leaves (up to the checkpoint's size),
    #: then the compact range of the rest (its subtrees, largest first).
    roots: list[bytes]
    rest: list[bytes]
    rest_size: int


class _Chunks(merkle.RootAccumulator):
    """A range's leaves, from a start aligned to ``chunk`` leaves, kept as the roots of
    whole chunks and the compact range of the rest: aligned subtrees of the whole log's
    tree, which the caller joins (:func:`_join`) into the root of every leaf."""

    __slots__ = ("chunk", "roots")

    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.chunk = chunk
        self.roots: list[bytes] = []

    def add(self, leaf: bytes) -> None:
        merkle.RootAccumulator.add(self, leaf)
        self._close()

    def extend(self, leaves: Sequence[bytes]) -> None:
        i = 0
        while i < len(leaves):
            take = min(len(leaves) - i, self.chunk - self.size)
            merkle.RootAccumulator.extend(self, leaves[i : i + take])
            self._close()
            i += take

    def _close(self) -> None:
        if self.size == self.chunk:
            self.roots.append(self.root())
            self.stack, self.size = [], 0


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
    size, each starting after a multiple of the chunk (a power of two, ~1/16 of one)."""
    per = -(-head // processes)
    chunk = 1 << max(0, (per // 16).bit_length() - 1)
    chunks = -(-head // chunk)
    bounds = sorted(
        {min(head, round(i * chunks / processes) * chunk) for i in range(processes + 1)}
    )
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
                conn.dialect.name, location[0], location[1], check.records, check.tree_size,
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


def _check_range(spec: _Range, out: Any) -> None:
    """A child process: check ``spec``'s range and send back a :class:`_RangeResult`,
    or why it could not."""
    try:
        # Background work of the host's: when both want a CPU, the host's loop goes
        # first (on two busy cores, children at the same priority held it 20-40 ms).
        os.nice(10)
        check = _Pass(
            list(spec.records), spec.tree_size, spec.checkpoint, fast=spec.backend == "sqlite",
            tree_suspect=spec.tree_suspect, accumulator=_Chunks(spec.chunk), start=spec.start,
            whole=False,
        )  # fmt: skip
        if spec.backend == "sqlite":
            _sqlite_range(spec, check)
        else:
            asyncio.run(_postgres_range(spec, check))
        acc = check.accumulator
        assert isinstance(acc, _Chunks)
        result = _RangeResult(
            check.broken, check.count, check.expected, check.placeholders,
            check.new_streams, acc.roots, acc.stack, acc.size,
        )  # fmt: skip
        out.send(result)
    except Exception as error:  # the caller checks the range itself, and sees it
        out.send(f"{type(error).__name__}: {error}")
    finally:
        out.close()


def _sqlite_range(spec: _Range, check: _Pass) -> None:
    db = sqlite3.connect(f"{Path(spec.location).as_uri()}?mode=ro", uri=True)
    try:
        after: int | None = spec.start - 1
        while after is not None and check.broken is None:
            after = _sqlite_trip(db, check, after, spec.end, spec.page or _TRIP_SQLITE)
        if check.broken is None and check.expected <= spec.end:
            first = check.expected - 1
            count = max(0, min(spec.end, check.tree_size) - first)
            tiles = db.execute(merkle.LEVEL0_SQL, merkle.level0_span(first, count)).fetchall()
            check.walk_holes(spec.end + 1, merkle.leaf_run(tiles, first, count), first)
    finally:
        db.close()


async def _postgres_range(spec: _Range, check: _Pass) -> None:
    settings = {"search_path": spec.search_path} if spec.search_path else None
    db = await asyncpg.connect(spec.location, server_settings=settings)
    level0 = merkle.LEVEL0_SQL.replace("?", "$1", 1).replace("?", "$2", 1)
    size = spec.page or 1000
    try:
        after = spec.start - 1
        while check.broken is None:
            rows = [tuple(r) for r in await db.fetch(_POSTGRES_PAGE, after, spec.end, size)]
            if not rows:
                break
            fresh = check.unseen(rows)
            found = []
            if fresh and check.start > 1:
                found = [tuple(r) for r in await db.fetch(_SEED_POSTGRES, fresh, check.start)]
            check.seed(fresh, found)
            last = int(rows[-1][0])
            count = max(0, min(last, check.tree_size) - after)
            tiles = await db.fetch(level0, *merkle.level0_span(after, count))
            check.canonical_rows(rows, merkle.leaf_run(tiles, after, count), after, 0, len(rows))
            after = last
        if check.broken is None and check.expected <= spec.end:
            first = check.expected - 1
            count = max(0, min(spec.end, check.tree_size) - first)
            tiles = await db.fetch(level0, *merkle.level0_span(first, count))
            check.walk_holes(spec.end + 1, merkle.leaf_run(tiles, first, count), first)
    finally:
        await db.close()


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


def _category(value: Any) -> bytes:
    """A stored category's bytes in the leaf: its UTF-8 text; a value of another type
    (SQLite keeps anything) gets a first byte no UTF-8 text has, so its leaf differs."""
    return value.encode() if isinstance(value, str) else b"\xff" + repr(value).encode()


def _let_go() -> None:
    """Give the GIL to a thread waiting for it (the caller's event loop) now, rather than
    after it has waited the 5 ms switch interval. Letting go of the GIL alone is not
    enough (this thread takes it back before the waiting one has woken, measured with
    ``select`` of nothing): ``sleep(0)`` gives up the CPU too, so the waiting thread
    runs. It costs nothing on an idle machine; on a busy one, other processes' turn."""
    time.sleep(0)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def _dashed(hex_id: str) -> str:
    if len(hex_id) == 32:
        return f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:]}"
    return str(uuid.UUID(hex_id))


def _iso(value: Any) -> str:
    # SQLite keeps "YYYY-MM-DD HH:MM:SS.ffffff" in UTC; the hash covers its isoformat.
    if isinstance(value, str):
        if len(value) == 26 and value[10] == " ":
            return f"{value[:10]}T{value[11:]}+00:00"
        parsed = sqlite_datetime(value)
        # Only the text the store writes (sqlite_text) stands for a time: another
        # separator, say, parses to the same time but is not what was written.
        if sqlite_text(parsed) != value:
            raise ValueError("a stored time in another form than the store writes")
        value = parsed
    return str(value.isoformat(timespec="microseconds"))


@dataclass(slots=True)
class _Pass:
    records: list[ArchiveRecord]
    tree_size: int
    checkpoint: Checkpoint | None
    fast: bool
    #: Each stream's last version and hash, in two maps of plain values: no object is
    #: made per event to hold them, and the collector never walks either map.
    versions: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    archived: list[tuple[int, int]] = field(default_factory=list)
    hole: int = 0  # index into `archived` of the first range not wholly behind us
    expected: int = 1  # the next position
    count: int = 0
    placeholders: int = 0
    broken: BrokenLink | None = None
    tree_suspect: BrokenLink | None = None
    accumulator: merkle.RootAccumulator = field(default_factory=merkle.RootAccumulator)
    #: The first position checked: a range of the log (:func:`_check_range`)
    #: starts each stream from its last event before it (:meth:`seed`).
    start: int = 1
    #: False for a range of the log checked by a child process: it starts each stream
    #: from its last event before ``start`` (:meth:`seed`), and compares no root with
    #: the checkpoint's (the caller joins the ranges' leaves).
    whole: bool = True
    looked: set[Any] = field(default_factory=set)
    #: Streams first seen by this pass with no event before ``start`` nor archived.
    new_streams: int = 0
    processes: int = 1

    def __post_init__(self) -> None:
        for record in self.records:
            for s in record.streams:
                if s.to_version > self.versions.get(s.stream_id, 0):
                    self.versions[s.stream_id] = s.to_version
                    self.hashes[s.stream_id] = s.last_hash
        self.archived = _merge([span for r in self.records for span in r.positions])
        self.expected = self.start

    def unseen(self, rows: Sequence[Any]) -> list[Any]:
        """The streams of ``rows`` not yet started (:meth:`seed`), now marked started."""
        looked = self.looked
        fresh = [r[1] for r in rows if r[1] not in looked]
        fresh = list(dict.fromkeys(fresh))
        looked.update(fresh)
        return fresh

    def seed(self, streams: Sequence[Any], found: Sequence[Any]) -> None:
        """Start ``streams`` from ``found``: each one's last event before ``start``
        (``stream_id, version, hash``), read as stored. The whole log's check would reach
        ``start`` with exactly these heads if every position before it checks out, which
        the ranges before this one prove (the caller takes the first range that fails)."""
        for stream_id, version, hash_ in found:
            self.versions[stream_id] = version
            self.hashes[stream_id] = hash_
        seen = {row[0] for row in found}
        self.new_streams += sum(1 for s in streams if s not in seen and s not in self.versions)

    def report(self) -> VerifyReport:
        return VerifyReport(
            streams=len(self.versions) + self.new_streams,
            events=self.count,
            head_position=self.expected - 1,
            broken=self.broken,
            archived_events=sum(r.count for r in self.records),
            archives=len(self.records),
            tree_size=self.tree_size,
            checkpoint_size=None if self.checkpoint is None else self.checkpoint.size,
            placeholder_leaves=self.placeholders,
            processes=self.processes,
        )

    def _archived(self, position: int) -> bool:
        ranges = self.archived
        while self.hole < len(ranges) and ranges[self.hole][1] < position:
            self.hole += 1
        return self.hole < len(ranges) and ranges[self.hole][0] <= position

    def _leaf(self, position: int, leaf: bytes, stored: bytes, first: int) -> bool:
        """Feed the leaf at ``position``; False (and ``broken`` set) if it is wrong.
        ``stored`` holds the stored tree's leaves from position ``first + 1``, 32 bytes
        each."""
        trusted = self.tree_suspect is None
        if trusted and position <= self.tree_size:
            at = (position - first - 1) * 32
            if stored[at : at + 32] != leaf:
                self.broken = BrokenLink(
                    None, None, position, "leaf differs from the Merkle tree",
                    stored[at : at + 32].hex(), leaf.hex(),
                )  # fmt: skip
                return False
        cp = self.checkpoint
        if cp is not None and position <= cp.size:
            self.accumulator.add(leaf)
            if position == cp.size and self.whole and self.accumulator.root() != cp.root:
                self.broken = self.root_differs()
                return False
        return True

    def _archived_leaf(self, position: int, leaf: bytes, stored: bytes, first: int) -> bool:
        """:meth:`_leaf` for an archived position, whose leaf only the tree holds."""
        if leaf == merkle.PLACEHOLDER_LEAF:
            self.placeholders += 1
        return self._leaf(position, leaf, stored, first)

    def _gap(self, position: int, leaves: list[bytes], stored: bytes, first: int) -> bool:
        """What must hold before the row at ``position`` is checked, when it is not simply
        the next one or lies in an archived range: the leaves so far flushed, and the
        hole before it archived. False (and ``broken`` set) if not."""
        if not self._flush(leaves, stored, first):
            return False
        leaves.clear()
        if self.expected < position and not self._holes(position, stored, first):
            return False
        if self.archived and self._archived(position):
            self.broken = BrokenLink(
                None, None, position, "event present at an archived position",
                "archived", "present",
            )  # fmt: skip
            return False
        return True

    def _version_gap(self, stream_id: str, version: int, position: int, prev: int) -> None:
        self.broken = BrokenLink(
            stream_id, version, position, "missing version in stream", str(prev + 1), str(version)
        )

    def sqlite_rows(self, rows: Sequence[Any], stored: bytes, first: int, start: int) -> int | None:
        """Check ``rows[start:]`` (read by _SQLITE_FAST); the index of a row whose hash
        needs the canonical path (:meth:`slow_row`), or None (``broken`` set if a
        check failed). The rows' leaves are checked together (:meth:`_flush`) before
        anything that stops the slice, so the first position affected is still the one
        named. ``expected`` and ``count`` are kept in locals, written back before any
        other method runs."""
        versions, hashes = self.versions, self.hashes
        sha256 = hashlib.sha256
        fromhex = bytes.fromhex
        leaves: list[bytes] = []
        add = leaves.append
        archived = bool(self.archived)
        expected, count = self.expected, self.count
        for index in range(start, len(rows)):
            if not index & (_YIELD_FAST - 1):
                _let_go()
            row = rows[index]
            position, stream_id, version, stored_hash, category, a, e, b, data, meta, c, t, ok = row
            if position != expected or archived:
                self.expected, self.count = expected, count
                if (position != expected or self._archived(position)) and not self._gap(
                    position, leaves, stored, first
                ):
                    return None
                expected = self.expected
            prev_version = versions.get(stream_id, 0)
            if version != prev_version + 1:
                self.expected, self.count = expected, count
                if self._flush(leaves, stored, first):
                    self._version_gap(stream_id, version, position, prev_version)
                return None
            # SQLite keeps the canonical text the hash covers, and the query built the
            # rest of it: one string and one SHA-256 per event.
            try:
                same = (
                    ok
                    and sha256(
                        f'["{hashes.get(stream_id, GENESIS)}",{a[1:-1]},"{e[:8]}-{e[8:12]}-'
                        f'{e[12:16]}-{e[16:20]}-{e[20:]}",{b[1:-1]},{data},{meta},{c[1:-1]},'
                        f'"{t[:10]}T{t[11:]}+00:00"]'.encode()
                    ).hexdigest()
                    == stored_hash
                )
                if same:
                    leaf = sha256(b"\x00" + fromhex(stored_hash) + category.encode()).digest()
            except (TypeError, AttributeError):  # a column of another type
                same = False
            if not same:
                self.expected, self.count = expected, count
                return index if self._flush(leaves, stored, first) else None
            versions[stream_id] = version
            hashes[stream_id] = stored_hash
            add(leaf)
            expected = position + 1
            count += 1
        self.expected, self.count = expected, count
        self._flush(leaves, stored, first)
        return None

    def canonical_rows(
        self, rows: Sequence[Any], stored: bytes, first: int, start: int, end: int
    ) -> None:
        """Check ``rows[start:end]`` (read by _POSTGRES_PAGE), each event's hash from its
        documents canonicalised again (PostgreSQL's jsonb text is not the hashed text)."""
        versions, hashes = self.versions, self.hashes
        sha256 = hashlib.sha256
        fromhex = bytes.fromhex
        leaves: list[bytes] = []
        archived = bool(self.archived)
        for index in range(start, end):
            if not index & (_YIELD_CANONICAL - 1):
                _let_go()
            row = rows[index]
            position, stream_id, version = row[0], row[1], row[3]
            if (
                (position != self.expected or archived)
                and (position != self.expected or self._archived(position))
                and not self._gap(position, leaves, stored, first)
            ):
                return
            prev_version = versions.get(stream_id, 0)
            if version != prev_version + 1:
                if self._flush(leaves, stored, first):
                    self._version_gap(stream_id, version, position, prev_version)
                return
            stored_hash = row[14]
            expected = self._hash(row, hashes.get(stream_id, GENESIS))
            if expected != stored_hash:
                if self._flush(leaves, stored, first):
                    self._mismatch(row, expected, stored_hash)
                return
            versions[stream_id] = version
            hashes[stream_id] = stored_hash
            self.count += 1
            leaves.append(sha256(b"\x00" + fromhex(stored_hash) + row[2].encode()).digest())
            self.expected = position + 1
        self._flush(leaves, stored, first)

    def _flush(self, leaves: list[bytes], stored: bytes, first: int) -> bool:
        """Check the leaves of the positions just before ``expected`` against the stored
        tree and feed the checkpoint's root: one comparison of bytes and aligned runs of
        node hashes (:meth:`merkle.RootAccumulator.extend`) when all is well, leaf by
        leaf (:meth:`_leaf`) to name the first one that is not. False if one is wrong."""
        if not leaves:
            return True
        base = self.expected - len(leaves)  # the position of leaves[0]
        in_tree = min(len(leaves), max(0, self.tree_size - base + 1))
        at = (base - first - 1) * 32
        if self.tree_suspect is None and stored[at : at + 32 * in_tree] != b"".join(
            leaves[:in_tree]
        ):
            for offset, leaf in enumerate(leaves):
                if not self._leaf(base + offset, leaf, stored, first):
                    self.count -= len(leaves) - offset - 1
                    self.expected = base + offset
                    return False
            return True  # not reached: a leaf differs
        cp = self.checkpoint
        if cp is not None and base <= cp.size:
            covered = min(len(leaves), cp.size - base + 1)
            self.accumulator.extend(leaves[:covered])
            if base + covered - 1 == cp.size and self.whole and self.accumulator.root() != cp.root:
                self.broken = self.root_differs()
                self.count -= len(leaves) - covered
                self.expected = cp.size
                return False
        return True

    def slow_row(self, full: Any, stored: bytes, first: int) -> None:
        """The canonical check of a row whose fast hash did not match (its position and
        version already checked by :meth:`sqlite_rows`), given all its columns."""
        prev_hash = self.hashes.get(full[1], GENESIS)
        expected = self._hash(full, prev_hash)
        if expected != full[14]:
            self._mismatch(full, expected, full[14])
            return
        self.versions[full[1]] = full[3]
        self.hashes[full[1]] = full[14]
        self.count += 1
        leaf = hashlib.sha256(b"\x00" + bytes.fromhex(full[14]) + _category(full[2])).digest()
        if self._leaf(full[0], leaf, stored, first):
            self.expected = full[0] + 1

    def _mismatch(self, row: Any, expected: str, found: str) -> None:
        self.broken = BrokenLink(
            row[1], row[3], row[0], "hash does not match content", expected, str(found)
        )

    def root_differs(self) -> BrokenLink:
        """The failure of a log whose leaves up to the checkpoint's size have another root:
        with a trusted tree a changed leaf was named before; without one, the root alone
        cannot say which leaf changed."""
        cp = self.checkpoint
        assert cp is not None
        also = "" if self.tree_suspect is None else ", and the stored tree was altered too"
        return BrokenLink(
            None, None, 1, f"the log's root differs from the checkpoint's{also}",
            cp.root_hex, self.accumulator.root().hex(),
        )  # fmt: skip

    def walk_holes(self, position: int, stored: bytes, first: int) -> bool:
        """:meth:`_holes`, for a range whose last positions hold no event."""
        return self._holes(position, stored, first)

    def _holes(self, position: int, stored: bytes, first: int) -> bool:
        """Walk the hole before ``position``: archived positions only (their leaves from
        the tree). False (and ``broken`` set) at the first position that is not."""
        while self.expected < position:
            gap = self.expected
            if not self._archived(gap):
                self.broken = BrokenLink(
                    None, None, gap, "hole in global positions", str(gap), "missing"
                )
                return False
            if gap <= self.tree_size:
                at = (gap - first - 1) * 32
                if not self._archived_leaf(gap, stored[at : at + 32], stored, first):
                    return False
            elif self.checkpoint is not None and gap <= self.checkpoint.size:
                self.broken = BrokenLink(
                    None, None, gap, "archived position missing from the tree", "leaf", "-"
                )
                return False
            self.expected += 1
        return True

    @staticmethod
    def _hash(row: Any, prev_hash: str) -> str:
        # Canonicalise the stored documents (PostgreSQL's jsonb text is not the hashed
        # text; on SQLite, text someone rewrote may not be either). A value no append
        # could have written (not JSON, not an id or a time, another type: SQLite keeps
        # anything) cannot be what was hashed.
        try:
            data = canonical_json(parse_json(row[7]) if isinstance(row[7], str) else row[7])
            metadata = canonical_json(parse_json(row[8]) if isinstance(row[8], str) else row[8])
            return link_hash(
                prev_hash,
                json_text(row[1]),
                row[3],
                hash_tail(
                    event_id=_dashed(str(row[4])),
                    event_type=row[5],
                    schema_version=row[6],
                    data_json=data,
                    metadata_json=metadata,
                    actor_id=row[9],
                    correlation_id=row[10],
                    causation_id=row[11],
                    command_id=row[12],
                    recorded_at=_IsoText(_iso(row[13])),  # type: ignore[arg-type]
                ),
            )
        except (ValueError, TypeError, AttributeError) as error:
            return f"not the hashed form ({type(error).__name__})"

    async def finish(self, conn: AsyncConnection) -> None:
        """After the last event: archived positions at the tail, and a log that ends
        before the checkpoint's size (truncated)."""
        end = max(self.tree_size, self.checkpoint.size if self.checkpoint else 0)
        while self.expected <= end and self._archived(self.expected):
            gap = self.expected
            stored = await merkle.stored_leaf_run(conn, gap - 1, 1)
            if gap <= self.tree_size and not self._archived_leaf(gap, stored, stored, gap - 1):
                return
            self.expected += 1
        limit = self.checkpoint.size if self.checkpoint else self.tree_size
        if self.expected > limit:
            self.broken = self.tree_suspect  # the events are fine; the stored tree is not
        else:
            self.broken = BrokenLink(
                None, None, self.expected,
                "the log ends before the " + ("checkpoint" if self.checkpoint else "tree"),
                str(limit), str(self.expected - 1),
            )  # fmt: skip


class _IsoText(str):
    """A timestamp already in the hashed text form: ``isoformat`` gives it back."""

    __slots__ = ()

    def isoformat(self, timespec: str = "auto") -> str:
        return str(self)


__all__ = ["BrokenLink", "VerifyReport", "verify"]
