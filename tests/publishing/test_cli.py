"""`tiu publish` as an operator runs it: SIGTERM mid catch-up waits for the
acknowledgements in flight and writes the checkpoint over exactly what the broker
holds; options reach the publisher; `tiu stats` shows the lag."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore import EventStore
from eventstore.records import NewEvent
from tests.publishing.support import JetStreamTarget, TcpProxy
from tests.publishing.test_publisher import checkpoint_of

TIU = Path(sys.executable).with_name("tiu")


async def fill(store: EventStore, n: int) -> None:
    for start in range(0, n, 500):
        async with store.transaction() as uow:
            for i in range(start, min(n, start + 500)):
                category = "task" if i % 2 else "project"
                uow.append(f"{category}-s{i % 50}", category, [NewEvent("Made", {"i": i})], "any")


async def tiu(*args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(TIU), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.sqlite
async def test_sigterm_mid_catch_up_awaits_the_acks_and_checkpoints_what_the_broker_holds(
    sqlite_engine: AsyncEngine, jetstream: JetStreamTarget, proxy: TcpProxy
) -> None:
    store = EventStore(sqlite_engine)
    await fill(store, 4_000)
    url = sqlite_engine.url.render_as_string(hide_password=False)
    proxy.delay = 0.2  # acknowledgements come late: many are in flight at the SIGTERM
    proc = await tiu(
        "publish", "--database-url", url, "--nats-url", proxy.url, "--stream", jetstream.stream,
        "--subject-prefix", jetstream.prefix,
        TIU_PUBLISH_CHECKPOINT_INTERVAL="0.05",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (await checkpoint_of(sqlite_engine) or 0):
        assert time.monotonic() < deadline and proc.returncode is None
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    checkpoint = await checkpoint_of(sqlite_engine)
    received = await jetstream.messages()
    assert 0 < checkpoint < 4_000, "stopped before the end of the log, as the test wants"
    # Everything sent was acknowledged and counted: the broker holds exactly 1..checkpoint.
    assert sorted(m.body["position"] for m in received) == list(range(1, checkpoint + 1))
    assert "publisher stopped" in stderr.decode()
    await store.aclose()


@pytest.mark.sqlite
async def test_cli_options_filter_and_stats_show_the_lag(
    sqlite_engine: AsyncEngine, jetstream: JetStreamTarget
) -> None:
    store = EventStore(sqlite_engine)
    await fill(store, 100)
    url = sqlite_engine.url.render_as_string(hide_password=False)
    proc = await tiu(
        "publish", "--database-url", url, "--stream", jetstream.stream,
        "--subject-prefix", jetstream.prefix, "--name", "tasks", "--category", "task",
        "--personal-data", "omit", TIU_PUBLISH_CHECKPOINT_INTERVAL="0.05",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while (await checkpoint_of(sqlite_engine, "tasks") or 0) < 100:
        assert time.monotonic() < deadline and proc.returncode is None
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.communicate(), 30)
    received = await jetstream.messages()
    assert len(received) == 50
    assert {m.body["category"] for m in received} == {"task"}
    await fill(store, 10)
    stats = await tiu("stats", "--json", "--database-url", url)
    out, err = await stats.communicate()
    assert stats.returncode == 0, err.decode()
    lag = json.loads(out)["publishers"]["tasks"]
    assert (lag["position"], lag["lag_events"]) == (100, 10)
    await store.aclose()
