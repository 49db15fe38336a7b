"""Health and pool status as plain data. The one place where a failure becomes data.

The Merkle tree's lag (:mod:`eventstore.merkle`) is reported with it: events appended
after the tree's size are covered by no checkpoint yet, so a tree far behind the log is
a window in which a change would go unproven. ``tree_status`` grades it:

* ``ok``: fewer than ``tree_amber`` events behind (default 10,000: ten rounds of
  ``tiu worker``'s default ``checkpoint_every`` of 1,000, work in flight);
* ``amber``: at least ``tree_amber`` behind: the worker is late or not running;
* ``red``: at least ``tree_red`` behind (default 100,000): it has not run for long, and
  everything appended since is unprotected until ``tiu checkpoint`` runs.

The lag never makes the report unhealthy (the database answers; restarting the service
would not help): alert on ``tree_status``.
"""

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
    #: Events in the log beyond the Merkle tree's size, and its grade (``ok``, ``amber``,
    #: ``red``; see the module's text). None before migration 0009 or when unhealthy.
    tree_lag: int | None = None
    tree_status: str | None = None

    @property
    def pending_migrations(self) -> bool | None:
        if self.head_revision is None or not self.healthy:
            return None
        return self.current_revision != self.head_revision

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pending_migrations"] = self.pending_migrations
        return data


#: ``tree_status`` thresholds, in events behind the log's head.
TREE_AMBER = 10_000
TREE_RED = 100_000


def tree_status(lag: int, *, amber: int = TREE_AMBER, red: int = TREE_RED) -> str:
    return "red" if lag >= red else "amber" if lag >= amber else "ok"


async def health_check(
    engine: AsyncEngine,
    *,
    head_revision: str | None = None,
    timeout: float = 5.0,
    tree_amber: int = TREE_AMBER,
    tree_red: int = TREE_RED,
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
            has_tree = await conn.run_sync(
                lambda sync: sync.dialect.has_table(sync, "merkle_state")
            )
            lag = None
            if has_tree:
                # Both are index lookups: the log's head, and the state's one row.
                lag = int(
                    await conn.scalar(
                        text(
                            "SELECT (SELECT coalesce(max(position), 0) FROM events) - "
                            "coalesce((SELECT size FROM merkle_state WHERE id = 1), 0)"
                        )
                    )
                    or 0
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
        tree_lag=lag,
        tree_status=None if lag is None else tree_status(lag, amber=tree_amber, red=tree_red),
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
