"""The function behind ``tiu forget USER``."""

from __future__ import annotations

import pytest

from domain.base import ERASED
from domain.permissions import SYSTEM_ACTOR
from tests.conftest import PASSWORD
from tiu import NotFound
from tiu.privacy import forget


async def test_forget_by_email_then_by_id_again(service):
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        user = await repos.users.create_user(
            email="carol@example.org", username="carol", password=PASSWORD
        )
    report = await forget(service, "Carol@Example.org")
    assert (report.user_id, report.forgotten) == (user.id, True)
    assert "forgot user" in report.describe()
    again = await forget(service, user.id)
    assert again.as_dict() == {"user_id": user.id, "forgotten": False}
    with pytest.raises(NotFound):
        await forget(service, "carol@example.org")  # the email is no longer on record
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        assert (await repos.users.get_by_id(user.id)).email == ERASED
