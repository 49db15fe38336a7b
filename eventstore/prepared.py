"""Prebuilt Core DML run on the driver connection: compiled once, no execution context.

A command writes a handful of single-row statements (read-model rows, the command's
idempotency record, the checkpoints). Through ``AsyncConnection.execute`` each one
costs SQLAlchemy's per-execution work, ~50 us on SQLite and ~130 us on PostgreSQL
(profiled): the greenlet hop, the execution context, events, result set-up. That was
more than the statements themselves. :func:`execute` compiles a statement once per
dialect and set of parameter names, with SQLAlchemy's own compiler, and then only
binds values (with the same bind processors SQLAlchemy would apply) and calls the
driver. Only public SQLAlchemy API is used (a compiled statement's ``positiontup``,
``binds`` and ``construct_expanded_state``, each type's ``bind_processor`` for the
dialect), so it works on any SQLAlchemy 2.x:

* SQLite: ``sqlite3`` inline, with the busy handling of :mod:`eventstore.sqlite_driver`,
  or on a worker thread when the connection's execution options say ``off_loop``
  (a batch loop sharing a service's event loop: a projector's flush writes hundreds
  of rows at once);
* PostgreSQL: asyncpg, whose per-connection statement cache prepares each SQL once.

Driver errors are re-raised as the SQLAlchemy exceptions ``conn.execute`` would raise
(so :func:`eventstore.translate.translate_errors` sees no difference), and with
``echo`` on, each statement is logged.

On PostgreSQL a write transaction can also hold writes back (:class:`Deferred`): a
command's read-model rows and idempotency record are then sent with its append, in
one statement (``tiu_command``, migration 0012), instead of a round trip each.

It is for statements built once and reused (module constants, or per table through
:func:`projections.projector.statement`): compiled forms are cached per statement
object. Anything it cannot run exactly as SQLAlchemy would, it hands to
``conn.execute``: statements that are not INSERT, UPDATE or DELETE, RETURNING,
Python-side column defaults, and the first statement of a PostgreSQL transaction
(SQLAlchemy's asyncpg adapter sends BEGIN lazily, with its first statement).
"""

from __future__ import annotations

import math
import operator
import re
import sqlite3
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final

from sqlalchemy.engine import Dialect as SADialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.types import TupleType

from eventstore.dialects import driver_errors, pooled, raw_connection
from eventstore.engine import driver_round_trip
from eventstore.errors import EventStoreError
from eventstore.sqlite_driver import BUSY, OFF_LOOP
from eventstore.sqlite_driver import Connection as InlineConnection
from eventstore.translate import translate_errors

Params = Mapping[str, Any]


