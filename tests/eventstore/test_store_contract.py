"""The event store's contract, run on SQLite and PostgreSQL through the ``engine`` fixture."""

from __future__ import annotations

import asyncio
import copy
import json
import pickle
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import TzInfo
from sqlalchemy import text

from eventstore import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    DuplicateEventId,
    EngineOptions,
    EventContext,
    EventStore,
    InvalidEventData,
    InvalidExpectedVersion,
    InvalidStreamId,
    KeyAlreadyClaimed,
    LogIntegrityError,
    NewEvent,
    RecordedEvent,
    UnknownCategory,
    WrongExpectedVersion,
    create_engine,
    health_check,
    pool_status,
    verify,
)
from eventstore.records import uuid7_of
from tests.tamper import bypass_append_only

# These storage tests also run as the least-privilege role of sql/app_role.sql.
pytestmark = pytest.mark.least_privilege


def ev(kind: str = "Happened", **data: object) -> NewEvent:
    return NewEvent(kind, data)


async def test_appended_events_read_back_with_versions_positions_and_context(store):
    ctx = EventContext(actor_id="u1", correlation_id="c1", causation_id="k1", command_id="cmd-1")
    result = await store.append("user-1", "user", [ev(n=1), ev(n=2)], NO_STREAM, context=ctx)
    assert (result.first_version, result.last_version) == (1, 2)
    assert (result.first_position, result.last_position) == (1, 2)
    async with store.engine.connect() as conn:
        events = await store.read_stream(conn, "user-1")
    assert [e.version for e in events] == [1, 2]
    assert [e.data for e in events] == [{"n": 1}, {"n": 2}]
    first = events[0]
    assert (first.actor_id, first.correlation_id, first.causation_id, first.command_id) == (
        "u1",
        "c1",
        "k1",
        "cmd-1",
    )
    assert first.category == "user"
    assert first.recorded_at.tzinfo is not None
    assert len(first.hash) == 64


async def test_json_payloads_round_trip_unchanged(store):
    payload = {
        "unicode": "Zoë — 東京 — \U0001f680 — \u200b",
        "nested": {"list": [1, [2, {"deep": None}]], "empty": {}, "flag": True},
        "big": 2**62 + 1,
        "negative": -(2**53) - 7,
        "fraction": 0.1,
        "decimal_as_text": "12345678901234567890.123456789",
        "datetime_as_text": "2026-11-28T13:45:00.123456+00:00",
    }
    await store.append("task-1", "task", [NewEvent("Created", payload)], NO_STREAM)
    async with store.engine.connect() as conn:
        (stored,) = await store.read_stream(conn, "task-1")
        assert stored.data == payload
        assert (await verify(conn)).ok


async def test_a_record_read_by_either_path_equals_one_built_from_its_fields(store):
    ctx = EventContext(actor_id="u1", command_id="cmd-7")
    meta = {"ip": "10.0.0.1"}
    await store.append(
        "task-7", "task", [NewEvent("Created", {"n": 1}, 1, meta)], NO_STREAM, context=ctx
    )
    async with store.engine.connect() as conn:
        (whole,) = await store.read_stream(conn, "task-7")  # on the driver, decoded lazily
        (ranged,) = await store.read_stream(conn, "task-7", to_version=1)  # SQLAlchemy
        (logged,) = await store.read_all(conn)
    assert whole == ranged == logged
    built = RecordedEvent(*whole.fields())
    assert built == whole
    assert built.fields() == whole.fields()
    assert isinstance(whole.event_id, uuid.UUID)
    assert whole.recorded_at.tzinfo is not None
    assert (whole.data, whole.metadata, whole.actor_id) == ({"n": 1}, meta, "u1")
    assert repr(built) == repr(whole)
    assert repr(whole).startswith("RecordedEvent(position=1, event_id=UUID(")
    assert built != RecordedEvent(*whole.fields()[:7], {"n": 2}, *whole.fields()[8:])
    with pytest.raises(TypeError):
        hash(whole)
    (fresh,) = await read_fresh(store)  # nothing decoded yet
    assert pickle.loads(pickle.dumps(fresh)) == whole
    assert copy.copy(fresh) == whole
    assert copy.deepcopy(fresh) == whole


async def read_fresh(store):
    async with store.engine.connect() as conn:
        return await store.read_all(conn)


async def test_a_record_keeps_its_json_text_until_its_data_is_read(store):
    await store.append("task-8", "task", [ev(n=1)], NO_STREAM)
    async with store.engine.connect() as conn:
        (record,) = await store.read_all(conn)
        (same,) = await store.read_stream(conn, "task-8")
    assert json.loads(record.stored_data) == {"n": 1}  # the text as stored
    assert json.loads(same.stored_data) == {"n": 1}
    data = record.data
    assert data == {"n": 1}
    assert record.data is data  # decoded once, then kept
    assert record.stored_data is data


