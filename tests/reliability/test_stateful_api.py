"""A hypothesis state machine drives the public API and checks it, after every step,
against a plain in-memory model of the rules (users, logins, projects, members, tasks,
deletes, sessions), on both backends."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from domain.passwords import BcryptHasher
from domain.tasks import TRANSITIONS, TaskStatus
from eventstore import EngineOptions, create_engine
from tests.conftest import PASSWORD, PG_URL, Clock, _empty_schema
from tiu import (
    AccountLocked,
    AlreadyExists,
    DatabaseService,
    IllegalTransition,
    InvalidCredentials,
    NotFound,
    PermissionDenied,
    Settings,
)
from tiu.errors import DomainError

NAMES = ["ann", "ben", "cat", "dan"]
THRESHOLD = 3


@dataclass
class ModelProject:
    owner: str
    public: bool
    members: dict[str, str] = field(default_factory=dict)
    archived: bool = False
    deleted: bool = False

    def readable(self, user: str) -> bool:
        if self.deleted:
            return False
        return self.public or user == self.owner or user in self.members

    def writable(self, user: str) -> bool:
        return user == self.owner or self.members.get(user) in ("editor", "manager")


@dataclass
class ModelTask:
    project: int
    status: str = "todo"
    deleted: bool = False


class ApiMachine(RuleBasedStateMachine):
    """One fresh database per run; ``connect`` is set by the test for its backend."""

    connect: Any = None

    projects = Bundle("projects")
    tasks = Bundle("tasks")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.service: DatabaseService = self.loop.run_until_complete(type(self).connect(self.clock))
        self.ids: dict[str, str] = {}
        self.failures: dict[str, int] = {}
        self.locked: set[str] = set()
        self.model_projects: list[ModelProject] = []
        self.project_ids: list[str] = []
        self.model_tasks: list[ModelTask] = []
        self.task_ids: list[str] = []
        self.tokens: dict[str, str] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.service.aclose())
        self.loop.close()

    async def repos(self, actor: str | None = None):
        return self.service.get_repositories(actor_id=self.ids.get(actor) if actor else None)

    # -- rules -----------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def register(self, name: str) -> None:
        async def go() -> None:
            async with await self.repos() as repos:
                user = await repos.users.create_user(
                    email=f"{name}@example.com", username=name, password=PASSWORD
                )
                self.ids[name] = user.id

        if name in self.ids:
            with pytest.raises(AlreadyExists):
                self.run(go())
        else:
            self.run(go())
            self.failures[name] = 0

    @rule(name=st.sampled_from(NAMES), right=st.booleans())
    def login(self, name: str, right: bool) -> None:
        async def go() -> str:
            async with await self.repos() as repos:
                started = await repos.sessions.create_session(
                    f"{name}@example.com", PASSWORD if right else "wrong-password-00"
                )
                return started.token

        if name not in self.ids:
            with pytest.raises(InvalidCredentials):
                self.run(go())
        elif name in self.locked:
            with pytest.raises(AccountLocked):
                self.run(go())
        elif right:
            self.tokens[name] = self.run(go())
            self.failures[name] = 0
        else:
            with pytest.raises(InvalidCredentials):
                self.run(go())
            self.failures[name] += 1
            if self.failures[name] >= THRESHOLD:
                self.locked.add(name)

    @rule(target=projects, owner=st.sampled_from(NAMES), public=st.booleans())
    def create_project(self, owner: str, public: bool):
        if owner not in self.ids:
            return len(self.project_ids) - 1 if self.project_ids else -1

        async def go() -> str:
            async with await self.repos(owner) as repos:
                project = await repos.projects.create_project(
                    f"P{len(self.project_ids)}", visibility="public" if public else "private"
                )
                return project.id

        self.project_ids.append(self.run(go()))
        self.model_projects.append(ModelProject(owner, public))
        return len(self.project_ids) - 1

    @rule(project=projects, actor=st.sampled_from(NAMES), member=st.sampled_from(NAMES),
          role=st.sampled_from(["viewer", "editor", "manager"]))  # fmt: skip
    def add_member(self, project: int, actor: str, member: str, role: str) -> None:
        if project < 0 or actor not in self.ids or member not in self.ids:
            return
        model = self.model_projects[project]

        async def go() -> None:
            async with await self.repos(actor) as repos:
                await repos.projects.add_member(self.project_ids[project], self.ids[member], role)

        allowed = actor == model.owner or model.members.get(actor) == "manager"
        if (
            not allowed
            or model.archived
            or model.deleted
            or member == model.owner
            or member in model.members
        ):
            with pytest.raises(DomainError):
                self.run(go())
            return
        self.run(go())
        model.members[member] = role

    @rule(project=projects, actor=st.sampled_from(NAMES))
    def archive(self, project: int, actor: str) -> None:
        if project < 0 or actor not in self.ids:
            return
        model = self.model_projects[project]

        async def go() -> None:
            async with await self.repos(actor) as repos:
                await repos.projects.archive_project(self.project_ids[project])

        if not model.deleted and (actor == model.owner or model.members.get(actor) == "manager"):
            self.run(go())
            model.archived = True
        else:
            with pytest.raises(DomainError):
                self.run(go())

    @rule(target=tasks, project=projects, actor=st.sampled_from(NAMES))
    def create_task(self, project: int, actor: str):
        if project < 0 or actor not in self.ids:
            return len(self.task_ids) - 1 if self.task_ids else -1
        model = self.model_projects[project]

        async def go() -> str:
            async with await self.repos(actor) as repos:
                task = await repos.tasks.create_task(self.project_ids[project], "T")
                return task.id

        if model.deleted:
            with pytest.raises(NotFound):
                self.run(go())
        elif not model.writable(actor):
            with pytest.raises(PermissionDenied):
                self.run(go())
        elif model.archived:
            with pytest.raises(DomainError):
                self.run(go())
        else:
            self.task_ids.append(self.run(go()))
            self.model_tasks.append(ModelTask(project))
            return len(self.task_ids) - 1
        return len(self.task_ids) - 1 if self.task_ids else -1

    @rule(task=tasks, to=st.sampled_from([s.value for s in TaskStatus]))
    def change_status(self, task: int, to: str) -> None:
        if task < 0:
            return
        model = self.model_tasks[task]
        project = self.model_projects[model.project]

        async def go() -> None:
            async with await self.repos(project.owner) as repos:
                await repos.tasks.update_task_status(self.task_ids[task], to)

        # The decider's order: the project, the actor's right to write it, its archive
        # state, then the task (a deleted task is as missing as one never created).
        if project.deleted:
            with pytest.raises(NotFound):
                self.run(go())
        elif project.archived:
            with pytest.raises(DomainError):
                self.run(go())
        elif model.deleted:
            with pytest.raises(NotFound):
                self.run(go())
        elif TaskStatus(to) in TRANSITIONS[TaskStatus(model.status)]:
            self.run(go())
            model.status = to
        else:
            with pytest.raises(IllegalTransition):
                self.run(go())

    @rule(task=tasks, actor=st.sampled_from(NAMES))
    def delete_task(self, task: int, actor: str) -> None:
        if task < 0 or actor not in self.ids:
            return
        model = self.model_tasks[task]
        project = self.model_projects[model.project]

        async def go() -> None:
            async with await self.repos(actor) as repos:
                await repos.tasks.delete_task(self.task_ids[task])

        # The decider's order (see change_status): a non-member is refused before the
        # task is looked at, so a deleted task's existence is not given away.
        if project.deleted:
            with pytest.raises(NotFound):
                self.run(go())
        elif not project.writable(actor):
            with pytest.raises(PermissionDenied):
                self.run(go())
        elif project.archived:
            with pytest.raises(DomainError):
                self.run(go())
        elif model.deleted:
            with pytest.raises(NotFound):
                self.run(go())
        else:
            self.run(go())
            model.deleted = True

    @rule(project=projects, actor=st.sampled_from(NAMES))
    def delete_project(self, project: int, actor: str) -> None:
        if project < 0 or actor not in self.ids:
            return
        model = self.model_projects[project]

        async def go() -> None:
            async with await self.repos(actor) as repos:
                await repos.projects.delete_project(self.project_ids[project])

        if model.deleted:
            with pytest.raises(NotFound):
                self.run(go())
        elif actor == model.owner or model.members.get(actor) == "manager":
            self.run(go())
            model.deleted = True
        else:
            with pytest.raises(PermissionDenied):
                self.run(go())

    # -- the model agrees ------------------------------------------------------------

    @invariant()
    def visibility_and_statuses_match_the_model(self) -> None:
        async def check() -> None:
            for name, user_id in self.ids.items():
                async with self.service.get_repositories(actor_id=user_id) as repos:
                    seen = {p.id for p in await repos.projects.search_projects(limit=1000)}
                    tasks = {t.id: t.status for t in await repos.tasks.list_tasks(limit=1000)}
                expected = {
                    pid
                    for pid, model in zip(self.project_ids, self.model_projects, strict=True)
                    if model.readable(name)
                }
                assert seen == expected, name
                expected_tasks = {
                    tid: model.status
                    for tid, model in zip(self.task_ids, self.model_tasks, strict=True)
                    if self.model_projects[model.project].readable(name) and not model.deleted
                }
                assert tasks == expected_tasks, name
            for name, token in self.tokens.items():
                async with self.service.get_repositories() as repos:
                    valid = await repos.sessions.validate_session(token, touch=False)
                assert valid.valid and valid.user.username == name

        self.run(check())


async def _service(engine, clock) -> DatabaseService:
    svc = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4, lockout_threshold=THRESHOLD),
        engine=engine,
        hasher=BcryptHasher(rounds=4),
        clock=clock,
    )
    await svc.start(migrate=False)
    return svc


MACHINE_SETTINGS = settings(
    max_examples=12,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def test_the_api_agrees_with_an_in_memory_model_on_sqlite(sqlite_template: Path, tmp_path: Path):
    counter = iter(range(10_000))

    async def connect(clock):
        path = tmp_path / f"m{next(counter)}.db"
        shutil.copyfile(sqlite_template, path)
        return await _service(create_engine(f"sqlite+aiosqlite:///{path}"), clock)

    machine = type("SQLiteApiMachine", (ApiMachine,), {"connect": staticmethod(connect)})
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)


@pytest.mark.postgres
def test_the_api_agrees_with_an_in_memory_model_on_postgres(pg_schema: str):
    async def connect(clock):
        engine = create_engine(PG_URL, replace(EngineOptions(), search_path=pg_schema))
        await _empty_schema(engine, pg_schema)
        return await _service(engine, clock)

    machine = type("PostgresApiMachine", (ApiMachine,), {"connect": staticmethod(connect)})
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
