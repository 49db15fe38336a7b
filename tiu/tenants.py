"""Many tenants in one PostgreSQL database: a schema each, one registry per process.

A tenant is a schema holding a whole tiu store (log, read models, checkpoints,
migrations). Nothing crosses schemas: the append lock is keyed by the OID of the
tenant's ``events`` table, worker leadership by the schema's name, NOTIFY uses a
channel per schema. See ``docs/scaling.md``.

Every tenant of a registry works on one engine, so one pool bounds the registry's
connections however many tenants are open. A tenant's engine is a view of it
(``engine.execution_options(tiu_tenant_schema=name)``: same pool, same dialect); a
connection checked out through the view is set to the tenant's ``search_path`` before
use, with one ``SET`` only when it last served another schema (:func:`shared_engine`).
The search path, not SQLAlchemy's ``schema_translate_map``, is what has to change:
the store's hot path runs prepared SQL on the driver and calls the plpgsql append
functions, and the lock keys and NOTIFY channel use ``current_schema()``, none of
which a translate map reaches. PostgreSQL re-plans a prepared statement whose search
path changed since it was prepared, so statement caches stay per connection and
correct.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import event, text
from sqlalchemy.engine import AdaptedConnection, Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.passwords import PasswordHasher
from eventstore import EventStore, create_engine, telemetry
from eventstore.dialects import driver_errors
from eventstore.engine import SCHEMA_OPTION, search_path_statement
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


def is_tenant_name(name: str) -> bool:
    """Whether ``name`` can be a tenant's schema."""
    return (
        bool(TENANT_NAME.fullmatch(name)) and name not in _RESERVED and not name.startswith("pg_")
    )


def check_tenant_name(name: str) -> str:
    """``name`` if it can be a tenant's schema; else :class:`ValueError` naming it."""
    if not is_tenant_name(name):
        raise ValueError(
            f"invalid tenant name {name!r}: lower-case letters, digits and _, "
            "at most 63, not starting with a digit or pg_, not public"
        )
    return name


def shared_engine(settings: Settings, *, max_overflow: int | None = None) -> AsyncEngine:
    """One engine for many tenants' schemas (``settings.search_path`` is ignored;
    ``max_overflow`` overrides the setting's, -1 for no bound).

    :func:`tenant_engine` gives a tenant's view of it. Each connection checked out
    through a view is first set to the view's schema (connections checked out through
    the engine itself, to the server's default path), with one ``SET search_path``
    only when the pooled connection last served another schema.
    """
    if not settings.database_url.startswith("postgresql"):
        raise ValueError("tenants are schemas of one PostgreSQL database")
    options = dataclasses.replace(settings.engine_options(), search_path=None)
    if max_overflow is not None:
        options = dataclasses.replace(options, max_overflow=max_overflow)
    engine = create_engine(settings.database_url, options)

    def set_search_path(conn: Connection) -> None:
        wanted = conn.get_execution_options().get(SCHEMA_OPTION)
        pooled = conn.connection
        if pooled.info.get(SCHEMA_OPTION) == wanted:
            return
        # Outside any transaction, so the setting is the session's (a SET inside one
        # would be undone by its rollback). A bare checkout (the store's direct
        # appends) fires no engine_connect: eventstore.dialects.follow_schema sets it.
        statement = search_path_statement(wanted)
        try:
            with driver_errors(engine, pooled, statement):
                adapted = cast(AdaptedConnection, pooled.dbapi_connection)
                adapted.run_async(lambda driver: driver.execute(statement))
        except BaseException as error:
            # Its path is unknown now: the pool must not hand it out again.
            conn.invalidate(error if isinstance(error, Exception) else None)
            raise
        pooled.info[SCHEMA_OPTION] = wanted

    event.listen(engine.sync_engine, "engine_connect", set_search_path)
    return engine


def tenant_engine(engine: AsyncEngine, tenant: str) -> AsyncEngine:
    """``tenant``'s view of a :func:`shared_engine`: the same pool, its schema's path."""
    return engine.execution_options(**{SCHEMA_OPTION: check_tenant_name(tenant)})


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

    Every service runs on :attr:`engine`, one pool of ``pool_size`` (+
    ``max_overflow``) connections for all tenants (:func:`shared_engine`). A service
    in worker mode with ``run_workers=True`` holds one of them for as long as it is
    open (its worker's leadership session). Closing a service leaves the engine open;
    :meth:`aclose` disposes it.
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
        #: The engine every tenant's service runs on (a view per tenant).
        self.engine = shared_engine(settings)
        telemetry.watch_pool(self.engine)

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
        """Every schema of the database that holds a tiu store, by name; not ``public``,
        which holds the store of a database used without tenants."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT table_schema FROM information_schema.tables "
                    "WHERE table_name = 'projection_checkpoints' ORDER BY 1"
                )
            )
            return [str(r[0]) for r in rows if is_tenant_name(str(r[0]))]

    async def create_tenant(self, name: str) -> None:
        """Create ``name``'s schema if absent and bring it to the head migration."""
        check_tenant_name(name)
        async with self.engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{name}"'))
        await migrations.upgrade(tenant_engine(self.engine, name))

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
        """Close every open service (their workers finish their batch first), then the
        engine."""
        self._closed = True
        async with self._changed:
            entries = list(self._open.values())
            self._open.clear()
        try:
            for entry in entries:
                await entry.service.aclose()
        finally:
            await self.engine.dispose()

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
                # Waited for, not awaited: an opener cancelled midway (its own caller
                # gave up) hands this caller, which was not cancelled, nothing to raise.
                await asyncio.wait([pending])
                failed = None if pending.cancelled() else pending.exception()
                if isinstance(failed, Exception):
                    raise failed  # the opening failed: so does this lease
                continue  # now open, or its opener was cancelled: open it here
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
            engine=tenant_engine(self.engine, name),
            own_engine=False,
        )
        try:
            await service.start(migrate=create, run_worker=self.run_workers)
        except BaseException:
            await service.aclose()
            raise
        return service

    async def run_workers_until(self, stop: asyncio.Event, **worker: Any) -> None:
        """Project every tenant's log until ``stop`` is set (``tiu tenants worker``).

        One :class:`Worker` per tenant, all on one engine of their own, apart from the
        services' (a tenant's projections run whether or not its service is open).
        Each worker holds one connection for as long as it runs (its leadership
        session: those are not bounded, one per tenant); their batches share a pool of
        ``pool_size``. Tenants created later are picked up every ``rescan`` seconds.
        """
        rescan = float(worker.pop("rescan", 5.0))
        running: dict[str, asyncio.Task[None]] = {}
        engine = shared_engine(self.settings, max_overflow=-1)
        try:
            while not stop.is_set():
                for name in await self.tenants():
                    if name not in running or running[name].done():
                        running[name] = asyncio.create_task(
                            self._work(tenant_engine(engine, name), stop, worker)
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), rescan)
        finally:
            stop.set()
            await asyncio.gather(*running.values(), return_exceptions=True)
            await engine.dispose()

    async def _work(
        self, engine: AsyncEngine, stop: asyncio.Event, options: dict[str, Any]
    ) -> None:
        store = EventStore(engine)
        try:
            await Worker(store, self.projectors, **options).run(stop)
        finally:
            await store.aclose()
