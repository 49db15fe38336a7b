"""An event a projector cannot apply: retried with back-off, then the projector is
parked (the others go on), shown in stats and health, retried or skipped by an
operator with the reason in the log; in a worker, inline and in a replay.

The failing projector is a real one registered by the test: it raises on the
registration of one chosen username."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain.passwords import BcryptHasher
from eventstore.schema import events
from projections import checkpoints, parking, replay
from projections.errors import InvalidSkip, ProjectionFailed, ProjectionParked
from projections.projector import Envelope, Projector, Tables
from projections.readmodels import ALL_PROJECTORS
from projections.runner import Worker
from tests.conftest import PASSWORD, Clock
from tiu import DatabaseService, Settings
from tiu.service import ProjectionMode


class Fussy(Projector):
    """Keeps the usernames it saw, and raises on one of them while ``refuse`` is set."""

    name = "fussy"
    version = 1
    tables = ()
    handles = frozenset({"UserRegistered"})

    def __init__(self, refuse: str) -> None:
        self.refuse: str | None = refuse
        self.seen: dict[str, int | None] = {}
        self.attempts = 0

    async def apply_batch(
        self, conn: AsyncConnection, envelopes: Sequence[Envelope], t: Tables
    ) -> None:
        for envelope in envelopes:
            username = envelope.event.username  # type: ignore[attr-defined]
            if username == self.refuse:
                self.attempts += 1
                raise RuntimeError(f"cannot project {username}")
            self.seen[username] = envelope.position


async def register(service: DatabaseService, who: str) -> str:
    async with service.get_repositories() as repos:
        user = await repos.get_user_repository().create_user(
            email=f"{who}@example.com", username=who, password=PASSWORD
        )
    return user.id


async def position_of(engine: AsyncEngine, event_type: str, nth: int = 0) -> int:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(events.c.position).where(events.c.event_type == event_type).order_by("position")
        )
        return list(rows.scalars())[nth]


async def checkpoint(engine: AsyncEngine, name: str) -> int:
    async with engine.connect() as conn:
        found = await checkpoints.load_active(conn, name)
    assert found is not None
    return found.position


async def eventually(check, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def make_service(engine: AsyncEngine, clock: Clock, fussy: Fussy, mode: str) -> DatabaseService:
    return DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=clock,
        projection_mode=mode,
        projectors=[*ALL_PROJECTORS, fussy],
    )


@pytest.fixture
async def worker_mode(
    engine: AsyncEngine, clock: Clock
) -> AsyncIterator[tuple[DatabaseService, Fussy, Worker]]:
    fussy = Fussy("mallory")
    service = make_service(engine, clock, fussy, ProjectionMode.WORKER)
    await service.start(migrate=False)
    worker = Worker(service.store, service.projectors, poll_interval=0.02, retry_delay=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield service, fussy, worker
    finally:
        stop.set()
        await task
        await service.store.aclose()


async def test_a_worker_parks_the_failing_projector_and_the_others_go_on(
    worker_mode: tuple[DatabaseService, Fussy, Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, fussy, worker = worker_mode
    engine = service.engine
    caplog.set_level(logging.WARNING, logger="projections")
    ada = await register(service, "ada")

    # The command is written; waiting for fussy fails fast, naming it, once the
    # retries (1 + 3, with back-off) are spent: long before the 10 s wait_for timeout.
    started = asyncio.get_running_loop().time()
    with pytest.raises(ProjectionParked) as parked:
        await register(service, "mallory")
    assert asyncio.get_running_loop().time() - started < 8
    bad = await position_of(engine, "UserRegistered", 1)
    assert parked.value.parked == {"fussy": bad}
    assert fussy.attempts == worker.retries + 2  # retries, then the one-by-one pass
    assert any(
        "projector fussy parked at position" in r.getMessage() and r.levelno == logging.ERROR
        for r in caplog.records
    )
    assert sum("retrying" in r.getMessage() for r in caplog.records) == worker.retries

    # The other projectors went on, and commands fussy does not handle still succeed.
    async with service.get_repositories(actor_id=ada) as repos:
        project = await repos.get_project_repository().create_project("Atlas", "maps")
    assert project.name == "Atlas"
    others = [p.name for p in ALL_PROJECTORS]
    head = await position_of(engine, "ProjectCreated")
    for name in others:
        assert await checkpoint(engine, name) >= head
    assert await checkpoint(engine, "fussy") == bad - 1
    with pytest.raises(ProjectionParked, match="fussy at position"):
        await register(service, "bob")

    stats = await service.get_statistics()
    assert stats["parked"] == ["fussy"]
    assert stats["projectors"]["fussy"]["parked"]["position"] == bad
    assert stats["projectors"]["users"]["parked"] is None
    health = await service.health_check()
    assert health["healthy"]
    assert list(health["parked_projectors"]) == ["fussy"]
    assert "cannot project mallory" in health["parked_projectors"]["fussy"]["error"]

    # The operator skips the event with a reason: recorded in the log, and fussy
    # goes on from there, never applying it.
    with pytest.raises(InvalidSkip):
        await parking.skip(service.store, fussy, bad, reason="  ")
    with pytest.raises(InvalidSkip):
        await parking.skip(service.store, fussy, head, reason="not a UserRegistered")
    recorded = await parking.skip(
        service.store, fussy, bad, reason="test data, ticket 42", actor_id="ops-1"
    )
    async with engine.connect() as conn:
        row = (await conn.execute(select(events).where(events.c.position == recorded))).one()
    assert row.event_type == parking.SKIPPED_EVENT
    assert row.actor_id == "ops-1"
    assert row.stream_id == "operations-projection-fussy"
    assert row.data["reason"] == "test data, ticket 42"
    assert row.data["position"] == bad

    async def caught_up() -> bool:
        return await checkpoint(engine, "fussy") >= recorded

    await eventually(caught_up)
    assert sorted(fussy.seen) == ["ada", "bob"]
    await register(service, "cyd")
    assert (await service.get_statistics())["parked"] == []
    with pytest.raises(InvalidSkip, match="already applied"):
        await parking.skip(service.store, fussy, bad, reason="again")


async def test_retry_unparks_and_a_passing_failure_never_parks(
    worker_mode: tuple[DatabaseService, Fussy, Worker],
) -> None:
    service, fussy, _ = worker_mode
    await register(service, "ada")
    with pytest.raises(ProjectionParked):
        await register(service, "mallory")
    assert await parking.retry(service.store, "unknown") is None

    # The fix is deployed (here: the projector stops refusing); retry unparks it.
    fussy.refuse = None
    found = await parking.retry(service.store, "fussy", actor_id="ops-2")
    assert found is not None and found.event_type == "UserRegistered"
    await register(service, "bob")  # waits for fussy: applied mallory, then bob
    assert sorted(fussy.seen) == ["ada", "bob", "mallory"]
    async with service.engine.connect() as conn:
        types = list(
            (
                await conn.execute(
                    select(events.c.event_type).where(
                        events.c.stream_id == parking.stream_id("fussy")
                    )
                )
            ).scalars()
        )
    assert types == [parking.RETRIED_EVENT]

    # A failure that passes before the retries run out parks nothing.
    fussy.refuse = "dora"
    attempts = fussy.attempts
    waiter = asyncio.create_task(register(service, "dora"))
    await eventually(lambda: _true(fussy.attempts > attempts))
    fussy.refuse = None
    await waiter
    assert (await service.get_statistics())["parked"] == []
    assert "dora" in fussy.seen


async def _true(value: bool) -> bool:
    return value


async def test_inline_a_projector_that_raises_refuses_the_command_and_appends_nothing(
    engine: AsyncEngine, clock: Clock
) -> None:
    fussy = Fussy("mallory")
    service = make_service(engine, clock, fussy, ProjectionMode.INLINE)
    await service.start(migrate=False)
    try:
        await register(service, "ada")
        async with engine.connect() as conn:
            before = await conn.scalar(select(events.c.position).order_by(events.c.position.desc()))
        with pytest.raises(ProjectionFailed, match="fussy") as failed:
            await register(service, "mallory")
        assert failed.value.name == "fussy"
        assert failed.value.event_type == "UserRegistered"
        async with engine.connect() as conn:
            after = await conn.scalar(select(events.c.position).order_by(events.c.position.desc()))
        assert after == before
        await register(service, "bob")
        assert sorted(fussy.seen) == ["ada", "bob"]
    finally:
        await service.store.aclose()


async def test_a_replay_stops_at_the_failing_event_and_resumes_past_a_skip(
    engine: AsyncEngine, clock: Clock
) -> None:
    # The log is written by a service without the fussy projector.
    plain = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )
    await plain.start(migrate=False)
    for who in ("ada", "mallory", "bob"):
        await register(plain, who)
    await plain.store.aclose()
    bad = await position_of(engine, "UserRegistered", 1)
    fussy = Fussy("mallory")
    service = make_service(engine, clock, fussy, ProjectionMode.INLINE)
    try:
        with pytest.raises(ProjectionFailed) as failed:
            await replay.rebuild(service.store, fussy, batch_size=100)
        assert (failed.value.first, failed.value.last) == (bad, bad)
        assert list(fussy.seen) == ["ada"]  # applied before the bad one, kept
        async with engine.connect() as conn:
            await checkpoints.ensure(conn, [fussy])
            await conn.commit()
        await parking.skip(service.store, fussy, bad, reason="corrupt import")
        report = await replay.rebuild(service.store, fussy, batch_size=100)
        assert report.resumed_from == bad - 1
        assert sorted(fussy.seen) == ["ada", "bob"]
    finally:
        await service.store.aclose()