#: Where a positional value comes from: a parameter's name, its position within an
#: expanding parameter's list (None for a plain one), its value when not given, and
#: its bind processor.
_Slot = tuple[str, int | None, Any, Callable[[Any], Any] | None]


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    compiled: SQLCompiler
    slots: tuple[_Slot, ...]
    #: Each parameter's bind processor (``None``: its value is passed as it is).
    processors: Mapping[str, Callable[[Any], Any] | None]
    #: The names of the expanding (``IN``) parameters; their SQL depends on the
    #: lengths of their lists, so it is expanded once per combination of lengths.
    expanding: tuple[str, ...]
    expanded: dict[tuple[int, ...], tuple[str, tuple[_Slot, ...]] | None]
    #: Without expanding parameters: the values of every slot by name, in one C call
    #: (those this form's parameters leave out, such as the ``1`` of ``total + 1``, from
    #: their defaults), and the positions whose values need a bind processor. Half the
    #: binding time of a replay's rows, which name every column and process only the
    #: timestamps.
    values: Callable[[Params], tuple[Any, ...]] | None
    processed: tuple[tuple[int, Callable[[Any], Any]], ...]
    #: Whether it can be deferred (:class:`Deferred`): PostgreSQL, not expanding, at
    #: most :data:`MAX_DEFERRED_PARAMS` parameters, each with a cast in the SQL (so
    #: that a value passed as text is read as the type it was bound as).
    deferrable: bool = False

    def bind(self, params: Params) -> tuple[str, tuple[Any, ...]]:
        """The SQL and its positional values for ``params``."""
        sql, slots = self.sql, self.slots
        if self.values is not None:
            try:
                values = self.values(params)
            except KeyError:
                pass
            else:
                if not self.processed:
                    return sql, values
                out = list(values)
                for i, processor in self.processed:
                    out[i] = processor(out[i])
                return sql, tuple(out)
        if self.expanding:
            try:
                lengths = tuple(len(params[name]) for name in self.expanding)
            except (KeyError, TypeError):  # missing, or not a list: SQLAlchemy's error
                return self._expanded(params)
            form = self.expanded.get(lengths, _MISSING)
            if form is _MISSING:
                form = self.expanded[lengths] = self._expand(params)
            if form is None:
                return self._expanded(params)
            sql, slots = form  # type: ignore[misc]
        out = []
        for name, index, default, process in slots:
            value = params.get(name, default) if index is None else params[name][index]
            out.append(value if process is None else process(value))
        return sql, tuple(out)

    def _expand(self, params: Params) -> tuple[str, tuple[_Slot, ...]] | None:
        """The SQL and slots for these lengths of the expanding lists (None: tuples in
        a list, expanded per element; see :meth:`_expanded`)."""
        if any(isinstance(v, tuple) for name in self.expanding for v in params[name]):
            return None
        state = self.compiled.construct_expanded_state(params)
        processors: dict[str, Any] = {**self.processors, **state.processors}
        element = {
            expanded: (name, i)
            for name, names in state.parameter_expansion.items()
            for i, expanded in enumerate(names)
        }
        defaults = {name: default for name, _, default, _ in self.slots}
        slots: list[_Slot] = []
        for positional in state.positiontup or ():
            name, index = element.get(positional, (positional, None))
            slots.append((name, index, defaults.get(name), processors.get(positional)))
        return state.statement, tuple(slots)

    def _expanded(self, params: Params) -> tuple[str, tuple[Any, ...]]:
        state = self.compiled.construct_expanded_state(params)
        processors: dict[str, Any] = {**self.processors, **state.processors}
        out = []
        for name, value in zip(state.positiontup or (), state.positional_parameters, strict=True):
            process = processors.get(name)
            out.append(value if process is None else process(value))
        return state.statement, tuple(out)


_MISSING = object()
_cache: weakref.WeakKeyDictionary[UpdateBase, dict[tuple[type, tuple[str, ...]], _Compiled | None]]
_cache = weakref.WeakKeyDictionary()


def _compile(statement: UpdateBase, dialect: SADialect, keys: tuple[str, ...]) -> _Compiled | None:
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    if not isinstance(compiled, SQLCompiler) or not (
        compiled.isinsert or compiled.isupdate or compiled.isdelete
    ):
        return None
    if compiled.effective_returning or compiled.insert_prefetch or compiled.update_prefetch:
        return None  # SQLAlchemy would fetch or compute values around the statement
    expanding = tuple(name for name, b in compiled.binds.items() if b.expanding)
    if any(isinstance(b.type, TupleType) for b in compiled.binds.values()):
        return None  # a tuple-typed parameter: processed per element
    processors = {
        name: bind.type.dialect_impl(dialect).bind_processor(dialect)
        for name, bind in compiled.binds.items()
    }
    slots: list[_Slot] = []
    for name in compiled.positiontup or ():
        bind = compiled.binds[name]
        default = None if bind.required else bind.effective_value
        if bind.required and name not in keys:
            return None  # let SQLAlchemy raise its error for the missing value
        process = processors.get(name)
        slots.append((name, None, default, process))
    # A form is compiled per set of parameter names (``keys``): those it leaves out
    # always take their defaults.
    left_out = {name: default for name, _, default, _ in slots if name not in keys}
    names = tuple(name for name, *_ in slots)
    values = None if expanding or not slots else _getter(names, left_out)
    processed = tuple((i, slot[3]) for i, slot in enumerate(slots) if slot[3] is not None)
    sql = str(compiled)
    deferrable = (
        dialect.name == "postgresql"
        and not expanding
        and len(slots) <= MAX_DEFERRED_PARAMS
        and all(m.group(1) for m in _PARAMETER.finditer(sql))
    )
    return _Compiled(
        sql, compiled, tuple(slots), processors, expanding, {}, values, processed, deferrable
    )


