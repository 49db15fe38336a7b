"""Retention: move old events of one category out of the log, through one audited path.

The only way rows ever leave ``events``. For a category whose streams nothing is
rebuilt from (``security``), events recorded before a cutoff are

1. written to a gzip JSONL archive (one JSON object per event, every column), which
   is fsynced and renamed into place before anything is deleted, so a failed delete
   leaves a harmless file and a failed write deletes nothing;
2. then, in ONE transaction, deleted and replaced by an ``AuditArchived`` record in
   stream ``retention-<archive id>`` (category ``retention``) carrying the removed
   positions, the SHA-256 of the archive file and, per archived stream, the last
   archived version and its hash. The append-only trigger lets the DELETE through
   only because the transaction sets ``tiu.retention`` (PostgreSQL) or holds a row of
   ``retention_pass`` (SQLite). The Merkle tree is extended first, in the same
   transaction, so the removed events' leaves stay in it and they stay provable.

Each stream keeps its newest event even when it is older than the cutoff: the head
row is what the store continues the stream's version and hash chain from, so later
appends to an archived stream stay chained. :func:`eventstore.integrity.verify`
reads the records to start each archived stream's chain from the recorded hash and
to accept holes in positions exactly where events were archived.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import and_, delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from eventstore import merkle, telemetry
from eventstore.errors import EventStoreError
from eventstore.hashing import canonical_json
from eventstore.records import NO_STREAM, EventContext, NewEvent
from eventstore.schema import events, retention_pass
from eventstore.sqlite_driver import OFF_LOOP
from eventstore.store import EventStore

RETENTION_CATEGORY: Final = "retention"
ARCHIVED_EVENT: Final = "AuditArchived"
DEFAULT_CATEGORY: Final = "security"


class RetentionError(EventStoreError):
    """An archive could not be written or applied; nothing was deleted."""


@dataclass(frozen=True, slots=True)
class ArchivedStream:
    stream_id: str
    from_version: int
    to_version: int
    last_hash: str


@dataclass(frozen=True, slots=True)
class ArchiveRecord:
    """One ``AuditArchived`` event, as verification and reports read it."""

    archive_id: str
    position: int
    category: str
    before: datetime
    file: str
    sha256: str
    count: int
    positions: tuple[tuple[int, int], ...]
    streams: tuple[ArchivedStream, ...]

    @classmethod
    def from_data(cls, position: int, data: Mapping[str, Any]) -> ArchiveRecord:
        return cls(
            archive_id=str(data["archive_id"]),
            position=position,
            category=str(data["category"]),
            before=datetime.fromisoformat(str(data["before"])),
            file=str(data["file"]),
            sha256=str(data["sha256"]),
            count=int(data["count"]),
            positions=tuple((int(a), int(b)) for a, b in data["positions"]),
            streams=tuple(
                ArchivedStream(s, int(v["from_version"]), int(v["to_version"]), str(v["last_hash"]))
                for s, v in sorted(data["streams"].items())
            ),
        )


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    archive_id: str | None
    path: Path | None
    count: int
    streams: int
    sha256: str | None
    record_position: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "archive_id": self.archive_id,
            "file": str(self.path) if self.path else None,
            "events": self.count,
            "streams": self.streams,
            "sha256": self.sha256,
            "record_position": self.record_position,
        }


def ranges(positions: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted positions folded into inclusive ``(first, last)`` runs."""
    out: list[tuple[int, int]] = []
    for p in sorted(positions):
        if out and p == out[-1][1] + 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def row_to_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """An ``events`` row as the archive stores it: every column, JSON types."""
    out = {c.name: row[c.name] for c in events.columns}
    out["event_id"] = str(out["event_id"])
    out["recorded_at"] = out["recorded_at"].isoformat(timespec="microseconds")
    return out


