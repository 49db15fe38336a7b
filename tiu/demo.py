"""``tiu demo``: a realistic scenario played through the public API on a fresh file.

Fresh file each run: the demo deletes its SQLite file (and its WAL/SHM files) first,
so running it twice gives the same story. A controllable clock starts two days ago
and moves forward as the story goes, so session expiry happens without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from domain.errors import DomainError
from domain.passwords import BcryptHasher
from domain.permissions import SYSTEM_ACTOR
from eventstore import verify
from tiu import audit as audit_queries
from tiu.service import DatabaseService, create_database_service

T = TypeVar("T")
PASSWORD = "violet-harbour-lantern-42"  # noqa: S105  # the demo users' password
BCRYPT_ROUNDS = 4


class DemoClock:
    """Time moves only when the story moves it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def demo_path(url: str) -> Path:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        raise ValueError("the demo runs on a SQLite file (it deletes and recreates it)")
    return Path(str(parsed.database))


#: Written into the SQLite header (PRAGMA application_id) of every demo database, so
#: the demo only ever deletes a file that it created itself.
DEMO_APPLICATION_ID = 0x74697564  # "tiud"


def _application_id(path: Path) -> int:
    with path.open("rb") as file:
        header = file.read(100)
    if len(header) < 72 or not header.startswith(b"SQLite format 3\x00"):
        return -1
    return int.from_bytes(header[68:72], "big")


def reset_file(path: Path) -> bool:
    """Delete a previous demo database; refuse any other file."""
    existed = path.exists()
    if existed and path.stat().st_size > 0 and _application_id(path) != DEMO_APPLICATION_ID:
        raise ValueError(
            f"refusing to delete {path}: it is not a demo database; "
            "pick another file with --database-url"
        )
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return existed


async def _refused(console: Console, what: str, step: Awaitable[T]) -> DomainError | None:
    try:
        await step
    except DomainError as error:
        console.print(f"  [yellow]refused[/]: {what}: {type(error).__name__}: {error}")
        return error
    console.print(f"  [red]unexpectedly accepted[/]: {what}")
    return None


async def run_demo(url: str, console: Console) -> dict[str, Any]:
    """Play the scenario on ``url`` (a SQLite file, recreated) and print what happened."""
    started = time.perf_counter()
    path = demo_path(url)
    existed = reset_file(path)
    console.print(
        f"[bold]tiu demo[/] on {path} - fresh file each run"
        + (" (deleted the previous demo database)" if existed else "")
    )
    console.print(f"bcrypt rounds lowered to {BCRYPT_ROUNDS} for speed (production default: 12)")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    clock = DemoClock(start)
    service = await create_database_service(
        url, hasher=BcryptHasher(rounds=BCRYPT_ROUNDS), clock=clock, bcrypt_rounds=BCRYPT_ROUNDS
    )
    try:
        async with service.engine.begin() as conn:
            await conn.exec_driver_sql(f"PRAGMA application_id = {DEMO_APPLICATION_ID}")
        console.print("migrated to head; playing the scenario...")
        summary = await _scenario(service, clock, console)
        await _show(service, console)
        async with service.engine.connect() as conn:
            report = await verify(conn)
        console.print(
            f"hash chains verified: {report.streams} streams, {report.events} events, "
            f"head position {report.head_position}: "
            + ("[green]ok[/]" if report.ok else f"[red]{report.broken}[/]")
        )
        summary.update(events=report.events, verified=report.ok)
    finally:
        await service.aclose()
    summary["seconds"] = round(time.perf_counter() - started, 2)
    console.print(f"done in {summary['seconds']}s. Try: tiu audit --failed, tiu audit --suspicious")
    return summary


