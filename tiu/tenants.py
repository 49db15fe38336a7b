"""Many tenants in one PostgreSQL database: a schema each, one registry per process.

A tenant is a schema holding a whole tiu store (log, read models, checkpoints,
migrations). Nothing crosses schemas: the append lock is keyed by the OID of the
tenant's ``events`` table, worker leadership by the schema's name, NOTIFY uses a
channel per schema. See ``docs/scaling.md``.

Each open tenant has an engine of its own whose connections are opened with the
tenant's ``search_path``: the store's hot path (prepared statements on the driver,
the plpgsql append functions) resolves ``events`` through it, so switching one
pooled connection between schemas would cost a ``SET`` per transaction. The
registry bounds what that costs instead: at most ``max_open`` tenants are open,
each with a pool of ``pool_size`` (+ ``max_overflow``) connections, and the least
recently used idle tenant is closed to open another.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import text

from domain.passwords import PasswordHasher
from eventstore import EventStore, create_engine
from eventstore.errors import PoolExhausted
from migrations import runner as migrations
from projections.projector import Projector
from projections.readmodels import ALL_PROJECTORS
from projections.runner import Worker
from tiu.service import DatabaseService, ProjectionMode
from tiu.settings import Settings

#: A tenant's name is its schema's: a plain lower-case identifier, never quoted text.
TENANT_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_RESERVED: Final = frozenset({"public", "information_schema"})


def check_tenant_name(name: str) -> str:
    """``name`` if it can be a tenant's schema; else :class:`ValueError` naming it."""
    if not TENANT_NAME.fullmatch(name) or name in _RESERVED or name.startswith("pg_"):
        raise ValueError(
            f"invalid tenant name {name!r}: lower-case letters, digits and _, "
            "at most 63, not starting with a digit or pg_, not public"
        )
    return name


@dataclass
class _Open:
    service: DatabaseService
    leases: int = 0


