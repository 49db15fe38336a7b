"""Checkpoints: how far each projector has applied the log.

A checkpoint row ``(name, version)`` moves in the same transaction as the read-model
rows it covers. ``active`` marks the version whose tables are live; a rebuild in
progress keeps its own row under ``<name>#rebuild`` so it can resume after a crash.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from eventstore.prepared import execute
from eventstore.schema import projection_checkpoints as cp
from projections.errors import CheckpointMoved
from projections.projector import Projector

REBUILD_SUFFIX = "#rebuild"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    name: str
    version: int
    position: int
    active: bool
    updated_at: datetime


def _now() -> datetime:
    return datetime.now(UTC)


async def load(conn: AsyncConnection, name: str, version: int) -> Checkpoint | None:
    row = (await conn.execute(select(cp).where(cp.c.name == name, cp.c.version == version))).first()
    return Checkpoint(*row) if row is not None else None


async def all_checkpoints(conn: AsyncConnection) -> list[Checkpoint]:
    rows = await conn.execute(select(cp).order_by(cp.c.name, cp.c.version))
    return [Checkpoint(*row) for row in rows]


async def ensure(conn: AsyncConnection, projectors: Iterable[Projector]) -> list[Projector]:
    """Create missing checkpoint rows; return the projectors whose version is new.

    On a database whose log is empty a new projector is simply active at 0. When
    the log already has events, a new version starts at 0 as well and is marked
    active only if no older version is active (first deployment): its tables are
    then filled by catch-up. Otherwise the old version stays active until a
    rebuild swaps the new one in.
    """
    stale: list[Projector] = []
    for projector in projectors:
        if await load(conn, projector.name, projector.version) is not None:
            continue
        other_active = await conn.scalar(
            select(cp.c.version).where(cp.c.name == projector.name, cp.c.active.is_(True))
        )
        await conn.execute(
            insert(cp).values(
                name=projector.name,
                version=projector.version,
                position=0,
                active=other_active is None,
                updated_at=_now(),
            )
        )
        if other_active is not None:
            stale.append(projector)
    return stale


async def load_active(conn: AsyncConnection, name: str) -> Checkpoint | None:
    """The checkpoint of the version whose tables are live."""
    row = (await conn.execute(select(cp).where(cp.c.name == name, cp.c.active.is_(True)))).first()
    return Checkpoint(*row) if row is not None else None


async def advance(
    conn: AsyncConnection, projectors: Iterable[Projector], *, expected: int, position: int
) -> int:
    """Move each projector's active checkpoint from ``expected`` to ``position``.

    Returns how many rows moved; fewer than the projectors given means one of them
    was not at ``expected`` (it missed events) and the caller must roll back.
    """
    names = tuple(p.name for p in projectors)
    if not names:
        return 0
    statement = _ADVANCES.get(names)
    if statement is None:
        statement = _ADVANCES[names] = _advance(names)
    return await execute(
        conn,
        statement,
        {"expected": expected, "new_position": position, "updated_at": _now()},
    )


#: Every command runs it, for the same projectors: built once per set of them (see
#: projections.projector.statement), their names as parameters with their values, not
#: an expanding list (whose SQL is expanded, and its values bound, at each call).
_ADVANCES: dict[tuple[str, ...], Any] = {}


def _advance(names: tuple[str, ...]) -> Any:
    return (
        update(cp)
        .where(
            cp.c.name.in_([bindparam(f"name_{i}", name) for i, name in enumerate(names)]),
            cp.c.active.is_(True),
            cp.c.position == bindparam("expected"),
        )
        .values(position=bindparam("new_position"))
    )


async def move(
    conn: AsyncConnection, name: str, *, old: int, new: int, version: int | None = None
) -> None:
    """Compare-and-set one checkpoint (the active one, or ``version``'s); raise if
    another runner moved it first."""
    query = update(cp).where(cp.c.name == name, cp.c.position == old)
    if version is None:
        query = query.where(cp.c.active.is_(True))
    else:
        query = query.where(cp.c.version == version)
    result = await conn.execute(query.values(position=new, updated_at=_now()))
    if result.rowcount != 1:
        raise CheckpointMoved(name, old)


async def drop(conn: AsyncConnection, name: str, version: int | None = None) -> None:
    query = delete(cp).where(cp.c.name == name)
    if version is not None:
        query = query.where(cp.c.version == version)
    await conn.execute(query)
