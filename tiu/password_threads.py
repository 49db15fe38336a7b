"""The threads password work runs on, apart from the event loop's default executor.

bcrypt at cost 12 is ~0.25 s of CPU per hash and releases the GIL, so the hashes of
concurrent logins run in parallel, one per core. Two things keep them from delaying
everything else in the host's process:

* **Their own threads**, one per core the process may use (more would only share the
  same cores). On the default executor, eight logins took every worker thread the
  SQLite driver sends its long statements to (counts, audit queries, log pages), so
  those waited behind hashes; and a thread the pool starts is started from the loop,
  which waits until the new thread runs (measured up to 15 ms on a busy machine).
  These are started on a worker thread instead, at the first password work.
* **A lower scheduling priority** (Linux: ``nice`` +10 for these threads only; the
  process and the host's threads keep theirs). With as many hashing threads as
  cores, the loop thread woke from its selector up to 60-90 ms late on 2 cores: it
  was ready to run and given no core. At a lower priority the hashes yield a core to
  the loop as soon as it wakes, and still take every core that is idle.

A process forked after password work keeps the parent's record that the threads are
started, but not the threads: its hashes would wait for ever. The child starts with a
new, empty pool instead (``os.register_at_fork``).
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

#: How much lower the password threads' priority is than the process's (``nice``).
NICENESS: Final = 10


def _cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def _lower_priority() -> None:
    # Linux only: there ``setpriority`` on a thread id changes that thread alone;
    # elsewhere the id is not a thread's, and the call could reach another process.
    if sys.platform == "linux":
        tid = threading.get_native_id()
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICENESS)


class PasswordThreads:
    """A pool of ``size`` threads (default: the cores this process may use) at a lower
    priority; :meth:`run` runs blocking password work there."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size or _cores()
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
            self.size, thread_name_prefix="tiu-password", initializer=_lower_priority
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

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on a password thread, in a copy of the caller's context."""
        if not self._started:
            await asyncio.to_thread(self._start_all)
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)


#: The process's password threads, shared by its dispatchers (threads are per process).
PASSWORD_THREADS: Final = PasswordThreads()
