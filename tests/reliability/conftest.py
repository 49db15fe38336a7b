from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.passwords import BcryptHasher
from tiu import DatabaseService, Settings

PASSWORD = "violet-harbour-lantern-42"


class Clock:
    """A settable clock for the service: time moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


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