def _getter(
    names: tuple[str, ...], defaults: dict[str, Any]
) -> Callable[[Params], tuple[Any, ...]]:
    get: Callable[[Params], tuple[Any, ...]]
    if len(names) == 1:
        (name,) = names
        get = lambda params: (params[name],)  # noqa: E731
    else:
        get = operator.itemgetter(*names)
    if not defaults:
        return get
    # Merged in, not a KeyError and the slot loop: a read-model counter's UPDATE
    # (``total + 1``) left its literal out on every command.
    return lambda params: get({**defaults, **params})


def _compiled(statement: UpdateBase, dialect: SADialect, keys: tuple[str, ...]) -> _Compiled | None:
    forms = _cache.get(statement)
    if forms is None:
        forms = _cache[statement] = {}
    tag = (type(dialect), keys)  # a dialect class compiles one way
    found = forms.get(tag, _MISSING)
    if found is _MISSING:
        found = forms[tag] = _compile(statement, dialect, keys)
    return found  # type: ignore[return-value]


async def execute(
    conn: AsyncConnection,
    statement: UpdateBase,
    params: Params | Sequence[Params],
    *,
    none_changed: BaseException | None = None,
) -> int:
    """Run a prebuilt INSERT, UPDATE or DELETE on ``conn`` and return its row count.

    ``params`` is one mapping, or a list of mappings with the same names (executemany;
    the count is then the driver's total, -1 where it does not report one). Same
    result, same errors and same transaction as ``conn.execute``.

    ``none_changed`` is raised if the statement changes no row. Where ``conn`` holds
    writes back (:func:`deferring`) and takes this one, it is held, and -1 returned:
    it runs later in the same transaction, before the append, and raises
    ``none_changed`` then.
    """
    one = type(params) is dict or isinstance(params, Mapping)  # the ABC's check ~0.2 us
    if not one and not params:
        return 0
    names = params.keys() if one else params[0].keys()  # type: ignore[union-attr, index]
    # The engine's dialect, the connection's: ``conn.dialect`` reaches it through two
    # proxy properties.
    compiled = _compiled(statement, conn.sync_engine.dialect, tuple(names))
    known = pooled(conn) if one and compiled is not None else None
    if known is not None and known.db.in_transaction:
        # A store's write transaction on SQLite, its driver connection known (see
        # :func:`eventstore.dialects.pooled`): the checks of :func:`_execute_one` hold
        # already, and the statement runs inline, as it would there.
        sql, values = compiled.bind(params)  # type: ignore[union-attr, arg-type]
        db = known.db
        with driver_errors(conn.engine, known.raw, sql):
            cursor = known.driver.attempt(db.execute, (sql, values))
            if cursor is BUSY:
                cursor = await known.driver.run(db.execute, sql, values)
        count = int(cursor.rowcount)  # type: ignore[attr-defined]
        if none_changed is not None and count == 0:
            raise none_changed
        return count
    held = _held.get(conn) if _held else None
    if held is not None:
        if (
            (held.taking or none_changed is not None)
            and one
            and compiled is not None
            and compiled.deferrable
        ):
            args = _texts(compiled.bind(params)[1])  # type: ignore[arg-type]
            if args is not None:
                held.statements.append(
                    DeferredStatement(
                        compiled.sql,
                        args,
                        statement,
                        params,  # type: ignore[arg-type]
                        none_changed,
                        held.failed,
                    )
                )
                return -1
        await driver_round_trip(conn, held.run(conn))  # what is held first, in order
    if one:
        count = await driver_round_trip(conn, _execute_one(conn, statement, params, compiled))  # type: ignore[arg-type]
    else:
        count = await driver_round_trip(conn, _execute_many(conn, statement, params, compiled))  # type: ignore[arg-type]
    if none_changed is not None and count == 0:
        raise none_changed
    return count


