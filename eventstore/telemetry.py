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
from types import MappingProxyType
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
            "tiu.lock.wait",
            unit="s",
            description="Waiting for the append lock (PostgreSQL: the whole tiu_command)",
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
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            [_observe_pending],
            unit="{request}",
            description="Requests for a pooled connection waiting for one",
        )


class _State:
    """What the module reports to: a tracer and the instruments of one pair of providers."""

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        self.tracer_provider = tracer_provider
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(_SCOPE)
        self.instruments = _Instruments(meter_provider)
        #: Child spans for the stages of a command (see :func:`configure`).
        self.stage_spans = False
        self._live = tracer_provider is not None
        # Attribute sets and names built once and reused: the SDK copies what it keeps.
        self._labels: dict[tuple[str, str], dict[str, str]] = {}
        self._names: dict[str, str] = {}

    def live(self) -> Any:
        """The tracer, or None while no SDK is configured (nothing would record). A
        global provider, once set, is never unset: found once, it is not looked for
        again, and its own tracer replaces the API's proxy."""
        if self._live:
            return self.tracer
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return None
        self.tracer = trace.get_tracer_provider().get_tracer(_SCOPE)
        self._live = True
        return self.tracer

    def command_labels(self, name: str, outcome: str) -> dict[str, str]:
        labels = self._labels.get((name, outcome))
        if labels is None:
            labels = {"tiu.command.type": name, "tiu.command.outcome": outcome}
            self._labels[(name, outcome)] = labels
        return labels

    def command_span_name(self, name: str) -> str:
        found = self._names.get(name)
        if found is None:
            found = self._names[name] = f"tiu.command {name}"
        return found


_state: _State | None = None  # built at the end of the module, once its callbacks exist


class _Command:
    """A recording command span, and what its stages measured (set on it at its end)."""

    __slots__ = ("key", "metadata", "span", "timings")

    def __init__(self, span: Any, key: int) -> None:
        self.span = span
        #: ``id()`` of the command object (:data:`_open_commands`'s key).
        self.key = key
        #: Seconds by attribute name (``tiu.duration.load``...), summed over retries.
        self.timings: dict[str, Any] = {}
        context = span.get_span_context()
        #: What each of its events carries in its metadata (W3C ``traceparent``).
        self.metadata = {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-01"}

    def add(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds


#: Commands in progress, by ``id(command)``: the group writer and the events' metadata
#: find a command's span here, whatever task handles the command.
_open_commands: dict[int, _Command] = {}
#: The command this task handles (its span is current here too).
_current_command: contextvars.ContextVar[_Command | None] = contextvars.ContextVar(
    "tiu_command", default=None
)
#: The commands whose group the current task writes (set by :func:`traced_group`).
_group: contextvars.ContextVar[list[_Command] | None] = contextvars.ContextVar(
    "tiu_group", default=None
)
#: The size of that group, less the commands its writer put back (:func:`leave_group`).
_group_written: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "tiu_group_written", default=None
)
#: The stage timings of the write transaction in progress (see :func:`write`).
_write_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "tiu_write", default=None
)
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
_DURATION: Final = {
    stage: f"tiu.duration.{stage}"
    for stage in ("load", "decide", "write", "begin", "lock", "project", "append", "commit")
}
_SYSTEMS: dict[str, dict[str, str]] = {}
_GROUP_OF_COMMANDS: Final = {"tiu.group.kind": "command"}
_GROUP_OF_APPENDS: Final = {"tiu.group.kind": "append"}


def configure(
    *, tracer_provider: Any = None, meter_provider: Any = None, stage_spans: bool = False
) -> None:
    """Report to these providers instead of the global ones (``None``: the global one,
    set by the host with ``opentelemetry.trace.set_tracer_provider``). Tests pass the
    SDK's in-memory exporters here.

    ``stage_spans``: a command's stages (load, decide, write, and the write's begin,
    lock, inline projections, append and commit) become child spans of its span.
    Off, they are durations on the command's span (``tiu.duration.<stage>``): a span
    costs the SDK about as much as 5% of a SQLite command (docs/observability.md)."""
    global _state  # noqa: PLW0603  # the module's one switch
    if not ENABLED:
        return
    # One state per set of providers, kept: switching back and forth (bench case 10,
    # tests) finds it instead of looking every instrument up again.
    if tracer_provider is None and meter_provider is None:
        _state = _GLOBAL
    elif (tracer_provider, meter_provider) == _explicit[0]:
        _state = _explicit[1]
    else:
        _state = _State(tracer_provider, meter_provider)
        _explicit[:] = [(tracer_provider, meter_provider), _state]
    _state.stage_spans = stage_spans


