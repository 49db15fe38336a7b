"""docs/events.md is what the code registers: every event type, version, field and
upcaster."""

from pathlib import Path

from domain import registered_event_types, registered_upcasters
from tests.docs.event_catalogue import catalogue

PAGE = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def test_the_event_catalogue_page_is_generated_from_the_code():
    assert PAGE.read_text() == catalogue(), (
        "docs/events.md is stale: python -m tests.docs.event_catalogue > docs/events.md"
    )


def test_the_catalogue_names_every_event_type_and_upcaster():
    text = catalogue()
    for event_type, cls in registered_event_types().items():
        assert f"### `{event_type}` (v{cls.schema_version})" in text
    for _event_type, version in registered_upcasters():
        assert f"Upcaster v{version} -> v{version + 1}" in text
