"""Case 10: what tracing and metrics cost on the command path.

Case 3's tiu workload (``CreateTask`` with inline projections, 1 and 8 callers), four
ways, taking turns run by run, each on a database of its own:

* no SDK (the default: the API's no-op path);
* the SDK recording every span into an in-memory exporter (a simple, synchronous span
  processor) and every metric into an in-memory reader: tiu's default, one span per
  command with its stages as durations;
* the same with ``stage_spans=True``: load, decide, write and the write's stages as
  child spans;
* the floor: tiu's telemetry off, each command inside one empty SDK span with one
  histogram record, the least any tracing of commands can cost.

The target: at most 5% slower with the SDK. Times are CPU seconds of the process (the
machine is shared; wall time moved with the load of other processes more than with
the code).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.cases.command import CALLERS, _service
from bench.common import Place, Result, summarise
from bench.context import Context
from domain import tasks
from eventstore import telemetry

#: How each system reports: tiu's telemetry off, on, on with stage spans, or off with
#: one bare span and one histogram record around each command.
MODES = ("none", "sdk", "stages", "floor")


async def _commands(place: Place, n: int, callers: int, mode: str) -> AsyncIterator[float]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    tracer = tracer_provider.get_tracer("bench")
    histogram = meter_provider.get_meter("bench").create_histogram("bench.command.duration")
    labels = {"tiu.command.type": "CreateTask", "tiu.command.outcome": "ok"}
    service, owner, project = await _service(place)
    try:
        while True:
            spans.clear()
            if mode in ("sdk", "stages"):
                telemetry.configure(
                    tracer_provider=tracer_provider,
                    meter_provider=meter_provider,
                    stage_spans=mode == "stages",
                )
            else:
                telemetry.configure()

            async def caller(k: int) -> None:
                for i in range(n // callers):
                    command = tasks.CreateTask(project_id=project, title=f"Task {k}.{i}")
                    if mode != "floor":
                        await service.dispatch(command, service.context(owner))
                        continue
                    with tracer.start_as_current_span("tiu.command CreateTask"):
                        started = time.perf_counter()
                        await service.dispatch(command, service.context(owner))
                        histogram.record(time.perf_counter() - started, labels)

            started = time.process_time()
            await asyncio.gather(*(caller(k) for k in range(callers)))
            took = time.process_time() - started
            if mode != "none" and len(spans.get_finished_spans()) < n:
                raise RuntimeError("an SDK run recorded fewer spans than commands")
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
        label = f"10 telemetry: CreateTask, {n} commands, {callers} caller(s), CPU s"
        places = [Place(ctx.cfg, ctx.backend, "tiu", ctx.ws.tmpdir, f"otel_{m}") for m in MODES]
        for place in places:
            await place.reset()
            await place.migrate()
        runs = await ctx.take_turns(
            label,
            *(
                _commands(place, n, callers, mode)
                for place, mode in zip(places, MODES, strict=True)
            ),
        )
        without = summarise(label, ctx.backend, "tiu", runs[0], n, "ops/s", "no SDK")
        out.append(without)
        notes = {
            "sdk": "SDK, default (one span a command)",
            "stages": "SDK, stage_spans=True",
            "floor": "floor: one empty span + one histogram record, tiu's telemetry off",
        }
        for mode, times in zip(MODES[1:], runs[1:], strict=True):
            result = summarise(label, ctx.backend, f"tiu+{mode}", times, n, "ops/s", "")
            overhead = result.median / without.median - 1
            result.note = f"{notes[mode]}: {overhead:+.1%} CPU vs no SDK"
            result.extra["overhead"] = overhead
            out.append(result)
    return out
