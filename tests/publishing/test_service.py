"""``run_publisher=True``: the service publishes its commands' events and reports the
publisher in ``health_check`` and ``get_statistics``; closing it awaits the acks."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.passwords import BcryptHasher
from projections.publishing import PublishError
from tests.conftest import PASSWORD
from tests.publishing.support import JetStreamTarget, check_delivery
from tests.publishing.test_publisher import head_of, log_of, until
from tiu import DatabaseService, Settings


async def test_a_service_with_run_publisher_publishes_its_events_and_reports_lag(
    engine: AsyncEngine, jetstream: JetStreamTarget
) -> None:
    settings = Settings(
        database_url=str(engine.url),
        bcrypt_rounds=4,
        run_publisher=True,
        publish_stream=jetstream.stream,
        publish_subject_prefix=jetstream.prefix,
        publish_checkpoint_interval=0.05,
    )
    service = DatabaseService(settings, engine=engine, hasher=BcryptHasher(rounds=4))
    await service.start(migrate=False)
    try:
        async with service.get_repositories() as repos:
            user = await repos.get_user_repository().create_user(
                email="grace@example.com", username="grace", password=PASSWORD
            )
        async with service.get_repositories(actor_id=user.id) as repos:
            project = await repos.get_project_repository().create_project("Compiler", "A-0")
            await repos.get_task_repository().create_task(project.id, "Write the linker")
        head = await head_of(service.store)

        async def caught_up() -> bool:
            return (await service.health_check())["publishers"]["default"]["lag_events"] == 0

        await until(caught_up)
        health = (await service.health_check())["publishers"]["default"]
        assert health["connected"] is True
        assert health["position"] == health["checkpoint"] == head
        assert health["lag_seconds"] == 0
        stats = await service.get_statistics()
        assert stats["publishers"]["default"]["lag_events"] == 0
        records = await log_of(service.store)
    finally:
        await service.aclose()  # stops the publisher first; the fixture's engine is disposed twice
    assert check_delivery(await jetstream.messages(), records) == []


async def test_invalid_stream_settings_are_a_typed_error_at_start(engine: AsyncEngine) -> None:
    settings = Settings(
        database_url=str(engine.url),
        run_publisher=True,
        publish_stream_config={"no_such_field": 1},
    )
    service = DatabaseService(settings, engine=engine, hasher=BcryptHasher(rounds=4))
    try:
        with pytest.raises(PublishError, match="invalid stream_config"):
            await service.start(migrate=False)
    finally:
        await service.aclose()


@pytest.mark.sqlite
async def test_health_reports_a_failed_publisher_lag_query_as_data(sqlite_engine: AsyncEngine):
    service = DatabaseService(
        Settings(database_url=str(sqlite_engine.url)),
        engine=sqlite_engine,
        hasher=BcryptHasher(rounds=4),
    )
    await service.start(migrate=False)
    try:
        async with sqlite_engine.begin() as conn:
            await conn.execute(text("DROP TABLE projection_checkpoints"))
        health = await service.health_check()
    finally:
        await service.aclose()
    assert health["healthy"] is True
    assert health["publishers"] == {}
    assert "projection_checkpoints" in health["publishers_error"]
