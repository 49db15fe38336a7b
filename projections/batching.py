"""Batched projection: a batch of N events in O(tables) statements, not O(N).

A :class:`BatchedProjector` folds a batch of envelopes over plain dicts and writes
the result back at the end, instead of running one or more statements per event:

1. gather the primary keys the batch touches (and, where a projector needs rows by
   something other than their key, a predicate for those);
2. load the existing rows for them in one ``SELECT ... IN`` per 500 keys;
3. fold the envelopes in order over the rows in memory (insert, update, delete per
   key; counters incremented in Python);
4. write back: one executemany ``DELETE`` (by key) for rows that existed and are gone,
   one executemany ``UPDATE`` (by key, every column) for rows that changed, one
   ``INSERT`` for rows that are new.

A key touched several times in a batch is folded in order and written once; a row
created and deleted within the batch is never written. The contract is that the
rows equal those of applying the envelopes one by one with ``apply`` (the tests
check it); that includes failing with an ``IntegrityError`` where the one-by-one path
would (an insert of a key that exists is sent to the database as an ``INSERT``).

A batch of one envelope goes through ``apply``: it runs fewer statements (one
``UPDATE`` rather than ``SELECT`` then ``UPDATE``) and is what inline projection,
inside a command's transaction, mostly sees.

Statements are built once per table (live or shadow) and reused.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Delete,
    Insert,
    Select,
    Table,
    Update,
    bindparam,
    delete,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from projections.projector import Envelope, Projector, Tables

Row = dict[str, Any]
S = TypeVar("S")
Key = Hashable
"""A row's primary key: the value itself for a one-column key, else a tuple."""

IN_CHUNK = 500
"""Most keys in one ``IN`` list (well under SQLite's and asyncpg's parameter limits)."""

_B = "b_"  # prefix of the bound parameters of UPDATE and DELETE (column names are taken)


@dataclass(frozen=True, slots=True)
class _Statements:
    columns: tuple[str, ...]
    key_columns: tuple[str, ...]
    select_keys: Select[Any]
    insert: Insert
    update: Update | None
    delete: Delete


_statements: weakref.WeakKeyDictionary[Table, _Statements] = weakref.WeakKeyDictionary()


def _build(table: Table) -> _Statements:
    key_cols = list(table.primary_key.columns)
    names = tuple(c.name for c in table.columns)
    key_names = tuple(c.name for c in key_cols)
    by_key: ColumnElement[bool] = (
        key_cols[0].in_(bindparam("keys", expanding=True))
        if len(key_cols) == 1
        else tuple_(*key_cols).in_(bindparam("keys", expanding=True))
    )
    where_key = [c == bindparam(_B + c.name) for c in key_cols]
    others = [c for c in table.columns if c.name not in key_names]
    return _Statements(
        columns=names,
        key_columns=key_names,
        select_keys=select(table).where(by_key),
        insert=insert(table),
        update=(
            update(table).where(*where_key).values({c: bindparam(_B + c.name) for c in others})
            if others
            else None
        ),
        delete=delete(table).where(*where_key),
    )


_prebuilt: weakref.WeakKeyDictionary[Table, dict[str, Any]] = weakref.WeakKeyDictionary()


def prebuilt(table: Table, name: str, build: Callable[[Table], S]) -> S:
    """``build(table)``, built once per table (live or shadow) and ``name``."""
    cache = _prebuilt.setdefault(table, {})
    if name not in cache:
        cache[name] = build(table)
    return cast(S, cache[name])


def statements(table: Table) -> _Statements:
    """The prebuilt statements of ``table`` (cached while the table lives)."""
    found = _statements.get(table)
    if found is None:
        found = _statements[table] = _build(table)
    return found


def field(envelope: Envelope, name: str) -> Any:
    """``envelope.event.<name>``: for gathering keys from events of several types."""
    return getattr(envelope.event, name)


