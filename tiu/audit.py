"""Audit queries straight off the event log (or off a retention archive file).

Every filter maps to an index on ``events``: actor + time ``(actor_id, recorded_at)``,
type + time ``(event_type, recorded_at)``, correlation id, stream ``(stream_id,
version)``, category ``(stream_category, position)``, time alone ``(recorded_at)``.
The same :class:`AuditFilter` runs in SQL against the log and in Python against an
archive file, so ``tiu audit --archive FILE`` answers like ``tiu audit``.

Suspicious-login rules (:func:`find_suspicious`), evaluated over failed and
successful login events in the queried time range:

``account_failures``
    at least ``account_threshold`` failed logins for one account (``user_id``)
    inside any ``window``;
``ip_failures``
    at least ``ip_threshold`` failed logins from one IP (any accounts, unknown
    emails included) inside any ``window``;
``new_ip_after_lockout``
    a successful login, within ``lockout_lookback`` after the account was locked,
    from an IP never seen in an earlier successful login of that user.

A failed login is one attempt (one ``command_id``): its ``LoginFailed`` (user
stream) and ``LoginRejected`` (security stream) events count once together, so the
rules still work after the security stream was archived.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import security, users
from domain.base import ERASED
from eventstore import telemetry
from eventstore.crypto import keyring
from eventstore.retention import read_archive
from eventstore.schema import events
from tiu.models import AuditEntry

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
        amount, unit = match.groups()
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidTime(
            f"invalid time {text!r}: use ISO 8601 (2026-03-01T09:00) or relative (30m, 2h, 7d)"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def parse_duration(text: str) -> timedelta:
    match = _RELATIVE.fullmatch(text.strip())
    if not match:
        raise InvalidTime(f"invalid duration {text!r}: use 30s, 15m, 2h, 7d or 1w")
    amount, unit = match.groups()
    return timedelta(**{_UNITS[unit]: int(amount)})


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


def to_entry(row: Mapping[str, Any] | Any, data: Mapping[str, Any] | None = None) -> AuditEntry:
    """``data``: the row's data with personal fields opened (``eventstore.crypto``);
    without it the stored data is shown as is (ciphertext for personal fields)."""
    return AuditEntry(
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
    """Events matching ``where``, newest first by default."""
    order = events.c.position.desc() if newest_first else events.c.position
    stmt = select(events).where(*where.conditions()).order_by(order).limit(_clamp(limit))
    rows = (await conn.execute(stmt)).mappings().all()
    # personal fields decrypted; those of forgotten subjects read as "[erased]"
    opened = await keyring(conn).open_many(conn, [(r["event_type"], r["data"]) for r in rows])
    return [to_entry(r, o.data) for r, o in zip(rows, opened, strict=True)]


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


def stats_of(rows: Iterable[tuple[str, datetime]]) -> AuditStats:
    """Counts by event type and by UTC day of ``(event_type, recorded_at)`` pairs."""
    by_type: Counter[str] = Counter()
    by_day: Counter[str] = Counter()
    for event_type, at in rows:
        by_type[event_type] += 1
        by_day[at.astimezone(UTC).date().isoformat()] += 1
    return AuditStats(
        sum(by_type.values()),
        dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
        dict(sorted(by_day.items())),
    )


@telemetry.traced_audit("stats")
async def stats(conn: AsyncConnection, where: AuditFilter) -> AuditStats:
    stmt = select(events.c.event_type, events.c.recorded_at).where(*where.conditions())
    result = await conn.execute(stmt)
    return stats_of((t, at) for t, at in result)


def stats_archive(path: str | Path, where: AuditFilter) -> AuditStats:
    rows = (r for r in read_archive(path) if where.matches(r))
    return stats_of((r["event_type"], r["recorded_at"]) for r in rows)


# -- suspicious activity -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SuspiciousRules:
    """Thresholds of the rules in this module's docstring."""

    account_threshold: int = 5
    ip_threshold: int = 10
    window: timedelta = timedelta(minutes=15)
    lockout_lookback: timedelta = timedelta(days=1)


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


@dataclass(frozen=True, slots=True)
class _Attempt:
    position: int
    at: datetime
    user_id: str | None
    ip: str | None


def _attempts(rows: Iterable[AuditEntry]) -> tuple[list[_Attempt], list[AuditEntry]]:
    """Failed login attempts (one per command) and the other login events, in order."""
    by_command: dict[str, _Attempt] = {}
    others: list[AuditEntry] = []
    for row in sorted(rows, key=lambda r: r.position):
        if row.event_type in _FAILED_LOGIN_TYPES:
            key = row.command_id or f"@{row.position}"
            seen = by_command.get(key)
            user_id = row.data.get("user_id") or (seen.user_id if seen else None)
            ip = row.data.get("ip") or (seen.ip if seen else None)
            first = seen or _Attempt(row.position, row.recorded_at, None, None)
            by_command[key] = _Attempt(first.position, first.at, user_id, ip)
        else:
            others.append(row)
    return sorted(by_command.values(), key=lambda a: a.position), others