async def test_expected_version_modes_accept_and_refuse(store):
    await store.append("project-1", "project", [ev()], NO_STREAM)
    with pytest.raises(WrongExpectedVersion) as refused:
        await store.append("project-1", "project", [ev()], NO_STREAM)
    assert (refused.value.stream_id, refused.value.expected, refused.value.actual) == (
        "project-1",
        "no_stream",
        1,
    )
    await store.append("project-1", "project", [ev()], 1)
    with pytest.raises(WrongExpectedVersion) as stale:
        await store.append("project-1", "project", [ev()], 1)
    assert stale.value.actual == 2
    await store.append("project-1", "project", [ev()], ANY)
    await store.append("project-1", "project", [ev()], STREAM_EXISTS)
    with pytest.raises(WrongExpectedVersion):
        await store.append("project-2", "project", [ev()], STREAM_EXISTS)
    await store.append("project-3", "project", [ev()], 0)
    async with store.engine.connect() as conn:
        assert await store.stream_version(conn, "project-1") == 4
        assert await store.stream_version(conn, "project-2") == 0


async def test_read_stream_backwards_and_by_version_range(store):
    await store.append("task-9", "task", [ev(n=i) for i in range(1, 8)], NO_STREAM)
    async with store.engine.connect() as conn:
        backwards = await store.read_stream(conn, "task-9", backwards=True)
        window = await store.read_stream(conn, "task-9", from_version=3, to_version=5)
        last_two = await store.read_stream(conn, "task-9", backwards=True, limit=2)
        older = await store.read_stream(conn, "task-9", to_version=4, backwards=True, limit=2)
    assert [e.version for e in backwards] == [7, 6, 5, 4, 3, 2, 1]
    assert [e.version for e in window] == [3, 4, 5]
    assert [e.version for e in last_two] == [7, 6]
    assert [e.version for e in older] == [4, 3]


async def test_read_streams_data_gives_what_a_fold_needs_grouped_by_stream(store):
    await store.append("user-a", "user", [NewEvent("A1", {"n": 1}), NewEvent("A2", {"n": 2})])
    await store.append("user-b", "user", [NewEvent("B1", {"n": 3}, schema_version=2)])
    await store.append("user-a", "user", [NewEvent("A3", {"n": 4})])
    async with store.engine.connect() as conn:
        both = await store.read_streams_data(conn, {"user-b": 1, "user-a": 2})
        one = await store.read_streams_data(conn, {"user-a": 1})
        none = await store.read_streams_data(conn, {"user-zz": 1})
    assert sorted(both) == [
        ("user-a", 2, "A2", 1, {"n": 2}),
        ("user-a", 3, "A3", 1, {"n": 4}),
        ("user-b", 1, "B1", 2, {"n": 3}),
    ]
    assert [d.stream_id for d in both] in (["user-a"] * 2 + ["user-b"], ["user-b"] + ["user-a"] * 2)
    assert [(d.version, d.event_type) for d in one] == [(1, "A1"), (2, "A2"), (3, "A3")]
    assert none == []


async def test_read_all_filters_by_category_type_and_position(store):
    await store.append("user-1", "user", [ev("Registered"), ev("LoggedIn")])
    await store.append("task-1", "task", [ev("Created")])
    await store.append("user-2", "user", [ev("Registered")])
    async with store.engine.connect() as conn:
        everything = await store.read_all(conn)
        users = await store.read_all(conn, categories=["user"])
        registered = await store.read_all(conn, types=["Registered"])
        after_two = await store.read_all(conn, after_position=2, limit=1)
        both = await store.read_all(conn, categories=["user"], types=["LoggedIn"])
    assert [e.position for e in everything] == [1, 2, 3, 4]
    assert [e.stream_id for e in users] == ["user-1", "user-1", "user-2"]
    assert [e.position for e in registered] == [1, 4]
    assert [e.position for e in after_two] == [3]
    assert [e.event_type for e in both] == ["LoggedIn"]


async def test_a_read_all_loop_lets_other_tasks_run_between_pages(store):
    async with store.transaction() as uow:
        for n in range(40):
            uow.append(f"user-{n}", "user", [ev("Registered") for _ in range(5)])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    pages, position = 0, 0
    try:
        async with store.engine.connect() as conn:
            while page := await store.read_all(conn, position, limit=10):
                position = page[-1].position
                pages += 1
        seen = ticks
    finally:
        task.cancel()
    assert pages == 20
    assert seen >= pages  # the other task ran at least once per page read


