"""Where each command goes: the stream its events are appended to, and which other
streams' states its decider needs; plus the unique-key claims events imply.

The dispatcher, for a command and its context:

1. ``r = route(command, ctx)``;
2. folds ``r.stream_id`` with ``r.decider`` (snapshot, then events), and each
   ``r.related[name] = (decider, stream_id)`` the same way into ``related[name]``
   (a stream with no events folds to the decider's initial state);
3. calls ``r.decider.decide(command, state, ctx, related)``;
4. appends the events to ``r.stream_id`` at the version it loaded, and for every
   event applies ``claims(event)`` to the unique-key table in the same transaction
   (a taken key refuses the whole command).

On a ``DomainError`` with a non-empty ``record`` it appends ``record`` to
``r.stream_id`` (with its claims), commits and re-raises; on a security-relevant
error it also appends ``security.rejection_event(command, error, ctx)`` to
``security.stream_id(ctx.actor_id)``.

For every event, ``erasures(event)`` names the data subjects it erases: in the same
transaction the dispatcher destroys their keys (so their personal fields in every
event decode as erased), and frees the unique keys and drops the snapshots of the
event's stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from domain import audit, projects, sessions, tasks, users
from domain.base import EMPTY, Command, CommandContext, Event
from domain.permissions import SYSTEM_ACTOR


@dataclass(frozen=True)
class Decider:
    """One aggregate's functions. Bump ``version`` whenever ``evolve`` or the State
    shape changes, so stored snapshots of the old shape are ignored."""

    name: str
    category: str
    version: int
    initial_state: Callable[[], Any]
    evolve: Callable[[Any, Event], Any]
    decide: Callable[[Command, Any, CommandContext, Mapping[str, Any]], list[Event]]


USERS: Final = Decider("users", users.CATEGORY, 2, users.initial_state, users.evolve, users.decide)
PROJECTS: Final = Decider(
    "projects", projects.CATEGORY, 2, projects.initial_state, projects.evolve, projects.decide
)
TASKS: Final = Decider("tasks", tasks.CATEGORY, 2, tasks.initial_state, tasks.evolve, tasks.decide)
SESSIONS: Final = Decider(
    "sessions", sessions.CATEGORY, 1, sessions.initial_state, sessions.evolve, sessions.decide
)
AUDIT: Final = Decider("audit", audit.CATEGORY, 1, audit.initial_state, audit.evolve, audit.decide)
DECIDERS: Final = (USERS, PROJECTS, TASKS, SESSIONS, AUDIT)


@dataclass(frozen=True)
class Route:
    """Where a command's events go and which other states (by name) it is decided
    with."""

    decider: Decider
    stream_id: str
    related: Mapping[str, tuple[Decider, str]] = field(default_factory=lambda: EMPTY)
    #: ``stream_id`` names an id minted for this command (a default the caller left
    #: out, :func:`domain.base.new_id`): no stream holds events yet, unless this
    #: command (or a copy of it) was sent before, which the write's version check finds.
    new: bool = False


@dataclass(frozen=True)
class Claim:
    """Reserve (or, with ``release``, free) ``key`` in ``scope`` ("email", "username")
    for the event's stream. ``key`` is a SHA-256 hex digest, never the plain value."""

    scope: str
    key: str
    release: bool = False


def _user(user_id: str) -> tuple[Decider, str]:
    return USERS, users.stream_id(user_id)


def _with_actor(
    ctx: CommandContext, **related: tuple[Decider, str]
) -> Mapping[str, tuple[Decider, str]]:
    if ctx.actor_id is not None and ctx.actor_id != SYSTEM_ACTOR:
        related["actor"] = _user(ctx.actor_id)
    return MappingProxyType(related)


#: Commands that create their stream, by the field that names it.
_CREATES: Final[Mapping[type[Command], str]] = {
    tasks.CreateTask: "task_id",
    projects.CreateProject: "project_id",
    users.RegisterUser: "user_id",
    sessions.StartSession: "session_id",
}


def route(command: Command, ctx: CommandContext) -> Route:
    """The route of ``command``; a ``TypeError`` for a command no decider handles."""
    target = _route(command, ctx)
    created = _CREATES.get(type(command))
    if created is not None and created not in command.model_fields_set:
        return Route(target.decider, target.stream_id, target.related, new=True)
    return target


