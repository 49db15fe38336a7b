"""Signed checkpoints and proofs on both backends, and the mutation test: every kind of
single change someone with write access can make to what a checkpoint covers is
detected by ``verify(checkpoint=...)``, which names the first position affected."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from eventstore import (
    EventStore,
    NewEvent,
    create_engine,
    merkle,
    retention,
    transparency,
    verify,
)
from eventstore.errors import EventStoreError
from eventstore.hashing import GENESIS, event_hash
from eventstore.health import health_check
from eventstore.offline_verify import (
    check_consistency,
    check_inclusion,
    event_leaf,
)
from eventstore.schema import events, merkle_state, merkle_tiles
from tests.eventstore.test_merkle import reference_root
from tests.tamper import bypass_append_only

KEY = transparency.SigningKey.generate("test.example/log")
STREAMS = ("user-a", "task-b", "task-c", "user-d")


async def build_log(store: EventStore, rounds: int = 8) -> None:
    for n in range(rounds):
        for stream in STREAMS:
            category = stream.split("-")[0]
            await store.append(stream, category, [NewEvent("Noted", {"n": n, "s": stream})])


async def all_rows(conn: AsyncConnection) -> list[dict]:
    rows = (await conn.execute(select(events).order_by(events.c.position))).mappings().all()
    return [dict(r) for r in rows]


def rehash(row: dict, prev_hash: str) -> str:
    return event_hash(
        prev_hash=prev_hash,
        stream_id=row["stream_id"],
        version=row["version"],
        event_id=str(row["event_id"]),
        event_type=row["event_type"],
        schema_version=row["schema_version"],
        data=row["data"],
        metadata=row["metadata"],
        actor_id=row["actor_id"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        command_id=row["command_id"],
        recorded_at=row["recorded_at"],
    )


async def rewrite_stream_from(conn: AsyncConnection, stream_id: str, version: int) -> None:
    """Recompute the chain of ``stream_id`` from ``version`` on, as a forger would."""
    rows = [r for r in await all_rows(conn) if r["stream_id"] == stream_id]
    rows.sort(key=lambda r: r["version"])
    prev = GENESIS
    for row in rows:
        if row["version"] >= version:
            row["hash"] = rehash(row, prev)
            await conn.execute(
                update(events).where(events.c.position == row["position"]).values(hash=row["hash"])
            )
        prev = row["hash"]


async def move(conn: AsyncConnection, position: int, to: int) -> None:
    await conn.execute(update(events).where(events.c.position == position).values(position=to))


async def swap(conn: AsyncConnection, a: int, b: int) -> None:
    await move(conn, a, -1)
    await move(conn, b, a)
    await move(conn, -1, b)


def column_change(column: str) -> Callable[[AsyncConnection], Awaitable[None]]:
    values = {
        "event_id": uuid.uuid4(),
        "stream_id": "user-zz",
        "stream_category": "project",
        "version": 70,
        "event_type": "Forged",
        "schema_version": 2,
        "data": {"n": 99},
        "metadata": {"forged": True},
        "actor_id": "mallory",
        "correlation_id": "c-forged",
        "causation_id": "x-forged",
        "command_id": "cmd-forged",
        "recorded_at": datetime(2020, 1, 1, tzinfo=UTC),
        "hash": "f" * 64,
        "position": 500,
    }

    async def change(conn: AsyncConnection) -> None:
        await conn.execute(
            update(events).where(events.c.position == 13).values({column: values[column]})
        )

    return change


async def delete_at(conn: AsyncConnection, position: int) -> None:
    await conn.execute(delete(events).where(events.c.position == position))


async def insert_in_the_middle(conn: AsyncConnection) -> None:
    # Make room at 11 (positions are moved twice: a unique key is checked row by row).
    await conn.execute(
        update(events).where(events.c.position >= 11).values(position=-events.c.position)
    )
    await conn.execute(
        update(events).where(events.c.position < 0).values(position=1 - events.c.position)
    )
    row = dict(next(r for r in await all_rows(conn) if r["position"] == 10))
    row.update(
        position=11, event_id=uuid.uuid4(), stream_id="user-new", version=1, data={"forged": 1}
    )
    row["hash"] = rehash(row, GENESIS)
    await conn.execute(insert(events).values(row))


async def reorder_a_stream(conn: AsyncConnection) -> None:
    rows = [r for r in await all_rows(conn) if r["stream_id"] == "task-c"]
    await swap(conn, rows[2]["position"], rows[3]["position"])


async def rewrite_and_rehash(conn: AsyncConnection) -> None:
    await conn.execute(
        update(events).where(events.c.position == 14).values(data={"n": 3, "s": "rewritten"})
    )
    row = next(r for r in await all_rows(conn) if r["position"] == 14)
    await rewrite_stream_from(conn, row["stream_id"], row["version"])


async def truncate_tail(conn: AsyncConnection) -> None:
    await conn.execute(delete(events).where(events.c.position > 25))


async def replace_everything(conn: AsyncConnection) -> None:
    for row in await all_rows(conn):
        await conn.execute(
            update(events)
            .where(events.c.position == row["position"])
            .values(data={**row["data"], "replaced": True})
        )
    for stream in STREAMS:
        await rewrite_stream_from(conn, stream, 1)


async def replace_everything_and_the_tree(conn: AsyncConnection) -> None:
    await replace_everything(conn)
    await conn.execute(delete(merkle_tiles))
    await conn.execute(delete(merkle_state))
    await merkle.extend(conn)


COLUMNS = [c.name for c in events.columns]
# (mutation, the first position it affects) on a log of 32 events, checkpointed at 32.
MUTATIONS: dict[str, tuple[Callable[[AsyncConnection], Awaitable[None]], int]] = {
    **{f"update {c}": (column_change(c), 13) for c in COLUMNS},
    "delete the first event": (lambda c: delete_at(c, 1), 1),
    "delete a middle event": (lambda c: delete_at(c, 17), 17),
    "delete the newest event": (lambda c: delete_at(c, 32), 32),
    "insert an event": (insert_in_the_middle, 11),
    "swap two positions of different streams": (lambda c: swap(c, 6, 21), 6),
    "reorder a stream": (reorder_a_stream, 11),
    "rewrite an event and rehash its stream": (rewrite_and_rehash, 14),
    "truncate the tail": (truncate_tail, 26),
    "replace the log with a recomputed one": (replace_everything, 1),
    "replace the log and rebuild the tree": (replace_everything_and_the_tree, 1),
}


@pytest.mark.needs_owner
@pytest.mark.parametrize("kind", list(MUTATIONS))
async def test_every_single_change_after_a_checkpoint_is_detected_at_its_first_position(
    store, engine: AsyncEngine, kind: str
):
    mutate, first = MUTATIONS[kind]
    await build_log(store)
    checkpoint = await transparency.write_checkpoint(engine, KEY)
    assert checkpoint.size == 32
    async with engine.connect() as conn:
        assert (await verify(conn, checkpoint=checkpoint)).ok
    async with engine.begin() as conn:
        await bypass_append_only(conn)
        await mutate(conn)
    async with engine.connect() as conn:
        report = await verify(conn, checkpoint=checkpoint)
        # Read in pages of 5 (holes, slices and leaves at page edges), the same finding.
        paged = await verify(conn, checkpoint=checkpoint, page_size=5)
        # Checked in two ranges by two child processes (positions 1-16 and 17 on, streams
        # crossing the cut), the same finding.
        in_ranges = await verify(conn, checkpoint=checkpoint, processes=2)
    assert report.broken is not None, kind
    assert report.first_position == first, (kind, str(report.broken))
    assert paged.broken == report.broken, kind
    assert (in_ranges.processes, in_ranges.broken) == (min(2, os.cpu_count() or 1), report.broken)


@pytest.mark.needs_owner
async def test_a_valid_looking_append_after_the_newest_checkpoint_is_not_detected(
    store, engine: AsyncEngine
):
    # What no checkpoint can catch (the README says so): events forged after it, with
    # valid chains, are indistinguishable from real appends until the next checkpoint.
    await build_log(store, rounds=2)
    checkpoint = await transparency.write_checkpoint(engine, KEY)
    async with engine.begin() as conn:
        row = (await all_rows(conn))[-1]
        row.update(position=row["position"] + 1, event_id=uuid.uuid4(), version=row["version"] + 1)
        row["hash"] = rehash(row, (await all_rows(conn))[-1]["hash"])
        await conn.execute(insert(events).values(row))
    async with engine.connect() as conn:
        assert (await verify(conn, checkpoint=checkpoint)).ok


async def test_tree_grown_in_rounds_has_the_reference_root_and_proves_every_event(
    store, engine: AsyncEngine
):
    checkpoints = []
    for rounds in (1, 3, 2):
        await build_log(store, rounds)
        checkpoints.append(await transparency.write_checkpoint(engine, KEY))
    async with engine.connect() as conn:
        rows = await all_rows(conn)
    leaves = [event_leaf(r["hash"], r["stream_category"]) for r in rows]
    for cp in checkpoints:
        assert cp.root == reference_root(leaves[: cp.size])
    newest = checkpoints[-1]
    verifier = KEY.verifier_key()
    for position in range(1, newest.size + 1):
        document = await transparency.prove_inclusion(engine, position, newest)
        assert len(document["proof"]) <= newest.size.bit_length()
        check_inclusion(document, verifier)
    for old in checkpoints:
        check_consistency(await transparency.prove_consistency(engine, old, newest), verifier)


async def test_appends_racing_the_tree_never_leave_it_wrong_or_behind_unnoticed(
    store, engine: AsyncEngine
):
    async def writer(n: int) -> None:
        for i in range(15):
            await store.append(f"task-w{n}", "task", [NewEvent("Noted", {"i": i})])

    async def grower() -> None:
        for _ in range(10):
            await transparency.extend_tree(engine)
            await asyncio.sleep(0.005)

    await asyncio.gather(*(writer(n) for n in range(4)), grower())
    async with engine.connect() as conn:
        status = await transparency.status(conn)
        assert status["tree_lag"] == 60 - status["tree_size"]
    state = await transparency.extend_tree(engine)
    async with engine.connect() as conn:
        rows = await all_rows(conn)
        assert (await transparency.status(conn))["tree_lag"] == 0
        assert (await verify(conn)).ok
    assert state.size == 60
    assert state.root == reference_root([event_leaf(r["hash"], r["stream_category"]) for r in rows])


@pytest.mark.needs_owner
async def test_archived_security_events_stay_provable_and_verify(engine: AsyncEngine, tmp_path):
    store = EventStore(engine, categories={"security", "user", "retention"})
    try:
        for n in range(6):
            await store.append("security-u1", "security", [NewEvent("LoginRejected", {"n": n})])
            await store.append("user-u1", "user", [NewEvent("Noted", {"n": n})])
        before = await transparency.write_checkpoint(engine, KEY)
        report = await retention.archive(
            store, before=datetime.now(UTC) + timedelta(seconds=1), output=tmp_path / "a.jsonl.gz"
        )
        assert report.count == 5
        after = await transparency.write_checkpoint(engine, KEY)
    finally:
        await store.aclose()
    verifier = KEY.verifier_key()
    async with engine.connect() as conn:
        assert (await verify(conn, checkpoint=before)).ok
        report_after = await verify(conn, checkpoint=after)
    assert report_after.ok
    assert (report_after.archived_events, report_after.placeholder_leaves) == (5, 0)
    check_consistency(await transparency.prove_consistency(engine, before, after), verifier)
    with pytest.raises(transparency.TransparencyError, match="archived"):
        await transparency.prove_inclusion(engine, 1, after)
    document = await transparency.prove_inclusion(engine, 1, after, archive=report.path)
    check_inclusion(document, verifier)
    assert document["event"]["event_type"] == "LoginRejected"


@pytest.mark.sqlite
async def test_sqlite_refuses_update_and_delete_outside_retention(sqlite_engine: AsyncEngine):
    store = EventStore(sqlite_engine)
    try:
        await store.append("user-1", "user", [NewEvent("Noted", {})])
    finally:
        await store.aclose()
    for statement in ("UPDATE events SET event_type = 'X'", "DELETE FROM events"):
        with pytest.raises(Exception, match="append-only"):
            async with sqlite_engine.begin() as conn:
                await conn.execute(text(statement))
    async with sqlite_engine.connect() as conn:
        assert await conn.scalar(select(events.c.event_type)) == "Noted"


async def test_a_bad_key_or_a_forged_checkpoint_is_refused(store, engine: AsyncEngine):
    await build_log(store, rounds=1)
    checkpoint = await transparency.write_checkpoint(engine, KEY)
    forged = checkpoint.note.replace("\n4\n", "\n3\n", 1)
    with pytest.raises(transparency.TransparencyError, match="signature"):
        transparency.read_checkpoint(forged, KEY.verifier_key())
    other = transparency.SigningKey.generate("test.example/log")
    with pytest.raises(transparency.TransparencyError):
        transparency.read_checkpoint(checkpoint.note, other.verifier_key())
    with pytest.raises(EventStoreError):
        transparency.SigningKey.parse("PRIVATE+KEY+x+00000000+AAAA")
    assert transparency.SigningKey.parse(KEY.encoded()).verifier() == KEY.verifier()


@pytest.mark.sqlite
async def test_documents_re_split_over_the_same_bytes_are_caught(sqlite_engine: AsyncEngine):
    # The fast path hashes the stored text of data and metadata as it is: moving the
    # boundary between them keeps the bytes (and the stored hash) but not the event.
    store = EventStore(sqlite_engine)
    try:
        await store.append("user-1", "user", [NewEvent("Noted", {"x": "a,b"}, metadata={"m": 1})])
    finally:
        await store.aclose()
    async with sqlite_engine.begin() as conn:
        await bypass_append_only(conn)
        await conn.execute(
            text("UPDATE events SET data = :d, metadata = :m"),
            {"d": '{"x":"a', "m": 'b"},{"m":1}'},
        )
    async with sqlite_engine.connect() as conn:
        report = await verify(conn)
    assert report.broken is not None
    assert (report.first_position, report.broken.reason) == (1, "hash does not match content")


@pytest.mark.sqlite
@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("recorded_at", 20260101000000),
        ("event_id", 1234),
        ("data", b"{}"),
        ("metadata", 7),
        ("stream_category", b"user"),
        # blobs where the fast statement builds JSON arrays (json_array refuses them)
        ("stream_id", b"user-1"),
        ("event_type", b"Noted"),
        ("actor_id", b"ada"),
        ("command_id", b"c"),
    ],
)
async def test_a_column_stored_as_another_type_is_rechecked_canonically(
    sqlite_engine: AsyncEngine, column: str, value: object
):
    # SQLite keeps any type in any column: the fast path's text cannot be built from an
    # integer or a blob, so that row is hashed the canonical way, and does not match
    # (the category, outside the chain hash, through its leaf in the tree).
    store = EventStore(sqlite_engine)
    try:
        await build_log(store, rounds=2)
    finally:
        await store.aclose()
    await transparency.extend_tree(sqlite_engine)
    async with sqlite_engine.begin() as conn:
        await bypass_append_only(conn)
        await conn.execute(
            text(f"UPDATE events SET {column} = :v WHERE position = 6"), {"v": value}
        )
    async with sqlite_engine.connect() as conn:
        report = await verify(conn)
    assert report.broken is not None
    assert report.first_position == 6


async def test_a_missing_or_cut_tile_is_named_at_its_first_leaf(store, engine: AsyncEngine):
    # Leaves 257-300 live in the second level-0 tile: cut it short, then remove it.
    for n in range(300):
        await store.append(f"user-{n % 7}", "user", [NewEvent("Noted", {"n": n})])
    await transparency.extend_tree(engine)
    async with engine.begin() as conn:
        blob = await conn.scalar(
            select(merkle_tiles.c.hashes).where(merkle_tiles.c.level == 0, merkle_tiles.c.idx == 1)
        )
        await conn.execute(
            update(merkle_tiles)
            .where(merkle_tiles.c.level == 0, merkle_tiles.c.idx == 1)
            .values(hashes=bytes(blob)[: 32 * 10])
        )
    async with engine.connect() as conn:
        report = await verify(conn, page_size=100)
    assert (report.first_position, report.broken and report.broken.reason) == (
        267,
        "leaf differs from the Merkle tree",
    )
    async with engine.begin() as conn:
        await conn.execute(
            delete(merkle_tiles).where(merkle_tiles.c.level == 0, merkle_tiles.c.idx == 1)
        )
    async with engine.connect() as conn:
        report = await verify(conn)
    assert report.first_position == 257


async def test_health_reports_how_far_the_tree_is_behind_the_log(store, engine: AsyncEngine):
    await build_log(store, rounds=2)
    await transparency.extend_tree(engine)
    report = await health_check(engine)
    assert (report.tree_lag, report.tree_status) == (0, "ok")
    await build_log(store, rounds=3)  # 12 more
    grades = {}
    for amber, red in ((13, 20), (12, 20), (5, 12)):
        report = await health_check(engine, tree_amber=amber, tree_red=red)
        assert report.healthy  # lag is graded, never unhealthy
        grades[(amber, red)] = (report.tree_lag, report.tree_status)
    assert grades == {(13, 20): (12, "ok"), (12, 20): (12, "amber"), (5, 12): (12, "red")}
    assert report.as_dict()["tree_lag"] == 12
    await transparency.extend_tree(engine)
    assert (await health_check(engine)).tree_lag == 0


async def test_health_before_the_tree_migration_has_no_tree_lag(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/empty.db")
    try:
        report = await health_check(engine)
    finally:
        await engine.dispose()
    assert report.healthy
    assert (report.tree_lag, report.tree_status) == (None, None)


async def test_the_worker_step_grows_the_tree_and_signs_checkpoints(store, engine: AsyncEngine):
    stop = asyncio.Event()
    keeper = asyncio.create_task(transparency.keep_up(engine, KEY, stop, every=5, interval=0.05))
    try:
        await build_log(store, rounds=3)
        for _ in range(200):
            async with engine.connect() as conn:
                status = await transparency.status(conn)
            if status["checkpoint_lag"] == 0 and status["tree_lag"] == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await keeper
    assert (status["tree_size"], status["checkpoint_size"]) == (12, 12)
    async with engine.connect() as conn:
        note = await transparency.latest_note(conn)
    assert note is not None
    assert transparency.read_checkpoint(note, KEY.verifier_key()).size == 12


@pytest.mark.needs_owner
async def test_a_log_archived_before_the_tree_existed_still_grows_a_tree_that_verifies(
    engine: AsyncEngine, tmp_path
):
    # A database upgraded to migration 0009 after retention ran: its archived positions
    # get a placeholder leaf (their events are only in the archive file).
    store = EventStore(engine, categories={"security", "user", "retention"})
    try:
        for n in range(4):
            await store.append("security-u1", "security", [NewEvent("LoginRejected", {"n": n})])
            await store.append("user-u1", "user", [NewEvent("Noted", {"n": n})])
        await retention.archive(
            store, before=datetime.now(UTC) + timedelta(seconds=1), output=tmp_path / "a.gz"
        )
    finally:
        await store.aclose()
    async with engine.begin() as conn:
        await conn.execute(delete(merkle_tiles))
        await conn.execute(delete(merkle_state))
    checkpoint = await transparency.write_checkpoint(engine, KEY)
    assert checkpoint.size == 9
    async with engine.connect() as conn:
        report = await verify(conn, checkpoint=checkpoint)
    assert report.ok
    # Honest about it: the archived positions are counted as placeholders, and no
    # inclusion proof is offered for them (the tree does not hold their events' leaves).
    async with engine.connect() as conn:
        present = set((await conn.execute(select(events.c.position))).scalars())
    archived = sorted(set(range(1, 10)) - present)
    assert archived
    assert report.archived_events == report.placeholder_leaves == len(archived)
    for position in archived:
        with pytest.raises(transparency.TransparencyError, match="archived before the Merkle"):
            await transparency.prove_inclusion(
                engine, position, checkpoint, archive=tmp_path / "a.gz"
            )
    proof = await transparency.prove_inclusion(engine, 9, checkpoint)  # the retention record
    assert check_inclusion(proof, KEY.verifier_key())
    async with engine.begin() as conn:
        await bypass_append_only(conn)
        await conn.execute(delete(events).where(events.c.position == 2))  # not archived
        await conn.execute(delete(merkle_tiles))
        await conn.execute(delete(merkle_state))
    with pytest.raises(EventStoreError, match="position 2 is missing"):
        await transparency.extend_tree(engine)


@pytest.mark.sqlite
@pytest.mark.parametrize("separator", ["T", "X", "_"])
async def test_a_stored_time_rewritten_in_another_form_is_found(
    sqlite_engine: AsyncEngine, separator: str
):
    # SQLite stores "YYYY-MM-DD HH:MM:SS.ffffff"; the hash covers its ISO form, where the
    # date and time are joined by "T". A stored time with another separator is not what
    # was written (reads of it would fail), so it is found even though every other
    # character of the hashed text is unchanged.
    store = EventStore(sqlite_engine)
    try:
        await build_log(store, rounds=2)
    finally:
        await store.aclose()
    async with sqlite_engine.begin() as conn:
        await bypass_append_only(conn)
        await conn.execute(
            text(
                "UPDATE events SET recorded_at = substr(recorded_at, 1, 10) || :s "
                "|| substr(recorded_at, 12) WHERE position = 6"
            ),
            {"s": separator},
        )
    async with sqlite_engine.connect() as conn:
        report = await verify(conn)
    assert report.first_position == 6
    assert report.broken is not None
