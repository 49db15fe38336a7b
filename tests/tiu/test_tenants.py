"""Tenants (a schema each) of one PostgreSQL database, side by side: every mode
(inline, worker, replay, retention) works in each, and nothing crosses schemas."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from domain.passwords import BcryptHasher
from eventstore import EngineOptions, EventStore, create_engine
from eventstore.dialects import follow_schema
from eventstore.errors import AppendTimeout, PoolExhausted
from eventstore.integrity import verify
from eventstore.records import NO_STREAM, NewEvent
from eventstore.retention import archive
from eventstore.schema import events
from migrations import runner as migrations
from projections import replay
from projections.readmodels import ALL_PROJECTORS
from projections.readmodels.users import users_table
from tests.conftest import PASSWORD, PG_URL, Clock
from tiu import InvalidCredentials, Settings
from tiu.cli import app
from tiu.privacy import reclaim
from tiu.service import CATEGORIES, DatabaseService
from tiu.tenants import TenantRegistry, check_tenant_name

pytestmark = pytest.mark.postgres


@pytest.fixture
def tenant_names(pg_schema: str) -> Iterator[tuple[str, str]]:
    """Two fresh schema names, dropped afterwards (pg_schema: PostgreSQL is reachable)."""
    base = f"tiu_tenant_{os.getpid()}_{secrets.token_hex(3)}"
    names = (f"{base}_a", f"{base}_b")
    yield names

    async def drop() -> None:
        admin = create_engine(PG_URL)
        async with admin.begin() as conn:
            for name in names:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        await admin.dispose()

    asyncio.run(drop())


def registry(clock: Clock, **options: object) -> TenantRegistry:
    return TenantRegistry(
        Settings(database_url=PG_URL, bcrypt_rounds=4, pool_size=2, pool_timeout=1),
        hasher=BcryptHasher(rounds=4),
        clock=clock,
        **options,  # type: ignore[arg-type]
    )


def one_connection_registry(clock: Clock) -> TenantRegistry:
    """Tenants sharing a pool of exactly one connection: each use switches it."""
    settings = Settings(
        database_url=PG_URL, bcrypt_rounds=4, pool_size=1, max_overflow=0, pool_timeout=5
    )
    return TenantRegistry(settings, hasher=BcryptHasher(rounds=4), clock=clock)


async def emails(service: DatabaseService) -> set[str]:
    async with service.engine.connect() as conn:
        return set((await conn.execute(select(users_table.c.email))).scalars())


async def register(service: DatabaseService, who: str) -> str:
    async with service.get_repositories() as repos:
        user = await repos.get_user_repository().create_user(
            email=f"{who}@example.com", username=who, password=PASSWORD
        )
    return user.id


async def test_two_tenants_inline_each_see_only_their_own_log(
    tenant_names: tuple[str, str], clock: Clock
) -> None:
    a, b = tenant_names
    async with registry(clock) as tenants:
        async with tenants.tenant(a) as ta, tenants.tenant(b) as tb:
            await register(ta, "ada")
            await register(tb, "bob")
            await register(tb, "cyd")
            assert await emails(ta) == {"ada@example.com"}
            assert await emails(tb) == {"bob@example.com", "cyd@example.com"}
            # One email, two tenants: uniqueness is per tenant.
            await register(ta, "bob")
        assert sorted(set(await tenants.tenants()) & {a, b}) == [a, b]


async def test_tenants_share_one_pool_and_its_connection_follows_the_tenant_using_it(
    tenant_names: tuple[str, str], clock: Clock
) -> None:
    # One connection in all: every command below runs on it, switched between the
    # schemas, and the prepared statements and plpgsql append functions it has cached
    # resolve in the schema of the tenant using it.
    a, b = tenant_names
    async with one_connection_registry(clock) as tenants:
        async with tenants.tenant(a) as ta, tenants.tenant(b) as tb:
            assert ta.engine.pool is tb.engine.pool is tenants.engine.pool
            for who, service in [("ada", ta), ("bob", tb), ("cyd", ta), ("dee", tb)]:
                await register(service, who)
            assert await emails(ta) == {"ada@example.com", "cyd@example.com"}
            assert await emails(tb) == {"bob@example.com", "dee@example.com"}
            for name, service in ((a, ta), (b, tb), (a, ta)):
                async with service.engine.connect() as conn:
                    assert await conn.scalar(text("SELECT current_schema()")) == name
            async with tenants.engine.connect() as conn:  # the engine itself: the default path
                assert await conn.scalar(text("SELECT current_schema()")) == "public"
            for service, who in ((ta, "ada"), (tb, "bob"), (ta, "cyd")):
                async with service.get_repositories() as repos:
                    await repos.get_session_repository().create_session(
                        f"{who}@example.com", PASSWORD
                    )
                async with service.get_repositories() as repos:  # not the other tenant's
                    with pytest.raises(InvalidCredentials):
                        await repos.get_session_repository().create_session(
                            "dee@example.com" if service is ta else "cyd@example.com", PASSWORD
                        )
            # Never a second connection (the one may still be held by a store's group
            # writer between groups, so count it either way).
            pool = tenants.engine.pool
            assert pool.checkedin() + pool.checkedout() == 1
        assert await tenants.close_tenant(a)
        async with tenants.tenant(b, create=False) as tb:  # the engine outlived a
            assert await emails(tb) == {"bob@example.com", "dee@example.com"}


async def test_two_tenants_in_worker_mode_both_project(
    tenant_names: tuple[str, str], clock: Clock
) -> None:
    # Leadership was one advisory lock per projector for the whole database: the
    # second tenant's worker never led, and its commands ended in ProjectionTimeout.
    a, b = tenant_names
    tenants = registry(clock, projection_mode="worker", run_workers=True)
    async with tenants, tenants.tenant(a) as ta, tenants.tenant(b) as tb:
        assert ta.engine.pool is tb.engine.pool  # one engine; leadership per schema
        await asyncio.wait_for(asyncio.gather(register(ta, "ada"), register(tb, "bob")), timeout=30)
        await register(tb, "cyd")
        assert await emails(ta) == {"ada@example.com"}
        assert await emails(tb) == {"bob@example.com", "cyd@example.com"}
        for service in (ta, tb):
            stats = await service.get_statistics()
            assert stats["max_lag"] == 0


async def test_one_registry_worker_projects_every_tenant(
    tenant_names: tuple[str, str], clock: Clock
) -> None:
    a, b = tenant_names
    async with registry(clock, projection_mode="worker") as tenants:
        stop = asyncio.Event()
        async with tenants.tenant(a), tenants.tenant(b):
            pass  # created and migrated
        workers = asyncio.create_task(
            tenants.run_workers_until(stop, poll_interval=0.05, rescan=0.1)
        )
        try:
            async with tenants.tenant(a) as ta, tenants.tenant(b) as tb:
                await asyncio.wait_for(
                    asyncio.gather(register(ta, "ada"), register(tb, "bob")), timeout=30
                )
                assert await emails(ta) == {"ada@example.com"}
                assert await emails(tb) == {"bob@example.com"}
        finally:
            stop.set()
            await workers


async def test_replay_in_one_tenant_leaves_the_other_alone(
    tenant_names: tuple[str, str], clock: Clock
) -> None:
    a, b = tenant_names
    async with registry(clock) as tenants, tenants.tenant(a) as ta, tenants.tenant(b) as tb:
        await register(ta, "ada")
        await register(tb, "bob")
        users = next(p for p in ALL_PROJECTORS if p.name == "users")
        report = await replay.rebuild(ta.store, users)
        assert report.applied >= 1
        assert await emails(ta) == {"ada@example.com"}
        assert await emails(tb) == {"bob@example.com"}
        await replay.rebuild_all(tb.store, ALL_PROJECTORS)
        assert await emails(tb) == {"bob@example.com"}
        assert await emails(ta) == {"ada@example.com"}


async def test_retention_in_one_tenant_archives_only_its_events(
    tenant_names: tuple[str, str], clock: Clock, tmp_path: Path
) -> None:
    a, b = tenant_names

    async def refused_logins(service: DatabaseService) -> int:
        for _ in range(3):
            async with service.get_repositories(ip="203.0.113.9") as repos:
                with pytest.raises(InvalidCredentials):
                    await repos.get_session_repository().create_session(
                        "nobody@example.com", "wrong-password-0"
                    )
        async with service.engine.connect() as conn:
            return int(
                await conn.scalar(
                    select(func.count()).where(events.c.stream_category == "security")
                )
                or 0
            )

    async with registry(clock) as tenants, tenants.tenant(a) as ta, tenants.tenant(b) as tb:
        before_a = await refused_logins(ta)
        before_b = await refused_logins(tb)
        assert before_a >= 2 and before_b >= 2
        report = await archive(
            ta.store, before=clock.now + timedelta(days=1), output=tmp_path / "a.jsonl.gz"
        )
        assert 0 < report.count < before_a
        async with ta.engine.connect() as conn:
            assert (await verify(conn)).ok
            left = await conn.scalar(
                select(func.count()).where(events.c.stream_category == "security")
            )
            assert left == before_a - report.count
        async with tb.engine.connect() as conn:
            assert (await verify(conn)).ok
            assert (
                await conn.scalar(
                    select(func.count()).where(events.c.stream_category == "security")
                )
                == before_b
            )


async def test_the_append_lock_of_one_tenant_does_not_hold_up_another(
    tenant_names: tuple[str, str], clock: Clock
) -> None:
    a, b = tenant_names
    async with registry(clock) as tenants, tenants.tenant(a), tenants.tenant(b):
        pass
    engines = [
        create_engine(PG_URL, EngineOptions(search_path=name, lock_timeout_ms=500))
        for name in tenant_names
    ]
    stores = [EventStore(e, categories=CATEGORIES) for e in engines]
    try:
        # Tenant a's append lock is held by an open unit of work...
        async with engines[0].connect() as holder:
            await holder.begin()
            await holder.execute(text("SELECT * FROM tiu_lock_and_heads(ARRAY[]::text[])"))

            # ...tenant b appends straight through, and a second append to a waits.
            def note() -> list[NewEvent]:
                return [NewEvent(event_type="Noted", data={"n": 1})]

            await stores[1].append("user-1", "user", note(), NO_STREAM)
            with pytest.raises(AppendTimeout):
                await stores[0].append("user-1", "user", note(), NO_STREAM)
            await holder.rollback()
        await stores[0].append("user-1", "user", note(), NO_STREAM)
        channels = []
        for store in stores:
            async with store.engine.connect() as conn:
                channels.append(await store.dialect.channel(conn))  # type: ignore[attr-defined]
        assert channels[0] != channels[1]
    finally:
        for store, engine in zip(stores, engines, strict=True):
            await store.aclose()
            await engine.dispose()


async def test_the_registry_caps_open_tenants(tenant_names: tuple[str, str], clock: Clock) -> None:
    a, b = tenant_names
    async with registry(clock, max_open=1) as tenants:
        async with tenants.tenant(a) as ta:
            await register(ta, "ada")
            # The only slot is held: opening b waits for the pool timeout, then refuses.
            with pytest.raises(PoolExhausted):
                async with tenants.tenant(b):
                    pass
        async with tenants.tenant(b) as tb:
            await register(tb, "bob")
            assert tenants.open_tenants == [b]  # a, idle, was closed to open b
        async with tenants.tenant(a, create=False) as ta:
            assert await emails(ta) == {"ada@example.com"}


@pytest.mark.parametrize("name", ["", "Public", "public", "pg_x", "1a", "a-b", 'a"b', "a" * 64])
def test_tenant_names_are_plain_identifiers(name: str) -> None:
    with pytest.raises(ValueError, match="invalid tenant name"):
        check_tenant_name(name)


async def test_a_store_in_the_public_schema_is_not_taken_for_a_tenant(
    tenant_names: tuple[str, str], clock: Clock
) -> None:
    """A database used without tenants holds its store in ``public``; a registry on it
    lists only the tenants' schemas (its workers had failed on the name ``public``)."""
    database = f"tiu_public_{os.getpid()}_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(PG_URL.replace("+asyncpg", ""))
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = PG_URL.rsplit("/", 1)[0] + f"/{database}"
    plain = create_engine(url)
    try:
        await migrations.upgrade(plain)
        settings = Settings(database_url=url, bcrypt_rounds=4, pool_size=2)
        tenants = TenantRegistry(settings, hasher=BcryptHasher(rounds=4), clock=clock)
        try:
            await tenants.create_tenant(tenant_names[0])
            assert await tenants.tenants() == [tenant_names[0]]
        finally:
            await tenants.aclose()
    finally:
        await plain.dispose()
        await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        await admin.close()


