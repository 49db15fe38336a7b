"""The values that cross the store's boundary: what callers append and what they read."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, NamedTuple

#: ``int`` n: the stream must be exactly at version n (0 means empty);
#: ``"no_stream"``: the stream must not exist yet (same as 0);
#: ``"exists"``: the stream must have at least one event;
#: ``"any"``: no check.
ExpectedVersion = int | Literal["any", "no_stream", "exists"]

ANY: Literal["any"] = "any"
NO_STREAM: Literal["no_stream"] = "no_stream"
STREAM_EXISTS: Literal["exists"] = "exists"


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): 48 bits of Unix milliseconds, then 74
    random bits. The default event id: ids of new events land at the right edge of the
    ``event_id`` index instead of on a random page of it, which at a million events no
    longer sits in the cache (random v4 ids made every append touch a cold page)."""
    return uuid7_of(time.time_ns() // 1_000_000, int.from_bytes(os.urandom(10)))


def uuid7_of(milliseconds: int, random_bits: int) -> uuid.UUID:
    """The version 7 UUID of a Unix millisecond and 80 random bits (6 of which the
    version and variant overwrite): :func:`uuid7` with a clock and randomness of the
    caller's, such as a seeded scenario's."""
    value = milliseconds << 80 | random_bits
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    if value < 0 or value >> 128:
        return uuid.UUID(int=value)  # raises, as for any int out of range
    # Built as uuid_from_hex builds it: UUID(int=...)'s checks cost 1.1 us of the 1.6
    # (timeit), and every event appended without an id of its own gets one.
    made = _new_object(uuid.UUID)
    _set_attribute(made, "int", value)
    _set_attribute(made, "is_safe", _UNKNOWN_SAFETY)
    return made


def uuid_from_hex(text: str) -> uuid.UUID:
    """``uuid.UUID(hex=text)`` for the 32 hex digits the store keeps on SQLite, built
    the way ``UUID.__init__`` builds it but without its parsing of braces, dashes and
    ``urn:uuid:`` (0.4 us instead of 1.0: a log page decodes 1,000 ids)."""
    if len(text) != 32:
        return uuid.UUID(hex=text)
    value = _new_object(uuid.UUID)
    _set_attribute(value, "int", int(text, 16))
    _set_attribute(value, "is_safe", _UNKNOWN_SAFETY)
    return value


_new_object = object.__new__
_set_attribute = object.__setattr__
_UNKNOWN_SAFETY: Final = uuid.SafeUUID.unknown  # an enum member read costs 0.25 us a time


@dataclass(frozen=True, slots=True)
class EventContext:
    """Who and what caused an append; stored in promoted, indexed audit columns."""

    actor_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append. ``data`` and ``metadata`` must be JSON-serialisable."""

    event_type: str
    data: Mapping[str, Any]
    schema_version: int = 1
    metadata: Mapping[str, Any] = field(default_factory=dict)
    event_id: uuid.UUID = field(default_factory=uuid7)


class RowCodec(NamedTuple):
    """How a driver's values for the event id, the two JSON documents and the timestamp
    become a record's (:class:`RecordedEvent` applies them on first access)."""

    event_id: Callable[[Any], uuid.UUID]
    document: Callable[[Any], Any]
    timestamp: Callable[[Any], datetime]


def _as_is(value: Any) -> Any:
    return value


#: The codec of values that are already what the record holds.
DECODED: Final = RowCodec(_as_is, _as_is, _as_is)


_UNREAD: Final[Any] = object()  # a field not decoded yet


class RecordedEvent:
    """An event as stored in the log.

    Built from the driver's row as it comes, its event id, JSON documents and timestamp
    decoded on first access and then kept: those decodings were most of the cost of
    reading a log page (SQLite, 100k events: 0.8 s eagerly against 0.17 s to fetch the
    rows), and a reader often needs few of them (a replay validates ``data`` straight
    from its JSON text, see :attr:`stored_data`, and never reads ``metadata``).
    A malformed stored document therefore raises where it is first read.

    Compares equal field by field, like the named tuple it replaced.
    """

    __slots__ = ("_codec", "_data", "_event_id", "_metadata", "_recorded_at", "_row")
    _row: Sequence[Any]
    _codec: RowCodec
    _event_id: uuid.UUID
    _data: dict[str, Any]
    _metadata: dict[str, Any]
    _recorded_at: datetime

    def __init__(  # noqa: PLR0917  # positional, as the named tuple was
        self,
        position: int,
        event_id: uuid.UUID,
        stream_id: str,
        category: str,
        version: int,
        event_type: str,
        schema_version: int,
        data: dict[str, Any],
        metadata: dict[str, Any],
        actor_id: str | None,
        correlation_id: str | None,
        causation_id: str | None,
        command_id: str | None,
        recorded_at: datetime,
        hash: str,
    ) -> None:
        self._row = (
            position,
            event_id,
            stream_id,
            category,
            version,
            event_type,
            schema_version,
            data,
            metadata,
            actor_id,
            correlation_id,
            causation_id,
            command_id,
            recorded_at,
            hash,
        )
        self._codec = DECODED
        self._event_id, self._data, self._metadata = event_id, data, metadata
        self._recorded_at = recorded_at

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]], codec: RowCodec) -> list[RecordedEvent]:
        """Records of driver rows holding :data:`EVENT_FIELDS` in order, their event id,
        documents and timestamp as the driver gave them (``codec`` decodes them)."""
        new = object.__new__
        out = []
        for row in rows:
            record = new(cls)
            record._row = row
            record._codec = codec
            record._event_id = record._data = record._metadata = _UNREAD
            record._recorded_at = _UNREAD
            out.append(record)
        return out

    @property
    def position(self) -> int:
        return self._row[0]  # type: ignore[no-any-return]

    @property
    def event_id(self) -> uuid.UUID:
        value = self._event_id
        if value is _UNREAD:
            value = self._event_id = self._codec.event_id(self._row[1])
        return value

    @property
    def stream_id(self) -> str:
        return self._row[2]  # type: ignore[no-any-return]

    @property
    def category(self) -> str:
        return self._row[3]  # type: ignore[no-any-return]

    @property
    def version(self) -> int:
        return self._row[4]  # type: ignore[no-any-return]

    @property
    def event_type(self) -> str:
        return self._row[5]  # type: ignore[no-any-return]

    @property
    def schema_version(self) -> int:
        return self._row[6]  # type: ignore[no-any-return]

    @property
    def data(self) -> dict[str, Any]:
        value = self._data
        if value is _UNREAD:
            value = self._data = self._codec.document(self._row[7])
        return value

    @property
    def stored_data(self) -> dict[str, Any] | str | bytes:
        """``data`` as far as it was decoded: its JSON text until :attr:`data` is first
        read (on SQLite the text as written; on PostgreSQL jsonb's rendering of it), and
        the dict after, or where the read went through SQLAlchemy, which parses JSON
        itself. ``domain.decode_event`` validates the text without building the dict."""
        value = self._data
        return self._row[7] if value is _UNREAD else value

    @property
    def metadata(self) -> dict[str, Any]:
        value = self._metadata
        if value is _UNREAD:
            value = self._metadata = self._codec.document(self._row[8])
        return value

    @property
    def actor_id(self) -> str | None:
        return self._row[9]  # type: ignore[no-any-return]

    @property
    def correlation_id(self) -> str | None:
        return self._row[10]  # type: ignore[no-any-return]

    @property
    def causation_id(self) -> str | None:
        return self._row[11]  # type: ignore[no-any-return]

    @property
    def command_id(self) -> str | None:
        return self._row[12]  # type: ignore[no-any-return]

    @property
    def recorded_at(self) -> datetime:
        value = self._recorded_at
        if value is _UNREAD:
            value = self._recorded_at = self._codec.timestamp(self._row[13])
        return value

    @property
    def hash(self) -> str:
        return self._row[14]  # type: ignore[no-any-return]

    def fields(self) -> tuple[Any, ...]:
        """Every field, decoded, in :data:`EVENT_FIELDS` order."""
        return tuple(getattr(self, name) for name in EVENT_FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecordedEvent):
            return NotImplemented
        return self.fields() == other.fields()

    __hash__ = None  # type: ignore[assignment]  # data and metadata are dicts

    def __reduce__(self) -> tuple[type[RecordedEvent], tuple[Any, ...]]:
        # pickled and copied decoded: the not-yet-decoded marker is this process's object
        return (RecordedEvent, self.fields())

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={v!r}" for n, v in zip(EVENT_FIELDS, self.fields(), strict=True))
        return f"RecordedEvent({shown})"


