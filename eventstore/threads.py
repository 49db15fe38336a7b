"""Thread pools of tiu's own, below the scheduling priority of the host's threads.

Work tiu sends off the event loop because it takes CPU (bcrypt; SQLite statements whose
cost grows with the data: counts, audit queries, pages of the log; WAL checkpoints)
runs on pools of its own rather than on the loop's default executor, which is the
host's, and for two reasons at a lower priority:

* **Their own threads.** Work queued on the default executor waits behind whatever the
  host and tiu's other callers put there (eight logins once took every thread there,
  and counts waited behind hashes). A thread a pool starts is started from the loop,
  which waits until the new thread runs (measured up to 15 ms on a busy machine): a
  pool's threads are started together, from a worker thread, at its first use.
* **A lower priority** (Linux: ``nice`` +:data:`NICENESS` for these threads only; the
  process and the host's threads keep theirs). With as many busy threads as cores, the
  loop thread woke from its selector up to 60-90 ms late on 2 cores: ready to run and
  given no core. At a lower priority this work yields a core to the loop as soon as it
  wakes, and still takes every core that is idle.

A process forked after a pool has started keeps the record that its threads are
started, but not the threads: its work would wait for ever. The child starts with a new,
empty pool instead (``os.register_at_fork``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

T = TypeVar("T")

#: How much lower these threads' priority is than the process's (``nice``).
NICENESS: Final = 10


def cores() -> int:
    """The cores this process may use."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def _lower_priority(niceness: int) -> None:
    # Linux only: there ``setpriority`` on a thread id changes that thread alone;
    # elsewhere the id is not a thread's, and the call could reach another process.
    if sys.platform == "linux" and niceness:
        tid = threading.get_native_id()
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)


class NicedThreads:
    """A pool of ``size`` threads named ``name``-N, ``niceness`` below the process's
    priority (0: at it); :meth:`run` runs blocking work there."""

    def __init__(self, name: str, size: int, niceness: int = NICENESS) -> None:
        self.name = name
        self.size = size
        self.niceness = niceness
        self._new_pool()
        if hasattr(os, "register_at_fork"):
            method = weakref.WeakMethod(self._new_pool)

            def in_child() -> None:
                new_pool = method()
                if new_pool is not None:
                    new_pool()

            os.register_at_fork(after_in_child=in_child)

    def _new_pool(self) -> None:
        """A pool with no thread started yet (at creation, and in a forked child, which
        has none of its parent's threads)."""
        self._pool = ThreadPoolExecutor(
            self.size,
            thread_name_prefix=self.name,
            initializer=_lower_priority,
            initargs=(self.niceness,),
        )
        self._started = False
        self._starting = threading.Lock()

    def _start_all(self) -> None:
        """On a worker thread: make the pool start every thread now (each task waits
        for the others, so none is reused before all run)."""
        with self._starting:
            if self._started:
                return
            barrier = threading.Barrier(self.size)
            for future in [self._pool.submit(barrier.wait) for _ in range(self.size)]:
                future.result()
            self._started = True

    async def executor(self) -> ThreadPoolExecutor:
        """The pool, its threads started (on a worker thread, the first time)."""
        if not self._started:
            await asyncio.to_thread(self._start_all)
        return self._pool

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on one of these threads, in a copy of the caller's context."""
        pool = await self.executor()
        return await asyncio.get_running_loop().run_in_executor(pool, in_context(fn, *args))


def in_context(fn: Callable[..., T], *args: object) -> Callable[[], T]:
    """``fn(*args)`` to run on another thread in a copy of the caller's context (its
    context variables: telemetry's current span, say), as ``asyncio.to_thread`` does."""
    return functools.partial(contextvars.copy_context().run, fn, *args)