async def test_tenants_live_in_postgresql_only() -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        TenantRegistry(Settings(database_url="sqlite+aiosqlite:///./x.db"))


def test_tiu_tenants_create_and_list(tenant_names: tuple[str, str]) -> None:
    runner = CliRunner()
    created = runner.invoke(app, ["tenants", "create", *tenant_names, "--database-url", PG_URL])
    assert created.exit_code == 0, created.output
    listed = runner.invoke(app, ["tenants", "list", "--json", "--database-url", PG_URL])
    assert listed.exit_code == 0, listed.output
    assert set(tenant_names) <= set(json.loads(listed.stdout))
    refused = runner.invoke(app, ["tenants", "create", "Bad-Name", "--database-url", PG_URL])
    assert refused.exit_code == 1
    assert "invalid tenant name" in refused.output


def test_each_tenant_has_its_schema_and_its_own_redis_prefix() -> None:
    tenants = TenantRegistry(Settings(database_url=PG_URL, redis_prefix="app:"))
    acme = tenants.settings_for("acme")
    assert (acme.search_path, acme.redis_prefix) == ("acme", "app:acme:")
    assert tenants.settings_for("globex").redis_prefix == "app:globex:"


async def test_an_append_through_the_store_lands_in_its_own_tenant_on_a_shared_connection(
    tenant_names: tuple[str, str], clock: Clock
) -> None:
    # EventStore.append runs on a pooled driver connection, without an SQLAlchemy
    # Connection around it: the one pooled connection served tenant b last, and an
    # append of tenant a's store must still go to a's log.
    a, b = tenant_names
    async with (
        one_connection_registry(clock) as tenants,
        tenants.tenant(a) as ta,
        tenants.tenant(b) as tb,
    ):
        for service, other in ((ta, tb), (tb, ta), (ta, tb)):
            async with other.engine.connect() as conn:  # the connection serves the other
                await conn.scalar(text("SELECT 1"))
            note = [NewEvent(event_type="Noted", data={"n": 1})]
            await service.store.append(f"user-{secrets.token_hex(4)}", "user", note)
        counts = []
        for service in (ta, tb):
            async with service.engine.connect() as conn:
                counts.append(
                    await conn.scalar(select(func.count()).where(events.c.event_type == "Noted"))
                )
        assert counts == [2, 1]


