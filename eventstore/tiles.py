"""The Merkle tree's layout and arithmetic that need no database library: the tiles'
size, the leaves of level-0 tiles as read, and the root of leaves fed in order.

Kept apart from :mod:`eventstore.merkle` (the stored tree, read and grown through
SQLAlchemy) so that a child process checking a range of the log
(:mod:`eventstore.log_check`) imports only the standard library and these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

from eventstore.offline_verify import EMPTY_ROOT, leaf_hash, node_hash

TILE_HEIGHT: Final = 8
TILE_WIDTH: Final = 1 << TILE_HEIGHT
TILE_MASK: Final = TILE_WIDTH - 1

#: The leaf of a position archived before the tree reached it (retention run before
#: migration 0009 built the tree): its event is only in the archive file, which the
#: tree is not built from, so the tree holds this stand-in. Such a position is counted
#: by ``verify`` (``placeholder_leaves``) and refused by ``tiu prove``: the tree proves
#: that the position was archived before it existed, nothing about the event. The
#: retention record (``AuditArchived``: each stream's last archived hash) chains the
#: stream's remaining events to the archive file's.
ARCHIVED_BEFORE_TREE: Final = b"archived before the tree"
PLACEHOLDER_LEAF: Final = leaf_hash(ARCHIVED_BEFORE_TREE)


class RootAccumulator:
    """The root of leaves fed one at a time, in O(log n) memory (a compact range)."""

    __slots__ = ("size", "stack")

    def __init__(self) -> None:
        self.stack: list[bytes] = []
        self.size = 0

    def add(self, leaf: bytes) -> None:
        node = leaf
        size = self.size
        stack = self.stack
        while size & 1:
            node = node_hash(stack.pop(), node)
            size >>= 1
        stack.append(node)
        self.size += 1

    def extend(self, leaves: Sequence[bytes]) -> None:
        """``add`` each of ``leaves``, hashing aligned runs level by level (the same
        nodes, without a Python loop per merge)."""
        i, n, sha256 = 0, len(leaves), hashlib.sha256
        while i < n:
            size = self.size
            height = (size & -size).bit_length() - 1 if size else (n - i).bit_length() - 1
            while 1 << height > n - i:
                height -= 1
            if height == 0:
                self.add(leaves[i])
                i += 1
                continue
            row = list(leaves[i : i + (1 << height)])
            while len(row) > 1:  # node_hash, inlined: a call per node is a third of it
                row = [
                    sha256(b"\x01" + row[j] + row[j + 1]).digest() for j in range(0, len(row), 2)
                ]
            node, rest, stack = row[0], size >> height, self.stack
            while rest & 1:
                node = node_hash(stack.pop(), node)
                rest >>= 1
            stack.append(node)
            self.size += 1 << height
            i += 1 << height

    def root(self) -> bytes:
        if not self.stack:
            return EMPTY_ROOT
        node = self.stack[-1]
        for left in reversed(self.stack[:-1]):
            node = node_hash(left, node)
        return node


#: The level-0 tiles ``$1 .. $2`` (:func:`level0_span`), for :func:`leaf_run`; ``?``
#: parameters, for a driver connection used off the loop.
LEVEL0_SQL: Final = (
    "SELECT idx, hashes FROM merkle_tiles WHERE level = 0 AND idx BETWEEN ? AND ? ORDER BY idx"
)
_FULL_TILE: Final = 32 * TILE_WIDTH


def level0_span(first: int, count: int) -> tuple[int, int]:
    """The indexes of the level-0 tiles holding leaves ``first .. first + count - 1``."""
    return first >> TILE_HEIGHT, (first + max(count, 1) - 1) >> TILE_HEIGHT


def leaf_run(rows: Any, first: int, count: int) -> bytes:
    """Leaves ``first .. first + count - 1`` as one string of 32-byte hashes, from the
    level-0 tiles ``rows`` (``idx, hashes``, read by ``LEVEL0_SQL``). A missing or
    short tile reads as zero bytes in its place (no SHA-256 output), so every leaf
    keeps its offset and a missing one differs from any computed leaf."""
    if count <= 0:
        return b""
    low, _ = level0_span(first, count)
    parts: list[bytes] = []
    for idx, blob in rows:
        while low + len(parts) < idx:
            parts.append(bytes(_FULL_TILE))
        hashes = bytes(blob)
        parts.append(hashes.ljust(_FULL_TILE, b"\x00")[:_FULL_TILE])
    start = (first & TILE_MASK) * 32
    return b"".join(parts)[start : start + 32 * count].ljust(32 * count, b"\x00")
