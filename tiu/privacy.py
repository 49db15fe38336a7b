"""``tiu forget USER``: erase a person's personal data (see docs/privacy.md).

The command acts as the system actor, like the rest of the CLI: operators have
database access anyway. ``USER`` is a user id or the email they registered with.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

from sqlalchemy.ext.asyncio import AsyncEngine

from domain.errors import NotFound
from domain.permissions import SYSTEM_ACTOR
from eventstore.dialects import follow_schema, give_back
from eventstore.engine import wal_checkpoints_ended
from eventstore.translate import translate_errors
from tiu.service import DatabaseService
from tiu.settings import Settings

#: Where forgetting overwrites rows. Until the space is reclaimed, the old versions of
#: these rows (key material, emails, names, IPs, user agents) survive as dead tuples
#: in PostgreSQL's table files, and as old page images in SQLite's WAL.
OVERWRITTEN_TABLES: Final = ("subject_keys", "users", "sessions", "unique_keys", "user_activity")


@dataclass(frozen=True, slots=True)
class ForgetReport:
    user_id: str
    forgotten: bool
    """False when the user had already been forgotten (nothing was done)."""
    reclaimed: str | None = None
    """What ``--vacuum`` did to remove the old row versions, if asked."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.forgotten:
            text = f"forgot user {self.user_id}: keys destroyed, personal data erased"
        else:
            text = f"user {self.user_id} was already forgotten; nothing to do"
        return f"{text}; {self.reclaimed}" if self.reclaimed else text


async def reclaim(engine: AsyncEngine) -> str:
    """Remove the old versions of the rows forgetting overwrote.

    PostgreSQL: ``VACUUM (FULL)`` of :data:`OVERWRITTEN_TABLES`, which rewrites each
    table into a new file and drops the old one (plain VACUUM only marks the space
    reusable); it holds an ACCESS EXCLUSIVE lock on each table while it runs, and needs
    the tables' owner. SQLite: deleted content is zeroed as it is written
    (``secure_delete``); a truncating WAL checkpoint removes the old page images.
    Neither reaches backups, WAL archives or replicas' own files.
    """
    with translate_errors(engine.url.render_as_string(hide_password=True)):
        raw = await engine.raw_connection()
        try:
            driver: Any = raw.driver_connection
            if engine.dialect.name == "postgresql":
                await follow_schema(engine, raw)  # a tenant's view: its own tables
                tables = ", ".join(OVERWRITTEN_TABLES)
                await driver.execute(f"VACUUM (FULL) {tables}")
                return f"VACUUM FULL of {tables}"
            await wal_checkpoints_ended(engine)  # the engine's own, off the loop: else busy
            # A worker thread: copying and fsyncing a large WAL takes tens of ms (85 ms
            # for 40 MiB, measured), which the loop would otherwise stall for.
            adapted: Any = raw.dbapi_connection  # eventstore.sqlite_driver's connection
            busy, _, _ = await adapted.off_loop(_truncate_wal, driver)
            if busy:
                return "WAL checkpoint incomplete: another connection is reading; run again"
            return "WAL checkpointed and truncated"
        finally:
            await asyncio.shield(give_back(raw))


def _truncate_wal(db: sqlite3.Connection) -> tuple[int, int, int]:
    busy, frames, copied = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return busy, frames, copied


async def forget(service: DatabaseService, user: str) -> ForgetReport:
    """Forget ``user`` (an id, or an email still on record) as the system actor."""
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        user_id = await repos.users.user_id_for_email(user) if "@" in user else user
        if user_id is None:
            raise NotFound("user", user)
        return ForgetReport(user_id, await repos.users.forget_user(user_id))


async def forget_with_settings(
    settings: Settings, user: str, *, engine: AsyncEngine | None = None, vacuum: bool = False
) -> ForgetReport:
    """Open a service on ``settings`` (schema must be migrated), forget, close; with
    ``vacuum``, then :func:`reclaim` the old row versions."""
    service = DatabaseService(settings, engine=engine)
    try:
        await service.start(migrate=False)
        report = await forget(service, user)
        if vacuum:
            await service.store.aclose()  # its pooled connections hold no snapshot then
            report = replace(report, reclaimed=await reclaim(service.engine))
        return report
    finally:
        await service.aclose()
