"""Walk every stream's hash chain and the log's positions; report the first broken link.

Retention (:mod:`eventstore.retention`) is the one path that removes events. Its
``AuditArchived`` records say which positions left the log and, per archived
stream, the last archived version and hash: a stream whose start was archived is
verified from that hash, and a hole in positions is accepted exactly where a record
says events were removed. A hole anywhere else, or an archived stream that does not
resume right after its archived prefix, is still a broken link.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from eventstore.hashing import GENESIS, event_hash
from eventstore.retention import ArchiveRecord, load_records
from eventstore.schema import events


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

    @property
    def ok(self) -> bool:
        return self.broken is None


async def verify(conn: AsyncConnection, *, page_size: int = 2000) -> VerifyReport:
    """Recompute every stream's chain in (stream, version) order, then check positions.

    Reads in keyset pages over the ``(stream_id, version)`` unique index, so memory
    stays flat however long the log is. Stops at the first broken link.
    """
    records = await load_records(conn)
    starts = _archived_starts(records)
    archived = sum(r.count for r in records)
    streams = 0
    count = 0
    current: str | None = None
    prev_hash = GENESIS
    prev_version = 0
    cursor: tuple[str, int] | None = None
    while True:
        query = select(events).order_by(events.c.stream_id, events.c.version).limit(page_size)
        if cursor is not None:
            query = query.where(tuple_(events.c.stream_id, events.c.version) > cursor)
        rows = (await conn.execute(query)).mappings().all()
        if not rows:
            break
        for row in rows:
            if row["stream_id"] != current:
                current = row["stream_id"]
                streams += 1
                prev_version, prev_hash = starts.get(current, (0, GENESIS))
            count += 1
            if row["version"] != prev_version + 1:
                return VerifyReport(
                    streams,
                    count,
                    0,
                    BrokenLink(
                        current,
                        row["version"],
                        row["position"],
                        "missing version in stream",
                        str(prev_version + 1),
                        str(row["version"]),
                    ),
                )
            expected = event_hash(
                prev_hash=prev_hash,
                stream_id=row["stream_id"],
                version=row["version"],
                event_id=str(row["event_id"]),
                event_type=row["event_type"],
                schema_version=row["schema_version"],
                data=row["data"],
                metadata=row["metadata"],
                actor_id=row["actor_id"],
                correlation_id=row["correlation_id"],
                causation_id=row["causation_id"],
                command_id=row["command_id"],
                recorded_at=row["recorded_at"],
            )
            if expected != row["hash"]:
                return VerifyReport(
                    streams,
                    count,
                    0,
                    BrokenLink(
                        current,
                        row["version"],
                        row["position"],
                        "hash does not match content",
                        expected,
                        row["hash"],
                    ),
                )
            prev_hash = row["hash"]
            prev_version = row["version"]
        last = rows[-1]
        cursor = (last["stream_id"], last["version"])
    head, total = (await conn.execute(select(func.max(events.c.position), func.count()))).one()
    head = int(head or 0)
    if head != total or records:
        broken = await _check_holes(conn, records, head, total)
        if broken is not None:
            return VerifyReport(streams, count, head, broken, archived, len(records))
    return VerifyReport(streams, count, head, None, archived, len(records))


def _archived_starts(records: list[ArchiveRecord]) -> dict[str, tuple[int, str]]:
    """Per stream, the last archived version and its hash (the latest archive wins)."""
    starts: dict[str, tuple[int, str]] = {}
    for record in records:
        for s in record.streams:
            if s.to_version > starts.get(s.stream_id, (0, ""))[0]:
                starts[s.stream_id] = (s.to_version, s.last_hash)
    return starts


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def _covered(span: tuple[int, int], archived: list[tuple[int, int]]) -> int | None:
    """The first position of ``span`` no archived range covers, or None."""
    position = span[0]
    for a, b in archived:
        if b < position:
            continue
        if a > position:
            break
        position = b + 1
        if position > span[1]:
            return None
    return position if position <= span[1] else None


async def _check_holes(
    conn: AsyncConnection, records: list[ArchiveRecord], head: int, total: int
) -> BrokenLink | None:
    archived = _merge([span for r in records for span in r.positions])
    gaps: list[tuple[int, int]] = []
    low = await conn.scalar(select(func.min(events.c.position)))
    if low is not None and low > 1:
        gaps.append((1, int(low) - 1))
    nxt = func.lead(events.c.position).over(order_by=events.c.position).label("next")
    pairs = select(events.c.position, nxt).subquery()
    rows = await conn.execute(
        select(pairs.c.position, pairs.c.next)
        .where(pairs.c.next > pairs.c.position + 1)
        .order_by(pairs.c.position)
    )
    gaps.extend((int(p) + 1, int(n) - 1) for p, n in rows)
    for gap in gaps:
        uncovered = _covered(gap, archived)
        if uncovered is not None:
            return BrokenLink(
                None, None, uncovered, "hole in global positions", str(uncovered), "missing"
            )
    missing = head - total
    removed = sum(b - a + 1 for a, b in archived if a <= head)
    if missing != removed:
        # Every hole is archived, yet fewer positions are missing than were archived:
        # an event reappeared at an archived position.
        for a, b in archived:
            present = await conn.scalar(
                select(func.min(events.c.position)).where(events.c.position.between(a, b))
            )
            if present is not None:
                return BrokenLink(
                    None,
                    None,
                    int(present),
                    "event present at an archived position",
                    "archived",
                    "present",
                )
    return None
