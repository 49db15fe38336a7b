"""The raw-driver baseline: the same ``events`` row, written and read by hand.

What raw does per append is the floor of tiu's contract, not less: the same table
(built by tiu's migrations, trigger and indexes included), the PostgreSQL advisory
lock (or SQLite ``BEGIN IMMEDIATE``), gap-free ``max(position)+1`` positions, the
``(stream_id, version)`` unique constraint as the version check, and a SHA-256
chained over the previous hash the writer already holds. It skips what tiu adds on
top: input validation, canonical JSON normalisation, reading stream heads, error
translation, SQLAlchemy.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

GENESIS = "0" * 64
COLUMNS = (
    "position, event_id, stream_id, stream_category, version, event_type, schema_version, "
    "data, metadata, actor_id, correlation_id, causation_id, command_id, recorded_at, hash"
)
PG_LOCK = "SELECT pg_advisory_xact_lock(7629173, 'events'::regclass::oid::int)"
PG_INSERT = (
    f"INSERT INTO events ({COLUMNS}) VALUES ("
    "(SELECT coalesce(max(position), 0) + 1 FROM events), "
    "$1, $2, $3, $4, $5, 1, $6::jsonb, $7::jsonb, $8, NULL, NULL, $9, $10, $11)"
)
SQLITE_INSERT = (
    f"INSERT INTO events ({COLUMNS}) VALUES ("
    "(SELECT coalesce(max(position), 0) + 1 FROM events), "
    "?, ?, ?, ?, ?, 1, ?, ?, ?, NULL, NULL, ?, ?, ?)"
)
# The same rows at a position the writer read under the lock (as tiu does), first parameter.
PG_INSERT_AT = (
    f"INSERT INTO events ({COLUMNS}) VALUES ("
    "$1, $2, $3, $4, $5, $6, 1, $7::jsonb, $8::jsonb, $9, NULL, NULL, $10, $11, $12)"
)
SQLITE_INSERT_AT = (
    f"INSERT INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, NULL, NULL, ?, ?, ?)"
)


def row(
    stream_id: str,
    category: str,
    version: int,
    event_type: str,
    data: dict[str, Any],
    prev: str,
    actor: str | None = None,
    command_id: str | None = None,
) -> tuple[Any, ...]:
    """One event row; ``actor`` and ``command_id`` as tiu's counterpart in the case writes
    them (both columns are indexed: a random command id is a random index leaf)."""
    payload = json.dumps(data, separators=(",", ":"))
    meta = '{"command":"Raw"}'
    digest = hashlib.sha256(f"{prev}|{stream_id}|{version}|{payload}".encode()).hexdigest()
    return (
        uuid.uuid4(),
        stream_id,
        category,
        version,
        event_type,
        payload,
        meta,
        actor,
        command_id,
        datetime.now(UTC),
        digest,
    )


def sqlite_params(r: tuple[Any, ...]) -> tuple[Any, ...]:
    # tiu's SQLite columns: uuid as 32-hex CHAR, datetimes as ISO text (UTCDateTime).
    return (r[0].hex, *r[1:9], r[9].strftime("%Y-%m-%d %H:%M:%S.%f"), r[10])


async def pg_append(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    async with conn.transaction():
        await conn.execute(PG_LOCK)
        if len(rows) == 1:
            await conn.execute(PG_INSERT, *rows[0])
        else:
            await conn.executemany(PG_INSERT, rows)


def sqlite_append(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(SQLITE_INSERT, [sqlite_params(r) for r in rows])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
