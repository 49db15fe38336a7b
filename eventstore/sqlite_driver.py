"""SQLite for asyncio without a thread hop per call: the stdlib ``sqlite3`` run inline.

aiosqlite runs every call (cursor, execute, fetch, close, commit) on a thread of its
own and wakes the event loop for each result. On a 2-core machine one such hop costs
~150 us, longer than the SQLite work itself (an append is ~12 of them: profiled at
1.9 ms per append against 0.14 ms for plain ``sqlite3``). SQLite is a library, not a
server: a statement on a local file in WAL mode takes microseconds and never waits on
the network. This adapter therefore runs ``sqlite3`` calls directly on the event loop
and leaves the loop only where SQLite would *wait*:

* **Writers of this process** queue on one ``asyncio.Lock`` per database file before
  ``BEGIN IMMEDIATE``, so they wait for each other without blocking the loop (bounded
  by the busy timeout, after which the usual "database is locked" error is raised).
* **Writers of other processes**: connections run with ``busy_timeout=0``, so a lock
  held elsewhere makes a statement fail at once with ``SQLITE_BUSY`` instead of
  sleeping on the loop. ``BEGIN IMMEDIATE`` is then tried again from the loop after
  growing sleeps (1 ms doubling to 25 ms, as SQLite's own busy handler sleeps) until
  the busy timeout: a caller cancelled while it waits leaves nothing behind (a
  thread waiting for the lock could not be stopped, and would take the lock later on
  a connection already back in the pool). Any other statement refused that way is
  run again on a worker thread with the busy timeout.
* **Durable commits**: with ``synchronous=FULL`` or ``EXTRA`` every COMMIT fsyncs, so
  COMMIT runs on a worker thread (``offload_commit``). With the default ``NORMAL`` a
  WAL commit does not fsync and runs inline.
* **Whose threads**: work sent off the loop runs on tiu's own threads, below the
  loop's priority (:data:`BACKGROUND_THREADS`, :mod:`eventstore.threads`), except what a
  connection holding the write lock sends: that runs on one thread per engine and file
  at the process's priority (:class:`WriterThread`), never queued behind the reads
  while other writers wait for the lock.
* **Cancellation**: work sent to a thread cannot be interrupted; a caller cancelled
  while it runs waits for it to end (so the connection is never used by two callers
  at once) and is then cancelled.

* **Statements whose cost grows with the data** (a count over a large table, a scan
  for a ``contains`` filter, an audit aggregate, a page of the log) run on a worker
  thread when the caller says so: the execution option ``off_loop=True``
  (:data:`OFF_LOOP`) runs the statement and fetches its rows there, a streamed result
  (``conn.stream()``, a server-side cursor) fetches every page there, and
  :meth:`Connection.off_loop` does it for a statement sent to the driver directly
  (``EventStore.read_all``'s pages). A cancelled caller interrupts the
  statement (``sqlite3.Connection.interrupt``) and waits for the thread to let go of
  the connection before the cancellation goes on, so the connection goes back to the
  pool idle. One hop costs ~0.1 ms, so point reads and the command path stay inline,
  and a ``SELECT`` sent off the loop that ended there within :data:`INLINE_BUDGET`
  runs inline from then on, for at most that long (SQLite's progress handler
  interrupts it, and it runs again on the thread): one the data keeps cheap costs no
  hop.

* **Opening a connection** (resolving its path, opening the file, the pragmas that
  read its header) runs on a worker thread of its own (:data:`OPENING_THREADS`),
  waiting there up to the busy timeout for a lock held elsewhere; a caller cancelled
  meanwhile leaves at once, and the connection is closed as soon as its open ends.

* **The WAL checkpoint** (copying the pages committed to the ``-wal`` file back into
  the database file, and its fsyncs) runs on worker threads, never inside a COMMIT.
  SQLite's automatic checkpoint runs inside the COMMIT that crosses ~1,000 pages; on
  a large file that COMMIT holds the loop ~100 ms (measured: max loop lag 97-118 ms
  during 20,000 appends to a 300,000-event log, ``bench/wal_checkpoint.py``).
  Connections of a file database therefore run with ``wal_autocheckpoint=0``, and
  after each COMMIT :class:`WalCheckpointer` looks whether the WAL has grown by
  :data:`WAL_CHECKPOINT_BYTES` of frames (two reads of the ``-wal`` file); then it
  runs ``PASSIVE`` checkpoints on a worker thread, with a connection of their own,
  taking no lock a reader or another process's writer waits for (see the class for
  how the file is kept small). The COMMIT after a
  checkpoint that copied every frame, which starts the WAL again, runs on a worker
  thread too if it cuts a file larger than :data:`WAL_SIZE_LIMIT` back (an
  ``ftruncate`` as long as the file is large, so by at most :data:`WAL_CUT_STEP` a
  COMMIT); a WAL within it is reused in place.

What still runs on the loop: other statements and their row fetching (point and
indexed reads of a few rows), and those reads of the ``-wal`` file.

It plugs into SQLAlchemy as the DBAPI ``module`` of the aiosqlite dialect (see
:func:`eventstore.engine.create_engine`): the SQL dialect is SQLite's; only the driver
underneath differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final, TypeVar
from urllib.parse import quote, unquote

from sqlalchemy.engine.interfaces import AdaptedConnection
from sqlalchemy.util import concurrency as _concurrency

from eventstore.errors import StoreUnavailable
from eventstore.grouping import until_done
from eventstore.threads import NicedThreads, cores, in_context

T = TypeVar("T")
log = logging.getLogger("eventstore.sqlite")
#: Await from SQLAlchemy's greenlet (``await_only`` before SQLAlchemy 2.1).
await_: Callable[[Any], Any] = getattr(_concurrency, "await_", None) or _concurrency.await_only

_WRITE_BEGINS: Final = ("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE")
#: The execution option that sends a statement to a worker thread (module doc).
OFF_LOOP: Final = "off_loop"
#: A ``SELECT`` sent off the loop (:data:`OFF_LOOP`) that ended on its worker thread
#: within this runs inline from then on, for at most this long: a hop to a thread and
#: back costs ~0.1 ms of wall time, more than a count that an index bounds (bench case
#: 6c: 0.2 ms of SQLite, 0.58x hand-written Core when every count hopped). One that
#: outlasts it inline is interrupted there and run again on the thread (see
#: :meth:`Connection.bounded`).
INLINE_BUDGET: Final = 0.0005
#: ...and that ended on its thread within this much wall time (waits for a core or the
#: disk included: see :func:`_timed`).
_INLINE_WAIT: Final = 10 * INLINE_BUDGET
#: SQLite virtual-machine steps between two looks at the clock (~20-50 us of work).
_PROGRESS_STEPS: Final = 1000
#: Statements an engine remembers as ending within :data:`INLINE_BUDGET`.
_QUICK_READS_KEPT: Final = 1000
#: Rows a streamed (server-side) cursor fetches per hop to its worker thread.
STREAM_PAGE: Final = 1000
#: What an inline call (:meth:`Connection.attempt`) returns when the lock is held elsewhere.
BUSY: Final = object()
#: The type a ``SELECT`` names for a text column that is never NULL nor empty
#: (``SELECT data AS "data [tiu_text]"``) to have it read by ``bytes.decode``, a converter
#: (connections parse column names for it, ``PARSE_COLNAMES``). sqlite3 (CPython 3.11)
#: gives up and takes back the GIL around its look at each value's type, but not for a
#: column with a converter: reading a log page, those round trips (16 a row) and
#: SQLite's own locks were ~20% of its CPU (perf, 100k events), and converting the
#: eight text columns of a record cut its read 0.2-0.3 us an event. A converter reads
#: an empty text as None, and text that is not UTF-8 raises ``UnicodeDecodeError``
#: (see :func:`fetch_all`).
TEXT_COLUMN: Final = "tiu_text"
sqlite3.register_converter(TEXT_COLUMN, bytes.decode)
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def fetch_all(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """``db.execute(sql, params).fetchall()``; a :data:`TEXT_COLUMN` holding text that
    is not UTF-8 raises the ``OperationalError`` sqlite3 raises for a column it reads."""
    try:
        return db.execute(sql, params).fetchall()
    except UnicodeDecodeError as error:
        raise sqlite3.OperationalError(f"Could not decode to UTF-8: {error}") from None


def is_busy(message: str) -> bool:
    """Whether a SQLite error message says the database lock was not granted."""
    text = message.lower()
    return "database is locked" in text or "database is busy" in text


def file_path(database: str) -> str:
    """The file of a SQLite database name, URI filenames (``file:/x.db?mode=ro``) included:
    a URI's path with its percent-escapes decoded, as SQLite opens it."""
    if database.startswith("file:"):
        return unquote(database.removeprefix("file:").split("?", 1)[0])
    return database


