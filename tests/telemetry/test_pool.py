"""The pool gauges on both backends: connections in use and idle (the pool's public
status) and requests waiting for one (counted by the engine's pool)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore import EngineOptions, telemetry
from tests.telemetry.support import Telemetry


@pytest.fixture
def engine_options() -> EngineOptions:
    return EngineOptions(pool_size=1, max_overflow=0, pool_timeout=10)


def _pool(otel: Telemetry, engine: AsyncEngine) -> dict[str, int]:
    name = telemetry._pool_name(engine)
    found = {"used": 0, "idle": 0, "pending": 0}
    for metric, key in (
        ("db.client.connection.count", None),
        ("db.client.connection.pending_requests", "pending"),
    ):
        for point in otel.points(metric):
            if point.attributes["db.client.connection.pool.name"] == name:
                found[key or point.attributes["db.client.connection.state"]] = point.value
    return found


async def test_connections_in_use_idle_and_requests_waiting_for_one_are_reported(
    engine: AsyncEngine, otel: Telemetry
):
    telemetry.watch_pool(engine)
    async with engine.connect():
        pass  # one connection opened and back in the pool
    before = _pool(otel, engine)
    held = await engine.connect()
    waiter = asyncio.ensure_future(engine.connect())
    for _ in range(200):
        if _pool(otel, engine)["pending"] > before["pending"]:
            break
        await asyncio.sleep(0.01)
    waiting = _pool(otel, engine)
    assert waiting["pending"] == before["pending"] + 1
    assert waiting["used"] == before["used"] + 1
    assert waiting["idle"] == before["idle"] - 1
    await held.close()
    second = await waiter
    assert _pool(otel, engine)["pending"] == before["pending"]
    assert _pool(otel, engine)["used"] == before["used"] + 1
    await second.close()
    assert _pool(otel, engine) == before
