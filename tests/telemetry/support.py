"""The SDK's in-memory span exporter and metric reader, installed through
``eventstore.telemetry.configure`` for one test (or block) and removed after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eventstore import telemetry


@dataclass
class Telemetry:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name == name]

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        sid = parent.context.span_id
        return [s for s in self.finished() if s.parent is not None and s.parent.span_id == sid]

    def descendants(self, parent: ReadableSpan) -> list[ReadableSpan]:
        found, frontier = [], [parent]
        while frontier:
            kids = [k for p in frontier for k in self.children(p)]
            found.extend(kids)
            frontier = kids
        return found

    def points(self, name: str) -> list[Any]:
        """The data points of metric ``name`` as collected now."""
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def value(self, name: str, **attributes: Any) -> Any:
        for point in self.points(name):
            if all(point.attributes.get(k) == v for k, v in attributes.items()):
                return getattr(point, "value", None) if hasattr(point, "value") else point
        return None


@contextmanager
def in_memory(*, stage_spans: bool = False) -> Iterator[Telemetry]:
    """Report to the SDK's in-memory exporter and reader while the block runs."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.configure(
        tracer_provider=tracer_provider, meter_provider=meter_provider, stage_spans=stage_spans
    )
    try:
        yield Telemetry(spans, reader, tracer_provider)
    finally:
        telemetry.configure()
        tracer_provider.shutdown()
        meter_provider.shutdown()