def _writer_lock(key: str) -> asyncio.Lock:
    """The lock writers of this process share for one database file (per event loop)."""
    loop = asyncio.get_running_loop()
    locks = _LOCKS.get(loop)  # a get first: WeakKeyDictionary.setdefault costs ~1 us
    if locks is None:
        locks = _LOCKS.setdefault(loop, {})
    lock = locks.get(key)
    if lock is None:
        lock = locks[key] = asyncio.Lock()
    return lock


#: Where statements whose cost grows with the data, waits for another process's lock
#: and checkpoint rounds run: threads of tiu's own below the loop's priority, one pool
#: for the process (its engines and loops), of one loop's default executor's size.
BACKGROUND_THREADS: Final = NicedThreads("tiu-sqlite", min(32, cores() + 4))


#: Where connections are opened (:func:`_open`): not :data:`BACKGROUND_THREADS`, where
#: a caller waiting for a connection, a command's included, would queue behind the
#: reads whose cost grows with the data; nor below the loop's priority, as a caller
#: waits for it.
OPENING_THREADS: Final = NicedThreads("tiu-sqlite-open", cores() + 2, niceness=0)


async def _on_thread(
    fn: Callable[..., T],
    *args: Any,
    interrupt: Callable[[], None] | None = None,
    thread: ThreadPoolExecutor | None = None,
) -> T:
    """``fn(*args)`` on a worker thread (``thread``'s, else one of
    :data:`BACKGROUND_THREADS`), in a copy of the caller's context.

    A caller cancelled while ``fn`` waits for a thread takes it off the queue: it never
    runs. One cancelled while ``fn`` runs calls ``interrupt`` (if given) and waits,
    through further cancellations too, for the thread to return (it holds a connection
    until then), and is then cancelled. What it waits for is the thread's own future,
    not a task, which cancelling every task (``asyncio.run``'s shutdown) would end
    while the thread still ran."""
    pool = thread if thread is not None else await BACKGROUND_THREADS.executor()
    submitted = pool.submit(in_context(fn, *args))
    work = asyncio.wrap_future(submitted)
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if not submitted.cancel():  # running already: it holds the connection
            if interrupt is not None:
                interrupt()
            await until_done(work)
        raise


def _open(
    database: str,
    uri: bool,
    timeout: float,
    pragmas: Sequence[str],
    kwargs: dict[str, Any],
    *,
    memory: bool,
    checkpointed: bool,
) -> tuple[sqlite3.Connection, str]:
    """On a worker thread: open ``database`` and run ``pragmas`` on it; the connection
    and the key of its file's writer lock (its real path, or a name of its own for a
    private database in memory). A ``checkpointed`` one leaves its WAL checkpoints to
    the driver's :class:`WalCheckpointer`.

    All of it may wait for the disk: resolving the path, opening the file, reading its
    header (``journal_mode``), or for a lock another process holds while it recovers
    the WAL or holds the file exclusively (a new connection waits for it here, up to
    the busy timeout, and then runs with ``busy_timeout=0`` as every connection of the
    driver does). On the loop a connection opened while a rebuild's child wrote to the
    same file held it 15.6 ms (bench case 9, 1,000,000 events)."""
    path = file_path(database) if uri else database
    real = "" if memory else os.path.realpath(path)
    if real and not os.path.isdir(os.path.dirname(real)):
        # sqlite3 would say only "unable to open database file".
        raise StoreUnavailable(
            f"SQLite database {path}: directory {os.path.dirname(path) or '.'} does not exist"
        )
    conn = sqlite3.connect(
        database, timeout=timeout, uri=uri, check_same_thread=False, isolation_level=None, **kwargs
    )
    try:
        if checkpointed:
            # The checkpoint runs off the loop (WalCheckpointer), not in a COMMIT.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        for pragma in pragmas:
            conn.execute(pragma)
        # A lock held elsewhere fails fast on the loop, and is then waited for off it.
        conn.execute("PRAGMA busy_timeout=0")
    except BaseException:
        conn.close()
        raise
    return conn, real or f":memory:{id(conn)}"


def _in_memory(database: str, uri: bool) -> bool:
    path = file_path(database) if uri else database
    return path in ("", ":memory:") or (uri and "mode=memory" in database)


def _read_only(database: str, uri: bool) -> bool:
    return uri and ("mode=ro" in database or "immutable=1" in database)


async def _opened(
    opening: Callable[[], tuple[sqlite3.Connection, str]],
) -> tuple[sqlite3.Connection, str]:
    """``opening`` (:func:`_open`) on one of :data:`OPENING_THREADS`. A caller cancelled
    meanwhile is cancelled at once: an open not begun yet never runs, and a connection
    the thread opens all the same is closed as soon as it is (it is nobody's)."""
    pool = await OPENING_THREADS.executor()
    submitted = pool.submit(in_context(opening))
    try:
        return await asyncio.wrap_future(submitted)
    except BaseException:  # cancelled, or this coroutine closed with its loop
        submitted.add_done_callback(_close_unclaimed)
        raise


def _close_unclaimed(opened: Future[tuple[sqlite3.Connection, str]]) -> None:
    if not opened.cancelled() and opened.exception() is None:
        opened.result()[0].close()


