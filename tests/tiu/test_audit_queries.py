"""Audit statistics and suspicious-login detection computed by the database equal the
plain-Python reference (``tiu.audit.find_suspicious``, ``stats_of``) on both backends."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from domain import users
from domain.permissions import SYSTEM_ACTOR
from eventstore import EventContext, EventStore, NewEvent
from tests.conftest import PASSWORD, Clock
from tiu import InvalidCommand, InvalidCredentials
from tiu import audit as audit_module
from tiu.audit import (
    _SLICE,
    MAX_DURATION,
    AuditFilter,
    SuspiciousRules,
    _row_of,
    find_suspicious,
    query,
    stats,
    stats_of,
    suspicious,
    to_entry,
)
from tiu.models import AuditEntry

T = TypeVar("T")
_examples = itertools.count()
_LOGIN_TYPES = ("LoginFailed", "LoginRejected", "LoginSucceeded", "AccountLocked")

user = st.integers(0, 3)
ip = st.one_of(st.none(), st.integers(0, 3))
step = st.sampled_from([0, 1, 59, 60, 61, 120, 300, 600])  # seconds: window edges hit
operation = st.one_of(
    # a failed attempt: user stream and/or security stream, one command id
    st.tuples(st.just("fail"), st.one_of(st.none(), user), ip, ip, st.booleans(), step),
    st.tuples(st.just("ok"), user, ip, step),
    st.tuples(st.just("lock"), user, step),
    st.tuples(st.just("other"), user, step),
)


class _Log:
    """Appends generated login events at a settable time, each example in a namespace
    (ids, IPs and a time span) of its own."""

    def __init__(self, store: EventStore, clock: Clock, tag: str) -> None:
        self.store, self.clock, self.tag = store, clock, tag
        self.commands = itertools.count()

    def user(self, n: int) -> str:
        return f"{self.tag}-u{n}"

    def ip(self, n: int | None) -> str | None:
        return None if n is None else f"10.{self.tag}.0.{n}"

    async def apply(self, op: tuple[Any, ...]) -> None:
        self.clock.advance(seconds=op[-1])
        at = self.clock.now.isoformat()
        match op:
            case ("fail", who, ip_user, ip_security, both, _):
                command = f"{self.tag}-c{next(self.commands)}"
                ctx = EventContext(command_id=command)
                uid = None if who is None else self.user(who)
                if uid is not None:
                    data = {"user_id": uid, "at": at, "ip": self.ip(ip_user), "user_agent": None}
                    await self.store.append(
                        users.stream_id(uid), "user", [NewEvent("LoginFailed", data)], context=ctx
                    )
                if uid is None or both:
                    rejected = {
                        "command_id": command,
                        "user_id": uid,
                        "error_code": "invalid_credentials",
                        "reason": "wrong password",
                        "actor_id": None,
                        "ip": self.ip(ip_security),
                        "user_agent": None,
                        "at": at,
                    }
                    await self.store.append(
                        f"security-{self.tag}",
                        "security",
                        [NewEvent("LoginRejected", rejected)],
                        context=ctx,
                    )
            case ("ok", who, n, _):
                uid = self.user(who)
                data = {"user_id": uid, "at": at, "ip": self.ip(n), "user_agent": None}
                await self.store.append(
                    users.stream_id(uid), "user", [NewEvent("LoginSucceeded", data)]
                )
            case ("lock", who, _):
                uid = self.user(who)
                data = {"user_id": uid, "until": at, "failed_attempts": 3}
                await self.store.append(
                    users.stream_id(uid), "user", [NewEvent("AccountLocked", data)]
                )
            case ("other", who, _):
                await self.store.append(
                    f"task-{self.tag}-{who}", "task", [NewEvent("TaskCreated", {"n": who})]
                )


async def _reference_rows(conn: Any, tag: str) -> list[Any]:
    everything = await query(
        conn, AuditFilter(event_types=_LOGIN_TYPES), limit=None, newest_first=False
    )
    return [e for e in everything if tag in e.stream_id]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(operation, min_size=5, max_size=40),
    account_threshold=st.integers(1, 4),
    ip_threshold=st.integers(1, 4),
    window=st.integers(1, 20),
    lookback=st.integers(1, 60),
    start=st.integers(0, 40),
    span=st.one_of(st.none(), st.integers(1, 40)),
)
async def test_suspicious_and_stats_in_the_database_equal_the_python_reference(
    engine: AsyncEngine,
    ops: list[tuple[Any, ...]],
    account_threshold: int,
    ip_threshold: int,
    window: int,
    lookback: int,
    start: int,
    span: int | None,
) -> None:
    n = next(_examples)
    tag = f"{n}"
    clock = Clock()
    clock.now = datetime(2027, 1, 1, tzinfo=UTC) + timedelta(days=30 * n)
    base = clock.now
    store = EventStore(engine, clock=clock)
    try:
        log = _Log(store, clock, tag)
        for op in ops:
            await log.apply(op)
        # The range is this example's time span, cut at generated points: events
        # before it only tell earlier IPs; events after it are out.
        since = base + timedelta(minutes=start)
        until = None if span is None else since + timedelta(minutes=span)
        end = clock.now + timedelta(days=1)
        where = AuditFilter(since=since, until=until or end)
        rules = SuspiciousRules(
            account_threshold=account_threshold,
            ip_threshold=ip_threshold,
            window=timedelta(minutes=window),
            lockout_lookback=timedelta(minutes=lookback),
        )
        async with engine.connect() as conn:
            found = await suspicious(conn, where, rules)
            reference = find_suspicious(await _reference_rows(conn, tag), rules, where)
            counted = await stats(conn, AuditFilter(since=base, until=end))
            every = await query(conn, AuditFilter(since=base, until=end), limit=None)
    finally:
        await store.aclose()
    assert found == reference
    assert counted == stats_of((e.event_type, e.recorded_at) for e in every)


@contextlib.contextmanager
def statements_on_events(engine: AsyncEngine) -> Iterator[list[tuple[str, Any]]]:
    """The statements (and their parameters) the block sends that read ``events``."""
    seen: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _m: bool) -> None:
        if "FROM events" in statement and not statement.startswith("EXPLAIN"):
            seen.append((statement, params))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)


async def test_stats_count_every_event_by_type_and_utc_day(store: EventStore) -> None:
    async with store.transaction() as uow:
        for n in range(30):
            uow.append(
                f"task-s{n}", "task", [NewEvent("TaskCreated", {"n": n}) for _ in range(n % 3 + 1)]
            )
    async with store.engine.connect() as conn:
        counted = await stats(conn, AuditFilter())
        every = await query(conn, AuditFilter(), limit=None)
    assert counted.total == 60 == len(every)
    assert counted == stats_of((e.event_type, e.recorded_at) for e in every)


_STAT_TYPES = ("TaskCreated", "TaskStatusChanged", "LoginFailed", "UserRegistered")
_stats_examples = itertools.count()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    # (event type, actor, hours since the previous event): days, and midnights, are crossed
    log=st.lists(
        st.tuples(st.sampled_from(_STAT_TYPES), st.integers(0, 2), st.integers(0, 20)),
        min_size=1,
        max_size=40,
    ),
    types=st.lists(st.sampled_from(_STAT_TYPES), max_size=3, unique=True),
    since=st.one_of(st.none(), st.integers(0, 300)),
    span=st.one_of(st.none(), st.integers(0, 300)),
    actor=st.one_of(st.none(), st.integers(0, 2)),
)
async def test_stats_equal_a_python_count_of_the_filtered_log(
    engine: AsyncEngine,
    log: list[tuple[str, int, int]],
    types: list[str],
    since: int | None,
    span: int | None,
    actor: int | None,
) -> None:
    """Counted over index ranges (types and times) or grouped (an actor's events), the
    statistics equal a count in Python of the events the filter matches."""
    n = next(_stats_examples)
    clock = Clock()
    base = datetime(2028, 1, 1, 22, 30, tzinfo=UTC) + timedelta(days=40 * n)
    clock.now = base
    store = EventStore(engine, clock=clock)
    try:
        for kind, who, hours in log:
            clock.advance(hours=hours, minutes=7)
            await store.append(
                f"task-st{n}-{who}",
                "task",
                [NewEvent(kind, {"n": who})],
                context=EventContext(actor_id=f"st{n}-a{who}"),
            )
    finally:
        await store.aclose()
    # This example's events only: they start at ``base`` (``since`` is never before it)
    # and end within 40 x 20 hours; ``until`` may be open (later examples come later).
    start = base + timedelta(hours=since or 0)
    where = AuditFilter(
        actor_id=None if actor is None else f"st{n}-a{actor}",
        event_types=tuple(types),
        since=start,
        until=None if span is None else start + timedelta(hours=span),
    )
    async with engine.connect() as conn:
        counted = await stats(conn, where)
        every = await query(conn, AuditFilter(since=base), limit=None)
    matching = [e for e in every if where.matches(_row_of(e))]
    assert counted == stats_of((e.event_type, e.recorded_at) for e in matching)


async def test_stats_over_the_whole_log_read_only_index_ranges(engine: AsyncEngine) -> None:
    """Whole-log statistics read ``events`` only through index searches: no scan of
    the table or of a whole index, no sort (SQLite: no temp B-tree; PostgreSQL: no
    Seq Scan)."""
    store = EventStore(engine)
    try:
        async with store.transaction() as uow:
            for n in range(300):
                uow.append(f"task-plan-{n}", "task", [NewEvent(_STAT_TYPES[n % 4], {"n": n})])
    finally:
        await store.aclose()
    async with engine.connect() as conn:
        with statements_on_events(engine) as seen:
            counted = await stats(conn, AuditFilter())
        assert counted.total >= 300
        statement, params = seen[0]
        if engine.dialect.name == "sqlite":
            rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
            steps = [r[3] for r in rows]
            reads = [s for s in steps if " events " in f"{s} "]
            assert reads, steps
            assert all(s.startswith("SEARCH events USING COVERING INDEX") for s in reads), steps
            assert not [s for s in steps if "TEMP B-TREE" in s], steps
        else:
            result = await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, params)
            doc = result.scalar()
            nodes = _nodes((json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"])
            on_events = {n["Node Type"] for n in nodes if n.get("Relation Name") == "events"}
            assert on_events, statement
            assert "Seq Scan" not in on_events, (on_events, statement)
            assert "Sort" not in {n["Node Type"] for n in nodes}, statement


async def test_failed_logins_with_encrypted_ips_are_found_by_account_and_by_ip(
    service: Any, clock: Clock
) -> None:
    async with service.get_repositories() as repos:
        ada = await repos.users.create_user(
            email="ada@example.com", username="ada", password=PASSWORD
        )
    for n in range(4):
        clock.advance(seconds=30)
        async with service.get_repositories(ip="203.0.113.9") as repos:
            with pytest.raises(InvalidCredentials):
                await repos.users.authenticate("ada@example.com", f"wrong-password-{n}")
            with pytest.raises(InvalidCredentials):
                await repos.users.authenticate("nobody@example.com", "wrong-password")
    rules = SuspiciousRules(account_threshold=3, ip_threshold=6, window=timedelta(minutes=5))
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        found = await repos.audit.suspicious(rules=rules)
    async with service.engine.connect() as conn:
        reference = find_suspicious(await _reference_rows(conn, ""), rules)
    assert found == reference
    assert {(f.rule, f.subject, f.count) for f in found} == {
        ("account_failures", ada.id, 4),
        ("ip_failures", "203.0.113.9", 8),
    }


async def test_attempts_exactly_one_window_apart_count_together(engine: AsyncEngine) -> None:
    clock = Clock()
    store = EventStore(engine, clock=clock)
    try:
        log = _Log(store, clock, "edge")
        for _ in range(3):
            await log.apply(("fail", 1, 2, 2, True, 60))
        rules = SuspiciousRules(account_threshold=3, ip_threshold=3, window=timedelta(minutes=2))
        async with engine.connect() as conn:
            found = await suspicious(conn, AuditFilter(), rules)
    finally:
        await store.aclose()
    assert {(f.rule, f.count, f.last_at - f.first_at) for f in found} == {
        ("account_failures", 3, timedelta(minutes=2)),
        ("ip_failures", 3, timedelta(minutes=2)),
    }


async def test_suspicious_makes_two_statements_however_many_accounts_were_locked(
    engine: AsyncEngine,
) -> None:
    """The account and IP rules are one statement, and the lockout rule reads every
    locked account's logins in one more: the detection's statements do not grow with
    the log or with the findings."""
    clock = Clock()
    store = EventStore(engine, clock=clock)
    try:
        log = _Log(store, clock, "many")
        for who in range(12):
            await log.apply(("ok", who, 1, 10))
            await log.apply(("lock", who, 10))
            await log.apply(("ok", who, 2, 10))  # a new IP after the lockout
            await log.apply(("fail", who, 3, 3, True, 10))
    finally:
        await store.aclose()
    with statements_on_events(engine) as seen:
        async with engine.connect() as conn, conn.begin():
            found = await suspicious(conn, AuditFilter(), SuspiciousRules(account_threshold=1))
    rules = {f.rule for f in found}
    assert [f.rule for f in found].count("new_ip_after_lockout") == 12
    assert rules == {"account_failures", "ip_failures", "new_ip_after_lockout"}
    assert len(seen) == 2


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


@pytest.mark.postgres
async def test_suspicious_reads_login_events_through_indexes_on_postgres(
    postgres_engine: AsyncEngine,
) -> None:
    """Every statement of the detection reaches ``events`` through an index: the
    type+time index for the attempts and lockouts, the stream index for a locked
    account's logins; none scans the whole log."""
    clock = Clock()
    store = EventStore(postgres_engine, clock=clock)
    try:
        log = _Log(store, clock, "plan")
        async with store.transaction() as uow:
            for n in range(6000):
                uow.append(f"task-plan-{n}", "task", [NewEvent("TaskCreated", {"n": n})])
        for n in range(60):
            await log.apply(("fail", n % 7, n % 3, n % 3, n % 2 == 0, 20))
            if n % 10 == 0:
                await log.apply(("lock", n % 7, 1))
                await log.apply(("ok", n % 7, n % 5, 30))
    finally:
        await store.aclose()
    async with postgres_engine.connect() as conn:
        await conn.execute(text("ANALYZE events"))
        with statements_on_events(postgres_engine) as seen:
            found = await suspicious(conn, AuditFilter(), SuspiciousRules(account_threshold=3))
        assert found
        assert len(seen) >= 2
        for statement, params in seen:
            result = await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, params)
            doc = result.scalar()
            nodes = _nodes((json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"])
            on_events = {n["Node Type"] for n in nodes if n.get("Relation Name") == "events"}
            assert on_events, statement
            assert "Seq Scan" not in on_events, (on_events, statement)


@pytest.mark.sqlite
async def test_suspicious_reads_login_events_through_indexes_on_sqlite(
    sqlite_engine: AsyncEngine,
) -> None:
    """On SQLite too every statement of the detection searches ``events`` by an index
    (none scans it), and the lockout statement reads the locked accounts' streams by
    the stream index, not every successful login by the type's."""
    clock = Clock()
    store = EventStore(sqlite_engine, clock=clock)
    try:
        log = _Log(store, clock, "plan")
        for n in range(40):
            await log.apply(("fail", n % 7, n % 3, n % 3, n % 2 == 0, 20))
            await log.apply(("ok", n % 5, n % 4, 5))
            if n % 10 == 0:
                await log.apply(("lock", n % 7, 1))
    finally:
        await store.aclose()
    async with sqlite_engine.connect() as conn:
        with statements_on_events(sqlite_engine) as seen:
            found = await suspicious(conn, AuditFilter(), SuspiciousRules(account_threshold=3))
        assert found
        assert len(seen) == 2
        plans = []
        for statement, params in seen:
            rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
            steps = [str(r[3]) for r in rows]
            assert not [s for s in steps if s.startswith("SCAN events")], steps
            plans.append(steps)
        assert any(s.startswith("SEARCH events USING INDEX sqlite_autoindex") for s in plans[1])


async def test_stats_days_are_utc_days_whatever_the_sessions_time_zone(
    engine: AsyncEngine,
) -> None:
    """A PostgreSQL session in a zone with summer time (a server's default TimeZone may
    be one) still counts by UTC day: days crossing the zone's DST change are 24 hours."""
    clock = Clock()
    store = EventStore(engine, clock=clock)
    times = [
        datetime(2026, 3, 28, 12, tzinfo=UTC),
        datetime(2026, 3, 29, 23, 30, tzinfo=UTC),  # after 23:00: the DST-shortened day
        datetime(2026, 3, 30, 12, tzinfo=UTC),
        datetime(2026, 4, 1, 0, 30, tzinfo=UTC),
    ]
    try:
        for n, at in enumerate(times):
            clock.now = at
            await store.append(f"task-dst-{n}", "task", [NewEvent("DstProbe", {"n": n})])
    finally:
        await store.aclose()
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text("SET TIME ZONE 'Europe/Berlin'"))
        counted = await stats(conn, AuditFilter(event_types=("DstProbe",)))
        await conn.rollback()
    assert counted.by_day == {"2026-03-28": 1, "2026-03-29": 1, "2026-03-30": 1, "2026-04-01": 1}
    assert counted.total == 4


async def test_stats_count_an_event_at_since_not_one_at_until_and_midnight_opens_its_day(
    engine: AsyncEngine,
) -> None:
    clock = Clock()
    store = EventStore(engine, clock=clock)
    midnight = datetime(2027, 5, 2, tzinfo=UTC)
    times = [
        midnight - timedelta(microseconds=1),
        midnight,
        midnight + timedelta(hours=1),
        midnight + timedelta(days=1),
    ]
    try:
        for n, at in enumerate(times):
            clock.now = at
            await store.append(f"task-edge-{n}", "task", [NewEvent("EdgeProbe", {"n": n})])
    finally:
        await store.aclose()
    kinds = ("EdgeProbe",)
    async with engine.connect() as conn:
        whole = await stats(conn, AuditFilter(event_types=kinds))
        edges = await stats(conn, AuditFilter(event_types=kinds, since=midnight, until=times[-1]))
        before = await stats(conn, AuditFilter(event_types=kinds, until=midnight))
    assert whole.by_day == {"2027-05-01": 1, "2027-05-02": 2, "2027-05-03": 1}
    assert edges.by_day == {"2027-05-02": 2}
    assert before.by_day == {"2027-05-01": 1}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("account_threshold", 0),
        ("ip_threshold", -5),
        ("account_threshold", "5"),
        ("ip_threshold", True),
        ("window", timedelta(days=-1)),
        ("window", timedelta.max),
        ("window", 5),
        ("lockout_lookback", timedelta.min),
    ],
    ids=repr,
)
def test_suspicious_rules_out_of_range_are_an_invalid_command_naming_the_field(field, value):
    # They reached the database: a negative window was a driver error on PostgreSQL and
    # "SQLite error" (StoreUnavailable) on SQLite, a huge one an OverflowError, a string
    # threshold SchemaNotReady, an int window a TypeError.
    with pytest.raises(InvalidCommand) as refused:
        SuspiciousRules(**{field: value})
    assert refused.value.field == field


