"""``EventStore.load_streams``: a command's reads before it decides, in one statement,
must equal reading the idempotency record, the snapshots and the streams one by one
(each stream after the version its caller holds folded already)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select

from eventstore import NewEvent
from eventstore.schema import processed_commands, snapshots

AT = datetime(2026, 3, 1, tzinfo=UTC)


async def _snapshot(store, stream_id: str, decider: str, version: int, at: int) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(
            insert(snapshots).values(
                stream_id=stream_id,
                decider=decider,
                decider_version=version,
                version=at,
                state={"at": at, "name": "snapshot ✓"},
                taken_at=AT,
            )
        )


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    streams=st.lists(
        st.tuples(
            st.integers(0, 6),  # events in the stream
            st.none() | st.tuples(st.sampled_from(["tasks", "users"]), st.integers(1, 2)),
            st.booleans(),  # whether it is wanted with a snapshot decider
            st.integers(0, 6),  # the version the caller holds folded (at most the head)
        ),
        min_size=1,
        max_size=4,
    )
)
async def test_one_statement_equals_the_records_snapshots_and_streams_read_apart(store, streams):
    base = uuid.uuid4().hex[:8]
    wanted = []
    expected_snapshots = {}
    expected_events = []
    for n, (count, snap, with_decider, drawn) in enumerate(streams):
        held = min(drawn, count)
        stream_id = f"task-{base}-{n}"
        for i in range(count):
            await store.append(stream_id, "task", [NewEvent("Happened", {"i": i, "s": "é\n"})])
        after = held
        if snap is not None and count:
            await _snapshot(store, stream_id, snap[0], snap[1], at=count // 2)
            if with_decider and snap == ("tasks", 1) and count // 2 > held:
                after = count // 2
                expected_snapshots[stream_id] = (after, {"at": after, "name": "snapshot ✓"})
        wanted.append((stream_id, "tasks" if with_decider else None, 1, held))
        async with store.engine.connect() as conn:
            expected_events += [
                (e.stream_id, e.version, e.event_type, e.schema_version, e.data)
                for e in await store.read_stream(conn, stream_id)
                if e.version > after
            ]
    async with store.engine.connect() as conn:
        loaded = await store.load_streams(conn, None, wanted)
    assert loaded.processed is None
    assert loaded.snapshots == expected_snapshots
    assert [tuple(e) for e in loaded.events] == sorted(expected_events)


async def test_a_processed_command_is_reported_with_its_outcome(store):
    async with store.engine.begin() as conn:
        await conn.execute(
            insert(processed_commands).values(
                command_id="cmd-1",
                command_type="CreateTask",
                stream_id="task-9",
                outcome={"ok": True, "version": 3},
                recorded_at=AT,
            )
        )
    async with store.engine.connect() as conn:
        done = await store.load_streams(conn, "cmd-1", [])
        with_stream = await store.load_streams(conn, "cmd-1", [("task-9", None, 1, 0)])
        fresh = await store.load_streams(conn, "cmd-2", [("task-9", None, 1, 0)])
        rows = (await conn.execute(select(processed_commands))).all()
    # With the command's class, so a key resent with another command is told apart.
    assert done.processed == ("task-9", {"ok": True, "version": 3}, "CreateTask")
    assert with_stream.processed == done.processed
    assert fresh.processed is None
    assert fresh.events == []
    assert len(rows) == 1