def _tracer() -> Any:
    """The tracer, or None when no SDK is configured (nothing would record)."""
    state = _state
    return None if state is None else state.live()


def _system(conn: AsyncConnection | AsyncEngine) -> dict[str, str]:
    """``{"db.system.name": ...}`` of ``conn``'s database, one dict per system."""
    name = conn.sync_engine.dialect.name  # attributes, not the async proxy's properties
    found = _SYSTEMS.get(name)
    if found is None:
        found = _SYSTEMS[name] = {"db.system.name": name}
    return found


def _db(conn: AsyncConnection | AsyncEngine | None) -> dict[str, str]:
    return {} if conn is None else _system(conn)


def _failed(span: Any, error: BaseException) -> None:
    # The type only: an error's message may quote a parameter value.
    span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))


# -- spans -----------------------------------------------------------------------------


@contextlib.contextmanager
def span(
    name: str, attributes: Mapping[str, Any] | None = None, *, links: Sequence[Any] = ()
) -> Iterator[Any]:
    """A span under the current one, current while the block runs. An exception marks
    it as an error, by type (no exception event: its message may quote a value)."""
    tracer = _tracer()
    if tracer is None:
        yield NO_SPAN
        return
    current = tracer.start_span(name, attributes=attributes, links=links)
    token = otel_context.attach(trace.set_span_in_context(current))
    try:
        yield current
    except BaseException as error:
        _failed(current, error)
        raise
    finally:
        otel_context.detach(token)
        current.end()


def _owner(command: object) -> _Command | None:
    """``command``'s recording span: the one of the dispatch running in this context if
    it is of this object (the same object may be dispatched twice at once), else the
    registered one (a group writer handles other tasks' commands). A group writer's
    context holds the command of the caller that started it, which may have ended and
    its id gone to another object: only a span still recording is this dispatch's."""
    own = _current_command.get()
    if own is not None and own.key == id(command) and own.span.is_recording():
        return own
    return _open_commands.get(id(command))


class step:  # lower case: it reads as a function, ``with step(...):``
    """A stage of ``command`` (``tiu.load``, ``tiu.decide``): its duration on the
    command's span, or with ``stage_spans`` a child span. The child sits under the
    current span, or under the command's own span when the current span belongs to
    another trace (a group writer handling several commands). Nothing when the command
    is not recorded (no SDK, or not sampled).

    A class, not a generator-based context manager, as :class:`write_stage`: every
    command enters two, and ``contextlib``'s wrapper cost ~2 us each (profiled)."""

    __slots__ = ("_child", "_owner", "_started", "command", "name")

    def __init__(self, name: str, command: object) -> None:
        self.name = name
        self.command = command
        self._owner: _Command | None = None
        self._child: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> None:
        state = _state
        if state is None:
            return
        owner = self._owner = _owner(self.command)
        if owner is None:
            return
        if state.stage_spans:
            current = trace.get_current_span()
            if current.get_span_context().trace_id != owner.span.get_span_context().trace_id:
                current = owner.span
            self._child = _child(state, self.name, trace.set_span_in_context(current))
            self._child.__enter__()
            return
        self._started = time.perf_counter()

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        owner = self._owner
        if owner is None:
            return
        child, self._child = self._child, None
        if child is not None:
            child.__exit__(kind, error, traceback)
            return
        owner.add(_DURATION[self.name[4:]], time.perf_counter() - self._started)


@contextlib.contextmanager
def _child(state: _State, name: str, parent: Any = None) -> Iterator[None]:
    """A child span of ``parent`` (a context; default: the current one), current
    while the block runs."""
    leaf = state.tracer.start_span(name, context=parent)
    token = otel_context.attach(trace.set_span_in_context(leaf))
    try:
        yield
    except BaseException as error:
        _failed(leaf, error)
        raise
    finally:
        otel_context.detach(token)
        leaf.end()


def note(**attributes: Any) -> None:
    """Set ``tiu.<key>`` attributes on the current span (``note(command_retries=2)``)."""
    if _tracer() is None:
        return
    current = trace.get_current_span()
    if current.is_recording():
        for key, value in attributes.items():
            current.set_attribute("tiu." + key.replace("_", ".", 1), value)


