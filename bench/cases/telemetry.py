"""Case 8: what tracing and metrics cost on the command path.

Case 3's tiu workload (``CreateTask`` with inline projections, 1 and 8 callers), run
without an OpenTelemetry SDK (the default: the API's no-op path) and with the SDK
recording every span into an in-memory exporter (a simple, synchronous span processor)
and every metric into an in-memory reader. The two take turns run by run, each on a
database of its own. The target: at most 5% slower with the SDK.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.cases.command import CALLERS, _service
from bench.common import Place, Result, summarise, timed
from bench.context import Context
from domain import tasks
from eventstore import telemetry


async def _commands(place: Place, n: int, callers: int, sdk: bool) -> AsyncIterator[float]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    service, owner, project = await _service(place)
    try:
        while True:
            spans.clear()
            if sdk:
                telemetry.configure(tracer_provider=tracer_provider, meter_provider=meter_provider)
            else:
                telemetry.configure()

            async def caller(k: int) -> None:
                for i in range(n // callers):
                    await service.dispatch(
                        tasks.CreateTask(project_id=project, title=f"Task {k}.{i}"),
                        service.context(owner),
                    )

            async def go() -> None:
                await asyncio.gather(*(caller(k) for k in range(callers)))

            took = await timed(go)
            if sdk and len(spans.get_finished_spans()) < n:
                raise RuntimeError("the SDK run recorded fewer spans than commands")
            yield took
    finally:
        telemetry.configure()
        await service.aclose()
        tracer_provider.shutdown()
        meter_provider.shutdown()


async def case10(ctx: Context) -> list[Result]:
    n = 400 if ctx.cfg.quick else 2000
    out: list[Result] = []
    for callers in CALLERS:
        label = f"10 telemetry: CreateTask, {n} commands, {callers} caller(s)"
        await ctx.fresh(migrate=("tiu", "raw"))
        plain, traced = await ctx.take_turns(
            label,
            _commands(ctx.place("tiu"), n, callers, sdk=False),
            _commands(ctx.place("raw"), n, callers, sdk=True),
        )
        without = summarise(label, ctx.backend, "tiu", plain, n, "ops/s", "no SDK")
        with_sdk = summarise(label, ctx.backend, "tiu+otel", traced, n, "ops/s", "")
        overhead = with_sdk.median / without.median - 1
        with_sdk.note = f"SDK + in-memory exporters: {overhead:+.1%} time vs no SDK"
        with_sdk.extra["overhead"] = overhead
        out += [without, with_sdk]
    return out
