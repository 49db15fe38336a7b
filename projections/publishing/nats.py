"""The NATS JetStream sink (needs the ``nats`` extra: ``pip install 'tiu-core[nats]'``).

One connection, no automatic reconnection: nats-py would buffer messages published
while it reconnects and send them after the ones a dead socket lost, and a lost
message sent again after a later one of its stream would break per-stream order.
Instead a broken connection fails every unacknowledged publish, and the publisher
opens a new connection and sends again from its first unacknowledged event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from projections.publishing.sink import Message, PublishError

log = logging.getLogger("projections.publishing.nats")

DEFAULT_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_STREAM: Final = "TIU_EVENTS"
#: JetStream drops a second message with the same ``Nats-Msg-Id`` inside this window
#: (seconds): a publisher that restarts within it sends no duplicate to consumers.
DEFAULT_DUPLICATE_WINDOW: Final = 120.0


class NatsSink:
    """Publishes to a JetStream stream, creating it if missing.

    ``stream_config`` overrides fields of the stream's :class:`nats.js.api.StreamConfig`
    when it is created (``max_age``, ``num_replicas``, ``duplicate_window``, ...); an
    existing stream is used as it is.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        stream: str = DEFAULT_STREAM,
        subject_prefix: str = "tiu",
        stream_config: Mapping[str, Any] | None = None,
        connect_timeout: float = 5.0,
        max_pending: int = 4000,
    ) -> None:
        self.url = url
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.stream_config = dict(stream_config or {})
        self.connect_timeout = connect_timeout
        self.max_pending = max_pending
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        try:
            self.config()
        except (TypeError, ValueError) as error:
            raise PublishError(f"invalid stream_config: {error}") from error

    def config(self) -> StreamConfig:
        fields: dict[str, Any] = {
            "name": self.stream,
            "subjects": [f"{self.subject_prefix}.>"],
            "storage": StorageType.FILE,
            "duplicate_window": DEFAULT_DUPLICATE_WINDOW,
        }
        fields.update(self.stream_config)
        return StreamConfig(**fields)

    async def open(self) -> None:
        try:
            self._nc = await nats.connect(
                self.url,
                allow_reconnect=False,
                connect_timeout=max(1, round(self.connect_timeout)),
                closed_cb=self._closed,
                error_cb=self._error,
                name="tiu-publisher",
            )
            self._js = self._nc.jetstream(publish_async_max_pending=self.max_pending)
            try:
                await self._js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(self.config())
                log.info("created JetStream stream %s", self.stream)
        except (OSError, TimeoutError, nats.errors.Error) as error:
            await self.close()
            raise PublishError(f"NATS at {self.url}: {error or type(error).__name__}") from error

    async def publish(self, message: Message) -> asyncio.Future[Any]:
        if self._js is None:
            raise PublishError("not connected")
        try:
            future = await self._js.publish_async(
                message.subject, message.payload, headers=message.headers
            )
        except (OSError, nats.errors.Error) as error:
            raise PublishError(f"publish failed: {error or type(error).__name__}") from error
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(OSError, TimeoutError, nats.errors.Error):
                async with asyncio.timeout(2.0):
                    await nc.close()
        self._abandon("connection closed")

    def _abandon(self, reason: str) -> None:
        for future in list(self._pending):
            if not future.done():
                future.set_exception(PublishError(reason))
        self._pending.clear()

    async def _closed(self) -> None:
        self._abandon("connection to NATS lost")

    async def _error(self, error: Exception) -> None:
        log.debug("NATS connection error: %s", error)
