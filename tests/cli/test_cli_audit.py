"""audit queries, retention archive, verify (tamper detection), and the PG plans."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text

from eventstore import EngineOptions, create_engine
from eventstore.retention import file_sha256, read_archive
from eventstore.schema import events
from tests.conftest import PG_URL, _empty_schema
from tiu.audit import AuditFilter, parse_time

from .conftest import Cli, sql


def jsonl(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_audit_filters_and_formats(cli: Cli):
    everything = jsonl(cli("audit", "--format", "jsonl", "--limit", "1000"))
    assert len(everything) == sql(cli, "SELECT count(*) FROM events")[0][0]
    assert [e["position"] for e in everything] == sorted(
        (e["position"] for e in everything), reverse=True
    )
    assert all(e["data"].get("password_hash") in (None, "[redacted]") for e in everything)
    some = everything[5]
    assert {
        e["position"]
        for e in jsonl(cli("audit", "--stream", some["stream_id"], "--format", "jsonl"))
    } == {e["position"] for e in everything if e["stream_id"] == some["stream_id"]}
    actor = next(e["actor_id"] for e in everything if e["actor_id"])
    by_actor = jsonl(cli("audit", "--actor", actor, "--format", "jsonl"))
    assert by_actor and all(e["actor_id"] == actor for e in by_actor)
    kinds = jsonl(
        cli("audit", "--type", "TaskCreated", "--type", "ProjectCreated", "--format", "jsonl")
    )
    assert {e["event_type"] for e in kinds} == {"TaskCreated", "ProjectCreated"}
    security = jsonl(cli("audit", "--category", "security", "--format", "jsonl"))
    assert security and all(e["category"] == "security" for e in security)
    corr = jsonl(cli("audit", "--correlation", some["correlation_id"], "--format", "jsonl"))
    assert some["position"] in {e["position"] for e in corr}
    as_json = json.loads(cli("audit", "--limit", "3", "--format", "json").stdout)
    assert len(as_json) == 3
    assert "events" in cli("audit", "--limit", "3").stdout
    # relative times: the scenario started two days ago
    assert jsonl(cli("audit", "--since", "1h", "--format", "jsonl")) == []
    assert len(jsonl(cli("audit", "--since", "7d", "--limit", "1000", "--format", "jsonl"))) == len(
        everything
    )
    recent = jsonl(cli("audit", "--until", "30h", "--format", "jsonl", "--limit", "1000"))
    assert 0 < len(recent) < len(everything)


def test_parse_time():
    now = datetime(2026, 3, 2, 12, tzinfo=UTC)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("30m", now) == now - timedelta(minutes=30)
    assert parse_time("7d", now) == now - timedelta(days=7)
    assert parse_time("2026-03-01T09:00") == datetime(2026, 3, 1, 9, tzinfo=UTC)
    with pytest.raises(ValueError, match="invalid time"):
        parse_time("yesterday")
    # Aware, but the year 0 or 10000 in UTC: it failed in the driver's bind.
    for beyond in ("0001-01-01T00:00+14:00", "9999-12-31T23:00-14:00"):
        with pytest.raises(ValueError, match="1 to 9999 in UTC"):
            parse_time(beyond)


def test_a_cutoff_beyond_utc_is_refused_naming_the_time(sqlite_cli: Cli):
    result = sqlite_cli("audit", "archive", "--before", "0001-01-01T00:00+14:00")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: invalid time '0001-01-01T00:00+14:00': not within the years 1 to 9999 in UTC\n"
    )


def test_a_file_that_is_not_an_archive_is_named_not_blamed_on_the_database(
    sqlite_cli: Cli, tmp_path: Path
):
    # A file that is not gzip, or a directory, was "cannot reach the database" (the
    # OSError went through the store's translator); rows without the event columns
    # were "unexpected KeyError".
    not_gzip = tmp_path / "notes.txt"
    not_gzip.write_text("hello\n")
    not_events = tmp_path / "other.jsonl.gz"
    not_events.write_bytes(gzip.compress(b'{"a": 1}\n'))
    not_json = tmp_path / "binary.jsonl.gz"
    not_json.write_bytes(gzip.compress(b"\xff\xfe\n"))
    for path in (not_gzip, not_events, not_json, tmp_path):
        for mode in ((), ("--stats",), ("--suspicious",)):
            result = sqlite_cli("audit", "--archive", str(path), *mode)
            assert result.exit_code == 1, result.output
            assert result.stderr.startswith("error: ") and str(path) in result.stderr
            assert "database" not in result.stderr and "KeyError" not in result.stderr


def test_failed_suspicious_and_stats(cli: Cli):
    failed = jsonl(cli("audit", "--failed", "--format", "jsonl", "--limit", "1000"))
    kinds = {e["event_type"] for e in failed}
    assert kinds == {"LoginRejected", "LoginFailed", "AccountLocked", "CommandRejected"}
    only = jsonl(cli("audit", "--failed", "--type", "AccountLocked", "--format", "jsonl"))
    assert [e["event_type"] for e in only] == ["AccountLocked"]
    findings = json.loads(cli("audit", "--suspicious", "--format", "json").stdout)
    rules = {f["rule"] for f in findings}
    assert "account_failures" in rules
    account = next(f for f in findings if f["rule"] == "account_failures")
    assert account["count"] >= 5
    assert json.loads(
        cli("audit", "--suspicious", "--threshold", "50", "--format", "json").stdout
    ) == [f for f in findings if f["rule"] != "account_failures"]
    quiet = cli("audit", "--suspicious", "--window", "1s", "--threshold", "3")
    assert quiet.exit_code == 0
    stats = json.loads(cli("audit", "--stats", "--format", "json").stdout)
    assert stats["total"] == sql(cli, "SELECT count(*) FROM events")[0][0]
    assert stats["by_type"]["LoginFailed"] == 5
    assert sum(stats["by_day"].values()) == stats["total"]
    both = cli("audit", "--failed", "--stats")
    assert both.exit_code == 1
    assert both.stderr.startswith("error: choose one of")


def test_archive_then_verify_query_and_tamper(cli: Cli, tmp_path: Path):
    security_before = jsonl(
        cli("audit", "--category", "security", "--format", "jsonl", "--limit", "1000")
    )
    target = tmp_path / "sec.jsonl.gz"
    result = cli("audit", "archive", "--before", "1h", "--output", str(target), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["events"] > 0
    assert report["sha256"] == file_sha256(target)
    archived = list(read_archive(target))
    assert len(archived) == report["events"]
    assert {r["stream_category"] for r in archived} == {"security"}
    assert set(archived[0]) >= {"position", "hash", "data", "metadata", "recorded_at", "event_id"}
    with gzip.open(target, "rt") as handle:
        assert all(json.loads(line) for line in handle)
    # Each stream keeps its newest event; the rest is gone from the log.
    left = jsonl(cli("audit", "--category", "security", "--format", "jsonl"))
    assert len(left) + len(archived) == len(security_before)
    record = jsonl(cli("audit", "--type", "AuditArchived", "--format", "jsonl"))
    assert record[0]["category"] == "retention"
    assert record[0]["data"]["sha256"] == report["sha256"]
    ok = cli("verify", "--json")
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["archived_events"] == len(archived)
    assert summary["archives"] == 1
    # The archive answers the same queries.
    from_file = jsonl(
        cli("audit", "--archive", str(target), "--format", "jsonl", "--limit", "1000")
    )
    assert {e["position"] for e in from_file} == {r["position"] for r in archived}
    assert jsonl(
        cli("audit", "--archive", str(target), "--type", "LoginRejected", "--format", "jsonl")
    )
    assert json.loads(cli("audit", "--archive", str(target), "--stats", "--format", "json").stdout)[
        "total"
    ] == len(archived)
    again = cli("audit", "archive", "--before", "1h", "--output", str(tmp_path / "b.jsonl.gz"))
    assert again.exit_code == 0
    assert "nothing to archive" in again.stdout
    # Tampering after the archive is still detected: the kept head of an archived stream.
    head = left[0]
    sql(
        cli,
        f"UPDATE events SET correlation_id = 'forged' WHERE position = {head['position']}",
        superuser_bypass=True,
    )
    broken = cli("verify")
    assert broken.exit_code == 1
    assert f"stream '{head['stream_id']}'" in broken.stderr
    assert "hash does not match content" in broken.stderr


def test_a_hole_outside_the_archive_is_reported(cli: Cli, tmp_path: Path):
    assert (
        cli("audit", "archive", "--before", "1h", "--output", str(tmp_path / "a.gz")).exit_code == 0
    )
    last = sql(cli, "SELECT max(position) FROM events WHERE stream_category = 'task'")[0][0]
    sql(cli, f"DELETE FROM events WHERE position = {last}", superuser_bypass=True)
    broken = cli("verify")
    assert broken.exit_code == 1
    assert "error: " in broken.stderr


def test_verify_names_the_tampered_event(cli: Cli):
    assert cli("verify").exit_code == 0
    row = sql(
        cli,
        "SELECT position, stream_id, version FROM events WHERE event_type = 'TaskCreated' "
        "ORDER BY position LIMIT 1",
    )[0]
    sql(
        cli,
        f"UPDATE events SET actor_id = 'mallory' WHERE position = {row[0]}",
        superuser_bypass=True,
    )
    result = cli("verify")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"error: stream '{row[1]}' version {row[2]} (position {row[0]}): "
        "hash does not match content"
    )


def test_postgres_direct_delete_is_refused(pg_cli: Cli):
    with pytest.raises(Exception, match="append-only"):
        sql(pg_cli, "DELETE FROM events WHERE stream_category = 'security'")


# -- query plans ----------------------------------------------------------------------


def _nodes(plan: dict) -> list[dict]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


# The category filter (20% of rows here) is served by a backward scan of the primary
# key with LIMIT, which the planner rightly prefers; the others use their own index.
EXPECTED_INDEX = {
    "actor+time": "ix_events_actor_id_recorded_at",
    "type+time": "ix_events_event_type_recorded_at",
    "correlation": "ix_events_correlation_id",
    "stream": "uq_events_stream_id_version",
}


@pytest.mark.postgres
def test_audit_queries_use_indexes_on_postgres(pg_schema: str):
    base = datetime(2026, 1, 1, tzinfo=UTC)

    async def go() -> dict[str, list[dict]]:
        engine = create_engine(PG_URL, EngineOptions(search_path=pg_schema))
        await _empty_schema(engine, pg_schema)
        rows = []
        for i in range(1, 5001):
            rows.append(
                {
                    "position": i,
                    "event_id": uuid.uuid4(),
                    "stream_id": f"cat{i % 5}-{i % 400}",
                    "stream_category": f"cat{i % 5}",
                    "version": i // 400 + 1,
                    "event_type": f"Type{i % 40}",
                    "schema_version": 1,
                    "data": {"i": i},
                    "metadata": {},
                    "actor_id": f"actor-{i % 100}",
                    "correlation_id": f"corr-{i % 1000}",
                    "causation_id": None,
                    "command_id": f"cmd-{i}",
                    "recorded_at": base + timedelta(minutes=i),
                    "hash": "0" * 64,
                }
            )
        plans: dict[str, list[dict]] = {}
        try:
            async with engine.begin() as conn:
                await conn.execute(insert(events), rows)
            async with engine.connect() as conn:
                await conn.execute(text("ANALYZE events"))
                since = base + timedelta(days=2)
                filters = {
                    "actor+time": AuditFilter(actor_id="actor-7", since=since),
                    "type+time": AuditFilter(event_types=("Type3",), since=since),
                    "correlation": AuditFilter(correlation_id="corr-42"),
                    "stream": AuditFilter(stream_id="cat1-201"),
                    "category": AuditFilter(category="cat2"),
                }
                for name, where in filters.items():
                    stmt = (
                        select(events)
                        .where(*where.conditions())
                        .order_by(events.c.position.desc())
                        .limit(100)
                    )
                    compiled = stmt.compile(
                        dialect=conn.dialect, compile_kwargs={"render_postcompile": True}
                    )
                    params = compiled.construct_params()
                    args = tuple(params[k] for k in compiled.positiontup)
                    result = await conn.exec_driver_sql(
                        "EXPLAIN (FORMAT JSON) " + compiled.string, args
                    )
                    doc = result.scalar()
                    doc = json.loads(doc) if isinstance(doc, str) else doc
                    plans[name] = _nodes(doc[0]["Plan"])
        finally:
            await engine.dispose()
        return plans

    plans = asyncio.run(go())
    for name, nodes in plans.items():
        on_events = [n for n in nodes if n.get("Relation Name") == "events"]
        kinds = {n["Node Type"] for n in on_events}
        assert "Seq Scan" not in kinds, (name, kinds)
        assert kinds & {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}, (name, kinds)
        indexes = {n.get("Index Name") for n in nodes if n.get("Index Name")}
        assert indexes, (name, nodes)
        if name in EXPECTED_INDEX:
            assert EXPECTED_INDEX[name] in indexes, (name, indexes)
