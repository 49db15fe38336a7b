"""A command's write: on PostgreSQL its read-model rows, idempotency record, append and
checkpoint move are one statement after its load; on SQLite the heads of its streams and
the log's position are one statement under the write lock; on every backend a row its
inline projector cannot write refuses the command, naming the projector, and leaves
nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from asyncpg.connection import Connection
from asyncpg.prepared_stmt import PreparedStatement
from pydantic import SecretStr
from sqlalchemy import event, text

from domain import projects, tasks, users
from projections.errors import ProjectionFailed
from tests.conftest import PASSWORD

pytestmark = pytest.mark.least_privilege


async def _owner_and_project(service: Any) -> tuple[str, str]:
    owner, project = uuid.uuid4().hex, uuid.uuid4().hex
    await service.dispatch(
        users.RegisterUser(
            user_id=owner,
            email="owner@example.com",
            username="owner",
            password=SecretStr(PASSWORD),
        )
    )
    await service.dispatch(
        projects.CreateProject(project_id=project, name="P"), service.context(owner)
    )
    return owner, project


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements sent to PostgreSQL, each a round trip (asyncpg's calls)."""
    sent: list[str] = []

    def counting(cls: type, name: str) -> None:
        original = getattr(cls, name)

        async def sending(self: Any, *args: Any, **kwargs: Any) -> Any:
            query = self.get_query() if isinstance(self, PreparedStatement) else args[0]
            sent.append(" ".join(str(query).split())[:60])
            return await original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, sending)

    for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        counting(Connection, name)
    for name in ("fetch", "fetchrow", "fetchval", "executemany"):
        counting(PreparedStatement, name)
    return sent


async def test_on_postgresql_a_command_is_its_load_and_one_statement(service, statements):
    """Its load is left out where the command minted its ids and the states it reads
    are kept: then it is one statement."""
    if service.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no round trips to save")
    owner, project = await _owner_and_project(service)
    await service.dispatch(  # the owner's and the project's states are kept from here on
        tasks.CreateTask(project_id=project, title="first"), service.context(owner)
    )
    await asyncio.sleep(0.1)  # the wake-up NOTIFY that follows a commit has gone
    statements.clear()
    given = await service.dispatch(
        tasks.CreateTask(
            command_id=uuid.uuid4().hex, task_id="given", project_id=project, title="given"
        ),
        service.context(owner),
    )
    sent = [s for s in statements if "pg_notify" not in s]  # its own wake-up, if sent yet
    assert len(sent) == 2, sent
    assert sent[1].startswith("SELECT * FROM tiu_command(")
    assert given.version == 1
    await asyncio.sleep(0.1)
    statements.clear()
    result = await service.dispatch(
        tasks.CreateTask(project_id=project, title="second"), service.context(owner)
    )
    sent = [s for s in statements if "pg_notify" not in s]
    assert len(sent) == 1, sent
    assert sent[0].startswith("SELECT * FROM tiu_command(")
    async with service.engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT title FROM tasks WHERE task_id = :id"),
                {"id": result.stream_id.removeprefix("task-")},
            )
        ).one()
        stats = (
            await conn.execute(
                text("SELECT total, todo FROM project_stats WHERE project_id = :id"),
                {"id": project},
            )
        ).one()
        done = await conn.scalar(
            text("SELECT count(*) FROM processed_commands WHERE stream_id = :s"),
            {"s": result.stream_id},
        )
        checkpoint = await conn.scalar(
            text("SELECT min(position) FROM projection_checkpoints WHERE active")
        )
    assert row.title == "second"
    assert tuple(stats) == (3, 3)
    assert done == 1
    assert checkpoint == result.position


