"""Retention: the archive is made outside the write lock, and racing archivers remove
each event once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore import EventStore, NewEvent, retention, verify
from eventstore.schema import events
from tests.conftest import sqlite_write_lock_free


async def security_log(engine: AsyncEngine, streams: int = 3, per_stream: int = 4) -> EventStore:
    store = EventStore(engine, categories={"security", "user", "retention"})
    for n in range(per_stream):
        for s in range(streams):
            await store.append(f"security-u{s}", "security", [NewEvent("LoginRejected", {"n": n})])
    return store


def cutoff() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=1)


async def count_security(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).where(events.c.stream_category == "security")
        return int((await conn.execute(query)).scalar_one())


@pytest.mark.needs_owner
async def test_two_archivers_racing_remove_each_event_once(engine: AsyncEngine, tmp_path: Path):
    store = await security_log(engine)
    try:
        outcomes = await asyncio.gather(
            retention.archive(store, before=cutoff(), output=tmp_path / "a.jsonl.gz"),
            retention.archive(store, before=cutoff(), output=tmp_path / "b.jsonl.gz"),
            return_exceptions=True,
        )
    finally:
        await store.aclose()
    reports = [o for o in outcomes if isinstance(o, retention.ArchiveReport)]
    # Either both saw the same candidates and one lost at the DELETE (rolled back,
    # typed), or the second began after the first committed and found nothing left.
    assert sum(r.count for r in reports) == 9, outcomes
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(e, retention.RetentionError) for e in refused), refused
    assert await count_security(engine) == 3  # every stream keeps its head
    async with engine.connect() as conn:
        assert (await verify(conn)).ok


@pytest.mark.sqlite
async def test_the_archive_file_is_written_while_other_processes_can_write(
    sqlite_engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    database = sqlite_engine.url.database
    assert database is not None
    seen: list[bool] = []
    write_archive = retention._write_archive

    def write_and_try_the_lock(path: Path, rows: Any) -> str:
        # Another process's writer: BEGIN IMMEDIATE without waiting for a lock.
        seen.append(sqlite_write_lock_free(database))
        return write_archive(path, rows)

    monkeypatch.setattr(retention, "_write_archive", write_and_try_the_lock)
    store = await security_log(sqlite_engine)
    try:
        report = await retention.archive(store, before=cutoff(), output=tmp_path / "a.jsonl.gz")
    finally:
        await store.aclose()
    assert report.count == 9
    assert seen == [True]
