"""Reads from a real PostgreSQL streaming replica (a standby of the suite's cluster on
127.0.0.1:5433, made by ``.ci/replica``) with read-your-writes: a read after a write
waits for the replica to replay it, or reads the primary; never the replica's stale
rows. A stopped replica makes reads fall back to the primary."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.passwords import BcryptHasher
from eventstore import EngineOptions, create_engine
from projections.readmodels.users import users_table
from tests.cli.conftest import Cli
from tests.conftest import PASSWORD, PG_URL, Clock
from tiu import DatabaseService, Settings

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "replica"
REPLICA_PORT = int(os.environ.get("TIU_REPLICA_PORT", "5433"))
REPLICA_URL = make_url(PG_URL).set(port=REPLICA_PORT).render_as_string(hide_password=False)
REQUIRE_REPLICA = os.environ.get("TIU_REQUIRE_REPLICA") == "1"


async def _in_recovery() -> bool | str:
    engine = create_engine(REPLICA_URL, EngineOptions(pool_size=1))
    try:
        async with asyncio.timeout(5), engine.connect() as conn:
            return bool(await conn.scalar(text("SELECT pg_is_in_recovery()")))
    except Exception as error:  # any failure: not there
        return repr(error)
    finally:
        await engine.dispose()


def _script(*args: str) -> None:
    subprocess.run([str(SCRIPT), *args], check=True, capture_output=True, timeout=300)


#: Test runs on this machine that use the standby register here; the last one to
#: finish drops it if a test run made it (other runs may share it meanwhile).
USERS = Path(tempfile.gettempdir()) / "tiu_replica_users"
MADE = USERS / "made-by-tests"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    USERS.mkdir(exist_ok=True)
    with (USERS / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def replica_url(pg_schema: str) -> Iterator[str]:
    """The standby on REPLICA_PORT; made when absent, dropped by the last run using it."""
    with _locked():
        found = asyncio.run(_in_recovery())
        if found is not True and os.geteuid() == 0 and shutil.which("pg_createcluster"):
            try:
                _script("up")
                MADE.touch()
            except subprocess.SubprocessError as error:
                found = repr(error)
            else:
                found = asyncio.run(_in_recovery())
        if found is True:
            (USERS / str(os.getpid())).touch()
    if found is not True:
        if REQUIRE_REPLICA:
            pytest.fail(f"replica required (TIU_REQUIRE_REPLICA=1) but not there: {found}")
        pytest.skip(f"no PostgreSQL standby on port {REPLICA_PORT}: {found}")
    yield REPLICA_URL
    with _locked():
        (USERS / str(os.getpid())).unlink(missing_ok=True)
        others = [p for p in USERS.iterdir() if p.name.isdigit() and _alive(int(p.name))]
        if not others and MADE.exists():
            _script("down")
            MADE.unlink()


@pytest.fixture
async def replicated(
    postgres_engine: AsyncEngine, pg_schema: str, replica_url: str, clock: Clock
) -> AsyncIterator[DatabaseService]:
    service = DatabaseService(
        Settings(
            database_url=PG_URL,
            search_path=pg_schema,
            read_database_url=replica_url,
            replica_wait=0.5,
            bcrypt_rounds=4,
        ),
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )
    await service.start(migrate=False)
    yield service
    await service.aclose()


async def register(service: DatabaseService, who: str) -> str:
    async with service.get_repositories() as repos:
        user = await repos.get_user_repository().create_user(
            email=f"{who}@example.com", username=who, password=PASSWORD
        )
    return user.id


async def read_back(service: DatabaseService, user_id: str) -> bool:
    async with service.get_repositories() as repos:
        return await repos.get_user_repository().get_by_id(user_id) is not None


async def on_replica(pg_schema: str, statement: str) -> object:
    engine = create_engine(REPLICA_URL, EngineOptions(search_path=pg_schema, pool_size=1))
    try:
        async with engine.connect() as conn:
            return await conn.scalar(text(statement))
    finally:
        await engine.dispose()


async def test_reads_go_to_the_replica_and_each_read_after_a_write_sees_it(
    replicated: DatabaseService,
) -> None:
    reads = replicated.replica_reads
    assert reads is not None
    for n in range(15):
        user_id = await register(replicated, f"user{n:02d}")
        assert await read_back(replicated, user_id)  # read-your-writes, every time
    assert reads.counts["replica"] >= 15
    assert reads.counts["waits"] >= 15  # each first read after a write checked the LSN
    # Reads with no write since go straight to the replica, with no LSN check.
    waits = reads.counts["waits"]
    async with replicated.get_repositories() as repos:
        assert await repos.get_user_repository().count_users() == 15
        assert len(await repos.get_user_repository().list_users(limit=100)) == 15
    assert reads.counts["waits"] == waits
    # The audit queries read the replica too, and see the writes.
    async with replicated.get_repositories(actor_id="system") as repos:
        found = await repos.get_audit_repository().get_events(event_types=["UserRegistered"])
    assert len(found) == 15


async def test_a_replica_that_has_not_replayed_a_write_is_not_read(
    replicated: DatabaseService, pg_schema: str
) -> None:
    reads = replicated.replica_reads
    assert reads is not None
    await register(replicated, "ada")
    pause = "SELECT pg_wal_replay_pause()"
    await on_replica(pg_schema, pause)
    try:
        bob = await register(replicated, "bob")
        # The replica does not have bob...
        count = await on_replica(pg_schema, "SELECT count(*) FROM users WHERE username = 'bob'")
        assert count == 0
        # ...so the read after the write waits for it, gives up, and reads the primary.
        fallbacks = reads.counts["fallbacks"]
        assert await read_back(replicated, bob)
        assert reads.counts["fallbacks"] == fallbacks + 1
    finally:
        await on_replica(pg_schema, "SELECT pg_wal_replay_resume()")
    # Replayed, the replica serves again.
    served = reads.counts["replica"]
    assert await read_back(replicated, bob)
    assert reads.counts["replica"] == served + 1


@pytest.mark.skipif(os.geteuid() != 0, reason="stopping the replica needs root")
async def test_a_stopped_replica_makes_reads_fall_back_to_the_primary(
    replicated: DatabaseService,
) -> None:
    reads = replicated.replica_reads
    assert reads is not None
    ada = await register(replicated, "ada")
    assert await read_back(replicated, ada)
    await asyncio.to_thread(_script, "stop")
    try:
        primary = reads.counts["primary"]
        bob = await register(replicated, "bob")
        assert await read_back(replicated, bob)
        assert await read_back(replicated, ada)
        assert reads.counts["primary"] >= primary + 2
    finally:
        await asyncio.to_thread(_script, "start")
    reads._down_until = 0.0  # do not wait out retry_after in a test
    assert await read_back(replicated, bob)


async def test_commands_write_to_the_primary(replicated: DatabaseService) -> None:
    await register(replicated, "ada")
    async with replicated.engine.connect() as conn:
        rows = await conn.execute(select(users_table.c.username))
        assert list(rows.scalars()) == ["ada"]


async def test_audit_reads_streamed_or_not_go_to_the_replica(
    postgres_engine: AsyncEngine, pg_schema: str, clock: Clock
) -> None:
    """Every audit read goes to the read engine, those that stream their rows (a
    server-side cursor, in a transaction of their own) too. The primary stands in for
    a replica here: a server not in recovery has replayed every write."""
    service = DatabaseService(
        Settings(
            database_url=PG_URL, search_path=pg_schema, read_database_url=PG_URL, bcrypt_rounds=4
        ),
        engine=postgres_engine,
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )
    await service.start(migrate=False)
    try:
        reads = service.replica_reads
        assert reads is not None
        await register(service, "ada")
        async with service.get_repositories(actor_id="system") as repos:
            audit = repos.get_audit_repository()
            for read in (audit.get_events, audit.failed, audit.suspicious, audit.stats):
                served = reads.counts["replica"]
                await read()
                assert reads.counts["replica"] == served + 1, read.__name__
            assert [e.event_type for e in await audit.get_events()] == ["UserRegistered"]
    finally:
        await service.aclose()


async def test_the_audit_stats_command_reads_the_replica(
    replicated: DatabaseService, pg_schema: str, replica_url: str, monkeypatch
) -> None:
    """``tiu audit --stats`` reads as the audit repository does: the replica, which a
    new process (no write seen) reads without waiting, so a replica paused behind the
    primary shows it answered."""
    ada = await register(replicated, "ada")
    assert await read_back(replicated, ada)  # replayed: the replica has ada
    await on_replica(pg_schema, "SELECT pg_wal_replay_pause()")
    try:
        await register(replicated, "bob")
        async with replicated.engine.connect() as conn:
            on_primary = await conn.scalar(text("SELECT count(*) FROM events"))
        replayed = await on_replica(pg_schema, "SELECT count(*) FROM events")
        assert replayed < on_primary
        monkeypatch.setenv("TIU_READ_DATABASE_URL", replica_url)
        cli = Cli(["--database-url", PG_URL, "--schema", pg_schema])
        result = await asyncio.to_thread(cli, "audit", "--stats", "--format", "json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["total"] == replayed
    finally:
        await on_replica(pg_schema, "SELECT pg_wal_replay_resume()")