def gather_statistics(db: sqlite3.Connection) -> None:
    """Replace the query planner's statistics of ``db``'s database (``sqlite_stat1``),
    inside a write transaction of the caller's (``ANALYZE`` writes them).

    Without them SQLite's planner assumes every table holds about a million rows and every
    index narrows to a few: on 100,000 tasks a keyset page of a task list takes the
    ``(project_id, created_at)`` index and sorts its matches (13.7 ms of CPU), where the
    ``(created_at, task_id)`` index reads the page in order (1.06 ms). ``ANALYZE`` runs
    with :data:`ANALYSIS_LIMIT`. It does not change the schema, and a connection loads
    statistics only with the schema: other connections would plan with the old ones for
    as long as they stay open (pooled: for good). Dropping ``sqlite_stat1`` first makes
    it a schema change, which every connection sees at its next statement (it reads the
    schema again, ~0.4 ms, and prepares its statements again)."""
    db.execute("DROP TABLE IF EXISTS sqlite_stat1")
    analyze(db.execute)


def analyze(execute: Callable[[str], Any], tables: Sequence[str] = ()) -> None:
    """``ANALYZE`` the database, or only ``tables`` (names quoted already), through
    ``execute`` (a sqlite3 connection's, or a SQLAlchemy connection's
    ``exec_driver_sql``), in the caller's write transaction.

    A build with SQLITE_ENABLE_STAT4 also keeps sampled index keys (e-mail addresses,
    token hashes) in ``sqlite_stat4``, which a forgotten user's data would outlive: they
    are emptied; the planner does without them (``sqlite_stat1``'s counts are what
    tiu's plans need)."""
    for statement in [f"ANALYZE {table}" for table in tables] or ["ANALYZE"]:
        execute(statement)
    if execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat4'").fetchone():
        execute("DELETE FROM sqlite_stat4")


