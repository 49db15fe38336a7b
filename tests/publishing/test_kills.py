"""`tiu publish` as a process, killed with SIGKILL again and again while writers append,
its connection to NATS cut once, then stopped with SIGTERM: a consumer of the stream
gets every event exactly once after de-duplication by event id, each stream in order,
on both backends. The long variant (10 kills) is ``slow``; a shorter one runs by default."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from eventstore import EventStore
from tests.publishing.support import JetStreamTarget, TcpProxy, check_delivery
from tests.publishing.test_publisher import append_round, checkpoint_of, head_of, log_of

TIU = Path(sys.executable).with_name("tiu")
CHILD_SETTINGS = {"TIU_PUBLISH_ACK_TIMEOUT": "3", "TIU_PUBLISH_CHECKPOINT_INTERVAL": "0.2"}


async def spawn(engine: AsyncEngine, target: JetStreamTarget, proxy: TcpProxy, log: Path):
    args = [
        str(TIU), "publish",
        "--database-url", engine.url.render_as_string(hide_password=False),
        "--nats-url", proxy.url,
        "--stream", target.stream,
        "--subject-prefix", target.prefix,
        "--log-interval", "0.5",
    ]  # fmt: skip
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            args += ["--schema", str(await conn.scalar(text("SELECT current_schema()")))]
    with log.open("a") as out:
        return await asyncio.create_subprocess_exec(
            *args, stdout=out, stderr=out, env={**os.environ, **CHILD_SETTINGS}
        )


async def wait_connected(proxy: TcpProxy, before: int, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 30
    while proxy.connections <= before:
        assert proc.returncode is None, "the publisher exited before connecting"
        assert time.monotonic() < deadline, "the publisher never connected"
        await asyncio.sleep(0.02)


async def kill_and_check(
    store: EventStore, jetstream: JetStreamTarget, proxy: TcpProxy, tmp_path: Path, kills: int
) -> None:
    rnd = random.Random(kills)
    log = tmp_path / "publish.log"
    await append_round(store, 0, streams=20, per=10)
    writing = True

    async def writer() -> None:
        round_no = 1
        while writing:
            await append_round(store, round_no, streams=8, per=3)
            round_no += 1
            await asyncio.sleep(0.02)

    writer_task = asyncio.create_task(writer())
    checkpoints = []
    try:
        for kill in range(kills):
            before = await checkpoint_of(store.engine) or 0
            proc = await spawn(store.engine, jetstream, proxy, log)
            await wait_connected(proxy, proxy.connections, proc)
            deadline = time.monotonic() + 30
            while (await checkpoint_of(store.engine) or 0) <= before:  # it made progress
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                await asyncio.sleep(0.05)
            await asyncio.sleep(rnd.uniform(0.0, 0.4))
            if kill == kills // 2:
                assert proxy.cut() >= 1  # the broker connection drops under load
                await asyncio.sleep(rnd.uniform(0.3, 0.8))
            proc.kill()  # SIGKILL: no acknowledgement awaited, no checkpoint written
            await proc.wait()
            checkpoints.append(await checkpoint_of(store.engine))
    finally:
        writing = False
        await writer_task
    head = await head_of(store)
    proc = await spawn(store.engine, jetstream, proxy, log)
    try:
        deadline = time.monotonic() + 60
        while (await checkpoint_of(store.engine) or 0) < head:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            assert proc.returncode is None, log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text()[-3000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    records = await log_of(store)
    received = await jetstream.messages()
    assert check_delivery(received, records) == [], log.read_text()[-3000:]
    assert await checkpoint_of(store.engine) == records[-1].position
    # Every run made progress before it was killed, while the writers kept appending.
    assert checkpoints == sorted(set(checkpoints)), checkpoints


async def test_kills_and_a_cut_connection_lose_nothing_and_keep_stream_order(
    store: EventStore, jetstream: JetStreamTarget, proxy: TcpProxy, tmp_path: Path
) -> None:
    await kill_and_check(store, jetstream, proxy, tmp_path, kills=3)


@pytest.mark.slow
async def test_ten_kills_and_a_cut_connection_lose_nothing_and_keep_stream_order(
    store: EventStore, jetstream: JetStreamTarget, proxy: TcpProxy, tmp_path: Path
) -> None:
    await kill_and_check(store, jetstream, proxy, tmp_path, kills=10)
