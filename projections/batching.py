"""Batched projection: a batch of N events in O(tables) statements, not O(N).

A :class:`BatchedProjector` folds a batch of envelopes over plain dicts and writes
the result back at the end, instead of running one or more statements per event:

1. gather the primary keys the batch touches (and, where a projector needs rows by
   something other than their key, a predicate for those);
2. load the existing rows for them in one ``SELECT ... IN`` per 500 keys (on
   PostgreSQL ``= ANY(:keys)``, one array of up to 5,000 keys);
3. fold the envelopes in order over the rows in memory (insert, update, delete per
   key; counters incremented in Python);
4. write back: one executemany ``DELETE`` (by key) for rows that existed and are gone,
   one executemany ``UPDATE`` (by key) per set of columns the fold changed (a handful:
   one per combination of event types), one ``INSERT`` for rows that are new. On
   PostgreSQL the ``UPDATE`` and ``INSERT`` of several rows are each one statement
   over one array per column (``unnest``): a row per Bind/Execute cost ~2x the server
   work (measured on 10,000 rows).

Only the columns a fold reads are loaded (``KeyedRows(table, load=...)``; by default
none but the key, which tells whether the row exists), and an ``UPDATE`` sets only
the columns the fold set: loading and writing whole rows was most of the cost.

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
from functools import partial
from operator import itemgetter
from typing import Any, TypeVar, cast

import orjson
from sqlalchemy import (
    ColumnElement,
    Delete,
    Select,
    String,
    Table,
    Update,
    any_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from eventstore.prepared import execute
from projections.projector import Envelope, Projector, Tables

Row = dict[str, Any]
S = TypeVar("S")
Key = Hashable
"""A row's primary key: the value itself for a one-column key, else a tuple."""

IN_CHUNK = 500
"""Most keys in one ``IN`` list (well under SQLite's and asyncpg's parameter limits)."""
ARRAY_CHUNK = 5000
"""Most keys in one PostgreSQL array parameter (``key = ANY(:keys)``)."""

_SQLITE = sqlite.dialect()
_B = "b_"  # prefix of the bound parameters of UPDATE and DELETE (column names are taken)

_prebuilt: weakref.WeakKeyDictionary[Table, dict[str, Any]] = weakref.WeakKeyDictionary()


def prebuilt(table: Table, name: str, build: Callable[[Table], S]) -> S:
    """``build(table)``, built once per table (live or shadow) and ``name``."""
    cache = _prebuilt.setdefault(table, {})
    if name not in cache:
        cache[name] = build(table)
    return cast(S, cache[name])


def keys_param() -> Any:
    """The expanding ``IN`` parameter that :meth:`KeyedRows.load_by` binds values to."""
    return bindparam("keys", expanding=True)


def field(envelope: Envelope, name: str) -> Any:
    """``envelope.event.<name>``: for gathering keys from events of several types."""
    return getattr(envelope.event, name)


