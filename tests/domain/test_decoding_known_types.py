"""``decode_event`` remembers each event type's validator after its first decode; every
later decode, of every registered type, gives what validating the stored document
gives, and the paths beside the common one (older versions, erased fields, text JSON
mode refuses, unknown versions) still decide as before."""

from __future__ import annotations

import enum
import json
import typing
from datetime import UTC, datetime
from typing import Any

import pytest
from domain_support import registered
from pydantic import TypeAdapter, ValidationError

import domain  # registers every event type
from domain import UnknownEventType, decode_event, encode_event, registered_event_types
from domain.base import ERASED, Event
from eventstore.hashing import canonical_json

assert domain

_PLAIN_CANDIDATES: tuple[Any, ...] = (
    "0190a1b2c3d47e8f9a0b1c2d3e4f5a6b",
    datetime(2026, 3, 1, 9, 30, tzinfo=UTC),
    7,
    True,
    {"k": "v"},
    (),
    None,
)


def _choices(annotation: Any) -> list[Any]:
    """The members of the enums and the values of the literals ``annotation`` names."""
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return list(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [m for arg in typing.get_args(annotation) for m in _choices(arg)]


def _example_value(annotation: Any) -> Any:
    """A value of ``annotation``: one of the choices it names, else the first plain
    candidate it accepts (a tuple of enums gets one member)."""
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)
    choices = _choices(annotation)
    for candidate in (*choices, *((c,) for c in choices[:1]), *_PLAIN_CANDIDATES):
        try:
            adapter.validate_python(candidate)
        except ValidationError:
            continue
        return candidate
    raise AssertionError(f"no example value for {annotation}")


def example_event(cls: type[Event]) -> Event:
    return cls(**{name: _example_value(f.annotation) for name, f in cls.model_fields.items()})


@pytest.mark.parametrize("event_type", sorted(registered_event_types()))
def test_every_event_type_decodes_from_its_stored_text_the_same_before_and_after_its_first_decode(
    event_type: str,
) -> None:
    event = example_event(registered_event_types()[event_type])
    kind, version, data = encode_event(event)
    text = canonical_json(data)
    reference = type(event).model_validate(json.loads(text))
    assert reference == event
    for _ in range(2):  # the first decode of a type may be its first
        for stored in (text, text.encode(), data):
            decoded = decode_event(kind, version, stored)
            assert decoded == reference
            assert type(decoded) is type(event)


def test_an_older_version_is_still_upcast_once_its_type_was_decoded() -> None:
    current = registered("alice")
    kind, version, data = encode_event(current)
    decode_event(kind, version, canonical_json(data))
    v1 = {k: v for k, v in data.items() if k != "display_name"} | {"name": "Alice A."}
    decoded = decode_event(kind, 1, json.dumps(v1))
    assert decoded == current.model_copy(update={"display_name": "Alice A."})


def test_erased_fields_still_decode_as_erased_once_their_type_was_decoded() -> None:
    current = registered("alice")
    kind, version, data = encode_event(current)
    decode_event(kind, version, canonical_json(data))
    decoded = decode_event(kind, version, canonical_json(data), erased=("email",))
    assert isinstance(decoded, type(current))
    assert decoded.email == ERASED
    assert decoded.username == current.username


def test_text_json_mode_refuses_still_decodes_as_the_stdlib_reads_it_once_its_type_was_decoded():
    stored = registered("alice").model_dump(mode="json") | {"display_name": "A\ud800"}
    text = json.dumps(stored)
    decode_event("UserRegistered", 2, canonical_json(registered("bob").model_dump(mode="json")))
    assert decode_event("UserRegistered", 2, text).display_name == "A\ud800"


def test_an_unknown_version_still_raises_unknown_event_type_once_its_type_was_decoded():
    data = registered("alice").model_dump(mode="json")
    decode_event("UserRegistered", 2, canonical_json(data))
    with pytest.raises(UnknownEventType, match=r"knows versions 1\.\.2"):
        decode_event("UserRegistered", 3, canonical_json(data))
    with pytest.raises(UnknownEventType):
        decode_event("UserRegistered", 0, canonical_json(data))


def test_an_invalid_stored_text_still_raises_the_validation_error_once_its_type_was_decoded():
    good = registered("alice").model_dump(mode="json")
    decode_event("UserRegistered", 2, canonical_json(good))
    with pytest.raises(ValidationError, match="user_id"):
        decode_event("UserRegistered", 2, canonical_json(good | {"user_id": "no spaces"}))
