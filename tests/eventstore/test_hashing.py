"""Canonical JSON: the text every stored hash is computed over, so it never changes.

The definition is the stdlib's ``json.dumps`` (sorted keys, no spaces, UTF-8 kept)
over the document with integral floats written as integers. ``canonical_json`` writes
plain documents with orjson for speed; these tests hold it to the definition.
"""

from __future__ import annotations

import enum
import json
import math
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from eventstore.hashing import canonical_json, hash_tail, json_text, recorded_at_text


def _reference_normalise(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN and infinity are not JSON")
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _reference_normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_reference_normalise(v) for v in value]
    return value


def reference(value: Any) -> str:
    """The definition of canonical JSON, independent of the code under test."""
    return json.dumps(
        _reference_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def outcome(fn: Any, value: Any) -> tuple[str, str]:
    try:
        return "text", fn(value)
    except (TypeError, ValueError) as error:
        return "refused", type(error).__name__


#: Any code point; ASCII with its control characters; the surrogates and their
#: neighbours. Integers inside and beyond 64 bits.
texts = (
    st.text(st.characters(exclude_categories=()))
    | st.text(st.characters(max_codepoint=0x7F))
    | st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010))
)
integers = st.integers() | st.integers(min_value=-(2**63) - 2, max_value=2**64 + 2)
plain_values = st.recursive(
    st.none() | st.booleans() | integers | texts,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(texts, inner, max_size=4)
    ),
    max_leaves=16,
)
any_values = st.recursive(
    st.none()
    | st.booleans()
    | integers
    | texts
    | st.floats()
    | st.sampled_from([uuid.UUID(int=1), datetime(2026, 1, 1, tzinfo=UTC), {1, 2}]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(texts | st.integers() | st.booleans(), inner, max_size=3)
        | st.dictionaries(texts, inner, max_size=3).map(OrderedDict)
    ),
    max_leaves=10,
)


@given(value=plain_values)
@example(value={"b": [1, True, None], "a": "é\n\x01\x7f\u2028", "\U0001f600": {}, "\uffff": 0})
@example(value={"u64": 2**64 - 1, "i64": -(2**63), "beyond": 2**64, "below": -(2**63) - 1})
@example(value={"lone": "\ud800", "nul": "\x00"})
def test_canonical_json_of_plain_documents_is_the_stdlib_text(value):
    assert canonical_json(value) == reference(value)


@given(value=any_values)
@example(value={"small": 1e-05, "big": 1.5e300, "integral": 1e16, "neg": -0.0})
@example(value={1: "int key", "1": "str key"})
def test_canonical_json_of_any_value_is_the_stdlib_text_or_the_stdlib_refusal(value):
    assert outcome(canonical_json, value) == outcome(reference, value)


def test_canonical_json_text_is_pinned():
    # The exact text of a known document: stored hashes depend on it byte for byte.
    document = {"b": [1, True, None, 2.5, 3.0], "a": 'é\n\t\x01"\\', "\U0001f600": {}, "Z": -7}
    assert (
        canonical_json(document)
        == '{"Z":-7,"a":"é\\n\\t\\u0001\\"\\\\","b":[1,true,null,2.5,3],"\U0001f600":{}}'
    )


class Colour(enum.Enum):
    RED = "red"


class Level(enum.StrEnum):
    HIGH = "high"


@pytest.mark.parametrize(
    "value",
    [{"at": datetime(2026, 1, 1, tzinfo=UTC)}, {"id": uuid.UUID(int=3)}, {"c": Colour.RED}],
    ids=["datetime", "uuid", "enum"],
)
def test_values_the_stdlib_cannot_write_are_refused_not_serialised_by_orjson(value):
    with pytest.raises(TypeError):
        canonical_json(value)


def test_a_str_enum_is_written_as_its_string_as_the_stdlib_does():
    assert (
        canonical_json({"level": Level.HIGH})
        == '{"level":"high"}'
        == reference({"level": Level.HIGH})
    )


@given(
    value=st.none() | texts,
    actor=st.none() | texts,
    event_type=texts,
)
def test_hashed_scalars_are_written_as_the_stdlib_writes_them(value, actor, event_type):
    assert json_text(value) == json.dumps(value, ensure_ascii=False)
    at = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    tail = hash_tail(
        event_id="e",
        event_type=event_type,
        schema_version=2,
        data_json="{}",
        metadata_json="{}",
        actor_id=actor,
        correlation_id=None,
        causation_id=value,
        command_id="c",
        recorded_at=at,
    )
    middle = json.dumps(["e", event_type, 2], separators=(",", ":"), ensure_ascii=False)
    end = json.dumps(
        [actor, None, value, "c", at.isoformat(timespec="microseconds")],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert tail == f",{middle[1:-1]},{{}},{{}},{end[1:]}"


@given(
    first=st.datetimes(timezones=st.just(UTC)),
    later=st.lists(st.integers(min_value=0, max_value=130_000_000), max_size=4),
)
@example(first=datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), later=[1, 60_000_000])
@example(first=datetime(1, 1, 1, tzinfo=UTC), later=[0])
def test_a_utc_stamp_is_written_as_isoformat_writes_it(first, later):
    """The stamp's text is hashed: written from a kept minute, it is still isoformat's,
    stamp after stamp, within a minute and across minutes, days and years."""
    stamp = first
    for step in [0, *later]:
        try:
            stamp = stamp + timedelta(microseconds=step)
        except OverflowError:
            break
        assert recorded_at_text(stamp) == stamp.isoformat(timespec="microseconds")
    before = first - timedelta(seconds=61) if first.year > 1 else first
    assert recorded_at_text(before) == before.isoformat(timespec="microseconds")
