"""``Envelope``: what projectors are handed, built by hand or decoded from a record."""

from __future__ import annotations

import pickle
import uuid
from datetime import UTC, datetime

import pytest

from domain.tasks import TaskCreated
from eventstore.dialects import SQLiteDialect
from eventstore.hashing import canonical_json
from eventstore.records import RecordedEvent
from projections.projector import Envelope

EVENT_ID = uuid.UUID("0193e9a4-7b1c-7d2e-8f00-1234567890ab")
RECORDED = datetime(2026, 3, 1, 9, 0, 5, 123456, tzinfo=UTC)
EVENT = TaskCreated(
    task_id="t1",
    project_id="p1",
    title="Write the tests",
    description="",
    priority="high",
    due_date=None,
    assignee_id=None,
    created_by="u1",
    at=datetime(2026, 3, 1, 9, 0, tzinfo=UTC),
)


def sqlite_record(recorded_at: str = "2026-03-01 09:00:05.123456") -> RecordedEvent:
    """A record as the SQLite dialect reads it: id as hex, JSON as text, time as text."""
    row = (
        7,
        EVENT_ID.hex,
        "task-t1",
        "task",
        1,
        "TaskCreated",
        1,
        canonical_json(EVENT.model_dump(mode="json")),
        "{}",
        "u1",
        None,
        None,
        None,
        recorded_at,
        "0" * 64,
    )
    return RecordedEvent.from_rows([row], SQLiteDialect._codec)[0]


def by_hand() -> Envelope:
    return Envelope(EVENT, "task-t1", 1, 7, RECORDED, "u1", EVENT_ID)


def test_an_envelope_decoded_from_a_record_has_the_records_fields() -> None:
    envelope = Envelope.from_record(sqlite_record())

    assert envelope.fields() == (EVENT, "task-t1", 1, 7, RECORDED, "u1", EVENT_ID)
    assert envelope.event_type == "TaskCreated"
    assert envelope == by_hand()
    assert hash(envelope) == hash(by_hand())


def test_envelopes_differing_in_one_field_are_not_equal() -> None:
    other = Envelope(EVENT, "task-t1", 1, 8, RECORDED, "u1", EVENT_ID)

    assert other != by_hand()
    assert Envelope.from_record(sqlite_record("2026-03-01 09:00:06.000000")) != by_hand()


def test_the_record_time_is_read_only_when_asked_for() -> None:
    # A timestamp the codec cannot parse fails where it is read, not where the event is
    # decoded: projectors that never read it never pay for it.
    envelope = Envelope.from_record(sqlite_record("not a time"))

    assert envelope.event == EVENT
    with pytest.raises(ValueError, match="not a time"):
        _ = envelope.recorded_at


def test_an_envelope_survives_pickling_and_matching_by_position() -> None:
    envelope = Envelope.from_record(sqlite_record())

    assert pickle.loads(pickle.dumps(envelope)) == envelope
    match envelope:
        case Envelope(event, stream_id, version, position, recorded_at, actor_id, event_id):
            assert (event, stream_id, version, position) == (EVENT, "task-t1", 1, 7)
            assert (recorded_at, actor_id, event_id) == (RECORDED, "u1", EVENT_ID)
        case _:
            pytest.fail("an envelope matches its seven fields by position")
    assert "recorded_at=datetime.datetime(2026, 3, 1, 9, 0, 5, 123456" in repr(envelope)
