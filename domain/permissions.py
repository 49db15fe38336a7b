"""Role-based permissions for the whole system, and per-project member roles.

A user's global ``Role`` set grants ``Permission``s through ``ROLE_PERMISSIONS``.
Inside a project the owner has full control and members act by their ``ProjectRole``;
the access helpers themselves live in ``domain.projects``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final

SYSTEM_ACTOR: Final = "system"
"""Actor id of the service itself (bootstrap, maintenance): holds every permission.
Never let a caller choose it; only trusted code may put it in a context."""


class Role(StrEnum):
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


class Permission(StrEnum):
    USERS_READ = "users:read"
    USERS_MANAGE = "users:manage"
    PROJECTS_CREATE = "projects:create"
    PROJECTS_READ_ALL = "projects:read_all"
    PROJECTS_MANAGE_ALL = "projects:manage_all"
    TASKS_WRITE = "tasks:write"
    SESSIONS_MANAGE = "sessions:manage"
    AUDIT_READ = "audit:read"


ROLE_PERMISSIONS: Final[Mapping[Role, frozenset[Permission]]] = MappingProxyType(
    {
        Role.ADMIN: frozenset(Permission),
        Role.MEMBER: frozenset(
            {Permission.USERS_READ, Permission.PROJECTS_CREATE, Permission.TASKS_WRITE}
        ),
        Role.VIEWER: frozenset({Permission.USERS_READ}),
    }
)


def permissions_for(roles: Iterable[Role | str]) -> frozenset[Permission]:
    """Union of the permissions the given roles grant; unknown role names grant none."""
    if type(roles) is frozenset:  # a user's roles: their permissions found once
        found = _GRANTED.get(roles)
        if found is None:
            found = _grant(roles)
            if len(_GRANTED) < _GRANTS_KEPT:
                _GRANTED[roles] = found
        return found
    return _grant(roles)


#: The permissions of each set of roles met (a user state's ``roles``), at most
#: :data:`_GRANTS_KEPT` of them: every command of a user asks for them, and working
#: them out (the enum's lookups of each role) cost several microseconds.
_GRANTED: dict[frozenset[Role | str], frozenset[Permission]] = {}
_GRANTS_KEPT: Final = 256


def _grant(roles: Iterable[Role | str]) -> frozenset[Permission]:
    granted: set[Permission] = set()
    for role in roles:
        if role in Role.__members__.values():
            granted |= ROLE_PERMISSIONS[Role(role)]
    return frozenset(granted)


class ProjectRole(StrEnum):
    """A member's role inside one project: viewer reads, editor also writes tasks,
    manager also manages members and settings. The owner is implicitly above all."""

    VIEWER = "viewer"
    EDITOR = "editor"
    MANAGER = "manager"