async def test_unit_of_work_commits_several_streams_atomically(store):
    async with store.transaction() as uow:
        uow.append("user-1", "user", [ev()], NO_STREAM)
        uow.append("project-1", "project", [ev(), ev()], NO_STREAM)
    assert [(r.stream_id, r.first_position, r.last_position) for r in uow.results] == [
        ("user-1", 1, 1),
        ("project-1", 2, 3),
    ]


async def test_unit_of_work_that_fails_leaves_no_trace(store):
    await store.append("user-1", "user", [ev()], NO_STREAM)
    with pytest.raises(WrongExpectedVersion):
        async with store.transaction() as uow:
            await uow.claim("email", "k1", "project-1")
            uow.append("project-1", "project", [ev()], NO_STREAM)
            uow.append("user-1", "user", [ev()], NO_STREAM)  # conflicts: user-1 exists
    with pytest.raises(RuntimeError):
        async with store.transaction() as uow:
            uow.append("project-2", "project", [ev()], NO_STREAM)
            raise RuntimeError("caller failed half-way")
    async with store.engine.connect() as conn:
        assert [e.stream_id for e in await store.read_all(conn)] == ["user-1"]
        keys = await conn.scalar(text("SELECT count(*) FROM unique_keys"))
    assert keys == 0
    # the failed transactions consumed no positions
    result = await store.append("project-3", "project", [ev()])
    assert result.first_position == 2


async def test_a_unit_whose_read_stream_moved_fails_typed_and_prints_nothing(store, capsys):
    """A library writes nothing to its host's stdout, on the failure path neither."""
    await store.append("user-1", "user", [ev()], NO_STREAM)
    with pytest.raises(WrongExpectedVersion) as raised:
        async with store.transaction() as uow:
            uow.expect("user-1", 0)
            uow.append("project-1", "project", [ev()], NO_STREAM)
    assert (raised.value.stream_id, raised.value.actual) == ("user-1", 1)
    assert capsys.readouterr().out == ""


async def test_same_stream_twice_in_one_unit_of_work_chains_versions(store):
    async with store.transaction() as uow:
        uow.append("task-1", "task", [ev(n=1)], NO_STREAM)
        uow.append("task-1", "task", [ev(n=2)], 1)
    async with store.engine.connect() as conn:
        assert [e.version for e in await store.read_stream(conn, "task-1")] == [1, 2]
        assert (await verify(conn)).ok


async def test_a_unit_of_work_over_more_streams_than_one_heads_statement_checks_them_all(store):
    """SQLite reads the heads an append checks in statements of at most 200 streams
    (a compound SELECT has at most 500 arms): 450 streams are checked and chained
    across three of them, and a wrong version in the last one is still found."""
    streams = [f"task-{n}" for n in range(450)]
    async with store.transaction() as uow:
        for stream_id in streams:
            uow.append(stream_id, "task", [ev(n=1)], NO_STREAM)
    async with store.transaction() as uow:
        await uow.begin()
        await uow.check_versions(dict.fromkeys(streams, 1))
        for stream_id in streams:
            uow.append(stream_id, "task", [ev(n=2)], 1)
    assert uow.results[-1].last_position == 900
    with pytest.raises(WrongExpectedVersion) as raised:
        async with store.transaction() as uow:
            for stream_id in streams:
                uow.append(stream_id, "task", [ev(n=3)], 1 if stream_id == streams[-1] else 2)
    assert (raised.value.stream_id, raised.value.actual) == (streams[-1], 2)
    async with store.engine.connect() as conn:
        assert (await verify(conn)).ok
        assert await store.head_position(conn) == 900


async def test_unique_key_claims_are_exclusive_idempotent_and_releasable(store):
    async with store.transaction() as uow:
        await uow.claim("email", "hash-a", "user-1")
        await uow.claim("email", "hash-a", "user-1")  # same holder: no-op
        uow.append("user-1", "user", [ev()], NO_STREAM)
    with pytest.raises(KeyAlreadyClaimed) as taken:
        async with store.transaction() as uow:
            await uow.claim("email", "hash-a", "user-2")
            uow.append("user-2", "user", [ev()], NO_STREAM)
    assert taken.value.holder == "user-1"
    assert "hash-a" not in str(taken.value)
    async with store.transaction() as uow:
        await uow.release("email", "hash-a", "user-1")
        uow.append("user-1", "user", [ev()], 1)
    async with store.transaction() as uow:
        await uow.claim("email", "hash-a", "user-2")
        uow.append("user-2", "user", [ev()], NO_STREAM)


