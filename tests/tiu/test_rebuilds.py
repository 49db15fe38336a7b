"""``DatabaseService.rebuild``: a rebuild in a child process of its own, on both
backends; in the host's process where no child can do it. Each child costs ~1 s of
imports, so few tests start one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain.passwords import BcryptHasher
from eventstore.schema import projection_checkpoints as cp
from projections.projector import Envelope, Projector, Tables
from projections.readmodels import ALL_PROJECTORS, TasksProjector, UsersProjector
from projections.runner import Worker
from tests.projections.worker_process import append_events, read_models, workload
from tiu import DatabaseService, RebuildError, Settings, rebuilds

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="watches children in /proc")


class UsersV2(UsersProjector):
    version = 2


class BrokenTasks(TasksProjector):
    """Importable by its qualified name, so rebuilt in a child, where it fails."""

    version = 2

    async def apply_batch(
        self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables
    ) -> None:
        raise ValueError("broken on purpose")


class StuckTasks(TasksProjector):
    """Rebuilt in a child, which it keeps inside its first batch."""

    async def apply_batch(
        self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables
    ) -> None:
        await asyncio.sleep(60)


def service_on(
    engine: AsyncEngine, projectors: Sequence[Projector] = ALL_PROJECTORS, **settings: object
) -> DatabaseService:
    return DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4, **settings),  # type: ignore[arg-type]
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        projectors=projectors,
    )


async def logged_log(engine: AsyncEngine, n: int = 300) -> None:
    """A log of ``n`` events with every read model caught up with it."""
    svc = service_on(engine)
    await svc.start(migrate=False)
    await append_events(svc.store, workload(n, seed=5))
    await Worker(svc.store, ALL_PROJECTORS, leader_election=False).catch_up()
    await svc.store.aclose()


#: The read models' rows, as :func:`read_models` reads them.
ReadModels = dict[str, list[tuple[Any, ...]]]


@pytest.fixture
async def on_log(engine: AsyncEngine) -> AsyncIterator[tuple[DatabaseService, ReadModels]]:
    """A started service on :func:`logged_log`'s log, and its read models before the
    test."""
    await logged_log(engine)
    before = await read_models(engine)
    svc = service_on(engine)
    await svc.start(migrate=False)
    try:
        yield svc, before
    finally:
        await svc.store.aclose()


def where_rebuilt(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("rebuilt ")]


def process_exists(pid: int) -> bool:
    """Whether ``pid`` is a process, a zombie (ended, not yet reaped) included."""
    return Path(f"/proc/{pid}").exists()


def open_pipes_and_deleted_files() -> int:
    """This process's open pipes and files already deleted (a child's output)."""
    pipes = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed since
            target = os.readlink(f"/proc/self/fd/{fd}")
            pipes += target.startswith("pipe:") or target.endswith(" (deleted)")
    return pipes


def children_running(pattern: str) -> dict[int, str]:
    """This process's children whose command line holds ``pattern``, with it."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and pattern in cmdline:
            found[int(entry.name)] = cmdline
    return found


