"""A projection's rebuild in a child process of its own (:meth:`DatabaseService.rebuild`).

A rebuild runs Python for every event of the log and allocates heavily (a batch holds
~100k objects until it is written). Inside a service, even chunked, it stalled the
host's loop: bench case 9 at 1,000,000 SQLite events saw max loop lags of 14-92 ms,
mostly full collections of the service process's garbage collector (14.5 ms of CPU
each) and GIL contention with the rebuild's statement threads. A child process
(``python -m tiu.rebuilds``: ``tiu replay --json`` at a lower CPU priority) leaves
the host's loop, GIL and collector alone; the host only awaits its exit.

The child connects as the host's engine does: the URL (password included) and the
engine's options go through the environment as ``TIU_*`` variables, which
:class:`tiu.settings.Settings` reads, never on the command line, which ``ps`` shows.
Its report is the JSON ``tiu replay --json`` prints; a failure is its ``error: ...``
line on stderr. SIGTERM makes it roll back its transaction and exit: what it
committed (batches of the shadow tables and the rebuild's checkpoint) is what the next
rebuild resumes from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from subprocess import DEVNULL
from typing import IO, TYPE_CHECKING

# Only the standard library at the top: the child lowers its CPU priority (main)
# before it imports anything (~0.6 s of CPU), and the host has the rest imported.
if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from projections.replay import RebuildReport

#: The child's niceness increment: a rebuild is background work, the host's requests
#: come first on a busy machine. As :data:`eventstore.threads.NICENESS`, which the
#: child does not import before it lowers its priority (see the imports).
NICENESS = 10
#: How long a child has, after SIGTERM, to roll back and exit before it is killed.
TERMINATE_GRACE = 10.0
#: How often the host looks whether its child has exited, where no pidfd tells it.
EXIT_POLL = 0.1
#: How often a child looks whether its host is still there (:func:`end_with_parent`).
PARENT_POLL = 0.5


def child_environment(engine: AsyncEngine) -> dict[str, str] | None:
    """The environment of a child that connects to ``engine``'s database as ``engine``
    does; ``None`` where no other process can: an in-memory SQLite database, an engine
    :func:`eventstore.create_engine` did not build as it is (a view of one, such as a
    tenant's, has its own schema), or an interpreter that cannot name its executable
    (embedded)."""
    from eventstore.engine import options_of  # noqa: PLC0415  # see the imports

    options = options_of(engine)
    url = engine.url
    if (
        options is None
        or not sys.executable
        or (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))
    ):
        return None
    # The host's own TIU_* variables may differ from what its engine was built with.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TIU_")}
    env["TIU_DATABASE_URL"] = url.render_as_string(hide_password=False)
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        # echo would print SQL on the stdout that carries the report.
        if value is None or field.name == "echo":
            continue
        env[f"TIU_{field.name.upper()}"] = json.dumps(value) if type(value) is bool else str(value)
    # The modules the host imports its projectors from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


async def rebuild_in_child(
    env: dict[str, str], projector: str, spec: str, *, batch_size: int
) -> RebuildReport:
    """Rebuild the projector ``spec`` names (:func:`projections.readmodels.by_name`) in a
    child process and return its report. Raises :class:`RebuildError` naming
    ``projector`` and the child's last error line if it fails (or names why it could not
    start). Cancelled, it terminates
    the child (SIGTERM; SIGKILL after :data:`TERMINATE_GRACE`) and waits for it."""
    from eventstore import telemetry  # noqa: PLC0415  # see the imports
    from projections.errors import RebuildError  # noqa: PLC0415
    from projections.replay import RebuildProgress, RebuildReport  # noqa: PLC0415

    args = [sys.executable, "-m", "tiu.rebuilds", "--batch-size", str(batch_size), spec]
    # Not asyncio's subprocesses: their child watcher starts a thread per child and the
    # loop waits until it runs (1-5 ms on a busy machine, once 28 ms in bench case 9),
    # and their pipes must be read while the child runs. Popen is ~0.3 ms of the loop;
    # the output goes to files, read once the child has exited.
    with contextlib.ExitStack() as files:
        try:
            out = files.enter_context(tempfile.TemporaryFile())
            err = files.enter_context(tempfile.TemporaryFile())
            process = subprocess.Popen(  # noqa: ASYNC220, S603  # see above; our own argv
                args, stdin=DEVNULL, stdout=out, stderr=err, env=env
            )
        except OSError as error:  # the interpreter's file gone, no process or file to spare
            raise RebuildError(projector, f"its process could not start: {error}") from error
        try:
            await _exited(process)
        except BaseException:
            await _end(process)
            raise
        report_text, last_error = _read(out), _last_line(_tail(err))
    if process.returncode != 0:
        raise RebuildError(
            projector,
            f"its process exited with {process.returncode}: {last_error}",
            process.returncode,
        )
    try:
        rebuilt = json.loads(report_text)["rebuilt"][0]
        report = RebuildReport(
            projector=rebuilt["projector"],
            version=int(rebuilt["version"]),
            position=int(rebuilt["position"]),
            applied=int(rebuilt["applied"]),
            seconds=float(rebuilt["seconds"]),
            resumed_from=int(rebuilt["resumed_from"]),
        )
    except (ValueError, KeyError, IndexError, TypeError):
        # Its last error line too: a child whose exit another reaper took (a host that
        # ignores SIGCHLD) reads as an exit of 0.
        raise RebuildError(
            projector,
            f"its process printed no report: {_last_line(report_text)}; {last_error}",
        ) from None
    # The host's replay gauge: the child's progress is its own, its end is known here.
    observe = telemetry.replay_progress(None)
    if observe is not None:
        observe(
            RebuildProgress(
                report.projector, report.position, report.position, report.applied, report.seconds
            )
        )
    return report


async def _exited(process: subprocess.Popen[bytes]) -> int:
    """Wait until ``process`` has exited, and reap it. On Linux its pidfd wakes the
    loop; elsewhere (or on a loop that watches no descriptor) the loop looks every
    :data:`EXIT_POLL` seconds."""
    pidfd = _pidfd(process)
    if pidfd is not None:
        try:
            if await _readable(pidfd):
                return process.wait()  # a zombie by now: reaped at once
        finally:
            os.close(pidfd)
    while process.poll() is None:  # noqa: ASYNC110  # no event tells an exit here
        await asyncio.sleep(EXIT_POLL)
    return process.returncode


async def _readable(fd: int) -> bool:
    """Wait until ``fd`` is readable: False at once if the loop watches no descriptor."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    try:
        loop.add_reader(fd, readable)
    except NotImplementedError:
        return False
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    return True


