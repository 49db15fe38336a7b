"""Walk every stream's hash chain and the log's positions; report the first broken link."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from eventstore.hashing import GENESIS, event_hash
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

    @property
    def ok(self) -> bool:
        return self.broken is None


async def verify(conn: AsyncConnection, *, page_size: int = 2000) -> VerifyReport:
    """Recompute every stream's chain in (stream, version) order, then check positions.

    Reads in keyset pages over the ``(stream_id, version)`` unique index, so memory
    stays flat however long the log is. Stops at the first broken link.
    """
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
                prev_hash = GENESIS
                prev_version = 0
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
    if head != total:
        first_hole = await _first_hole(conn)
        return VerifyReport(
            streams,
            count,
            head,
            BrokenLink(
                None, None, first_hole, "hole in global positions", str(first_hole), "missing"
            ),
        )
    return VerifyReport(streams, count, head, None)


async def _first_hole(conn: AsyncConnection) -> int:
    e2 = events.alias("next")
    query = (
        select(func.min(events.c.position + 1))
        .select_from(events.outerjoin(e2, e2.c.position == events.c.position + 1))
        .where(e2.c.position.is_(None))
    )
    low = await conn.scalar(select(func.min(events.c.position)))
    if low is not None and low > 1:
        return 1
    return int(await conn.scalar(query) or 1)