def _route(command: Command, ctx: CommandContext) -> Route:
    kind = type(command)
    router = _ROUTERS.get(kind)
    if router is None:
        router = _ROUTERS[kind] = _router_of(kind)
    return router(command, ctx)


def _login(command: Any, ctx: CommandContext) -> Route:
    return Route(USERS, users.stream_id(command.user_id or users.UNKNOWN_USER))


def _to_user(command: Any, ctx: CommandContext) -> Route:
    return Route(USERS, users.stream_id(command.user_id), _with_actor(ctx))


def _add_member(command: Any, ctx: CommandContext) -> Route:
    related = _with_actor(ctx, member=_user(command.user_id))
    return Route(PROJECTS, projects.stream_id(command.project_id), related)


def _to_project(command: Any, ctx: CommandContext) -> Route:
    if isinstance(command, projects.CreateProject) and command.owner_id is not None:
        related = _with_actor(ctx, owner=_user(command.owner_id))
    else:
        related = _with_actor(ctx)
    return Route(PROJECTS, projects.stream_id(command.project_id), related)


def _to_task(command: Any, ctx: CommandContext) -> Route:
    extra = {"project": (PROJECTS, projects.stream_id(command.project_id))}
    assignee = getattr(command, "assignee_id", None)
    if assignee is not None:
        extra["assignee"] = _user(assignee)
    return Route(TASKS, tasks.stream_id(command.task_id), _with_actor(ctx, **extra))


def _to_session(command: Any, ctx: CommandContext) -> Route:
    related = _with_actor(ctx, user=_user(command.user_id))
    return Route(SESSIONS, sessions.stream_id(command.session_id), related)


def _to_audit(command: Any, ctx: CommandContext) -> Route:
    return Route(AUDIT, audit.stream_id(ctx.actor_id or "anonymous"))


def _unrouted(command: Any, ctx: CommandContext) -> Route:
    raise TypeError(f"no route for command {type(command).__name__}")


_Router = Callable[[Any, CommandContext], Route]

#: Each command class (and its subclasses) with its route, the first that matches.
_ROUTES: Final[tuple[tuple[tuple[type[Command], ...], _Router], ...]] = (
    ((users.AttemptLogin,), _login),
    (
        (
            users.RegisterUser,
            users.ChangePassword,
            users.RequestPasswordReset,
            users.CompletePasswordReset,
            users.AssignRole,
            users.RevokeRole,
            users.DeactivateUser,
            users.ReactivateUser,
            users.UnlockUser,
            users.RevokeAllSessions,
            users.ChangeEmail,
            users.ForgetUser,
        ),
        _to_user,
    ),
    ((projects.AddMember,), _add_member),
    (
        (
            projects.CreateProject,
            projects.UpdateProject,
            projects.ChangeVisibility,
            projects.RemoveMember,
            projects.ChangeMemberRole,
            projects.ArchiveProject,
            projects.RestoreProject,
            projects.DeleteProject,
        ),
        _to_project,
    ),
    (
        (
            tasks.CreateTask,
            tasks.EditTask,
            tasks.AssignTask,
            tasks.UnassignTask,
            tasks.ChangeTaskStatus,
            tasks.DeleteTask,
        ),
        _to_task,
    ),
    ((sessions.StartSession, sessions.TouchSession, sessions.RevokeSession), _to_session),
    ((audit.LogAction,), _to_audit),
)

#: The route of each command class met so far, found once per class: a command's
#: class tried against the ~30 classes above cost ~10 us a command (an isinstance
#: each, through pydantic's metaclass).
_ROUTERS: dict[type, _Router] = {}


def _router_of(kind: type) -> _Router:
    for classes, router in _ROUTES:
        if issubclass(kind, classes):
            return router
    return _unrouted


def claims(event: Event) -> list[Claim]:
    """The unique-key claims ``event`` implies (most events imply none)."""
    match event:
        case users.UserRegistered():
            return [
                Claim("email", users.email_claim_key(event.email)),
                Claim("username", users.username_claim_key(event.username)),
            ]
        case users.EmailChanged():
            return [
                Claim("email", users.email_claim_key(event.previous_email), release=True),
                Claim("email", users.email_claim_key(event.email)),
            ]
        case _:
            return []


def erasures(event: Event) -> list[str]:
    """The data subjects whose personal data ``event`` erases (crypto-shredding)."""
    match event:
        case users.UserForgotten():
            return [event.user_id]
        case _:
            return []
