"""Case 6: repository queries on 100,000 tasks vs hand-written SQLAlchemy Core.

The read models are filled directly (bulk inserts; this case measures reads). The
caller is a plain member of 10 of the 100 projects, so tiu's access-control
predicate (public, owned, or member-of) is in every task query; the hand-written
Core queries ("raw" in the table) carry the same predicate, so both return the
same rows. eventsourcing has no query layer: no row for it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, tuple_

from bench.common import Place, Result, summarise, timed
from bench.context import Context
from domain.passwords import BcryptHasher
from domain.permissions import Role, permissions_for
from eventstore.engine import gather_statistics
from projections.readmodels.projects import project_members, projects_table
from projections.readmodels.sessions import sessions_table
from projections.readmodels.tasks import tasks_table
from projections.readmodels.users import user_permissions, user_roles, users_table
from tiu import DatabaseService, Settings

STATUSES = ("todo", "in_progress", "review", "done", "cancelled")
PRIORITIES = (("low", 1), ("medium", 2), ("high", 3), ("urgent", 4))
PAGES = 5


async def _populate(service: DatabaseService, n_tasks: int) -> dict[str, Any]:
    rng = random.Random(6)
    now = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    users = [f"u{i:04d}" for i in range(50)]
    actor = users[0]
    projects = [f"p{i:04d}" for i in range(100)]
    mine = projects[:10]
    tokens = [f"token-{i}-{rng.getrandbits(64):x}" for i in range(1000)]
    async with service.engine.begin() as conn:
        await conn.execute(
            insert(users_table),
            [
                {
                    "user_id": u,
                    "email": f"{u}@example.com",
                    "email_lower": f"{u}@example.com",
                    "username": u,
                    "username_lower": u,
                    "display_name": u,
                    "active": True,
                    "failed_logins": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for u in users
            ],
        )
        await conn.execute(insert(user_roles), [{"user_id": u, "role": "member"} for u in users])
        await conn.execute(
            insert(user_permissions),
            [
                {"user_id": u, "permission": str(p)}
                for u in users
                for p in permissions_for([Role.MEMBER])
            ],
        )
        await conn.execute(
            insert(projects_table),
            [
                {
                    "project_id": p,
                    "name": f"Project {p}",
                    "description": "",
                    "visibility": "private",
                    "owner_id": users[1 + i % 49],
                    "archived": False,
                    "created_at": now,
                    "updated_at": now,
                }
                for i, p in enumerate(projects)
            ],
        )
        await conn.execute(
            insert(project_members),
            [{"project_id": p, "user_id": actor, "role": "editor", "added_at": now} for p in mine],
        )
        rows = []
        for i in range(n_tasks):
            priority, rank = rng.choice(PRIORITIES)
            created = now + timedelta(seconds=i)
            rows.append(
                {
                    "task_id": f"t{i:07d}",
                    "project_id": projects[i % len(projects)],
                    "title": f"Task {i}",
                    "description": "",
                    "status": rng.choice(STATUSES),
                    "priority": priority,
                    "priority_rank": rank,
                    "due_at": created + timedelta(days=rng.randint(1, 90)),
                    "assignee_id": rng.choice(users),
                    "created_by": users[1 + i % 49],
                    "created_at": created,
                    "updated_at": created,
                }
            )
            if len(rows) == 5000:
                await conn.execute(insert(tasks_table), rows)
                rows = []
        if rows:
            await conn.execute(insert(tasks_table), rows)
        await conn.execute(
            insert(sessions_table),
            [
                {
                    "session_id": f"s{i:05d}",
                    "user_id": users[i % len(users)],
                    "token_hash": hashlib.sha256(t.encode()).hexdigest(),
                    "started_at": now,
                    "expires_at": now + timedelta(days=3650),
                    "last_seen_at": now,
                }
                for i, t in enumerate(tokens)
            ],
        )
    return {"actor": actor, "project": mine[3], "tokens": tokens, "now": now}


def _visible(actor: str) -> Any:
    member_of = select(project_members.c.project_id).where(project_members.c.user_id == actor)
    projects = select(projects_table.c.project_id).where(
        or_(
            projects_table.c.visibility == "public",
            projects_table.c.owner_id == actor,
            projects_table.c.project_id.in_(member_of),
        )
    )
    return tasks_table.c.project_id.in_(projects)


async def _runs(query: Callable[[], Awaitable[None]], k: int) -> AsyncIterator[float]:
    """Timed runs of ``k`` calls of ``query``, warmed once first (caches, compiled SQL)."""
    await query()

    async def go() -> None:
        for _ in range(k):
            await query()

    while True:
        yield await timed(go)


async def case6(ctx: Context) -> list[Result]:
    n_tasks = 100_000
    k = 50 if ctx.cfg.quick else 200
    await ctx.fresh(migrate=())
    place: Place = ctx.place("tiu")
    service = DatabaseService(
        Settings(database_url=place.url(), bcrypt_rounds=4),
        engine=place.engine(),
        hasher=BcryptHasher(rounds=4),
        clock=lambda: datetime(2026, 3, 1, 9, 5, tzinfo=UTC),
    )
    await service.start(migrate=True)
    out: list[Result] = []
    try:
        seed = await _populate(service, n_tasks)
        # Read models filled beside the log, as a bulk import would fill them: so their
        # statistics are gathered as after one (tiu gathers them as its log grows).
        await gather_statistics(service.engine)
        actor, project, tokens = seed["actor"], seed["project"], seed["tokens"]
        visible = _visible(actor)
        engine = service.engine

        async def tiu_list() -> None:
            async with service.get_repositories(actor) as repos:
                rows = await repos.tasks.list_tasks(
                    {"project_id": project, "status": "todo"}, order_by=("created_at",), limit=50
                )
                assert rows

        async def core_list() -> None:
            async with engine.connect() as conn:
                stmt = (
                    select(*tasks_table.c)
                    .where(
                        visible, tasks_table.c.project_id == project, tasks_table.c.status == "todo"
                    )
                    .order_by(tasks_table.c.created_at, tasks_table.c.task_id)
                    .limit(50)
                )
                rows = (await conn.execute(stmt)).mappings().all()
                assert rows

        async def tiu_pages() -> None:
            async with service.get_repositories(actor) as repos:
                cursor = None
                for _ in range(PAGES):
                    page = await repos.tasks.page_tasks(
                        {"status": "in_progress"}, order_by=("created_at",), after=cursor, limit=100
                    )
                    cursor = page.next_cursor
                    assert cursor

        async def core_pages() -> None:
            async with engine.connect() as conn:
                after: tuple[Any, Any] | None = None
                for _ in range(PAGES):
                    conds = [visible, tasks_table.c.status == "in_progress"]
                    if after is not None:
                        conds.append(
                            tuple_(tasks_table.c.created_at, tasks_table.c.task_id) > tuple_(*after)
                        )
                    stmt = (
                        select(*tasks_table.c)
                        .where(and_(*conds))
                        .order_by(tasks_table.c.created_at, tasks_table.c.task_id)
                        .limit(101)
                    )
                    rows = (await conn.execute(stmt)).mappings().all()
                    last = rows[99]
                    after = (last["created_at"], last["task_id"])

        async def tiu_count() -> None:
            async with service.get_repositories(actor) as repos:
                assert await repos.tasks.count_tasks({"status": "done"}) > 0

        async def core_count() -> None:
            async with engine.connect() as conn:
                stmt = (
                    select(func.count())
                    .select_from(tasks_table)
                    .where(visible, tasks_table.c.status == "done")
                )
                assert (await conn.execute(stmt)).scalar_one() > 0

        rng = random.Random(9)

        async def tiu_session() -> None:
            async with service.get_repositories() as repos:
                result = await repos.sessions.validate_session(rng.choice(tokens), touch=False)
                assert result.valid, result

        async def core_session() -> None:
            token_hash = hashlib.sha256(rng.choice(tokens).encode()).hexdigest()
            async with engine.connect() as conn:
                row = (
                    (
                        await conn.execute(
                            select(
                                sessions_table,
                                users_table.c.active,
                                users_table.c.sessions_valid_after,
                            )
                            .join(users_table, users_table.c.user_id == sessions_table.c.user_id)
                            .where(sessions_table.c.token_hash == token_hash)
                        )
                    )
                    .mappings()
                    .first()
                )
                assert row is not None
                assert row["revoked_at"] is None
                await conn.execute(
                    select(user_permissions.c.permission).where(
                        user_permissions.c.user_id == row["user_id"]
                    )
                )
                await conn.execute(
                    select(user_roles.c.role).where(user_roles.c.user_id == row["user_id"])
                )

        pairs: list[tuple[str, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = [
            ("6a query: filtered list (project+status, 50 rows)", tiu_list, core_list),
            (f"6b query: keyset pages ({PAGES} x 100 rows)", tiu_pages, core_pages),
            ("6c query: count (status)", tiu_count, core_count),
            ("6d query: validate session by token", tiu_session, core_session),
        ]
        for label, tiu_fn, core_fn in pairs:
            t, r = await ctx.take_turns(label, _runs(tiu_fn, k), _runs(core_fn, k))
            out.append(summarise(label, ctx.backend, "tiu", t, k, "ops/s", "repository"))
            note = "hand-written SQLAlchemy Core"
            out.append(summarise(label, ctx.backend, "raw", r, k, "ops/s", note))
    finally:
        await service.aclose()
    return out
