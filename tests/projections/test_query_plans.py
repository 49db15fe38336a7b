"""Every repository query the API issues reads through an index on PostgreSQL (issue #6).

The read models are filled directly (plain bulk inserts, no commands): 5,000 users,
2,000 projects (5% public), 100,000 tasks (the scale of the bench's query case: with
fewer, PostgreSQL rightly prefers to read the whole small table for a member's
unfiltered task list), 20,000 sessions, then analysed and vacuumed.
The callers are a plain member (owner of 3 projects, member of 8; with the public ones
they see about 110 projects, 5.5% of the tasks), an admin (``projects:read_all``) and
an anonymous caller.

Each case calls a real repository method while a ``before_cursor_execute`` listener
records the statements it sends, so the plans checked are those of the statements the
repositories build, not hand-written copies. Each recorded statement is run under
``EXPLAIN ANALYZE`` with its own parameters on another connection (branches that never
ran are left out), and its plan must read no large read-model
table with a ``Seq Scan``, sort no more than ``LARGE_SORT`` rows (an order no index
serves), and use an index. A control case, a filter on an unindexed column, shows the
check rejects what it should.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.passwords import BcryptHasher, hash_token
from domain.permissions import Role, permissions_for
from domain.tasks import Priority, TaskStatus
from eventstore import EngineOptions, create_engine
from projections.query import Page
from projections.readmodels.project_stats import project_stats
from projections.readmodels.projects import project_members, projects_table
from projections.readmodels.sessions import sessions_table
from projections.readmodels.tasks import tasks_table
from projections.readmodels.users import user_permissions, user_roles, users_table
from tests.conftest import PG_URL, _empty_schema
from tiu import DatabaseService, Repositories, Settings
from tiu.models import SessionValidation

pytestmark = pytest.mark.postgres

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
N_USERS = 5_000
N_PROJECTS = 2_000
N_TASKS = 100_000
SESSIONS_PER_USER = 4
MEMBERS_PER_PROJECT = 4
PUBLIC_EVERY = 20  # 5% of projects are public
WORDS = ("Apollo", "Gemini", "Mercury", "Vostok", "Soyuz", "Skylab", "Viking", "Voyager")

#: The read-model tables the API reads; none of them may be read by a Seq Scan.
LARGE_TABLES = frozenset(
    t.name
    for t in (
        users_table,
        user_roles,
        user_permissions,
        projects_table,
        project_members,
        tasks_table,
        sessions_table,
        project_stats,
    )
)


def _id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass(frozen=True)
class Seed:
    """Who acts and what they look up; all of it exists in the filled tables."""

    member: str  # a plain member: owns 3 projects, member of 8 more
    admin: str  # holds projects:read_all
    email: str
    username: str
    project: str  # one of the member's projects
    task: str  # a task in that project
    token: str  # a live session token of the member


async def _populate(engine: AsyncEngine) -> Seed:
    rng = random.Random(6)
    users = [_id(rng) for _ in range(N_USERS)]
    member, admin = users[17], users[42]
    user_rows = []
    for i, user in enumerate(users):
        name = f"user{i:05d}"
        user_rows.append(
            {
                "user_id": user,
                "email": f"{name}@Example.com",
                "email_lower": f"{name}@example.com",
                "username": name,
                "username_lower": name,
                "display_name": f"User {i}",
                "active": i % 50 != 0,
                "failed_logins": 0,
                "created_at": NOW - timedelta(minutes=N_USERS - i),
                "updated_at": NOW,
            }
        )
    admins = {admin, *users[::500]}
    roles = {u: [Role.ADMIN] if u in admins else [Role.MEMBER] for u in users}

    projects = [_id(rng) for _ in range(N_PROJECTS)]
    owners = {p: rng.choice(users) for p in projects}
    for p in projects[:3]:
        owners[p] = member
    members: dict[str, list[str]] = {}
    for p in projects:
        drawn = rng.sample(users, MEMBERS_PER_PROJECT + 1)
        members[p] = [u for u in drawn if u not in (owners[p], member)][:MEMBERS_PER_PROJECT]
    for p in projects[100:108]:
        members[p].append(member)
    project_rows = [
        {
            "project_id": p,
            "name": f"{rng.choice(WORDS)} {i}",
            "description": "",
            "visibility": "public" if i % PUBLIC_EVERY == 7 else "private",
            "owner_id": owners[p],
            "archived": i % 25 == 3,
            "archived_at": NOW if i % 25 == 3 else None,
            "created_at": NOW - timedelta(hours=N_PROJECTS - i),
            "updated_at": NOW,
        }
        for i, p in enumerate(projects)
    ]

    statuses = list(TaskStatus)
    priorities = list(Priority)
    counts = {p: dict.fromkeys(["total", *(s.value for s in statuses)], 0) for p in projects}
    task_rows = []
    for i in range(N_TASKS):
        p = rng.choice(projects)
        status = rng.choice(statuses)
        priority = rng.choice(priorities)
        created = NOW - timedelta(minutes=N_TASKS - i)
        counts[p]["total"] += 1
        counts[p][status.value] += 1
        task_rows.append(
            {
                "task_id": _id(rng),
                "project_id": p,
                "title": f"Task {i}",
                "description": "",
                "status": status.value,
                "priority": priority.value,
                "priority_rank": priority.rank,
                "due_at": created + timedelta(days=rng.randint(-10, 60)) if i % 3 else None,
                "assignee_id": rng.choice([owners[p], *members[p]]) if i % 5 else None,
                "created_by": owners[p],
                "created_at": created,
                "updated_at": created,
                "completed_at": created if status is TaskStatus.DONE else None,
            }
        )
    # The member's project gets tasks of every status, some of them assigned to them.
    for j, status in enumerate(statuses * 4):
        task_rows.append(
            {
                **task_rows[j],
                "task_id": _id(rng),
                "project_id": projects[0],
                "status": status.value,
                "assignee_id": member,
            }
        )
        counts[projects[0]]["total"] += 1
        counts[projects[0]][status.value] += 1

    tokens = {}
    session_rows = []
    for i, user in enumerate(users):
        for k in range(SESSIONS_PER_USER):
            token = f"token-{i}-{k}-{rng.getrandbits(64):x}"
            tokens[(user, k)] = token
            started = NOW - timedelta(hours=SESSIONS_PER_USER - k)
            session_rows.append(
                {
                    "session_id": _id(rng),
                    "user_id": user,
                    "token_hash": hash_token(token),
                    "started_at": started,
                    "expires_at": started + timedelta(hours=12),
                    "last_seen_at": NOW - timedelta(minutes=1),
                    "revoked_at": started if k == 0 else None,
                    "revoked_by": user if k == 0 else None,
                    "revoked_reason": "logout" if k == 0 else None,
                }
            )

    async with engine.begin() as conn:
        await conn.execute(insert(users_table), user_rows)
        await conn.execute(
            insert(user_roles), [{"user_id": u, "role": r.value} for u in users for r in roles[u]]
        )
        await conn.execute(
            insert(user_permissions),
            [
                {"user_id": u, "permission": p.value}
                for u in users
                for p in permissions_for(roles[u])
            ],
        )
        await conn.execute(insert(projects_table), project_rows)
        await conn.execute(
            insert(project_members),
            [
                {"project_id": p, "user_id": u, "role": "editor", "added_at": NOW}
                for p in projects
                for u in members[p]
            ],
        )
        for start in range(0, len(task_rows), 10_000):
            await conn.execute(insert(tasks_table), task_rows[start : start + 10_000])
        await conn.execute(insert(sessions_table), session_rows)
        await conn.execute(
            insert(project_stats),
            [{"project_id": p, **counts[p], "updated_at": NOW} for p in projects],
        )
    await _settle(engine)
    member_row = user_rows[17]
    return Seed(
        member=member,
        admin=admin,
        email=member_row["email"],
        username=member_row["username"].upper(),
        project=projects[0],
        task=task_rows[-1]["task_id"],
        token=tokens[(member, SESSIONS_PER_USER - 1)],
    )


async def _settle(engine: AsyncEngine) -> None:
    """Statistics and the visibility map, as autovacuum keeps them on a live database.

    Every table fits ANALYZE's sample of 30,000 rows, so the statistics (and the plans)
    are the same on every run. VACUUM can mark a page all-visible only once no other
    session's transaction is older than its rows; while one is (another test run on
    this database), wait for it: without the map, index-only scans cost what index
    scans do, and counts over many rows are read from the table instead.
    """
    tables = sorted(LARGE_TABLES)
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f"ANALYZE {', '.join(tables)}"))
        behind: list[str] = []
        for _ in range(40):
            await conn.execute(text(f"VACUUM {', '.join(tables)}"))
            rows = await conn.execute(
                text(
                    "SELECT relname FROM pg_class "
                    "WHERE relnamespace = CAST(current_schema() AS regnamespace) "
                    "AND relname = ANY(:tables) AND relallvisible < relpages"
                ),
                {"tables": tables},
            )
            behind = list(rows.scalars())
            if not behind:
                return
            await asyncio.sleep(0.5)
    pytest.fail(f"VACUUM could not mark every page of {behind} all-visible in 20 s")


# -- the cases: each calls one repository method as the API would ----------------------

Call = Callable[[Repositories, Seed, Any], Awaitable[Any]]


def _cursor_after(page: Callable[[Repositories], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A ``prepare`` step: the cursor after the first page, for a keyset second page."""

    async def first(repos: Repositories, _seed: Seed) -> str:
        cursor = (await page(repos)).next_cursor
        assert cursor is not None, "the first page should not be the last"
        return cursor

    return first