async def command(command: Any, ctx: Any, work: Awaitable[R]) -> R:
    """Await ``work``, the dispatch of ``command`` issued with ``ctx``, inside its span
    (current while it runs); count it in ``tiu.command.duration``."""
    state = _state
    if state is None:
        return await work
    name = type(command).__name__
    correlation = str(getattr(ctx, "correlation_id", None) or command.command_id)
    correlation_token = correlation_id.set(correlation)
    started = time.perf_counter()
    tracer = state.live()
    opened: _Command | None = None
    if tracer is not None:
        current = tracer.start_span(
            state.command_span_name(name),
            attributes={
                "tiu.command.type": name,
                "tiu.command.id": str(command.command_id),
                "tiu.correlation_id": correlation,
            },
        )
        # Not sampled: nothing more is done for it (no stages, no traceparent).
        if current.is_recording():
            opened = _Command(current, id(command))
            # The same command object dispatched again while in flight keeps the first
            # registration: its own stages find it in its context (see _owner).
            _open_commands.setdefault(id(command), opened)
            context_token = otel_context.attach(trace.set_span_in_context(current))
            command_token = _current_command.set(opened)
    outcome = "ok"
    try:
        result = await work
        if getattr(result, "duplicate", False):
            outcome = "duplicate"
        if opened is not None:
            stream = getattr(result, "stream_id", None)
            if stream:
                opened.timings["tiu.stream.ids"] = (stream,)
        return result
    except BaseException as error:
        outcome = str(getattr(error, "code", None) or type(error).__name__)
        if outcome in LOGIN_FAILURES:
            state.instruments.failed_logins.add(1, {"tiu.login.reason": outcome})
        locks = sum(type(e).__name__ == "AccountLocked" for e in getattr(error, "record", ()))
        if locks:
            state.instruments.lockouts.add(locks)
        if opened is not None:
            _failed(opened.span, error)
        raise
    finally:
        correlation_id.reset(correlation_token)
        labels = state.command_labels(name, outcome)
        if opened is not None:
            _current_command.reset(command_token)
            if _open_commands.get(id(command)) is opened:
                del _open_commands[id(command)]
            opened.timings["tiu.command.outcome"] = outcome
            opened.span.set_attributes(opened.timings)
            # Recorded while the span is current: an exemplar can point at it.
            state.instruments.command_duration.record(time.perf_counter() - started, labels)
            otel_context.detach(context_token)
            opened.span.end()
        else:
            state.instruments.command_duration.record(time.perf_counter() - started, labels)


def dispatch_record() -> object:
    """What a group writer needs to credit the dispatch running in this context (its
    span), taken by the caller when it queues: the same command object may be in two
    dispatches at once, so the writer cannot find the span by the command."""
    return _current_command.get()


def traced_group(
    write: Callable[[list[Any]], Awaitable[None]], record: Callable[[Any], object]
) -> Callable[[list[Any]], Awaitable[None]]:
    """Wrap a group committer's ``write``: the group's transaction runs in the context
    of its first command's span (each command's own stages find their own span, see
    :func:`step`), and every command's span is told the group's size and the write's
    stage durations. ``record(item)``: the item's :func:`dispatch_record`."""

    async def traced(group: list[Any]) -> None:
        state = _state
        if state is None:
            await write(group)
            return
        written = [len(group)]
        written_token = _group_written.set(written)
        owners = []
        for item, _ in group:
            owner = record(item)
            if isinstance(owner, _Command) and owner not in owners:
                owner.timings["tiu.command.group_size"] = len(group)
                owners.append(owner)
        try:
            if not owners:
                await write(group)
                return
            token = otel_context.attach(trace.set_span_in_context(owners[0].span))
            group_token = _group.set(owners)
            try:
                await write(group)
            finally:
                _group.reset(group_token)
                otel_context.detach(token)
        finally:
            _group_written.reset(written_token)
            state.instruments.group_size.record(written[0], _GROUP_OF_COMMANDS)

    return traced


def leave_group(records: Sequence[object]) -> None:
    """From a group writer: the dispatches of ``records`` (:func:`dispatch_record`)
    leave the group being written (put back to lead the next group); its transaction
    and its size are not theirs."""
    written = _group_written.get()
    if written is None:
        return
    written[0] -= len(records)
    owners = _group.get()
    if owners is None:
        return
    for owner in records:
        if owner in owners:
            owners.remove(owner)
    for owner in owners:
        owner.timings["tiu.command.group_size"] = written[0]


