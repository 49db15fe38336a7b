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

The writer is a task of its own, never a caller: a caller cancelled while waiting
does not stop the transaction others share. Its item is dropped if no group has taken
it yet; otherwise the group's transaction completes and that outcome is discarded
(as for any cancelled database call, it may have committed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

#: The loop thread's CPU (seconds) a turn of the loop may spend on the callers a written
#: group wakes in it, and on whatever else runs in that turn (see ``GroupQueue._answer``).
ANSWER_SLICE = 0.001

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

    @property
    def busy(self) -> bool:
        """Whether a writer is running or items are waiting: a new item may share a
        group."""
        return bool(self._queue) or (self._writer is not None and not self._writer.done())

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait for its outcome (its result, or its own error)."""
        loop = asyncio.get_running_loop()
        # The writer settles ``outcome``; the caller is woken through ``answer`` (see
        # :meth:`_answer`).
        outcome: asyncio.Future[Result] = loop.create_future()
        answer: asyncio.Future[Result] = loop.create_future()
        self._answers[outcome] = answer
        self._queue.append((item, outcome))
        if self._writer is None or self._writer.done():
            # Started on the next turn of the loop: callers already scheduled for this
            # turn queue first and share the transaction.
            self._writer = loop.create_task(self._write_all())
            self._writer.add_done_callback(self._abandoned)
        try:
            return await answer
        except asyncio.CancelledError:
            self._queue = [w for w in self._queue if w[1] is not outcome]  # if not yet taken
            self._answers.pop(outcome, None)
            if not outcome.cancel() and not outcome.cancelled():
                outcome.exception()  # settled before its turn: retrieved, not logged
            raise

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
        """Wait for the groups already queued to be written."""
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)


def _fail(waiting: list[Waiting[Item, Result]]) -> None:
    for _, future in waiting:
        if not future.done():
            future.set_exception(ConnectionAbortedError("group commit stopped"))


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
