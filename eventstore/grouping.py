"""Group commit: callers queue work and wait; one writer task writes the queue in groups.

Appends are serialised (docs/ordering.md), so one piece of work per transaction caps the
rate at one commit per caller. Both group committers of tiu (the store's ``append``
and the dispatcher's commands) queue here instead: the first caller starts a writer
task, which takes up to ``max_group`` waiting items per transaction until the queue
is empty. Items that arrive while a group is written form the next group; a writer
may also end a group early and put the rest back (:meth:`GroupQueue.put_back`), ahead
of them.

A written group's callers are woken in their order, only as many per turn of the loop
as keep the turn within :data:`ANSWER_SLICE` of the loop thread's CPU: woken together,
they would run their next steps (on SQLite, whose statements run inline: a read and
the next command's preparation, ~0.5-1 ms each) in one turn, every other task of the
loop waiting for all of them (8 callers: loop turns of 5-10 ms of CPU, measured in
bench case 9's ``commands x8``; one per turn: 3-5 ms, the group's write included).
Callers with short next steps (a loop of appends) are soon woken all in one turn again:
a turn of the loop per caller cost such a loop ~10% more CPU per append.

When the queue is empty the writer waits one turn of the event loop before it ends:
a caller woken by its result that writes again at once (a loop of appends) joins the
same writer instead of starting a new task, and the store's writer keeps its pooled
connection for it (``idle`` is called when the writer ends: one checkout per burst
instead of one per transaction, ~20 us of a ~300 us SQLite append, measured).

A group several callers share is written by a task of its own, never by one of
them: a caller cancelled while waiting does not stop the transaction others share.
Its item is dropped if no group has taken it yet; otherwise the group's transaction
completes and that outcome is discarded (as for any cancelled database call, it may
have committed). A ``write`` that retries the items of a group that failed as a whole
retries only those whose outcome is not settled: a cancelled caller's item is then
dropped, the failed group having left nothing of it. The writer itself cancelled (the
loop shutting down), the callers it had not answered get
:class:`~eventstore.errors.StoreUnavailable`, not its cancellation: theirs were not
cancelled.

A group of one needs no writer task. With ``alone_inline`` (SQLite's inline driver,
whose write a cancelled caller leaves clean: rolled back or committed, its connection
reusable), a caller that finds the queue idle writes its own item, in its own task,
through the same ``write`` a writer would give a group of one: no second future, no
task, no turn of the loop to answer it. The queue is busy from then until its write
ends: callers arriving meanwhile queue, and a writer started as that write ends takes
them. Cancelled during its write, the write stops there (rolled back, or committed if
the cancellation waited for its COMMIT on a thread) and a writer task writes the item to
its end, as it would an item of a group already taken; the outcome is discarded (a write
that had committed is refused the second time: an append by its event ids). Before its
write it takes a turn of the loop, as a writer does before a group (callers arriving in
that turn share a group with it, written by a writer task), unless a caller writing
alone took one less than :data:`INLINE_SLICE` ago: a loop of appends then takes a turn
every millisecond or so instead of one per append (here one in ~7). Measured on
one-event SQLite appends (bench case 1a, callgrind): 593k instructions an append through
the writer task, 582k written alone with a turn each, 548k with no turn; CPU per append
6-9% less, alternating runs. The queue's idle state (``idle``) comes at the next turn of
the loop after such a write, unless the queue is busy again by then, so a caller
appending again at once keeps the connection. Not on PostgreSQL: there a cancelled
caller would abandon a round trip in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from eventstore.errors import StoreUnavailable

Item = TypeVar("Item")
Result = TypeVar("Result")

#: The loop thread's CPU (seconds) a turn of the loop may spend on the callers a written
#: group wakes in it, and on whatever else runs in that turn (see ``GroupQueue._answer``).
ANSWER_SLICE = 0.001

#: How long (seconds, wall clock) after the last turn of the loop a caller writing its
#: own item (``alone_inline``) took, the next one writes without taking another: a
#: loop of appends that never suspend (SQLite's inline driver, ~0.3 ms each) would
#: otherwise keep every other task waiting, and a turn per append cost ~5% of its
#: instructions (see the module doc). A turn of the loop stays within this plus one
#: write.
INLINE_SLICE = 0.001

#: A waiting caller: its item and the future its outcome is delivered to.
Waiting = tuple[Item, "asyncio.Future[Result]"]


class GroupQueue(Generic[Item, Result]):
    """Queue items; ``write`` settles every future of the group it is given."""

    def __init__(
        self,
        write: Callable[[list[Waiting[Item, Result]]], Awaitable[None]],
        max_group: int,
        *,
        idle: Callable[[], None] | None = None,
        alone_inline: bool = False,
    ) -> None:
        if max_group < 1:
            raise ValueError(f"max_group must be at least 1, not {max_group}")
        self._write = write
        self._idle = idle
        self.max_group = max_group
        self._queue: list[Waiting[Item, Result]] = []
        #: Each waiting caller's answer, by the outcome the writer settles.
        self._answers: dict[asyncio.Future[Result], asyncio.Future[Result]] = {}
        #: How many callers :meth:`_answer` wakes per turn of the loop.
        self._per_turn = 1
        self._writer: asyncio.Task[None] | None = None
        #: Whether a caller alone may write its own item (see the module doc).
        self.alone_inline = alone_inline
        #: Whether a caller is writing its own item, or about to (the turn before).
        self._inline = False
        #: When (``time.perf_counter()``) a caller writing alone last took its turn of
        #: the loop: the task running now has run for at most the time since.
        self._turned_at = 0.0
        #: Whether the idle state is to come at the next turn of the loop.
        self._idle_due = False
        #: Settled when the caller writing alone ends (made by :meth:`aclose` only: a
        #: future per append costs a loop of appends).
        self._alone_ended: asyncio.Future[None] | None = None

    @property
    def busy(self) -> bool:
        """Whether a writer is running, a caller writes alone, or items are waiting: a
        new item may share a group."""
        return (
            bool(self._queue)
            or self._inline
            or (self._writer is not None and not self._writer.done())
        )

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait for its outcome (its result, or its own error)."""
        loop = asyncio.get_running_loop()
        # The writer settles ``outcome``; the caller is woken through ``answer`` (see
        # :meth:`_answer`).
        outcome: asyncio.Future[Result] = loop.create_future()
        if self.alone_inline and not self.busy:
            return await self._write_alone(item, outcome)
        self._queue.append((item, outcome))
        self._start_writer()
        return await self._answered(outcome)

    def _start_writer(self) -> None:
        if not self._inline and (self._writer is None or self._writer.done()):
            # Started on the next turn of the loop: callers already scheduled for this
            # turn queue first and share the transaction.
            self._writer = asyncio.get_running_loop().create_task(self._write_all())
            self._writer.add_done_callback(self._abandoned)

    async def _answered(self, outcome: asyncio.Future[Result]) -> Result:
        """Wait for ``outcome``, queued, through the answer :meth:`_answer` gives."""
        answer: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._answers[outcome] = answer
        try:
            return await answer
        except asyncio.CancelledError:
            self._queue = [w for w in self._queue if w[1] is not outcome]  # if not yet taken
            self._answers.pop(outcome, None)
            _discard(outcome)
            raise

    async def _write_alone(self, item: Item, outcome: asyncio.Future[Result]) -> Result:
        """The caller alone writes ``item`` as a writer would a group of one (module doc)."""
        self._inline = True
        taken = False
        try:
            if time.perf_counter() - self._turned_at >= INLINE_SLICE:
                # The writer's turn before its group: other tasks run, and callers
                # arriving in it share a group with this one. Cancelled here, nothing
                # has begun.
                await asyncio.sleep(0)
                self._turned_at = time.perf_counter()
            if self._queue:
                self._queue.insert(0, (item, outcome))
            else:
                taken = True
                await self._write([(item, outcome)])
        except asyncio.CancelledError:
            if taken and not outcome.done():
                # Cancelled during its write (which stopped there, cleanly): taken, as
                # an item of a group a writer took would be, it is written to its end
                # by a writer task, its outcome discarded (see the module doc).
                outcome.cancel()
                self._queue.insert(0, (item, outcome))
            else:
                _discard(outcome)
            raise
        except BaseException:
            _discard(outcome)
            raise
        finally:
            # Synchronous, as the writer's end: whoever queued meanwhile gets a writer.
            self._inline = False
            if self._alone_ended is not None:
                ended, self._alone_ended = self._alone_ended, None
                if not ended.done():
                    ended.set_result(None)
            if self._queue:
                self._start_writer()
            elif self._idle is not None and not self._idle_due:
                self._idle_due = True
                asyncio.get_running_loop().call_soon(self._idle_unless_busy)
        if not outcome.done():  # queued behind callers of the same turn, or put back
            return await self._answered(outcome)
        return outcome.result()

    def _idle_unless_busy(self) -> None:
        """A turn of the loop after a caller's own write: idle, unless the queue is busy
        again (the same caller appending at once keeps the connection)."""
        self._idle_due = False
        if not self.busy and self._idle is not None:
            self._idle()

    async def _write_all(self) -> None:
        group: list[Waiting[Item, Result]] = []
        try:
            while self._queue:
                group = self._queue[: self.max_group]
                self._queue = self._queue[self.max_group :]
                await self._write(group)
                written, group = [w for w in group if w[1].done()], []
                # A turn of the loop after each answer, so after each group too: a write
                # that never suspends (SQLite's inline driver) would otherwise run group
                # after group in one stretch.
                await self._answer(written)
        finally:
            # Cancelled (the loop is shutting down): no caller may wait forever.
            _fail([*group, *self._queue])
            self._queue = []
            self._forward_all()
            # Synchronous: nothing may run between the last look at the queue and the
            # end of this task, or a caller could queue behind a writer that is gone.
            if self._idle is not None:
                self._idle()

    async def _answer(self, written: list[Waiting[Item, Result]]) -> None:
        """Wake the callers of ``written`` in their order, a few per turn of the loop
        (see the module doc); one whose caller has gone is skipped.

        How many per turn follows what the last turn cost the loop thread: doubled
        while a turn stays under half of :data:`ANSWER_SLICE`, halved when one goes
        over it. Callers whose next step is long (a command's read and preparation)
        are woken one per turn; callers whose next step is short (a loop of appends)
        soon all in one, as if woken together, without a turn of the loop each."""
        index = 0
        while index < len(written):
            for _, outcome in written[index : index + self._per_turn]:
                answer = self._answers.pop(outcome, None)
                if answer is not None and not answer.done():
                    _forward(outcome, answer)
            index += self._per_turn
            started = time.thread_time()
            await asyncio.sleep(0)
            spent = time.thread_time() - started
            if spent > ANSWER_SLICE:
                self._per_turn = max(1, self._per_turn // 2)
            elif spent < ANSWER_SLICE / 2:
                self._per_turn = min(self.max_group, self._per_turn * 2)
        if not written:
            await asyncio.sleep(0)

    def _forward_all(self) -> None:
        """Wake, at once, every caller whose outcome is settled (the writer has ended)."""
        for outcome, answer in list(self._answers.items()):
            if outcome.done():
                del self._answers[outcome]
                if not answer.done():
                    _forward(outcome, answer)

    def put_back(self, waiting: list[Waiting[Item, Result]]) -> None:
        """From ``write``: items of its group it did not write, to lead the next group
        (those whose caller has gone are dropped, as if never taken)."""
        self._queue[:0] = [w for w in waiting if not w[1].done()]

    def _abandoned(self, writer: asyncio.Task[None]) -> None:
        # A writer cancelled before it ran never reaches its own clean-up.
        if writer is self._writer and writer.cancelled():
            _fail(self._queue)
            self._queue = []
            self._forward_all()
            if self._idle is not None:
                self._idle()

    async def aclose(self) -> None:
        """Wait for the groups already queued to be written, and for a caller's own
        write in progress (it holds a connection; items queued behind it, or its own
        if cancelled, then go to a writer, waited for too)."""
        while True:
            if self._inline:
                if self._alone_ended is None:
                    self._alone_ended = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._alone_ended)
            elif self._writer is not None and not self._writer.done():
                # Waited for, not awaited: a writer cancelled meanwhile (the loop shutting
                # down) ends this call, which was not cancelled, normally.
                writer = self._writer
                await asyncio.wait([writer])
                if not writer.cancelled():
                    writer.result()
            else:
                break
        if self.alone_inline:
            self._idle_unless_busy()  # a caller's own write's idle state may not have come


