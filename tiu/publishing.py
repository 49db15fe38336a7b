"""The event publisher as the service and ``tiu publish`` build it from settings."""

from __future__ import annotations

from eventstore import EventStore
from projections.publishing import Publisher, PublisherOptions, PublishError
from tiu.settings import Settings


def publisher_options(settings: Settings) -> PublisherOptions:
    return PublisherOptions(
        name=settings.publish_name,
        subject_prefix=settings.publish_subject_prefix,
        categories=settings.publish_categories,
        types=settings.publish_types,
        personal_data=settings.publish_personal_data,
        max_in_flight=settings.publish_max_in_flight,
        ack_timeout=settings.publish_ack_timeout,
        checkpoint_interval=settings.publish_checkpoint_interval,
    )


def build_publisher(store: EventStore, settings: Settings) -> Publisher:
    """A publisher of ``store``'s log to NATS JetStream (needs the ``nats`` extra)."""
    try:
        from projections.publishing.nats import NatsSink  # noqa: PLC0415  # an optional extra
    except ModuleNotFoundError as error:
        raise PublishError(
            "publishing to NATS needs the nats extra: pip install 'tiu-core[nats]'"
        ) from error

    sink = NatsSink(
        settings.nats_url,
        stream=settings.publish_stream,
        subject_prefix=settings.publish_subject_prefix,
        stream_config=settings.publish_stream_config,
    )
    return Publisher(store, sink, publisher_options(settings))
