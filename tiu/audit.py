"""Audit queries straight off the event log (or off a retention archive file).

Every filter maps to an index on ``events``: actor + time ``(actor_id, recorded_at)``,
type + time ``(event_type, recorded_at)``, correlation id, stream ``(stream_id,
version)``, category ``(stream_category, position)``, time alone ``(recorded_at)``.
The same :class:`AuditFilter` runs in SQL against the log and in Python against an
archive file, so ``tiu audit --archive FILE`` answers like ``tiu audit``.

Statistics and suspicious-login detection run in the database (counts over index
ranges, window functions over the login events an index finds) and read only what a
finding needs, so their memory does not grow with the log and every event in the
range counts, whatever the log's size. On SQLite their statements run on a worker
thread (the driver's ``off_loop``, or a streamed result); the loop decodes, opens
IPs and builds findings in chunks of ~1 ms of its CPU, suspending between them.

On PostgreSQL :func:`query` and :func:`suspicious` stream their rows: a server-side
cursor hands over :data:`_FETCH` rows a round trip, so asyncpg parses a bounded
amount in one callback of the loop (read whole, it parsed a result in 256 KiB reads
of 2-4 ms each). A cursor needs a transaction: repositories read through
``DatabaseService.read_connection(streamed=True)``. A caller cancelled mid-read stops
between two round trips.

Suspicious-login rules (:func:`suspicious`; :func:`find_suspicious` is the same in
plain Python, for archive files), over the events in the queried range:

``account_failures``
    at least ``account_threshold`` failed logins for one account (``user_id``)
    inside one ``window``: the most attempts any closed interval ``[t - window, t]``
    holds, the earliest such interval reported with its attempts as evidence;
``ip_failures``
    the same for one IP (any accounts, unknown emails included) with
    ``ip_threshold``. IPs are encrypted personal data, so this rule reads the failed
    attempts in time order, page by page, keeping only the attempts inside the
    current window;
``new_ip_after_lockout``
    a successful login within ``lockout_lookback`` after the account's latest
    lockout, both in the range, from an IP that no earlier successful login of that
    user (in log order, before the range too) came from.

A failed login is one attempt (one ``command_id``): its ``LoginFailed`` (user
stream) and ``LoginRejected`` (security stream) events count once together, so the
rules still work after the security stream was archived. The attempt's time and
position are its first event's, its account and IP the first ones its events name.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    String,
    TextClause,
    and_,
    bindparam,
    cast,
    extract,
    func,
    null,
    select,
    true,
    union_all,
)
from sqlalchemy import (
    literal as sql_literal,
)
from sqlalchemy import (
    text as sql_text,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncMappingResult, AsyncResult

from domain import security, users
from domain.base import ERASED, datetime_problem
from domain.errors import InvalidCommand
from eventstore import telemetry
from eventstore.crypto import Opened, keyring
from eventstore.engine import GuardedConnection
from eventstore.grouping import whole_round_trip
from eventstore.retention import read_archive
from eventstore.schema import events
from eventstore.sqlite_driver import OFF_LOOP
from eventstore.types import UTCDateTime
from projections.query import MAX_IN
from tiu.models import AuditEntry

T = TypeVar("T")
X = TypeVar("X")

#: Security failures: refused logins and commands, failed passwords, lockouts.
FAILED_TYPES: Final = (
    security.LoginRejected.event_type,
    security.CommandRejected.event_type,
    users.LoginFailed.event_type,
    users.AccountLocked.event_type,
)
_FAILED_LOGIN_TYPES: Final = (security.LoginRejected.event_type, users.LoginFailed.event_type)
_LOGIN_TYPES: Final = (
    *_FAILED_LOGIN_TYPES,
    users.LoginSucceeded.event_type,
    users.AccountLocked.event_type,
)
MAX_LIMIT: Final = 100_000
#: The loop thread's CPU one chunk of a long read may take (its rows fetched, decoded,
#: their personal fields opened, their entries built) before the read suspends: the
#: chunk's size follows it (:class:`_Chunks`). A fixed 100 rows were 1 ms of the loop
#: with plaintext rows, 2.8 ms (p50) with encrypted IPs and user agents and 4.2 ms while
#: their keys were loaded (1M SQLite events, bench case 9's ``get_events``).
_SLICE: Final = 0.001
#: The first chunk's rows and the fewest a chunk takes. A chunk loads the keys its rows
#: miss in one query (~0.5-0.7 ms of the loop however few), so a read with a cold key
#: cache took 1.8x the loop's CPU at 4-10 rows a chunk, 1.55x at 32. At 64 the floor
#: outgrew the slice: an audit row costs 25-140 us of the loop (cold caches, a slow
#: machine), and 64 of them held it 1.6-9 ms (case 9's ``get_events`` on 1M SQLite
#: events: p99 7.1-9.7 ms against 4.1-5.5 ms at 16, four cold processes each).
_MIN_CHUNK: Final = 16
_MAX_CHUNK: Final = 1000
#: Rows a streamed result fetches a round trip on PostgreSQL: ~100 KB of audit rows,
#: which asyncpg parses (JSON included) in ~1 ms of the loop; 1,000 rows came in
#: reads as long to parse as a whole result's. On SQLite the driver fetches its own
#: pages off the loop (``STREAM_PAGE``).
_FETCH: Final = 250
#: What an :class:`AuditEntry` shows: the event id, metadata and hash are left in the
#: log (decoding them was a third of an entry's cost).
_ENTRY_COLUMNS: Final = (
    events.c.position,
    events.c.recorded_at,
    events.c.stream_id,
    events.c.stream_category,
    events.c.version,
    events.c.event_type,
    events.c.actor_id,
    events.c.correlation_id,
    events.c.causation_id,
    events.c.command_id,
    events.c.data,
)
_SECRET_FIELDS: Final = frozenset({"password_hash", "token_hash"})
_RELATIVE: Final = re.compile(r"(\d+)\s*([smhdw])")
_UNITS: Final = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class InvalidTime(ValueError):
    """A ``--since``/``--until`` value that is neither ISO 8601 nor relative."""


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (naive means UTC) or relative to ``now``: ``30m``, ``2h``, ``7d``, ``1w``."""
    value = text.strip()
    match = _RELATIVE.fullmatch(value)
    if match:
        try:
            return (now or datetime.now(UTC)) - parse_duration(value)
        except OverflowError:
            raise InvalidTime(f"invalid time {_shown(text)}: before the year 1") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidTime(
            f"invalid time {_shown(text)}: use ISO 8601 (2026-03-01T09:00) or relative "
            "(30m, 2h, 7d)"
        ) from None
    parsed = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    if datetime_problem(parsed) is not None:  # 0001-01-01T00:00+01:00 is the year 0 in UTC
        raise InvalidTime(f"invalid time {_shown(text)}: not within the years 1 to 9999 in UTC")
    return parsed


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``2h``, ``7d`` or ``1w``, at most :data:`MAX_DURATION`."""
    match = _RELATIVE.fullmatch(text.strip())
    if not match:
        raise InvalidTime(f"invalid duration {_shown(text)}: use 30s, 15m, 2h, 7d or 1w")
    amount, unit = match.groups()
    try:
        duration = timedelta(**{_UNITS[unit]: int(amount)})
    except (OverflowError, ValueError):  # beyond timedelta, or too many digits for int()
        duration = timedelta.max
    if duration > MAX_DURATION:
        raise InvalidTime(f"invalid duration {_shown(text)}: at most {MAX_DURATION.days} days")
    return duration


#: The longest duration or relative time accepted: 1000 years, which leaves room to
#: subtract it from any time of this era (a larger one could not be a datetime).
MAX_DURATION: Final = timedelta(days=365_250)


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 40 else f"{text[:37]!r}..."


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What to select. Every field narrows; ``None``/empty means any."""

    actor_id: str | None = None
    stream_id: str | None = None
    category: str | None = None
    event_types: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    correlation_id: str | None = None

    def __post_init__(self) -> None:
        # Each type is a bound parameter: asyncpg refuses more than 32767 of them.
        if len(self.event_types) > MAX_IN:
            raise InvalidCommand("event_types", f"must hold at most {MAX_IN} values")

    def conditions(self) -> list[ColumnElement[bool]]:
        c = events.c
        out: list[ColumnElement[bool]] = []
        if self.actor_id is not None:
            out.append(c.actor_id == self.actor_id)
        if self.stream_id is not None:
            out.append(c.stream_id == self.stream_id)
        if self.category is not None:
            out.append(c.stream_category == self.category)
        if self.event_types:
            out.append(c.event_type.in_(list(self.event_types)))
        if self.since is not None:
            out.append(c.recorded_at >= self.since)
        if self.until is not None:
            out.append(c.recorded_at < self.until)
        if self.correlation_id is not None:
            out.append(c.correlation_id == self.correlation_id)
        return out

    def matches(self, row: Mapping[str, Any]) -> bool:
        """The same filter in Python, for archive files."""
        return (
            (self.actor_id is None or row["actor_id"] == self.actor_id)
            and (self.stream_id is None or row["stream_id"] == self.stream_id)
            and (self.category is None or row["stream_category"] == self.category)
            and (not self.event_types or row["event_type"] in self.event_types)
            and (self.since is None or row["recorded_at"] >= self.since)
            and (self.until is None or row["recorded_at"] < self.until)
            and (self.correlation_id is None or row["correlation_id"] == self.correlation_id)
        )

    def narrowed(self, event_types: Sequence[str]) -> AuditFilter:
        """This filter restricted to ``event_types`` (intersected with its own)."""
        kinds = tuple(t for t in event_types if not self.event_types or t in self.event_types)
        return AuditFilter(
            self.actor_id,
            self.stream_id,
            self.category,
            kinds or ("(none)",),
            self.since,
            self.until,
            self.correlation_id,
        )

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in asdict(self).items() if v not in (None, ())]
        return " ".join(parts) or "all"