class WriterThread:
    """The thread a connection holding a file's write lock sends its work off the loop
    to: a COMMIT that fsyncs or cuts the WAL back, a statement of the transaction marked
    :data:`OFF_LOOP`, and the checkpoint round that holds this process's writer lock.

    Not one of :data:`BACKGROUND_THREADS`: reads whose cost grows with the data
    (audits, counts, log pages) queue there, and a writer whose COMMIT waited behind
    them would hold the lock, and every writer queued on it, for as long; nor at their
    lower priority, for the same reason. One thread is enough: one connection at a time
    holds a file's write lock. Made again in a forked child, which has none of its
    parent's threads."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    def get(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tiu-sqlite-writer")
            self._pid = os.getpid()
        return self._pool

    def close(self) -> None:
        """Let the thread end once the work it was given has run (the engine's dispose;
        an engine used again makes another): an engine made per database, or per test,
        would otherwise leave a thread for as long as it is referenced."""
        pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=False)


#: A COMMIT that finds the ``-wal`` file grown by this much since the last checkpoint
#: began starts one off the loop (SQLite's automatic checkpoint runs at 1,000 pages:
#: 4 MiB of 4 KiB pages).
WAL_CHECKPOINT_BYTES: Final = 4 * 2**20
#: ``journal_size_limit``: when a writer starts the WAL again from its beginning, a file
#: larger than this is cut back to it. Above the size a WAL reaches between two
#: checkpoints under a steady load (:data:`WAL_CHECKPOINT_BYTES` and what is committed
#: while the checkpoint runs), so that it is reused in place: a file cut back at every
#: start pays the ``ftruncate`` (on a worker thread, which a writer waits for) and then
#: its growth again in the COMMITs that write past its end (at 1 MiB, bench case 3 with
#: one caller: ~66 us of waiting and ~50 us of CPU a command, measured).
WAL_SIZE_LIMIT: Final = 16 * 2**20
#: The most one COMMIT cuts the ``-wal`` file back by: the ``ftruncate`` holds the write
#: lock as long as it frees blocks (ext4 with ``discard``: 1.5 ms for 8 MiB, 44 ms for
#: 256, on one machine), so a WAL a rebuild's swap left at hundreds of MiB shrinks a
#: step per checkpoint instead of holding one command's transaction, and every command
#: queued behind it, that long.
WAL_CUT_STEP: Final = 8 * 2**20
#: A checkpoint's rounds without a lock go on until one copied at most this many frames
#: and left at most this many uncopied (a reader's snapshot keeps frames from being
#: copied); the last round, which holds this process's writers back, then has about as
#: many to copy. Past :data:`FREE_ROUNDS` rounds that each still copied frames (this
#: process's writers outran them), the last round runs once one leaves at most
#: :data:`HELD_ROUND_FRAMES`; a round that copied none (a reader's snapshot) ends the
#: checkpoint without it, and the next one tries again.
CATCH_UP_FRAMES: Final = 1024
FREE_ROUNDS: Final = 4
#: The most frames the round that holds writers back may be left to copy (64 MiB of
#: 4 KiB pages): its copy and fsync, which this process's writers wait for, stay well
#: within their busy timeout on a slow disk too.
HELD_ROUND_FRAMES: Final = 16 * CATCH_UP_FRAMES
#: ``PRAGMA analysis_limit`` of tiu's connections: ``ANALYZE`` (tiu's, or one run through
#: tiu's engine) reads about this many entries of each index rather than all of them, so
#: its cost stays flat in the data: at 1,000,000 events the whole database's held the
#: write lock 3-6 ms (1.5-2 ms of CPU), 6-14 ms with the read models, against 1.1-2.1 s
#: for the log alone without a limit. SQLite's ANALYZE page suggests 100-1000
#: (https://sqlite.org/lang_analyze.html).
ANALYSIS_LIMIT: Final = 1000
#: A checkpoint gathers the planner's statistics (:func:`gather_statistics`) first if the
#: log has none yet, or has grown this many times the events they counted: as ``PRAGMA
#: optimize`` analyses a table grown 25 times, but looking at every table's growth
#: through the log's, from any connection (SQLite 3.40's looks only at the tables the
#: connection running it has planned with). A few times in a database's life (at 1k, 4k,
#: 16k, ... events); kept in the file, so a process started anew does not gather again.
STATISTICS_GROWTH: Final = 4
#: Database files (real paths) a checkpointer of this process is checkpointing now: at
#: most one checkpoint at a time per file, whichever engine started it.
_CHECKPOINTING: set[str] = set()
#: Database files (real paths) whose last checkpoint round copied every frame: the next
#: write transaction of the file starts the WAL again, and if the file is larger than
#: :data:`WAL_SIZE_LIMIT` its COMMIT cuts it back, so that COMMIT runs on a worker thread
#: (see :meth:`WalCheckpointer.restart_cut`). Whichever engine of this process writes next.
_RESTART_DUE: set[str] = set()
#: Checkpoint connections a forked process inherited from its parent: held, never
#: closed (see :meth:`WalCheckpointer._take_db`).
_INHERITED: list[sqlite3.Connection] = []
#: The WAL file's header (https://sqlite.org/fileformat2.html#walformat, big-endian):
#: magic, format version, page size, checkpoint sequence number, salt-1, salt-2. Each
#: frame's 24-byte header carries at its offset 8 the salts of the WAL it was written
#: for: a frame of the WAL started again since carries new ones.
_WAL_HEADER: Final = struct.Struct(">IIIIII")
_WAL_HEADER_BYTES: Final = 32
_FRAME_HEADER_BYTES: Final = 24
_CHECKPOINTING_LOCK = threading.Lock()


def _connect_own(uri: str) -> sqlite3.Connection:
    """The checkpointer's own connection (see :class:`WalCheckpointer`)."""
    db = sqlite3.connect(uri, uri=True, timeout=0, check_same_thread=False, isolation_level=None)
    try:
        db.execute(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
        # As tiu's pooled connections: the statistics it replaces may hold index keys.
        db.execute("PRAGMA secure_delete=ON")
    except BaseException:
        db.close()
        raise
    return db


def _passive_checkpoint(db: sqlite3.Connection) -> tuple[int, int, int]:
    busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(busy), int(frames), int(copied)


def _statistics_outgrown(db: sqlite3.Connection) -> bool:
    """Whether the log has outgrown the planner's statistics (:data:`STATISTICS_GROWTH`);
    False for a file without a log (not tiu's, or not migrated). Two index seeks."""
    try:
        (head,) = db.execute("SELECT max(position) FROM events").fetchone()
    except sqlite3.OperationalError:
        return False
    if not head:
        return False
    try:
        # The row count leads each index's statistics (an estimate: ANALYSIS_LIMIT).
        (counted,) = db.execute(
            "SELECT max(CAST(stat AS INTEGER)) FROM sqlite_stat1 WHERE tbl = 'events'"
        ).fetchone()
    except sqlite3.OperationalError as error:
        # No sqlite_stat1: never analysed. Anything else (locked, interrupted): not now.
        return "no such table" in str(error)
    return counted is None or int(head) >= STATISTICS_GROWTH * int(counted)


def _statistics_transaction(db: sqlite3.Connection) -> bool:
    """:func:`gather_statistics` in a write transaction of ``db``'s own; False if another
    process holds the write lock (``db`` waits for no lock)."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        if is_busy(str(error)):
            return False
        raise
    try:
        gather_statistics(db)
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
    return True


class WalCheckpointer:
    """Checkpoints one database file's WAL on worker threads, never on the loop.

    :meth:`after_commit` runs on the loop after each COMMIT: it looks whether the WAL
    has grown by :data:`WAL_CHECKPOINT_BYTES` of frames since the last checkpoint began
    (the ``-wal`` file's size says nothing once the file is reused in place): whether
    the frame that far carries the salts of the WAL's header (:data:`_WAL_HEADER`; an
    open, two reads and a close of the ``-wal`` file, on which SQLite holds no lock:
    the ``-shm`` file must not be opened so, its close would drop SQLite's POSIX locks
    on it). If so, a task of
    the loop runs ``PRAGMA wal_checkpoint(PASSIVE)`` rounds on a worker thread, on a
    connection of the checkpointer's own, kept from one round to the next (opening one
    reads the whole schema: ~9M instructions, most of a round's CPU). A PASSIVE
    checkpoint takes neither the write lock nor any
    lock a reader waits for: it copies every frame committed when it began (and that
    no reader still needs) into the database file, and fsyncs it.

    That alone does not keep the file small while writers go on: SQLite starts the WAL
    again from its beginning (writing its frames over the old ones, and cutting a file
    larger than :data:`WAL_SIZE_LIMIT` back to it) only at a write that finds every
    frame copied, and frames
    committed during a checkpoint are left for the next one (measured: 818 MiB of WAL
    after 20,000 appends). So the rounds go on while the last one had many frames to
    copy, and once one copied and left at most :data:`CATCH_UP_FRAMES`, a last round
    runs holding this process's writer lock for the file (the ``asyncio.Lock`` its
    writers queue on before ``BEGIN IMMEDIATE``; a deferred transaction's writes do
    not queue there): it copies the few frames committed since, and the next writer
    starts the WAL again. If :data:`FREE_ROUNDS` rounds did not catch up but each still
    copied frames, this process's writers outran them (transactions of many frames),
    and that last round runs once a round leaves at most :data:`HELD_ROUND_FRAMES`:
    writers wait for its copy rather than the WAL growing for as long as they write.
    While a reader's snapshot keeps frames from being copied, no round takes that lock
    (it could not catch up). No round
    takes SQLite's write lock (``FULL``, ``RESTART`` or ``TRUNCATE`` would: a
    transaction that read and then writes fails at once with "database is locked"
    while another connection holds it, whatever the busy timeout). Writers of other
    processes are not held back: a file they write without pause grows until they
    pause.

    The COMMIT that starts the WAL again cuts a file larger than :data:`WAL_SIZE_LIMIT`
    back to it: an ``ftruncate`` that frees every block past it, which takes time in the
    size of the file (measured on ext4 mounted with ``discard``: 4.7 ms for 16 MiB, 43 ms
    for 64, 139 ms for 256; a rebuild's swap writes a WAL of hundreds of MiB). Once a
    round has copied every frame of such a file, the next write transaction of this
    process (one that holds the writer lock) therefore commits on a worker thread
    (:meth:`restart_cut`), and cuts at most :data:`WAL_CUT_STEP`: a
    large file shrinks a step per checkpoint. A writer of another process, or a
    deferred transaction's write, may still be the one that starts the WAL again, and
    cut it back in one go.

    Before its rounds, a checkpoint gathers the query planner's statistics if the log has
    outgrown them (:data:`STATISTICS_GROWTH`, :meth:`_statistics`): on this connection,
    in a write transaction of its own, holding this process's writer lock.

    At most one checkpoint per file runs at a time in a process. A failed checkpoint,
    or one refused (``SQLITE_BUSY``: another process is checkpointing), is logged and
    tried again once the file has grown by :data:`WAL_CHECKPOINT_BYTES` more; it never
    reaches the caller whose COMMIT started it; a failed round closes its connection,
    and the next opens another. :meth:`close` (the engine's dispose) closes the
    connection, or interrupts a round in progress and cancels the task, which ends
    once the round's thread has closed the connection.
    """

    def __init__(self, path: str) -> None:
        #: The database file (its real path).
        self.path = path
        self._wal = f"{path}-wal"
        self._uri = f"file:{quote(path)}?mode=rw"  # mode=rw: never create a removed file
        #: The salts of the WAL the last checkpoint began on, and how many of its frames
        #: there were then (at least).
        self._salts = b""
        self._began_at = 0
        self._task: asyncio.Task[None] | None = None
        #: The rounds' connection, between rounds too, and the process that opened it
        #: (a forked child opens its own: SQLite's connections do not cross a fork).
        self._db: sqlite3.Connection | None = None
        self._db_pid = 0
        self._in_round = False  # a round is using _db
        self._closed = False  # close() came: a round starting now does nothing
        #: Guards _db, _in_round and _closed (a round's thread, close()).
        self._mutex = threading.Lock()
        #: The outcome of the last round: ``PRAGMA wal_checkpoint``'s row (refused,
        #: frames in the WAL, frames copied), or the error it failed with.
        self.last: tuple[int, int, int] | BaseException | None = None
        #: Where this engine's holder of the file's write lock works off the loop.
        self.writer_thread = WriterThread()

    @property
    def running(self) -> bool:
        """Whether a checkpoint started here is in progress (a task left on a closed
        loop never ends: it is not)."""
        task = self._task
        return task is not None and not task.done() and not task.get_loop().is_closed()

    def after_commit(self) -> None:
        """On the loop, after a COMMIT: start a checkpoint if the WAL has grown enough
        and none of this process is running for the file."""
        if self.running:
            return
        frame = self._grown()
        if frame is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop to run the checkpoint's task (the next COMMIT will)
        if self._task is not None and not self._task.done():
            self._ended(self._task)  # left on a loop closed since: it never will
        with _CHECKPOINTING_LOCK:
            if self.path in _CHECKPOINTING:
                return  # another engine of this process is checkpointing the file
            _CHECKPOINTING.add(self.path)
        self._began_at = frame
        with self._mutex:
            self._closed = False  # an engine used again after its dispose
        self._task = loop.create_task(self._checkpoint())
        # However the task ends: cancelled before its first step, its body never runs.
        self._task.add_done_callback(self._ended)

    def _grown(self) -> int | None:
        """The frame :data:`WAL_CHECKPOINT_BYTES` of frames past the one the last
        checkpoint began at, if the WAL holds it now (``None`` otherwise, or without a
        WAL file). The WAL started again since (new salts): counted from its start."""
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except OSError:
            return None
        try:
            header = os.pread(fd, _WAL_HEADER.size, 0)
            if len(header) < _WAL_HEADER.size:
                return None
            page: int = _WAL_HEADER.unpack(header)[2]
            if page < 512:
                return None  # not a WAL header (yet)
            salts = header[16:24]
            if salts != self._salts:
                self._salts, self._began_at = salts, 0
            frame = self._began_at + max(1, WAL_CHECKPOINT_BYTES // page)
            at = _WAL_HEADER_BYTES + (frame - 1) * (_FRAME_HEADER_BYTES + page)
            if os.pread(fd, _FRAME_HEADER_BYTES, at)[8:16] != salts:
                return None
            return frame
        except OSError:
            return None
        finally:
            os.close(fd)

    def _ended(self, _task: asyncio.Task[None]) -> None:
        with _CHECKPOINTING_LOCK:
            _CHECKPOINTING.discard(self.path)

    async def _checkpoint(self) -> None:
        # The statistics first: their few frames are then copied with the rest, and the
        # write that starts the WAL again stays a writer's of the pool, which cuts the
        # file back (restart_cut).
        await self._statistics()
        try:
            copied, rounds = -1, 0
            while True:
                row = await self._round()
                if row is None or row[0]:
                    return  # closed, or another process is checkpointing
                _, frames, backfilled = row
                rounds += 1
                left = frames - backfilled
                if backfilled - copied <= CATCH_UP_FRAMES and left <= CATCH_UP_FRAMES:
                    break
                if backfilled == copied:
                    return  # a reader's snapshot holds the rest: the next one tries
                # Writers outran the rounds: without holding them back a writer that
                # never pauses (an import in transactions of many events) grew the WAL
                # without bound, 859 MiB for 100,000 events.
                if rounds >= FREE_ROUNDS and left <= HELD_ROUND_FRAMES:
                    break
                copied = backfilled
            async with _writer_lock(self.path):
                await self._round(self.writer_thread.get())
        except Exception as error:  # nobody awaits this task: log it
            self.last = error
            if not self._closed:
                log.warning("WAL checkpoint of %s failed (tried again later): %s", self.path, error)

    async def _statistics(self) -> None:
        """If the log has outgrown them (:func:`_statistics_outgrown`, on a worker thread),
        :func:`gather_statistics` in a write transaction of the checkpointer's connection,
        on the writer thread, holding this process's writer lock: its writers wait for it
        as for any write (3-14 ms at 1,000,000 events). Another process holding the
        file's write lock leaves it to the next checkpoint."""
        try:
            if not await _on_thread(self._on_db, _statistics_outgrown, interrupt=self._interrupt):
                return
            async with _writer_lock(self.path):
                gathered = await _on_thread(
                    self._on_db,
                    _statistics_transaction,
                    interrupt=self._interrupt,
                    thread=self.writer_thread.get(),
                )
        except Exception as error:  # nobody awaits this task: log it
            if not self._closed:
                log.warning("statistics of %s failed (tried again later): %s", self.path, error)
            return
        if gathered is False:
            log.debug("statistics of %s: write lock busy, tried again later", self.path)

    async def _round(self, thread: ThreadPoolExecutor | None = None) -> tuple[int, int, int] | None:
        """One PASSIVE checkpoint on a worker thread (``thread``: the writer thread, for
        the round that holds the writer lock); cancelled, it is interrupted and waited
        for (its thread holds a connection until it returns)."""
        row = await _on_thread(self._passive, interrupt=self._interrupt, thread=thread)
        self.last = row
        if row is not None and not row[0] and row[1] and row[1] == row[2]:
            _RESTART_DUE.add(self.path)
        if row is not None and row[0]:
            log.debug("WAL checkpoint of %s refused (busy): tried again later", self.path)
        return row

    def _passive(self) -> tuple[int, int, int] | None:
        """On a worker thread: ``None`` if :meth:`close` came first."""
        return self._on_db(_passive_checkpoint)

    def _on_db(self, work: Callable[[sqlite3.Connection], T]) -> T | None:
        """``work(db)`` on the checkpointer's connection (opened if need be), on a worker
        thread: ``None`` if :meth:`close` came first."""
        with self._mutex:
            if self._closed:
                return None
            self._in_round = True
            db = self._db if self._db_pid == os.getpid() else None
        failed = True
        try:
            if db is None:
                db = _connect_own(self._uri)
                with self._mutex:
                    self._take_db()
                    self._db, self._db_pid = db, os.getpid()
                    if self._closed:
                        return None
            result = work(db)
            failed = False
            return result
        finally:
            with self._mutex:
                self._in_round = False
                gone = self._take_db() if failed or self._closed else None
            if gone is not None:
                gone.close()

    def _take_db(self) -> sqlite3.Connection | None:
        """The connection, to close (with :attr:`_mutex` held); ``None`` if there is none
        or a parent process opened it: that one is kept, never closed (nor dropped, which
        closes it), since closing a connection a fork carried over may disturb the
        parent's use of the file (SQLite's "How To Corrupt", carrying a connection
        across fork)."""
        db, self._db = self._db, None
        if db is not None and self._db_pid != os.getpid():
            _INHERITED.append(db)
            return None
        return db

    def restart_cut(self) -> int | None:
        """The ``journal_size_limit`` for a write transaction committing now, if it may
        start the WAL again and cut a file larger than :data:`WAL_SIZE_LIMIT` back (a
        round copied every frame since the last write transaction committed); ``None``
        otherwise. It cuts at most :data:`WAL_CUT_STEP`, not below the limit; the
        COMMITs that start the WAL again after the next checkpoints (one every
        :data:`WAL_CHECKPOINT_BYTES` of frames written) cut the next steps. Called by
        that COMMIT: the next one cannot (it finds frames not yet copied), so the answer
        is given once."""
        if self.path not in _RESTART_DUE:
            return None
        _RESTART_DUE.discard(self.path)
        try:
            size = os.stat(self._wal).st_size
        except OSError:
            return None  # no WAL file: nothing to cut back
        return max(WAL_SIZE_LIMIT, size - WAL_CUT_STEP) if size > WAL_SIZE_LIMIT else None

    def _interrupt(self) -> None:
        with self._mutex:
            if self._in_round and self._db is not None:
                self._db.interrupt()

    async def ended(self) -> None:
        """Wait for a checkpoint in progress to end (one started on another loop is
        not waited for). Cancelled meanwhile, it still waits for that (a round's
        thread holds a connection), then raises the cancellation."""
        task = self._task
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            return
        waiter = asyncio.current_task()
        cancelling = waiter.cancelling() if waiter is not None else 0
        await until_done(task)
        if waiter is not None and waiter.cancelling() > cancelling:
            raise asyncio.CancelledError

    def close(self) -> None:
        """Close the connection, or stop a checkpoint in progress (without waiting: its
        task ends once its round's thread has closed the connection; :meth:`ended`
        waits for that)."""
        with self._mutex:
            self._closed = True
            idle = None if self._in_round else self._take_db()
        if idle is not None:
            idle.close()
        self._interrupt()
        self.writer_thread.close()
        task = self._task
        if task is None or task.done():
            return
        loop = task.get_loop()
        try:
            if asyncio.get_running_loop() is loop:
                task.cancel()
                return
        except RuntimeError:
            pass  # called off the loop
        with contextlib.suppress(RuntimeError):  # the loop is closed: so is the task
            loop.call_soon_threadsafe(task.cancel)


def _timed(fn: Callable[..., Any], *args: Any) -> bool:
    """Run ``fn(*args)``: whether it ended within :data:`INLINE_BUDGET` of its thread's
    CPU (what it would cost the loop's thread inline) and :data:`_INLINE_WAIT` of wall
    time. CPU, not wall time alone: on a loaded machine a worker preempted by other
    processes would mark cheap statements heavy for good, a hop each time. Wall time
    too: a statement that waited for the disk costs little CPU but would stall the loop
    inline between two of :meth:`Connection.bounded`'s looks at the clock."""
    started, cpu = time.perf_counter(), time.thread_time()
    fn(*args)
    return (
        time.thread_time() - cpu <= INLINE_BUDGET and time.perf_counter() - started <= _INLINE_WAIT
    )


async def _yield_to_loop() -> None:
    """SQLAlchemy's async layer insists that each execute awaits once (it refuses a
    driver that never does); a no-op coroutine satisfies it for ~1 us."""


class Cursor:
    """A DBAPI cursor whose rows are fetched at execute time (like aiosqlite's adapter)."""

    __slots__ = (
        "_adapt",
        "_cursor",
        "_more",
        "_rows",
        "arraysize",
        "description",
        "lastrowid",
        "off_loop",
        "rowcount",
        "server_side",
    )

    def __init__(self, adapt: Connection, server_side: bool = False) -> None:
        self._adapt = adapt
        self._cursor = adapt._db.cursor()
        self._rows: list[Any] = []
        self._more = False  # a streamed cursor with rows not fetched yet
        self.arraysize = 1
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        #: Run the next execute on a worker thread (set from :data:`OFF_LOOP`).
        self.off_loop = server_side
        self.server_side = server_side

    def execute(self, operation: str, parameters: Sequence[Any] | None = None) -> Any:
        adapt = self._adapt
        if self.off_loop:
            params = () if parameters is None else parameters
            quick = adapt.dbapi.quick_reads
            if (
                operation in quick
                and not self.server_side
                and adapt.bounded(self._execute_off_loop, operation, params)
            ):
                await_(_yield_to_loop())
                return self
            adapt.heavy = True
            try:
                quick_there = await_(
                    adapt.off_loop(_timed, self._execute_off_loop, operation, params)
                )
            finally:
                adapt.release_if_done()
            if quick_there and not self.server_side and operation.lstrip()[:6].upper() == "SELECT":
                if len(quick) >= _QUICK_READS_KEPT:
                    quick.clear()
                quick.add(operation)
            return self
        lock = operation.lstrip()[:15].upper() in _WRITE_BEGINS
        if lock:
            adapt.acquire_writer()
        else:
            await_(_yield_to_loop())
        try:
            adapt.call(
                self._cursor.execute, operation, () if parameters is None else parameters, lock=lock
            )
            self._loaded()
        finally:
            adapt.release_if_done()
        return self

    def _execute_off_loop(self, operation: str, parameters: Sequence[Any]) -> None:
        """On the worker thread: execute, then fetch all rows (or a streamed first page)."""
        cursor = self._cursor
        cursor.execute(operation, parameters)
        self.description = cursor.description
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid
        self._fetch_page()

    def _fetch_page(self) -> None:
        cursor = self._cursor
        if not cursor.description:
            self._rows = []
        elif self.server_side:
            self._rows = cursor.fetchmany(STREAM_PAGE)
            self._more = len(self._rows) == STREAM_PAGE
        else:
            self._rows = cursor.fetchall()
        self._rows.reverse()  # popped from the end

    def _refill(self) -> None:
        """A streamed cursor whose page is used up fetches the next one off the loop."""
        if not self._rows and self._more:
            await_(self._adapt.off_loop(self._fetch_page))

    def executemany(self, operation: str, seq_of_parameters: Sequence[Any]) -> Any:
        try:
            if self.off_loop:
                self._adapt.heavy = True
                await_(self._adapt.off_loop(self._cursor.executemany, operation, seq_of_parameters))
            else:
                await_(_yield_to_loop())
                self._adapt.call(self._cursor.executemany, operation, seq_of_parameters)
            self._loaded()
        finally:
            self._adapt.release_if_done()
        return self

    def _loaded(self) -> None:
        cursor = self._cursor
        self.description = cursor.description
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid
        self._rows = cursor.fetchall() if cursor.description else []
        self._rows.reverse()  # popped from the end

    async def _async_soft_close(self) -> None:
        """Called by SQLAlchemy's async layer after execute; the rows are already here."""

    def fetchone(self) -> Any:
        self._refill()
        return self._rows.pop() if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[Any]:
        wanted = self.arraysize if size is None else size
        out: list[Any] = []
        while len(out) < wanted:
            self._refill()
            if not self._rows:
                break
            count = min(wanted - len(out), len(self._rows))
            out += [self._rows.pop() for _ in range(count)]
        return out

    def fetchall(self) -> list[Any]:
        out: list[Any] = []
        while True:
            self._refill()
            if not self._rows:
                return out
            rows, self._rows = self._rows, []
            rows.reverse()
            out += rows

    def __iter__(self) -> Any:
        while True:
            self._refill()
            if not self._rows:
                return
            yield self._rows.pop()

    def setinputsizes(self, *_: Any) -> None:
        pass

    def close(self) -> None:
        self._rows = []
        self._more = False
        self._cursor.close()


class Connection(AdaptedConnection):
    """A ``sqlite3`` connection driven inline from the event loop (see the module doc)."""

    __slots__ = (
        "_busy_ms",
        "_changes_at_lock",
        "_checkpointer",
        "_db",
        "_held_lock",
        "_lock_key",
        "_offload_commit",
        "_writer",
        "dbapi",
        "heavy",
        "write_begun",
    )

    def __init__(
        self,
        dbapi: InlineSQLiteDBAPI,
        connection: sqlite3.Connection,
        *,
        lock_key: str,
        busy_timeout: float,
        offload_commit: bool,
        checkpointer: WalCheckpointer | None = None,
    ) -> None:
        self.dbapi = dbapi
        self._db = connection
        # What SQLAlchemy hands out as ``driver_connection``: the sqlite3 connection.
        self._connection = connection  # type: ignore[assignment]
        self._lock_key = lock_key
        self._busy_ms = int(busy_timeout * 1000)
        self._offload_commit = offload_commit
        #: Checkpoints the file's WAL off the loop (None: a database in memory).
        self._checkpointer = checkpointer
        #: This process's writer lock of the file while this connection holds it.
        self._held_lock: asyncio.Lock | None = None
        #: The writer lock of the file last found for a loop, and that loop (weakly:
        #: a pooled connection outlives loops), so a write transaction does not look
        #: it up again.
        self._writer: tuple[weakref.ref[asyncio.AbstractEventLoop], asyncio.Lock] | None = None
        #: ``total_changes`` when this connection took the writer lock: a transaction
        #: that changed no row writes no frame, so its COMMIT starts no WAL again.
        self._changes_at_lock = 0
        #: A statement of this transaction ran off the loop: its COMMIT may write many
        #: pages, so it runs off the loop too.
        self.heavy = False
        #: The write transaction in progress was begun here (:meth:`begin_write`), not
        #: through SQLAlchemy: a SQLAlchemy ``Connection`` on this connection that
        #: begins one meanwhile joins it (see ``eventstore.engine``).
        self.write_begun = False

    # -- where the loop waits --------------------------------------------------------------

    def call(
        self, fn: Callable[..., T], *args: Any, offload: bool = False, lock: bool = False
    ) -> T:
        """Run ``fn`` inline; if another process holds the lock, wait for it (``lock``:
        ``fn`` takes the write lock, retried from the loop; else on a worker thread).

        For SQLAlchemy's side of the driver (it runs in SQLAlchemy's greenlet)."""
        if not offload:
            result = self.attempt(fn, args)
            if result is not BUSY:
                return result  # type: ignore[return-value]
        waited: T = await_(self._wait(fn, args, lock=lock))
        return waited

    async def run(
        self, fn: Callable[..., T], *args: Any, offload: bool = False, lock: bool = False
    ) -> T:
        """:meth:`call` for a caller on the event loop (the store's direct append)."""
        if not offload:
            result = self.attempt(fn, args)
            if result is not BUSY:
                return result  # type: ignore[return-value]
        return await self._wait(fn, args, lock=lock)

    async def _wait(self, fn: Callable[..., T], args: tuple[Any, ...], *, lock: bool) -> T:
        if lock:
            return await self._retry_lock(fn, args)
        return await _on_thread(self._waiting, fn, *args, thread=self._thread())

    def _thread(self) -> ThreadPoolExecutor | None:
        """The thread this connection's work off the loop runs on: the file's writer
        thread while it holds the writer lock, else one of :data:`BACKGROUND_THREADS`
        (also a database in memory: it has no checkpointer, and no other connection
        waits for its lock)."""
        if self._held_lock is not None and self._checkpointer is not None:
            return self._checkpointer.writer_thread.get()
        return None

    async def _retry_lock(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_ms / 1000
        delay = 0.001
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise sqlite3.OperationalError("database is locked")
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.025)
            result = self.attempt(fn, args)
            if result is not BUSY:
                return result  # type: ignore[return-value]

    @staticmethod
    def attempt(fn: Callable[..., T], args: tuple[Any, ...]) -> T | object:
        """``fn(*args)`` inline, or :data:`BUSY` if another process holds the lock it
        needs (:meth:`run` then waits for it)."""
        try:
            return fn(*args)
        except sqlite3.OperationalError as error:
            if not is_busy(str(error)):
                raise
            return BUSY

    def bounded(self, fn: Callable[[str, Sequence[Any]], Any], sql: str, params: Any) -> bool:
        """Run ``fn(sql, params)``, a read that ended within :data:`INLINE_BUDGET` last
        time, inline for at most that long: True if it ended in time. False if SQLite
        interrupted it at the budget (or the lock is held elsewhere), which leaves
        nothing behind (an interrupted read-only statement ends alone, not its
        transaction), so the caller runs it again off the loop; or if it ended late
        (SQLite looks at the clock between steps of its program, and a step such as a
        bare ``count(*)``'s count of a whole b-tree is one): either way ``sql`` runs off
        the loop from then on, until it ends within the budget there."""
        db = self._db
        deadline = time.perf_counter() + INLINE_BUDGET
        db.set_progress_handler(lambda: time.perf_counter() > deadline, _PROGRESS_STEPS)
        try:
            fn(sql, params)
        except sqlite3.OperationalError as error:
            message = str(error)
            late = message == "interrupted" and time.perf_counter() > deadline
            if not late and not is_busy(message):
                raise
            self.dbapi.quick_reads.discard(sql)
            return False
        finally:
            db.set_progress_handler(None, 0)
        if time.perf_counter() > deadline:
            self.dbapi.quick_reads.discard(sql)
        return True

    def _waiting(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._db
        conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        try:
            return fn(*args)
        finally:
            conn.execute("PRAGMA busy_timeout=0")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on a worker thread (waiting there for another process's lock);
        cancelled, it interrupts the statement and returns only once the thread has
        let go of the connection."""
        # "interrupted" is then the cancellation's doing.
        return await _on_thread(
            self._waiting, fn, *args, interrupt=self._db.interrupt, thread=self._thread()
        )

    def acquire_writer(self) -> None:
        if self._held_lock is None:
            await_(self.acquire_writer_async())

    async def acquire_writer_async(self) -> None:
        """Queue behind this process's other writers of the file (bounded by the busy
        timeout); held until the transaction ends."""
        if self._held_lock is not None:
            return
        loop = asyncio.get_running_loop()
        known = self._writer
        if known is not None and known[0]() is loop:
            lock = known[1]
        else:
            lock = _writer_lock(self._lock_key)
            self._writer = (weakref.ref(loop), lock)
        if not lock.locked():  # uncontended: no timer, no task
            await lock.acquire()
        else:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that arrives as the lock is granted.
                async with asyncio.timeout(self._busy_ms / 1000):
                    await lock.acquire()
            except TimeoutError:
                raise sqlite3.OperationalError(
                    "database is locked (a writer of this process held it past the busy timeout)"
                ) from None
        self._held_lock = lock
        self._changes_at_lock = self._db.total_changes

    async def begin_write(self) -> None:
        """``BEGIN IMMEDIATE`` from the event loop: the process's writer lock, then the file's."""
        await self.acquire_writer_async()
        try:
            # As run(), without its coroutine: called once per write transaction.
            if self.attempt(self._db.execute, ("BEGIN IMMEDIATE",)) is BUSY:
                await self._wait(self._db.execute, ("BEGIN IMMEDIATE",), lock=True)
        finally:
            self.release_if_done()
        self.write_begun = True

    async def commit_async(self) -> None:
        """``COMMIT`` from the event loop (on a worker thread if commits fsync, if a
        statement of the transaction ran there: see :attr:`heavy`, or if it may cut the
        WAL back: see :meth:`_offloaded`)."""
        try:
            # As run(), without its coroutine: called once per write transaction.
            if self._offloaded() or self.attempt(self._db.commit, ()) is BUSY:
                await self._wait(self._db.commit, (), lock=False)
        finally:
            self.release_if_done()
        if self._checkpointer is not None:
            self._checkpointer.after_commit()

    async def gather_statistics(self) -> None:
        """:func:`gather_statistics` in a write transaction of its own, begun from the loop
        as any write is (this process's writers queue on it as on any other), its
        ``ANALYZE`` on the writer thread."""
        await self.begin_write()
        try:
            await self.off_loop(gather_statistics, self._db)
            await self.commit_async()
        finally:
            if self._db.in_transaction:
                self.rollback()

    def release_if_done(self) -> None:
        if not self._db.in_transaction:
            self.write_begun = False
            if self._held_lock is not None:
                self._release()

    def _release(self) -> None:
        lock, self._held_lock = self._held_lock, None
        if lock is not None:
            lock.release()

    # -- DBAPI -----------------------------------------------------------------------------

    def cursor(self, server_side: bool = False) -> Cursor:
        return Cursor(self, server_side)

    def execute(self, operation: str, parameters: Sequence[Any] | None = None) -> Cursor:
        cursor = self.cursor()
        cursor.execute(operation, parameters)
        return cursor

    def _offloaded(self) -> bool:
        """Whether the COMMIT about to run goes to a worker thread: commits fsync, a
        statement of the transaction ran there (:attr:`heavy`), or it is the write that
        starts the WAL again and cuts the file back (:meth:`WalCheckpointer.restart_cut`;
        asked only by a transaction that changed rows: one that wrote nothing leaves
        the answer to the next write)."""
        heavy, self.heavy = self.heavy, False
        checkpointer = self._checkpointer
        cut = None
        if (
            self._held_lock is not None
            and checkpointer is not None
            and self._db.total_changes != self._changes_at_lock
        ):
            cut = checkpointer.restart_cut()
        if cut is not None:
            # Read by SQLite at this COMMIT, the one that starts the WAL again.
            self._db.execute(f"PRAGMA journal_size_limit={cut}")
        return self._offload_commit or heavy or cut is not None

    def commit(self) -> None:
        try:
            self.call(self._db.commit, offload=self._offloaded())
        finally:
            self.release_if_done()
        # Every COMMIT, not only BEGIN IMMEDIATE's: a deferred transaction writes too.
        if self._checkpointer is not None:
            self._checkpointer.after_commit()

    def rollback(self) -> None:
        try:
            self._db.rollback()
        finally:
            self.release_if_done()

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            self._release()

    def terminate(self) -> None:
        self.close()

    def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._db.create_function(*args, **kwargs)

    @property
    def isolation_level(self) -> str | None:
        return self._db.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        self._db.isolation_level = value  # type: ignore[assignment]  # sqlite3 checks it

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction


class InlineSQLiteDBAPI:
    """The DBAPI module handed to SQLAlchemy: ``sqlite3``'s names, this module's connect."""

    paramstyle = "qmark"
    apilevel = "2.0"
    threadsafety = 1
    has_stop = False  # no driver thread to stop: SQLAlchemy closes instead of terminating

    def __init__(self) -> None:
        self.sqlite = sqlite3
        #: The WAL checkpointer of each database file this engine opened (by real path).
        self.checkpointers: dict[str, WalCheckpointer] = {}
        #: ``SELECT`` statements sent off the loop that ended within INLINE_BUDGET there:
        #: they run inline (see Connection.bounded).
        self.quick_reads: set[str] = set()
        for name in (
            "DatabaseError",
            "DataError",
            "Error",
            "IntegrityError",
            "InterfaceError",
            "InternalError",
            "NotSupportedError",
            "OperationalError",
            "ProgrammingError",
            "Warning",
            "sqlite_version",
            "sqlite_version_info",
            "PARSE_COLNAMES",
            "PARSE_DECLTYPES",
            "Binary",
        ):
            setattr(self, name, getattr(sqlite3, name))

    def connect(
        self,
        database: str,
        *,
        timeout: float = 5.0,
        offload_commit: bool = False,
        uri: bool = False,
        pragmas: Sequence[str] = (),
        **kwargs: Any,
    ) -> Connection:
        """A connection to ``database``, opened on a worker thread (:func:`_open`, which
        also runs ``pragmas``) unless it is a private database in memory; called by
        SQLAlchemy's pool, in its greenlet."""
        kwargs.pop("check_same_thread", None)
        kwargs["detect_types"] = kwargs.get("detect_types", 0) | sqlite3.PARSE_COLNAMES
        memory = _in_memory(database, uri)
        checkpointed = not memory and not _read_only(database, uri)
        opening = functools.partial(
            _open, database, uri, timeout, pragmas, kwargs, memory=memory, checkpointed=checkpointed
        )
        if memory:
            # No disk to wait for. And opened across a turn of the loop, two first
            # checkouts of a StaticPool (which keeps its one connection once it is
            # open) would each open a private database of their own.
            conn, key = opening()
        else:
            conn, key = await_(_opened(opening))
        checkpointer = None
        if checkpointed:
            checkpointer = self.checkpointers.get(key)
            if checkpointer is None:
                checkpointer = self.checkpointers[key] = WalCheckpointer(key)
        return Connection(
            self,
            conn,
            lock_key=key,
            busy_timeout=timeout,
            offload_commit=offload_commit,
            checkpointer=checkpointer,
        )

    def close_checkpointers(self) -> None:
        """Stop every checkpoint of this engine's in progress (its dispose)."""
        for checkpointer in self.checkpointers.values():
            checkpointer.close()

    async def checkpoints_ended(self) -> None:
        """Wait for this engine's checkpoints in progress to end."""
        for checkpointer in list(self.checkpointers.values()):
            await checkpointer.ended()
