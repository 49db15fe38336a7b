"""A loop probe: a task that asks to wake every 1 ms and records how late it woke.

Usable beside any case::

    async with LoopProbe() as probe:
        mark = probe.mark()
        await work()
        lag = probe.since(mark)   # Lag(max_ms, p99_ms, wakes)

A wake that comes late by L ms means the loop was held for about L ms by something
else: a library call that did not suspend, a garbage collection (the probe records
the longest collection of the window too, by the clock and by the collecting thread's
CPU: its work grows with the whole heap, the host's objects included; a clock time far
above the CPU time is the collecting thread waiting for a core or for the GIL), or, on a
shared machine, the CPU given to other processes (measure the probe alone for the
floor). The probe itself costs ~1,000 wakes per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

PERIOD = 0.001


@dataclass(frozen=True, slots=True)
class Lag:
    max_ms: float
    p99_ms: float
    wakes: int
    gc_max_ms: float = 0.0
    gc_cpu_max_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "max_ms": round(self.max_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "wakes": self.wakes,
            "gc_max_ms": round(self.gc_max_ms, 2),
            "gc_cpu_max_ms": round(self.gc_cpu_max_ms, 2),
        }


class LoopProbe:
    def __init__(self, period: float = PERIOD) -> None:
        self.period = period
        self.lags: list[float] = []
        # (ended at, seconds, seconds of the collecting thread's CPU)
        self.collections: list[tuple[float, float, float]] = []
        self._task: asyncio.Task[None] | None = None
        self._gc_started = (0.0, 0.0)

    def _on_gc(self, phase: str, _info: dict[str, int]) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        if phase == "start":
            self._gc_started = (now, cpu)
        else:
            started, cpu_started = self._gc_started
            self.collections.append((now, now - started, cpu - cpu_started))

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            started = clock()
            await asyncio.sleep(self.period)
            self.lags.append(max(0.0, clock() - started - self.period))

    async def settle(self) -> None:
        """Let the probe wake once, so a late wake is counted where it belongs (its
        lateness is recorded only when it wakes)."""
        await asyncio.sleep(self.period * 3)

    def mark(self) -> tuple[int, float]:
        return len(self.lags), time.perf_counter()

    def since(self, mark: tuple[int, float]) -> Lag:
        lags = self.lags[mark[0] :]
        mine = [(s, c) for end, s, c in self.collections if end >= mark[1]]
        gc_max = max((s for s, _ in mine), default=0.0) * 1000
        gc_cpu_max = max((c for _, c in mine), default=0.0) * 1000
        if not lags:
            return Lag(0.0, 0.0, 0, gc_max, gc_cpu_max)
        p99 = (
            statistics.quantiles(lags, n=100, method="inclusive")[98] if len(lags) >= 2 else lags[0]
        )
        return Lag(max(lags) * 1000, p99 * 1000, len(lags), gc_max, gc_cpu_max)

    async def __aenter__(self) -> LoopProbe:
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def reset_peak_rss() -> None:
    """Start a new high-water mark of this process's RSS (Linux ``clear_refs`` 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (``VmHWM``) since the last reset, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