def _bursts(
    rule: str, label: str, groups: Mapping[str, list[_Attempt]], threshold: int, window: timedelta
) -> list[Finding]:
    findings = []
    for subject, attempts in sorted(groups.items()):
        inside: deque[_Attempt] = deque()
        best: list[_Attempt] = []
        for attempt in attempts:
            inside.append(attempt)
            while attempt.at - inside[0].at > window:
                inside.popleft()
            if len(inside) >= threshold and len(inside) > len(best):
                best = list(inside)
        if best:
            findings.append(
                Finding(
                    rule,
                    subject,
                    len(best),
                    best[0].at,
                    best[-1].at,
                    f"{len(best)} failed logins {label} within {window}",
                    tuple(a.position for a in best),
                )
            )
    return findings


def find_suspicious(
    rows: Iterable[AuditEntry],
    rules: SuspiciousRules = SuspiciousRules(),
    *,
    known_ips: Mapping[str, set[str]] | None = None,
) -> list[Finding]:
    """Apply the rules (module docstring) to login events. ``known_ips`` adds IPs of
    successful logins before the queried range, per user."""
    attempts, others = _attempts(rows)
    per_account: dict[str, list[_Attempt]] = defaultdict(list)
    per_ip: dict[str, list[_Attempt]] = defaultdict(list)
    for attempt in attempts:
        if attempt.user_id:
            per_account[attempt.user_id].append(attempt)
        if attempt.ip and attempt.ip != ERASED:  # forgotten people's IPs are not one "IP"
            per_ip[attempt.ip].append(attempt)
    findings = _bursts(
        "account_failures", "for this account", per_account, rules.account_threshold, rules.window
    )
    findings += _bursts("ip_failures", "from this IP", per_ip, rules.ip_threshold, rules.window)
    seen: dict[str, set[str]] = defaultdict(set)
    for known_user, ips in (known_ips or {}).items():
        seen[known_user] |= ips
    locked_at: dict[str, tuple[datetime, int]] = {}
    for row in others:
        user_id = row.data.get("user_id")
        if not isinstance(user_id, str):
            continue
        if row.event_type == users.AccountLocked.event_type:
            locked_at[user_id] = (row.recorded_at, row.position)
        elif row.event_type == users.LoginSucceeded.event_type:
            ip = row.data.get("ip")
            lock = locked_at.get(user_id)
            if (
                isinstance(ip, str)
                and ip != ERASED
                and lock is not None
                and row.recorded_at - lock[0] <= rules.lockout_lookback
                and ip not in seen[user_id]
            ):
                findings.append(
                    Finding(
                        "new_ip_after_lockout",
                        user_id,
                        1,
                        lock[0],
                        row.recorded_at,
                        f"login from new IP {ip} after a lockout",
                        (lock[1], row.position),
                    )
                )
            if isinstance(ip, str):
                seen[user_id].add(ip)
    return sorted(findings, key=lambda f: (f.last_at, f.rule, f.subject))


@telemetry.traced_audit("suspicious")
async def suspicious(
    conn: AsyncConnection, where: AuditFilter, rules: SuspiciousRules = SuspiciousRules()
) -> list[Finding]:
    """:func:`find_suspicious` over the log's login events matching ``where``."""
    rows = await query(conn, where.narrowed(_LOGIN_TYPES), limit=None, newest_first=False)
    known: dict[str, set[str]] = defaultdict(set)
    if where.since is not None:
        earlier = await conn.execute(
            select(events.c.data).where(
                events.c.event_type == users.LoginSucceeded.event_type,
                events.c.recorded_at < where.since,
            )
        )
        kind = users.LoginSucceeded.event_type
        opened = await keyring(conn).open_many(conn, [(kind, d) for (d,) in earlier])
        for data in (o.data for o in opened):
            if data.get("user_id") and data.get("ip"):
                known[data["user_id"]].add(data["ip"])
    return find_suspicious(rows, rules, known_ips=known)


def suspicious_archive(
    path: str | Path, where: AuditFilter, rules: SuspiciousRules = SuspiciousRules()
) -> list[Finding]:
    return find_suspicious(
        query_archive(path, where.narrowed(_LOGIN_TYPES), limit=None, newest_first=False), rules
    )
