"""tiu-core's pure domain: events, commands, deciders and policies.

Imports only the standard library, pydantic and bcrypt; time comes in as
``CommandContext.now``. Importing this package registers every event type. The
aggregate modules (``users``, ``projects``, ``tasks``, ``sessions``, ``security``)
hold their own events, commands and states; ``routing`` tells the dispatcher where a
command goes.
"""

from domain import audit, projects, security, sessions, tasks, users
from domain.base import (
    EMPTY,
    Command,
    CommandContext,
    EntityId,
    Event,
    SecurityPolicy,
    decode_event,
    encode_event,
    new_id,
    register_upcaster,
    registered_event_types,
    registered_upcasters,
)
from domain.errors import (
    AccountInactive,
    AccountLocked,
    AlreadyExists,
    AuthenticationError,
    Conflict,
    DomainError,
    IllegalTransition,
    InvalidCommand,
    InvalidCredentials,
    NotFound,
    PermissionDenied,
    ResetTokenInvalid,
    SessionInvalid,
    SubjectForgotten,
    UnknownEventType,
    WeakPassword,
)
from domain.passwords import BcryptHasher, PasswordHasher, check_password_strength, hash_token
from domain.permissions import (
    ROLE_PERMISSIONS,
    SYSTEM_ACTOR,
    Permission,
    ProjectRole,
    Role,
    permissions_for,
)
from domain.routing import PROJECTS, SESSIONS, TASKS, USERS, Claim, Decider, Route, claims, route

__all__ = [
    "EMPTY",
    "PROJECTS",
    "ROLE_PERMISSIONS",
    "SESSIONS",
    "SYSTEM_ACTOR",
    "TASKS",
    "USERS",
    "AccountInactive",
    "AccountLocked",
    "AlreadyExists",
    "AuthenticationError",
    "BcryptHasher",
    "Claim",
    "Command",
    "CommandContext",
    "Conflict",
    "Decider",
    "DomainError",
    "EntityId",
    "Event",
    "IllegalTransition",
    "InvalidCommand",
    "InvalidCredentials",
    "NotFound",
    "PasswordHasher",
    "Permission",
    "PermissionDenied",
    "ProjectRole",
    "ResetTokenInvalid",
    "Role",
    "Route",
    "SecurityPolicy",
    "SessionInvalid",
    "SubjectForgotten",
    "UnknownEventType",
    "WeakPassword",
    "audit",
    "check_password_strength",
    "claims",
    "decode_event",
    "encode_event",
    "hash_token",
    "new_id",
    "permissions_for",
    "projects",
    "register_upcaster",
    "registered_event_types",
    "registered_upcasters",
    "route",
    "security",
    "sessions",
    "tasks",
    "users",
]
