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
        # migrations 0007 and 0008: the append functions are planned once, not per call
        functions = await _functions(engine, schema)
        assert functions["tiu_append"] == ["plan_cache_mode=force_generic_plan"]
        assert functions["tiu_lock_and_heads"] == ["plan_cache_mode=force_generic_plan"]
        await runner.downgrade(engine, "0007")
        assert "tiu_append" not in await _functions(engine, schema)
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


async def _functions(engine: AsyncEngine, schema: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT p.proname, p.proconfig FROM pg_proc p "
                "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = :s"
            ),
            {"s": schema},
        )
        return {row[0]: row[1] for row in rows}


def test_the_append_functions_take_the_stores_advisory_lock():
    """Migrations 0005 and 0008 spell the lock class out in SQL; it must be the store's."""
    import importlib

    from eventstore.dialects import ADVISORY_LOCK_CLASS

    lock = f"pg_advisory_xact_lock({ADVISORY_LOCK_CLASS},"
    heads = importlib.import_module("migrations.versions.0005_append_heads_function")
    append = importlib.import_module("migrations.versions.0008_append_function")
    assert lock in heads.LOCK_AND_HEADS
    assert lock in append.APPEND