async def test_reclaim_through_a_tenant_rewrites_that_tenant_s_tables_only(
    tenant_names: tuple[str, str], clock: Clock
) -> None:
    # privacy.reclaim runs VACUUM FULL on a bare pooled connection: on a pool shared
    # with another tenant, it must still rewrite its own tenant's tables.
    a, b = tenant_names

    async def users_file(service: DatabaseService) -> int:
        async with service.engine.connect() as conn:
            return int(await conn.scalar(text("SELECT pg_relation_filenode('users')")))

    async with (
        one_connection_registry(clock) as tenants,
        tenants.tenant(a) as ta,
        tenants.tenant(b) as tb,
    ):
        before = (await users_file(ta), await users_file(tb))  # tb served the connection last
        await reclaim(ta.engine)
        after = (await users_file(ta), await users_file(tb))
    assert after[0] != before[0], "tenant a's users table was not rewritten"
    assert after[1] == before[1], "tenant b's users table was rewritten"


async def test_a_schema_switch_cut_off_midway_is_made_again_at_the_next_bare_checkout(
    tenant_names: tuple[str, str], clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A SET cancelled after the server ran it leaves the session on the new path: the
    # connection, back in the pool, must not still pass for the schema it served before.
    a, b = tenant_names
    real = asyncpg.connection.Connection.execute
    cut: list[str] = []

    async def execute_then_cancel(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        result = await real(self, query, *args, **kwargs)
        if query.startswith("SET search_path") and not cut:
            cut.append(query)
            raise asyncio.CancelledError
        return result

    async with (
        one_connection_registry(clock) as tenants,
        tenants.tenant(a) as ta,
        tenants.tenant(b) as tb,
    ):
        async with tb.engine.connect() as conn:  # the one connection serves b
            assert await conn.scalar(text("SELECT current_schema()")) == b
        monkeypatch.setattr(asyncpg.connection.Connection, "execute", execute_then_cancel)
        raw = await ta.engine.raw_connection()
        with pytest.raises(asyncio.CancelledError):
            await follow_schema(ta.engine, raw)
        raw.close()  # back to the pool, its session now on a's path
        assert cut
        raw = await tb.engine.raw_connection()
        try:
            await follow_schema(tb.engine, raw)
            assert await raw.driver_connection.fetchval("SELECT current_schema()") == b
        finally:
            raw.close()


async def test_a_tenant_whose_opener_is_cancelled_is_opened_by_a_caller_waiting_for_it(
    tenant_names: tuple[str, str], clock: Clock
) -> None:
    """Two callers open one tenant at once: the second waits for the first's opening.
    The first cancelled midway (its request timed out), the second, which was not
    cancelled, opens the tenant itself instead of receiving that cancellation."""
    a, _ = tenant_names
    async with registry(clock) as tenants:

        async def register_in_a(who: str) -> str:
            async with tenants.tenant(a) as service:
                return await register(service, who)

        opener = asyncio.ensure_future(register_in_a("ada"))
        while a not in tenants._opening:  # noqa: ASYNC110  # the opener begins opening it
            await asyncio.sleep(0)
        waiter = asyncio.ensure_future(register_in_a("bob"))
        await asyncio.sleep(0.01)
        assert a in tenants._opening  # still opening: the second caller waits for it
        opener.cancel()
        outcomes = await asyncio.gather(opener, waiter, return_exceptions=True)
        assert isinstance(outcomes[0], asyncio.CancelledError)
        assert isinstance(outcomes[1], str), outcomes[1]
        async with tenants.tenant(a) as service:
            assert await emails(service) == {"bob@example.com"}