async def _scenario(service: DatabaseService, clock: DemoClock, console: Console) -> dict[str, Any]:
    console.print("[bold]1.[/] the system creates an admin; three people register")
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        ada = await repos.users.create_user(
            email="ada@example.com",
            username="ada",
            password=PASSWORD,
            display_name="Ada (admin)",
            roles=["admin"],
        )
    people = {}
    async with service.get_repositories(ip="203.0.113.10", user_agent="demo/1.0") as repos:
        for name in ("grace", "linus", "margaret"):
            clock.advance(minutes=7)
            people[name] = await repos.users.create_user(
                email=f"{name}@example.com",
                username=name,
                password=PASSWORD,
                display_name=name.title(),
            )
    assert ada is not None
    grace, linus, margaret = (people[n] for n in ("grace", "linus", "margaret"))
    assert grace is not None
    assert linus is not None
    assert margaret is not None

    console.print("[bold]2.[/] grace signs in; linus mistypes his password until locked out")
    clock.advance(hours=1)
    async with service.get_repositories(ip="203.0.113.10", user_agent="firefox") as repos:
        grace_session = await repos.sessions.create_session("grace@example.com", PASSWORD)
    async with service.get_repositories(ip="198.51.100.7", user_agent="curl/8") as repos:
        for attempt in range(1, service.settings.lockout_threshold + 1):
            clock.advance(seconds=20)
            await _refused(
                console,
                f"linus, wrong password #{attempt}",
                repos.sessions.create_session("linus@example.com", f"wrong-guess-{attempt}"),
            )
        await _refused(
            console,
            "linus, right password while locked",
            repos.sessions.create_session("linus@example.com", PASSWORD),
        )

    console.print("[bold]3.[/] ada (admin) unlocks linus; he signs in from a new IP")
    clock.advance(minutes=10)
    async with service.get_repositories(actor_id=ada.id, ip="203.0.113.1") as repos:
        await repos.users.unlock(linus.id)
    async with service.get_repositories(ip="192.0.2.55", user_agent="safari") as repos:
        await repos.sessions.create_session("linus@example.com", PASSWORD)

    console.print("[bold]4.[/] grace creates a project, adds members, plans tasks")
    clock.advance(minutes=30)
    async with service.get_repositories(actor_id=grace.id, ip="203.0.113.10") as repos:
        apollo = await repos.projects.create_project("Apollo", "Guidance computer", "private")
        assert apollo is not None
        await repos.projects.add_member(apollo.id, linus.id, "editor")
        await repos.projects.add_member(apollo.id, margaret.id, "viewer")
        now = clock.now
        shield = await repos.tasks.create_task(
            apollo.id, "Design heat shield", priority="high", due_date=now + timedelta(days=3)
        )
        plan = await repos.tasks.create_task(
            apollo.id, "Write flight plan", due_date=now + timedelta(hours=20)
        )
        parts = await repos.tasks.create_task(
            apollo.id, "Order parts", priority="low", due_date=now + timedelta(days=1)
        )
        assert shield is not None
        assert plan is not None
        assert parts is not None
        await repos.tasks.assign_task(shield.id, linus.id)
        await repos.tasks.assign_task(plan.id, grace.id)

    console.print("[bold]5.[/] tasks move through their states")
    async with service.get_repositories(actor_id=linus.id, ip="192.0.2.55") as repos:
        clock.advance(hours=2)
        await repos.tasks.update_task_status(shield.id, "in_progress")
        clock.advance(hours=3)
        await repos.tasks.update_task_status(shield.id, "review")
    async with service.get_repositories(actor_id=grace.id, ip="203.0.113.10") as repos:
        clock.advance(hours=1)
        await repos.tasks.update_task_status(shield.id, "done")
        await repos.tasks.update_task_status(plan.id, "in_progress")
        await repos.tasks.update_task_status(parts.id, "cancelled")
    async with service.get_repositories(actor_id=margaret.id, ip="203.0.113.99") as repos:
        await _refused(
            console,
            "margaret (viewer) creates a task in Apollo",
            repos.tasks.create_task(apollo.id, "Paint it red"),
        )

    console.print("[bold]6.[/] an archived project refuses new tasks")
    async with service.get_repositories(actor_id=grace.id, ip="203.0.113.10") as repos:
        gemini = await repos.projects.create_project("Gemini", "Two-seat trials", "public")
        assert gemini is not None
        await repos.projects.archive_project(gemini.id)
        await _refused(
            console, "grace adds a task to archived Gemini", repos.tasks.create_task(gemini.id, "X")
        )

    console.print("[bold]7.[/] sessions go idle and expire as the clock moves")
    async with service.get_repositories(ip="203.0.113.99") as repos:
        margaret_session = await repos.sessions.create_session("margaret@example.com", PASSWORD)
    clock.advance(minutes=45)
    async with service.get_repositories() as repos:
        check = await repos.sessions.validate_session(grace_session.token)
        console.print(
            f"  grace's session after 45 idle minutes: valid={check.valid} ({check.reason})"
        )
    clock.advance(hours=13)
    revoked = await service.cleanup_expired_sessions()
    console.print(f"  13 hours later the cleanup revokes {revoked} expired sessions")
    del margaret_session
    return {"users": 4, "projects": 2, "tasks": 3, "revoked_sessions": revoked}


