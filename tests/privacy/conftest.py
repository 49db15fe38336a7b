from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.passwords import BcryptHasher
from tests.tiu.conftest import Clock
from tiu import DatabaseService, Settings


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def service(engine: AsyncEngine, clock: Clock) -> AsyncIterator[DatabaseService]:
    svc = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )
    await svc.start(migrate=False)
    yield svc
    await svc.store.aclose()  # the engine fixture disposes the engine