async def test_start_rebuilds_a_stale_projection_in_a_child_with_the_in_process_tables(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    await logged_log(engine)
    caplog.set_level(logging.INFO, logger="tiu")
    projectors = (UsersV2(), *ALL_PROJECTORS[1:])
    svc = service_on(engine, projectors)
    await svc.start(migrate=False)  # users v2 is stale: rebuilt by a child
    await svc.store.aclose()
    assert [m.split(":")[0] for m in where_rebuilt(caplog)] == [
        "rebuilt users v2 in a child process"
    ]
    from_child = await read_models(engine)

    in_process = service_on(engine, projectors, rebuild_in_child=False)
    reports = await in_process.rebuild("users")
    await in_process.store.aclose()
    assert [r.version for r in reports] == [2]
    assert where_rebuilt(caplog)[-1].startswith("rebuilt users v2 in this process:")
    assert await read_models(engine) == from_child
    assert from_child["users"]  # the log has users


async def test_a_failing_child_raises_rebuild_error_with_its_last_error_line(
    engine: AsyncEngine, on_log: tuple[DatabaseService, ReadModels]
) -> None:
    svc, before = on_log
    with pytest.raises(RebuildError) as caught:
        await svc.rebuild(BrokenTasks())
    assert caught.value.projector == "tasks"
    assert caught.value.exit_code == 1
    assert caught.value.reason.endswith("ValueError('broken on purpose')")
    assert "error: projector tasks failed on position" in caught.value.reason
    assert await read_models(engine) == before  # the live tables are untouched


async def test_a_cancelled_rebuild_ends_its_child_and_a_later_rebuild_completes(
    engine: AsyncEngine, on_log: tuple[DatabaseService, ReadModels]
) -> None:
    svc, before = on_log
    pipes = open_pipes_and_deleted_files()
    stuck = asyncio.create_task(svc.rebuild(StuckTasks()))
    # Until the child is inside its first batch: its shadow tables are prepared.
    for _ in range(300):
        async with engine.connect() as conn:
            prepared = await conn.scalar(select(cp.c.name).where(cp.c.name == "tasks#rebuild"))
        if prepared:
            break
        await asyncio.sleep(0.05)
    [(child, cmdline)] = children_running("tiu.rebuilds").items()
    assert engine.url.render_as_string(hide_password=False) not in cmdline  # ps shows it
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert not process_exists(child)  # ended and reaped: no zombie
    assert open_pipes_and_deleted_files() == pipes

    [report] = await svc.rebuild("tasks")  # resumes what the child left
    assert report.projector == "tasks"
    assert await read_models(engine) == before
    assert children_running("tiu.rebuilds") == {}


async def test_a_rebuild_child_is_started_and_awaited_by_the_loop_without_a_thread(
    on_log: tuple[DatabaseService, ReadModels],
) -> None:
    # asyncio's subprocesses start a thread per child (its child watcher), and the loop
    # waits until that thread runs: 1-5 ms on a busy machine, once 28 ms (bench case 9).
    svc, _ = on_log
    before = {thread.ident for thread in threading.enumerate()}
    started: set[str] = set()
    rebuilding = True

    async def watch() -> None:
        while rebuilding:
            started.update(t.name for t in threading.enumerate() if t.ident not in before)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        [report] = await svc.rebuild("tasks")
    finally:
        rebuilding = False
        await watcher
    assert report.projector == "tasks"
    # tiu's own pools start their threads from a worker thread, not from the loop.
    assert {name for name in started if not name.startswith("tiu-")} == set()
    assert children_running("tiu.rebuilds") == {}


async def test_memory_databases_and_unimportable_projectors_rebuild_in_this_process(
    engine: AsyncEngine,
    on_log: tuple[DatabaseService, ReadModels],
    caplog: pytest.LogCaptureFixture,
) -> None:
    class LocalTasks(TasksProjector):  # defined in a function: no child can import it
        pass

    caplog.set_level(logging.INFO, logger="tiu")
    svc, before = on_log
    await svc.rebuild(LocalTasks())
    assert await read_models(engine) == before

    memory = DatabaseService(
        Settings(database_url="sqlite+aiosqlite:///:memory:", bcrypt_rounds=4),
        hasher=BcryptHasher(rounds=4),
    )
    async with memory:
        await memory.start()
        await append_events(memory.store, workload(100, seed=2))
        [report] = await memory.rebuild("tasks")
    assert report.applied > 0
    assert [m.split(":")[0] for m in where_rebuilt(caplog)] == [
        "rebuilt tasks v1 in this process",
        "rebuilt tasks v1 in this process",
    ]


async def test_a_name_the_service_has_no_projector_of_raises_rebuild_error(
    service: DatabaseService,
) -> None:
    with pytest.raises(RebuildError, match="no such projector; known: project_stats, projects"):
        await service.rebuild("nope")


def test_a_rebuild_child_whose_host_is_gone_ends_itself(tmp_path):
    # A host killed outright leaves its child running; rebuilding on alone, it would
    # race the rebuild the restarted host starts. The child's watchdog ends it: here a
    # process that runs it (and would sleep a minute) outlives its parent by at most a
    # few polls, ended by SIGTERM.
    pid_file = tmp_path / "child.pid"
    child = (
        "import os, sys, time\n"
        "from tiu.rebuilds import end_with_parent\n"
        "end_with_parent(0.05)\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        f"while not __import__('os').path.exists({str(pid_file)!r}): time.sleep(0.01)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", parent], check=True, timeout=60, env=env)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the orphaned child is still running"


async def test_a_child_that_cannot_start_raises_rebuild_error(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interpreter's file gone (a Python upgraded under a running service): the
    # process cannot start, which is the rebuild's failure, not an OSError.
    await logged_log(engine, 20)
    svc = service_on(engine)
    await svc.start(migrate=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python-gone"))
    try:
        with pytest.raises(RebuildError) as caught:
            await svc.rebuild(UsersV2())
    finally:
        await svc.store.aclose()
    assert caught.value.projector == "users"
    assert "could not start" in caught.value.reason
    assert caught.value.exit_code is None


def child_ignoring_sigterm() -> subprocess.Popen[bytes]:
    """A child that ignores SIGTERM from the moment this returns (for a minute)."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    return child


def open_pidfds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
    return count


@pytest.mark.parametrize("way", ["pidfd", "no pidfd_open", "a loop watching no descriptor"])
async def test_a_childs_exit_is_awaited_and_reaped_with_or_without_a_pidfd(
    monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    if way == "pidfd":  # woken by the pidfd: a fall-back to polling would time out below
        monkeypatch.setattr(rebuilds, "EXIT_POLL", 60.0)
    else:
        monkeypatch.setattr(rebuilds, "EXIT_POLL", 0.01)
    if way == "no pidfd_open":  # as on macOS
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    if way == "a loop watching no descriptor":  # as a loop without add_reader

        def no_reader(*_: object) -> None:
            raise NotImplementedError

        monkeypatch.setattr(asyncio.get_running_loop(), "add_reader", no_reader)
    pidfds = open_pidfds()
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert await asyncio.wait_for(rebuilds._exited(child), 10) == 3
    assert not process_exists(child.pid)
    assert open_pidfds() == pidfds


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_and_reaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rebuilds, "TERMINATE_GRACE", 0.5)
    child = child_ignoring_sigterm()
    await rebuilds._end(child)
    assert child.returncode == -9
    assert not process_exists(child.pid)
    assert child.stdout is not None
    child.stdout.close()


async def test_a_child_whose_end_is_cancelled_in_turn_is_killed_and_reaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A shutdown that cancels twice: the second cancel lands in the SIGTERM grace.
    monkeypatch.setattr(rebuilds, "EXIT_POLL", 0.01)
    child = child_ignoring_sigterm()
    ending = asyncio.create_task(rebuilds._end(child))
    await asyncio.sleep(0.1)  # inside the grace (10 s)
    ending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ending
    for _ in range(500):
        if not process_exists(child.pid):
            break
        await asyncio.sleep(0.01)
    assert not process_exists(child.pid)  # killed and reaped: no zombie
    assert child.returncode == -9
    assert child not in rebuilds._KILLED
    assert child.stdout is not None
    child.stdout.close()
