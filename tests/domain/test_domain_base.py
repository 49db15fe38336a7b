import itertools
import json
import types
import unicodedata
import uuid
from datetime import datetime, timedelta
from typing import ClassVar

import pytest
from domain_support import T0, registered
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import domain
from domain import (
    Command,
    CommandContext,
    Event,
    InvalidCommand,
    SecurityPolicy,
    UnknownEventType,
    decode_event,
    encode_event,
    registered_event_types,
    users,
)
from domain.base import clean_text

PERSONAL_NAMES = {"email", "previous_email", "username", "display_name", "ip", "user_agent"}


def test_every_event_field_holding_personal_data_is_marked_with_its_subject():
    for event_type, cls in registered_event_types().items():
        personal = PERSONAL_NAMES & cls.model_fields.keys()
        assert personal <= cls.personal_fields, event_type
        if cls.personal_fields:
            assert cls.subject_field in cls.model_fields, event_type


def test_every_registered_event_class_is_frozen_and_forbids_extra_fields():
    for cls in registered_event_types().values():
        assert cls.model_config.get("frozen") is True
        assert cls.model_config.get("extra") == "forbid"


def test_a_duplicate_event_type_is_refused_at_class_definition():
    with pytest.raises(TypeError, match="already registered"):

        class Again(Event):
            event_type: ClassVar[str] = "UserRegistered"


def test_an_event_class_without_event_type_is_refused():
    with pytest.raises(TypeError, match="must set event_type"):

        class Nameless(Event):
            pass


def test_personal_fields_must_name_real_fields_and_come_with_a_subject():
    with pytest.raises(TypeError, match="unknown fields"):

        class Typo(Event):
            event_type: ClassVar[str] = "TestTypo"
            personal_fields: ClassVar[frozenset[str]] = frozenset({"emial"})
            email: str

    with pytest.raises(TypeError, match="subject_field"):

        class Orphan(Event):
            event_type: ClassVar[str] = "TestOrphan"
            personal_fields: ClassVar[frozenset[str]] = frozenset({"email"})
            email: str


def test_encode_then_decode_gives_the_same_event():
    event = registered("alice")
    event_type, version, data = encode_event(event)
    assert (event_type, version) == ("UserRegistered", 2)
    assert data["roles"] == ["member"]
    assert data["at"] == "2024-12-07T09:00:00Z"
    assert decode_event(event_type, version, data) == event


def test_a_v1_user_registered_is_upcast_name_to_display_name():
    current = registered("alice")
    v1 = current.model_dump(mode="json", exclude={"display_name"}) | {"name": "Alice A."}
    decoded = decode_event("UserRegistered", 1, v1)
    assert decoded == current.model_copy(update={"display_name": "Alice A."})
    assert "name" in v1  # the stored dict is not mutated


def test_a_v1_user_registered_stored_as_text_is_parsed_then_upcast():
    current = registered("alice")
    v1 = current.model_dump(mode="json", exclude={"display_name"}) | {"name": "Alice A."}
    decoded = decode_event("UserRegistered", 1, json.dumps(v1))
    assert decoded == current.model_copy(update={"display_name": "Alice A."})


def test_text_that_json_mode_refuses_decodes_as_the_stdlib_reads_it():
    # pydantic's JSON mode refuses a lone surrogate; json.loads keeps it, as the dict
    # path always did, so the stored text decodes to what the stored dict decodes to.
    stored = registered("alice").model_dump(mode="json") | {"display_name": "A\ud800"}
    text = json.dumps(stored)  # ...A\\ud800...
    assert json.loads(text)["display_name"] == "A\ud800"
    from_text = decode_event("UserRegistered", 2, text)
    assert from_text == decode_event("UserRegistered", 2, json.loads(text))
    assert from_text.display_name == "A\ud800"


def test_text_refused_by_both_readings_raises_the_validation_error():
    stored = registered("alice").model_dump(mode="json") | {"user_id": "no spaces allowed"}
    with pytest.raises(ValidationError, match="user_id"):
        decode_event("UserRegistered", 2, json.dumps(stored))


