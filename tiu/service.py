"""The face users hold: :class:`DatabaseService` and :func:`create_database_service`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain import audit, projects, security, sessions, tasks, users
from domain.base import Command, CommandContext, SecurityPolicy
from domain.passwords import BcryptHasher, PasswordHasher
from eventstore import EventStore, create_engine, health_check, pool_status
from eventstore.engine import begin_write
from eventstore.retention import RETENTION_CATEGORY
from eventstore.schema import events
from migrations import runner as migrations
from projections import checkpoints, replay
from projections.projector import Projector
from projections.readmodels import ALL_PROJECTORS
from projections.runner import InlineRunner, Worker, lowest_position, wait_for
from tiu.dispatch import CommandResult, Dispatcher
from tiu.repositories import Caller, Channel, Repositories
from tiu.settings import Settings

T = TypeVar("T")

CATEGORIES = frozenset(
    {
        users.CATEGORY,
        projects.CATEGORY,
        tasks.CATEGORY,
        sessions.CATEGORY,
        security.CATEGORY,
        audit.CATEGORY,
        RETENTION_CATEGORY,
    }
)


class ProjectionMode(StrEnum):
    INLINE = "inline"
    """Read models change in the command's transaction: read-your-writes (default)."""
    WORKER = "worker"
    """Read models are updated by ``tiu worker`` (or ``run_worker=True``); writes wait
    for them before returning views."""


