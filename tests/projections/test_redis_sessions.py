"""The Redis session cache, against the real Redis on 127.0.0.1:6379 (a key prefix of
its own per test: other runs share the server), on both backends."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.passwords import BcryptHasher, hash_token
from projections.redis_sessions import SessionCache
from tests.conftest import PASSWORD, Clock
from tiu import DatabaseService, Settings

REDIS_URL = os.environ.get("TIU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("TIU_REQUIRE_REDIS") == "1"


async def _reachable() -> str | None:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as error:  # any failure means "not reachable"
        return repr(error)
    finally:
        await client.aclose()
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    problem = asyncio.run(_reachable())
    if problem is not None:
        if REQUIRE_REDIS:
            pytest.fail(f"Redis required (TIU_REQUIRE_REDIS=1) but unreachable: {problem}")
        pytest.skip(f"Redis unreachable: {problem}")
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"tiu-test:{os.getpid()}:{secrets.token_hex(4)}:"
    yield name

    async def drop() -> None:
        client = Redis.from_url(redis_url)
        try:
            async for key in client.scan_iter(match=f"{name}*", count=1000):
                await client.unlink(key)
        finally:
            await client.aclose()

    asyncio.run(drop())


@pytest.fixture
def clock() -> Clock:
    # Redis expires an entry at the session's expiry by its own (real) clock: the
    # service's clock starts at the real time here, and tests move it forward.
    at = Clock()
    at.now = datetime.now(UTC).replace(microsecond=0)
    return at


def make_service(engine: AsyncEngine, clock: Clock, **settings: object) -> DatabaseService:
    return DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4, **settings),  # type: ignore[arg-type]
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )


@pytest.fixture
async def cached(
    engine: AsyncEngine, clock: Clock, redis_url: str, prefix: str
) -> AsyncIterator[DatabaseService]:
    service = make_service(engine, clock, redis_url=redis_url, redis_prefix=prefix)
    await service.start(migrate=False)
    yield service
    await _close(service)


async def _close(service: DatabaseService) -> None:
    # The engine belongs to the fixture: stop what the service started, not the engine.
    if service._cache_task is not None:
        service._cache_stop.set()
        await service._cache_task
    if service.session_cache is not None:
        await service.session_cache.aclose()
    await service.store.aclose()


async def login(service: DatabaseService, who: str, *, register: bool = True) -> tuple[str, str]:
    async with service.get_repositories() as repos:
        if register:
            await repos.get_user_repository().create_user(
                email=f"{who}@example.com", username=who, password=PASSWORD
            )
        new = await repos.get_session_repository().create_session(f"{who}@example.com", PASSWORD)
    return new.token, new.user.id


async def check(service: DatabaseService, token: str) -> tuple[bool, str | None, str]:
    async with service.get_repositories() as repos:
        found = await repos.get_session_repository().check_token(token)
    return found.valid, found.reason, found.source


async def test_tokens_are_checked_in_redis_and_every_revocation_reaches_it_through_the_log(
    cached: DatabaseService, clock: Clock
) -> None:
    service = cached
    ada, ada_id = await login(service, "ada")
    assert await check(service, ada) == (True, None, "redis")
    assert await check(service, "no-such-token") == (False, "unknown", "redis")
    async with service.get_repositories() as repos:
        found = await repos.get_session_repository().check_token(ada)
        validation = await repos.get_session_repository().validate_session(ada)
    assert found.user_id == ada_id and validation.valid

    # Logout.
    async with service.get_repositories(actor_id=ada_id) as repos:
        await repos.get_session_repository().revoke(found.session_id or "")
    assert await check(service, ada) == (False, "revoked", "redis")
    async with service.get_repositories() as repos:
        refused = await repos.get_session_repository().validate_session(ada)
    assert refused.reason == "revoked" and refused.session is not None

    # A password change revokes every session started before it.
    one, _ = await login(service, "ada", register=False)
    two, _ = await login(service, "ada", register=False)
    clock.advance(seconds=1)
    async with service.get_repositories(actor_id=ada_id) as repos:
        await repos.get_user_repository().change_password(ada_id, PASSWORD, "a-new-pass-phrase-77")
    assert await check(service, one) == (False, "revoked", "redis")
    assert await check(service, two) == (False, "revoked", "redis")

    # Idle and absolute expiry are decided against the clock.
    bob, _ = await login(service, "bob")
    clock.advance(minutes=31)
    assert await check(service, bob) == (False, "idle", "redis")
    carl, _ = await login(service, "carl")
    for _ in range(25):  # keep it active (touches recorded through the log)
        clock.advance(minutes=29)
        async with service.get_repositories() as repos:
            await repos.get_session_repository().validate_session(carl)
    assert await check(service, carl) == (False, "expired", "redis")

    # The SQL read model gives the same answers.
    plain = make_service(service.engine, clock)
    try:
        for token in (ada, one, two, bob, carl, "no-such-token"):
            valid, reason, _ = await check(service, token)
            assert await check(plain, token) == (valid, reason, "sql")
    finally:
        await plain.store.aclose()


async def test_a_revocation_in_one_instance_is_refused_by_another(
    engine: AsyncEngine, clock: Clock, redis_url: str, prefix: str
) -> None:
    first = make_service(engine, clock, redis_url=redis_url, redis_prefix=prefix)
    second = make_service(engine, clock, redis_url=redis_url, redis_prefix=prefix)
    await first.start(migrate=False)
    await second.start(migrate=False)
    try:
        token, user_id = await login(first, "ada")
        assert await check(second, token) == (True, None, "redis")
        clock.advance(seconds=1)
        async with first.get_repositories(actor_id=user_id) as repos:
            await repos.get_session_repository().revoke_all(user_id)
        valid, reason, _ = await check(second, token)
        assert (valid, reason) == (False, "revoked")
    finally:
        await _close(first)
        await _close(second)


async def test_a_cache_behind_the_known_head_is_not_trusted(
    engine: AsyncEngine, clock: Clock, redis_url: str, prefix: str
) -> None:
    service = make_service(
        engine, clock, redis_url=redis_url, redis_prefix=prefix, session_cache_wait=0.1
    )
    await service.start(migrate=False)
    try:
        token, user_id = await login(service, "ada")
        assert await check(service, token) == (True, None, "redis")
        # The cache stops following the log (its runner is down): Redis still says
        # "valid", but it is behind the revocation this process committed.
        service._cache_stop.set()
        assert service._cache_task is not None
        await service._cache_task
        clock.advance(seconds=1)
        async with service.get_repositories(actor_id=user_id) as repos:
            await repos.get_session_repository().revoke_all(user_id)
        assert await check(service, token) == (False, "revoked", "sql")
        cache = service.session_cache
        assert cache is not None
        session, _ = await cache.lookup(_hash(token))
        assert session is not None and session.revoked_at is None  # stale, and not used
        # Caught up again, Redis answers.
        await cache.catch_up(service.store)
        assert await check(service, token) == (False, "revoked", "redis")
    finally:
        await _close(service)


async def test_with_redis_down_tokens_are_checked_in_sql(
    engine: AsyncEngine, clock: Clock, prefix: str
) -> None:
    service = make_service(
        engine,
        clock,
        redis_url="redis://127.0.0.1:1/0",
        redis_prefix=prefix,
        session_cache_wait=0.1,
    )
    await service.start(migrate=False)
    try:
        token, user_id = await login(service, "ada")
        assert await check(service, token) == (True, None, "sql")
        clock.advance(seconds=1)
        async with service.get_repositories(actor_id=user_id) as repos:
            await repos.get_session_repository().revoke_all(user_id)
            validation = await repos.get_session_repository().validate_session(token)
        assert await check(service, token) == (False, "revoked", "sql")
        assert validation.reason == "revoked"
    finally:
        await _close(service)


async def test_runners_sharing_a_prefix_apply_each_batch_once_and_a_rebuild_matches(
    cached: DatabaseService, clock: Clock, redis_url: str, prefix: str
) -> None:
    service = cached
    tokens = []
    for who in ("ada", "bob", "cyd"):
        token, user_id = await login(service, who)
        tokens.append(token)
    clock.advance(seconds=1)
    async with service.get_repositories(actor_id=user_id) as repos:
        await repos.get_session_repository().revoke_all(user_id)
    # Several runners on one prefix: the checkpoint compare-and-set lets one apply
    # each batch; the entries equal those of one runner on a fresh prefix.
    fresh = SessionCache.from_url(
        redis_url, prefix=prefix + "fresh:", idle_timeout=service.settings.session_idle_timeout
    )
    racers = [
        SessionCache.from_url(
            redis_url, prefix=prefix + "race:", idle_timeout=service.settings.session_idle_timeout
        )
        for _ in range(4)
    ]
    try:
        await fresh.catch_up(service.store)
        await asyncio.gather(*(r.catch_up(service.store) for r in racers))
        for token in tokens:
            expected, _ = await fresh.lookup(_hash(token))
            assert expected is not None
            for r in racers:
                assert (await r.lookup(_hash(token)))[0] == expected
        head = await fresh.checkpoint()
        assert all([await r.checkpoint() == head for r in racers])
        # A rebuild: cleared, then projected again from 0.
        assert await fresh.clear() > 0
        assert await fresh.checkpoint() == 0
        await fresh.catch_up(service.store)
        for token in tokens:
            assert (await fresh.lookup(_hash(token)))[0] == (await racers[0].lookup(_hash(token)))[
                0
            ]
    finally:
        await fresh.clear()
        await racers[0].clear()
        for c in (fresh, *racers):
            await c.aclose()


def _hash(token: str) -> str:
    return hash_token(token)
