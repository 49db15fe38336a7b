"""Publishing the log to other services: a :class:`Publisher` following the log and a
:class:`Sink` per broker (:mod:`projections.publishing.nats` for NATS JetStream,
imported on its own since it needs the ``nats`` extra). See docs/publishing.md."""

from projections.publishing.encoding import Encoder, PersonalData
from projections.publishing.publisher import (
    Publisher,
    PublisherOptions,
    PublisherStatus,
    publisher_lag,
)
from projections.publishing.sink import Message, PublishError, Sink

__all__ = [
    "Encoder",
    "Message",
    "PersonalData",
    "PublishError",
    "Publisher",
    "PublisherOptions",
    "PublisherStatus",
    "Sink",
    "publisher_lag",
]
