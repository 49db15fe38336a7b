"""What differs between SQLite and PostgreSQL: serialising appends, claims, wake-ups.

PostgreSQL: a transaction-scoped advisory lock, taken in a statement of its own
just before the insert, serialises appends so positions follow commit order
(ORDERING.md). Readers in other processes are woken by NOTIFY, sent by a
throttled background task after commit, never inside the append transaction.

SQLite: ``BEGIN IMMEDIATE`` already holds the database's single write lock for
the whole transaction, so nothing more is needed. Commits of this process wake
its readers at once; commits of other processes are noticed by polling (a short
read of the head position every ``poll_interval``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import insert, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from eventstore.errors import KeyAlreadyClaimed
from eventstore.schema import events, unique_keys
from eventstore.translate import translate_errors

if TYPE_CHECKING:
    from datetime import datetime

    from eventstore.store import EventStore

log = logging.getLogger("eventstore")

#: First key of the two-int advisory lock: a project constant ("tiu" in ASCII).
#: The second is the OID of the ``events`` table, so two stores in one cluster
#: (different databases or schemas) never serialise each other.
ADVISORY_LOCK_CLASS: Final = 0x746975
NOTIFY_CHANNEL: Final = "tiu_events"
NOTIFY_INTERVAL: Final = 0.01


_INSERT_EVENTS: Final = insert(events)


class Dialect:
    name: str = "generic"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.database_label = engine.url.render_as_string(hide_password=True)
        self._head = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    async def lock_appends(self, conn: AsyncConnection) -> None:
        """Serialise appends until this transaction ends."""

    async def insert_events(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
        await conn.execute(_INSERT_EVENTS, rows)

    def _insert_keys(self) -> Any:
        return sqlite_insert(unique_keys).on_conflict_do_nothing()

    async def claim_key(
        self, conn: AsyncConnection, scope: str, key: str, stream_id: str, now: datetime
    ) -> None:
        with translate_errors(self.database_label):
            # ON CONFLICT DO NOTHING keeps a PostgreSQL transaction usable after a clash.
            result = await conn.execute(
                self._insert_keys().returning(unique_keys.c.stream_id),
                {"scope": scope, "key": key, "stream_id": stream_id, "claimed_at": now},
            )
            if result.first() is not None:
                return
            holder = await conn.scalar(
                select(unique_keys.c.stream_id).where(
                    unique_keys.c.scope == scope, unique_keys.c.key == key
                )
            )
        if holder != stream_id:
            raise KeyAlreadyClaimed(scope, holder)

    # -- wake-ups ----------------------------------------------------------------------------

    def appended(self, store: EventStore, head: int) -> None:
        """Called after a COMMIT that appended up to ``head``."""
        self._advance(head)

    def _advance(self, head: int) -> None:
        if head <= self._head:
            return
        self._head = head
        still: list[tuple[int, asyncio.Future[None]]] = []
        for after, future in self._waiters:
            if head > after:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((after, future))
        self._waiters = still

    async def wait_for_append(self, store: EventStore, after: int, timeout: float) -> bool:
        if self._head > after:
            return True
        await self._ensure_listening()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((after, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        finally:
            self._waiters = [(a, f) for a, f in self._waiters if f is not future]
        return True

    async def _ensure_listening(self) -> None:
        """Start cross-process wake-ups, where the dialect has them."""

    async def aclose(self) -> None:
        for _, future in self._waiters:
            future.cancel()
        self._waiters.clear()


class SQLiteDialect(Dialect):
    name = "sqlite"

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.database_label = engine.url.database or ":memory:"


class PostgresDialect(Dialect):
    name = "postgresql"

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._lock_sql = text(
            f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_CLASS}, 'events'::regclass::oid::int)"
        )
        self._channel: str | None = None
        self._notify_task: asyncio.Task[None] | None = None
        self._notify_pending = 0
        self._listener: Any = None
        self._listener_lock: asyncio.Lock | None = None

    def _insert_keys(self) -> Any:
        return pg_insert(unique_keys).on_conflict_do_nothing()

    async def lock_appends(self, conn: AsyncConnection) -> None:
        # Its own statement: a statement's snapshot predates a lock taken inside it,
        # so max(position) read in the same statement could be stale.
        await conn.execute(self._lock_sql)

    def appended(self, store: EventStore, head: int) -> None:
        super().appended(store, head)
        self._notify_pending = max(self._notify_pending, head)
        if self._notify_task is None or self._notify_task.done():
            self._notify_task = asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        # At most one NOTIFY per interval, outside the append transaction: NOTIFY takes
        # a cluster-wide lock at commit, which must stay off the serialised path.
        await asyncio.sleep(NOTIFY_INTERVAL)
        head = self._notify_pending
        try:
            async with self.engine.connect() as conn:
                await conn.execute(
                    text("SELECT pg_notify(:channel, :head)"),
                    {"channel": await self.channel(conn), "head": str(head)},
                )
                await conn.commit()
        except Exception:  # a lost hint only delays readers until their next poll
            log.warning("NOTIFY failed; readers fall back to polling", exc_info=True)

    async def channel(self, conn: AsyncConnection) -> str:
        # One channel per schema: a store in another schema of the same database must
        # not wake this one with its head position.
        if self._channel is None:
            schema = await conn.scalar(text("SELECT current_schema()"))
            self._channel = f"{NOTIFY_CHANNEL}:{schema}"
        return self._channel

    async def _ensure_listening(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        if self._listener_lock is None:
            self._listener_lock = asyncio.Lock()
        async with self._listener_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            import asyncpg  # noqa: PLC0415  # only PostgreSQL needs the driver here

            url = self.engine.url.set(drivername="postgresql")
            try:
                async with self.engine.connect() as conn:
                    channel = await self.channel(conn)
                # A dedicated connection outside the pool: LISTEN needs a session that
                # is never inside a transaction and never handed to another task.
                self._listener = await asyncpg.connect(url.render_as_string(hide_password=False))
                await self._listener.add_listener(channel, self._on_notify)
            except Exception:  # degrade to polling; the hint is an optimisation
                log.warning("LISTEN unavailable; readers poll", exc_info=True)
                self._listener = None

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._advance(int(payload))

    async def aclose(self) -> None:
        await super().aclose()
        if self._notify_task is not None:
            with contextlib.suppress(Exception):
                await self._notify_task
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None


def dialect_for(engine: AsyncEngine) -> Dialect:
    name = engine.dialect.name
    if name == "postgresql":
        return PostgresDialect(engine)
    if name == "sqlite":
        return SQLiteDialect(engine)
    raise ValueError(f"unsupported dialect {name!r}")
