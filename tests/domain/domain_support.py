"""Fixtures-as-functions for the domain tests: a fast deterministic hasher, contexts,
deciding with password work done, and the usual histories."""

import hashlib
import hmac
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import reduce
from typing import Any

from domain import Command, CommandContext, Event, Role, SecurityPolicy, projects, users
from domain.passwords import with_password_work
from domain.permissions import ProjectRole
from domain.routing import Decider

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"
TOKEN = "tok_" + "x" * 40


@dataclass
class FakeHasher:
    """Deterministic and fast; records every verify call."""

    verified: list[tuple[str, str]] = field(default_factory=list)
    dummy_hash: str = "fake$dummy"

    def hash(self, password: str) -> str:
        return "fake$" + hashlib.sha256(password.encode()).hexdigest()

    def verify(self, password: str, hashed: str) -> bool:
        self.verified.append((password, hashed))
        return hmac.compare_digest(self.hash(password), hashed)


FAKE = FakeHasher()


def ctx(
    actor: str | None = None,
    *,
    at: datetime = T0,
    policy: SecurityPolicy | None = None,
) -> CommandContext:
    return CommandContext(
        now=at,
        actor_id=actor,
        ip="203.0.113.7",
        user_agent="pytest",
        policy=policy or SecurityPolicy(),
    )


def decide(
    decider: Decider,
    command: Command,
    state: Any,
    context: CommandContext,
    related: Any,
    hasher: Any = FAKE,
) -> list[Event]:
    """``decider.decide`` with the password work it asks for done by ``hasher``, as the
    dispatcher does it (off the loop there)."""
    return with_password_work(
        lambda outcomes: decider.decide(
            command, state, replace(context, passwords=outcomes), related
        ),
        command,
        hasher,
    )


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def registered(
    user_id: str = "alice",
    *,
    roles: tuple[Role, ...] = (Role.MEMBER,),
    password: str = PASSWORD,
    email: str | None = None,
) -> users.UserRegistered:
    return users.UserRegistered(
        user_id=user_id,
        email=email or f"{user_id}@example.org",
        username=user_id,
        display_name=user_id.title(),
        password_hash=FAKE.hash(password),
        roles=roles,
        at=T0 - timedelta(days=30),
    )


def fold(decider: Decider, *events: Event) -> Any:
    return reduce(decider.evolve, events, decider.initial_state())


def user_state(user_id: str = "alice", *more: Event, **kwargs: Any) -> users.State:
    state: users.State = fold_users(registered(user_id, **kwargs), *more)
    return state


def fold_users(*events: Event) -> users.State:
    return reduce(users.evolve, events, users.initial_state())


def actor(user_id: str, *more: Event, **kwargs: Any) -> dict[str, Any]:
    """``related`` holding ``user_id`` as the acting user."""
    return {"actor": user_state(user_id, *more, **kwargs)}


ADMIN_ID = "root"


def admin() -> dict[str, Any]:
    return actor(ADMIN_ID, roles=(Role.ADMIN,))


def project_created(
    project_id: str = "p1",
    owner_id: str = "owen",
    visibility: projects.Visibility = projects.Visibility.PRIVATE,
) -> projects.ProjectCreated:
    return projects.ProjectCreated(
        project_id=project_id,
        owner_id=owner_id,
        name="Apollo",
        description="",
        visibility=visibility,
        at=T0 - timedelta(days=1),
    )


def member_added(user_id: str, role: ProjectRole, project_id: str = "p1") -> projects.MemberAdded:
    return projects.MemberAdded(project_id=project_id, user_id=user_id, role=role, by="owen")


def project_state(*events: Event) -> projects.State:
    return reduce(projects.evolve, (project_created(), *events), projects.initial_state())
