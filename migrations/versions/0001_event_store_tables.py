"""Event store tables: events, unique keys, checkpoints, processed commands, snapshots.

On PostgreSQL a trigger makes ``events`` append-only: UPDATE and TRUNCATE are always
refused; DELETE only inside the audited retention path, which sets ``tiu.retention``.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)

APPEND_ONLY_FUNCTION = """
CREATE FUNCTION tiu_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('tiu.retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("position", BIGINT, autoincrement=False, nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("stream_id", sa.String(200), nullable=False),
        sa.Column("stream_category", sa.String(50), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("event_type", sa.String(200), nullable=False),
        sa.Column("schema_version", sa.SmallInteger(), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("actor_id", sa.String(200)),
        sa.Column("correlation_id", sa.String(200)),
        sa.Column("causation_id", sa.String(200)),
        sa.Column("command_id", sa.String(200)),
        sa.Column("recorded_at", TIMESTAMP, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("position", name="pk_events"),
        sa.UniqueConstraint("event_id", name="uq_events_event_id"),
        sa.UniqueConstraint("stream_id", "version", name="uq_events_stream_id_version"),
    )
    op.create_index("ix_events_actor_id_recorded_at", "events", ["actor_id", "recorded_at"])
    op.create_index("ix_events_command_id", "events", ["command_id"])
    op.create_index("ix_events_correlation_id", "events", ["correlation_id"])
    op.create_index("ix_events_event_type_recorded_at", "events", ["event_type", "recorded_at"])
    op.create_index("ix_events_recorded_at", "events", ["recorded_at"])
    op.create_index(
        "ix_events_stream_category_position", "events", ["stream_category", "position"]
    )

    op.create_table(
        "unique_keys",
        sa.Column("scope", sa.String(50), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("stream_id", sa.String(200), nullable=False),
        sa.Column("claimed_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", name="pk_unique_keys"),
    )
    op.create_index("ix_unique_keys_stream_id", "unique_keys", ["stream_id"])

    op.create_table(
        "projection_checkpoints",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("position", BIGINT, server_default=sa.text("0"), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name="pk_projection_checkpoints"),
    )
    op.create_table(
        "processed_commands",
        sa.Column("command_id", sa.String(200), nullable=False),
        sa.Column("command_type", sa.String(200), nullable=False),
        sa.Column("stream_id", sa.String(200), nullable=False),
        sa.Column("outcome", JSON, nullable=False),
        sa.Column("recorded_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("command_id", name="pk_processed_commands"),
    )
    op.create_table(
        "snapshots",
        sa.Column("stream_id", sa.String(200), nullable=False),
        sa.Column("decider", sa.String(100), nullable=False),
        sa.Column("decider_version", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", JSON, nullable=False),
        sa.Column("taken_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("stream_id", name="pk_snapshots"),
    )

    if op.get_context().dialect.name == "postgresql":
        op.execute(APPEND_ONLY_FUNCTION)
        op.execute(
            "CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events "
            "FOR EACH ROW EXECUTE FUNCTION tiu_events_append_only()"
        )
        op.execute(
            "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events "
            "FOR EACH STATEMENT EXECUTE FUNCTION tiu_events_append_only()"
        )


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS events_no_truncate ON events")
        op.execute("DROP TRIGGER IF EXISTS events_append_only ON events")
        op.execute("DROP FUNCTION IF EXISTS tiu_events_append_only()")
    op.drop_table("snapshots")
    op.drop_table("processed_commands")
    op.drop_table("projection_checkpoints")
    op.drop_index("ix_unique_keys_stream_id", table_name="unique_keys")
    op.drop_table("unique_keys")
    for name in (
        "ix_events_stream_category_position",
        "ix_events_recorded_at",
        "ix_events_event_type_recorded_at",
        "ix_events_correlation_id",
        "ix_events_command_id",
        "ix_events_actor_id_recorded_at",
    ):
        op.drop_index(name, table_name="events")
    op.drop_table("events")