def _fail(waiting: list[Waiting[Item, Result]]) -> None:
    """Answer the callers of a writer that was stopped (cancelled: the loop is shutting
    down). Their own tasks were not cancelled, so not with its ``CancelledError``,
    which a caller's task would take for its own cancellation: with the documented
    error of a database call that could not finish (docs/errors.md)."""
    for _, future in waiting:
        if not future.done():
            future.set_exception(
                StoreUnavailable(
                    "the group writer was stopped (the event loop is shutting down) before "
                    "this write was answered: it may have committed; resend it with the "
                    "same command_id or event ids"
                )
            )


def _discard(outcome: asyncio.Future[Result]) -> None:
    """A cancelled caller's outcome: cancelled if not settled, else retrieved (an error
    nobody awaits would be logged)."""
    if not outcome.cancel() and not outcome.cancelled():
        outcome.exception()


def _forward(outcome: asyncio.Future[Result], answer: asyncio.Future[Result]) -> None:
    if outcome.cancelled():
        answer.cancel()
    elif (error := outcome.exception()) is not None:
        answer.set_exception(error)
    else:
        answer.set_result(outcome.result())


async def settle(future: asyncio.Future[Result], work: Awaitable[Result]) -> None:
    """Deliver the outcome of ``work`` (a result or an ``Exception``) to ``future``."""
    try:
        result = await work
    except Exception as error:
        if not future.done():
            future.set_exception(error)
    else:
        if not future.done():
            future.set_result(result)


