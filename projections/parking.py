"""Events a projector cannot apply: parking, retry and audited skips.

A worker retries a failing batch with back-off; when the retries run out it finds
the one event that fails (applying the batch event by event, committing the good
ones) and *parks* the projector there (a ``projection_parking`` row). No runner
applies a parked projector; the others go on. Commands waiting for it fail fast
with :class:`ProjectionParked`. An operator then either

- retries it (:func:`retry`, ``tiu projections retry NAME``: the code was fixed, or
  the failure was passing), or
- skips the event for that projector (:func:`skip`, ``tiu projections skip NAME
  POSITION --reason ...``): a ``projection_skips`` row that every runner and every
  replay honours from then on.

Both are recorded in the log, in stream ``operations-projection-<name>``, in the
same transaction as the change they make: the audit trail says who skipped what and
why.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from eventstore.engine import begin_write
from eventstore.records import EventContext, NewEvent
from eventstore.schema import events
from eventstore.schema import projection_parking as parking_table
from eventstore.schema import projection_skips as skips_table
from eventstore.store import EventStore
from projections import checkpoints
from projections.errors import InvalidSkip, ProjectionFailed
from projections.projector import Projector

OPERATIONS_CATEGORY: Final = "operations"
SKIPPED_EVENT: Final = "ProjectionEventSkipped"
RETRIED_EVENT: Final = "ProjectionRetried"
MAX_TEXT: Final = 2000


@dataclass(frozen=True, slots=True)
class Parked:
    name: str
    position: int
    event_type: str
    error: str
    attempts: int
    parked_at: datetime

    def as_dict(self) -> dict[str, object]:
        return {
            "position": self.position,
            "event_type": self.event_type,
            "error": self.error,
            "attempts": self.attempts,
            "parked_at": self.parked_at.isoformat(),
        }


def stream_id(name: str) -> str:
    return f"{OPERATIONS_CATEGORY}-projection-{name}"


async def load(conn: AsyncConnection, names: Collection[str] | None = None) -> dict[str, Parked]:
    """The parked projectors (of ``names``, if given), by name."""
    query = select(parking_table)
    if names is not None:
        query = query.where(parking_table.c.name.in_(list(names)))
    return {row.name: Parked(*row) for row in await conn.execute(query)}


async def park(engine: AsyncEngine, failure: ProjectionFailed, attempts: int) -> Parked:
    """Park ``failure.name`` at the event ``failure.first`` (replacing an older row)."""
    assert failure.first is not None
    parked = Parked(
        failure.name,
        failure.first,
        failure.event_type,
        repr(failure.error)[:MAX_TEXT],
        attempts,
        datetime.now(UTC),
    )
    async with engine.connect() as conn:
        await begin_write(conn)
        await conn.execute(delete(parking_table).where(parking_table.c.name == parked.name))
        await conn.execute(
            insert(parking_table).values(
                name=parked.name,
                position=parked.position,
                event_type=parked.event_type,
                error=parked.error,
                attempts=parked.attempts,
                parked_at=parked.parked_at,
            )
        )
        await conn.commit()
    return parked


async def skipped(
    conn: AsyncConnection, name: str, after: int = 0, until: int | None = None
) -> set[int]:
    """Positions skipped for ``name`` in ``(after, until]``."""
    query = select(skips_table.c.position).where(
        skips_table.c.name == name, skips_table.c.position > after
    )
    if until is not None:
        query = query.where(skips_table.c.position <= until)
    return set((await conn.execute(query)).scalars())


async def retry(store: EventStore, name: str, *, actor_id: str | None = None) -> Parked | None:
    """Unpark ``name``: runners apply it again from its checkpoint, with fresh retries.
    Returns what was parked (``None``: it was not parked, and nothing is recorded)."""
    async with store.transaction() as uow:
        found = (await load(uow.conn, [name])).get(name)
        if found is None:
            return None
        await uow.conn.execute(delete(parking_table).where(parking_table.c.name == name))
        data = {"projector": name, **found.as_dict()}
        uow.append(
            stream_id(name),
            OPERATIONS_CATEGORY,
            [NewEvent(event_type=RETRIED_EVENT, data=data)],
            context=EventContext(actor_id=actor_id),
        )
    return found


async def skip(
    store: EventStore,
    projector: Projector,
    position: int,
    *,
    reason: str,
    actor_id: str | None = None,
) -> int:
    """Skip the event at ``position`` for ``projector``, for good (replays included),
    and unpark it if it was parked there. Returns the position of the audit event.

    Refused with :class:`InvalidSkip` without a reason, or when ``position`` holds no
    event the projector handles and has still to apply.
    """
    reason = reason.strip()
    if not reason or len(reason) > MAX_TEXT or not reason.isprintable():
        raise InvalidSkip(f"a skip needs a reason of 1 to {MAX_TEXT} printable characters")
    async with store.transaction() as uow:
        conn = uow.conn
        event_type = await conn.scalar(
            select(events.c.event_type).where(events.c.position == position)
        )
        if event_type is None or event_type not in projector.handles:
            raise InvalidSkip(f"position {position} holds no event that {projector.name} handles")
        active = await checkpoints.load_active(conn, projector.name)
        if active is not None and active.position >= position:
            raise InvalidSkip(f"{projector.name} has already applied position {position}")
        if position in await skipped(conn, projector.name, position - 1, position):
            raise InvalidSkip(f"position {position} is already skipped for {projector.name}")
        await conn.execute(
            insert(skips_table).values(
                name=projector.name, position=position, reason=reason, skipped_at=store.now()
            )
        )
        await conn.execute(
            delete(parking_table).where(
                parking_table.c.name == projector.name, parking_table.c.position == position
            )
        )
        data = {
            "projector": projector.name,
            "position": position,
            "event_type": event_type,
            "reason": reason,
        }
        uow.append(
            stream_id(projector.name),
            OPERATIONS_CATEGORY,
            [NewEvent(event_type=SKIPPED_EVENT, data=data)],
            context=EventContext(actor_id=actor_id),
        )
    assert uow.last_position is not None
    return uow.last_position
