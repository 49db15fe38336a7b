"""``tiu forget USER``: erase a person's personal data (see docs/privacy.md).

The command acts as the system actor, like the rest of the CLI: operators have
database access anyway. ``USER`` is a user id or the email they registered with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from domain.errors import NotFound
from domain.permissions import SYSTEM_ACTOR
from tiu.service import DatabaseService
from tiu.settings import Settings


@dataclass(frozen=True, slots=True)
class ForgetReport:
    user_id: str
    forgotten: bool
    """False when the user had already been forgotten (nothing was done)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.forgotten:
            return f"forgot user {self.user_id}: keys destroyed, personal data erased"
        return f"user {self.user_id} was already forgotten; nothing to do"


async def forget(service: DatabaseService, user: str) -> ForgetReport:
    """Forget ``user`` (an id, or an email still on record) as the system actor."""
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        user_id = await repos.users.user_id_for_email(user) if "@" in user else user
        if user_id is None:
            raise NotFound("user", user)
        return ForgetReport(user_id, await repos.users.forget_user(user_id))


async def forget_with_settings(
    settings: Settings, user: str, *, engine: AsyncEngine | None = None
) -> ForgetReport:
    """Open a service on ``settings`` (schema must be migrated), forget, close."""
    service = DatabaseService(settings, engine=engine)
    try:
        await service.start(migrate=False)
        return await forget(service, user)
    finally:
        await service.aclose()
