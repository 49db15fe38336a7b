"""PostgreSQL: a whole append in one statement, ``tiu_append``.

A store append used to take four round trips on PostgreSQL: BEGIN, the lock and the
heads (``tiu_lock_and_heads``), the INSERT and COMMIT. ``tiu_append`` does the lock,
the version checks, the positions, the hash chain and the insert in one call, sent
outside any explicit transaction, so PostgreSQL commits it as the statement ends:
one round trip. docs/ordering.md's order is kept inside the call: the advisory lock is
its own statement, and every read after it (a VOLATILE plpgsql function takes a
fresh snapshot per statement under READ COMMITTED) sees each append committed before
the lock was granted; the lock is released by the commit that ends the statement.

Each event's hash is ``link_hash`` of ``eventstore.hashing``: the client sends what
does not depend on the stream's head (the stream id's JSON per append and the text
after the version per event), and the function links them with the head's hash and
version. Appends whose expected version does not hold are left out and reported,
so a group of appends is one call. SQLite needs nothing.

Arguments, one element per append: stream ids, categories, expected versions
(``-1`` any, ``-2`` the stream exists, ``0`` no stream, ``n`` exactly n), event counts,
the stream ids' JSON, actor, correlation, causation and command ids, recorded_at.
One element per event: event ids, types, schema versions, data and metadata (canonical
JSON text) and hash tails. One row per append comes back: the stream's version
before it, and its first position (NULL when its expected version did not hold).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNATURE = (
    "text[], text[], bigint[], int[], text[], text[], text[], text[], text[], timestamptz[], "
    "uuid[], text[], int[], text[], text[], text[]"
)

# 7629173 is eventstore.dialects.ADVISORY_LOCK_CLASS ("tiu"); a test checks they agree.
APPEND = """
CREATE FUNCTION tiu_append(
    stream_ids text[], categories text[], expected bigint[], counts int[],
    stream_jsons text[], actor_ids text[], correlation_ids text[], causation_ids text[],
    command_ids text[], stamps timestamptz[],
    event_ids uuid[], event_types text[], schema_versions int[], datas text[],
    metadatas text[], tails text[]
)
RETURNS TABLE (version_before bigint, first_position bigint)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    pos bigint;
    head_version bigint;
    head_hash text;
    wanted bigint;
    seen text[] := '{}';
    seen_versions bigint[] := '{}';
    seen_hashes text[] := '{}';
    k int;
    ev int := 0;
    -- the rows to insert: the event's index in the arguments, its append's, and what
    -- the function computed
    row_events int[] := '{}';
    row_appends int[] := '{}';
    row_positions bigint[] := '{}';
    row_versions bigint[] := '{}';
    row_hashes text[] := '{}';
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'tiu_append needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    PERFORM pg_advisory_xact_lock(7629173, 'events'::regclass::oid::int);
    -- New statements from here on, so new snapshots: they see every append committed
    -- before the lock was granted.
    SELECT coalesce(max(e.position), 0) INTO pos FROM events AS e;
    FOR a IN 1 .. cardinality(stream_ids) LOOP
        k := array_position(seen, stream_ids[a]);
        IF k IS NULL THEN
            SELECT e.version, e.hash INTO head_version, head_hash FROM events AS e
            WHERE e.stream_id = stream_ids[a] ORDER BY e.version DESC LIMIT 1;
            IF NOT FOUND THEN
                head_version := 0;
                head_hash := repeat('0', 64);
            END IF;
            seen := seen || stream_ids[a];
            seen_versions := seen_versions || head_version;
            seen_hashes := seen_hashes || head_hash;
            k := cardinality(seen);
        ELSE
            head_version := seen_versions[k];
            head_hash := seen_hashes[k];
        END IF;
        version_before := head_version;
        wanted := expected[a];
        IF wanted = -1 OR (wanted = -2 AND head_version > 0) OR wanted = head_version THEN
            first_position := pos + 1;
            FOR i IN 1 .. counts[a] LOOP
                ev := ev + 1;
                pos := pos + 1;
                head_version := head_version + 1;
                head_hash := encode(sha256(convert_to(
                    '["' || head_hash || '",' || stream_jsons[a] || ',' || head_version
                    || tails[ev], 'UTF8')), 'hex');
                row_events := row_events || ev;
                row_appends := row_appends || a;
                row_positions := row_positions || pos;
                row_versions := row_versions || head_version;
                row_hashes := row_hashes || head_hash;
            END LOOP;
            seen_versions[k] := head_version;
            seen_hashes[k] := head_hash;
        ELSE
            ev := ev + counts[a];
            first_position := NULL;
        END IF;
        RETURN NEXT;
    END LOOP;
    INSERT INTO events (
        position, event_id, stream_id, stream_category, version, event_type,
        schema_version, data, metadata, actor_id, correlation_id, causation_id,
        command_id, recorded_at, hash
    )
    SELECT r.pos, event_ids[r.ev], stream_ids[r.app], categories[r.app], r.ver,
        event_types[r.ev], schema_versions[r.ev], datas[r.ev]::jsonb, metadatas[r.ev]::jsonb,
        actor_ids[r.app], correlation_ids[r.app], causation_ids[r.app], command_ids[r.app],
        stamps[r.app], r.hash
    FROM unnest(row_events, row_appends, row_positions, row_versions, row_hashes)
        AS r(ev, app, pos, ver, hash);
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(APPEND)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS tiu_append({SIGNATURE})")
