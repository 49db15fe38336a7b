"""A projection worker in a process of its own, and helpers the runner tests share.

Run as ``python -m tests.projections.worker_process URL [--schema S] [--batch N]``
from the repository root: it builds a :class:`projections.runner.Worker` over every
read model, prints ``ready`` once its checkpoints exist, and projects until SIGTERM
(the crash tests send SIGKILL instead).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from domain import Event, Role, projects, tasks, users
from domain.base import encode_event
from domain.tasks import TRANSITIONS, Priority, TaskStatus
from eventstore import EngineOptions, EventStore, create_engine
from eventstore.records import EventContext, NewEvent
from projections.projector import Projector
from projections.readmodels import ALL_PROJECTORS
from projections.runner import Worker

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


async def read_models(
    engine: AsyncEngine, projectors: Sequence[Projector] = ALL_PROJECTORS
) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every read-model table, all columns, in a stable order."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with engine.connect() as conn:
        for projector in projectors:
            for table in projector.tables:
                rows = (await conn.execute(select(table))).all()
                out[table.name] = sorted((tuple(row) for row in rows), key=repr)
    return out


def workload(n_events: int, seed: int = 0) -> list[tuple[str, str, Event]]:
    """About ``n_events`` valid domain events as ``(stream_id, category, event)``:
    users, projects, tasks (some assigned), status moves along the legal transitions
    and logins, interleaved, with time moving forward."""
    rnd = random.Random(seed)
    out: list[tuple[str, str, Event]] = []
    at = T0
    user_ids: list[str] = []
    project_ids: list[str] = []
    task_state: dict[str, tuple[str, TaskStatus]] = {}

    def add(stream: str, category: str, event: Event) -> None:
        out.append((stream, category, event))

    while len(out) < n_events:
        at += timedelta(seconds=rnd.randint(1, 90))
        roll = rnd.random()
        if not user_ids or roll < 0.05:
            uid = f"u{len(user_ids)}"
            user_ids.append(uid)
            add(
                users.stream_id(uid),
                users.CATEGORY,
                users.UserRegistered(
                    user_id=uid,
                    email=f"{uid}@Example.com",
                    username=uid,
                    display_name=None,
                    password_hash="$2b$04$" + "x" * 53,
                    roles=(Role.MEMBER,),
                    at=at,
                ),
            )
        elif not project_ids or roll < 0.1:
            pid = f"p{len(project_ids)}"
            project_ids.append(pid)
            add(
                projects.stream_id(pid),
                projects.CATEGORY,
                projects.ProjectCreated(
                    project_id=pid,
                    owner_id=rnd.choice(user_ids),
                    name=f"project {pid}",
                    description="",
                    visibility=projects.Visibility.PRIVATE,
                    at=at,
                ),
            )
        elif not task_state or roll < 0.35:
            tid = f"t{len(task_state)}"
            pid = rnd.choice(project_ids)
            task_state[tid] = (pid, TaskStatus.TODO)
            add(
                tasks.stream_id(tid),
                tasks.CATEGORY,
                tasks.TaskCreated(
                    task_id=tid,
                    project_id=pid,
                    title=f"task {tid}",
                    description="",
                    priority=rnd.choice(list(Priority)),
                    due_date=None,
                    assignee_id=rnd.choice([None, *user_ids]),
                    created_by=rnd.choice(user_ids),
                    at=at,
                ),
            )
        elif roll < 0.8:
            tid = rnd.choice(sorted(task_state))
            pid, status = task_state[tid]
            to = rnd.choice(sorted(TRANSITIONS[status]))
            task_state[tid] = (pid, to)
            add(
                tasks.stream_id(tid),
                tasks.CATEGORY,
                tasks.TaskStatusChanged(
                    task_id=tid,
                    project_id=pid,
                    from_status=status,
                    to_status=to,
                    by=rnd.choice(user_ids),
                    at=at,
                ),
            )
        elif roll < 0.9:
            tid = rnd.choice(sorted(task_state))
            add(
                tasks.stream_id(tid),
                tasks.CATEGORY,
                tasks.TaskAssigned(
                    task_id=tid,
                    project_id=task_state[tid][0],
                    assignee_id=rnd.choice(user_ids),
                    by=rnd.choice(user_ids),
                ),
            )
        else:
            uid = rnd.choice(user_ids)
            add(
                users.stream_id(uid),
                users.CATEGORY,
                users.LoginSucceeded(user_id=uid, at=at, ip=None, user_agent=None),
            )
    return out


async def append_events(
    store: EventStore, items: Sequence[tuple[str, str, Event]], *, per_transaction: int = 50
) -> int:
    """Append ``items`` straight to the log, ``per_transaction`` events per commit;
    returns the head position."""
    last = 0
    for start in range(0, len(items), per_transaction):
        async with store.transaction() as uow:
            for stream_id, category, event in items[start : start + per_transaction]:
                event_type, schema_version, data = encode_event(event)
                uow.append(
                    stream_id,
                    category,
                    [NewEvent(event_type, data, schema_version)],
                    "any",
                    context=EventContext(actor_id="system"),
                )
        last = max(r.last_position for r in uow.results)
    return last


async def _main(url: str, schema: str | None, batch: int) -> None:
    engine = create_engine(url, EngineOptions(search_path=schema))
    store = EventStore(engine)
    # Batches of ``batch`` while behind too (a worker reads CATCH_UP_BATCH then): the
    # crash tests kill it mid-run, which batches of 10,000 would leave no time for.
    worker = Worker(
        store, ALL_PROJECTORS, batch_size=batch, catch_up_batch_size=batch, poll_interval=0.05
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await worker._ensure_checkpoints()
    print("ready", flush=True)
    try:
        await worker.run(stop)
    finally:
        await store.aclose()
        await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--schema", default=None)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(_main(args.url, args.schema, args.batch))