def test_suspicious_rules_take_zero_durations_and_the_longest_one():
    SuspiciousRules(window=timedelta(0), lockout_lookback=MAX_DURATION)


class _LoopCpu:
    """The loop thread's CPU as a clock of the test's own (``time.thread_time``), which
    only ``costly`` wrappers advance; :meth:`held` runs work and returns the CPU it
    used between two turns of the loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cpu = 0.0
        monkeypatch.setattr(time, "thread_time", lambda: self.cpu)

    def costly(self, fn: Callable[..., T], seconds: float) -> Callable[..., T]:
        def wrapped(*args: Any) -> T:
            self.cpu += seconds
            return fn(*args)

        return wrapped

    async def held(self, work: Awaitable[T]) -> tuple[T, list[float]]:
        held: list[float] = []
        running = True

        async def watch() -> None:
            last = self.cpu
            while running:
                await asyncio.sleep(0)
                held.append(self.cpu - last)
                last = self.cpu

        watcher = asyncio.create_task(watch())
        try:
            result = await work
        finally:
            running = False
            await watcher
        return result, held


@pytest.mark.parametrize("row_cpu", [0.000012, 0.00004], ids=["12us", "40us"])
async def test_a_long_audit_read_gives_the_loop_a_turn_every_slice_of_its_cpu(
    store: EventStore, monkeypatch: pytest.MonkeyPatch, row_cpu: float
) -> None:
    # Each entry costs ``row_cpu`` of the loop thread's CPU (a clock of the test's own):
    # a chunk of a fixed 100 rows held the loop 1.2 ms however slow its rows were, and
    # a floor of 64 rows a chunk held it 2.6 ms at 40 us a row (a cold audit row on a
    # slow machine).
    await store.append("audit-slices", "audit", [NewEvent("Sliced", {"n": n}) for n in range(600)])
    clock = _LoopCpu(monkeypatch)
    monkeypatch.setattr(audit_module, "to_entry", clock.costly(audit_module.to_entry, row_cpu))
    async with store.engine.connect() as conn:
        entries, held = await clock.held(
            query(conn, AuditFilter(event_types=("Sliced",)), limit=None)
        )
    assert len(entries) == 600
    assert sum(held) == pytest.approx(600 * row_cpu)
    # Every chunk fits the slice, but perhaps the first (its size is a guess).
    assert sorted(held)[-2] <= _SLICE + 1e-9


async def test_suspicious_builds_its_findings_a_slice_of_the_loops_cpu_at_a_time(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 accounts and 40 IPs, a finding each, each finding costing 50 us of the loop
    # thread's CPU (a clock of the test's own): built in one go, the 80 findings held
    # the loop 4 ms (493 IP findings were one 4 ms callback on 1M SQLite events).
    clock = Clock()
    store = EventStore(engine, clock=clock)
    try:
        log = _Log(store, clock, "built")
        for who in range(40):
            await log.apply(("fail", who, who, None, False, 1))
    finally:
        await store.aclose()
    cpu = _LoopCpu(monkeypatch)
    monkeypatch.setattr(audit_module, "_burst", cpu.costly(audit_module._burst, 0.00005))
    rules = SuspiciousRules(account_threshold=1, ip_threshold=1)
    async with engine.connect() as conn, conn.begin():
        found, held = await cpu.held(suspicious(conn, AuditFilter(), rules))
    assert len(found) == 80
    assert sum(held) == pytest.approx(80 * 0.00005)
    assert max(held) <= _SLICE + 1e-9


def test_an_audit_entry_holds_two_objects_the_garbage_collector_walks() -> None:
    # The entry and its attributes: its set fields are one set shared by all, which a
    # full collection no longer walks once per entry held (10,000 of them: 5.3 ms).
    row = {
        "position": 1,
        "recorded_at": datetime(2026, 1, 1, tzinfo=UTC),
        "stream_id": "user-u1",
        "stream_category": "user",
        "version": 1,
        "event_type": "LoginFailed",
        "actor_id": "u1",
        "correlation_id": None,
        "causation_id": None,
        "command_id": "c1",
        "data": {"user_id": "u1", "ip": "192.0.2.1"},
    }
    entries = [to_entry(row) for _ in range(100)]
    walked = {
        id(part)
        for entry in entries
        for part in (entry, entry.__dict__, entry.model_fields_set, entry.data)
        if gc.is_tracked(part)
    }
    assert len(walked) <= 2 * len(entries) + 1
    # Every field counts as given, and a copy changes its own set, not the others'.
    assert entries[0].model_dump(exclude_unset=True) == entries[0].model_dump()
    changed = entries[0].model_copy(update={"version": 2})
    assert changed.version == 2 and entries[1].model_fields_set == set(AuditEntry.model_fields)
