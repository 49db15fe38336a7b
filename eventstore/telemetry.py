"""Traces and metrics through the OpenTelemetry API (the optional ``otel`` extra).

Every call site in the library is one line (a ``with``, a decorator or a call) into
this module, which is the only one importing OpenTelemetry. It sits in ``eventstore``
because the store, the projections and ``tiu`` all report through it.

Cost. Without the extra, every helper is a no-op. With it but with no SDK configured
(no tracer provider set globally or through :func:`configure`), no span is started:
each helper checks the provider once and returns; metric instruments are the API's
proxies, whose calls do nothing until a meter provider is set.

Attributes. Database work follows OpenTelemetry's semantic conventions for database
client spans (``db.system.name``, ``db.operation.name``, ``db.collection.name``);
tiu's own attributes are all under ``tiu.``. No attribute or metric label carries a
parameter value: only type names, outcome codes, counts, positions, projector names
and stream ids (``tests/security`` checks that no secret reaches either).

Context. A command issued inside an active span becomes its child. The command's
trace context (W3C ``traceparent``) goes into each event's metadata, so a projector's
batch span, in whatever process runs it, links back to the commands whose events it
applies.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, ParamSpec, Protocol, TypeVar

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.trace import Link, SpanContext, TraceFlags

    ENABLED: Final = True
except ImportError:  # the extra is not installed: every helper is a no-op
    ENABLED = False  # type: ignore[misc]

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

P = ParamSpec("P")
R = TypeVar("R")

#: Links a batch span keeps at most (distinct commands whose events it applies).
MAX_LINKS: Final = 32
#: Error codes that count as a failed login (``tiu.logins.failed``).
LOGIN_FAILURES: Final = frozenset({"invalid_credentials", "account_locked", "account_inactive"})
_SCOPE: Final = "tiu"
_TRACEPARENT: Final = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class _NoSpan:
    """Stands in for a span when nothing records: every method does nothing."""

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def update_name(self, name: str) -> None:
        pass

    def is_recording(self) -> bool:
        return False


NO_SPAN: Final = _NoSpan()


class _Instruments:
    """The meter's instruments, built for one meter provider."""

    def __init__(self, provider: Any) -> None:
        meter = (provider or metrics.get_meter_provider()).get_meter(_SCOPE)
        # Its count is the number of commands by type and outcome: no counter beside it.
        self.command_duration = meter.create_histogram(
            "tiu.command.duration",
            unit="s",
            description="Commands by type and outcome: time from issue to answer",
        )
        self.append_duration = meter.create_histogram(
            "tiu.append.duration", unit="s", description="Appends to the log, lock to insert"
        )
        self.group_size = meter.create_histogram(
            "tiu.group.size", unit="{item}", description="Commands or appends per group commit"
        )
        self.lock_wait = meter.create_histogram(
            "tiu.lock.wait", unit="s", description="Waiting for the append lock"
        )
        self.batch_duration = meter.create_histogram(
            "tiu.projector.batch.duration", unit="s", description="One projector batch"
        )
        self.projected = meter.create_counter(
            "tiu.projector.events", unit="{event}", description="Events applied by projectors"
        )
        self.pool_exhausted = meter.create_counter(
            "tiu.pool.exhausted",
            unit="{request}",
            description="Requests for a pooled connection that gave up waiting (PoolExhausted)",
        )
        self.failed_logins = meter.create_counter(
            "tiu.logins.failed", unit="{attempt}", description="Refused logins, by reason"
        )
        self.lockouts = meter.create_counter(
            "tiu.lockouts", unit="{lockout}", description="Accounts locked after failed logins"
        )
        meter.create_observable_gauge(
            "tiu.projector.lag.events",
            [_observe_lag_events],
            unit="{event}",
            description="Events in the log not yet applied by a worker's projector",
        )
        meter.create_observable_gauge(
            "tiu.projector.lag.seconds",
            [_observe_lag_seconds],
            unit="s",
            description="Age of the newest event a lagging projector applied (0: caught up)",
        )
        meter.create_observable_gauge(
            "tiu.publisher.lag.events",
            [_observe_publisher_events],
            unit="{event}",
            description="Events in the log a publisher has not had acknowledged by its broker",
        )
        meter.create_observable_gauge(
            "tiu.publisher.lag.seconds",
            [_observe_publisher_seconds],
            unit="s",
            description="How long a lagging publisher has been behind (0: caught up)",
        )
        meter.create_observable_gauge(
            "tiu.replay.progress",
            [_observe_replay],
            unit="1",
            description="Share of the log a running rebuild has applied",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [_observe_pool],
            unit="{connection}",
            description="Pooled connections by state (used, idle)",
        )


