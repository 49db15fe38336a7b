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

``LoopProbe(trace_over=0.005)`` also starts a :class:`StallTracer`: a watchdog thread
that, while the probe's wake is more than that late, samples the loop thread's stack
(and the other threads' innermost frames), so a stall can be traced to the code that
held the loop, or to a loop idle in its selector but not running (a thread holding
the GIL, or no free core).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
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
    #: The longest collection's generation and the thread it ran on: one that a thread
    #: of a lower priority runs holds the GIL while it waits for a core.
    gc_where: str = ""
    #: The share of the time the loop thread was runnable but given no core (the
    #: machine's load, not the loop's work): where it is above a few percent, the lag
    #: measures the machine as much as the code.
    waiting_for_core: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "max_ms": round(self.max_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "wakes": self.wakes,
            "gc_max_ms": round(self.gc_max_ms, 2),
            "gc_cpu_max_ms": round(self.gc_cpu_max_ms, 2),
            "gc_where": self.gc_where,
            "waiting_for_core": round(self.waiting_for_core, 3),
        }


@dataclass(slots=True)
class Stall:
    """One late wake, as the watchdog saw it: when it began, how long the loop was
    held (the wake's lateness once it woke) and the stacks sampled meanwhile."""

    started: float
    wake: int  # the index of the late wake in the probe's lags
    cpu_started: float  # the loop thread's CPU clock when the stall was first seen
    ms: float = 0.0
    #: The loop thread's CPU time from the first sample to the wake: near the stall's
    #: length, the loop ran code; far below, it waited (for the GIL, or for a core).
    cpu_ms: float = 0.0
    #: Of the rest, the time the loop thread was runnable but given no core (Linux
    #: schedstat's run delay: the machine's load); what remains it slept, mostly
    #: waiting for the GIL another thread of the process held.
    runq_ms: float = 0.0
    runq_started: float = 0.0
    samples: list[str] = field(default_factory=list)


class StallTracer:
    """A watchdog thread sampling the loop thread's stack every ``interval`` while the
    probe's next wake is more than ``threshold`` late."""

    def __init__(self, probe: LoopProbe, threshold: float, interval: float = 0.001) -> None:
        self.probe = probe
        self.threshold = threshold
        self.interval = interval
        self.stalls: list[Stall] = []
        self._loop_thread = threading.get_ident()
        self._loop_clock = time.pthread_getcpuclockid(self._loop_thread)
        self._schedstat = schedstat_of_this_thread()
        self._task = f"/proc/self/task/{threading.get_native_id()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-tracer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        probe = self.probe
        current: Stall | None = None
        seen = probe.beats
        while not self._stop.wait(self.interval):
            beats, due = probe.beats, probe.due
            if current is not None and beats != seen:
                current.ms = probe.lags[current.wake] * 1000
                cpu = time.clock_gettime(self._loop_clock) - current.cpu_started
                current.cpu_ms = cpu * 1000
                current.runq_ms = (self._run_delay() - current.runq_started) * 1000
                self.stalls.append(current)
                current = None
            seen = beats
            late = time.perf_counter() - due
            if late > self.threshold:
                if current is None:
                    current = Stall(due, beats, time.clock_gettime(self._loop_clock))
                    current.runq_started = self._run_delay()
                current.samples.append(self._sample())

    def _run_delay(self) -> float:
        return run_delay(self._schedstat)

    def _sample(self) -> str:
        # Another thread's frames are only safe to walk while it cannot run: the loop
        # thread unwinding a frame this thread is reading crashed the interpreter
        # (CPython 3.11, a segfault in 1 of 2 runs of case 9 with --trace-stalls). So the
        # walk keeps the GIL: no call that releases it (traceback's source lookup reads
        # files), and a long switch interval for the threads that start waiting now (one
        # already waiting keeps the old 5 ms: the walk takes microseconds).
        waiting = self._kernel_state()
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1.0)
        try:
            frames = sys._current_frames()  # the only way to see another thread
            loop = frames.pop(self._loop_thread, None)
            me = threading.get_ident()
            lines: list[str] = []
            frame = loop
            while frame is not None and len(lines) < 24:
                code = frame.f_code
                if code.co_name == "_run_once":  # below it: the loop's own runner
                    lines.append("(loop)")
                    break
                lines.append(f"{_short(code.co_filename)}:{frame.f_lineno} {code.co_name}")
                if code.co_name in _STATEMENT_RUNNERS and code.co_filename.endswith(_DRIVER):
                    # Which inline statement: its SQL, cut short.
                    operation = frame.f_locals.get("operation")
                    if isinstance(operation, str):
                        lines.append(f"sql: {' '.join(operation.split())[:120]}")
                frame = frame.f_back
            others = sorted(
                f"{_short(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}"
                for ident, f in frames.items()
                if ident != me
            )
            del frames, loop, frame
        finally:
            sys.setswitchinterval(interval)
        stack = " < ".join(lines) + ("  || threads: " + "; ".join(others) if others else "")
        return f"[{waiting}] {stack}"

    def _kernel_state(self) -> str:
        """The loop thread's state as the kernel sees it, read before the walk (reading
        a file releases the GIL): ``R`` running or waiting for a core, ``S`` asleep,
        ``D`` waiting for the disk, and the kernel function it sleeps in (Linux
        ``wchan``: a page-cache or block-layer function, ``folio_wait_bit_common``,
        ``io_schedule``, ..., for a read of the file). The read itself gives the GIL
        up, so a loop thread that waited for the GIL has it by then and shows ``R``: a
        stall whose samples show ``R`` and whose time the CPU and the wait for a core
        do not account for waited for the GIL; one waiting for the disk shows ``D``."""
        try:
            with open(f"{self._task}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
            with open(f"{self._task}/wchan") as wchan:
                return f"{state} {wchan.read().strip() or '-'}"
        except (OSError, IndexError):
            return "?"

    def since(self, started: float) -> list[Stall]:
        return [s for s in self.stalls if s.started >= started]


def schedstat_of_this_thread() -> Path:
    return Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")


def run_delay(schedstat: Path) -> float:
    """A thread's time so far runnable but waiting for a core, in seconds (Linux
    schedstat; 0 where the kernel does not say)."""
    try:
        return int(schedstat.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


#: Where a sample names the statement the loop runs (the driver's cursor methods).
_DRIVER = "sqlite_driver.py"
_STATEMENT_RUNNERS = frozenset({"execute", "executemany"})


def _short(filename: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def summarize(stalls: list[Stall], top: int = 5) -> str:
    """The longest stalls, each with its most frequent sampled stack."""
    out = []
    for stall in sorted(stalls, key=lambda s: s.ms, reverse=True)[:top]:
        counts = collections.Counter(stall.samples).most_common(2)
        out.append(
            f"      stall {stall.ms:6.1f} ms (loop thread since seen: CPU {stall.cpu_ms:5.1f} ms,"
            f" waiting for a core {stall.runq_ms:5.1f} ms), {len(stall.samples)} samples"
        )
        out.extend(f"        {n}x {stack}" for stack, n in counts)
    return "\n".join(out)


class LoopProbe:
    def __init__(self, period: float = PERIOD, trace_over: float | None = None) -> None:
        self.period = period
        self.lags: list[float] = []
        #: Wakes so far and when the next one is due (read by the stall tracer).
        self.beats = 0
        self.due = time.perf_counter() + period
        self.tracer = StallTracer(self, trace_over) if trace_over else None
        # (ended at, seconds, seconds of the collecting thread's CPU)
        self.collections: list[tuple[float, float, float, str]] = []
        self._task: asyncio.Task[None] | None = None
        self._gc_started = (0.0, 0.0)
        self._schedstat = schedstat_of_this_thread()  # made in the loop's thread

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        if phase == "start":
            self._gc_started = (now, cpu)
        else:
            started, cpu_started = self._gc_started
            where = f"gen {info['generation']} on {threading.current_thread().name}"
            self.collections.append((now, now - started, cpu - cpu_started, where))

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            started = clock()
            self.due = started + self.period
            await asyncio.sleep(self.period)
            self.lags.append(max(0.0, clock() - started - self.period))
            self.beats += 1

    async def settle(self) -> None:
        """Let the probe wake once, so a late wake is counted where it belongs (its
        lateness is recorded only when it wakes)."""
        await asyncio.sleep(self.period * 3)

    def mark(self) -> tuple[int, float, float]:
        return len(self.lags), time.perf_counter(), run_delay(self._schedstat)

    def since(self, mark: tuple[int, float, float]) -> Lag:
        elapsed = time.perf_counter() - mark[1]
        waiting = (run_delay(self._schedstat) - mark[2]) / elapsed if elapsed > 0 else 0.0
        lags = self.lags[mark[0] :]
        mine = [(s, c, w) for end, s, c, w in self.collections if end >= mark[1]]
        longest = max(mine, default=(0.0, 0.0, ""))
        gc_max, gc_where = longest[0] * 1000, longest[2]
        gc_cpu_max = max((c for _, c, _ in mine), default=0.0) * 1000
        if not lags:
            return Lag(0.0, 0.0, 0, gc_max, gc_cpu_max, gc_where, waiting)
        p99 = (
            statistics.quantiles(lags, n=100, method="inclusive")[98] if len(lags) >= 2 else lags[0]
        )
        return Lag(max(lags) * 1000, p99 * 1000, len(lags), gc_max, gc_cpu_max, gc_where, waiting)

    async def __aenter__(self) -> LoopProbe:
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.create_task(self._run())
        if self.tracer is not None:
            self.tracer.start()
        await asyncio.sleep(0)
        return self

    async def __aexit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self.tracer is not None:
            self.tracer.stop()
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