async def whole(
    work: Awaitable[Result], *, undo: Callable[[Result], Awaitable[object]] | None = None
) -> Result:
    """``work``, never abandoned midway: a caller cancelled meanwhile waits for it to
    end (:func:`until_done`), then is cancelled. For a round trip in flight: abandoned,
    its connection would be dropped under the driver's feet (SQLAlchemy invalidates a
    connection a cancellation interrupted; asyncpg then reports the lost round trip as
    an exception nobody retrieved).

    ``undo``: what to do, before the cancelled caller leaves, with the result it will
    not take (a connection opened for it: given back), likewise never abandoned."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await until_done(task)
        if undo is not None and not task.cancelled() and task.exception() is None:
            await until_done(asyncio.ensure_future(undo(task.result())))
        raise


async def whole_round_trip(
    round_trips: bool,
    work: Awaitable[Result],
    *,
    undo: Callable[[Result], Awaitable[object]] | None = None,
) -> Result:
    """:func:`whole` for database work, where it is needed: ``round_trips`` says
    whether a round trip can be in flight while the caller awaits
    (``eventstore.dialects.Dialect.round_trips``; PostgreSQL). SQLite's inline driver
    has none, so there ``work`` runs as it is, without a task of its own."""
    if not round_trips:
        return await work
    return await whole(work, undo=undo)


async def until_done(task: asyncio.Future[Result]) -> None:
    """Wait for ``task`` to end, through further cancellations of the waiter, and
    retrieve its outcome (so that no "exception was never retrieved" is left): for a
    caller cancelled while work it must not abandon is in flight."""
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            continue
        except Exception:  # noqa: S110  # the waiter is cancelled: the outcome is moot
            pass
    if not task.cancelled():
        task.exception()
