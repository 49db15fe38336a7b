"""The function behind ``tiu forget USER``."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from domain.base import ERASED
from domain.permissions import SYSTEM_ACTOR
from tests.conftest import PASSWORD
from tiu import NotFound, Settings
from tiu.privacy import OVERWRITTEN_TABLES, forget, forget_with_settings


async def test_forget_by_email_then_by_id_again(service):
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        user = await repos.users.create_user(
            email="carol@example.org", username="carol", password=PASSWORD
        )
    report = await forget(service, "Carol@Example.org")
    assert (report.user_id, report.forgotten) == (user.id, True)
    assert "forgot user" in report.describe()
    again = await forget(service, user.id)
    assert again.as_dict() == {"user_id": user.id, "forgotten": False, "reclaimed": None}
    with pytest.raises(NotFound):
        await forget(service, "carol@example.org")  # the email is no longer on record
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        assert (await repos.users.get_by_id(user.id)).email == ERASED


async def test_forget_with_vacuum_removes_the_old_row_versions(service, engine):
    """PostgreSQL: every table forgetting overwrote is rewritten into a new file (VACUUM
    FULL), so its dead tuples are gone; SQLite: the WAL is checkpointed and emptied."""
    async with service.get_repositories() as repos:
        user = await repos.users.create_user(
            email="dora@example.org", username="dora", password=PASSWORD
        )
    postgres = engine.dialect.name == "postgresql"

    async def files() -> dict[str, int]:
        async with engine.connect() as conn:
            return {
                table: await conn.scalar(text(f"SELECT pg_relation_filenode('{table}')"))
                for table in OVERWRITTEN_TABLES
            }

    before = await files() if postgres else {}
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    if postgres:
        async with engine.connect() as conn:
            schema = await conn.scalar(text("SELECT current_schema()"))
        settings = settings.model_copy(update={"search_path": schema})
    report = await forget_with_settings(settings, user.id, vacuum=True)
    assert report.forgotten
    assert report.reclaimed is not None
    if postgres:
        after = await files()
        assert all(after[table] != before[table] for table in OVERWRITTEN_TABLES), after
        assert report.reclaimed.startswith("VACUUM FULL")
    else:
        assert report.reclaimed == "WAL checkpointed and truncated"
        assert _size(Path(f"{engine.url.database}-wal")) == 0


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