class DatabaseService:
    """Owns the engine, the event store, the dispatcher and the projections.

    Use ``async with`` or call :meth:`aclose`. Build with :func:`create_database_service`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        projectors: Sequence[Projector] = ALL_PROJECTORS,
        projection_mode: ProjectionMode | str = ProjectionMode.INLINE,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], datetime] | None = None,
        engine: AsyncEngine | None = None,
    ) -> None:
        self.settings = settings
        self.projection_mode = ProjectionMode(projection_mode)
        self.engine = engine or create_engine(settings.database_url, settings.engine_options())
        #: What repositories read through. On PostgreSQL it runs without BEGIN and
        #: ROLLBACK (two round trips of a three-statement read): under READ COMMITTED
        #: every statement of a transaction takes its own snapshot anyway, so an
        #: explicit read-only transaction promised nothing more. SQLite keeps its read
        #: transaction, which does hold one snapshot for all of a read's statements.
        self.reader: AsyncEngine = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.engine.dialect.name == "postgresql"
            else self.engine
        )
        self._clock = clock or (lambda: datetime.now(UTC))
        self.store = EventStore(self.engine, categories=CATEGORIES, clock=self._clock)
        self.projectors = tuple(projectors)
        self.hasher: PasswordHasher = hasher or BcryptHasher(rounds=settings.bcrypt_rounds)
        self.policy = SecurityPolicy(
            lockout_threshold=settings.lockout_threshold,
            lockout_window=settings.lockout_window,
            lockout_duration=settings.lockout_duration,
            session_lifetime=settings.session_lifetime,
            session_idle_timeout=settings.session_idle_timeout,
            session_touch_interval=settings.session_touch_interval,
            password_reset_ttl=settings.password_reset_ttl,
        )
        inline = (
            InlineRunner(self.projectors) if self.projection_mode is ProjectionMode.INLINE else None
        )
        self.dispatcher = Dispatcher(
            self.store,
            inline=inline,
            snapshot_every=settings.snapshot_every,
            retries=settings.command_retries,
            group_commit=settings.group_commit,
            max_group=settings.max_group,
            hasher=self.hasher,
        )
        self._worker_task: asyncio.Task[None] | None = None
        self._worker_stop: asyncio.Event | None = None
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, *, migrate: bool | None = None, run_worker: bool = False) -> None:
        """Bring the schema to head (unless told not to), register checkpoints, and
        rebuild projections whose version changed (inline mode)."""
        if self.settings.auto_migrate if migrate is None else migrate:
            await migrations.upgrade(self.engine)
        async with self.engine.connect() as conn:
            await begin_write(conn)
            stale = await checkpoints.ensure(conn, self.projectors)
            await conn.commit()
        if self.projection_mode is ProjectionMode.INLINE:
            for projector in stale:
                await replay.rebuild(self.store, projector)
            await Worker(self.store, self.projectors, leader_election=False).catch_up()
        if run_worker:
            self._worker_stop = asyncio.Event()
            worker = Worker(self.store, self.projectors, batch_size=500, poll_interval=0.5)
            self._worker_task = asyncio.create_task(worker.run(self._worker_stop))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._worker_task is not None and self._worker_stop is not None:
            self._worker_stop.set()
            await self._worker_task
        if self.dispatcher.group is not None:
            await self.dispatcher.group.aclose()  # commands already queued are written
        await self.store.aclose()
        await self.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- commands ---------------------------------------------------------------------

    def now(self) -> datetime:
        return self._clock()

    def context(
        self,
        actor_id: str | None = None,
        *,
        ip: str | None = None,
        user_agent: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        now: datetime | None = None,
    ) -> CommandContext:
        return CommandContext(
            now=now or self.now(),
            actor_id=actor_id,
            correlation_id=correlation_id,
            causation_id=causation_id,
            ip=ip,
            user_agent=user_agent,
            policy=self.policy,
        )

    async def dispatch(self, command: Command, ctx: CommandContext | None = None) -> CommandResult:
        """Issue one command; the lowest-level write API (repositories wrap it)."""
        result = await self.dispatcher.dispatch(command, ctx or self.context())
        await self.caught_up(result)
        return result

    @asynccontextmanager
    async def get_repositories(
        self,
        actor_id: str | None = None,
        *,
        ip: str | None = None,
        user_agent: str | None = None,
        correlation_id: str | None = None,
    ) -> AsyncIterator[Repositories]:
        """Repositories acting as ``actor_id`` (``None``: an anonymous caller)."""
        yield Repositories(Channel(self, Caller(actor_id, ip, user_agent, correlation_id), None))

    async def execute_in_transaction(
        self,
        fn: Callable[[Repositories], Awaitable[T]],
        *,
        actor_id: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
        correlation_id: str | None = None,
    ) -> T:
        """Run ``fn(repos)`` with every command it issues in one transaction: all
        commit together or none does. Retried as a whole on a version conflict, so
        ``fn`` must only act through ``repos``. Reads inside see the writes before
        them (inline mode)."""
        caller = Caller(actor_id, ip, user_agent, correlation_id)

        async def work(unit: Any) -> T:
            return await fn(Repositories(Channel(self, caller, unit)))

        value, unit = await self.dispatcher.run(work)
        positions = [r.position for r in unit.results if r.position is not None]
        if positions:
            await self.wait_for(max(positions))
        return value

    async def caught_up(self, result: CommandResult) -> None:
        if result.position is not None:
            await self.wait_for(result.position)

    async def wait_for(self, position: int, timeout: float = 10.0) -> None:
        """Return once the read models reflect ``position`` (immediate in inline mode)."""
        if self.projection_mode is ProjectionMode.INLINE:
            return
        await wait_for(self.store, self.projectors, position, timeout)

    # -- operations -------------------------------------------------------------------

    async def health_check(self) -> dict[str, Any]:
        report = await health_check(self.engine, head_revision=migrations.head_revision())
        return report.as_dict()

    def get_pool_status(self) -> dict[str, Any]:
        return pool_status(self.engine).as_dict()

    async def get_statistics(self) -> dict[str, Any]:
        """Events by category and type, read-model row counts, projector lag."""
        async with self.engine.connect() as conn:
            by_category = await _counts(conn, events.c.stream_category)
            by_type = await _counts(conn, events.c.event_type)
            head = await self.store.head_position(conn)
            rows: dict[str, int] = {}
            for projector in self.projectors:
                for table in projector.tables:
                    rows[table.name] = int(
                        await conn.scalar(select(func.count()).select_from(table)) or 0
                    )
            lag: dict[str, dict[str, Any]] = {}
            for projector in self.projectors:
                active = await checkpoints.load_active(conn, projector.name)
                lag[projector.name] = {
                    "code_version": projector.version,
                    "active_version": active.version if active else None,
                    "position": active.position if active else None,
                    "lag": head - active.position if active else None,
                    "needs_rebuild": active is None or active.version != projector.version,
                }
            lowest = await lowest_position(conn, self.projectors)
        return {
            "head_position": head,
            "events_by_category": by_category,
            "events_by_type": by_type,
            "read_model_rows": rows,
            "projectors": lag,
            "max_lag": head - lowest,
            "projection_mode": self.projection_mode.value,
        }

    async def cleanup_expired_sessions(self) -> int:
        async with self.get_repositories() as repos:
            return await repos.sessions.cleanup_expired_sessions()


async def _counts(conn: AsyncConnection, column: ColumnElement[str]) -> dict[str, int]:
    rows = await conn.execute(select(column, func.count()).group_by(column))
    return {str(key): int(count) for key, count in rows}


async def create_database_service(
    url: str | None = None,
    *,
    migrate: bool | None = None,
    projection_mode: ProjectionMode | Literal["inline", "worker"] = ProjectionMode.INLINE,
    run_worker: bool = False,
    projectors: Sequence[Projector] = ALL_PROJECTORS,
    hasher: PasswordHasher | None = None,
    clock: Callable[[], datetime] | None = None,
    **settings: Any,
) -> DatabaseService:
    """Build and start a service. ``url`` and ``settings`` override ``TIU_*`` variables.

    On an empty database the schema is brought to head through the Alembic
    migrations unless ``migrate=False`` (or ``TIU_AUTO_MIGRATE=0``).
    """
    if url is not None:
        settings["database_url"] = url
    service = DatabaseService(
        Settings(**settings),
        projectors=projectors,
        projection_mode=projection_mode,
        hasher=hasher,
        clock=clock,
    )
    try:
        await service.start(migrate=migrate, run_worker=run_worker)
    except BaseException:
        await service.aclose()
        raise
    return service
