"""The log's Merkle tree (hash tiles), signed checkpoints, and SQLite's append-only guard.

``merkle_tiles`` and ``merkle_state`` hold the RFC 9162 tree over the log
(``eventstore.merkle``); ``checkpoints`` keeps a copy of each signed checkpoint. On SQLite,
triggers now refuse UPDATE of ``events`` always, and DELETE unless ``retention_pass`` has
a row, which only retention's own transaction inserts and removes (PostgreSQL has had its
trigger since 0001). Anyone holding the file can drop a trigger: the signed checkpoint is
what catches them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)

SQLITE_TRIGGERS = (
    "CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN "
    "SELECT RAISE(ABORT, 'events is append-only: UPDATE refused'); END",
    "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
    "WHEN NOT EXISTS (SELECT 1 FROM retention_pass) BEGIN "
    "SELECT RAISE(ABORT, 'events is append-only: DELETE refused'); END",
)


def upgrade() -> None:
    op.create_table(
        "merkle_tiles",
        sa.Column("level", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("idx", BIGINT, autoincrement=False, nullable=False),
        sa.Column("hashes", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx", name="pk_merkle_tiles"),
    )
    op.create_table(
        "merkle_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", BIGINT, nullable=False),
        sa.Column("root", sa.String(64), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_merkle_state"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("tree_size", BIGINT, autoincrement=False, nullable=False),
        sa.Column("signed_at", TIMESTAMP, nullable=False),
        sa.Column("root", sa.String(64), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("tree_size", "signed_at", name="pk_checkpoints"),
    )
    op.create_table(
        "retention_pass",
        sa.Column("archive_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("archive_id", name="pk_retention_pass"),
    )
    if op.get_context().dialect.name == "sqlite":
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS events_no_delete")
        op.execute("DROP TRIGGER IF EXISTS events_no_update")
    op.drop_table("retention_pass")
    op.drop_table("checkpoints")
    op.drop_table("merkle_state")
    op.drop_table("merkle_tiles")
