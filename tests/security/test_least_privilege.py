"""sql/app_role.sql gives the application INSERT and SELECT on `events`, never UPDATE
or DELETE, and everything the service needs besides."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from domain.passwords import BcryptHasher
from eventstore import EngineOptions, EventStore, create_engine
from migrations import runner
from projections import replay
from projections.readmodels import ALL_PROJECTORS
from tests.conftest import PG_URL
from tiu import DatabaseService, Settings

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(shutil.which("psql") is None, reason="needs psql"),
]


@pytest.fixture
async def app_role_schema(pg_schema):  # pg_schema: skips or fails like every PG test
    schema = f"tiu_priv_{secrets.token_hex(4)}"
    role = f"tiu_app_{secrets.token_hex(4)}"
    admin = create_engine(PG_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    owner = create_engine(PG_URL, EngineOptions(search_path=schema))
    await runner.upgrade(owner)
    await owner.dispose()
    url = make_url(PG_URL)
    done = subprocess.run(
        [
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432),
            "-U", url.username or "postgres", "-d", url.database or "test",
            "-v", f"app={role}", "-v", f"schema={schema}",
            "-f", str(ROOT / "sql" / "app_role.sql"),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    yield schema, role
    async with admin.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
    await admin.dispose()


async def test_the_app_role_appends_and_reads_but_cannot_change_the_log(app_role_schema):
    schema, role = app_role_schema
    url = make_url(PG_URL).set(username=role)
    engine = create_engine(url, replace(EngineOptions(), search_path=schema))
    service = DatabaseService(
        Settings(database_url=str(url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
    )
    try:
        await service.start(migrate=False)
        async with service.get_repositories() as repos:
            user = await repos.users.create_user(
                email="app@example.com", username="approle", password="violet-harbour-lantern-42"
            )
        async with service.get_repositories(actor_id=user.id) as repos:
            project = await repos.projects.create_project("Least privilege")
            await repos.tasks.create_task(project.id, "Works as the app role")
            await repos.sessions.create_session("app@example.com", "violet-harbour-lantern-42")
        for statement in (
            "UPDATE events SET event_type = 'Forged'",
            "DELETE FROM events",
            "TRUNCATE events",
        ):
            with pytest.raises(Exception, match="permission denied"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
        assert (await service.get_statistics())["head_position"] >= 4
        # An operator's replay (as the owner) swaps in new read-model tables; the app
        # role must keep its privileges on them.
        owner = create_engine(PG_URL, EngineOptions(search_path=schema))
        owner_store = EventStore(owner)
        await replay.rebuild_all(owner_store, ALL_PROJECTORS)
        await owner_store.aclose()
        await owner.dispose()
        async with service.get_repositories(actor_id=user.id) as repos:
            assert await repos.tasks.create_task(project.id, "After the replay")
            assert len(await repos.tasks.get_project_tasks(project.id)) == 2
    finally:
        await service.store.aclose()
        await engine.dispose()
