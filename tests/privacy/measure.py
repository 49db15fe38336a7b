"""Replay speed with and without personal-data encryption (not a test; run on demand).

    .venv/bin/python -m tests.privacy.measure [--users 600] [--rounds 5]

Builds two SQLite logs from the same workload, one with personal fields stored in
plaintext (encryption switched off) and one encrypted, then rebuilds every
projection from position 0 on each and prints the median times: the plaintext log
through the old decode path (no key lookup at all), the encrypted log with a warm key
cache, and with the cache cleared before every rebuild.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from domain.passwords import BcryptHasher
from domain.permissions import SYSTEM_ACTOR
from eventstore import create_engine, keyring
from eventstore.crypto import KeyWriter
from migrations import runner
from projections import projector as projector_mod
from projections import replay
from projections import runner as runner_mod
from projections.readmodels import ALL_PROJECTORS
from tiu import DatabaseService, Settings

PASSWORD = "violet-harbour-lantern-42"


@contextmanager
def plaintext_writes() -> Iterator[None]:
    original = KeyWriter.seal

    async def seal(self: KeyWriter, subject: Any, context: str, data: Any, fields: Any) -> Any:
        return dict(data)

    KeyWriter.seal = seal  # type: ignore[method-assign]
    try:
        yield
    finally:
        KeyWriter.seal = original  # type: ignore[method-assign]


@contextmanager
def old_decode_path() -> Iterator[None]:
    """Decode as before this feature: no scan for encrypted fields, no key lookup."""
    original = runner_mod.decode_records

    async def decode(conn: Any, records: Sequence[Any]) -> list[Any]:
        return [projector_mod.Envelope.from_record(r) for r in records]

    runner_mod.decode_records = decode  # type: ignore[assignment]
    try:
        yield
    finally:
        runner_mod.decode_records = original  # type: ignore[assignment]


async def populate(url: str, users: int) -> int:
    engine = create_engine(url)
    await runner.upgrade(engine)
    service = DatabaseService(
        Settings(database_url=url, bcrypt_rounds=4), engine=engine, hasher=BcryptHasher(rounds=4)
    )
    await service.start(migrate=False)
    try:
        project_id = None
        for i in range(users):
            ip, agent = f"10.0.{i // 250}.{i % 250}", f"Agent/{i} (measure)"
            async with service.get_repositories(ip=ip, user_agent=agent) as repos:
                user = await repos.users.create_user(
                    email=f"user{i}@example.org",
                    username=f"user{i}",
                    password=PASSWORD,
                    display_name=f"User Number {i}",
                )
                for _ in range(2):
                    await repos.users.authenticate(f"user{i}@example.org", PASSWORD)
                await repos.sessions.create_session(f"user{i}@example.org", PASSWORD)
            async with service.get_repositories(user.id) as repos:
                if project_id is None or i % 20 == 0:
                    project_id = (await repos.projects.create_project(f"project {i}")).id
                    owner = user.id
                async with service.get_repositories(owner) as owner_repos:
                    if owner != user.id:
                        await owner_repos.projects.add_member(project_id, user.id)
                for t in range(3):
                    task = await repos.tasks.create_task(project_id, f"task {i}.{t}")
                    await repos.tasks.update_task_status(task.id, "in_progress")
        async with service.get_repositories(SYSTEM_ACTOR) as repos:
            await repos.audit.log_action("measure", "log", None, {"users": users})
        async with engine.connect() as conn:
            return await service.store.head_position(conn)
    finally:
        await service.aclose()


async def time_rebuilds(url: str, rounds: int, *, cold: bool) -> list[tuple[float, float]]:
    engine = create_engine(url)
    service = DatabaseService(Settings(database_url=url), engine=engine)
    times = []
    try:
        for _ in range(rounds):
            if cold:
                keyring(engine).cache.clear()
            started, cpu = time.perf_counter(), time.process_time()
            for projector in ALL_PROJECTORS:
                await replay.rebuild(service.store, projector)
            times.append((time.perf_counter() - started, time.process_time() - cpu))
    finally:
        await service.aclose()
    return times


async def main(users: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain_url = f"sqlite+aiosqlite:///{Path(tmp) / 'plain.db'}"
        sealed_url = f"sqlite+aiosqlite:///{Path(tmp) / 'sealed.db'}"
        with plaintext_writes():
            events = await populate(plain_url, users)
        assert events == await populate(sealed_url, users)
        await time_rebuilds(plain_url, 1, cold=False)  # warm-up
        await time_rebuilds(sealed_url, 1, cold=False)
        results: dict[str, list[tuple[float, float]]] = {}
        variants = [
            ("plaintext log, old decode path", plain_url, False, True),
            ("plaintext log, new decode path", plain_url, False, False),
            ("encrypted log, warm key cache", sealed_url, False, False),
            ("encrypted log, cold key cache", sealed_url, True, False),
        ]
        for r in range(rounds):  # rotate the order so drift and position hit all alike
            for name, url, cold, old in variants[r % 4 :] + variants[: r % 4]:
                with old_decode_path() if old else contextlib.nullcontext():
                    timing = await time_rebuilds(url, 1, cold=cold)
                results.setdefault(name, []).extend(timing)
        results = {name: results[name] for name, *_ in variants}
    baseline = results["plaintext log, old decode path"]
    base_wall = statistics.median(w for w, _ in baseline)
    base_cpu = statistics.median(c for _, c in baseline)
    print(f"{events} events, {users} users, {len(ALL_PROJECTORS)} projectors, {rounds} rounds")
    print(
        f"{'variant (median of rounds)':34} {'wall':>8}  {'vs base':>7}  {'CPU':>8}  {'vs base':>7}"
    )
    for name, values in results.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(
            f"{name:34} {wall:7.3f}s  {100 * (wall / base_wall - 1):+6.1f}%"
            f"  {cpu:7.3f}s  {100 * (cpu / base_cpu - 1):+6.1f}%"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.users, args.rounds))
