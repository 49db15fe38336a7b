"""Bench-local workaround for a bug in tiu's SQLite rebuild swap (reported, not fixed here).

``projections.replay._rename_shadow`` on SQLite builds ``Index(index.name,
*index.expressions)`` while iterating ``live.indexes``; the new Index attaches itself
to the live table, so the loop dies with "Set changed size during iteration" and
every SQLite rebuild fails at the swap. The bench swaps in this copy, which creates
the same indexes with plain DDL, only when the shipped function still has the bug.
"""

from __future__ import annotations

import inspect

from sqlalchemy import Table, text
from sqlalchemy.engine import Connection

from projections import replay


def _rename_shadow_fixed(sync: Connection, live: Table, shadow: Table) -> None:
    if sync.dialect.name == "postgresql":
        _original(sync, live, shadow)
        return
    prep = sync.dialect.identifier_preparer
    sync.execute(text(f"ALTER TABLE {prep.quote(shadow.name)} RENAME TO {prep.quote(live.name)}"))
    for index in list(shadow.indexes):
        sync.execute(text(f"DROP INDEX IF EXISTS {prep.quote(str(index.name))}"))
    for index in list(live.indexes):
        cols = ", ".join(prep.quote(c.name) for c in index.columns)
        unique = "UNIQUE " if index.unique else ""
        sync.execute(
            text(
                f"CREATE {unique}INDEX {prep.quote(str(index.name))} "
                f"ON {prep.quote(live.name)} ({cols})"
            )
        )


_original = replay._rename_shadow
PATCHED = "for index in live.indexes:\n            Index(" in inspect.getsource(_original)


def apply() -> bool:
    """Install the workaround if needed; True when it was installed."""
    if PATCHED:
        replay._rename_shadow = _rename_shadow_fixed  # type: ignore[assignment]
    return PATCHED
