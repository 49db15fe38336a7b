"""What an attacker with write access does first: switch the append-only guard off."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


async def bypass_append_only(conn: AsyncConnection) -> None:
    """Let UPDATE and DELETE on ``events`` through for the rest of ``conn``'s transaction:
    on PostgreSQL as superuser (triggers off), on SQLite by dropping the triggers, as
    anyone holding the file can."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SET LOCAL session_replication_role = replica"))
    else:
        await conn.execute(text("DROP TRIGGER IF EXISTS events_no_update"))
        await conn.execute(text("DROP TRIGGER IF EXISTS events_no_delete"))
