"""What the publishing tests share: a TCP proxy the test controls (to cut or freeze the
publisher's connection without touching the NATS server other runs use), a JetStream
stream of the test's own, and a consumer that reads it back and checks it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.js import JetStreamContext

from eventstore.records import RecordedEvent

NATS_HOST, NATS_PORT = "127.0.0.1", 4222


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the NATS server. :meth:`cut` drops every connection
    through it (as a broker restart or a network failure would, for this client only);
    :meth:`freeze` stops forwarding without closing anything (a stalled network);
    ``delay`` holds each chunk from the server for that many seconds (slow acks)."""

    def __init__(self, upstream: tuple[str, int] = (NATS_HOST, NATS_PORT)) -> None:
        self.upstream = upstream
        self.port = 0
        self.connections = 0
        self.delay = 0.0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for src, dst, delayed in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pipe(src, dst, pair, delayed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        delayed: bool,
    ) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                if delayed and self.delay:
                    await asyncio.sleep(self.delay)
                if pair not in self._pairs:
                    return
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._drop(pair)

    def _drop(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        if pair in self._pairs:
            self._pairs.discard(pair)
            for writer in pair:
                writer.transport.abort()

    def cut(self) -> int:
        """Abort every open connection (data in flight through the proxy is lost)."""
        pairs = list(self._pairs)
        for pair in pairs:
            self._drop(pair)
        return len(pairs)

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def aclose(self) -> None:
        self.thaw()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class Received:
    subject: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class JetStreamTarget:
    """A stream and subject prefix unique to one test run."""

    nc: Any
    js: JetStreamContext
    stream: str = field(default_factory=lambda: f"TIU_TEST_{secrets.token_hex(4).upper()}")
    prefix: str = field(default_factory=lambda: f"tiutest{secrets.token_hex(4)}")

    async def messages(self) -> list[Received]:
        """Every message of the stream, in stream order."""
        try:
            info = await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            return []
        out: list[Received] = []
        last = info.state.last_seq
        if not last:
            return out
        sub = await self.js.pull_subscribe(f"{self.prefix}.>", stream=self.stream)
        try:
            while len(out) < info.state.messages:
                for msg in await sub.fetch(500, timeout=5):
                    await msg.ack()
                    out.append(Received(msg.subject, dict(msg.headers or {}), json.loads(msg.data)))
        finally:
            await sub.unsubscribe()
        return out

    async def delete(self) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_stream(self.stream)


def check_delivery(received: Sequence[Received], log: Sequence[RecordedEvent]) -> list[str]:
    """Problems with ``received`` against the log: after dropping repeated event ids,
    every event exactly once, each stream's in version order. Empty when right."""
    problems: list[str] = []
    seen: set[str] = set()
    firsts: list[Received] = []
    for message in received:
        event_id = message.headers["Nats-Msg-Id"]
        if message.body["event_id"] != event_id:
            problems.append(f"body and header ids differ at {event_id}")
        if event_id not in seen:
            seen.add(event_id)
            firsts.append(message)
    expected = {str(r.event_id) for r in log}
    if missing := expected - seen:
        problems.append(f"{len(missing)} events never published")
    if extra := seen - expected:
        problems.append(f"{len(extra)} unknown events published")
    last_version: dict[str, int] = {}
    for message in firsts:
        stream, version = message.body["stream_id"], message.body["version"]
        if version != last_version.get(stream, 0) + 1:
            problems.append(f"{stream}: version {version} after {last_version.get(stream, 0)}")
        last_version[stream] = version
    return problems


def new_uuid() -> uuid.UUID:
    return uuid.uuid4()
