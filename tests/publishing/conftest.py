"""NATS for the publishing tests: the real server on 127.0.0.1:4222 (JetStream on),
skipped when unreachable unless ``TIU_REQUIRE_NATS=1`` (CI). Each test gets a stream
and subject prefix of its own, deleted afterwards."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import nats
import pytest

from tests.publishing.support import NATS_HOST, NATS_PORT, JetStreamTarget, TcpProxy

REQUIRE_NATS = os.environ.get("TIU_REQUIRE_NATS") == "1"


@pytest.fixture
async def jetstream() -> AsyncIterator[JetStreamTarget]:
    try:
        nc = await nats.connect(f"nats://{NATS_HOST}:{NATS_PORT}", connect_timeout=2,
                                allow_reconnect=False)  # fmt: skip
    except Exception as error:
        if REQUIRE_NATS:
            pytest.fail(f"NATS required (TIU_REQUIRE_NATS=1) but unreachable: {error}")
        pytest.skip(f"NATS unreachable: {error}")
    target = JetStreamTarget(nc, nc.jetstream())
    try:
        yield target
    finally:
        await target.delete()
        await nc.close()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    p = TcpProxy()
    await p.start()
    yield p
    await p.aclose()
