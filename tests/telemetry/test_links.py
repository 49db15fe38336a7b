"""Links from a projector batch to the commands named in its events' metadata: any
metadata (an old event, a hostile writer) gives valid, distinct links or none."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventstore import telemetry

hex_id = st.integers(min_value=0, max_value=2**128 - 1)
span_id = st.integers(min_value=0, max_value=2**64 - 1)
traceparent = st.builds(lambda t, s: f"00-{t:032x}-{s:016x}-01", hex_id, span_id)
value = st.one_of(traceparent, st.text(max_size=60), st.integers(), st.none())
metadata = st.dictionaries(st.sampled_from(["traceparent", "command", "x"]), value, max_size=3)


# Lists long enough to pass the 32-link cap: slow to draw on a loaded machine.
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(metadata, max_size=80))
def test_links_are_the_distinct_valid_traceparents_at_most_32(metadatas):
    links = telemetry.links_of(metadatas)
    expected = []
    for m in metadatas:
        parent = m.get("traceparent")
        if not isinstance(parent, str) or parent in expected:
            continue
        parts = parent.split("-")
        lowercase_hex = set("0123456789abcdef")
        if (
            [len(p) for p in parts] == [2, 32, 16, 2]
            and parts[0] == "00"
            and all(set(p) <= lowercase_hex for p in parts)
            and set(parts[1]) != {"0"}
            and set(parts[2]) != {"0"}
        ):
            expected.append(parent)
    expected = expected[: telemetry.MAX_LINKS]
    got = [f"00-{k.context.trace_id:032x}-{k.context.span_id:016x}-01" for k in links]
    assert got == expected


def test_a_malformed_traceparent_gives_no_link():
    bad = [
        "00-zz-11-01",
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # an all-zero trace id is invalid
        "00- " + "1" * 31 + "-" + "1" * 16 + "-01",
        "",
        "00-1-2-3-4",
    ]
    assert telemetry.links_of([{"traceparent": b} for b in bad]) == []