@dataclass(frozen=True)
class Case:
    name: str
    actor: str  # "member" (a plain member), "admin" (projects:read_all) or "anonymous"
    call: Call
    #: Run before ``call``, unrecorded; what it returns is ``call``'s third argument.
    prepare: Callable[[Repositories, Seed], Awaitable[Any]] | None = None
    #: Large tables this query may read sequentially, and why no index can serve it.
    seq_scan_allowed: frozenset[str] = frozenset()
    why: str = ""


CASES = (
    Case("users.get_by_id", "member", lambda r, s, _: r.users.get_by_id(s.member)),
    Case("users.get_by_email", "member", lambda r, s, _: r.users.get_by_email(s.email)),
    Case("users.get_by_username", "member", lambda r, s, _: r.users.get_by_username(s.username)),
    Case("users.list_users(active)", "admin", lambda r, s, _: r.users.list_users({"active": True})),
    Case(
        "users.count_users(created_at__gte)",
        "admin",
        lambda r, s, _: r.users.count_users({"created_at__gte": NOW - timedelta(days=1)}),
    ),
    Case("projects.get_project", "member", lambda r, s, _: r.projects.get_project(s.project)),
    Case("projects.get_user_projects", "member", lambda r, s, _: r.projects.get_user_projects()),
    Case("projects.search_projects", "member", lambda r, s, _: r.projects.search_projects()),
    Case(
        "projects.search_projects(archived)",
        "member",
        lambda r, s, _: r.projects.search_projects(filters={"archived": False}),
    ),
    Case(
        "projects.search_projects(text)",
        "member",
        lambda r, s, _: r.projects.search_projects("apollo"),
        seq_scan_allowed=frozenset({"projects"}),
        why="a substring match (ILIKE '%text%') cannot be looked up in a btree; the planner "
        "walks ix_projects_name_project_id in name order or reads projects and sorts the "
        "matches, by its guess of how many match (pg_trgm would be needed)",
    ),
    Case("projects.page_projects", "member", lambda r, s, _: r.projects.page_projects(limit=20)),
    Case(
        "projects.page_projects(after)",
        "member",
        lambda r, s, cursor: r.projects.page_projects(after=cursor, limit=20),
        prepare=_cursor_after(lambda r: r.projects.page_projects(limit=20)),
    ),
    Case("projects.page_projects as admin", "admin", lambda r, s, _: r.projects.page_projects()),
    Case("projects.get_members", "member", lambda r, s, _: r.projects.get_members(s.project)),
    Case(
        "projects.get_project_statistics",
        "member",
        lambda r, s, _: r.projects.get_project_statistics(s.project),
    ),
    Case("tasks.get_task", "member", lambda r, s, _: r.tasks.get_task(s.task)),
    Case("tasks.list_tasks", "member", lambda r, s, _: r.tasks.list_tasks()),
    Case(
        "tasks.list_tasks(project_id, status)",
        "member",
        lambda r, s, _: r.tasks.get_project_tasks(s.project, status="todo"),
    ),
    Case("tasks.list_tasks(assignee_id)", "member", lambda r, s, _: r.tasks.get_user_tasks()),
    Case(
        "tasks.get_overdue_tasks(project_id)",
        "member",
        lambda r, s, _: r.tasks.get_overdue_tasks(s.project),
    ),
    Case(
        "tasks.page_tasks(status)",
        "member",
        lambda r, s, _: r.tasks.page_tasks({"status": "in_progress"}),
    ),
    Case(
        "tasks.page_tasks(status, after)",
        "member",
        lambda r, s, cursor: r.tasks.page_tasks({"status": "in_progress"}, after=cursor),
        prepare=_cursor_after(lambda r: r.tasks.page_tasks({"status": "in_progress"})),
    ),
    Case(
        "tasks.page_tasks as admin",
        "admin",
        lambda r, s, _: r.tasks.page_tasks(),
    ),
    Case(
        "tasks.page_tasks(after) as admin",
        "admin",
        lambda r, s, cursor: r.tasks.page_tasks(after=cursor),
        prepare=_cursor_after(lambda r: r.tasks.page_tasks()),
    ),
    Case("tasks.count_tasks", "member", lambda r, s, _: r.tasks.count_tasks()),
    Case(
        "tasks.count_tasks(status)",
        "member",
        lambda r, s, _: r.tasks.count_tasks({"status": "done"}),
    ),
    Case(
        "tasks.count_tasks(project_id)",
        "member",
        lambda r, s, _: r.tasks.count_tasks({"project_id": s.project}),
    ),
    Case(
        "sessions.validate_session",
        "anonymous",
        lambda r, s, _: r.sessions.validate_session(s.token, touch=False),
    ),
    Case(
        "sessions.get_user_sessions",
        "member",
        lambda r, s, _: r.sessions.get_user_sessions(s.member),
    ),
)

