"""PostgreSQL: a command's whole write in one statement, ``tiu_command``.

A command's write transaction took a round trip per statement: BEGIN, each read-model
row of its inline projectors, its idempotency record, the append lock and heads, the
INSERT, the checkpoint move and COMMIT (ten with CreateTask's three projectors). Each
round trip cost more client CPU (driver, event loop) than the statement cost the
server. ``tiu_command`` runs them in one call: the statements the command deferred
(:class:`eventstore.prepared.Deferred`: single-row writes whose parameters all carry
a cast, passed as text), then the append (``tiu_append``, migration 0008: lock, heads,
version checks, hash chain, insert), then the inline checkpoints' move. Sent outside
a transaction it is the transaction, committed as it ends; sent inside one it is its
last statement before COMMIT.

The deferred statements run before the append lock, as they did before the append:
docs/ordering.md's rule that only the checkpoint move runs under the lock holds.
Failures roll the whole call back and are told apart by SQLSTATE:

* ``TIU01``: deferred statement number DETAIL changed fewer rows than it must (an
  idempotency record a concurrent send of the same command id wrote first);
* ``TIU02``: append number ``k`` did not find its stream at the expected version
  (DETAIL ``k version``); read-only version checks are appends of no events;
* ``TIU03``: an inline checkpoint was not where the append started (it missed events).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Most parameters a deferred statement may have (eventstore.prepared.MAX_DEFERRED_PARAMS).
MAX_PARAMS = 48

SIGNATURE = (
    "text[], int[], text[], int[], "
    "text[], text[], bigint[], int[], text[], text[], text[], text[], text[], timestamptz[], "
    "uuid[], text[], int[], text[], text[], text[], text[], timestamptz"
)

_USING = ", ".join(f"a[{i}]" for i in range(1, MAX_PARAMS + 1))

COMMAND = f"""
CREATE FUNCTION tiu_command(
    sqls text[], arg_counts int[], args text[], min_rows int[],
    stream_ids text[], categories text[], expected bigint[], counts int[],
    stream_jsons text[], actor_ids text[], correlation_ids text[], causation_ids text[],
    command_ids text[], stamps timestamptz[],
    event_ids uuid[], event_types text[], schema_versions int[], datas text[],
    metadatas text[], tails text[],
    checkpoint_names text[], checkpoint_at timestamptz
)
RETURNS TABLE (version_before bigint, first_position bigint)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    a text[];
    taken int := 0;
    changed bigint;
    lowest bigint;
    highest bigint;
    k int := 0;
    r record;
BEGIN
    FOR i IN 1 .. coalesce(cardinality(sqls), 0) LOOP
        a := args[taken + 1 : taken + arg_counts[i]];
        taken := taken + arg_counts[i];
        EXECUTE sqls[i] USING {_USING};
        IF min_rows[i] > 0 THEN
            GET DIAGNOSTICS changed = ROW_COUNT;
            IF changed < min_rows[i] THEN
                RAISE EXCEPTION 'tiu_command: statement % changed % rows', i, changed
                    USING ERRCODE = 'TIU01', DETAIL = i::text;
            END IF;
        END IF;
    END LOOP;
    IF coalesce(cardinality(stream_ids), 0) = 0 THEN
        RETURN;
    END IF;
    FOR r IN SELECT * FROM tiu_append(
        stream_ids, categories, expected, counts, stream_jsons, actor_ids, correlation_ids,
        causation_ids, command_ids, stamps, event_ids, event_types, schema_versions, datas,
        metadatas, tails
    ) LOOP
        k := k + 1;
        IF r.first_position IS NULL THEN
            RAISE EXCEPTION 'tiu_command: stream % is at version %', stream_ids[k],
                r.version_before USING ERRCODE = 'TIU02', DETAIL = k || ' ' || r.version_before;
        END IF;
        IF counts[k] > 0 THEN
            lowest := least(lowest, r.first_position);
            highest := greatest(highest, r.first_position + counts[k] - 1);
        END IF;
        version_before := r.version_before;
        first_position := r.first_position;
        RETURN NEXT;
    END LOOP;
    IF coalesce(cardinality(checkpoint_names), 0) > 0 AND highest IS NOT NULL THEN
        UPDATE projection_checkpoints AS c SET position = highest, updated_at = checkpoint_at
        WHERE c.name = ANY(checkpoint_names) AND c.active AND c.position = lowest - 1;
        GET DIAGNOSTICS changed = ROW_COUNT;
        IF changed <> cardinality(checkpoint_names) THEN
            RAISE EXCEPTION 'tiu_command: an inline checkpoint was not at position %',
                lowest - 1 USING ERRCODE = 'TIU03';
        END IF;
    END IF;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(COMMAND)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS tiu_command({SIGNATURE})")