def redact(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("[redacted]" if k in _SECRET_FIELDS else v) for k, v in data.items()}


#: The fields an entry was given: every one. One set shared by all the entries built
#: here, in place of the validator's set per entry (pydantic copies an instance's set
#: before it changes it: ``model_copy``). A caller holding 10,000 entries holds 20,000
#: objects the garbage collector walks at each full collection instead of 30,000, and
#: the sets were the dearer to walk: a full collection with 10,000 entries alive took
#: 5.3 ms of CPU, 3.1 ms without their sets.
_GIVEN: Final = set(AuditEntry.model_fields)


def to_entry(row: Mapping[str, Any] | Any, data: Mapping[str, Any] | None = None) -> AuditEntry:
    """``data``: the row's data with personal fields opened (``eventstore.crypto``);
    without it the stored data is shown as is (ciphertext for personal fields)."""
    entry = AuditEntry(
        position=row["position"],
        recorded_at=row["recorded_at"],
        stream_id=row["stream_id"],
        category=row["stream_category"],
        version=row["version"],
        event_type=row["event_type"],
        actor_id=row["actor_id"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        command_id=row["command_id"],
        data=redact(row["data"] if data is None else data),
    )
    object.__setattr__(entry, "__pydantic_fields_set__", _GIVEN)
    return entry


def _clamp(limit: int | None) -> int:
    return MAX_LIMIT if limit is None else max(1, min(limit, MAX_LIMIT))


@telemetry.traced_audit("query")
async def query(
    conn: AsyncConnection,
    where: AuditFilter,
    *,
    limit: int | None = 100,
    newest_first: bool = True,
) -> list[AuditEntry]:
    """Events matching ``where``, newest first by default: at most ``limit`` of them,
    and never more than :data:`MAX_LIMIT` (``None`` means that many); a count of the
    whole range is :func:`stats`'s ``total``."""
    order = events.c.position.desc() if newest_first else events.c.position
    stmt = select(*_ENTRY_COLUMNS).where(*where.conditions()).order_by(order).limit(_clamp(limit))
    entries: list[AuditEntry] = []
    async with contextlib.aclosing(_pages(conn, stmt, mappings=True, limited=True)) as pages:
        async for rows in pages:
            # personal fields decrypted; those of forgotten subjects read as "[erased]"
            opened = await _opened(conn, [(r["event_type"], r["data"]) for r in rows])
            entries += [to_entry(r, o.data) for r, o in zip(rows, opened, strict=True)]
    return entries


def query_archive(
    path: str | Path,
    where: AuditFilter,
    *,
    limit: int | None = 100,
    newest_first: bool = True,
) -> list[AuditEntry]:
    """The same query against a retention archive file."""
    rows = [to_entry(r) for r in read_archive(path) if where.matches(r)]
    rows.sort(key=lambda e: e.position, reverse=newest_first)
    return rows[: _clamp(limit)]


# -- statistics --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditStats:
    total: int
    by_type: dict[str, int]
    by_day: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(counts: Iterable[tuple[str, str, int]]) -> AuditStats:
    by_type: Counter[str] = Counter()
    by_day: Counter[str] = Counter()
    for event_type, day, count in counts:
        by_type[event_type] += count
        by_day[day] += count
    return AuditStats(
        sum(by_type.values()),
        dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
        dict(sorted(by_day.items())),
    )


def stats_of(rows: Iterable[tuple[str, datetime]]) -> AuditStats:
    """Counts by event type and by UTC day of ``(event_type, recorded_at)`` pairs."""
    return _stats((t, at.astimezone(UTC).date().isoformat(), 1) for t, at in rows)


def _utc_day(dialect: str) -> ColumnElement[str]:
    """``recorded_at``'s UTC day as ``YYYY-MM-DD`` (SQLite stores UTC text)."""
    if dialect == "sqlite":
        return func.substr(events.c.recorded_at, 1, 10)
    return func.to_char(func.timezone("UTC", events.c.recorded_at), "YYYY-MM-DD")


def _micros(dialect: str) -> ColumnElement[int]:
    """``recorded_at`` as whole microseconds since the epoch, for RANGE windows."""
    at = events.c.recorded_at
    if dialect == "sqlite":  # "YYYY-MM-DD HH:MM:SS.ffffff"
        seconds = cast(func.strftime("%s", at), Integer)
        return seconds * 1_000_000 + cast(func.substr(at, 21, 6), Integer)
    return cast(extract("epoch", at) * 1_000_000, BigInteger)


def _datetime(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


#: Counts by (event type, UTC day) over index ranges, for a filter of types and times
#: only. The types come from a loose scan of the ``(event_type, recorded_at)`` index (one
#: seek per distinct type), each type's first and last event in the range from two
#: seeks, and each (type, day) count from a range of that index: no table row is read
#: and nothing is sorted. A plain ``GROUP BY event_type, <day of recorded_at>`` over
#: the same index sorted every event of the log by the day expression (SQLite: a temp
#: B-tree; 1M events: 0.45 s of CPU against 0.08 s this way, measured with the sqlite3
#: shell).
_STATS_BY_RANGES: Final = """
WITH RECURSIVE types(t) AS (
    SELECT {min_type} FROM events WHERE {types}
    UNION ALL
    SELECT (SELECT {min_type} FROM events WHERE event_type > types.t AND {types})
    FROM types WHERE types.t IS NOT NULL
),
spans(t, first_at, last_at) AS (
    SELECT t,
        (SELECT min(recorded_at) FROM events WHERE event_type = types.t AND {times}),
        (SELECT max(recorded_at) FROM events WHERE event_type = types.t AND {times})
    FROM types WHERE t IS NOT NULL
),
days(t, lo, last_day) AS (
    SELECT t, {day_of_first}, {day_of_last} FROM spans WHERE first_at IS NOT NULL
    UNION ALL
    SELECT t, {next_day}, last_day FROM days WHERE lo < last_day
)
SELECT t, {day_text}, (
    SELECT count(*) FROM events
    WHERE event_type = days.t AND recorded_at >= days.lo AND recorded_at < {next_day}
        AND {times}
) FROM days
"""
#: The day arithmetic of :data:`_STATS_BY_RANGES`: SQLite keeps UTC text, so a day is
#: its ``YYYY-MM-DD`` prefix (which sorts before every time of that day); PostgreSQL
#: takes UTC midnights as ``timestamptz``.
_DAY_SQL: Final = {
    "sqlite": {
        "min_type": "min(event_type)",
        "day_of_first": "substr(first_at, 1, 10)",
        "day_of_last": "substr(last_at, 1, 10)",
        "next_day": "date(days.lo, '+1 day')",
        "day_text": "days.lo",
    },
    "postgresql": {
        # a recursive CTE's column has one type: text, not min()'s varchar(200)
        "min_type": "CAST(min(event_type) AS text)",
        "day_of_first": "timezone('UTC', date_trunc('day', timezone('UTC', first_at)))",
        "day_of_last": "timezone('UTC', date_trunc('day', timezone('UTC', last_at)))",
        # on UTC's clock: a timestamptz plus a day is a day of the session's zone,
        # 23 or 25 hours across its summer time change
        "next_day": "timezone('UTC', timezone('UTC', days.lo) + interval '1 day')",
        "day_text": "to_char(timezone('UTC', days.lo), 'YYYY-MM-DD')",
    },
}


def _stats_by_ranges(dialect: str, where: AuditFilter) -> TextClause:
    times = []
    if where.since is not None:
        times.append("recorded_at >= :since")
    if where.until is not None:
        times.append("recorded_at < :until")
    sql = _STATS_BY_RANGES.format(
        types="event_type IN :types" if where.event_types else "TRUE",
        times=" AND ".join(times) or "TRUE",
        **_DAY_SQL[dialect],
    )
    stmt = sql_text(sql)
    params: dict[str, Any] = {}
    if where.event_types:
        stmt = stmt.bindparams(bindparam("types", expanding=True))
        params["types"] = list(where.event_types)
    for name in ("since", "until"):
        value = getattr(where, name)
        if value is not None:
            stmt = stmt.bindparams(bindparam(name, value, type_=UTCDateTime()))
    return stmt.bindparams(**params) if params else stmt


def _by_types_and_times(where: AuditFilter) -> bool:
    """Whether ``where`` narrows by event type and time only (an index range)."""
    return (
        where.actor_id is None
        and where.stream_id is None
        and where.category is None
        and where.correlation_id is None
    )


@telemetry.traced_audit("stats")
async def stats(conn: AsyncConnection, where: AuditFilter) -> AuditStats:
    """Counts by event type and UTC day, counted by the database: over index ranges
    (:data:`_STATS_BY_RANGES`) for a filter of types and times, else grouped over the
    rows the filter's own index selects (an actor's, a stream's, a category's events)."""
    dialect = conn.dialect.name
    if _by_types_and_times(where):
        stmt: Any = _stats_by_ranges(dialect, where)
    else:
        day = _utc_day(dialect)
        stmt = (
            select(events.c.event_type, day, func.count())
            .where(*where.conditions())
            .group_by(events.c.event_type, day)
        )
    result = await conn.execute(stmt.execution_options(**{OFF_LOOP: True}))
    return _stats((t, d, n) for t, d, n in result if n)


def stats_archive(path: str | Path, where: AuditFilter) -> AuditStats:
    rows = (r for r in read_archive(path) if where.matches(r))
    return stats_of((r["event_type"], r["recorded_at"]) for r in rows)


# -- suspicious activity -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SuspiciousRules:
    """Thresholds of the rules in this module's docstring: counts of at least 1,
    durations from zero to :data:`MAX_DURATION` (``InvalidCommand`` naming the field
    otherwise: a negative or huge window failed in the database, as a driver error on
    PostgreSQL and an "unavailable" SQLite error, a string threshold as SchemaNotReady)."""

    account_threshold: int = 5
    ip_threshold: int = 10
    window: timedelta = timedelta(minutes=15)
    lockout_lookback: timedelta = timedelta(days=1)

    def __post_init__(self) -> None:
        for name in ("account_threshold", "ip_threshold"):
            count = getattr(self, name)
            if type(count) is not int or count < 1:
                raise InvalidCommand(name, f"must be an int of at least 1, not {count!r:.40}")
        for name in ("window", "lockout_lookback"):
            duration = getattr(self, name)
            if not isinstance(duration, timedelta) or not timedelta(0) <= duration <= MAX_DURATION:
                raise InvalidCommand(
                    name, f"must be a timedelta from 0 to {MAX_DURATION.days} days"
                )


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule that fired: who (``subject``), how often, when, and the evidence."""

    rule: str
    subject: str
    count: int
    first_at: datetime
    last_at: datetime
    detail: str
    positions: tuple[int, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["first_at"] = self.first_at.isoformat()
        data["last_at"] = self.last_at.isoformat()
        data["positions"] = list(self.positions)
        return data


def _burst(
    rule: str, subject: str, window: timedelta, inside: Sequence[tuple[datetime, int]]
) -> Finding:
    label = "for this account" if rule == "account_failures" else "from this IP"
    return Finding(
        rule,
        subject,
        len(inside),
        inside[0][0],
        inside[-1][0],
        f"{len(inside)} failed logins {label} within {window}",
        tuple(position for _, position in inside),
    )


class _Windows:
    """The fullest closed window ``[t - window, t]`` per subject, over attempts fed in
    time order; keeps only the attempts inside each subject's current window."""

    def __init__(self, threshold: int, window: timedelta) -> None:
        self.threshold = threshold
        self.window = window
        self.open: dict[str, deque[tuple[datetime, int]]] = {}
        self.best: dict[str, list[tuple[datetime, int]]] = {}

    def add(self, subject: str, at: datetime, position: int) -> None:
        inside = self.open.get(subject)
        if inside is None:
            inside = self.open[subject] = deque()
        inside.append((at, position))
        while inside[0][0] < at - self.window:
            inside.popleft()
        if len(inside) >= self.threshold and len(inside) > len(self.best.get(subject, ())):
            self.best[subject] = list(inside)

    def sweep(self, now: datetime) -> None:
        """Forget subjects whose window has closed (their best window is kept)."""
        for subject in [s for s, inside in self.open.items() if inside[-1][0] < now - self.window]:
            del self.open[subject]

    def findings(self, rule: str) -> list[Finding]:
        return [_burst(rule, s, self.window, best) for s, best in sorted(self.best.items())]

    async def findings_in_chunks(self, rule: str) -> list[Finding]:
        """:meth:`findings`, the loop free between chunks."""
        return await _built(
            sorted(self.best.items()), lambda item: _burst(rule, item[0], self.window, item[1])
        )


@dataclass(frozen=True, slots=True)
class _Attempt:
    position: int
    at: datetime
    user_id: str | None
    ip: str | None


def _attempts(rows: Iterable[AuditEntry]) -> list[_Attempt]:
    """Failed login attempts (one per command), in time order."""
    by_command: dict[str, _Attempt] = {}
    for row in sorted(rows, key=lambda r: r.position):
        if row.event_type not in _FAILED_LOGIN_TYPES:
            continue
        key = row.command_id if row.command_id is not None else f"@{row.position}"
        seen = by_command.get(key) or _Attempt(row.position, row.recorded_at, None, None)
        user_id = seen.user_id if seen.user_id is not None else row.data.get("user_id")
        ip = seen.ip if seen.ip is not None else row.data.get("ip")
        by_command[key] = _Attempt(seen.position, seen.at, user_id, ip)
    return sorted(by_command.values(), key=lambda a: (a.at, a.position))


def _new_ip_after_lockout(
    history: Iterable[tuple[int, datetime, str, str, str | None, bool]],
    rules: SuspiciousRules,
) -> list[Finding]:
    """``history``: (position, at, event type, user id, ip, in range) of lockouts and
    successful logins, in log order."""
    findings = []
    seen: dict[str, set[str]] = defaultdict(set)
    locked_at: dict[str, tuple[datetime, int]] = {}
    for position, at, kind, user_id, ip, in_range in history:
        if kind == users.AccountLocked.event_type:
            if in_range:
                locked_at[user_id] = (at, position)
            continue
        lock = locked_at.get(user_id)
        if (
            in_range
            and ip is not None
            and ip != ERASED
            and lock is not None
            and at - lock[0] <= rules.lockout_lookback
            and ip not in seen[user_id]
        ):
            findings.append(
                Finding(
                    "new_ip_after_lockout",
                    user_id,
                    1,
                    lock[0],
                    at,
                    f"login from new IP {ip} after a lockout",
                    (lock[1], position),
                )
            )
        if ip is not None:
            seen[user_id].add(ip)
    return findings


def _ordered(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (f.last_at, f.rule, f.subject))


def find_suspicious(
    rows: Iterable[AuditEntry],
    rules: SuspiciousRules = SuspiciousRules(),
    where: AuditFilter = AuditFilter(),
) -> list[Finding]:
    """The rules (module docstring) in plain Python over login events with their
    personal fields opened; events outside ``where`` only tell earlier IPs."""
    rows = sorted(rows, key=lambda r: r.position)
    in_range = [r for r in rows if where.matches(_row_of(r))]
    per_account = _Windows(rules.account_threshold, rules.window)
    per_ip = _Windows(rules.ip_threshold, rules.window)
    for attempt in _attempts(in_range):
        if attempt.user_id is not None:
            per_account.add(attempt.user_id, attempt.at, attempt.position)
        if attempt.ip is not None and attempt.ip != ERASED:  # erased IPs are not one "IP"
            per_ip.add(attempt.ip, attempt.at, attempt.position)
    kinds = (users.AccountLocked.event_type, users.LoginSucceeded.event_type)
    history = [
        (r.position, r.recorded_at, r.event_type, r.data["user_id"], r.data.get("ip"), ok)
        for r, ok in ((r, where.matches(_row_of(r))) for r in rows)
        if r.event_type in kinds
        and isinstance(r.data.get("user_id"), str)
        and (where.until is None or r.recorded_at < where.until)
    ]
    findings = per_account.findings("account_failures") + per_ip.findings("ip_failures")
    return _ordered(findings + _new_ip_after_lockout(history, rules))


def _row_of(entry: AuditEntry) -> dict[str, Any]:
    return {
        "actor_id": entry.actor_id,
        "stream_id": entry.stream_id,
        "stream_category": entry.category,
        "event_type": entry.event_type,
        "recorded_at": entry.recorded_at,
        "correlation_id": entry.correlation_id,
    }


def _attempts_cte(dialect: str, where: AuditFilter) -> Any:
    """One row per failed login attempt in ``where``: its key, first position, time
    (microseconds), account, and the position of its first event naming an IP."""
    c = events.c
    key = func.coalesce(c.command_id, "@" + cast(c.position, String))
    user_id = c.data["user_id"].as_string()
    has_ip = c.data["ip"].as_string().is_not(None)
    rows = select(
        key.label("attempt"),
        func.row_number().over(partition_by=key, order_by=c.position).label("nth"),
        func.first_value(c.position).over(partition_by=key, order_by=c.position).label("position"),
        func.first_value(_micros(dialect))
        .over(partition_by=key, order_by=c.position)
        .label("at_us"),
        func.first_value(user_id)
        .over(partition_by=key, order_by=(user_id.is_(None), c.position))
        .label("user_id"),
        func.first_value(c.position)
        .over(partition_by=key, order_by=(~has_ip, c.position))
        .label("ip_position"),
    ).where(*where.narrowed(_FAILED_LOGIN_TYPES).conditions())
    inner = rows.subquery("failed")
    return (
        select(inner.c.position, inner.c.at_us, inner.c.user_id, inner.c.ip_position)
        .where(inner.c.nth == 1)
        .cte("attempts")
    )


_IP_ROW: Final = 0
_ACCOUNT_ROW: Final = 1


def _ip_attempts(attempts: Any) -> Select[Any]:
    """The IP rule's rows: each attempt naming an IP, with that IP (encrypted)."""
    a = attempts.c
    return (
        select(
            sql_literal(_IP_ROW).label("rule"),
            cast(null(), String).label("user_id"),
            a.at_us,
            a.position,
            events.c.event_type,
            events.c.data["ip"].label("ip"),
        )
        .join_from(attempts, events, events.c.position == a.ip_position)
        .where(events.c.data["ip"].as_string().is_not(None))
    )


def _account_evidence(attempts: Any, rules: SuspiciousRules) -> Select[Any]:
    """The account rule's rows, by window functions alone: a RANGE window counts each
    account's attempts in ``[t - window, t]``, two more give each account's fullest
    count and the end of its earliest fullest window, and the attempts inside that
    window are its evidence (a join of the windows' ends back to the attempts compared
    every end with every attempt: 1M events, 0.19 s of CPU)."""
    width = rules.window // timedelta(microseconds=1)
    a = attempts.c
    counted = (
        select(
            a.user_id,
            a.at_us,
            a.position,
            func.count()
            .over(partition_by=a.user_id, order_by=a.at_us, range_=(-width, 0))
            .label("n"),
        )
        .where(a.user_id.is_not(None))
        .subquery("counted")
    )
    k = counted.c
    ranked = select(
        k.user_id,
        k.at_us,
        k.position,
        func.max(k.n).over(partition_by=k.user_id).label("best_n"),
        func.first_value(k.at_us)
        .over(partition_by=k.user_id, order_by=(k.n.desc(), k.at_us))
        .label("best_at"),
    ).subquery("ranked")
    r = ranked.c
    return select(
        sql_literal(_ACCOUNT_ROW),
        r.user_id,
        r.at_us,
        r.position,
        null(),
        null(),
    ).where(
        r.best_n >= rules.account_threshold,
        r.at_us >= r.best_at - width,
        r.at_us <= r.best_at,
    )


async def _failure_bursts(
    conn: AsyncConnection, attempts: Any, rules: SuspiciousRules
) -> list[Finding]:
    """The account and IP rules in one streamed statement, so the failed attempts are
    found once: the IP rule's attempts in time order (IPs are encrypted, so they are
    opened here, page by page, keeping only the attempts inside each IP's current
    window), then each account's evidence."""
    stmt = union_all(_ip_attempts(attempts), _account_evidence(attempts, rules)).order_by(
        "rule", "user_id", "at_us", "position"
    )
    windows = _Windows(rules.ip_threshold, rules.window)
    evidence: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    async with contextlib.aclosing(_pages(conn, stmt)) as pages:
        async for page in pages:
            ips = [row for row in page if row.rule == _IP_ROW]
            if ips:
                opened = await _opened(conn, [(row.event_type, {"ip": row.ip}) for row in ips])
                for row, o in zip(ips, opened, strict=True):
                    ip = o.data["ip"]
                    if isinstance(ip, str) and ip != ERASED:  # erased IPs are not one "IP"
                        windows.add(ip, _datetime(row.at_us), row.position)
                windows.sweep(_datetime(ips[-1].at_us))
            for row in page:
                if row.rule == _ACCOUNT_ROW:
                    evidence[row.user_id].append((_datetime(row.at_us), row.position))
    # Findings are built in chunks of the loop too: 493 of them were one 4 ms callback
    # (1M SQLite events; a frozen dataclass and its evidence tuple each).
    accounts = await _built(
        list(evidence.items()),
        lambda item: _burst("account_failures", item[0], rules.window, item[1]),
    )
    return accounts + await windows.findings_in_chunks("ip_failures")


async def _pages(
    conn: AsyncConnection, stmt: Any, *, mappings: bool = False, limited: bool = False
) -> AsyncGenerator[Sequence[Any]]:
    """The rows of ``stmt`` (as mappings with ``mappings``) a chunk at a time, the loop
    free between chunks (each ~:data:`_SLICE` of its CPU: :class:`_Chunks`). On
    PostgreSQL streamed: a server-side cursor fetching :data:`_FETCH` rows a round
    trip. On SQLite the statement runs off the loop: ``limited`` (a LIMIT bounds its
    rows) in one hop, else streamed, a hop per page (streamed, a limited read cost 4%
    more CPU: callgrind, 9,474 audit entries).
    Iterate it inside ``contextlib.aclosing``: a caller that stops or is cancelled
    then closes the result while its connection is still its own."""
    chunks = _Chunks()
    if limited and conn.dialect.name != "postgresql":
        fetched_all = await conn.execute(stmt.execution_options(**{OFF_LOOP: True}))
        shaped = fetched_all.mappings() if mappings else fetched_all
        chunks.resumed()
        while chunk := shaped.fetchmany(chunks.rows):
            yield chunk
            await chunks.turn(len(chunk))
        return
    result = await _whole(conn, conn.stream(stmt))
    rows: AsyncResult[Any] | AsyncMappingResult = result.mappings() if mappings else result
    try:
        while fetched := await _whole(conn, rows.fetchmany(_FETCH)):
            chunks.resumed()
            start = 0
            while start < len(fetched):
                piece = fetched[start : start + chunks.rows]
                yield piece
                start += len(piece)
                await chunks.turn(len(piece))
    finally:
        await result.close()


class _Chunks:
    """The rows the next chunk of a long read takes, after what the last one cost the
    loop thread (its CPU from the read's last suspension to this one: the rows'
    fetching and decoding, and what the reader did with them): scaled to
    :data:`_SLICE`, at most doubled a chunk. The loop thread's CPU, not the clock: on a
    busy machine the clock also counts its waits for a core, and would shrink the
    chunks, and add turns, without shortening any stall."""

    __slots__ = ("_since", "rows")

    def __init__(self) -> None:
        self.rows = _MIN_CHUNK
        self._since = time.thread_time()

    def resumed(self) -> None:
        """The read resumes after a wait of its own (its statement, a round trip): what
        the loop ran meanwhile is not the next chunk's."""
        self._since = time.thread_time()

    async def turn(self, taken: int) -> None:
        """Suspend once ``taken`` rows (the last chunk's, fewer at the end of a page)
        have been handled."""
        spent = time.thread_time() - self._since
        fit = int(taken * _SLICE / spent) if spent > 0 else _MAX_CHUNK
        self.rows = max(_MIN_CHUNK, min(fit, 2 * self.rows, _MAX_CHUNK))
        await asyncio.sleep(0)
        self._since = time.thread_time()


async def _built(items: Sequence[X], build: Callable[[X], Finding]) -> list[Finding]:
    """``build`` of each item, in chunks of ~:data:`_SLICE` of the loop's CPU."""
    chunks = _Chunks()
    built: list[Finding] = []
    while len(built) < len(items):
        piece = items[len(built) : len(built) + chunks.rows]
        built += [build(item) for item in piece]
        await chunks.turn(len(piece))
    return built


async def _opened(conn: AsyncConnection, items: Sequence[tuple[str, Any]]) -> list[Opened]:
    """``keyring.open_many`` in a streamed read: the keys it loads are a round trip,
    never abandoned midway. A reader's connection (:class:`GuardedConnection`, as is a
    unit of work's of ``execute_in_transaction``) guards its statements itself: wrapped
    again here, each page would cost a task whether it loads keys or not, and one more
    where it does. Any other is guarded here."""
    opening = keyring(conn).open_many(conn, items)
    if isinstance(conn, GuardedConnection):
        return await opening
    return await _whole(conn, opening)


async def _whole(conn: AsyncConnection, work: Awaitable[T]) -> T:
    """A round trip of a streamed read, on PostgreSQL never abandoned midway: a
    cancelled caller stops between two of them, and the read's connection goes back to
    the pool, rolled back. SQLite's driver interrupts a statement it runs off the loop
    itself."""
    return await whole_round_trip(conn.dialect.name == "postgresql", work)


async def _lockout_logins(
    conn: AsyncConnection, where: AuditFilter, rules: SuspiciousRules
) -> list[Finding]:
    """The lockout rule in one streamed statement: the lockouts and successful logins
    of the accounts locked inside the range, read from their streams (an index range
    each), stream by stream in log order; Python opens their IPs a page at a time and
    keeps one account's history at a time."""
    c = events.c
    prefix = users.stream_id("")
    locked_streams = select(sql_literal(prefix, String) + c.data["user_id"].as_string()).where(
        *where.narrowed((users.AccountLocked.event_type,)).conditions()
    )
    kinds = (users.AccountLocked.event_type, users.LoginSucceeded.event_type)
    in_range = and_(*where.conditions()) if where.conditions() else true()
    stmt = (
        select(
            c.stream_id,
            c.position,
            c.recorded_at,
            c.event_type,
            c.data["ip"].label("ip"),
            in_range.label("in_range"),
        )
        # The type as an expression, which no index serves: the planner then reads each
        # locked stream's range of the (stream_id, version) index rather than every
        # successful login of the log by the type's index (SQLite chose that).
        .where(c.stream_id.in_(locked_streams), (c.event_type + "").in_(kinds))
        .order_by(c.stream_id, c.position)
    )
    if where.until is not None:
        stmt = stmt.where(c.recorded_at < where.until)
    findings: list[Finding] = []
    history: list[tuple[int, datetime, str, str, str | None, bool]] = []
    async with contextlib.aclosing(_pages(conn, stmt)) as pages:
        async for page in pages:
            opened = await _opened(conn, [(r.event_type, {"ip": r.ip}) for r in page])
            for r, o in zip(page, opened, strict=True):
                user_id = r.stream_id.removeprefix(prefix)
                if history and history[-1][3] != user_id:
                    findings += _new_ip_after_lockout(history, rules)
                    history = []
                ip = o.data["ip"]
                history.append(
                    (r.position, r.recorded_at, r.event_type, user_id, ip, bool(r.in_range))
                )
    return findings + _new_ip_after_lockout(history, rules)


@telemetry.traced_audit("suspicious")
async def suspicious(
    conn: AsyncConnection, where: AuditFilter, rules: SuspiciousRules = SuspiciousRules()
) -> list[Finding]:
    """The suspicious-login rules (module docstring) over the log's events in ``where``.

    Streams a result: on PostgreSQL ``conn`` must not be in autocommit mode."""
    attempts = _attempts_cte(conn.dialect.name, where)
    findings = await _failure_bursts(conn, attempts, rules)  # ends on a turn of the loop
    findings += await _lockout_logins(conn, where, rules)
    await asyncio.sleep(0)
    return _ordered(findings)


def suspicious_archive(
    path: str | Path, where: AuditFilter, rules: SuspiciousRules = SuspiciousRules()
) -> list[Finding]:
    rows = [to_entry(r) for r in read_archive(path) if r["event_type"] in _LOGIN_TYPES]
    return find_suspicious(rows, rules, where)
