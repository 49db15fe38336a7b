"""A seeded scenario of real domain events: users, projects, tasks, status changes.

Events are built as tiu domain events (pydantic models, validated) and appended in
big batches through ``EventStore.transaction()`` (one ``uow.append`` per stream of
the batch), not one command each: the bench measures replay, not the generator.
The same seed gives the same facts, so every system sees them (the same log, but
with ``sealed``, which stores personal fields encrypted per subject as the command
path does: its keys and nonces are random).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from domain import projects, sessions, tasks, users
from domain.base import Event, encode_event, new_id
from eventstore import EventContext, EventStore, NewEvent
from eventstore.crypto import KeyWriter, keyring
from eventstore.records import uuid7_of
from tiu.dispatch import seal_event

START = datetime(2026, 1, 1, tzinfo=UTC)
PASSWORD_HASH = "$2b$04$" + "x" * 53  # shaped like a bcrypt hash; never checked here
NEXT_STATUS = {
    tasks.TaskStatus.TODO: tasks.TaskStatus.IN_PROGRESS,
    tasks.TaskStatus.IN_PROGRESS: tasks.TaskStatus.REVIEW,
    tasks.TaskStatus.REVIEW: tasks.TaskStatus.DONE,
}
PRIORITIES = list(tasks.Priority)


@dataclass(slots=True)
class Generated:
    stream_id: str
    category: str
    version: int
    event: Event
    actor_id: str


class _Task:
    __slots__ = ("project_id", "status", "task_id")

    def __init__(self, task_id: str, project_id: str) -> None:
        self.task_id = task_id
        self.project_id = project_id
        self.status = tasks.TaskStatus.TODO


class Scenario:
    """An endless, deterministic stream of plausible events."""

    def __init__(self, seed: int = 42, *, failed_logins: float = 0.0) -> None:
        """``failed_logins``: the share of events that are failed logins (from a pool
        of 500 IPs) or, one in 20 of them, lockouts; 0 keeps the scenario of cases
        1-7 as it was."""
        self.rng = random.Random(seed)
        self.failed_logins = failed_logins
        self.users: list[str] = []
        self.projects: list[tuple[str, str]] = []  # (project_id, owner_id)
        self.owners: dict[str, str] = {}
        self.members: dict[str, set[str]] = {}
        self.open_tasks: list[_Task] = []
        self.versions: dict[str, int] = {}
        self.count = 0

    def _id(self) -> str:
        """An id laid out as ``domain.new_id`` makes them (UUIDv7): the scenario clock's
        millisecond, then seeded random bits. Random (v4) ids put every new task on a
        random leaf of the read model's key index, which a log of tiu's own ids does
        not do."""
        return uuid7_of(int(self._now().timestamp() * 1000), self.rng.getrandbits(80)).hex

    def _now(self) -> datetime:
        return START + timedelta(seconds=self.count)

    def _emit(self, stream_id: str, category: str, event: Event, actor: str) -> Generated:
        version = self.versions.get(stream_id, 0) + 1
        self.versions[stream_id] = version
        self.count += 1
        return Generated(stream_id, category, version, event, actor)

    def _register(self) -> Generated:
        user_id = self._id()
        self.users.append(user_id)
        n = len(self.users)
        event = users.UserRegistered(
            user_id=user_id,
            email=f"user{n}@example.com",
            username=f"user{n}",
            display_name=f"User {n}",
            password_hash=PASSWORD_HASH,
            roles=("member",),
            at=self._now(),
        )
        return self._emit(users.stream_id(user_id), users.CATEGORY, event, user_id)

    def _project(self) -> Generated:
        owner = self.rng.choice(self.users)
        project_id = self._id()
        self.projects.append((project_id, owner))
        self.owners[project_id] = owner
        self.members[project_id] = {owner}
        event = projects.ProjectCreated(
            project_id=project_id,
            owner_id=owner,
            name=f"Project {len(self.projects)}",
            description="A project made by the bench scenario.",
            visibility=projects.Visibility.PRIVATE,
            at=self._now(),
        )
        return self._emit(projects.stream_id(project_id), projects.CATEGORY, event, owner)

    def _member(self) -> Generated:
        project_id, owner = self.rng.choice(self.projects)
        user_id = self.rng.choice(self.users)
        if user_id in self.members[project_id]:
            return self._task()
        self.members[project_id].add(user_id)
        event = projects.MemberAdded(
            project_id=project_id, user_id=user_id, role="editor", by=owner
        )
        return self._emit(projects.stream_id(project_id), projects.CATEGORY, event, owner)

    def _task(self) -> Generated:
        project_id, owner = self.rng.choice(self.projects)
        task = _Task(self._id(), project_id)
        self.open_tasks.append(task)
        event = tasks.TaskCreated(
            task_id=task.task_id,
            project_id=project_id,
            title=f"Task {self.count}: do the thing",
            description="Steps to reproduce, expected and actual behaviour.",
            priority=self.rng.choice(PRIORITIES),
            due_date=self._now() + timedelta(days=self.rng.randint(1, 60)),
            assignee_id=None,
            created_by=owner,
            at=self._now(),
        )
        return self._emit(tasks.stream_id(task.task_id), tasks.CATEGORY, event, owner)

    def _status(self) -> Generated:
        i = self.rng.randrange(len(self.open_tasks))
        task = self.open_tasks[i]
        new = NEXT_STATUS[task.status]
        actor = self.rng.choice(self.users)
        event = tasks.TaskStatusChanged(
            task_id=task.task_id,
            project_id=task.project_id,
            from_status=task.status,
            to_status=new,
            by=actor,
            at=self._now(),
        )
        task.status = new
        if new is tasks.TaskStatus.DONE:  # swap-remove: done tasks leave the pool
            self.open_tasks[i] = self.open_tasks[-1]
            self.open_tasks.pop()
        return self._emit(tasks.stream_id(task.task_id), tasks.CATEGORY, event, actor)

    def _assign(self) -> Generated:
        task = self.rng.choice(self.open_tasks)
        owner = self.owners[task.project_id]
        event = tasks.TaskAssigned(
            task_id=task.task_id,
            project_id=task.project_id,
            assignee_id=owner,
            by=owner,
        )
        return self._emit(tasks.stream_id(task.task_id), tasks.CATEGORY, event, owner)

    def _session(self) -> Generated:
        user_id = self.rng.choice(self.users)
        session_id = self._id()
        event = sessions.SessionStarted(
            session_id=session_id,
            user_id=user_id,
            token_hash=f"{self.rng.getrandbits(256):064x}",
            started_at=self._now(),
            expires_at=self._now() + timedelta(hours=12),
            ip="203.0.113.7",
            user_agent="bench/1.0",
        )
        return self._emit(sessions.stream_id(session_id), sessions.CATEGORY, event, user_id)

    def _login(self) -> Generated:
        user_id = self.rng.choice(self.users)
        event = users.LoginSucceeded(
            user_id=user_id, at=self._now(), ip="203.0.113.7", user_agent="bench/1.0"
        )
        return self._emit(users.stream_id(user_id), users.CATEGORY, event, user_id)

    def _failed_login(self) -> Generated:
        user_id = self.rng.choice(self.users)
        if self.rng.random() < 0.05:
            event: Event = users.AccountLocked(
                user_id=user_id, until=self._now() + timedelta(minutes=15), failed_attempts=5
            )
        else:
            event = users.LoginFailed(
                user_id=user_id,
                at=self._now(),
                ip=f"198.51.{self.rng.randrange(2)}.{self.rng.randrange(250)}",
                user_agent="bench/1.0",
            )
        return self._emit(users.stream_id(user_id), users.CATEGORY, event, user_id)

    def __iter__(self) -> Iterator[Generated]:
        return self

    def __next__(self) -> Generated:
        if len(self.users) < 20:
            return self._register()
        if len(self.projects) < 5:
            return self._project()
        if len(self.open_tasks) < 50:
            return self._task()
        if self.failed_logins and self.rng.random() < self.failed_logins:
            return self._failed_login()
        r = self.rng.random()
        if r < 0.01:
            return self._register()
        if r < 0.015:
            return self._project()
        if r < 0.02:
            return self._member()
        if r < 0.04:
            return self._session()
        if r < 0.06:
            return self._login()
        if r < 0.10:
            return self._assign()
        if r < 0.40:
            return self._task()
        return self._status()

    def take(self, n: int) -> list[Generated]:
        return [next(self) for _ in range(n)]


def to_new_event(g: Generated) -> NewEvent:
    event_type, schema_version, data = encode_event(g.event)
    return NewEvent(event_type, data, schema_version, {"command": "BenchScenario"})


async def append_batch(
    store: EventStore,
    batch: list[Generated],
    *,
    as_commands: bool = False,
    sealed: bool = False,
) -> None:
    """One transaction: one ``uow.append`` per stream, at the version it must be at.
    ``as_commands``: each append carries a command id (and it as correlation id), as
    the events of a dispatched command do; otherwise those columns stay empty.
    ``sealed``: personal fields are stored encrypted for their subject (a key made for
    each new subject in the transaction), as the command path stores them."""
    by_stream: dict[str, list[Generated]] = {}
    for g in batch:
        by_stream.setdefault(g.stream_id, []).append(g)
    keys: KeyWriter | None = None
    try:
        async with store.transaction() as uow:
            if sealed:
                keys = keyring(store.engine).writer(uow.conn, store.now)
                await uow.begin()  # key rows are written under the write lock, as a command's
            for stream_id, items in by_stream.items():
                first = items[0]
                command_id = new_id() if as_commands else None
                events = (
                    [to_new_event(g) for g in items]
                    if keys is None
                    else [await seal_event(keys, g.event, to_new_event(g)) for g in items]
                )
                uow.append(
                    stream_id,
                    first.category,
                    events,
                    first.version - 1,
                    context=EventContext(
                        actor_id=first.actor_id, command_id=command_id, correlation_id=command_id
                    ),
                )
    finally:
        if keys is not None:
            keys.close()  # after COMMIT or ROLLBACK, as the command path: its keys may be cached


async def fill(
    store: EventStore,
    scenario: Scenario,
    n: int,
    batch: int = 2000,
    *,
    as_commands: bool = False,
    sealed: bool = False,
) -> None:
    """Append the scenario's next ``n`` events to ``store`` (see :func:`append_batch`)."""
    done = 0
    while done < n:
        size = min(batch, n - done)
        await append_batch(store, scenario.take(size), as_commands=as_commands, sealed=sealed)
        done += size


def es_stored_events(app: Any, batch: list[Generated]) -> list[Any]:
    from bench.es import to_es_event  # noqa: PLC0415

    out = []
    for g in batch:
        event_type, _, data = encode_event(g.event)
        stream_uuid = uuid.UUID(hex=g.stream_id.split("-", 1)[1])
        ts = START + timedelta(seconds=g.version)
        out.append(
            app.mapper.to_stored_event(to_es_event(event_type, data, stream_uuid, g.version, ts))
        )
    return out


def es_fill(app: Any, scenario: Scenario, n: int, batch: int = 2000) -> None:
    done = 0
    while done < n:
        size = min(batch, n - done)
        app.recorder.insert_events(es_stored_events(app, scenario.take(size)))
        done += size


def event_mix(items: list[Generated]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for g in items:
        counts[g.event.event_type] = counts.get(g.event.event_type, 0) + 1
    return counts