@pytest.fixture
def sqlite_statements(service: Any) -> Iterator[list[str]]:
    """The statements SQLite runs for the service (its trace callback on every
    connection checked out), BEGIN and COMMIT included."""
    if service.engine.dialect.name != "sqlite":
        pytest.skip("SQLite's statements")
    sent: list[str] = []

    def trace(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        dbapi_connection.driver_connection.set_trace_callback(
            lambda sql: sent.append(" ".join(sql.split())[:60])
        )

    event.listen(service.engine.sync_engine, "checkout", trace)
    yield sent
    event.remove(service.engine.sync_engine, "checkout", trace)


async def test_on_sqlite_a_command_reads_its_heads_and_the_position_in_one_statement(
    service, sqlite_statements
):
    """Under BEGIN IMMEDIATE a CreateTask checks the versions of the three streams it
    read and finds the log's position in one statement, which the append then uses as
    it is: BEGIN, that read, the writes (the idempotency record, three read-model
    rows, the event, the checkpoints) and COMMIT, nine statements; no load before,
    since the command minted its ids and the other states are kept."""
    owner, project = await _owner_and_project(service)
    await service.dispatch(  # the owner's and the project's states are kept from here on
        tasks.CreateTask(project_id=project, title="first"), service.context(owner)
    )
    sqlite_statements.clear()
    result = await service.dispatch(
        tasks.CreateTask(project_id=project, title="second"), service.context(owner)
    )
    sent = sqlite_statements
    begin, commit = sent.index("BEGIN IMMEDIATE"), sent.index("COMMIT")
    under_lock = sent[begin + 1 : commit]
    reads = [s for s in under_lock if s.startswith("SELECT")]
    assert len(reads) == 1, sent
    assert "max(position)" in reads[0]
    assert len(sent) == 9, sent
    assert sent[2].startswith("INSERT INTO processed_commands")
    async with service.engine.connect() as conn:
        position = await conn.scalar(
            text("SELECT position FROM events WHERE stream_id = :s"), {"s": result.stream_id}
        )
    assert position == result.position


async def test_on_postgresql_a_bulk_call_writes_all_its_commands_in_one_statement(
    service, statements
):
    """Each command of a multi-command unit loads what it decides on, but the rows the
    commands before it hold back are not sent for that (a load reads none of them):
    every row goes with the append."""
    if service.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no round trips to save")
    owner, project = await _owner_and_project(service)
    async with service.get_repositories(actor_id=owner) as repos:
        task_repo = repos.get_task_repository()
        await task_repo.create_tasks([{"project_id": project, "title": "first"}])
        await asyncio.sleep(0.1)  # the wake-up NOTIFY that follows a commit has gone
        statements.clear()
        created = await task_repo.create_tasks(
            [{"project_id": project, "title": f"t{n}"} for n in range(4)]
        )
    sent = [s for s in statements if "pg_notify" not in s]
    writes = [s for s in sent if s.startswith(("INSERT", "UPDATE", "DELETE"))]
    assert writes == [], sent
    assert [s for s in sent if "tiu_command" in s] == [sent[4]], sent
    assert [t.title for t in created if t is not None] == ["t0", "t1", "t2", "t3"]


async def test_a_row_an_inline_projector_cannot_write_refuses_the_command_naming_it(service):
    owner, project = await _owner_and_project(service)
    task_id = uuid.uuid4().hex
    async with service.engine.begin() as conn:  # a row the log knows nothing of
        await conn.execute(
            text(
                "INSERT INTO tasks (task_id, project_id, title, description, status, "
                "priority, priority_rank, created_by, created_at, updated_at) VALUES "
                "(:id, :project, 'stray', '', 'todo', 'medium', 2, :owner, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            {"id": task_id, "project": project, "owner": owner},
        )
    command = tasks.CreateTask(task_id=task_id, project_id=project, title="clash")
    with pytest.raises(ProjectionFailed) as failed:
        await service.dispatch(command, service.context(owner))
    assert failed.value.name == "tasks"
    assert failed.value.event_type == "TaskCreated"
    async with service.engine.connect() as conn:
        appended = await conn.scalar(
            text("SELECT count(*) FROM events WHERE stream_id = :s"), {"s": f"task-{task_id}"}
        )
        remembered = await conn.scalar(
            text("SELECT count(*) FROM processed_commands WHERE command_id = :c"),
            {"c": command.command_id},
        )
        total = await conn.scalar(
            text("SELECT total FROM project_stats WHERE project_id = :id"), {"id": project}
        )
    assert (appended, remembered, total) == (0, 0, 0)
    async with service.engine.begin() as conn:
        await conn.execute(text("DELETE FROM tasks WHERE task_id = :id"), {"id": task_id})
    resent = await service.dispatch(command, service.context(owner))  # not remembered
    assert not resent.duplicate
    assert resent.version == 1