def _pidfd(process: subprocess.Popen[bytes]) -> int | None:
    pidfd_open = getattr(os, "pidfd_open", None)
    try:
        return pidfd_open(process.pid) if pidfd_open is not None else None
    except OSError:  # a kernel before 5.3, or the child reaped already
        return None


#: Children killed by a cancelled :func:`_end`, polled from the loop until reaped.
_KILLED: set[subprocess.Popen[bytes]] = set()


async def _end(process: subprocess.Popen[bytes]) -> None:
    """Terminate ``process`` and reap it, SIGKILL after :data:`TERMINATE_GRACE`. A wait
    cancelled in turn kills it and leaves the loop to reap it (:func:`_reap_soon`)."""
    try:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(_exited(process), TERMINATE_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await _exited(process)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            _reap_soon(process)


def _reap_soon(process: subprocess.Popen[bytes]) -> None:
    """Poll a killed ``process`` from the loop's callbacks (no task to cancel) until
    it is reaped, so no zombie is left; kept referenced meanwhile."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop: the standard library's own clean-up reaps it
        return
    _KILLED.add(process)

    def poll() -> None:
        if process.poll() is None and not loop.is_closed():
            loop.call_later(EXIT_POLL, poll)
        else:
            _KILLED.discard(process)

    loop.call_soon(poll)


def _read(file: IO[bytes], limit: int = 1 << 20) -> bytes:
    """The first ``limit`` bytes a child wrote to ``file`` (its report)."""
    file.seek(0)
    return file.read(limit)


def _tail(file: IO[bytes], limit: int = 64 << 10) -> bytes:
    """The last ``limit`` bytes a child wrote to ``file`` (its last error line)."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - limit))
    return file.read()


def _last_line(output: bytes) -> str:
    lines = output.decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else "(no output)"


def end_with_parent(poll: float = PARENT_POLL) -> threading.Thread:
    """SIGTERM this process once its parent is gone (``os.getppid()`` changes: it was
    adopted by init or a subreaper), as a Ctrl-C would stop ``tiu replay``. A host
    killed outright does not terminate its child, which would rebuild on for nobody,
    taking SQLite's write lock batch after batch beside the restarted host (and its own
    rebuild of the projector). Polled from a daemon thread: Linux's parent-death signal
    is not portable."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="tiu-rebuild-parent", daemon=True)
    thread.start()
    return thread


def main() -> None:
    """``python -m tiu.rebuilds [--batch-size N] SPEC``: ``tiu replay --json`` at a
    lower CPU priority, ending if the host that started it is gone."""
    if hasattr(os, "nice"):
        os.nice(NICENESS)
    end_with_parent()
    from tiu.cli import app  # noqa: PLC0415  # the child's work, not the host's import

    app(["replay", "--json", *sys.argv[1:]], prog_name="tiu replay")


if __name__ == "__main__":
    main()