#: A query no index serves (there is none on tasks.title): the check must reject its plan.
CONTROL = Case(
    "tasks.list_tasks(title) as admin",
    "admin",
    lambda r, s, _: r.tasks.list_tasks({"title": "Task 12345"}),
)


def _found(result: Any) -> bool:
    """Whether a case's call found something: a plan for "nothing there" proves little."""
    if isinstance(result, Page):
        return bool(result.items)
    if isinstance(result, SessionValidation):
        return result.valid
    if isinstance(result, int | list):
        return bool(result)
    return result is not None


@dataclass(frozen=True)
class Explained:
    sql: str
    nodes: list[dict[str, Any]]


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's nodes that ran: a branch never executed (``Actual Loops`` 0, e.g.
    under a one-time filter that was false) reads nothing and is left out."""
    if plan.get("Actual Loops") == 0:
        return []
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


async def _explain_cases(engine: AsyncEngine, seed: Seed) -> dict[str, list[Explained]]:
    """Each case's statements, as the repository sent them, with their plans."""
    service = DatabaseService(
        Settings(database_url=PG_URL, bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=lambda: NOW,
    )
    actors = {"member": seed.member, "admin": seed.admin, "anonymous": None}
    out: dict[str, list[Explained]] = {}
    for case in (*CASES, CONTROL):
        sent: list[tuple[str, Any]] = []

        def record(_conn, _cursor, statement, parameters, _context, _many, sent=sent):
            sent.append((statement, parameters))

        async with service.get_repositories(actors[case.actor]) as repos:
            state = await case.prepare(repos, seed) if case.prepare is not None else None
            event.listen(engine.sync_engine, "before_cursor_execute", record)
            try:
                result = await case.call(repos, seed, state)
            finally:
                event.remove(engine.sync_engine, "before_cursor_execute", record)
        assert case is CONTROL or _found(result), f"{case.name} found nothing: {result!r}"
        explained = []
        async with engine.connect() as conn:
            for statement, parameters in sent:
                assert statement.lstrip().upper().startswith("SELECT"), statement
                doc = (
                    await conn.exec_driver_sql(
                        "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters
                    )
                ).scalar()
                doc = json.loads(doc) if isinstance(doc, str) else doc
                explained.append(Explained(statement, _nodes(doc[0]["Plan"])))
        out[case.name] = explained
    return out


@pytest.fixture(scope="module")
def plans(pg_schema: str) -> dict[str, list[Explained]]:
    """Fill the session's PostgreSQL schema once for the module, explain every case."""

    async def explain_all() -> dict[str, list[Explained]]:
        engine = create_engine(PG_URL, EngineOptions(search_path=pg_schema))
        try:
            await _empty_schema(engine, pg_schema)
            seed = await _populate(engine)
            return await _explain_cases(engine, seed)
        finally:
            await _empty_schema(engine, pg_schema)
            await engine.dispose()

    return asyncio.run(explain_all())


# -- the check ---------------------------------------------------------------------------

#: A Sort of more rows than this feeding a short page means no index serves the order.
LARGE_SORT = 1_000


def _describe(node: dict[str, Any]) -> str:
    kind = node["Node Type"]
    if "Index Name" in node:
        kind += f" using {node['Index Name']}"
    if "Relation Name" in node:
        kind += f" on {node['Relation Name']}"
    if "Sort Key" in node:
        kind += f" by {', '.join(node['Sort Key'])}"
    return f"{kind} (rows={node.get('Plan Rows')})"


def plan_problems(
    nodes: list[dict[str, Any]], seq_scan_allowed: frozenset[str] = frozenset()
) -> list[str]:
    """What is wrong with one plan: empty when it reads the large tables through indexes."""
    problems = [
        f"Seq Scan on {n['Relation Name']}"
        for n in nodes
        if n["Node Type"] == "Seq Scan"
        and n.get("Relation Name") in LARGE_TABLES - seq_scan_allowed
    ]
    problems += [
        f"Sort of {n['Plan Rows']} rows by {', '.join(n['Sort Key'])}"
        for n in nodes
        if n["Node Type"] == "Sort" and n["Plan Rows"] > LARGE_SORT
    ]
    if not any("Index Name" in n for n in nodes):
        problems.append("no index used")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_repository_query_reads_through_an_index(plans, case):
    assert bool(case.seq_scan_allowed) == bool(case.why), "an allowed Seq Scan needs a reason"
    statements = plans[case.name]
    assert statements, f"{case.name} sent no statement"
    for explained in statements:
        problems = plan_problems(explained.nodes, case.seq_scan_allowed)
        assert not problems, (
            f"{case.name}: {'; '.join(problems)}\n{explained.sql}\nplan:\n"
            + "\n".join("  " + _describe(n) for n in explained.nodes)
        )


def test_the_plan_check_rejects_a_query_no_index_serves(plans):
    """The harness itself: a filter on an unindexed column must fail the check."""
    found = [plan_problems(explained.nodes) for explained in plans[CONTROL.name]]
    assert any("Seq Scan on tasks" in problems for problems in found), found