async def test_concurrent_claims_of_one_key_have_exactly_one_winner(store):
    async def register(n: int) -> str:
        async with store.transaction() as uow:
            await uow.claim("email", "same", f"user-{n}")
            uow.append(f"user-{n}", "user", [ev()], NO_STREAM)
        return f"user-{n}"

    outcomes = await asyncio.gather(*(register(n) for n in range(6)), return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, str)]
    losers = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(o, KeyAlreadyClaimed) for o in losers), losers
    async with store.engine.connect() as conn:
        assert [e.stream_id for e in await store.read_all(conn)] == winners


async def test_eight_writers_on_one_stream_win_each_version_exactly_once(store):
    rounds = 6
    wins: list[tuple[int, int]] = []
    losses: list[WrongExpectedVersion] = []

    async def writer(n: int) -> None:
        for _ in range(rounds):
            async with store.engine.connect() as conn:
                version = await store.stream_version(conn, "project-hot")
            try:
                await store.append("project-hot", "project", [ev(writer=n)], version)
            except WrongExpectedVersion as error:
                assert error.actual > version
                losses.append(error)
            else:
                wins.append((n, version + 1))
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(n) for n in range(8)))
    async with store.engine.connect() as conn:
        stream = await store.read_stream(conn, "project-hot")
    assert [e.version for e in stream] == list(range(1, len(wins) + 1))
    assert sorted(v for _, v in wins) == list(range(1, len(wins) + 1))
    assert [e.data["writer"] for e in stream] == [n for n, _ in sorted(wins, key=lambda w: w[1])]
    assert len(wins) + len(losses) == 8 * rounds
    assert losses, "8 writers on one stream should have collided at least once"


@pytest.mark.parametrize(
    ("stream_id", "category", "error"),
    [
        ("", "user", InvalidStreamId),
        ("user-" + "x" * 300, "user", InvalidStreamId),
        ("user-a\x00b", "user", InvalidStreamId),
        ("task-1", "user", InvalidStreamId),
        ("user-", "user", InvalidStreamId),
        ("Weird-1", "Weird", UnknownCategory),
        ("planet-1", "planet", UnknownCategory),
    ],
)
async def test_bad_stream_ids_and_categories_are_refused_before_writing(
    engine, stream_id, category, error
):
    store = EventStore(engine, categories={"user", "task", "project"})
    with pytest.raises(error):
        await store.append(stream_id, category, [ev()])
    async with engine.connect() as conn:
        assert await store.head_position(conn) == 0


@pytest.mark.parametrize(
    "event",
    [
        NewEvent("Bad", {"when": object()}),
        NewEvent("Bad", {"nan": float("nan")}),
        NewEvent("Bad", {"nul": "a\x00b"}),
        NewEvent("Bad", {"nul": "\\\x00"}),
        NewEvent("Bad", {}, {"nul\x00key": 1}),
        NewEvent("Bad", {"big": "x" * 2_000_000}),
        NewEvent("bad type!", {}),
        NewEvent("Bad", {}, schema_version=0),
    ],
    ids=[
        "object",
        "nan",
        "nul",
        "nul-after-backslash",
        "nul-in-metadata-key",
        "oversized",
        "type-name",
        "schema-version",
    ],
)
async def test_non_serialisable_or_oversized_data_is_refused_with_nothing_written(store, event):
    with pytest.raises(InvalidEventData):
        async with store.transaction() as uow:
            uow.append("user-ok", "user", [ev()])
            uow.append("user-1", "user", [event])
    async with store.engine.connect() as conn:
        assert await store.head_position(conn) == 0


@pytest.mark.parametrize("text", ["\\u0000", "a\\\\u0000", "\\\\\\u0000b"])
async def test_the_text_of_a_nul_escape_is_stored_and_read_back_as_written(store, text):
    """A backslash followed by "u0000" is ordinary text (its JSON escapes the backslash),
    not a NUL: it is stored, not refused."""
    await store.append("user-1", "user", [NewEvent("Happened", {"text": text}, 1, {"m": text})])
    async with store.engine.connect() as conn:
        (record,) = await store.read_stream(conn, "user-1")
    assert record.data == {"text": text}
    assert record.metadata == {"m": text}


@pytest.mark.parametrize("expected", [-1, "latest", 1.5, True, None])
async def test_invalid_expected_versions_are_refused(store, expected):
    with pytest.raises(InvalidExpectedVersion):
        await store.append("user-1", "user", [ev()], expected)