class TenantRegistry:
    """Opens one :class:`DatabaseService` per tenant schema, on demand.

    ``async with registry.tenant("acme") as service:`` leases the tenant's service,
    opening it (and creating and migrating its schema, unless ``create=False``) on
    first use. At most ``max_open`` services are open; opening one more closes the
    least recently used service nobody holds, and waits (up to the pool timeout, then
    :class:`PoolExhausted`) while every open one is held. ``settings`` are shared by
    every tenant; only the search path differs.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        max_open: int = 16,
        projection_mode: ProjectionMode | str = ProjectionMode.INLINE,
        run_workers: bool = False,
        projectors: Sequence[Projector] = ALL_PROJECTORS,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not settings.database_url.startswith("postgresql"):
            raise ValueError("tenants are schemas of one PostgreSQL database")
        if max_open < 1:
            raise ValueError("max_open must be at least 1")
        self.settings = settings
        self.max_open = max_open
        self.projection_mode = ProjectionMode(projection_mode)
        self.run_workers = run_workers
        self.projectors = tuple(projectors)
        self._hasher = hasher
        self._clock = clock
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._opening: dict[str, asyncio.Future[_Open]] = {}
        self._changed = asyncio.Condition()
        self._closed = False

    def settings_for(self, tenant: str) -> Settings:
        """The shared settings with the tenant's schema (and its own Redis key prefix)."""
        name = check_tenant_name(tenant)
        return self.settings.model_copy(
            update={"search_path": name, "redis_prefix": f"{self.settings.redis_prefix}{name}:"}
        )

    @contextlib.asynccontextmanager
    async def tenant(self, name: str, *, create: bool = True) -> AsyncIterator[DatabaseService]:
        """Lease ``name``'s service for the block (it is not closed while held)."""
        entry = await self._lease(check_tenant_name(name), create)
        try:
            yield entry.service
        finally:
            async with self._changed:
                entry.leases -= 1
                self._changed.notify_all()

    @property
    def open_tenants(self) -> list[str]:
        """Open tenants, least recently used first."""
        return list(self._open)

    async def tenants(self) -> list[str]:
        """Every schema of the database that holds a tiu store, by name."""
        engine = create_engine(self.settings.database_url, self.settings.engine_options())
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        "SELECT table_schema FROM information_schema.tables "
                        "WHERE table_name = 'projection_checkpoints' ORDER BY 1"
                    )
                )
                return [str(r[0]) for r in rows if TENANT_NAME.fullmatch(str(r[0]))]
        finally:
            await engine.dispose()

    async def create_tenant(self, name: str) -> None:
        """Create ``name``'s schema if absent and bring it to the head migration."""
        check_tenant_name(name)
        settings = self.settings_for(name)
        admin = create_engine(settings.database_url, self.settings.engine_options())
        try:
            async with admin.begin() as conn:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{name}"'))
        finally:
            await admin.dispose()
        engine = create_engine(settings.database_url, settings.engine_options())
        try:
            await migrations.upgrade(engine)
        finally:
            await engine.dispose()

    async def close_tenant(self, name: str) -> bool:
        """Close ``name``'s service now if nobody holds it; ``False`` if it is held."""
        async with self._changed:
            entry = self._open.get(name)
            if entry is None:
                return True
            if entry.leases:
                return False
            del self._open[name]
        await entry.service.aclose()
        return True

    async def aclose(self) -> None:
        """Close every open service (their workers finish their batch first)."""
        self._closed = True
        async with self._changed:
            entries = list(self._open.values())
            self._open.clear()
        for entry in entries:
            await entry.service.aclose()

    async def __aenter__(self) -> TenantRegistry:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _lease(self, name: str, create: bool) -> _Open:
        if self._closed:
            raise RuntimeError("the tenant registry is closed")
        deadline = asyncio.get_running_loop().time() + self.settings.pool_timeout
        while True:
            evicted: _Open | None = None
            async with self._changed:
                entry = self._open.get(name)
                if entry is not None:
                    entry.leases += 1
                    self._open.move_to_end(name)
                    return entry
                pending = self._opening.get(name)
                if pending is None and len(self._open) + len(self._opening) >= self.max_open:
                    idle = next((n for n, e in self._open.items() if not e.leases), None)
                    if idle is None:
                        remaining = deadline - asyncio.get_running_loop().time()
                        if remaining <= 0:
                            raise PoolExhausted(self.settings.pool_timeout)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), remaining)
                        continue
                    evicted = self._open.pop(idle)
                if pending is None:
                    pending = asyncio.get_running_loop().create_future()
                    self._opening[name] = pending
                    mine = True
                else:
                    mine = False
            if evicted is not None:
                await evicted.service.aclose()
            if not mine:
                await asyncio.shield(pending)
                continue  # now open (or failed: try again, which raises again)
            try:
                opened = _Open(await self._start(name, create))
            except BaseException as error:
                async with self._changed:
                    del self._opening[name]
                    self._changed.notify_all()
                pending.set_exception(error)
                pending.exception()  # retrieved: waiters retry on their own
                raise
            async with self._changed:
                del self._opening[name]
                self._open[name] = opened
                opened.leases += 1
                self._changed.notify_all()
            pending.set_result(opened)
            return opened

    async def _start(self, name: str, create: bool) -> DatabaseService:
        if create:
            await self.create_tenant(name)
        service = DatabaseService(
            self.settings_for(name),
            projectors=self.projectors,
            projection_mode=self.projection_mode,
            hasher=self._hasher,
            clock=self._clock,
        )
        try:
            await service.start(migrate=create, run_worker=self.run_workers)
        except BaseException:
            await service.aclose()
            raise
        return service

    async def run_workers_until(self, stop: asyncio.Event, **worker: Any) -> None:
        """Project every tenant's log until ``stop`` is set (``tiu worker --all-tenants``).

        One :class:`Worker` per tenant, on an engine of its own (a leader connection
        and a pool of two), apart from the services' pools: a tenant's projections
        run whether or not its service is open. Tenants created later are picked up
        every ``rescan`` seconds.
        """
        rescan = float(worker.pop("rescan", 5.0))
        running: dict[str, asyncio.Task[None]] = {}
        try:
            while not stop.is_set():
                for name in await self.tenants():
                    if name not in running or running[name].done():
                        running[name] = asyncio.create_task(self._work(name, stop, worker))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), rescan)
        finally:
            stop.set()
            await asyncio.gather(*running.values(), return_exceptions=True)

    async def _work(self, name: str, stop: asyncio.Event, options: dict[str, Any]) -> None:
        settings = self.settings_for(name).model_copy(update={"pool_size": 2, "max_overflow": 0})
        engine = create_engine(settings.database_url, settings.engine_options())
        store = EventStore(engine)
        try:
            await Worker(store, self.projectors, **options).run(stop)
        finally:
            await store.aclose()
            await engine.dispose()