class write:  # lower case: it reads as a function, ``with write():``
    """A command's write transaction (one for a whole group): with ``stage_spans`` the
    ``tiu.write`` span, else its duration and those of its stages (see
    :class:`write_stage`) added to the span of every command it writes.

    A class, not a generator-based context manager, as :class:`write_stage`."""

    __slots__ = ("_child", "_owners", "_started", "_timings", "_token")

    def __init__(self) -> None:
        self._owners: list[_Command] | None = None
        self._child: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> None:
        state = _state
        if state is None:
            return
        owners = _group.get()
        if owners is None:
            own = _current_command.get()
            owners = [own] if own is not None else None
        if not owners:
            return
        self._owners = owners
        if state.stage_spans:
            self._child = _child(state, "tiu.write")
            self._child.__enter__()
            return
        self._timings: dict[str, float] = {}
        self._token = _write_timings.set(self._timings)
        self._started = time.perf_counter()

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        owners = self._owners
        if owners is None:
            return
        child, self._child = self._child, None
        if child is not None:
            child.__exit__(kind, error, traceback)
            return
        _write_timings.reset(self._token)
        timings = self._timings
        timings[_DURATION["write"]] = time.perf_counter() - self._started
        for owner in owners:
            for key, seconds in timings.items():
                owner.add(key, seconds)


def pool_exhausted() -> None:
    """A request for a pooled connection waited ``pool_timeout`` and gave up."""
    if _state is not None:
        _state.instruments.pool_exhausted.add(1)


def group_size(kind: str, size: int) -> None:
    if _state is not None:
        labels = _GROUP_OF_APPENDS if kind == "append" else {"tiu.group.kind": kind}
        _state.instruments.group_size.record(size, labels)


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
        engine = getattr(args[0], "engine", None)
        if state.live() is None:
            # No tracer: the histogram only, without the span's context manager (a third
            # of this wrapper's cost, which was ~3 us of an append; profiled).
            try:
                return await method(*args, **kwargs)
            finally:
                state.instruments.append_duration.record(time.perf_counter() - started, _db(engine))
        with span("INSERT events", _database_attributes("INSERT", "events", None, engine)):
            try:
                return await method(*args, **kwargs)
            finally:
                state.instruments.append_duration.record(time.perf_counter() - started, _db(engine))

    return traced


class write_stage:  # lower case: it reads as a function, ``with write_stage(...):``
    """A stage of a write transaction: ``begin``, ``lock``, ``project`` (inline
    projections), ``append`` or ``commit``. Its duration goes to the write of the
    commands in progress (``tiu.duration.<stage>`` on their spans), or with
    ``stage_spans`` it is a child span ``tiu.<stage>``.

    The append lock is waited for at ``begin`` on SQLite (``BEGIN IMMEDIATE``) and at
    ``lock`` on PostgreSQL: that stage feeds ``tiu.lock.wait``; ``append`` feeds
    ``tiu.append.duration``. On PostgreSQL a command's ``lock`` is the one statement
    that writes it (``tiu_command``: its held rows, the lock, the append and the
    checkpoints), so its wait for the lock is at most that; it also holds any wait for
    row locks the held rows meet (a read-model row another transaction is writing).

    A class, not a generator-based context manager: a command's write enters several
    stages, and without telemetry each should cost next to nothing.
    """

    __slots__ = ("_child", "_started", "_state", "_timings", "conn", "stage")

    def __init__(self, stage: str, conn: AsyncConnection) -> None:
        self.stage = stage
        self.conn = conn
        self._state: _State | None = None
        self._child: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> None:
        state = self._state = _state
        if state is None:
            return
        self._timings = _write_timings.get()
        if (
            state.stage_spans
            and state.live() is not None
            and trace.get_current_span().is_recording()
        ):
            self._child = _child(state, f"tiu.{self.stage}")
            self._started = time.perf_counter()
            self._child.__enter__()
            return
        self._started = time.perf_counter()

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        state = self._state
        if state is None:
            return
        child, self._child = self._child, None
        if child is not None:
            child.__exit__(kind, error, traceback)
        if error is not None:
            return  # a stage that failed is not measured
        elapsed = time.perf_counter() - self._started
        stage = self.stage
        timings = self._timings
        if timings is not None:
            key = _DURATION[stage]
            timings[key] = timings.get(key, 0.0) + elapsed
        if stage in _METERED_STAGES:  # the others only time the command's write
            system = _system(self.conn)
            name = system["db.system.name"]
            if (stage == "begin" and name == "sqlite") or (
                stage == "lock" and name == "postgresql"
            ):
                state.instruments.lock_wait.record(elapsed, system)
            elif stage == "append":
                state.instruments.append_duration.record(elapsed, system)


