"""PostgreSQL: take the append lock and read the stream heads in one round trip.

An append used to send the advisory lock and the heads query as two statements, so
that the heads are read with a snapshot taken after the lock was granted
(docs/ordering.md). ``tiu_lock_and_heads`` keeps that order inside one call: a VOLATILE
plpgsql function takes a fresh snapshot for each statement it runs, so the query
after ``PERFORM pg_advisory_xact_lock`` sees every append committed before the lock.
One round trip fewer per append (and per command). SQLite needs nothing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 7629173 is eventstore.dialects.ADVISORY_LOCK_CLASS ("tiu"); a test checks they agree.
LOCK_AND_HEADS = """
CREATE FUNCTION tiu_lock_and_heads(ids text[])
RETURNS TABLE (head_stream text, head_version bigint, head_hash text)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7629173, 'events'::regclass::oid::int);
    -- A new statement, so a new snapshot: it sees every append committed before the lock.
    RETURN QUERY
        SELECT s.id::text, h.version::bigint, h.hash::text
        FROM unnest(ids) AS s(id)
        CROSS JOIN LATERAL (
            SELECT e.version, e.hash FROM events AS e
            WHERE e.stream_id = s.id ORDER BY e.version DESC LIMIT 1
        ) AS h
        UNION ALL
        SELECT NULL::text, coalesce(max(e.position), 0)::bigint, NULL::text FROM events AS e;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(LOCK_AND_HEADS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS tiu_lock_and_heads(text[])")
