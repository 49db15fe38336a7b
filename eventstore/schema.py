"""The store's tables. The Alembic migrations build exactly this metadata (a test checks)."""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)

from eventstore.types import BigInt, JsonDocument, UTCDateTime

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

MAX_STREAM_ID_LENGTH: Final = 200

events = Table(
    "events",
    metadata,
    # Positions are allocated under the append lock as max(position)+1..n: no sequence,
    # no identity, so they follow commit order without holes (see docs/ordering.md).
    Column("position", BigInt, primary_key=True, autoincrement=False),
    Column("event_id", Uuid(), nullable=False, unique=True),
    Column("stream_id", String(MAX_STREAM_ID_LENGTH), nullable=False),
    Column("stream_category", String(50), nullable=False),
    Column("version", Integer, nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("schema_version", SmallInteger, nullable=False),
    Column("data", JsonDocument, nullable=False),
    Column("metadata", JsonDocument, nullable=False),
    Column("actor_id", String(200)),
    Column("correlation_id", String(200)),
    Column("causation_id", String(200)),
    Column("command_id", String(200)),
    Column("recorded_at", UTCDateTime, nullable=False),
    Column("hash", String(64), nullable=False),
    # The optimistic-concurrency check *is* this constraint.
    UniqueConstraint("stream_id", "version"),
    Index(None, "stream_category", "position"),
    Index(None, "actor_id", "recorded_at"),
    Index(None, "event_type", "recorded_at"),
    Index(None, "correlation_id"),
    Index(None, "command_id"),
    Index(None, "recorded_at"),
)

#: Unique keys (an email, a username) claimed by a stream in the same transaction
#: as the append that needs them: "one account per email" without check-then-act.
unique_keys = Table(
    "unique_keys",
    metadata,
    Column("scope", String(50), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("stream_id", String(MAX_STREAM_ID_LENGTH), nullable=False),
    Column("claimed_at", UTCDateTime, nullable=False),
    Index(None, "stream_id"),
)

#: A projector's progress, written in the same transaction as the read-model rows it covers.
projection_checkpoints = Table(
    "projection_checkpoints",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("position", BigInt, nullable=False, server_default=text("0")),
    Column("active", Boolean, nullable=False, server_default=text("false")),
    Column("updated_at", UTCDateTime, nullable=False),
)

#: A projector stopped at an event it could not apply (after retries): no runner applies
#: it again until an operator retries it or skips the event (``projections.parking``).
projection_parking = Table(
    "projection_parking",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("position", BigInt, nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("error", String(2000), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("parked_at", UTCDateTime, nullable=False),
)

#: Events an operator chose to skip for one projector; the reason is in the log too.
projection_skips = Table(
    "projection_skips",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("position", BigInt, primary_key=True, autoincrement=False),
    Column("reason", String(2000), nullable=False),
    Column("skipped_at", UTCDateTime, nullable=False),
)

#: The outcome of each processed command, so a retried ``command_id`` appends nothing.
processed_commands = Table(
    "processed_commands",
    metadata,
    Column("command_id", String(200), primary_key=True),
    Column("command_type", String(200), nullable=False),
    Column("stream_id", String(MAX_STREAM_ID_LENGTH), nullable=False),
    Column("outcome", JsonDocument, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
)

#: Folded state of long streams; ignored when the decider's version changes.
snapshots = Table(
    "snapshots",
    metadata,
    Column("stream_id", String(MAX_STREAM_ID_LENGTH), primary_key=True),
    Column("decider", String(100), nullable=False),
    Column("decider_version", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", JsonDocument, nullable=False),
    Column("taken_at", UTCDateTime, nullable=False),
)

#: Data keys of the subjects whose personal fields events carry encrypted
#: (:mod:`eventstore.crypto`). Kept outside the log on purpose: destroying a subject's
#: keys (``material`` set to NULL) erases those fields without touching an event.
#: ``version`` counts rotations; the ``active`` key encrypts new events.
subject_keys = Table(
    "subject_keys",
    metadata,
    Column("subject_id", String(MAX_STREAM_ID_LENGTH), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("key_id", String(64), nullable=False, unique=True),
    Column("material", LargeBinary),
    Column("active", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("destroyed_at", UTCDateTime),
)

#: The log's Merkle tree in hash tiles (:mod:`eventstore.merkle`): tile ``idx`` of
#: ``level`` holds up to 256 concatenated 32-byte hashes of subtrees of height 8*level.
merkle_tiles = Table(
    "merkle_tiles",
    metadata,
    Column("level", SmallInteger, primary_key=True, autoincrement=False),
    Column("idx", BigInt, primary_key=True, autoincrement=False),
    Column("hashes", LargeBinary, nullable=False),
)

#: How far the tree has grown (one row, ``id`` 1), and its root at that size.
merkle_state = Table(
    "merkle_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("size", BigInt, nullable=False),
    Column("root", String(64), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

#: Signed checkpoints (C2SP signed notes) written by ``tiu checkpoint``. A copy here is a
#: convenience for ``tiu checkpoint export``: the copy an auditor keeps elsewhere is
#: what proves anything.
checkpoints = Table(
    "checkpoints",
    metadata,
    Column("tree_size", BigInt, primary_key=True, autoincrement=False),
    Column("signed_at", UTCDateTime, primary_key=True),
    Column("root", String(64), nullable=False),
    Column("note", Text, nullable=False),
)

#: SQLite only uses it: a row exists only inside retention's transaction, and the
#: append-only trigger lets a DELETE on ``events`` through only then.
retention_pass = Table(
    "retention_pass",
    metadata,
    Column("archive_id", String(64), primary_key=True),
)
