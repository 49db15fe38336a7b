"""Reads from a PostgreSQL streaming replica, with read-your-writes.

Repositories and audit queries read through :meth:`ReplicaReads.connect`. Commands,
their inline projections and the workers write to the primary. A read goes to the
replica unless this process has seen a commit (its own, or one NOTIFY reported:
``known_head``) that the replica may not have replayed yet. Then it first reads the
primary's WAL position (``pg_current_wal_lsn()``, which is past every commit made
before it) and waits, up to ``wait`` seconds, until the replica has replayed that
far (``pg_last_wal_replay_lsn()``). If the replica gets there, the read goes to it;
if not, or if the replica cannot be reached, the read **falls back to the primary**.
A replica that failed is left alone for ``retry_after`` seconds. So a read after a
write never returns the replica's stale rows: it is either caught up or not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Final

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from eventstore.errors import StoreUnavailable
from eventstore.grouping import whole
from eventstore.store import EventStore
from eventstore.translate import translate_errors

log = logging.getLogger("tiu.replicas")

_PRIMARY_LSN: Final = text("SELECT pg_current_wal_lsn()::text")
# NULL outside recovery: a "replica" that is a primary has nothing to wait for.
_REPLAYED: Final = text(
    "SELECT coalesce(pg_last_wal_replay_lsn() >= CAST(CAST(:lsn AS text) AS pg_lsn), "
    "NOT pg_is_in_recovery())"
)
_FAILURES: Final = (StoreUnavailable, SQLAlchemyError, OSError, TimeoutError)


class ReplicaReads:
    """Chooses, read by read, between a replica and the primary (module docstring)."""

    def __init__(
        self,
        store: EventStore,
        primary: AsyncEngine,
        replica: AsyncEngine,
        *,
        wait: float = 1.0,
        retry_after: float = 5.0,
    ) -> None:
        self.store = store
        self.primary = primary
        self.replica = replica
        self.wait = wait
        self.retry_after = retry_after
        self._synced_head = 0
        self._down_until = 0.0
        #: Reads answered by each side, for ``get_statistics`` and tests.
        self.counts = {"replica": 0, "primary": 0, "waits": 0, "fallbacks": 0}

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        conn = await self._replica_if_fresh()
        if conn is None:
            self.counts["primary"] += 1
            with translate_errors(self.store.dialect.database_label):
                async with self.primary.connect() as primary:
                    yield primary
            return
        self.counts["replica"] += 1
        try:
            with translate_errors(self.store.dialect.database_label):
                yield conn
        finally:
            await _close(conn)

    async def _replica_if_fresh(self) -> AsyncConnection | None:
        if time.monotonic() < self._down_until:
            return None
        head = self.store.dialect.known_head
        try:
            conn = await self.replica.connect()
        except _FAILURES as error:
            self._failed(error)
            return None
        try:
            if head > self._synced_head:
                self.counts["waits"] += 1
                if not await self._replayed(conn):
                    self.counts["fallbacks"] += 1
                    await _close(conn)
                    return None
                self._synced_head = max(self._synced_head, head)
        except _FAILURES as error:
            self._failed(error)
            with contextlib.suppress(*_FAILURES):
                await conn.invalidate()
            return None
        except BaseException:
            await _close(conn)
            raise
        return conn

    async def _replayed(self, replica: AsyncConnection) -> bool:
        async with self.primary.connect() as primary:
            lsn = await primary.scalar(_PRIMARY_LSN)
        deadline = time.monotonic() + self.wait
        delay = 0.001
        while True:
            if await replica.scalar(_REPLAYED, {"lsn": lsn}):
                return True
            if time.monotonic() >= deadline:
                log.info("replica behind %s after %.1fs: reading the primary", lsn, self.wait)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _failed(self, error: BaseException) -> None:
        log.warning("replica unavailable (%r): reading the primary", error)
        self._down_until = time.monotonic() + self.retry_after


async def _close(conn: AsyncConnection) -> None:
    """Close a replica connection, never abandoned midway (as SQLAlchemy's ``async
    with`` closes the primary's): given back to a full pool, an overflow connection is
    closed, a round trip; abandoned there, the pool logged an error and the connection
    was aborted instead of closed."""
    await whole(conn.close())
