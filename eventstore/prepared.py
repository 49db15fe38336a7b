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

It is for statements built once and reused (module constants, or per table through
:func:`projections.projector.statement`): compiled forms are cached per statement
object. Anything it cannot run exactly as SQLAlchemy would, it hands to
``conn.execute``: statements that are not INSERT, UPDATE or DELETE, RETURNING,
Python-side column defaults, and the first statement of a PostgreSQL transaction
(SQLAlchemy's asyncpg adapter sends BEGIN lazily, with its first statement).
"""

from __future__ import annotations

import operator
import sqlite3
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Dialect as SADialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.types import TupleType

from eventstore.dialects import driver_errors, raw_connection
from eventstore.sqlite_driver import OFF_LOOP

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
    #: (KeyError when a parameter with a default is left out: the slot loop then), and
    #: the positions whose values need a bind processor. Half the binding time of a
    #: replay's rows, which name every column and process only the timestamps.
    values: Callable[[Params], tuple[Any, ...]] | None
    processed: tuple[tuple[int, Callable[[Any], Any]], ...]

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
_cache: weakref.WeakKeyDictionary[UpdateBase, dict[tuple[str, tuple[str, ...]], _Compiled | None]]
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
    values = None if expanding or not slots else _getter(tuple(name for name, *_ in slots))
    processed = tuple((i, slot[3]) for i, slot in enumerate(slots) if slot[3] is not None)
    return _Compiled(
        str(compiled), compiled, tuple(slots), processors, expanding, {}, values, processed
    )


def _getter(names: tuple[str, ...]) -> Callable[[Params], tuple[Any, ...]]:
    if len(names) == 1:
        (name,) = names
        return lambda params: (params[name],)
    return operator.itemgetter(*names)


def _compiled(statement: UpdateBase, dialect: SADialect, keys: tuple[str, ...]) -> _Compiled | None:
    forms = _cache.get(statement)
    if forms is None:
        forms = _cache[statement] = {}
    tag = (f"{dialect.name}+{dialect.driver}", keys)
    found = forms.get(tag, _MISSING)
    if found is _MISSING:
        found = forms[tag] = _compile(statement, dialect, keys)
    return found  # type: ignore[return-value]


async def execute(
    conn: AsyncConnection, statement: UpdateBase, params: Params | Sequence[Params]
) -> int:
    """Run a prebuilt INSERT, UPDATE or DELETE on ``conn`` and return its row count.

    ``params`` is one mapping, or a list of mappings with the same names (executemany;
    the count is then the driver's total, -1 where it does not report one). Same
    result, same errors and same transaction as ``conn.execute``.
    """
    many = not isinstance(params, Mapping)
    rows: Sequence[Params] = params if many else (params,)  # type: ignore[assignment]
    if not rows:
        return 0
    names = rows[0].keys()
    compiled = _compiled(statement, conn.dialect, tuple(names))
    raw = await raw_connection(conn)
    if (
        compiled is None
        or (many and (compiled.expanding or any(r.keys() != names for r in rows)))
        or not _in_transaction(raw.driver_connection)
    ):
        return int((await conn.execute(statement, params)).rowcount)
    bound = [compiled.bind(r) for r in rows]
    sql, values = bound[0][0], [v for _, v in bound]
    with driver_errors(conn.engine, raw, sql):
        if conn.dialect.name == "sqlite":
            sync = conn.sync_connection
            off_loop = sync is not None and bool(sync.get_execution_options().get(OFF_LOOP))
            return await _sqlite(raw, sql, values, many, off_loop=off_loop)
        return await _asyncpg(raw, sql, values, many)


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
        cursor = await adapted.off_loop(fn, *args)
    else:
        cursor = await adapted.run(fn, *args)
    return int(cursor.rowcount)


async def _asyncpg(raw: Any, sql: str, values: list[tuple[Any, ...]], many: bool) -> int:
    driver = raw.driver_connection
    if many:
        await driver.executemany(sql, values)
        return -1
    status: str = await driver.execute(sql, *values[0])
    count = status.rsplit(" ", 1)[-1]
    return int(count) if count.isdigit() else -1
