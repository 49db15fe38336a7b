"""The face users hold: :class:`DatabaseService` and :func:`create_database_service`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain import audit, projects, security, sessions, tasks, users
from domain.base import Command, CommandContext, SecurityPolicy
from domain.passwords import BcryptHasher, PasswordHasher
from domain.permissions import SYSTEM_ACTOR
from eventstore import (
    EventStore,
    create_engine,
    health_check,
    pool_status,
    telemetry,
    transparency,
)
from eventstore.engine import ReadEngine, begin_write
from eventstore.grouping import whole
from eventstore.retention import RETENTION_CATEGORY, ArchiveReport
from eventstore.schema import events
from eventstore.translate import translate_errors
from migrations import runner as migrations
from projections import checkpoints, parking, replay
from projections.errors import RebuildError
from projections.projector import Projector
from projections.publishing import Publisher, publisher_lag
from projections.readmodels import ALL_PROJECTORS, importable_name
from projections.replay import DEFAULT_BATCH_SIZE, RebuildReport
from projections.runner import (
    SHARED_LOOP_BATCH,
    SHARED_LOOP_CHUNK,
    InlineRunner,
    Worker,
    check_wait,
    lowest_position,
    wait_for,
)
from tiu import rebuilds
from tiu.dispatch import CommandResult, Dispatcher
from tiu.publishing import build_publisher
from tiu.replicas import ReplicaReads
from tiu.repositories import Caller, Channel, Repositories
from tiu.settings import Settings

if TYPE_CHECKING:
    from projections.redis_sessions import SessionCache

T = TypeVar("T")
log = logging.getLogger("tiu")

CATEGORIES = frozenset(
    {
        users.CATEGORY,
        projects.CATEGORY,
        tasks.CATEGORY,
        sessions.CATEGORY,
        security.CATEGORY,
        audit.CATEGORY,
        RETENTION_CATEGORY,
        parking.OPERATIONS_CATEGORY,
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
        own_engine: bool = True,
    ) -> None:
        """``own_engine=False``: ``engine`` is shared (a tenant's view of one pool,
        :mod:`tiu.tenants`); :meth:`aclose` leaves it open and its pool is watched by
        its owner."""
        self.settings = settings
        self.projection_mode = ProjectionMode(projection_mode)
        self.engine = engine or create_engine(settings.database_url, settings.engine_options())
        self._own_engine = own_engine or engine is None
        if self._own_engine:
            telemetry.watch_pool(self.engine)
        #: What repositories read through. On PostgreSQL it runs without BEGIN and
        #: ROLLBACK (two round trips of a three-statement read): under READ COMMITTED
        #: every statement of a transaction takes its own snapshot anyway, so an
        #: explicit read-only transaction promised nothing more; and a read cancelled
        #: mid-round-trip waits for it to end (:class:`ReadEngine`). SQLite keeps its
        #: read transaction, which does hold one snapshot for all of a read's statements.
        self.reader: AsyncEngine = (
            _read_engine(self.engine) if self.engine.dialect.name == "postgresql" else self.engine
        )
        self._clock = clock or (lambda: datetime.now(UTC))
        self.store = EventStore(self.engine, categories=CATEGORIES, clock=self._clock)
        #: Reads from ``read_database_url`` with read-your-writes (``None``: no replica).
        self.replica_reads: ReplicaReads | None = None
        if settings.read_database_url:
            if self.engine.dialect.name != "postgresql":
                raise ValueError("read_database_url needs a PostgreSQL primary")
            replica = create_engine(settings.read_database_url, settings.engine_options())
            if replica.dialect.name != "postgresql":
                raise ValueError("read_database_url must be a PostgreSQL streaming replica")
            self.replica_reads = ReplicaReads(
                self.store,
                self.reader,
                _read_engine(replica),
                wait=settings.replica_wait,
            )
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
            group_budget=settings.group_budget,
            hasher=self.hasher,
        )
        self._worker_task: asyncio.Task[None] | None = None
        self._worker_stop: asyncio.Event | None = None
        #: The in-process event publisher (``run_publisher=True``), else None.
        self.publisher: Publisher | None = None
        self._publisher_task: asyncio.Task[None] | None = None
        self._publisher_stop = asyncio.Event()
        #: The Redis session read model (``redis_url``); ``None`` when not configured.
        self.session_cache: SessionCache | None = None
        if settings.redis_url:
            # redis is an optional extra: imported only when configured.
            from projections.redis_sessions import SessionCache  # noqa: PLC0415

            self.session_cache = SessionCache.from_url(
                settings.redis_url,
                prefix=settings.redis_prefix,
                idle_timeout=settings.session_idle_timeout,
            )
        self._cache_task: asyncio.Task[None] | None = None
        self._cache_stop = asyncio.Event()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, *, migrate: bool | None = None, run_worker: bool = False) -> None:
        """Bring the schema to head (unless told not to), register checkpoints, and
        rebuild projections whose version changed (inline mode).

        A database that cannot be reached or opened (no server, no such database or
        role, a file that is not a database) raises :class:`StoreUnavailable` naming it
        (without the URL's password)."""
        with translate_errors(self.store.dialect.database_label):
            if self.settings.auto_migrate if migrate is None else migrate:
                await migrations.upgrade(self.engine)
            async with self.engine.connect() as conn:
                await begin_write(conn)
                stale = await checkpoints.ensure(conn, self.projectors)
                await conn.commit()
        # The catch-up and the worker share the host's event loop (chunked Python work,
        # SQLite statements on a worker thread) and leave its garbage collector alone.
        if self.projection_mode is ProjectionMode.INLINE:
            if stale:  # none given, rebuild() would look for the stale ones again
                await self.rebuild(*stale)
            await Worker(
                self.store,
                self.projectors,
                leader_election=False,
                pause_every=SHARED_LOOP_CHUNK,
            ).catch_up()
        if self.session_cache is not None:
            await self._start_session_cache(self.session_cache)
        if run_worker:
            self._worker_stop = asyncio.Event()
            worker = Worker(
                self.store,
                self.projectors,
                batch_size=500,
                poll_interval=0.5,
                pause_every=SHARED_LOOP_CHUNK,
            )
            self._worker_task = asyncio.create_task(worker.run(self._worker_stop))
        if self.settings.run_publisher:
            self.publisher = build_publisher(self.store, self.settings)
            self._publisher_task = asyncio.create_task(self.publisher.run(self._publisher_stop))

    async def rebuild(self, *projectors: str | Projector) -> list[RebuildReport]:
        """Rebuild projections from the log and swap them in, while the service keeps
        serving from the live tables (:mod:`projections.replay`; resumable). Projectors
        are named as in :attr:`projectors` (or given); none: the stale ones, those whose
        code version is not the live one. :meth:`start` rebuilds those (inline mode).

        Each rebuild runs in a child process of its own (:mod:`tiu.rebuilds`, at a lower
        CPU priority), so the host's event loop, GIL and garbage collector are left alone;
        this call only awaits it. It runs in this process instead, sharing the loop
        (``pause_every``, statements on a worker thread on SQLite), where no child can
        do it: ``rebuild_in_child=False``; an in-memory SQLite database; an engine given
        to the service that :func:`eventstore.create_engine` did not build as it is
        (a view of one, such as a tenant's); or a projector whose class is not
        importable by its qualified name, or whose instance holds state of its own
        (:func:`projections.readmodels.importable_name`: a class defined in a function
        or in ``__main__``). The registered projectors (``ALL_PROJECTORS``) all are.

        Raises :class:`RebuildError` for a name the service has no projector of, and,
        naming the projector and the child's last error line, when a child fails; what
        it committed is resumed by the next rebuild. Cancelling the call terminates the
        child (SIGTERM, SIGKILL after 10 s) and waits for it."""
        if projectors:
            chosen = [self._projector(p) if isinstance(p, str) else p for p in projectors]
        else:
            async with self.engine.connect() as conn:
                chosen = await replay.stale_projectors(conn, self.projectors)
        env = rebuilds.child_environment(self.engine) if self.settings.rebuild_in_child else None
        # A child holds SQLite's write lock for a batch: a small one lets the host's
        # writers in between; PostgreSQL's shadow tables block no writer.
        batch = SHARED_LOOP_BATCH if self.engine.dialect.name == "sqlite" else DEFAULT_BATCH_SIZE
        reports = []
        for projector in chosen:
            spec = importable_name(projector) if env is not None else None
            if env is not None and spec is not None:
                where = "a child process"
                report = await rebuilds.rebuild_in_child(
                    env, projector.name, spec, batch_size=batch
                )
            else:
                where = "this process"
                report = await replay.rebuild(
                    self.store,
                    projector,
                    batch_size=SHARED_LOOP_BATCH,
                    pause_every=SHARED_LOOP_CHUNK,
                )
            log.info(
                "rebuilt %s v%d in %s: %d events to position %d in %.1f s",
                report.projector,
                report.version,
                where,
                report.applied,
                report.position,
                report.seconds,
            )
            reports.append(report)
        return reports

    def _projector(self, name: str) -> Projector:
        for projector in self.projectors:
            if projector.name == name:
                return projector
        known = ", ".join(sorted(p.name for p in self.projectors))
        raise RebuildError(name, f"this service has no such projector; known: {known}")

    async def _start_session_cache(self, cache: SessionCache) -> None:
        from projections.redis_sessions import CACHE_ERRORS  # noqa: PLC0415

        await self.store.dialect.follow_head()
        try:
            await cache.catch_up(self.store)
        except CACHE_ERRORS as error:  # readers use SQL until it is back
            log.warning("session cache unavailable at start: %r", error)
        self._cache_task = asyncio.create_task(cache.run(self.store, self._cache_stop))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A background task that died is logged, not raised: the rest must still close.
        if self._cache_task is not None:
            self._cache_stop.set()
            await _ended(self._cache_task, "session cache")
        if self.session_cache is not None:
            await self.session_cache.aclose()
        if self._worker_task is not None and self._worker_stop is not None:
            self._worker_stop.set()
            await _ended(self._worker_task, "worker")
        if self._publisher_task is not None:
            self._publisher_stop.set()  # acknowledgements in flight are awaited
            await _ended(self._publisher_task, "publisher")
        if self.dispatcher.group is not None:
            await self.dispatcher.group.aclose()  # commands already queued are written
        await self.store.aclose()
        if self._own_engine:
            await self.engine.dispose()
        if self.replica_reads is not None:
            await self.replica_reads.replica.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def read_connection(
        self, *, streamed: bool = False
    ) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A connection for a repository read: the replica when configured and caught
        up with this process's writes, else the primary (``service.reader``).

        ``streamed``: one whose results may be streamed (``conn.stream()``). On
        PostgreSQL a server-side cursor lives in a transaction, which the reader's
        connections skip: such a read gets a READ ONLY transaction of its own."""
        opened = (
            self.replica_reads.connect()
            if self.replica_reads is not None
            else self.reader.connect()
        )
        if streamed and self.engine.dialect.name == "postgresql":
            return _read_only_transaction(opened)
        return opened

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

        value, unit = await self.dispatcher.run(work, guarded=True)
        positions = [r.position for r in unit.results if r.position is not None]
        if positions:
            await self.wait_for(max(positions))
            await self.session_cache_caught_up(max(positions))
        return value

    async def caught_up(self, result: CommandResult) -> None:
        if result.position is None:
            return
        inline = self.projection_mode is ProjectionMode.INLINE
        if inline and self.session_cache is None:
            return  # the read models hold the result already: nothing to wait for
        types = {e.event_type for e in result.events}
        if not inline:
            await self.wait_for(result.position, event_types=types)
        if self.session_cache is not None and types & self.session_cache.handles:
            await self.session_cache_caught_up(result.position)

    async def session_cache_caught_up(self, position: int) -> bool:
        """Wait (up to ``session_cache_wait``) until the Redis session cache reflects
        ``position``: a revocation then holds in every instance when its call returns.
        ``False`` if it did not (Redis down or slow): readers then use SQL, because the
        cache is behind the head they know."""
        from projections.redis_sessions import CACHE_ERRORS  # noqa: PLC0415

        if self.session_cache is None:
            return False
        try:
            return await self.session_cache.wait_for(position, self.settings.session_cache_wait)
        except CACHE_ERRORS:
            return False

    async def wait_for(
        self, position: int, timeout: float = 10.0, *, event_types: set[str] | None = None
    ) -> None:
        """Return once the read models reflect ``position`` (immediate in inline mode).

        Raises :class:`ProjectionParked` at once when a parked projector cannot reach
        it (with ``event_types``, only one that handles a type among them)."""
        check_wait(position, timeout)  # in both modes: inline mode returned before
        if self.projection_mode is ProjectionMode.INLINE:
            return
        await wait_for(self.store, self.projectors, position, timeout, event_types=event_types)

    # -- operations -------------------------------------------------------------------

    async def health_check(self) -> dict[str, Any]:
        """Connection, latency, revision; ``parked_projectors`` names the projectors
        stopped at an event they cannot apply (the service is healthy otherwise, but
        what waits for them fails)."""
        report = await health_check(self.engine, head_revision=migrations.head_revision())
        data = report.as_dict()
        # Parked projectors live in a table of migration 0010: not there before it runs.
        if report.healthy and not report.pending_migrations:
            try:
                async with self.engine.connect() as conn:
                    found = await parking.load(conn, [p.name for p in self.projectors])
            except Exception as error:  # health is reported, not raised
                data["parked_projectors_error"] = f"{type(error).__name__}: {error}"
            else:
                data["parked_projectors"] = {n: p.as_dict() for n, p in sorted(found.items())}
        if report.healthy and report.current_revision is not None:
            try:
                data["publishers"] = await self._publishers()
            except Exception as error:  # health is reported, not raised
                data["publishers"] = {}
                data["publishers_error"] = f"{type(error).__name__}: {error}"
        return data

    async def _publishers(self) -> dict[str, dict[str, Any]]:
        """Each publisher's lag (from its checkpoint), with this process's own status."""
        async with self.engine.connect() as conn:
            lag = await publisher_lag(self.store, conn, self.now())
        if self.publisher is not None:
            status = self.publisher.status
            entry = lag.setdefault(status.name, {})
            entry.update(status.as_dict())
        return lag

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
            tree = await transparency.status(conn)
            parked = await parking.load(conn, [p.name for p in self.projectors])
            for name, entry in lag.items():
                entry["parked"] = parked[name].as_dict() if name in parked else None
        return {
            "head_position": head,
            "events_by_category": by_category,
            "events_by_type": by_type,
            "read_model_rows": rows,
            "projectors": lag,
            "max_lag": head - lowest,
            "transparency": tree,
            "parked": sorted(parked),
            "projection_mode": self.projection_mode.value,
            "publishers": await self._publishers(),
        }

    async def cleanup_expired_sessions(self, *, command_id: str | None = None) -> int:
        async with self.get_repositories() as repos:
            return await repos.sessions.cleanup_expired_sessions(command_id=command_id)

    async def archive_audit_log(
        self, *, before: datetime, output: str | Path | None = None
    ) -> ArchiveReport:
        """Audit retention as the operator (the system actor), with the rules of
        ``tiu audit archive``: see :meth:`tiu.repositories.AuditRepository.archive`."""
        async with self.get_repositories(SYSTEM_ACTOR) as repos:
            return await repos.audit.archive(before=before, output=output)


@asynccontextmanager
async def _read_only_transaction(
    opened: contextlib.AbstractAsyncContextManager[AsyncConnection],
) -> AsyncIterator[AsyncConnection]:
    """``opened`` (a PostgreSQL read connection, in autocommit) in a READ ONLY
    transaction, rolled back as the read ends, a cancelled one too: the rollback is
    never abandoned midway, so the connection goes back to the pool idle, not dropped."""
    async with opened as conn:
        await conn.execution_options(
            isolation_level=conn.default_isolation_level, postgresql_readonly=True
        )
        try:
            yield conn
        finally:
            await whole(conn.rollback())


def _read_engine(engine: AsyncEngine) -> ReadEngine:
    """``engine``'s view for a repository's reads on PostgreSQL: autocommit, round
    trips never abandoned midway."""
    return ReadEngine(engine.sync_engine.execution_options(isolation_level="AUTOCOMMIT"))


async def _ended(task: asyncio.Task[None], what: str) -> None:
    """Wait for a stopped background task; its failure is logged (it was already the
    reason it stopped), so that closing goes on."""
    try:
        await task
    except Exception:
        log.exception("the %s had failed; closing the service anyway", what)


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