def _chunks(items: Sequence[Any], size: int = IN_CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class KeyedRows:
    """The rows of one table that a batch touches, by primary key, folded in memory.

    Call :meth:`want` for every key the batch touches, :meth:`load` once, then fold
    with :meth:`get` / :meth:`insert` / :meth:`update` / :meth:`delete`, and finally
    :meth:`flush`. Only loaded keys may be folded (``KeyError`` otherwise): a key
    that is not in the table is loaded as absent.
    """

    def __init__(self, table: Table) -> None:
        self.table = table
        self._st = statements(table)
        self._pending: set[Key] = set()
        self._original: dict[Key, Row] = {}
        self._current: dict[Key, Row | None] = {}
        self._conflicts: list[Row] = []

    def key_of(self, row: Row) -> Key:
        names = self._st.key_columns
        return row[names[0]] if len(names) == 1 else tuple(row[n] for n in names)

    def want(self, key: Key) -> None:
        if key not in self._current:
            self._pending.add(key)

    async def load(self, conn: AsyncConnection) -> None:
        """Load the wanted keys not loaded yet; those not found are absent."""
        pending = [k for k in self._pending if k not in self._current]
        self._pending.clear()
        for chunk in _chunks(pending):
            result = await conn.execute(self._st.select_keys, {"keys": list(chunk)})
            self._add_loaded(result.mappings())
        for key in pending:
            self._current.setdefault(key, None)

    async def load_by(
        self, conn: AsyncConnection, statement: Select[Any], values: Iterable[Any]
    ) -> None:
        """Also load the rows ``statement`` (a ``select`` of this table with an
        expanding ``keys`` parameter, see :func:`prebuilt`) returns for ``values``,
        500 at a time: rows found by something other than their key. Keys already
        loaded keep their folded state."""
        for chunk in _chunks(sorted(set(values))):
            self._add_loaded((await conn.execute(statement, {"keys": list(chunk)})).mappings())

    def _add_loaded(self, rows: Iterable[Any]) -> None:
        for mapping in rows:
            row = dict(mapping)
            key = self.key_of(row)
            if key not in self._current:
                self._original[key] = row
                self._current[key] = dict(row)

    def get(self, key: Key) -> Row | None:
        """The row as folded so far, or ``None`` when absent. Do not mutate it."""
        return self._current[key]

    def exists(self, key: Key) -> bool:
        return self._current[key] is not None

    def insert(self, row: Row) -> Key:
        """Insert ``row`` (every column). When its key exists the one-by-one path
        fails, so the row is kept to be sent as an ``INSERT`` that fails the same way."""
        key = self.key_of(row)
        if self._current.get(key, None) is not None:
            self._conflicts.append(row)
        else:
            self._current[key] = dict(row)
        return key

    def update(self, key: Key, **values: Any) -> Row | None:
        """Set ``values`` on the row of ``key`` if it exists (like ``UPDATE ... WHERE``)."""
        row = self._current[key]
        if row is not None:
            row.update(values)
        return row

    def delete(self, key: Key) -> None:
        self._current[key] = None

    def rows(self) -> Iterable[Row]:
        """Every row loaded or inserted so far that exists."""
        return (row for row in self._current.values() if row is not None)

    async def flush(self, conn: AsyncConnection) -> None:
        """Write the folded state back: deletes, updates, inserts, one statement each."""
        st = self._st
        if self._conflicts:
            await conn.execute(st.insert, self._conflicts)  # fails as one by one would
        inserts: list[Row] = []
        updates: list[Row] = []
        deletes: list[Row] = []
        for key, row in self._current.items():
            before = self._original.get(key)
            if row is None:
                if before is not None:
                    deletes.append({_B + n: before[n] for n in st.key_columns})
            elif before is None:
                inserts.append(row)
            elif row != before:
                updates.append({_B + n: row[n] for n in st.columns})
        if deletes:
            await conn.execute(st.delete, deletes)
        if updates and st.update is not None:
            await conn.execute(st.update, updates)
        if inserts:
            await conn.execute(st.insert, inserts)
        self._original = {k: dict(v) for k, v in self._current.items() if v is not None}
        self._conflicts.clear()


class BatchedProjector(Projector):
    """A projector whose ``apply_batch`` folds the batch (:meth:`fold`) in memory.

    Subclasses implement ``apply`` (one event, used for batches of one) and
    :meth:`fold` (two or more handled envelopes, in order), which must write the
    same rows.
    """

    async def apply_batch(
        self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables
    ) -> None:
        handled = [e for e in envelopes if e.event_type in self.handles]
        if len(handled) == 1:
            await self.apply(conn, handled[0], t)
        elif handled:
            await self.fold(conn, handled, t)

    async def fold(self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables) -> None:
        raise NotImplementedError
