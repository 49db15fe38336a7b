"""What a projector is, and what it is handed.

A projector is a named, versioned object that owns its read-model tables and turns
events into rows in them. It never commits: every runner (inline, worker, replay)
calls it inside a transaction that also moves its checkpoint, so a crash can never
apply an event twice or lose one.

Tables are handed to ``apply`` through a :class:`Tables` mapping rather than used
directly, because a rebuild writes the same logic into shadow copies of them.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.base import Event, decode_event
from eventstore.crypto import Opened, keyring, may_be_sealed
from eventstore.records import RecordedEvent
from eventstore.schema import NAMING_CONVENTION

#: Every read-model table lives in this metadata (the migrations build it).
metadata = MetaData(naming_convention=NAMING_CONVENTION)

_STATEMENTS: weakref.WeakKeyDictionary[Table, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def statement(table: Table, key: Hashable, build: Callable[[Table], Any]) -> Any:
    """A statement on ``table`` built once per ``key`` and then executed with parameters.

    Building a SQLAlchemy expression per event (``values(...)`` with literals, ``col + 1``)
    was most of an inline projection's time (profiled); a prebuilt statement with bind
    parameters skips that and hits the compiled cache. Keyed by table, so the shadow
    tables of a rebuild get their own (and are forgotten with them).
    """
    per_table = _STATEMENTS.get(table)
    if per_table is None:
        per_table = _STATEMENTS[table] = {}
    found = per_table.get(key)
    if found is None:
        found = per_table[key] = build(table)
    return found


class Envelope:
    """A decoded event with where it sits in the log.

    ``position`` is ``None`` when an inline projector runs before the append has
    allocated it (docs/ordering.md: positions are assigned as the last statement).
    ``recorded_at`` is then the command's clock.

    A slotted class whose ``recorded_at`` and ``event_id`` are read from the record it
    was decoded from (:meth:`from_record`) when first asked for: a replay builds one per
    event and most projectors never read either (building the UUID and parsing the
    timestamp were 7% of a SQLite tasks replay, profiled). Compares equal field by
    field, as the named tuple it replaced did.
    """

    __slots__ = (
        "_event_id",
        "_record",
        "_recorded_at",
        "actor_id",
        "event",
        "position",
        "stream_id",
        "version",
    )
    __match_args__ = FIELDS = (
        "event",
        "stream_id",
        "version",
        "position",
        "recorded_at",
        "actor_id",
        "event_id",
    )

    event: Event
    stream_id: str
    version: int
    position: int | None
    actor_id: str | None
    _record: RecordedEvent | None

    def __init__(  # noqa: PLR0917  # positional, as the named tuple was
        self,
        event: Event,
        stream_id: str,
        version: int,
        position: int | None,
        recorded_at: datetime,
        actor_id: str | None,
        event_id: uuid.UUID,
    ) -> None:
        self.event = event
        self.stream_id = stream_id
        self.version = version
        self.position = position
        self._recorded_at = recorded_at
        self.actor_id = actor_id
        self._event_id = event_id
        self._record = None

    @property
    def recorded_at(self) -> datetime:
        record = self._record
        return self._recorded_at if record is None else record.recorded_at

    @property
    def event_id(self) -> uuid.UUID:
        record = self._record
        return self._event_id if record is None else record.event_id

    @property
    def event_type(self) -> str:
        return self.event.event_type

    @classmethod
    def from_record(cls, record: RecordedEvent, opened: Opened | None = None) -> Envelope:
        """Decode ``record``; ``opened`` is its data with personal fields decrypted
        (:func:`decode_records`), needed whenever the record has encrypted fields.
        Without it the event is validated from the stored JSON text where the record
        still holds it (:attr:`RecordedEvent.stored_data`)."""
        data: Mapping[str, Any] | str | bytes = record.stored_data
        erased: Collection[str] = ()
        if opened is not None:
            data, erased = opened.data, opened.erased
        envelope = _new_object(cls)
        envelope.event = decode_event(record.event_type, record.schema_version, data, erased)
        envelope.stream_id = record.stream_id
        envelope.version = record.version
        envelope.position = record.position
        envelope.actor_id = record.actor_id
        envelope._record = record
        return envelope

    def fields(self) -> tuple[Any, ...]:
        """Every field, in :attr:`FIELDS` (and the constructor's) order."""
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Envelope):
            return NotImplemented
        return self.fields() == other.fields()

    def __hash__(self) -> int:
        return hash(self.fields())

    def __reduce__(self) -> tuple[type[Envelope], tuple[Any, ...]]:
        return (Envelope, self.fields())

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={v!r}" for n, v in zip(self.FIELDS, self.fields(), strict=True))
        return f"Envelope({shown})"


_new_object = object.__new__


async def decode_records(conn: AsyncConnection, records: Sequence[RecordedEvent]) -> list[Envelope]:
    """Envelopes of ``records``, their personal fields decrypted with the keys of
    ``conn``'s engine (loaded in one query for the whole page; erased ones decode as
    erased). Only records that may hold such fields are parsed to be opened; the
    others are validated from their JSON text."""
    opened: list[Opened | None] = [None] * len(records)
    sealed = [i for i, record in enumerate(records) if may_be_sealed(record.stored_data)]
    if sealed:
        found = await keyring(conn).open_many(
            conn, [(records[i].event_type, records[i].data) for i in sealed]
        )
        for i, o in zip(sealed, found, strict=True):
            opened[i] = o
    return [Envelope.from_record(r, o) for r, o in zip(records, opened, strict=True)]


class Tables(Mapping[str, Table]):
    """Logical table name -> the table to write: the live one, or its shadow copy."""

    def __init__(self, tables: Mapping[str, Table]) -> None:
        self._tables = dict(tables)

    def __getitem__(self, name: str) -> Table:
        return self._tables[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)


class Projector:
    """Base class of read-model projectors.

    Subclasses set ``name`` (stable), ``version`` (bump it when the tables or the
    logic change: the projector is then rebuilt from position 0), ``tables`` (the
    tables it alone writes) and ``handles`` (the event types it reacts to), and
    implement :meth:`apply`. ``apply_batch`` may be overridden to write a batch of
    envelopes with fewer statements; it must give the same rows as applying them
    one by one.
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    tables: ClassVar[tuple[Table, ...]]
    handles: ClassVar[frozenset[str]]
    #: The secondary indexes (by their columns) that the projector's own reads need
    #: while a rebuild fills its shadow tables; the others are built once, after the
    #: bulk of the log is in (:mod:`projections.replay`). Unique ones are always kept.
    rebuild_indexes: ClassVar[frozenset[tuple[str, ...]]] = frozenset()
    #: Whether :meth:`apply` only writes, through :func:`eventstore.prepared.execute`,
    #: and reads nothing: inline, its rows may then be sent with the command's append
    #: (PostgreSQL, one statement with it; see :class:`eventstore.prepared.Deferred`).
    only_writes: ClassVar[bool] = False

    def live_tables(self) -> Tables:
        return Tables({t.name: t for t in self.tables})

    async def apply(self, conn: AsyncConnection, envelope: Envelope, t: Tables) -> None:
        raise NotImplementedError

    async def apply_batch(
        self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables
    ) -> None:
        for envelope in envelopes:
            if envelope.event_type in self.handles:
                await self.apply(conn, envelope, t)
