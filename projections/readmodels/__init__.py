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

import importlib
import sys
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
    """The projector called ``name``, or a new instance of the projector class that
    ``module:QualName`` names (:func:`importable_name`); ``KeyError`` naming the known
    ones otherwise."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    module, _, qualname = name.partition(":")
    if qualname:
        try:
            found = _attribute(importlib.import_module(module), qualname)
        except (ImportError, AttributeError) as error:
            raise KeyError(f"cannot import projector {name!r}: {error}") from None
        if isinstance(found, type) and issubclass(found, Projector):
            return found()
        raise KeyError(f"{name!r} is not a Projector class")
    raise KeyError(f"no projector {name!r}; known: {', '.join(sorted(_BY_NAME))}")


def importable_name(projector: Projector) -> str | None:
    """``module:QualName`` of ``projector``'s class when a new instance made from that
    name, in another process, is the same projector: the class is importable by its
    qualified name (defined at a module's top level, not in ``__main__`` nor inside a
    function) and the instance holds no attribute of its own. ``None`` otherwise."""
    cls = type(projector)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    if getattr(projector, "__dict__", None):
        return None
    try:
        found = _attribute(sys.modules.get(cls.__module__), cls.__qualname__)
    except AttributeError:
        return None
    return f"{cls.__module__}:{cls.__qualname__}" if found is cls else None


def _attribute(root: object, qualname: str) -> object:
    """``root.a.b`` for ``qualname`` ``"a.b"``; ``AttributeError`` if a part is missing."""
    found = root
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


__all__ = [
    "ALL_PROJECTORS",
    "ProjectStatsProjector",
    "ProjectsProjector",
    "SessionsProjector",
    "TasksProjector",
    "UserActivityProjector",
    "UsersProjector",
    "by_name",
    "importable_name",
]
