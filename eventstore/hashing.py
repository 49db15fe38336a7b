"""Canonical JSON, reading it back, and the per-stream hash chain.

Each event's hash covers its canonical content and the hash of the previous event
in its stream, so any edit to a stored event (or a removed event) breaks every
link after it. The global position is not hashed: it is allocated in the database,
and holes in positions are caught separately.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

GENESIS: Final = "0" * 64


def _normalise(value: Any) -> Any:
    # JSONB gives an integral float back as an int (1e16 -> 10000000000000000), so
    # integral floats are hashed as ints: the hash must survive the round trip.
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN and infinity are not JSON")
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, UTF-8 kept, integral floats as ints.

    The text is defined by the stdlib (:func:`_stdlib_canonical`): stored hashes are
    computed over it, so it must never change. A document of plain values only (dicts
    with string keys, lists, strings, ints, booleans, None: every event the domain
    writes) is written by orjson, which gives the same text 7x faster, the check
    included (6.4 -> 0.9 us for a TaskCreated's data, timeit; a property test holds the
    two equal). Everything else
    takes the stdlib path: floats (``repr`` and orjson spell exponents differently),
    subclasses, other types (which orjson would serialise and the stdlib refuses), and
    what orjson refuses (integers beyond 64 bits, lone surrogates).
    """
    if _plain(value):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except orjson.JSONEncodeError:
            pass
    return _stdlib_canonical(value)


def _stdlib_canonical(value: Any) -> str:
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _plain(value: Any) -> bool:
    """Whether ``value`` holds only exact dicts with string keys, lists, tuples,
    strings, ints, booleans and None (~0.5 us for a flat event payload)."""
    kind = type(value)
    if kind is dict:
        for key in value:
            if type(key) is not str:
                return False
        items = value.values()
    elif kind is list or kind is tuple:
        items = value
    else:
        return kind is str or kind is int or kind is bool or value is None
    for item in items:
        k = type(item)
        if k is str or k is int or item is None or k is bool:
            continue  # the common leaves, without a call
        if not _plain(item):
            return False
    return True


