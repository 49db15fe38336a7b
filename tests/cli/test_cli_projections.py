"""tiu projections retry / skip, and parked projectors in tiu stats and tiu health."""

from __future__ import annotations

import asyncio
import json

from eventstore import EngineOptions, create_engine
from projections import parking
from projections.errors import ProjectionFailed

from .conftest import Cli, sql


def park_users(cli: Cli, position: int) -> None:
    url = cli.args[1]
    schema = cli.args[3] if len(cli.args) > 3 else None

    async def go() -> None:
        engine = create_engine(url, EngineOptions(search_path=schema))
        try:
            failure = ProjectionFailed(
                "users", position, position, RuntimeError("boom"), "UserRegistered"
            )
            await parking.park(engine, failure, attempts=4)
        finally:
            await engine.dispose()

    asyncio.run(go())


def test_parked_projectors_show_in_stats_and_health_and_retry_unparks(cli: Cli):
    first = "SELECT min(position) FROM events WHERE event_type = 'UserRegistered'"
    position = sql(cli, first)[0][0]
    park_users(cli, position)
    stats = json.loads(cli("stats", "--json").stdout)
    assert stats["parked"] == ["users"]
    assert stats["projectors"]["users"]["parked"]["position"] == position
    table = cli("stats")
    assert "parked projectors" in table.stdout and "RuntimeError('boom')" in table.stdout
    health = json.loads(cli("health", "--json").stdout)
    assert list(health["parked_projectors"]) == ["users"]

    refused = cli("projections", "skip", "users", str(position), "--reason", "bad")
    assert refused.exit_code == 1
    assert "already applied" in refused.output
    assert cli("projections", "skip", "nosuch", "1", "--reason", "x").exit_code == 1

    done = cli("projections", "retry", "users", "--actor", "ops-7")
    assert done.exit_code == 0, done.output
    assert f"was parked at position {position}" in done.stdout
    assert json.loads(cli("stats", "--json").stdout)["parked"] == []
    assert "is not parked" in cli("projections", "retry", "users").stdout
    recorded = sql(
        cli, "SELECT actor_id, stream_id FROM events WHERE event_type = 'ProjectionRetried'"
    )
    assert recorded == [("ops-7", "operations-projection-users")]
