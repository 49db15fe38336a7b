"""Parked projectors and skipped events (projections.parking).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)
POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "projection_parking",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("position", POSITION, nullable=False),
        sa.Column("event_type", sa.String(200), nullable=False),
        sa.Column("error", sa.String(2000), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("parked_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_projection_parking"),
    )
    op.create_table(
        "projection_skips",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("position", POSITION, nullable=False),
        sa.Column("reason", sa.String(2000), nullable=False),
        sa.Column("skipped_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", "position", name="pk_projection_skips"),
    )


def downgrade() -> None:
    op.drop_table("projection_skips")
    op.drop_table("projection_parking")