async def test_empty_append_is_refused(store):
    with pytest.raises(InvalidEventData):
        await store.append("user-1", "user", [])


@pytest.mark.needs_owner
async def test_verify_names_exactly_the_tampered_event(store, engine):
    await store.append("user-1", "user", [ev(n=1), ev(n=2), ev(n=3)])
    await store.append("user-2", "user", [ev(n=1)])
    json_type = "jsonb" if engine.dialect.name == "postgresql" else "text"
    async with engine.begin() as conn:
        await bypass_append_only(conn)  # the append-only trigger refuses the edit
        await conn.execute(
            text(
                f"UPDATE events SET data = CAST(:data AS {json_type}) "
                "WHERE stream_id = 'user-1' AND version = 2"
            ).bindparams(data='{"n": 20}')
        )
    async with engine.connect() as conn:
        report = await verify(conn)
    assert report.broken is not None
    assert (report.broken.stream_id, report.broken.version) == ("user-1", 2)
    assert report.broken.reason == "hash does not match content"


@pytest.mark.needs_owner
async def test_verify_detects_a_removed_event(store, engine):
    await store.append("user-1", "user", [ev(n=1), ev(n=2), ev(n=3)])
    async with engine.begin() as conn:
        await bypass_append_only(conn)
        await conn.execute(text("DELETE FROM events WHERE position = 2"))
    async with engine.connect() as conn:
        report = await verify(conn)
    assert report.broken is not None
    assert (report.broken.position, report.broken.reason) == (2, "hole in global positions")


async def test_verify_passes_on_an_intact_log(store):
    for n in range(5):
        await store.append(f"task-{n}", "task", [ev(n=i) for i in range(n + 1)])
    async with store.engine.connect() as conn:
        report = await verify(conn, page_size=3)
    assert report.ok
    assert (report.streams, report.events, report.head_position) == (5, 15, 15)


async def test_a_stamp_given_with_another_offset_is_hashed_as_stored_and_verifies(store):
    at = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    async with store.transaction() as uow:
        uow.append("task-tz", "task", [ev(n=1)], recorded_at=at)
    async with store.engine.connect() as conn:
        report = await verify(conn)
        (event,) = await store.read_stream(conn, "task-tz")
    assert report.ok, report
    assert event.recorded_at == at


async def test_a_schema_version_of_true_is_refused_not_stored_as_1(store):
    with pytest.raises(InvalidEventData, match="schema_version"):
        await store.append("task-b", "task", [NewEvent("Happened", {}, True)])  # type: ignore[arg-type]
    async with store.engine.connect() as conn:
        assert await store.read_stream(conn, "task-b") == []


printable_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=8)
group_append = st.tuples(
    st.integers(0, 2),  # which stream of the example
    st.sampled_from([ANY, NO_STREAM, STREAM_EXISTS, 0, 1, 2]),
    st.lists(
        st.dictionaries(printable_text, printable_text | st.integers(), max_size=3),
        min_size=1,
        max_size=3,
    ),
    st.none() | printable_text,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    suffix=printable_text.filter(str.isprintable),
    appends=st.lists(group_append, min_size=1, max_size=6),
)
async def test_grouped_appends_chain_hashes_that_verify_and_refuse_only_their_own(
    store, suffix, appends
):
    """Concurrent appends share one transaction (on PostgreSQL, one ``tiu_append`` call
    that computes the hash chain in SQL): every stored hash must equal the Python
    definition, whatever the stream id's characters, and an append whose expected
    version does not hold must be the only one refused."""
    base = f"task-{uuid.uuid4().hex[:8]}{suffix.strip()}"
    streams = [f"{base}-{n}" for n in range(3)]
    calls = [
        store.append(
            streams[n], "task", [NewEvent("Happened", d) for d in datas], expected,
            context=EventContext(actor_id=actor),
        )
        for n, expected, datas, actor in appends
    ]  # fmt: skip
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        assert not isinstance(outcome, Exception) or isinstance(outcome, WrongExpectedVersion)
    written = [o for o in outcomes if not isinstance(o, Exception)]
    async with store.engine.connect() as conn:
        report = await verify(conn)
        stored = {s: await store.read_stream(conn, s) for s in streams}
    assert report.ok, report
    assert sum(len(events) for events in stored.values()) == sum(
        o.last_version - o.first_version + 1 for o in written
    )
    for o in written:
        events = stored[o.stream_id][o.first_version - 1 : o.last_version]
        assert [e.position for e in events] == list(range(o.first_position, o.last_position + 1))