async def _execute_one(
    conn: AsyncConnection, statement: UpdateBase, params: Params, compiled: _Compiled | None
) -> int:
    # One row: the common case (a command's projection rows), kept short.
    raw = await raw_connection(conn)
    adapted = raw.dbapi_connection
    # The inline SQLite driver's connection straight from it, not through the pool's
    # chain of properties (four calls).
    if type(adapted) is InlineConnection:
        driver = adapted.driver_connection
    else:
        driver = raw.driver_connection
    if compiled is None or not _in_transaction(driver):
        return int((await conn.execute(statement, params)).rowcount)
    sql, one = compiled.bind(params)
    with driver_errors(conn.engine, raw, sql):
        if type(driver) is sqlite3.Connection:
            if _off_loop(conn):
                return await _sqlite(raw, sql, [one], False, off_loop=True)
            cursor = await adapted.run(driver.execute, sql, one)
            return int(cursor.rowcount)
        return await _asyncpg(raw, sql, [one], False)


async def _execute_many(
    conn: AsyncConnection,
    statement: UpdateBase,
    rows: Sequence[Params],
    compiled: _Compiled | None,
) -> int:
    names = rows[0].keys()
    raw = await raw_connection(conn)
    if (
        compiled is None
        or compiled.expanding
        or any(r.keys() != names for r in rows)
        or not _in_transaction(raw.driver_connection)
    ):
        return int((await conn.execute(statement, rows)).rowcount)
    bound = [compiled.bind(r) for r in rows]
    sql, values = bound[0][0], [v for _, v in bound]
    with driver_errors(conn.engine, raw, sql):
        if conn.dialect.name == "sqlite":
            return await _sqlite(raw, sql, values, True, off_loop=_off_loop(conn))
        return await _asyncpg(raw, sql, values, True)


def _off_loop(conn: AsyncConnection) -> bool:
    """Whether the caller sent ``conn``'s statements off the loop (the SQLite driver's
    :data:`OFF_LOOP` option: a rebuild or catch-up sharing a service's loop). Not on a
    shared connection (a ``StaticPool``: SQLite's ``:memory:``), where interrupting a
    cancelled caller's statement would fail another caller's: those stay inline, as
    that database's log pages do."""
    sync = conn.sync_connection
    if sync is None or not sync.get_execution_options().get(OFF_LOOP):
        return False
    return not isinstance(conn.engine.pool, StaticPool)


def _in_transaction(driver: Any) -> bool:
    """Whether the driver connection is inside a transaction. If not, SQLAlchemy would
    begin one with the statement (asyncpg's adapter begins lazily), and a statement
    sent straight to the driver would be committed on its own."""
    if isinstance(driver, sqlite3.Connection):
        return driver.in_transaction
    return bool(driver.is_in_transaction())


async def _sqlite(
    raw: Any, sql: str, values: list[tuple[Any, ...]], many: bool, *, off_loop: bool
) -> int:
    db = raw.driver_connection
    adapted = raw.dbapi_connection
    fn, args = (db.executemany, (sql, values)) if many else (db.execute, (sql, values[0]))
    if off_loop:
        adapted.heavy = True  # as the driver's own off-loop statements: COMMIT off it too
        return int(await adapted.off_loop(_rowcount, fn, *args))
    cursor = await adapted.run(fn, *args)
    return int(cursor.rowcount)


def _rowcount(fn: Any, *args: Any) -> int:
    """On the worker thread: run ``fn``, and close the cursor it returns there.
    Handed back to the loop, the cursor would be freed wherever its last reference
    goes (the executor's work item, on that worker thread, at a time of its own), and
    freeing a cursor resets its statement, which sqlite3's statement cache may have
    given meanwhile to the connection's next statement on another thread."""
    cursor = fn(*args)
    try:
        return int(cursor.rowcount)
    finally:
        cursor.close()


async def _asyncpg(raw: Any, sql: str, values: list[tuple[Any, ...]], many: bool) -> int:
    driver = raw.driver_connection
    if many:
        await driver.executemany(sql, values)
        return -1
    status: str = await driver.execute(sql, *values[0])
    count = status.rsplit(" ", 1)[-1]
    return int(count) if count.isdigit() else -1


# -- writes held back for the append (PostgreSQL) -----------------------------------------

