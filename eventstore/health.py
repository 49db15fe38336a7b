"""Health and pool status as plain data. The one place where a failure becomes data."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from eventstore.translate import describe


@dataclass(frozen=True, slots=True)
class HealthReport:
    healthy: bool
    backend: str
    latency_ms: float | None
    server_version: str | None
    current_revision: str | None
    head_revision: str | None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def pending_migrations(self) -> bool | None:
        if self.head_revision is None or not self.healthy:
            return None
        return self.current_revision != self.head_revision

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pending_migrations"] = self.pending_migrations
        return data


async def health_check(
    engine: AsyncEngine, *, head_revision: str | None = None, timeout: float = 5.0
) -> HealthReport:
    """Connect, run a query and report; never raises for an unreachable database."""
    backend = engine.dialect.name
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout), engine.connect() as conn:
            if backend == "postgresql":
                version = await conn.scalar(text("SHOW server_version"))
            else:
                version = await conn.scalar(text("SELECT sqlite_version()"))
            latency = (time.perf_counter() - started) * 1000
            exists = await conn.run_sync(
                lambda sync: sync.dialect.has_table(sync, "alembic_version")
            )
            revision = (
                await conn.scalar(text("SELECT version_num FROM alembic_version"))
                if exists
                else None
            )
    except Exception as error:  # health is reported, not raised
        return HealthReport(
            healthy=False,
            backend=backend,
            latency_ms=None,
            server_version=None,
            current_revision=None,
            head_revision=head_revision,
            error=describe(error),
        )
    return HealthReport(
        healthy=True,
        backend=backend,
        latency_ms=round(latency, 3),
        server_version=str(version),
        current_revision=revision,
        head_revision=head_revision,
    )


@dataclass(frozen=True, slots=True)
class PoolStatus:
    pool_class: str
    size: int | None
    checked_in: int | None
    checked_out: int | None
    overflow: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pool_status(engine: AsyncEngine) -> PoolStatus:
    pool = engine.sync_engine.pool
    if isinstance(pool, QueuePool):
        return PoolStatus(
            type(pool).__name__, pool.size(), pool.checkedin(), pool.checkedout(), pool.overflow()
        )
    return PoolStatus(type(pool).__name__, None, None, None, None)