class _State:
    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        self.tracer_provider = tracer_provider
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(_SCOPE)
        self.instruments = _Instruments(meter_provider)


_state: _State | None = None  # built at the end of the module, once its callbacks exist
#: Spans of commands in progress, by ``id(command)``: the group writer and the
#: events' metadata find a command's span here, whatever task handles the command.
_open_commands: dict[int, Any] = {}
_lag: dict[str, tuple[int, datetime | None]] = {}
_replays: dict[str, float] = {}
_publishers: dict[str, tuple[int, datetime | None]] = {}
#: The providers last passed to :func:`configure`, and the state built for them.
_explicit: list[Any] = [(None, None), None]
_pools: weakref.WeakSet[Any] = weakref.WeakSet()
#: The correlation id of the command being handled, for :class:`JsonFormatter`.
correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tiu_correlation_id", default=None
)


def configure(*, tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Report to these providers instead of the global ones (``None``: the global one,
    set by the host with ``opentelemetry.trace.set_tracer_provider``). Tests pass the
    SDK's in-memory exporters here."""
    global _state  # noqa: PLW0603  # the module's one switch
    if not ENABLED:
        return
    # One state per set of providers, kept: switching back and forth (bench case 8,
    # tests) finds it instead of looking every instrument up again.
    if tracer_provider is None and meter_provider is None:
        _state = _GLOBAL
    elif (tracer_provider, meter_provider) == _explicit[0]:
        _state = _explicit[1]
    else:
        _state = _State(tracer_provider, meter_provider)
        _explicit[:] = [(tracer_provider, meter_provider), _state]


def _tracer() -> Any:
    """The tracer, or None when no SDK is configured (nothing would record)."""
    state = _state
    if state is None:
        return None
    if state.tracer_provider is None and isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    ):
        return None
    return state.tracer


def _db(conn: AsyncConnection | AsyncEngine | None) -> dict[str, str]:
    if conn is None:
        return {}
    return {"db.system.name": conn.dialect.name}


# -- spans -----------------------------------------------------------------------------


@contextlib.contextmanager
def span(
    name: str, attributes: Mapping[str, Any] | None = None, *, links: Sequence[Any] = ()
) -> Iterator[Any]:
    """A span under the current one, current while the block runs."""
    tracer = _tracer()
    if tracer is None:
        yield NO_SPAN
        return
    with tracer.start_as_current_span(name, attributes=attributes, links=links) as current:
        yield current


@contextlib.contextmanager
def step(name: str, command: object) -> Iterator[None]:
    """A stage of ``command`` with nothing traced inside (``tiu.load``, ``tiu.decide``):
    a span under the current one, or under the command's own span when the current
    span belongs to another trace (a group writer handling several commands). Not made
    current: that would cost a context switch in and out for nothing."""
    tracer = _tracer()
    if tracer is None:
        yield
        return
    current = trace.get_current_span()
    owner = _open_commands.get(id(command))
    if owner is not None and (
        owner.get_span_context().trace_id != current.get_span_context().trace_id
    ):
        current = owner
    leaf = tracer.start_span(name, context=trace.set_span_in_context(current))
    try:
        yield
    except BaseException as error:
        leaf.record_exception(error)
        leaf.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
        raise
    finally:
        leaf.end()


def note(**attributes: Any) -> None:
    """Set ``tiu.<key>`` attributes on the current span (``note(command_retries=2)``)."""
    if _tracer() is None:
        return
    current = trace.get_current_span()
    for key, value in attributes.items():
        current.set_attribute("tiu." + key.replace("_", ".", 1), value)


async def command(command: Any, ctx: Any, work: Awaitable[R]) -> R:
    """Await ``work``, the dispatch of ``command`` issued with ``ctx``, inside its span;
    count it."""
    state = _state
    if state is None:
        return await work
    name = type(command).__name__
    correlation = str(getattr(ctx, "correlation_id", None) or command.command_id)
    correlation_token = correlation_id.set(correlation)
    started = time.perf_counter()
    outcome = "ok"
    tracer = _tracer()
    span_cm: contextlib.AbstractContextManager[Any] = (
        tracer.start_as_current_span(
            f"tiu.command {name}",
            attributes={
                "tiu.command.type": name,
                "tiu.command.id": str(command.command_id),
                "tiu.correlation_id": correlation,
            },
        )
        if tracer is not None
        else contextlib.nullcontext(NO_SPAN)
    )
    with span_cm as current:
        if current.is_recording():
            _open_commands[id(command)] = current
        try:
            result = await work
            if getattr(result, "duplicate", False):
                outcome = "duplicate"
            stream = getattr(result, "stream_id", None)
            if stream and current.is_recording():
                current.set_attribute("tiu.stream.ids", [stream])
            return result
        except BaseException as error:
            outcome = str(getattr(error, "code", None) or type(error).__name__)
            if outcome in LOGIN_FAILURES:
                state.instruments.failed_logins.add(1, {"tiu.login.reason": outcome})
            locks = sum(type(e).__name__ == "AccountLocked" for e in getattr(error, "record", ()))
            if locks:
                state.instruments.lockouts.add(locks)
            raise
        finally:
            correlation_id.reset(correlation_token)
            _open_commands.pop(id(command), None)
            current.set_attribute("tiu.command.outcome", outcome)
            labels = {"tiu.command.type": name, "tiu.command.outcome": outcome}
            state.instruments.command_duration.record(time.perf_counter() - started, labels)


