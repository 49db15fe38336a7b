"""Portable column types: one schema, identical behaviour on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timezone, tzinfo
from typing import Any, Final

from pydantic_core import TzInfo
from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Integer
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator, TypeEngine

from eventstore import hashing

#: JSONB on PostgreSQL (indexable, queryable), JSON text on SQLite.
JsonDocument: TypeEngine[Any] = JSON().with_variant(JSONB(), "postgresql")

#: ``bigint`` on PostgreSQL; ``INTEGER`` on SQLite so that a primary key is the rowid.
BigInt: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    Naive datetimes are refused on the way in: a naive value is ambiguous, and an
    audit trail must not guess. SQLite stores UTC text; PostgreSQL ``timestamptz``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _utc(value)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def bind_processor(self, dialect: Dialect) -> Any:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def text(value: datetime | None) -> str | None:
            # Straight to SQLAlchemy's SQLite text in one step (its processor after
            # ours was ~3 us a value, most of binding a replay's rows, profiled).
            return None if value is None else sqlite_text(value)

        return text

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is UTC:  # asyncpg's timestamptz: UTC already
            return value
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        if dialect.name == "postgresql" and dialect.driver == "asyncpg":
            # asyncpg decodes timestamptz to an aware datetime in UTC whatever the
            # session's TimeZone: nothing to do, so no call per value (~9% of a keyset
            # page walk's instructions, profiled). Only 'infinity', which tiu never
            # writes, comes back naive (datetime.max / datetime.min).
            return None
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)
        fallback = super().result_processor(dialect, coltype)

        def parse(value: Any) -> datetime | None:
            # Read-model rows have several timestamps: the one-step parse matters.
            if isinstance(value, str):
                try:  # not contextlib.suppress: this runs per value of every row
                    return sqlite_datetime(value)
                except ValueError:  # text with an offset of its own
                    pass
            parsed = fallback(value) if fallback is not None else value
            return self.process_result_value(parsed, dialect)

        return parse


def _utc(value: datetime) -> datetime:
    if value.tzinfo is UTC:
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} refused: pass an aware datetime")
    return value.astimezone(UTC)


def sqlite_datetime(text: str) -> datetime:
    """The aware UTC datetime of SQLite's UTC text (:func:`sqlite_text`), parsed with
    its offset in one step: 7x faster than parsing, then ``replace(tzinfo=UTC)``."""
    return datetime.fromisoformat(text + "+00:00")


def sqlite_text(value: datetime) -> str:
    """An aware datetime as SQLite stores it: UTC, ``YYYY-MM-DD HH:MM:SS.ffffff``, the
    text SQLAlchemy's SQLite ``DATETIME`` writes (so text order is time order).

    A value at offset zero under another tzinfo (pydantic's ``TzInfo(UTC)``, which every
    decoded event's timestamps have) is written as it is: the text is the same, and
    converting it first was a third of the time (a replay binds several per row). The
    last fixed-offset zone found at zero is remembered, and so is the last value's text:
    a read-model row often holds one timestamp twice (created and updated at once).
    """
    global _last_text, _zero_zone  # noqa: PLW0603  # swapped whole: safe across threads
    last = _last_text
    if value is last[0]:
        return last[1]
    given, zone = value, value.tzinfo
    stamp = hashing.last_stamp
    if value is stamp[0] and zone is UTC:
        # The append's stamp, which its hashed text just wrote out in UTC (the text
        # with "T" and "+00:00"): the same digits.
        text = stamp[1]
        text = f"{text[:10]} {text[11:26]}"
        _last_text = (given, text)
        return text
    if zone is not UTC and zone is not _zero_zone:
        offset = value.utcoffset()
        if offset is None or offset:  # naive (refused) or another offset
            value = _utc(value)
        elif zone is not None and type(zone) in _FIXED_OFFSET_ZONES:  # zero at every instant
            _zero_zone = zone
    text = value.isoformat(" ", "microseconds")[:26]
    _last_text = (given, text)
    return text


_last_text: tuple[datetime | None, str] = (None, "")
_zero_zone: tzinfo = UTC
#: Zone types whose offset never changes (a ``ZoneInfo`` at zero in winter is not).
_FIXED_OFFSET_ZONES: Final = frozenset({timezone, TzInfo})
