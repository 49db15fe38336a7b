"""One migration tree builds exactly the metadata on both backends, and unbuilds it."""

from __future__ import annotations

import secrets
from typing import Any, cast

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore import EngineOptions, create_engine
from migrations import runner
from migrations.metadata import target_metadata


def _diff(sync: Any) -> list[Any]:
    context = MigrationContext.configure(sync, opts={"compare_type": True})
    return list(compare_metadata(context, cast(Any, target_metadata)))


def _tables(sync: Any) -> set[str]:
    return set(inspect(sync).get_table_names())


async def _round_trip(engine: AsyncEngine) -> None:
    await runner.upgrade(engine)
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
        assert await runner.current_revision(engine) == runner.head_revision()
    await runner.downgrade(engine, "base")
    async with engine.connect() as conn:
        assert await conn.run_sync(_tables) <= {"alembic_version"}
    await runner.upgrade(engine)
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_sqlite_upgrade_equals_metadata_and_downgrade_removes_everything(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/fresh.db")
    try:
        await _round_trip(engine)
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_postgres_upgrade_equals_metadata_and_downgrade_removes_everything(pg_url):
    schema = f"tiu_mig_{secrets.token_hex(4)}"
    admin = create_engine(pg_url)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_engine(pg_url, EngineOptions(search_path=schema))
    try:
        await _round_trip(engine)
        async with engine.connect() as conn:
            triggers = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relname = 'events' AND n.nspname = :s AND NOT t.tgisinternal"
                ),
                {"s": schema},
            )
        assert triggers == 2
        async with engine.connect() as conn:  # migration 0007: planned once, not per call
            settings = await conn.scalar(
                text(
                    "SELECT p.proconfig FROM pg_proc p "
                    "JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE p.proname = 'tiu_lock_and_heads' AND n.nspname = :s"
                ),
                {"s": schema},
            )
        assert settings == ["plan_cache_mode=force_generic_plan"]
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


def test_the_lock_and_heads_function_takes_the_stores_advisory_lock():
    """Migration 0005 spells the lock class out in SQL; it must be the store's."""
    import importlib

    from eventstore.dialects import ADVISORY_LOCK_CLASS

    migration = importlib.import_module("migrations.versions.0005_append_heads_function")
    assert f"pg_advisory_xact_lock({ADVISORY_LOCK_CLASS}," in migration.LOCK_AND_HEADS