@pytest.mark.postgres
async def test_postgres_refuses_update_and_delete_of_events(postgres_engine):
    store = EventStore(postgres_engine)
    try:
        await store.append("user-1", "user", [ev()])
        for statement in ("UPDATE events SET event_type = 'X'", "DELETE FROM events"):
            with pytest.raises(Exception, match="append-only"):
                async with postgres_engine.begin() as conn:
                    await conn.execute(text(statement))
        async with postgres_engine.connect() as conn:
            assert await store.head_position(conn) == 1
    finally:
        # Closed before the engine is disposed: after an append, the store's NOTIFY task
        # holds a pooled connection for a moment; left running past the test, it was
        # cancelled with the event loop mid-statement and its connection leaked.
        await store.aclose()


async def test_subscription_catches_up_then_follows_live_appends(store):
    await store.append("user-1", "user", [ev(n=1), ev(n=2)])
    seen: list[int] = []

    async def follow() -> None:
        async for event in store.subscribe(0, batch_size=1, poll_interval=5):
            seen.append(event.position)
            if len(seen) == 4:
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    assert seen == [1, 2]
    await store.append("user-1", "user", [ev(n=3)])
    await store.append("task-1", "task", [ev(n=4)])
    await asyncio.wait_for(task, 3)  # woken by the commits, well before the 5 s poll
    assert seen == [1, 2, 3, 4]


async def test_filtered_subscription_skips_other_categories_without_spinning(store):
    await store.append("task-1", "task", [ev()])
    await store.append("user-1", "user", [ev()])
    got: list[str] = []

    async def follow() -> None:
        async for event in store.subscribe(0, categories=["user"], poll_interval=0.05):
            got.append(event.stream_id)
            if len(got) == 2:
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    await store.append("task-2", "task", [ev()])
    await store.append("user-2", "user", [ev()])
    await asyncio.wait_for(task, 3)
    assert got == ["user-1", "user-2"]


async def test_health_check_reports_backend_version_and_latency(engine):
    report = await health_check(engine, head_revision="0001")
    assert report.healthy
    assert report.backend == engine.dialect.name
    assert report.server_version
    assert report.latency_ms is not None
    assert report.current_revision is not None
    assert pool_status(engine).pool_class


async def test_health_check_reports_an_unreachable_server_as_unhealthy():
    engine = create_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    report = await health_check(engine, timeout=3)
    await engine.dispose()
    assert not report.healthy
    assert report.error
    assert report.pending_migrations is None


async def test_health_check_reports_a_missing_sqlite_directory_as_unhealthy(tmp_path):
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/missing/dir/tiu.db")
    report = await health_check(engine)
    await engine.dispose()
    assert not report.healthy


async def test_event_ids_are_unique_and_preserved(store):
    ids = [uuid.uuid4() for _ in range(3)]
    await store.append("user-1", "user", [NewEvent("E", {}, event_id=i) for i in ids])
    async with store.engine.connect() as conn:
        assert [e.event_id for e in await store.read_stream(conn, "user-1")] == ids


@given(value=st.uuids())
def test_ids_read_back_from_sqlite_text_are_the_uuids_written(value):
    from eventstore.records import uuid_from_hex

    read = uuid_from_hex(value.hex)
    assert (read, hash(read), str(read), read.version) == (
        value,
        hash(value),
        str(value),
        value.version,
    )
    assert type(read) is uuid.UUID
    assert uuid_from_hex(str(value)) == value  # any other spelling takes uuid.UUID's parser


@given(
    value=st.datetimes(
        timezones=st.sampled_from(
            [
                UTC,
                timezone(timedelta(hours=5, minutes=30)),
                timezone(timedelta(0), "Z"),  # offset zero, not the UTC object
                TzInfo(0),  # what pydantic gives decoded events' timestamps
            ]
        ),
        allow_imaginary=False,
    ).filter(lambda v: datetime.min.replace(tzinfo=UTC) + timedelta(days=1) < v)
)
def test_sqlite_timestamps_are_written_as_sqlalchemys_datetime_text(value):
    """UTCDateTime writes SQLite text in one step; it must be the text SQLAlchemy's own
    DATETIME would write, or text comparisons in queries would go wrong."""
    from sqlalchemy.dialects.sqlite import DATETIME, dialect

    from eventstore.types import UTCDateTime, sqlite_text

    reference = DATETIME().bind_processor(dialect())
    expected = reference(value.astimezone(UTC).replace(tzinfo=None))
    assert sqlite_text(value) == expected
    assert UTCDateTime().bind_processor(dialect())(value) == expected
    with pytest.raises(ValueError, match="naive datetime"):
        sqlite_text(value.replace(tzinfo=None))


