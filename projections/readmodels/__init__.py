"""The read models and the projectors that alone write them.

Each projector owns its tables (in ``projections.projector.metadata``), writes them
only through the ``Tables`` it is handed, and never reads the log or another
projector's tables, so each can be rebuilt on its own.

=================  ===============================================  =====================
projector          tables                                           from streams
=================  ===============================================  =====================
``users``          ``users``, ``user_roles``, ``user_permissions``  user
``projects``       ``projects``, ``project_members``                project
``tasks``          ``tasks``                                        task
``sessions``       ``sessions``                                     session, user
``project_stats``  ``project_stats``                                project, task
``user_activity``  ``user_activity``                                user, session, task
=================  ===============================================  =====================
"""

from __future__ import annotations

from typing import Final

from projections.projector import Projector
from projections.readmodels.project_stats import ProjectStatsProjector
from projections.readmodels.projects import ProjectsProjector
from projections.readmodels.sessions import SessionsProjector
from projections.readmodels.tasks import TasksProjector
from projections.readmodels.user_activity import UserActivityProjector
from projections.readmodels.users import UsersProjector

ALL_PROJECTORS: Final[tuple[Projector, ...]] = (
    UsersProjector(),
    ProjectsProjector(),
    TasksProjector(),
    SessionsProjector(),
    ProjectStatsProjector(),
    UserActivityProjector(),
)

_BY_NAME: Final = {projector.name: projector for projector in ALL_PROJECTORS}


def by_name(name: str) -> Projector:
    """The projector called ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no projector {name!r}; known: {', '.join(sorted(_BY_NAME))}") from None


__all__ = [
    "ALL_PROJECTORS",
    "ProjectStatsProjector",
    "ProjectsProjector",
    "SessionsProjector",
    "TasksProjector",
    "UserActivityProjector",
    "UsersProjector",
    "by_name",
]