def _fmt(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if value is None:
        return "-"
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value))
    return str(value)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    return table


async def _show(service: DatabaseService, console: Console) -> None:
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        users = await repos.users.list_users(limit=None)
        names = {u.user_id: u.username for u in users}
        detailed = [await repos.users.get_by_id(u.user_id) for u in users]
        console.print(
            _table(
                "users (read model)",
                ["username", "roles", "failed", "locked until", "last login"],
                [
                    [u.username, u.roles, u.failed_logins, u.locked_until, u.last_login_at]
                    for u in detailed
                    if u is not None
                ],
            )
        )
        projects = await repos.projects.search_projects(limit=None)
        console.print(
            _table(
                "projects",
                ["name", "owner", "visibility", "archived"],
                [[p.name, names.get(p.owner_id), p.visibility, p.archived] for p in projects],
            )
        )
        tasks = await repos.tasks.list_tasks(limit=None)
        console.print(
            _table(
                "tasks",
                ["title", "status", "priority", "assignee", "due"],
                [
                    [t.title, t.status, t.priority, names.get(t.assignee_id or ""), t.due_at]
                    for t in tasks
                ],
            )
        )
        sessions = [
            s
            for u in users
            for s in await repos.sessions.get_user_sessions(u.user_id, active_only=False)
        ]
        console.print(
            _table(
                "sessions",
                ["user", "started", "last seen", "revoked"],
                [
                    [names.get(s.user_id), s.started_at, s.last_seen_at, s.revoked_at]
                    for s in sessions
                ],
            )
        )
        trail = await repos.audit.get_events(limit=30)
        console.print(audit_table("audit trail (newest 30 events)", trail, names))
        findings = await repos.audit.suspicious()
        console.print(findings_table(findings, names))


def audit_table(title: str, entries: list[Any], names: dict[str, str] | None = None) -> Table:
    names = names or {}
    rows = []
    for e in entries:
        actor = names.get(e.actor_id or "", e.actor_id)
        detail = e.data.get("reason") or e.data.get("to_status") or e.data.get("ip") or ""
        rows.append([e.position, e.recorded_at, e.event_type, e.stream_id, actor, detail])
    return _table(title, ["pos", "recorded", "type", "stream", "actor", "detail"], rows)


def findings_table(
    findings: list[audit_queries.Finding], names: dict[str, str] | None = None
) -> Table:
    names = names or {}
    return _table(
        "suspicious activity",
        ["rule", "subject", "count", "from", "to", "detail"],
        [
            [f.rule, names.get(f.subject, f.subject), f.count, f.first_at, f.last_at, f.detail]
            for f in findings
        ],
    )
