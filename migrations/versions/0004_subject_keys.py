"""Per-subject data keys for personal fields in events (crypto-shredding).

``subject_keys`` lives outside the append-only log on purpose: destroying a subject's
keys (``material`` NULL, ``destroyed_at`` set) erases their personal fields in every
event without rewriting one. See ``eventstore.crypto`` and ``docs/privacy.md``.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "subject_keys",
        sa.Column("subject_id", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("material", sa.LargeBinary()),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("destroyed_at", TIMESTAMP),
        sa.PrimaryKeyConstraint("subject_id", "version", name="pk_subject_keys"),
        sa.UniqueConstraint("key_id", name="uq_subject_keys_key_id"),
    )


def downgrade() -> None:
    op.drop_table("subject_keys")
