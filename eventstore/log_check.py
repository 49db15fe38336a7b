"""The checks :func:`eventstore.integrity.verify` runs on the log's rows, and the entry
of a child process that checks a range of positions (:func:`_check_range`).

This module imports the standard library and the hashing and tree helpers only (no
SQLAlchemy, no asyncpg until a PostgreSQL range needs it): a child process started by
``spawn`` imports it, and importing the whole package cost ~0.5 s of CPU a child, a
tenth of a child's work at 1M events.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from eventstore.hashing import (
    GENESIS,
    canonical_json,
    hash_tail,
    json_text,
    link_hash,
    parse_json,
)
from eventstore.offline_verify import Checkpoint
from eventstore.tiles import LEVEL0_SQL, PLACEHOLDER_LEAF, RootAccumulator, leaf_run, level0_span

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
    #: tree existed (:data:`eventstore.tiles.PLACEHOLDER_LEAF`): not provable one by one.
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
    tiles = db.execute(LEVEL0_SQL, level0_span(after, count))
    stored = leaf_run(tiles, after, count)
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


@dataclass(frozen=True, slots=True)
class _Range:
    """What a child process checks: positions ``start .. end`` of the log at ``location``
    (a SQLite file, or a PostgreSQL DSN with its ``search_path``)."""

    backend: str
    location: str
    search_path: str | None
    archive: Archive
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


class _Chunks(RootAccumulator):
    """A range's leaves, from a start aligned to ``chunk`` leaves, kept as the roots of
    whole chunks and the compact range of the rest: aligned subtrees of the whole log's
    tree, which the caller joins (:func:`_join`) into the root of every leaf."""

    __slots__ = ("chunk", "roots")

    def __init__(self, chunk: int) -> None:
        super().__init__()
        self.chunk = chunk
        self.roots: list[bytes] = []

    def add(self, leaf: bytes) -> None:
        RootAccumulator.add(self, leaf)
        self._close()

    def extend(self, leaves: Sequence[bytes]) -> None:
        i = 0
        while i < len(leaves):
            take = min(len(leaves) - i, self.chunk - self.size)
            RootAccumulator.extend(self, leaves[i : i + take])
            self._close()
            i += take

    def _close(self) -> None:
        if self.size == self.chunk:
            self.roots.append(self.root())
            self.stack, self.size = [], 0


def _check_range(spec: _Range, out: Any) -> None:
    """A child process: check ``spec``'s range and send back a :class:`_RangeResult`,
    or why it could not."""
    try:
        # Background work of the host's: when both want a CPU, the host's loop goes
        # first (on two busy cores, children at the same priority held it 20-40 ms).
        os.nice(10)
        check = _Pass(
            spec.archive, spec.tree_size, spec.checkpoint, fast=spec.backend == "sqlite",
            tree_suspect=spec.tree_suspect, accumulator=_Chunks(spec.chunk), start=spec.start,
            whole=False, shares_gil=False,
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
            tiles = db.execute(LEVEL0_SQL, level0_span(first, count)).fetchall()
            check.walk_holes(spec.end + 1, leaf_run(tiles, first, count), first)
    finally:
        db.close()


async def _postgres_range(spec: _Range, check: _Pass) -> None:
    settings = {"search_path": spec.search_path} if spec.search_path else None
    import asyncpg  # noqa: PLC0415  # a SQLite child never needs it

    db = await asyncpg.connect(spec.location, server_settings=settings)
    level0 = LEVEL0_SQL.replace("?", "$1", 1).replace("?", "$2", 1)
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
            tiles = await db.fetch(level0, *level0_span(after, count))
            check.canonical_rows(rows, leaf_run(tiles, after, count), after, 0, len(rows))
            after = last
        if check.broken is None and check.expected <= spec.end:
            first = check.expected - 1
            count = max(0, min(spec.end, check.tree_size) - first)
            tiles = await db.fetch(level0, *level0_span(first, count))
            check.walk_holes(spec.end + 1, leaf_run(tiles, first, count), first)
    finally:
        await db.close()


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


def _dashed(hex_id: str) -> str:
    if len(hex_id) == 32:
        return f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:]}"
    return str(uuid.UUID(hex_id))


def _iso(value: Any) -> str:
    # SQLite keeps "YYYY-MM-DD HH:MM:SS.ffffff" in UTC; the hash covers its isoformat.
    if isinstance(value, str):
        if len(value) == 26 and value[10] == " ":
            return f"{value[:10]}T{value[11:]}+00:00"
        from eventstore.types import sqlite_datetime, sqlite_text  # noqa: PLC0415  # SQLAlchemy's

        parsed = sqlite_datetime(value)
        # Only the text the store writes (sqlite_text) stands for a time: another
        # separator, say, parses to the same time but is not what was written.
        if sqlite_text(parsed) != value:
            raise ValueError("a stored time in another form than the store writes")
        value = parsed
    return str(value.isoformat(timespec="microseconds"))


@dataclass(frozen=True, slots=True)
class Archive:
    """What retention's records (``AuditArchived``) tell a check: the positions that left
    the log, merged into ranges in order, and each archived stream's last version and
    hash (where its remaining events chain from)."""

    spans: list[tuple[int, int]] = field(default_factory=list)
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)
    events: int = 0
    records: int = 0


@dataclass(slots=True)
class _Pass:
    archive: Archive
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
    accumulator: RootAccumulator = field(default_factory=RootAccumulator)
    #: The first position checked: a range of the log (:func:`_check_range`)
    #: starts each stream from its last event before it (:meth:`seed`).
    start: int = 1
    #: False for a range of the log checked by a child process: it starts each stream
    #: from its last event before ``start`` (:meth:`seed`), and compares no root with
    #: the checkpoint's (the caller joins the ranges' leaves).
    whole: bool = True
    #: Whether the checking thread hands the GIL over now and then (:func:`_let_go`):
    #: in the host's process, to its event loop; a child process has no other thread,
    #: and each hand-over gives its CPU away too (~0.2 ms a time on a busy machine).
    shares_gil: bool = True
    looked: set[Any] = field(default_factory=set)
    #: Streams first seen by this pass with no event before ``start`` nor archived.
    new_streams: int = 0
    processes: int = 1

    def __post_init__(self) -> None:
        for stream_id, (version, hash_) in self.archive.heads.items():
            self.versions[stream_id] = version
            self.hashes[stream_id] = hash_
        self.archived = self.archive.spans
        self.expected = self.start

    def unseen(self, rows: Sequence[Any]) -> list[Any]:
        """The streams of ``rows`` not yet started (:meth:`seed`), now marked started, in
        no particular order (a set difference: 0.2 us an event, against 0.25-0.3 for a
        list kept in order, measured at 1M)."""
        fresh = {r[1] for r in rows} - self.looked
        self.looked.update(fresh)
        return list(fresh)

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
            archived_events=self.archive.events,
            archives=self.archive.records,
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
        if leaf == PLACEHOLDER_LEAF:
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
        versions, hashes, shares_gil = self.versions, self.hashes, self.shares_gil
        sha256 = hashlib.sha256
        fromhex = bytes.fromhex
        leaves: list[bytes] = []
        add = leaves.append
        archived = bool(self.archived)
        expected, count = self.expected, self.count
        for index in range(start, len(rows)):
            if shares_gil and not index & (_YIELD_FAST - 1):
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
        versions, hashes, shares_gil = self.versions, self.hashes, self.shares_gil
        sha256 = hashlib.sha256
        fromhex = bytes.fromhex
        leaves: list[bytes] = []
        archived = bool(self.archived)
        for index in range(start, end):
            if shares_gil and not index & (_YIELD_CANONICAL - 1):
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
        node hashes (:meth:`RootAccumulator.extend`) when all is well, leaf by
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

    async def finish(self, stored_leaf: Callable[[int], Awaitable[bytes]]) -> None:
        """After the last event: archived positions at the tail, and a log that ends
        before the checkpoint's size (truncated). ``stored_leaf(position)``: the stored
        tree's leaf at ``position``."""
        end = max(self.tree_size, self.checkpoint.size if self.checkpoint else 0)
        while self.expected <= end and self._archived(self.expected):
            gap = self.expected
            stored = await stored_leaf(gap)
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


__all__ = ["Archive", "BrokenLink", "VerifyReport"]