def read_archive(path: str | Path) -> Iterator[dict[str, Any]]:
    """The events of an archive file, as written (``recorded_at`` as a datetime).

    A file that cannot be read or is not an archive (not gzip, not JSON lines, a row
    that is not an object with every column of ``events``) raises
    :class:`RetentionError` naming it: reading and parsing raised ``OSError`` (which a
    caller's store-error translation reports as an unreachable database),
    ``ValueError``, ``EOFError``, or a ``KeyError`` wherever a missing column was read."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not row.keys() >= _ARCHIVE_COLUMNS:
                        raise RetentionError(
                            f"{path} is not an audit archive: line {number} is not an event"
                        )
                    row["recorded_at"] = datetime.fromisoformat(row["recorded_at"])
                    yield row
    except (OSError, EOFError, ValueError, TypeError) as error:
        raise RetentionError(f"cannot read archive {path}: {error}") from error


#: What every row of an archive holds: the columns of ``events`` (``row_to_json``).
_ARCHIVE_COLUMNS: Final = frozenset(c.name for c in events.columns)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


async def load_records(conn: AsyncConnection) -> list[ArchiveRecord]:
    """Every archive record in the log, oldest first."""
    rows = await conn.execute(
        select(events.c.position, events.c.data)
        .where(
            events.c.stream_category == RETENTION_CATEGORY,
            events.c.event_type == ARCHIVED_EVENT,
        )
        .order_by(events.c.position)
    )
    return [ArchiveRecord.from_data(position, data) for position, data in rows]


async def _candidates(conn: AsyncConnection, category: str, before: datetime) -> list[Any]:
    # Each stream's newest event stays: appends continue the chain from it.
    heads = (
        select(events.c.stream_id, func.max(events.c.version).label("head"))
        .where(events.c.stream_category == category)
        .group_by(events.c.stream_id)
        .subquery()
    )
    query = (
        select(events)
        .join(heads, heads.c.stream_id == events.c.stream_id)
        .where(
            events.c.stream_category == category,
            events.c.recorded_at < before,
            events.c.version < heads.c.head,
        )
        .order_by(events.c.stream_id, events.c.version)
    )
    # Both scans grow with the category's events: on SQLite they run on a worker thread.
    rows = (await conn.execute(query.execution_options(**{OFF_LOOP: True}))).mappings().all()
    first_rows = await conn.execute(
        select(events.c.stream_id, func.min(events.c.version))
        .where(events.c.stream_category == category)
        .group_by(events.c.stream_id)
        .execution_options(**{OFF_LOOP: True})
    )
    firsts: dict[str, int] = {sid: int(v) for sid, v in first_rows}
    # Only a prefix of each stream may go (the chain then starts after it): stop a
    # stream at its first version gap (a later event recorded before an earlier one).
    kept: list[Any] = []
    expected: dict[str, int] = {}
    for row in rows:
        sid = row["stream_id"]
        want: int = expected.get(sid, firsts[sid])
        if row["version"] != want:
            expected[sid] = -1
            continue
        expected[sid] = want + 1
        kept.append(row)
    return kept


def _write_archive(path: Path, rows: Sequence[Mapping[str, Any]]) -> str:
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                for row in rows:
                    gz.write(canonical_json(row_to_json(row)).encode() + b"\n")
            raw.flush()
            os.fsync(raw.fileno())
        # Prove the file reads back complete before anything is deleted.
        if sum(1 for _ in read_archive(partial)) != len(rows):
            raise RetentionError(f"archive {partial} did not read back complete")
        os.replace(partial, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RetentionError) as error:
        partial.unlink(missing_ok=True)
        raise RetentionError(f"cannot write archive {path}: {error}") from error
    return file_sha256(path)


def default_archive_path(category: str, before: datetime, directory: Path | None = None) -> Path:
    name = f"tiu-{category}-before-{before.strftime('%Y%m%dT%H%M%SZ')}.jsonl.gz"
    return (directory or Path.cwd()) / name


async def archive(
    store: EventStore,
    *,
    before: datetime,
    output: Path | None = None,
    category: str = DEFAULT_CATEGORY,
    actor_id: str | None = None,
) -> ArchiveReport:
    """Archive ``category`` events recorded before ``before`` to ``output`` and remove
    them from the log. Returns an empty report (no file) when nothing qualifies.

    ``store`` must accept the ``retention`` category. The caller chooses which
    categories may be archived at all: never one that projections are rebuilt from.
    """
    if category == RETENTION_CATEGORY:
        raise RetentionError("archive records are never archived")
    if before.tzinfo is None:
        raise RetentionError("the cutoff must be timezone-aware")
    path = (output or default_archive_path(category, before)).resolve()
    if path.exists():
        raise RetentionError(f"archive file {path} already exists; choose another --output")
    with telemetry.archive(store.engine, category) as span:
        report = await _archive(store, before, path, category, actor_id)
        span.set_attribute("tiu.archive.events", report.count)
    return report


async def _archive(
    store: EventStore, before: datetime, path: Path, category: str, actor_id: str | None
) -> ArchiveReport:
    archive_id = uuid.uuid4().hex
    report = ArchiveReport(None, None, 0, 0, None, None)
    # Lazy: the candidates are read and the archive written (on a worker thread: gzip
    # and fsync) before the write transaction begins, so no write lock is held while
    # the file is made. Rows only ever leave the log through here, so what was read is
    # still there at the DELETE unless another archiver took it, which the count of
    # deleted rows catches (and rolls back).
    async with store.transaction(lazy=True) as uow:
        conn = uow.conn
        rows = await _candidates(conn, category, before)
        if not rows:
            return report
        await conn.commit()  # no transaction stays open while the file is written
        sha = await asyncio.to_thread(_write_archive, path, rows)
        await uow.begin()
        streams: dict[str, dict[str, Any]] = {}
        for row in rows:
            entry = streams.setdefault(row["stream_id"], {"from_version": row["version"]})
            entry["to_version"] = row["version"]
            entry["last_hash"] = row["hash"]
        # The tree must hold the leaves of the events about to leave the log: archived
        # events stay provable against every checkpoint (eventstore.merkle).
        await merkle.extend(conn)
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:  # the append-only trigger lets a DELETE through only while this row is
            await conn.execute(insert(retention_pass).values(archive_id=archive_id))
        else:
            await conn.execute(text("SET LOCAL tiu.retention = 'on'"))
        deleted = 0
        for stream_id, entry in streams.items():
            result = await conn.execute(
                delete(events).where(
                    and_(
                        events.c.stream_id == stream_id,
                        events.c.version.between(entry["from_version"], entry["to_version"]),
                    )
                )
            )
            deleted += int(result.rowcount)
        if deleted != len(rows):  # another archiver got there first: roll back
            raise RetentionError(f"expected to remove {len(rows)} events, removed {deleted}")
        if sqlite:
            await conn.execute(delete(retention_pass))
        record = {
            "archive_id": archive_id,
            "category": category,
            "before": before.isoformat(),
            "file": path.name,
            "sha256": sha,
            "count": len(rows),
            "positions": [list(r) for r in ranges(r["position"] for r in rows)],
            "streams": streams,
        }
        uow.append(
            f"{RETENTION_CATEGORY}-{archive_id}",
            RETENTION_CATEGORY,
            [NewEvent(ARCHIVED_EVENT, record)],
            NO_STREAM,
            context=EventContext(actor_id=actor_id, correlation_id=archive_id),
        )
    position = uow.results[0].last_position if uow.results else None
    return ArchiveReport(archive_id, path, len(rows), len(streams), sha, position)


__all__ = [
    "ARCHIVED_EVENT",
    "RETENTION_CATEGORY",
    "ArchiveRecord",
    "ArchiveReport",
    "ArchivedStream",
    "RetentionError",
    "archive",
    "default_archive_path",
    "file_sha256",
    "load_records",
    "ranges",
    "read_archive",
    "row_to_json",
]
