"""What a broker must offer the publisher: three calls.

A sink takes messages in the log's order and says, per message, when the broker
holds it. Another broker (RabbitMQ with publisher confirms, Kafka with an idempotent
producer) is one module implementing :class:`Sink`; :mod:`projections.publishing.nats`
is the JetStream one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from projections.errors import ProjectionError


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x, once per event
class Message:
    """One event as it leaves: where it goes, its body and its headers.

    ``message_id`` is the event id: brokers that de-duplicate (JetStream's
    ``Nats-Msg-Id``) drop a second copy of it, and consumers de-duplicate by it.
    """

    subject: str
    payload: bytes
    headers: dict[str, str]
    message_id: str
    #: The stream it belongs to: messages of one stream must keep their order.
    stream_id: str


class PublishError(ProjectionError):
    """The broker refused a message, lost the connection, or did not acknowledge in
    time. The publisher sends again from the first unacknowledged event."""


class Sink(Protocol):
    """A broker connection that publishes in order and confirms asynchronously.

    Contract: messages passed to :meth:`publish` reach the broker in the order of the
    calls (one ordered connection), so that a prefix of them is what a broken
    connection leaves stored; each returned future resolves when the broker holds the
    message and fails with :class:`PublishError` when it will not say so (refusal,
    lost connection). After any failure the publisher calls :meth:`close` and then
    :meth:`open` again before publishing anything else.
    """

    async def open(self) -> None:
        """Connect, and create the destination (a JetStream stream, an exchange) if
        it is missing. Raises :class:`PublishError` when the broker is unreachable."""
        ...

    async def publish(self, message: Message) -> asyncio.Future[None]:
        """Send ``message`` (queued on the connection, in call order); the future
        resolves on the broker's acknowledgement."""
        ...

    async def close(self) -> None:
        """Drop the connection; unacknowledged messages are abandoned (sent again)."""
        ...