def test_a_v1_user_registered_with_an_empty_name_has_no_display_name():
    v1 = registered("alice").model_dump(mode="json", exclude={"display_name"}) | {"name": ""}
    decoded = decode_event("UserRegistered", 1, v1)
    assert isinstance(decoded, users.UserRegistered)
    assert decoded.display_name is None


def test_decoding_an_unknown_type_or_a_future_version_raises_unknown_event_type():
    with pytest.raises(UnknownEventType) as info:
        decode_event("Nope", 1, {})
    assert info.value.event_type == "Nope"
    with pytest.raises(UnknownEventType, match=r"knows versions 1\.\.2"):
        decode_event("UserRegistered", 3, {})


def test_events_and_commands_are_immutable():
    event = registered("alice")
    with pytest.raises(ValidationError):
        event.user_id = "mallory"  # type: ignore[misc]
    with pytest.raises(InvalidCommand) as refused:
        users.UnlockUser(user_id="alice", extra_field=1)  # type: ignore[call-arg]
    assert refused.value.field == "extra_field"


def test_each_command_gets_a_fresh_command_id_unless_given_one():
    a, b = users.UnlockUser(user_id="alice"), users.UnlockUser(user_id="alice")
    assert a.command_id != b.command_id
    assert users.UnlockUser(user_id="alice", command_id="c-1").command_id == "c-1"
    assert isinstance(a, Command)


def test_a_naive_now_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        CommandContext(now=datetime(2025, 1, 1))
    assert CommandContext(now=T0).policy == SecurityPolicy()


def test_the_default_policy_and_its_limits():
    policy = SecurityPolicy()
    assert (policy.lockout_threshold, policy.password_min_length) == (5, 12)
    assert policy.session_lifetime == timedelta(hours=12)
    with pytest.raises(ValueError, match="at least 64"):
        SecurityPolicy(password_max_length=63)
    with pytest.raises(ValueError, match="lockout_threshold"):
        SecurityPolicy(lockout_threshold=0)
    with pytest.raises(ValueError, match="positive"):
        SecurityPolicy(session_lifetime=timedelta(0))


def test_the_package_exports_exactly_its_public_names():
    assert sorted(domain.__all__) == sorted(set(domain.__all__))
    for name in domain.__all__:
        assert hasattr(domain, name), name


def test_new_ids_are_version_7_uuids_that_sort_by_the_millisecond_they_were_made(monkeypatch):
    start = 1_796_000_000_000 * 1_000_000  # ns
    clock = (start + k * 1_000_000 + 999_999 for k in itertools.count())
    monkeypatch.setattr(domain.base, "time", types.SimpleNamespace(time_ns=lambda: next(clock)))
    ids = [domain.base.new_id() for _ in range(200)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 200
    parsed = [uuid.UUID(i) for i in ids]
    assert ids == [str(p) for p in parsed], "the canonical text: lower-case hex, dashed"
    assert {p.version for p in parsed} == {7}
    assert {p.variant for p in parsed} == {uuid.RFC_4122}
    assert [p.int >> 80 for p in parsed] == [start // 1_000_000 + k for k in range(200)]
    command = users.RegisterUser(
        username="ada", email="ada@example.com", password="correct horse battery staple"
    )
    assert uuid.UUID(command.user_id).version == 7


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40), multiline=st.booleans())
def test_clean_text_refuses_exactly_the_texts_holding_a_control_character(text, multiline):
    """Any character of a Unicode "C" category is refused (line breaks and tabs allowed
    when ``multiline``), whether or not the text is otherwise printable."""
    allowed = "\n\r\t" if multiline else ""
    cleaned = unicodedata.normalize("NFC", text.strip())
    control = any(unicodedata.category(c).startswith("C") and c not in allowed for c in cleaned)
    if not cleaned or control:
        with pytest.raises(InvalidCommand):
            clean_text(text, "title", max_length=1000, multiline=multiline)
    else:
        assert clean_text(text, "title", max_length=1000, multiline=multiline) == cleaned


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x7f", "\u200b", "\ud800", "\U000e0001"])
def test_clean_text_refuses_a_control_character_inside_printable_words(char):
    with pytest.raises(InvalidCommand):
        clean_text(f"plan {char}B", "title", max_length=100, multiline=True)
