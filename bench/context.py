"""What a case is handed: the config, the backend, and a place per system."""

from __future__ import annotations

import asyncio
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
)
from pathlib import Path
from typing import Any, TypeVar

from bench.common import SYSTEMS, Config, Place, Workspace

T = TypeVar("T")
RESULTS = Path(__file__).resolve().parent / "results"


class Context:
    def __init__(self, cfg: Config, ws: Workspace, backend: str) -> None:
        self.cfg = cfg
        self.ws = ws
        self.backend = backend

    @property
    def postgres(self) -> bool:
        return self.backend == "postgresql"

    def place(self, system: str) -> Place:
        return self.ws.place(self.backend, system)

    async def fresh(self, migrate: tuple[str, ...] = ("tiu",)) -> None:
        """Empty every system's place; build tiu's schema in ``migrate``'s places."""
        for system in SYSTEMS:
            await self.place(system).reset()
        for system in migrate:
            await self.place(system).migrate()

    async def profiled(self, label: str, work: Awaitable[T]) -> T:
        """Run ``work``; under ``--profile``, with pyinstrument, saving the report."""
        if not self.cfg.profile:
            return await work
        from pyinstrument import Profiler  # noqa: PLC0415

        profiler = Profiler(async_mode="enabled", interval=0.0005)
        profiler.start()
        try:
            return await work
        finally:
            profiler.stop()
            slug = re.sub(r"[^a-z0-9]+", "-", f"{self.backend}-{label}".lower()).strip("-")[:80]
            RESULTS.mkdir(exist_ok=True)
            path = RESULTS / f"profile-{slug}.txt"
            path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
            print(f"  profile written to {path}")

    async def take_turns(
        self,
        label: str,
        *systems: AsyncIterator[T] | Iterator[T],
        before_run: Callable[[int], Awaitable[None]] | None = None,
    ) -> list[list[T]]:
        """``cfg.runs`` rounds of one timed run per system, the systems in turn.

        Each system is an iterator of its runs' results (times): it sets up before
        its first run, outside the clock, and cleans up when closed. Run after run,
        this machine's speed drifted by up to ~1.7x within a case, which skewed the
        ratios of runs taken one system after the other; in turns, every system sees
        each state of the machine. Synchronous systems (eventsourcing) step on a
        worker thread; the first system (tiu) runs under ``--profile``'s profiler.
        ``before_run(i)`` is awaited before each run of system ``i``, off the clock
        (case 7 settles the database there).
        """
        out: list[list[T]] = [[] for _ in systems]
        try:
            for _ in range(self.cfg.runs):
                for i, system in enumerate(systems):
                    if before_run is not None:
                        await before_run(i)
                    if isinstance(system, AsyncIterator):
                        step = anext(system)
                        out[i].append(await (self.profiled(label, step) if i == 0 else step))
                    else:
                        out[i].append(await asyncio.to_thread(next, system))
        finally:
            for system in systems:
                if isinstance(system, AsyncGenerator):
                    await system.aclose()
                elif isinstance(system, Generator):
                    await asyncio.to_thread(system.close)
        return out


def noop(*_: Any) -> None:
    return None