def _chunks(items: Sequence[Any], size: int = IN_CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class KeyedRows:
    """The rows of one table that a batch touches, by primary key, folded in memory.

    Call :meth:`want` for every key the batch touches, :meth:`load` once (and
    :meth:`load_by` for rows found by something else), then fold with :meth:`get` /
    :meth:`insert` / :meth:`update` / :meth:`delete`, and finally :meth:`flush`.
    Only loaded keys may be folded (``KeyError`` otherwise); a key not in the table
    is loaded as absent. Rows that existed hold the key and the ``load`` columns
    only (reading another is a ``KeyError``); rows inserted by the fold are whole.
    """

    def __init__(self, table: Table, load: Iterable[str] = ()) -> None:
        self.table = table
        key_cols = list(table.primary_key.columns)
        self._key_names = tuple(c.name for c in key_cols)
        self._others = tuple(c.name for c in table.columns if c.name not in self._key_names)
        wanted = set(load)
        self._load_names = (*self._key_names, *(n for n in self._others if n in wanted))
        self._load_tag = ",".join(self._load_names)
        #: A single text key, compared as SQLite compares text (no bind processor).
        self._text_key = (
            len(key_cols) == 1
            and isinstance(key_cols[0].type, String)
            and key_cols[0].type.bind_processor(_SQLITE) is None
        )
        self._pending: set[Key] = set()
        self._current: dict[Key, Row | None] = {}
        self._in_db: set[Key] = set()
        self._dirty: dict[Key, set[str]] = {}
        self._conflicts: list[Row] = []

    def _select(self, where: Callable[[Table], ColumnElement[bool]], name: str) -> Select[Any]:
        def build(table: Table) -> Select[Any]:
            return select(*(table.c[n] for n in self._load_names)).where(where(table))

        return prebuilt(self.table, f"select:{name}:{self._load_tag}", build)

    def key_of(self, row: Row) -> Key:
        names = self._key_names
        return row[names[0]] if len(names) == 1 else tuple(row[n] for n in names)

    def want(self, key: Key) -> None:
        if key not in self._current:
            self._pending.add(key)

    def want_all(self, keys: Iterable[Key]) -> None:
        """:meth:`want` each of ``keys`` (those loaded already are left out by :meth:`load`)."""
        self._pending.update(keys)

    async def load(self, conn: AsyncConnection) -> None:
        """Load the wanted keys not loaded yet; those not found are absent."""
        pending = [k for k in self._pending if k not in self._current]
        self._pending.clear()
        if not pending:
            return
        dialect = conn.dialect.name
        if dialect == "postgresql" and len(self._key_names) == 1:
            # One array parameter: one prepared statement whatever the number of keys
            # (an IN list is new SQL, prepared anew, for each length).
            statement = self._select(_by_key_array, "key-array")
            for chunk in _chunks(pending, ARRAY_CHUNK):
                self._add_loaded(await conn.execute(statement, {"keys": list(chunk)}))
        elif dialect == "sqlite" and self._text_key:
            # Keys as one JSON array read by json_each: SQLAlchemy's expansion of an IN
            # list was most of the time of a load (~1 us a key, profiled in replays).
            statement = self._select(_by_key_json, "key-json")
            for chunk in _chunks(pending, ARRAY_CHUNK):
                keys = _json_text_keys(chunk)
                if keys is None:
                    await self._load_in(conn, chunk)
                else:
                    self._add_loaded(await conn.execute(statement, {"keys": keys}))
        else:
            await self._load_in(conn, pending)
        for key in pending:
            self._current.setdefault(key, None)

    async def _load_in(self, conn: AsyncConnection, keys: Sequence[Key]) -> None:
        statement = self._select(_by_key, "key")
        for chunk in _chunks(keys, IN_CHUNK):
            self._add_loaded(await conn.execute(statement, {"keys": list(chunk)}))

    async def load_by(
        self,
        conn: AsyncConnection,
        name: str,
        where: Callable[[Table], ColumnElement[bool]],
        values: Iterable[Any],
    ) -> None:
        """Also load the rows matching ``where(table)`` (a condition with a
        :func:`keys_param`, built once per table and ``name``) for ``values``, 500
        at a time: rows found by something other than their key. Keys already loaded
        keep their folded state."""
        values = sorted(set(values))
        if not values:
            return
        statement = self._select(where, name)
        for chunk in _chunks(values):
            self._add_loaded(await conn.execute(statement, {"keys": list(chunk)}))

    def _add_loaded(self, result: Any) -> None:
        names = self._load_names
        single = len(self._key_names) == 1
        width = len(self._key_names)
        for values in result:
            row = dict(zip(names, values, strict=True))
            key = values[0] if single else tuple(values[:width])
            if key not in self._current:
                self._current[key] = row
                self._in_db.add(key)

    def get(self, key: Key) -> Row | None:
        """The row as folded so far, or ``None`` when absent. Do not mutate it."""
        return self._current[key]

    def exists(self, key: Key) -> bool:
        return self._current[key] is not None

    def insert(self, row: Row) -> Key:
        """Insert ``row`` (every column). When its key exists the one-by-one path
        fails, so the row is kept to be sent as an ``INSERT`` that fails the same way."""
        key = self.key_of(row)
        if self._current.get(key) is not None:
            self._conflicts.append(row)
            return key
        self._current[key] = dict(row)
        if key in self._in_db:  # deleted, then inserted again: rewrite it whole
            self._dirty[key] = set(self._others)
        return key

    def update(self, key: Key, **values: Any) -> Row | None:
        """Set ``values`` on the row of ``key`` if it exists (like ``UPDATE ... WHERE``)."""
        row = self._current[key]
        if row is not None:
            row.update(values)
            if key in self._in_db:
                dirty = self._dirty.get(key)
                if dirty is None:
                    self._dirty[key] = set(values)
                else:
                    dirty.update(values)
        return row

    def delete(self, key: Key) -> None:
        self._current[key] = None
        self._dirty.pop(key, None)

    def rows(self) -> Iterable[Row]:
        """Every row loaded or inserted so far that exists."""
        return (row for row in self._current.values() if row is not None)

    async def flush(self, conn: AsyncConnection) -> None:
        """Write the folded state back: deletes, updates (one statement per set of
        changed columns), inserts."""
        table = self.table
        if self._conflicts:
            await conn.execute(prebuilt(table, "insert", insert), self._conflicts)
        inserts: list[Row] = []
        deletes: list[Row] = []
        # One UPDATE per set of changed columns: (columns, (param, column)..., rows).
        shapes: dict[frozenset[str], tuple[tuple[str, ...], tuple[tuple[str, str], ...], list[Row]]]
        shapes = {}
        updates = []
        key_names = self._key_names
        for key, row in _in_key_order(self._current):
            if key not in self._in_db:
                if row is not None:
                    inserts.append(row)
            elif row is None:
                deletes.append(
                    {_B + key_names[0]: key}
                    if len(key_names) == 1
                    else {
                        _B + n: v
                        for n, v in zip(key_names, cast(tuple[Any, ...], key), strict=True)
                    }
                )
            else:
                dirty = self._dirty.get(key)
                if dirty:
                    shape = frozenset(dirty)
                    found = shapes.get(shape)
                    if found is None:
                        columns = tuple(n for n in self._others if n in dirty)
                        names = tuple((_B + n, n) for n in (*key_names, *columns))
                        found = shapes[shape] = (columns, names, [])
                        updates.append(found)
                    found[2].append({param: row[n] for param, n in found[1]})
        if deletes:
            await execute(conn, prebuilt(table, "delete", _delete), deletes)
        postgres = conn.dialect.name == "postgresql"
        for columns, names, params in updates:
            if postgres and len(params) > 1:
                statement = prebuilt(
                    table,
                    "update-unnest:" + ",".join(columns),
                    partial(_update_unnest, keys=key_names, columns=columns),
                )
                await execute(conn, statement, _as_arrays([p for p, _ in names], params))
                continue
            statement = prebuilt(
                table, "update:" + ",".join(columns), partial(_update, columns=columns)
            )
            await execute(conn, statement, params)
        if postgres and len(inserts) > 1 and _whole(table, inserts):
            statement = prebuilt(table, "insert-unnest", _insert_unnest)
            await execute(conn, statement, _as_arrays([c.name for c in table.columns], inserts))
        elif inserts:
            await execute(conn, prebuilt(table, "insert", insert), inserts)
        self._in_db = {k for k, v in self._current.items() if v is not None}
        self._dirty.clear()
        self._conflicts.clear()


def _in_key_order(rows: dict[Key, Row | None]) -> Iterable[tuple[Key, Row | None]]:
    """``rows`` by key, where the keys sort (a key column of mixed types does not)."""
    try:
        return sorted(rows.items(), key=itemgetter(0))
    except TypeError:
        return rows.items()


def _by_key(table: Table) -> ColumnElement[bool]:
    key_cols = list(table.primary_key.columns)
    if len(key_cols) == 1:
        return key_cols[0].in_(keys_param())
    return tuple_(*key_cols).in_(keys_param())


def _by_key_json(table: Table) -> ColumnElement[bool]:
    (key,) = table.primary_key.columns
    values: Select[Any] = select(literal_column("value")).select_from(
        func.json_each(bindparam("keys", type_=String()))
    )
    return key.in_(values.scalar_subquery())


def _json_text_keys(keys: Sequence[Any]) -> str | None:
    """``keys`` as a JSON array for ``json_each``, or ``None`` where its values would
    not be the keys: a key that is not a ``str`` (``IN`` would apply the column's text
    affinity to it, ``json_each`` would not), or one holding NUL (``json_each`` cuts
    the string there), or one that is not valid Unicode (a lone surrogate)."""
    for key in keys:
        if type(key) is not str or "\x00" in key:
            return None
    try:
        return orjson.dumps(keys).decode()
    except orjson.JSONEncodeError:
        return None


def _by_key_array(table: Table) -> ColumnElement[bool]:
    (key,) = table.primary_key.columns
    return key == any_(bindparam("keys", type_=postgresql.ARRAY(key.type)))


def _unnest(table: Table, params: Sequence[tuple[str, str]]) -> Any:
    """``(SELECT unnest(:param) AS column, ...)``: one array parameter per column, the
    rows of an executemany as one set (PostgreSQL zips the unnests in lockstep)."""
    return select(
        *(
            func.unnest(bindparam(param, type_=_array_of(table.c[column].type))).label(column)
            for param, column in params
        )
    ).subquery("v")


def _array_of(item: Any) -> postgresql.ARRAY[Any]:
    # An explicit cast to varchar(n) truncates what is too long; the unbounded array
    # leaves the column's own assignment to refuse it, as a row-by-row write would.
    if isinstance(item, String) and item.length is not None:
        item = String()
    return postgresql.ARRAY(item)


def _insert_unnest(table: Table) -> Any:
    names = [c.name for c in table.columns]
    rows = _unnest(table, [(n, n) for n in names])
    return insert(table).from_select(names, select(*(rows.c[n] for n in names)))


def _update_unnest(table: Table, keys: Sequence[str], columns: Sequence[str]) -> Update:
    rows = _unnest(table, [(_B + n, n) for n in (*keys, *columns)])
    return (
        update(table)
        .where(*(table.c[k] == rows.c[k] for k in keys))
        .values({table.c[n]: rows.c[n] for n in columns})
    )


def _as_arrays(names: Sequence[str], rows: Sequence[Row]) -> dict[str, list[Any]]:
    return {name: [row[name] for row in rows] for name in names}


def _whole(table: Table, rows: Sequence[Row]) -> bool:
    """Every row names every column (the unnest INSERT writes all of them)."""
    names = set(table.columns.keys())
    return all(row.keys() == names for row in rows)


def _where_key(table: Table) -> list[ColumnElement[bool]]:
    return [c == bindparam(_B + c.name) for c in table.primary_key.columns]


def _delete(table: Table) -> Delete:
    return delete(table).where(*_where_key(table))


def _update(table: Table, columns: Sequence[str]) -> Update:
    values: dict[Any, Any] = {table.c[n]: bindparam(_B + n) for n in columns}
    return update(table).where(*_where_key(table)).values(values)


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
