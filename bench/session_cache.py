"""Case 9: session validation from the Redis session cache vs the SQL read model.

    python -m bench.session_cache --sessions 2000 --checks 20000 --backends postgresql,sqlite

Users log in through the public API (bcrypt cost 4) until ``sessions`` sessions
exist; then ``SessionRepository.check_token`` runs ``checks`` times over random
tokens (a tenth of them revoked), with 1 and 8 concurrent callers, on a service with
the Redis cache (``redis_url``) and on one without (the SQL read model), taking turns
run by run. PostgreSQL runs in a schema of its own in the test database, SQLite on a
temporary file; the Redis keys live under a prefix of their own; all are removed at
the end. Prints checks per second, medians over ``runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis
from sqlalchemy import text

from domain.passwords import BcryptHasher
from eventstore import create_engine
from tiu import DatabaseService, Settings

PG_URL = os.environ.get(
    "TIU_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TIU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PASSWORD = "violet-harbour-lantern-42"


async def _service(url: str, schema: str | None, redis: str | None) -> DatabaseService:
    settings = Settings(
        database_url=url,
        search_path=schema,
        bcrypt_rounds=4,
        redis_url=redis,
        redis_prefix=f"bench-sessions:{os.getpid()}:",
    )
    service = DatabaseService(settings, hasher=BcryptHasher(rounds=4))
    await service.start()
    return service


async def _fill(service: DatabaseService, sessions: int) -> list[str]:
    tokens: list[str] = []
    users = max(1, sessions // 4)
    async with service.get_repositories() as repos:
        for u in range(users):
            await repos.get_user_repository().create_user(
                email=f"u{u}@example.com", username=f"user{u}", password=PASSWORD
            )
    while len(tokens) < sessions:
        async with service.get_repositories() as repos:
            new = await repos.get_session_repository().create_session(
                f"u{len(tokens) % users}@example.com", PASSWORD
            )
        tokens.append(new.token)
    async with service.get_repositories() as repos:
        for token in tokens[::10]:
            found = await repos.get_session_repository().check_token(token)
            if found.session_id is not None:
                await repos.get_session_repository().revoke(found.session_id)
    return tokens


async def _run(service: DatabaseService, tokens: list[str], checks: int, callers: int) -> float:
    rnd = random.Random(callers)
    picks = [rnd.choice(tokens) for _ in range(checks)]
    per = checks // callers

    async def caller(k: int) -> None:
        async with service.get_repositories() as repos:
            sessions = repos.get_session_repository()
            for token in picks[k * per : (k + 1) * per]:
                await sessions.check_token(token)

    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    return time.perf_counter() - started


async def _backend(name: str, sessions: int, checks: int, runs: int) -> None:
    schema = None
    tmp = None
    if name == "postgresql":
        url = PG_URL
        schema = f"bench_sessions_{os.getpid()}_{secrets.token_hex(2)}"
        admin = create_engine(PG_URL)
        async with admin.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        await admin.dispose()
    else:
        tmp = tempfile.TemporaryDirectory()
        url = f"sqlite+aiosqlite:///{Path(tmp.name) / 'bench.db'}"
    cached = await _service(url, schema, REDIS_URL)
    plain = await _service(url, schema, None)
    try:
        tokens = await _fill(cached, sessions)
        source = None
        async with cached.get_repositories() as repos:
            source = (await repos.get_session_repository().check_token(tokens[-1])).source
        assert source == "redis", source
        for callers in (1, 8):
            times: dict[str, list[float]] = {"redis": [], "sql": []}
            for _ in range(runs):
                times["redis"].append(await _run(cached, tokens, checks, callers))
                times["sql"].append(await _run(plain, tokens, checks, callers))
            rates = {k: checks / sorted(v)[len(v) // 2] for k, v in times.items()}
            print(
                f"| {name} | {callers} | {rates['redis']:,.0f} | {rates['sql']:,.0f} "
                f"| {rates['redis'] / rates['sql']:.2f} |",
                flush=True,
            )
    finally:
        assert cached.session_cache is not None
        await cached.session_cache.clear()
        await cached.aclose()
        await plain.aclose()
        if schema is not None:
            admin = create_engine(PG_URL)
            async with admin.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            await admin.dispose()
        if tmp is not None:
            tmp.cleanup()


async def _main(backends: list[str], sessions: int, checks: int, runs: int) -> None:
    client = Redis.from_url(REDIS_URL)
    await client.ping()
    await client.aclose()
    print(f"check_token, {sessions:,} sessions, {checks:,} checks a run, medians of {runs}")
    print("| backend | callers | redis checks/s | sql checks/s | redis/sql |")
    print("|---|---:|---:|---:|---:|")
    for backend in backends:
        await _backend(backend, sessions, checks, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--checks", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", default="postgresql,sqlite")
    args = parser.parse_args()
    asyncio.run(_main(args.backends.split(","), args.sessions, args.checks, args.runs))


if __name__ == "__main__":
    main()