#: The write stages that feed a histogram of their own (see :class:`write_stage`).
_METERED_STAGES: Final = frozenset({"begin", "lock", "append"})


# -- reads -------------------------------------------------------------------------------

_READS: dict[tuple[str, str, str, str], dict[str, str]] = {}


def _database_attributes(
    operation: str, collection: str, kind: str | None, conn: Any
) -> dict[str, str]:
    """The attributes of a database client span, one dict per combination (the SDK
    copies what it keeps)."""
    system = conn.dialect.name if conn is not None else ""
    key = (operation, collection, kind or "", system)
    found = _READS.get(key)
    if found is None:
        found = {"db.operation.name": operation, "db.collection.name": collection}
        if system:
            found["db.system.name"] = system
        if kind is not None:
            found[_KIND_ATTRIBUTE.get(collection, "tiu.query.kind")] = kind
        _READS[key] = found
    return found


#: Reads of the log say ``tiu.audit.kind``; reads of read models ``tiu.query.kind``.
_KIND_ATTRIBUTE: Final = {"events": "tiu.audit.kind"}


@contextlib.contextmanager
def read(conn: AsyncConnection, collection: str, kind: str) -> Iterator[None]:
    """A read outside the query layer: a database client span ``SELECT <collection>``
    (the statement's first table) with ``tiu.query.kind`` (or ``tiu.audit.kind`` for
    the log) saying which read it is."""
    if _tracer() is None:
        yield
        return
    with span(f"SELECT {collection}", _database_attributes("SELECT", collection, kind, conn)):
        yield


@contextlib.contextmanager
def archive(engine: AsyncEngine, category: str) -> Iterator[Any]:
    """Retention's archive of ``category``: a database client span ``DELETE events``
    (``tiu.audit.kind`` ``archive``, ``tiu.archive.category``); the caller sets
    ``tiu.archive.events`` on it once it knows how many left the log."""
    if _tracer() is None:
        yield NO_SPAN
        return
    attributes = {
        **_database_attributes("DELETE", "events", "archive", engine),
        "tiu.archive.category": category,
    }
    with span("DELETE events", attributes) as current:
        yield current


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
            attributes = _database_attributes("SELECT", table, operation, args[1])
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
            with span("SELECT events", _database_attributes("SELECT", "events", kind, args[0])):
                return await function(*args, **kwargs)

        return traced

    return decorate


# -- the command's trace in its events ---------------------------------------------------


def trace_metadata(command: object = None) -> Mapping[str, str]:
    """``{"traceparent": ...}`` (W3C) of ``command``'s span, or of the current span;
    empty when nothing records. Stored in each event's metadata (read-only: the same
    mapping serves every event of a command)."""
    if _state is None:
        return _NOTHING
    if command is not None:
        opened = _owner(command)
        return opened.metadata if opened is not None else _NOTHING
    if _tracer() is None:
        return _NOTHING
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return _NOTHING
    return {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-01"}


_NOTHING: Final[Mapping[str, str]] = MappingProxyType({})


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
    return _pool_observations(lambda pool: {"used": pool.checkedout(), "idle": pool.checkedin()})


def _observe_pending(_options: Any) -> Iterable[Any]:
    return _pool_observations(lambda pool: {None: getattr(pool, "pending", 0)})


def _pool_observations(read: Callable[[Any], dict[str | None, int]]) -> list[Any]:
    """One observation per pool name and state, summed over the engines of this process
    on one database (public pool status only; a pool without one, SQLite's
    ``:memory:``, is left out)."""
    totals: dict[tuple[str, str | None], int] = {}
    for engine in list(_pools):
        pool = engine.sync_engine.pool
        if not hasattr(pool, "checkedout"):
            continue
        name = _pool_name(engine)
        for state, count in read(pool).items():
            totals[name, state] = totals.get((name, state), 0) + count
    found = []
    for (name, state), count in totals.items():
        attributes = {"db.client.connection.pool.name": name}
        if state is not None:
            attributes["db.client.connection.state"] = state
        found.append(metrics.Observation(count, attributes))
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
    "dispatch_record",
    "leave_group",
    "links_of",
    "note",
    "pool_exhausted",
    "projector_batch",
    "projector_lag",
    "prometheus_reader",
    "publisher_lag",
    "read",
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
    "write",
    "write_stage",
]
