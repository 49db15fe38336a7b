"""The message of an event, over generated inputs: the body gives back the stored
documents, subjects are valid NATS tokens, header values are printable, and no
personal field leaves in plaintext in either mode."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from domain.base import registered_event_types
from eventstore.crypto import MARK
from eventstore.records import RecordedEvent
from projections.publishing.encoding import Encoder, subject_token

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
documents = st.dictionaries(st.text(max_size=10), json_values, max_size=6)
PERSONAL = {
    name: cls.personal_fields
    for name, cls in registered_event_types().items()
    if cls.personal_fields
}


def record(
    event_type: str, data: dict[str, Any], metadata: dict[str, Any], ids: str | None
) -> RecordedEvent:
    return RecordedEvent(
        7, uuid.uuid4(), "user-abc", "user", 3, event_type, 1, data, metadata,
        ids, ids, ids, ids, datetime(2026, 3, 2, tzinfo=UTC), "0" * 64,
    )  # fmt: skip


@given(st.text())
def test_a_subject_token_is_a_valid_nats_token(text: str) -> None:
    token = subject_token(text)
    assert token and all(c.isascii() and (c.isalnum() or c in "_-") for c in token)


@given(st.text(min_size=1, max_size=12), documents, documents, st.none() | st.text(max_size=12))
def test_the_body_gives_back_the_stored_documents_and_headers_are_printable(
    event_type: str, data: dict[str, Any], metadata: dict[str, Any], ids: str | None
) -> None:
    if event_type in PERSONAL:
        return
    message = Encoder("tiu").encode(record(event_type, data, metadata, ids))
    body = json.loads(message.payload)
    assert (body["data"], body["metadata"]) == (data, metadata)
    assert body["correlation_id"] == ids
    assert message.subject.count(".") == 2
    assert all(value.isprintable() for value in message.headers.values())
    assert message.headers["Nats-Msg-Id"] == body["event_id"] == message.message_id


@given(
    st.sampled_from(sorted(PERSONAL)),
    st.text(min_size=1, max_size=12),
    st.sampled_from(["encrypted", "omit"]),
    st.booleans(),
)
def test_no_personal_field_leaves_in_plaintext(
    event_type: str, secret: str, mode: str, sealed: bool
) -> None:
    personal = PERSONAL[event_type]
    value: Any = {MARK: "k1", "ct": "AAAA"} if sealed else "plain:" + secret
    data = dict.fromkeys(personal, value) | {"other": 1}
    body = json.loads(Encoder("tiu", mode).encode(record(event_type, data, {}, None)).payload)  # type: ignore[arg-type]
    for name in personal:
        if sealed and mode == "encrypted":
            assert body["data"][name] == value
        else:
            assert name not in body["data"]
            assert name in body["withheld"]
    assert "plain:" not in json.dumps(body)
    assert body["data"]["other"] == 1