def test_sqlite_text_of_a_zone_at_zero_only_in_winter_is_converted_in_summer():
    """The text remembers fixed zones found at offset zero; a zone that is at zero in
    winter (London) must still be converted when it is not."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from eventstore.types import sqlite_text

    try:
        london = ZoneInfo("Europe/London")
    except ZoneInfoNotFoundError:
        pytest.skip("no time zone database")
    fixed_zero = datetime(2026, 1, 5, 12, 0, tzinfo=TzInfo(0))
    winter = datetime(2026, 1, 5, 12, 0, tzinfo=london)
    summer = datetime(2026, 7, 5, 12, 0, tzinfo=london)

    assert sqlite_text(fixed_zero) == "2026-01-05 12:00:00.000000"
    assert sqlite_text(winter) == "2026-01-05 12:00:00.000000"
    assert sqlite_text(summer) == "2026-07-05 11:00:00.000000"
    assert sqlite_text(summer) == "2026-07-05 11:00:00.000000"  # the same value again
    assert sqlite_text(winter) == "2026-01-05 12:00:00.000000"


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ("2026-01-02 03:04:05.000006", datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)),
        ("2026-01-02 03:04:05", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T05:04:05+02:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ],
)
def test_sqlite_timestamps_read_back_as_aware_utc(stored, expected):
    """UTCDateTime parses SQLite's text with the offset in one step; text that carries
    an offset of its own (written by another tool) is converted, not refused."""
    from sqlalchemy import create_engine as create_sync_engine

    from eventstore.types import UTCDateTime

    with create_sync_engine("sqlite://").connect() as conn:
        value = conn.execute(
            text("SELECT :v AS v").columns(v=UTCDateTime()), {"v": stored}
        ).scalar()
    assert value == expected
    assert value.tzinfo is UTC


async def test_timestamps_read_back_as_utc_whatever_the_sessions_time_zone(engine):
    """A session in another zone (a server's default TimeZone may be one) still reads
    UTC: on PostgreSQL, UTCDateTime leaves asyncpg's values as they come."""
    from eventstore.types import UTCDateTime

    at = datetime(2026, 3, 29, 23, 30, tzinfo=UTC)
    async with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text("SET TIME ZONE 'Europe/Berlin'"))
        statement = text("SELECT :v AS v").bindparams(sa.bindparam("v", type_=UTCDateTime()))
        value = (await conn.execute(statement.columns(v=UTCDateTime()), {"v": at})).scalar()
        await conn.rollback()
    assert value == at
    assert value.tzinfo is UTC


def test_default_event_ids_are_time_ordered_version_7_uuids():
    first = [NewEvent("E", {}).event_id for _ in range(100)]
    time.sleep(0.002)  # the next millisecond
    later = NewEvent("E", {}).event_id
    assert {e.version for e in first} == {7}
    assert len(set(first)) == 100
    assert all(e < later for e in first)
    assert abs((later.int >> 80) - time.time_ns() // 1_000_000) < 60_000  # ms since the epoch


async def test_an_event_id_already_in_the_log_is_refused_with_nothing_written(store):
    taken = uuid.uuid4()
    await store.append("user-1", "user", [NewEvent("E", {}, event_id=taken)])
    with pytest.raises(DuplicateEventId, match="already in the log"):
        await store.append("user-2", "user", [NewEvent("E", {}), NewEvent("E", {}, event_id=taken)])
    with pytest.raises(DuplicateEventId):
        async with store.transaction() as uow:
            uow.append("user-3", "user", [NewEvent("E", {}, event_id=taken)])
    async with store.engine.connect() as conn:
        assert [e.stream_id for e in await store.read_all(conn)] == ["user-1"]


@pytest.mark.postgres
async def test_a_reader_in_another_process_is_woken_by_notify(postgres_engine, pg_schema):
    """A second engine stands in for another process: only NOTIFY can wake it early."""
    from dataclasses import replace

    from tests.conftest import PG_URL

    writer = EventStore(postgres_engine)
    other_engine = create_engine(PG_URL, replace(EngineOptions(), search_path=pg_schema))
    reader = EventStore(other_engine)
    got: list[int] = []

    async def follow() -> None:
        async for event in reader.subscribe(0, poll_interval=30):
            got.append(event.position)
            return

    task = asyncio.create_task(follow())
    try:
        await asyncio.sleep(0.5)  # the reader is now waiting, listening
        await writer.append("user-1", "user", [ev()])
        await asyncio.wait_for(task, 5)
        assert got == [1]
    finally:
        task.cancel()
        await writer.aclose()
        await reader.aclose()
        await other_engine.dispose()


async def test_a_missing_sqlite_directory_is_a_clear_error_naming_the_file(tmp_path):
    from eventstore import StoreUnavailable

    path = tmp_path / "nowhere" / "tiu.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        with pytest.raises(StoreUnavailable, match="does not exist") as missing:
            await EventStore(engine).append("user-1", "user", [ev()])
        assert str(path) in str(missing.value)
    finally:
        await engine.dispose()


@pytest.mark.needs_owner
async def test_an_unfiltered_subscription_passes_archived_holes_but_not_others(engine, tmp_path):
    from datetime import UTC, datetime, timedelta

    from eventstore.retention import archive

    times = iter(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=d) for d in range(100))
    store = EventStore(engine, clock=lambda: next(times))
    for n in range(3):
        await store.append("security-a", "security", [ev(n=n)])
        await store.append("user-1", "user", [ev(n=n)])
    await store.append("security-a", "security", [ev(n=9)])
    report = await archive(store, before=datetime(2026, 1, 5, tzinfo=UTC), output=tmp_path / "a.gz")
    assert report.count == 2  # positions 1 and 3; a stream's newest event is always kept

    async def read_all_live() -> list[int]:
        seen: list[int] = []

        async def follow() -> None:
            async for event in store.subscribe(0, poll_interval=0.05):
                seen.append(event.position)
                if event.event_type == "AuditArchived":
                    return

        await asyncio.wait_for(follow(), 5)
        return seen

    assert await read_all_live() == [2, 4, 5, 6, 7, 8]
    async with engine.begin() as conn:
        await bypass_append_only(conn)
        await conn.execute(text("DELETE FROM events WHERE position = 4"))
    with pytest.raises(LogIntegrityError, match="position 4"):
        await read_all_live()
    await store.aclose()


