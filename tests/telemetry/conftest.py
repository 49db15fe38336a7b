from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.telemetry.support import Telemetry, in_memory


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    with in_memory() as telemetry:
        yield telemetry


@pytest.fixture
def otel_stages() -> Iterator[Telemetry]:
    """As ``otel``, with a child span for each stage of a command."""
    with in_memory(stage_spans=True) as telemetry:
        yield telemetry