def traced_group(
    write: Callable[[list[Any]], Awaitable[None]], key: Callable[[Any], object]
) -> Callable[[list[Any]], Awaitable[None]]:
    """Wrap a group committer's ``write``: the group's transaction runs in the context
    of its first command's span (each command's own stages find their own span, see
    :func:`step`), and every command's span is told the group's size."""

    async def traced(group: list[Any]) -> None:
        state = _state
        if state is not None:
            state.instruments.group_size.record(len(group), {"tiu.group.kind": "command"})
        found = (_open_commands.get(id(key(item))) for item, _ in group)
        owners = [o for o in found if o is not None]
        if not owners:
            await write(group)
            return
        for owner in owners:
            owner.set_attribute("tiu.command.group_size", len(group))
        token = otel_context.attach(trace.set_span_in_context(owners[0]))
        try:
            await write(group)
        finally:
            otel_context.detach(token)

    return traced


def pool_exhausted() -> None:
    """A request for a pooled connection waited ``pool_timeout`` and gave up."""
    if _state is not None:
        _state.instruments.pool_exhausted.add(1)


def group_size(kind: str, size: int) -> None:
    if _state is not None:
        _state.instruments.group_size.record(size, {"tiu.group.kind": kind})


def traced_append(
    method: Callable[P, Awaitable[R]],
) -> Callable[P, Awaitable[R]]:
    """Decorate ``EventStore.append``: a span and the append-duration histogram."""

    @functools.wraps(method)
    async def traced(*args: P.args, **kwargs: P.kwargs) -> R:
        state = _state
        if state is None:
            return await method(*args, **kwargs)
        started = time.perf_counter()
        attributes = {"db.operation.name": "INSERT", "db.collection.name": "events"}
        attributes.update(_db(getattr(args[0], "engine", None)))
        with span("INSERT events", attributes):
            try:
                return await method(*args, **kwargs)
            finally:
                state.instruments.append_duration.record(time.perf_counter() - started)

    return traced


@contextlib.contextmanager
def write_stage(stage: str, conn: AsyncConnection) -> Iterator[None]:
    """A stage of a write transaction: ``begin``, ``lock``, ``project`` (inline
    projections), ``append`` or ``commit``; an event on the current span (the write),
    stamped when the stage began, with its duration in ``tiu.duration`` (seconds).

    Events, not child spans: a span costs ~8x an event in the SDK, and five more spans
    per command were most of tracing's cost on the command path (bench case 8).
    The append lock is waited for at ``begin`` on SQLite (``BEGIN IMMEDIATE``) and at
    ``lock`` on PostgreSQL (``tiu_lock_and_heads``): that stage feeds ``tiu.lock.wait``.
    """
    state = _state
    if state is None:
        yield
        return
    system = conn.dialect.name
    started_ns = time.time_ns()
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    if _tracer() is not None:
        trace.get_current_span().add_event(
            f"tiu.{stage}", {"tiu.duration": elapsed}, timestamp=started_ns
        )
    waited = (stage == "begin" and system == "sqlite") or (
        stage == "lock" and system == "postgresql"
    )
    if waited:
        state.instruments.lock_wait.record(elapsed, {"db.system.name": system})
    elif stage == "append":
        state.instruments.append_duration.record(elapsed, {"db.system.name": system})


