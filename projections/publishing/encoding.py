"""An event of the log as a broker message: subject, JSON body, headers.

The body is the event as stored (its ``data`` and ``metadata`` documents embedded
as their JSON text, not parsed and written again) with its position, stream,
version, type, ids and time. Personal fields (``personal_fields`` of the event's
class, see docs/privacy.md) never leave in plaintext: with ``personal_data="encrypted"``
a field sealed with its subject's key is published as its ciphertext (which a later
``forget`` makes unreadable everywhere, since the key is what it destroys), and a
personal field stored in plaintext (no subject, written before migration 0004) is
withheld; with ``"omit"`` every personal field is withheld. A withheld field is
removed from ``data`` and named in ``withheld``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from typing import Any, Final, Literal

import orjson

from domain.base import registered_event_types
from eventstore.crypto import MARK
from eventstore.records import RecordedEvent
from projections.publishing.sink import Message

PersonalData = Literal["encrypted", "omit"]

#: Headers a consumer can route or trace by without parsing the body.
MSG_ID: Final = "Nats-Msg-Id"
STREAM_HEADER: Final = "Tiu-Stream-Id"
VERSION_HEADER: Final = "Tiu-Version"
POSITION_HEADER: Final = "Tiu-Position"
CORRELATION_HEADER: Final = "Tiu-Correlation-Id"
CAUSATION_HEADER: Final = "Tiu-Causation-Id"
#: W3C trace context, copied from the event's metadata where the writer put it there.
TRACE_KEYS: Final = ("traceparent", "tracestate")

_UNSAFE_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
_MAX_SUBJECTS: Final = 10_000  # categories x types seen; bounded all the same


def subject_token(text: str) -> str:
    """``text`` as one subject token: NATS gives ``.``, ``*``, ``>`` and whitespace
    meanings of their own, so anything but letters, digits, ``_`` and ``-`` becomes ``_``."""
    return _UNSAFE_TOKEN.sub("_", text) or "_"


def _add_header(headers: dict[str, str], name: str, value: object) -> None:
    text = str(value)
    if text.isprintable():  # a line break would end the header block early
        headers[name] = text


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError):
        # Integers beyond 64 bits, lone surrogates: the stdlib writes them as it stored them.
        return json.dumps(value, separators=(",", ":")).encode()


def _as_bytes(document: Mapping[str, Any] | str | bytes) -> bytes:
    if isinstance(document, bytes):
        return document
    if isinstance(document, str):
        return document.encode("utf-8", "surrogatepass")
    return _dumps(document)


class Encoder:
    """Turns records into :class:`Message` s; see the module docstring for the body."""

    def __init__(self, prefix: str = "tiu", personal_data: PersonalData = "encrypted") -> None:
        self.prefix = prefix
        self.personal_data = personal_data
        self._subjects: dict[tuple[str, str], str] = {}
        self._personal: dict[str, Collection[str]] = {}

    def subject(self, category: str, event_type: str) -> str:
        key = (category, event_type)
        subject = self._subjects.get(key)
        if subject is None:
            subject = f"{self.prefix}.{subject_token(category)}.{subject_token(event_type)}"
            if len(self._subjects) < _MAX_SUBJECTS:
                self._subjects[key] = subject
        return subject

    def encode(self, record: RecordedEvent) -> Message:
        event_id = str(record.event_id)
        data, withheld = self._data(record)
        head: dict[str, Any] = {
            "position": record.position,
            "event_id": event_id,
            "stream_id": record.stream_id,
            "category": record.category,
            "version": record.version,
            "type": record.event_type,
            "schema_version": record.schema_version,
            "recorded_at": record.recorded_at,
            "actor_id": record.actor_id,
            "correlation_id": record.correlation_id,
            "causation_id": record.causation_id,
            "command_id": record.command_id,
            "hash": record.hash,
        }
        if withheld:
            head["withheld"] = withheld
        metadata = record.metadata
        payload = b"".join(
            (_dumps(head)[:-1], b',"data":', data, b',"metadata":', _dumps(metadata), b"}")
        )
        headers = {
            MSG_ID: event_id,
            STREAM_HEADER: record.stream_id,
            VERSION_HEADER: str(record.version),
            POSITION_HEADER: str(record.position),
        }
        if record.correlation_id is not None:
            _add_header(headers, CORRELATION_HEADER, record.correlation_id)
        if record.causation_id is not None:
            _add_header(headers, CAUSATION_HEADER, record.causation_id)
        if metadata:
            for key in TRACE_KEYS:
                if (value := metadata.get(key)) is not None:
                    _add_header(headers, key, value)
        return Message(
            subject=self.subject(record.category, record.event_type),
            payload=payload,
            headers=headers,
            message_id=event_id,
            stream_id=record.stream_id,
        )

    def _data(self, record: RecordedEvent) -> tuple[bytes, list[str]]:
        personal = self._personal.get(record.event_type)
        if personal is None:
            personal = _personal_fields(record.event_type)
            if len(self._personal) < _MAX_SUBJECTS:
                self._personal[record.event_type] = personal
        if not personal:
            return _as_bytes(record.stored_data), []
        data = dict(record.data)
        withheld = sorted(
            name
            for name in personal
            if data.get(name) is not None
            and not (self.personal_data == "encrypted" and _sealed(data[name]))
        )
        for name in withheld:
            del data[name]
        return (_dumps(data) if withheld else _as_bytes(record.stored_data)), withheld


def _sealed(value: object) -> bool:
    """A value as :mod:`eventstore.crypto` stores a personal field: ciphertext, or the
    ``{"$pd": null}`` of a subject forgotten before the event was written."""
    return isinstance(value, dict) and MARK in value


def _personal_fields(event_type: str) -> Collection[str]:
    cls = registered_event_types().get(event_type)
    return cls.personal_fields if cls is not None else ()
