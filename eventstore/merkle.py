"""The log's Merkle tree (RFC 9162), kept in hash tiles, and the proofs it serves.

Leaf ``i`` is the event at position ``i + 1`` (:func:`eventstore.offline_verify.event_leaf`).
The tree is stored as Go's checksum database stores it: in *tiles* of ``TILE_WIDTH``
hashes. The tile at level ``L``, index ``N`` holds the hashes of the complete subtrees of
height ``8L`` numbered ``256N`` to ``256N + 255`` (level 0: leaf hashes); the tile at the
right edge of a level is partial and grows. Any complete subtree's hash is then at most
127 hash operations away from one stored tile, so a proof or a root reads O(log n) tiles
and never the log.

The tree is extended *outside* the append path (:func:`extend`): by the worker every N
events or T seconds, by ``tiu checkpoint``, before a proof, and by retention before it
removes events (whose leaves must stay). It is never silently behind: ``tiu stats`` shows
``tree_lag``, and a position missing from the log where the tree should grow is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from eventstore.dialects import dialect_for
from eventstore.errors import LogIntegrityError
from eventstore.offline_verify import EMPTY_ROOT, event_leaf, leaf_hash, node_hash
from eventstore.schema import merkle_state, merkle_tiles
from eventstore.tiles import (
    ARCHIVED_BEFORE_TREE,
    LEVEL0_SQL,
    PLACEHOLDER_LEAF,
    TILE_HEIGHT,
    TILE_WIDTH,
    RootAccumulator,
    leaf_run,
    level0_span,
)
from eventstore.tiles import TILE_MASK as _MASK

#: Leaves hashed and written per round of :func:`extend` (16 level-0 tiles: on
#: PostgreSQL asyncpg decodes a round on the loop, ~2 ms).
CHUNK: Final = 16 * TILE_WIDTH
#: Up to this many new leaves are hashed on the event loop (~2 ms), more on a thread.
INLINE_LEAVES: Final = 2048
_LEAVES_SQL: Final = (
    "SELECT position, hash, stream_category FROM events WHERE position > $1 "
    "ORDER BY position LIMIT $2"
)

Tiles = dict[tuple[int, int], list[bytes]]


@dataclass(frozen=True, slots=True)
class TreeState:
    size: int
    root: bytes
    updated_at: datetime | None


# -- pure tree arithmetic --------------------------------------------------------------


def blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` as aligned complete subtrees ``(height, index)``, left to right."""
    out: list[tuple[int, int]] = []
    while lo < hi:
        height = (hi - lo).bit_length() - 1
        if lo:
            height = min(height, (lo & -lo).bit_length() - 1)
        out.append((height, lo >> height))
        lo += 1 << height
    return out


def _largest_power_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes make RFC 9162's inclusion proof (PATH), in order."""
    out: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _largest_power_below(hi - lo)
        if index < lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
    out.reverse()
    return out


