"""Run the Alembic migrations from Python, on an engine the caller already has."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore.engine import gather_statistics
from eventstore.errors import EventStoreError

HERE = Path(__file__).resolve().parent
logger = logging.getLogger(__name__)


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["configure_logging"] = False
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Migrate to ``revision``; on SQLite, if that changed the schema, gather the query
    planner's statistics again (SQLite's advice after a schema change). The schema is
    migrated whether or not they could be gathered (another writer holding the lock past
    the busy timeout): a WAL checkpoint gathers them once the log has none."""
    if await _run(engine, command.upgrade, revision):
        try:
            await gather_statistics(engine)
        except EventStoreError as error:
            logger.warning("migrated; planner statistics not gathered: %s", error)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    await _run(engine, command.downgrade, revision)


async def _run(engine: AsyncEngine, step: Callable[[Config, str], None], revision: str) -> bool:
    """Whether the step changed the revision."""

    def run(connection: Connection) -> bool:
        before = MigrationContext.configure(connection).get_current_revision()
        # Ends the transaction that read began: left open, Alembic would take it for the
        # caller's and run every migration in it, not each in its own as on SQLite.
        connection.commit()
        config = alembic_config()
        config.attributes["connection"] = connection
        step(config, revision)
        return MigrationContext.configure(connection).get_current_revision() != before

    async with engine.connect() as conn:
        changed = await conn.run_sync(run)
        await conn.commit()
    return changed


async def current_revision(engine: AsyncEngine) -> str | None:
    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)