def traced_query(
    operation: str,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorate a read-model query method ``(self, conn, ...)`` of a ``Query`` over
    ``self.table``: one database client span, named ``SELECT <table>``."""

    def decorate(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(method)
        async def traced(*args: P.args, **kwargs: P.kwargs) -> R:
            if _tracer() is None:
                return await method(*args, **kwargs)
            table = str(getattr(getattr(args[0], "table", None), "name", "?"))
            attributes = {
                "db.operation.name": "SELECT",
                "db.collection.name": table,
                "tiu.query.kind": operation,
                **_db(args[1]),  # type: ignore[arg-type]
            }
            with span(f"SELECT {table}", attributes):
                return await method(*args, **kwargs)

        return traced

    return decorate


def traced_audit(
    kind: str,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorate an audit query ``(conn, ...)`` over the event log."""

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(function)
        async def traced(*args: P.args, **kwargs: P.kwargs) -> R:
            if _tracer() is None:
                return await function(*args, **kwargs)
            attributes = {
                "db.operation.name": "SELECT",
                "db.collection.name": "events",
                "tiu.audit.kind": kind,
                **_db(args[0]),  # type: ignore[arg-type]
            }
            with span("SELECT events", attributes):
                return await function(*args, **kwargs)

        return traced

    return decorate


# -- the command's trace in its events ---------------------------------------------------


def trace_metadata(command: object = None) -> dict[str, str]:
    """``{"traceparent": ...}`` (W3C) of ``command``'s span, or of the current span;
    empty when nothing records. Stored in each event's metadata."""
    if _tracer() is None:
        return {}
    owner = _open_commands.get(id(command)) if command is not None else None
    context = (owner or trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return {}
    return {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-01"}


def _link(traceparent: object) -> Any:
    if not isinstance(traceparent, str) or not _TRACEPARENT.fullmatch(traceparent):
        return None
    context = SpanContext(
        int(traceparent[3:35], 16),
        int(traceparent[36:52], 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return Link(context) if context.is_valid else None


def links_of(metadatas: Iterable[Mapping[str, Any]]) -> list[Any]:
    """Links to the distinct commands named in these events' metadata (at most
    :data:`MAX_LINKS`)."""
    links: dict[str, Any] = {}
    for metadata in metadatas:
        parent = metadata.get("traceparent")
        if not isinstance(parent, str) or parent in links:
            continue
        link = _link(parent)
        if link is not None:
            links[parent] = link
            if len(links) >= MAX_LINKS:
                break
    return list(links.values())


@contextlib.contextmanager
def projector_batch(
    conn: AsyncConnection, projector: str, records: Sequence[Any], *, replay: bool
) -> Iterator[None]:
    """One batch of a projector, in a worker or a replay: a span linked to the commands
    whose events it applies, and the batch histogram."""
    state = _state
    if state is None or not records:
        yield
        return
    started = time.perf_counter()
    labels: dict[str, str | bool] = {"tiu.projector": projector, "tiu.projector.replay": replay}
    if _tracer() is None:
        yield
    else:
        attributes = {
            **labels,
            "tiu.batch.first_position": records[0].position,
            "tiu.batch.last_position": records[-1].position,
            "tiu.batch.events": len(records),
            **_db(conn),
        }
        # The batch is caused by the log, not by whatever span is current.
        with (
            _detached(),
            span(
                f"tiu.project {projector}",
                attributes,
                links=links_of(r.metadata for r in records),
            ),
        ):
            yield
    state.instruments.batch_duration.record(time.perf_counter() - started, labels)
    state.instruments.projected.add(len(records), labels)


@contextlib.contextmanager
def _detached() -> Iterator[None]:
    token = otel_context.attach(otel_context.Context())
    try:
        yield
    finally:
        otel_context.detach(token)


# -- gauges ------------------------------------------------------------------------------


def projector_lag(projector: str, events: int, newest: Sequence[Any]) -> None:
    """A worker's projector is ``events`` behind the head after applying the records
    ending with ``newest`` (the last record of its batch, or nothing)."""
    if ENABLED:
        since = newest[-1].recorded_at if events > 0 and newest else None
        _lag[projector] = (max(events, 0), since)


def publisher_lag(publisher: str, events: int) -> None:
    """A publisher is ``events`` behind the head this process knows; the seconds gauge
    counts from when it fell behind."""
    if ENABLED:
        behind = max(events, 0)
        _, since = _publishers.get(publisher, (0, None))
        if behind == 0:
            since = None
        elif since is None:
            since = datetime.now(UTC)
        _publishers[publisher] = (behind, since)


class _Progress(Protocol):
    @property
    def projector(self) -> str: ...
    @property
    def position(self) -> int: ...
    @property
    def head(self) -> int: ...


def replay_progress(callback: Callable[[Any], None] | None) -> Callable[[Any], None] | None:
    """Wrap a rebuild's progress callback so that the gauge follows it too."""
    if not ENABLED:
        return callback

    def observe(progress: _Progress) -> None:
        _replays[progress.projector] = progress.position / progress.head if progress.head else 1.0
        if callback is not None:
            callback(progress)

    return observe


def watch_pool(engine: AsyncEngine) -> None:
    """Report this engine's pool in the ``db.client.connection.*`` gauges."""
    if ENABLED:
        _pools.add(engine)


def _observe_lag_events(_options: Any) -> Iterable[Any]:
    return [
        metrics.Observation(events, {"tiu.projector": name}) for name, (events, _) in _lag.items()
    ]


def _observe_lag_seconds(_options: Any) -> Iterable[Any]:
    now = datetime.now(UTC)
    return [
        metrics.Observation(
            (now - since).total_seconds() if since is not None else 0.0, {"tiu.projector": name}
        )
        for name, (_, since) in _lag.items()
    ]


def _observe_publisher_events(_options: Any) -> Iterable[Any]:
    return [
        metrics.Observation(events, {"tiu.publisher": name})
        for name, (events, _) in _publishers.items()
    ]


def _observe_publisher_seconds(_options: Any) -> Iterable[Any]:
    now = datetime.now(UTC)
    return [
        metrics.Observation(
            (now - since).total_seconds() if since is not None else 0.0, {"tiu.publisher": name}
        )
        for name, (_, since) in _publishers.items()
    ]


def _observe_replay(_options: Any) -> Iterable[Any]:
    return [metrics.Observation(v, {"tiu.projector": name}) for name, v in _replays.items()]


def _pool_name(engine: Any) -> str:
    url = engine.url
    return f"{engine.dialect.name}:{url.host or ''}/{url.database or ''}"


def _observe_pool(_options: Any) -> Iterable[Any]:
    found = []
    for engine in list(_pools):
        pool = engine.sync_engine.pool
        if not hasattr(pool, "checkedout"):
            continue
        name = {"db.client.connection.pool.name": _pool_name(engine)}
        found.append(
            metrics.Observation(pool.checkedout(), {**name, "db.client.connection.state": "used"})
        )
        found.append(
            metrics.Observation(pool.checkedin(), {**name, "db.client.connection.state": "idle"})
        )
    return found


# -- Prometheus and logs -----------------------------------------------------------------


def serve_prometheus(port: int, host: str = "127.0.0.1") -> Any:
    """Serve every tiu metric as Prometheus text on ``host:port`` (``/metrics``).

    Uses OpenTelemetry's Prometheus exporter, so the instruments above serve OTLP and
    Prometheus alike; it reports through prometheus-client's HTTP server. Returns that
    server (``shutdown()`` stops it).
    """
    from prometheus_client import start_http_server  # noqa: PLC0415  # the extra

    prometheus_reader()
    server, _thread = start_http_server(port, addr=host)
    return server


_prometheus: Any = None


def prometheus_reader() -> Any:
    """The process's Prometheus reader, made once with the global meter provider (the
    text is then ``prometheus_client.generate_latest()``)."""
    global _prometheus  # noqa: PLW0603  # one per process: it registers in prometheus-client
    if _prometheus is None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: PLC0415
        from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415

        _prometheus = PrometheusMetricReader()
        # Global, so that the instruments built at import (the API's proxies) report to
        # it; a host that set a meter provider of its own keeps it (and a warning).
        metrics.set_meter_provider(MeterProvider(metric_readers=[_prometheus]))
    return _prometheus


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the current trace and
    span ids, and the correlation id of the command being handled."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if ENABLED:
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                line["trace_id"] = f"{context.trace_id:032x}"
                line["span_id"] = f"{context.span_id:016x}"
        correlation = getattr(record, "correlation_id", None) or correlation_id.get()
        if correlation is not None:
            line["correlation_id"] = correlation
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(*, json_lines: bool = False, level: int = logging.INFO) -> None:
    """Log to stderr, as text or as JSON lines (:class:`JsonFormatter`), unless the
    process has set up logging already. For hosts without logging of their own (the
    CLI)."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(name)s %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler])  # a no-op if logging is set up


if ENABLED:
    _state = _GLOBAL = _State()

__all__ = [
    "ENABLED",
    "JsonFormatter",
    "command",
    "configure",
    "configure_logging",
    "correlation_id",
    "links_of",
    "note",
    "pool_exhausted",
    "projector_batch",
    "projector_lag",
    "prometheus_reader",
    "publisher_lag",
    "replay_progress",
    "serve_prometheus",
    "span",
    "step",
    "trace_metadata",
    "traced_append",
    "traced_audit",
    "traced_group",
    "traced_query",
    "watch_pool",
    "write_stage",
]