def parse_json(text: str | bytes) -> Any:
    """Parse stored JSON: orjson, ~5x faster than ``json.loads`` on event payloads
    (half of reading a log page was ``json.loads``, profiled), with ``json.loads`` for
    what orjson gets wrong, so every value reads back exactly as the stdlib reads it:

    * documents orjson refuses (lone surrogates);
    * integers beyond 64 bits, which orjson reads as floats, silently rounded
      (-9223372036854775809 came back as -9.223372036854776e18). Canonical JSON never
      holds an integral float literal (they are written as integers), so an integral
      float in orjson's result is such an integer: the document is read again.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
    if _has_integral_float(value):
        return json.loads(text)
    return value


def _has_integral_float(value: Any) -> bool:
    # ~0.2 us on a flat event payload: strings, ints and None are passed over first.
    kind = type(value)
    if kind is dict:
        for item in value.values():
            k = type(item)
            if k is str or k is int or item is None or k is bool:
                continue
            if _has_integral_float(item):
                return True
        return False
    if kind is list:
        return any(_has_integral_float(item) for item in value)
    return kind is float and value.is_integer()


def event_hash(
    *,
    prev_hash: str,
    stream_id: str,
    version: int,
    event_id: str,
    event_type: str,
    schema_version: int,
    data: Mapping[str, Any],
    metadata: Mapping[str, Any],
    actor_id: str | None,
    correlation_id: str | None,
    causation_id: str | None,
    command_id: str | None,
    recorded_at: datetime,
) -> str:
    return chain_hash(
        prev_hash=prev_hash,
        stream_id=stream_id,
        version=version,
        event_id=event_id,
        event_type=event_type,
        schema_version=schema_version,
        data_json=canonical_json(data),
        metadata_json=canonical_json(metadata),
        actor_id=actor_id,
        correlation_id=correlation_id,
        causation_id=causation_id,
        command_id=command_id,
        recorded_at=recorded_at,
    )


def chain_hash(
    *,
    prev_hash: str,
    stream_id: str,
    version: int,
    event_id: str,
    event_type: str,
    schema_version: int,
    data_json: str,
    metadata_json: str,
    actor_id: str | None,
    correlation_id: str | None,
    causation_id: str | None,
    command_id: str | None,
    recorded_at: datetime,
) -> str:
    """:func:`event_hash` from data and metadata already in canonical JSON."""
    return link_hash(
        prev_hash,
        json_text(stream_id),
        version,
        hash_tail(
            event_id=event_id,
            event_type=event_type,
            schema_version=schema_version,
            data_json=data_json,
            metadata_json=metadata_json,
            actor_id=actor_id,
            correlation_id=correlation_id,
            causation_id=causation_id,
            command_id=command_id,
            recorded_at=recorded_at,
        ),
    )


def hash_tail(
    *,
    event_id: str,
    event_type: str,
    schema_version: int,
    data_json: str,
    metadata_json: str,
    actor_id: str | None,
    correlation_id: str | None,
    causation_id: str | None,
    command_id: str | None,
    recorded_at: datetime,
) -> str:
    """The hashed text after the version: what does not depend on the stream's head.

    The hashed text is the canonical JSON array of the fields; a JSON array is its
    items' JSON joined by commas, so the canonical text of data and metadata is
    spliced in instead of being encoded again (the append path has it already).
    """
    context = context_tail(
        actor_id, correlation_id, causation_id, command_id, recorded_at_text(recorded_at)
    )
    return event_tail(
        event_id, event_type, schema_version, data_json, metadata_json, context=context
    )


#: The stamp :func:`recorded_at_text` wrote out last, and its text (swapped whole: safe
#: across threads). The SQLite insert writes that same stamp next
#: (:func:`eventstore.types.sqlite_text` takes its text from here): ``isoformat`` was
#: ~12k instructions of a one-event append each time (callgrind).
last_stamp: tuple[object, str] = (None, "")


#: The start of the UTC minute :func:`recorded_at_text` last wrote a stamp in, and that
#: minute's text (``YYYY-MM-DDTHH:MM:``), swapped whole.
_minute: tuple[datetime, str] = (datetime.min.replace(tzinfo=UTC), "")
_MINUTE: Final = timedelta(minutes=1)
_NO_TIME: Final = timedelta(0)


def recorded_at_text(recorded_at: datetime) -> str:
    """``recorded_at`` as the hashed text holds it: in UTC, as the log stores it and
    verification reads it back (hashed with another offset, a stamp from a caller's
    clock would never verify). Verification passes the stored text itself.

    That text is ``isoformat(timespec="microseconds")``'s. For a stamp in UTC (the
    store's clock) the minute's text is kept and the seconds written after it: the
    same characters, ~13k instructions less than ``isoformat`` (callgrind), once an
    append; a test holds the two equal."""
    global last_stamp, _minute  # noqa: PLW0603  # swapped whole
    given = recorded_at
    if type(recorded_at) is datetime and recorded_at.tzinfo is UTC:
        start, minute = _minute
        since = recorded_at - start
        if since >= _MINUTE or since < _NO_TIME:
            start = recorded_at.replace(second=0, microsecond=0)
            minute = start.isoformat()[:17]
            _minute = (start, minute)
            since = recorded_at - start
        text = f"{minute}{since.seconds:02d}.{since.microseconds:06d}+00:00"
    else:
        if isinstance(recorded_at, datetime) and recorded_at.utcoffset():
            recorded_at = recorded_at.astimezone(UTC)
        text = recorded_at.isoformat(timespec="microseconds")
    last_stamp = (given, text)
    return text


def context_tail(
    actor_id: str | None,
    correlation_id: str | None,
    causation_id: str | None,
    command_id: str | None,
    recorded_at: str,
) -> str:
    """The end of :func:`hash_tail`: the same for every event of one append, so the
    append path writes it once per append, not once per event (``recorded_at`` as
    :func:`recorded_at_text` writes it: ~1 us, once per group)."""
    return _dumps([actor_id, correlation_id, causation_id, command_id, recorded_at])[1:]


def event_tail(
    event_id: str,
    event_type: str,
    schema_version: int,
    data_json: str,
    metadata_json: str,
    *,
    context: str,
) -> str:
    """:func:`hash_tail` given its end, :func:`context_tail`."""
    middle = _dumps([event_id, event_type, schema_version])
    return f",{middle[1:-1]},{data_json},{metadata_json},{context}"


def link_hash(prev_hash: str, stream_json: str, version: int, tail: str) -> str:
    """The hash of an event whose stream's previous hash is ``prev_hash``.

    ``stream_json`` is :func:`json_text` of the stream id and ``tail`` is
    :func:`hash_tail`. PostgreSQL's ``tiu_append`` (migration 0008) computes exactly
    this in SQL; keep the two in step (a test checks they agree).
    """
    # prev_hash is 64 hex digits, so its JSON is itself in quotes.
    return hashlib.sha256(f'["{prev_hash}",{stream_json},{version}{tail}'.encode()).hexdigest()


def json_text(value: str | None) -> str:
    """One scalar as the hashed text writes it."""
    return _dumps(value)


def _dumps(value: Any) -> str:
    # Strings, ints and None, or a list of them: nothing to normalise, and no float
    # can occur in these fields. orjson where it gives the stdlib's text (see
    # canonical_json): ~2 us less per event, three calls an event. _plain's test of
    # such a value written out here: its two calls were a third of the cost.
    kind = type(value)
    if kind is list or kind is tuple:
        plain = True
        for item in value:
            k = type(item)
            if not (k is str or k is int or item is None or k is bool):
                plain = False  # a float, a nested list...: the stdlib decides
                break
    else:
        plain = kind is str or kind is int or value is None or kind is bool
    if plain:
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError:  # beyond 64 bits, a lone surrogate
            pass
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