async def test_integers_beyond_64_bits_read_back_exactly_and_verify(store):
    """orjson, which reads stored JSON, turns such integers into rounded floats."""
    data = {"below_i64": -(2**63) - 1, "above_u64": 2**64 + 7, "nested": [3**41, {"x": 10**30 + 1}]}
    await store.append("task-big", "task", [NewEvent("Happened", data)])
    async with store.engine.connect() as conn:
        [stored] = await store.read_stream(conn, "task-big")
        [page] = await store.read_all(conn, 0, 10)
        report = await verify(conn)
    assert stored.data == data
    assert type(stored.data["below_i64"]) is int
    assert page.data == data
    assert report.ok, report


@given(milliseconds=st.integers(0, 2**48 - 1), random_bits=st.integers(0, 2**80 - 1))
def test_uuid7_of_keeps_the_millisecond_on_top_and_marks_version_and_variant(
    milliseconds: int, random_bits: int
) -> None:
    made = uuid7_of(milliseconds, random_bits)
    assert made.version == 7
    assert made.variant == uuid.RFC_4122
    assert made.int >> 80 == milliseconds
    kept = ~(0xF << 76) & ~(0x3 << 62) & (2**80 - 1)
    assert made.int & kept == random_bits & kept


@given(milliseconds=st.integers(0, 2**48 - 1), random_bits=st.integers(0, 2**80 - 1))
def test_uuid7_of_is_the_uuid_of_its_integer_in_every_way(
    milliseconds: int, random_bits: int
) -> None:
    made = uuid7_of(milliseconds, random_bits)
    same = uuid.UUID(int=made.int)
    assert type(made) is uuid.UUID
    assert made == same and hash(made) == hash(same) and str(made) == str(same)
    assert made.is_safe is same.is_safe
    assert pickle.loads(pickle.dumps(made)) == same


def test_uuid7_of_refuses_a_millisecond_beyond_48_bits() -> None:
    with pytest.raises(ValueError, match="int is out of range"):
        uuid7_of(2**48, 0)


@pytest.mark.postgres
async def test_a_refused_listen_closes_its_connection_and_leaves_readers_polling(
    postgres_engine, pg_schema, monkeypatch
):
    import asyncpg

    opened: list[asyncpg.Connection] = []

    async def refuse(self: asyncpg.Connection, channel: str, callback: object) -> None:
        opened.append(self)
        raise asyncpg.PostgresError("LISTEN refused")

    monkeypatch.setattr(asyncpg.Connection, "add_listener", refuse)
    store = EventStore(postgres_engine)
    try:
        assert await store.wait_for_append(0, timeout=0.05) is False
        assert len(opened) == 1
        assert opened[0].is_closed()
        await store.append("user-1", "user", [ev()])
        assert await store.wait_for_append(0, timeout=0.05) is True
    finally:
        await store.aclose()