#: Most parameters a deferred statement may have: the USING list of ``tiu_command``.
MAX_DEFERRED_PARAMS: Final = 48
#: A ``$n`` parameter, and whether a cast follows it.
_PARAMETER: Final = re.compile(r"\$\d+(::)?")


@dataclass(slots=True)
class DeferredStatement:
    """A write held back: its SQL, its values as text (each read through the cast the
    SQL puts on it), and what it was run with, to run it as it is where it cannot wait."""

    sql: str
    args: list[str | None]
    statement: UpdateBase
    params: Params
    #: Raised when it changes no row (see :func:`execute`).
    none_changed: BaseException | None
    #: What its failure becomes (``None``: the failure itself): the projector's error.
    failed: Callable[[BaseException], BaseException] | None


class Deferred:
    """The writes a PostgreSQL write transaction holds back to send with its append, in
    one statement (``tiu_command``, see :meth:`eventstore.dialects.Dialect.command_write`).

    Only statements that may run later in the transaction are taken: those of code that
    says so (:meth:`taking`: an inline projector whose ``apply`` only writes, through
    :func:`execute`), and the idempotency record (``none_changed``). Any other statement
    run through :func:`execute` on the connection first runs what is held, in order;
    so does a read in a unit of work (:meth:`eventstore.store.UnitOfWork.reading`: the
    repositories' reads, a command's load that must see an idempotency record held),
    and code that reads on the connection otherwise runs what is held first (:meth:`run`).
    """

    __slots__ = ("failed", "statements", "taking")

    def __init__(self) -> None:
        self.statements: list[DeferredStatement] = []
        self.taking = False
        self.failed: Callable[[BaseException], BaseException] | None = None

    @contextmanager
    def taking_from(
        self, failed: Callable[[BaseException], BaseException] | None
    ) -> Iterator[None]:
        """Hold back the writes run through :func:`execute` in the block; ``failed``
        says what their failure becomes when they run."""
        self.taking, self.failed = True, failed
        try:
            yield
        finally:
            self.taking, self.failed = False, None

    async def run(self, conn: AsyncConnection) -> None:
        """Run what is held now, in order, as :func:`execute` would have."""
        statements, self.statements = self.statements, []
        for held in statements:
            compiled = _compiled(held.statement, conn.dialect, tuple(held.params))
            try:
                with translate_errors():
                    count = await _execute_one(conn, held.statement, held.params, compiled)
            except EventStoreError:  # the database's failure
                raise
            except Exception as error:
                if held.failed is None:
                    raise
                raise held.failed(error) from error
            if held.none_changed is not None and count == 0:
                raise held.none_changed


#: The connections in a :func:`deferring` block (which takes each out as it ends):
#: a plain dict, whose emptiness (every statement on SQLite, which holds nothing back)
#: is a C check, where a weak mapping's ``len`` was a Python call each statement.
_held: dict[AsyncConnection, Deferred] = {}


@contextmanager
def deferring(conn: AsyncConnection, held: Deferred) -> Iterator[None]:
    """While the block runs, :func:`execute` on ``conn`` may hold writes in ``held``."""
    _held[conn] = held
    try:
        yield
    finally:
        _held.pop(conn, None)


def held_back(conn: AsyncConnection) -> Deferred | None:
    """The writes ``conn`` holds back, if it does (:func:`deferring`)."""
    return _held.get(conn) if _held else None


def _texts(values: Sequence[Any]) -> list[str | None] | None:
    """``values`` as PostgreSQL reads them from text, or ``None`` if one has no text
    form known to read back exactly (the statement then runs as it is)."""
    out: list[str | None] = []
    for value in values:
        kind = type(value)
        if value is None or kind is str:
            out.append(value)
        elif kind is bool:
            out.append("true" if value else "false")
        elif kind is int:
            out.append(str(value))
        elif kind is datetime:
            if value.tzinfo is None:
                return None  # asyncpg and a text cast could read a naive time differently
            out.append(value.isoformat())
        elif kind is float and math.isfinite(value):
            out.append(repr(value))
        elif kind in (date, Decimal, uuid.UUID):
            out.append(str(value))
        else:
            return None
    return out
