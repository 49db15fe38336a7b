"""Password work runs on threads of its own, at a lower priority than the host's."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from dataclasses import dataclass, field

import pytest

from domain.passwords import BcryptHasher
from domain.permissions import SYSTEM_ACTOR
from eventstore.threads import NICENESS
from tests.conftest import PASSWORD
from tiu import DatabaseService, Settings
from tiu.password_threads import PASSWORD_THREADS


@dataclass
class GatedHasher:
    """bcrypt at cost 4 whose ``verify`` waits for ``gate`` and notes the thread it ran on."""

    gate: threading.Event = field(default_factory=threading.Event)
    threads: list[tuple[str, int]] = field(default_factory=list)
    inner: BcryptHasher = field(default_factory=lambda: BcryptHasher(rounds=4))

    def hash(self, password: str) -> str:
        return self.inner.hash(password)

    def verify(self, password: str, hashed: str) -> bool:
        me = threading.current_thread()
        niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        self.threads.append((me.name, niceness))
        self.gate.wait(10)
        return self.inner.verify(password, hashed)

    @property
    def dummy_hash(self) -> str:
        return self.inner.dummy_hash


@pytest.fixture
async def gated(engine, clock):
    hasher = GatedHasher()
    svc = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=hasher,
        clock=clock,
    )
    await svc.start(migrate=False)
    async with svc.get_repositories() as repos:
        await repos.users.create_user(email="a@example.com", username="ada", password=PASSWORD)
    yield svc, hasher
    hasher.gate.set()
    await svc.store.aclose()


async def login(svc: DatabaseService) -> None:
    async with svc.get_repositories(ip="192.0.2.1") as repos:
        await repos.users.authenticate("a@example.com", PASSWORD)


async def test_password_work_runs_on_its_own_threads_below_the_loop_s_priority(gated):
    svc, hasher = gated
    hasher.gate.set()
    await login(svc)
    ((name, niceness),) = hasher.threads
    assert name.startswith("tiu-password")
    if sys.platform == "linux":  # elsewhere a thread's priority is left as it is
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert niceness == min(19, base + NICENESS)  # 19: the lowest there is


async def test_statements_sent_off_the_loop_do_not_wait_behind_password_work(gated):
    svc, hasher = gated
    logins = [asyncio.ensure_future(login(svc)) for _ in range(8)]  # more than any pool
    while not hasher.threads:  # noqa: ASYNC110  # a hash has begun
        await asyncio.sleep(0.01)
    async with svc.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        # A count runs on a worker thread on SQLite; every hash is still waiting.
        assert await asyncio.wait_for(repos.tasks.count_tasks(), 5) == 0
    hasher.gate.set()
    await asyncio.gather(*logins)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
async def test_password_work_in_a_process_forked_after_password_work_completes():
    """The child of a fork has none of its parent's password threads; its password
    work still runs (on threads of its own) instead of waiting for ever."""
    assert await PASSWORD_THREADS.run(lambda: 1) == 1  # the parent's threads are started
    hasher = BcryptHasher(rounds=4)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new event loop, exit status 0 only if the hash completed
        status = 1
        try:
            os.close(read)

            async def in_child() -> bool:
                hashed = await asyncio.wait_for(PASSWORD_THREADS.run(hasher.hash, PASSWORD), 5)
                return hasher.verify(PASSWORD, hashed)

            status = 0 if asyncio.run(in_child()) else 2
        finally:
            os.write(write, bytes([status]))
            os._exit(status)
    os.close(write)
    try:
        outcome = await asyncio.to_thread(os.read, read, 1)
    finally:
        os.close(read)
        _, wait_status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert outcome == b"\x00"
    assert os.waitstatus_to_exitcode(wait_status) == 0
