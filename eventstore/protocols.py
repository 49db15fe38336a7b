"""The event store's contract, documented once.

Every function takes the connection it runs on: connections are never shared
between tasks, and the caller decides the transaction. :class:`EventStore` in
:mod:`eventstore.store` implements this on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from eventstore.records import (
    AppendResult,
    EventContext,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
)
from eventstore.store import UnitOfWork


class EventStoreProtocol(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[UnitOfWork]:
        """Open a write transaction.

        Inside it, ``uow.append`` buffers events for any number of streams and
        ``uow.claim`` reserves unique keys; on leaving the block the store takes the
        append lock, checks every expected version against the stream's head,
        allocates the next global positions (``max(position)+1..n``, gap-free),
        inserts, and commits. An exception inside the block rolls everything back.
        Raises :class:`~eventstore.errors.WrongExpectedVersion` when a stream moved,
        :class:`~eventstore.errors.AppendTimeout` when the lock is not granted within
        ``lock_timeout``, :class:`~eventstore.errors.StoreUnavailable` when the
        database is gone.
        """
        ...

    async def append(
        self,
        stream_id: str,
        category: str,
        new_events: Sequence[NewEvent],
        expected_version: ExpectedVersion = "any",
        *,
        context: EventContext | None = None,
    ) -> AppendResult:
        """Append to one stream, atomically, committed when this returns.

        Concurrent appends may share a transaction (group commit); each keeps its own
        version check and its own outcome. ``stream_id`` must read ``"<category>-<id>"``;
        ``expected_version`` is an exact version (0 = empty), ``"no_stream"``,
        ``"exists"`` or ``"any"``. Bad
        input raises a subclass of :class:`~eventstore.errors.InvalidAppend` before
        anything is written; an ``event_id`` already in the log raises
        :class:`~eventstore.errors.DuplicateEventId` (one too) and writes nothing.
        """
        ...

    async def read_stream(
        self,
        conn: AsyncConnection,
        stream_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        """One stream's events, forwards by version or backwards from ``to_version``."""
        ...

    async def stream_version(self, conn: AsyncConnection, stream_id: str) -> int:
        """The stream's last version, 0 when it has no events."""
        ...

    async def read_all(
        self,
        conn: AsyncConnection,
        after_position: int = 0,
        limit: int = 1000,
        *,
        categories: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        until_position: int | None = None,
    ) -> list[RecordedEvent]:
        """The global log after ``after_position`` in position order.

        Positions are gap-free and follow commit order, so a reader that resumes
        from the last position it processed never skips an event.
        """
        ...

    def subscribe(
        self,
        after_position: int = 0,
        *,
        batch_size: int = 500,
        categories: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        poll_interval: float = 1.0,
    ) -> AsyncIterator[RecordedEvent]:
        """Catch up from ``after_position``, then yield new events as they commit."""
        ...