def consistency_ranges(size1: int, size2: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes make RFC 9162's consistency proof (SUBPROOF)."""
    if size1 in (0, size2):
        return []
    out: list[tuple[int, int]] = []
    lo, hi, m, complete = 0, size2, size1, True
    while True:
        n = hi - lo
        if m == n:
            if not complete:
                out.append((lo, hi))
            break
        k = _largest_power_below(n)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
            m -= k
            complete = False
    out.reverse()
    return out


def tile_of(height: int, index: int) -> tuple[int, int]:
    """The tile holding what the node ``(height, index)`` is hashed from."""
    level, rest = divmod(height, TILE_HEIGHT)
    return level, (index << rest) >> TILE_HEIGHT


def node_from_tiles(tiles: Tiles, height: int, index: int) -> bytes:
    level, rest = divmod(height, TILE_HEIGHT)
    first = index << rest
    hashes = tiles[(level, first >> TILE_HEIGHT)]
    offset = first & _MASK
    row = hashes[offset : offset + (1 << rest)]
    if len(row) != 1 << rest:
        raise LogIntegrityError(f"the stored tree lacks node ({height}, {index})")
    while len(row) > 1:
        row = [node_hash(row[i], row[i + 1]) for i in range(0, len(row), 2)]
    return row[0]


def range_hash(tiles: Tiles, lo: int, hi: int) -> bytes:
    """MTH of leaves ``[lo, hi)`` (a range RFC 9162's proofs use) from stored tiles."""
    parts = [node_from_tiles(tiles, h, i) for h, i in blocks(lo, hi)]
    node = parts[-1]
    for left in reversed(parts[:-1]):
        node = node_hash(left, node)
    return node


def tiles_for(ranges: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    return {tile_of(h, i) for lo, hi in ranges for h, i in blocks(lo, hi)}


# -- stored tiles ----------------------------------------------------------------------


async def load_tiles(conn: AsyncConnection, keys: set[tuple[int, int]]) -> Tiles:
    tiles: Tiles = {}
    wanted = sorted(keys)
    for start in range(0, len(wanted), 500):
        part = wanted[start : start + 500]
        rows = await conn.execute(
            select(merkle_tiles.c.level, merkle_tiles.c.idx, merkle_tiles.c.hashes).where(
                tuple_(merkle_tiles.c.level, merkle_tiles.c.idx).in_(part)
            )
        )
        for level, idx, blob in rows:
            tiles[(int(level), int(idx))] = split_hashes(bytes(blob))
    return tiles


def split_hashes(blob: bytes) -> list[bytes]:
    return [blob[i : i + 32] for i in range(0, len(blob), 32)]


async def load_state(conn: AsyncConnection, *, for_update: bool = False) -> TreeState:
    query = select(merkle_state.c.size, merkle_state.c.root, merkle_state.c.updated_at).where(
        merkle_state.c.id == 1
    )
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = (await conn.execute(query)).one_or_none()
    if row is None:
        return TreeState(0, EMPTY_ROOT, None)
    return TreeState(int(row.size), bytes.fromhex(row.root), row.updated_at)


async def root_at(conn: AsyncConnection, size: int) -> bytes:
    if size == 0:
        return EMPTY_ROOT
    tiles = await load_tiles(conn, tiles_for([(0, size)]))
    return range_hash(tiles, 0, size)


async def inclusion_proof(conn: AsyncConnection, index: int, size: int) -> list[bytes]:
    ranges = inclusion_ranges(index, size)
    tiles = await load_tiles(conn, tiles_for(ranges))
    return [range_hash(tiles, lo, hi) for lo, hi in ranges]


async def consistency_proof(conn: AsyncConnection, size1: int, size2: int) -> list[bytes]:
    ranges = consistency_ranges(size1, size2)
    tiles = await load_tiles(conn, tiles_for(ranges))
    return [range_hash(tiles, lo, hi) for lo, hi in ranges]


async def stored_leaf_run(conn: AsyncConnection, first: int, count: int) -> bytes:
    """:func:`leaf_run` read on ``conn``."""
    if count <= 0:
        return b""
    low, high = level0_span(first, count)
    rows = await conn.execute(
        select(merkle_tiles.c.idx, merkle_tiles.c.hashes)
        .where(merkle_tiles.c.level == 0, merkle_tiles.c.idx.between(low, high))
        .order_by(merkle_tiles.c.idx)
    )
    return leaf_run(rows.all(), first, count)


# -- extending the tree ----------------------------------------------------------------


def _grow(tiles: Tiles, size: int, leaves: list[bytes]) -> int:
    """Add ``leaves`` to a tree of ``size`` in ``tiles`` (which hold the right edge of
    every level); every tile this touches stays in ``tiles``. Returns the new size."""
    level, first, new = 0, size, leaves
    while new:
        for offset, item in enumerate(new):
            at = first + offset
            tiles.setdefault((level, at >> TILE_HEIGHT), []).append(item)
        end = first + len(new)
        full_before, full_after = first >> TILE_HEIGHT, end >> TILE_HEIGHT
        new = [_tile_root(tiles[(level, t)]) for t in range(full_before, full_after)]
        level, first = level + 1, full_before
    return size + len(leaves)


def _tile_root(hashes: list[bytes]) -> bytes:
    row = hashes
    while len(row) > 1:
        row = [node_hash(row[i], row[i + 1]) for i in range(0, len(row), 2)]
    return row[0]


def _edge_tiles(size: int) -> set[tuple[int, int]]:
    """The partial tile at the right edge of each level of a tree of ``size``."""
    keys: set[tuple[int, int]] = set()
    level = 0
    while size >> (TILE_HEIGHT * level):
        count = size >> (TILE_HEIGHT * level)
        if count & _MASK:
            keys.add((level, count >> TILE_HEIGHT))
        level += 1
    return keys


def _add_rows(tiles: Tiles, size: int, rows: Sequence[Any]) -> int:
    return _grow(
        tiles,
        size,
        [leaf_hash(ARCHIVED_BEFORE_TREE if h is None else event_leaf(h, c)) for _, h, c in rows],
    )


async def extend(conn: AsyncConnection, *, until: int | None = None) -> TreeState:
    """Extend the stored tree to the log's head (or ``until``) in the caller's write
    transaction (``begin_write`` on SQLite); hashing runs on a worker thread.

    Raises :class:`LogIntegrityError` naming the position where the log has a hole the
    tree would have to cover: events are never removed before the tree holds them.
    """
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    # The state row is what concurrent extenders queue on (SELECT ... FOR UPDATE on
    # PostgreSQL; SQLite's write transaction already serialises them), so it must exist.
    await conn.execute(
        insert(merkle_state)
        .values(id=1, size=0, root=EMPTY_ROOT.hex(), updated_at=datetime.now(UTC))
        .on_conflict_do_nothing(index_elements=["id"])
    )
    state = await load_state(conn, for_update=True)
    reader = dialect_for(conn.engine)
    size = state.size
    tiles = await load_tiles(conn, _edge_tiles(size))
    grew = False
    while until is None or size < until:
        limit = CHUNK if until is None else min(CHUNK, until - size)
        # Plain tuples (untracked by the collector at once): asyncpg's records, held
        # while the chunk is hashed, would be promoted and bring on full collections.
        rows = [tuple(r) for r in await reader.fetch(conn, _LEAVES_SQL, (size, limit))]
        if not rows:
            break
        if rows[-1][0] != size + len(rows):
            rows = await _fill_archived(conn, size, rows)
        # A few thousand leaves hash in a few ms: on the loop, rather than holding the
        # write lock through two thread hops; a big catch-up goes to a worker thread.
        if len(rows) > INLINE_LEAVES:
            size = await asyncio.to_thread(_add_rows, tiles, size, rows)
        else:
            size = _add_rows(tiles, size, rows)
        await _write_tiles(conn, tiles, size)
        grew = True
    if not grew:
        return state
    root = range_hash(tiles, 0, size) if size else EMPTY_ROOT
    now = datetime.now(UTC)
    values = {"size": size, "root": root.hex(), "updated_at": now}
    await conn.execute(
        insert(merkle_state)
        .values(id=1, **values)
        .on_conflict_do_update(index_elements=["id"], set_=values)
    )
    return TreeState(size, root, now)


async def _fill_archived(conn: AsyncConnection, size: int, rows: Sequence[Any]) -> list[Any]:
    """``rows`` with the holes in positions filled, where retention records say the
    events were archived (before the tree existed: retention grows it first now);
    :class:`LogIntegrityError` at the first hole no record explains."""
    from eventstore.retention import load_records  # noqa: PLC0415  # retention imports this

    archived = [span for record in await load_records(conn) for span in record.positions]
    out: list[Any] = []
    expected = size + 1
    for row in rows:
        while expected < row[0]:
            if not any(a <= expected <= b for a, b in archived):
                raise LogIntegrityError(
                    f"position {expected} is missing from the log; the Merkle tree cannot "
                    "grow past it (run `tiu verify`)"
                )
            out.append((expected, None, None))
            expected += 1
        out.append(row)
        expected = row[0] + 1
    return out


async def _write_tiles(conn: AsyncConnection, tiles: Tiles, size: int) -> None:
    # Write what changed; then keep only each level's right edge in memory.
    edge = _edge_tiles(size)
    rows = [
        {"level": level, "idx": idx, "hashes": b"".join(hashes)}
        for (level, idx), hashes in tiles.items()
    ]
    if rows:
        insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        statement = insert(merkle_tiles)
        await conn.execute(
            statement.on_conflict_do_update(
                index_elements=["level", "idx"], set_={"hashes": statement.excluded.hashes}
            ),
            rows,
        )
    for key in list(tiles):
        if key not in edge:
            del tiles[key]


__all__ = [
    "CHUNK",
    "LEVEL0_SQL",
    "PLACEHOLDER_LEAF",
    "TILE_HEIGHT",
    "RootAccumulator",
    "TreeState",
    "consistency_proof",
    "extend",
    "inclusion_proof",
    "leaf_run",
    "level0_span",
    "load_state",
    "root_at",
    "stored_leaf_run",
]