#: A record's fields, in the order of its constructor and of the rows it is built from.
EVENT_FIELDS: Final = (
    "position",
    "event_id",
    "stream_id",
    "category",
    "version",
    "event_type",
    "schema_version",
    "data",
    "metadata",
    "actor_id",
    "correlation_id",
    "causation_id",
    "command_id",
    "recorded_at",
    "hash",
)


class StreamData(NamedTuple):
    """What folding a stream needs of each of its events (``EventStore.read_streams_data``)."""

    stream_id: str
    version: int
    event_type: str
    schema_version: int
    data: dict[str, Any]


#: A stream a command loads (``EventStore.load_streams``): its id, the name of the
#: decider whose snapshot of it may be used (``None``: none), that decider's version,
#: and the version up to which the caller holds the stream folded already (0: none).
WantedStream = tuple[str, str | None, int, int]


class StreamsLoad(NamedTuple):
    """What a command reads before it decides, in one statement
    (``EventStore.load_streams``)."""

    #: ``(stream id, outcome, command type)`` when the command id was processed already.
    processed: tuple[str, Any, str] | None
    #: Stream id -> ``(version, state)``: the snapshots that match their decider.
    snapshots: dict[str, tuple[int, Any]]
    #: The events after those snapshots (after version 0 where there is none),
    #: grouped by stream, each in version order.
    events: list[StreamData]


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where one stream's events landed: versions ``first..last`` at positions ``first..last``."""

    stream_id: str
    first_version: int
    last_version: int
    first_position: int
    last_position: int


@dataclass(frozen=True, slots=True)
class StreamHead:
    version: int
    hash: str | None
