from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.telemetry.support import Telemetry, in_memory


@pytest.fixture
def otel() -> Iterator[Telemetry]:
    with in_memory() as telemetry:
        yield telemetry
