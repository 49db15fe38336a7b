"""Personal data never leaves in plaintext: published sealed (a later ``forget`` makes
that ciphertext unreadable) or withheld; fields stored in plaintext (no subject) are
withheld in both modes."""

from __future__ import annotations

import pytest

from domain.errors import DomainError
from domain.permissions import SYSTEM_ACTOR
from eventstore.crypto import ERASED, MARK, keyring
from projections.publishing import Publisher, PublisherOptions
from projections.publishing.nats import NatsSink
from tests.conftest import PASSWORD
from tests.publishing.support import JetStreamTarget, Received
from tests.publishing.test_publisher import Running
from tiu import DatabaseService

EMAIL = "ada.lovelace@example.com"
IP = "198.51.100.77"
AGENT = "Analytical/1843"


async def scenario(service: DatabaseService) -> str:
    async with service.get_repositories(ip=IP, user_agent=AGENT) as repos:
        user = await repos.get_user_repository().create_user(
            email=EMAIL, username="ada", password=PASSWORD
        )
        with pytest.raises(DomainError):  # an unknown account: nobody to encrypt for
            await repos.get_session_repository().create_session("nobody@example.com", "x" * 14)
    return user.id


async def publish_all(
    service: DatabaseService, target: JetStreamTarget, personal_data: str
) -> list[Received]:
    options = PublisherOptions(
        subject_prefix=target.prefix, personal_data=personal_data, checkpoint_interval=0.05
    )  # type: ignore[arg-type]
    sink = NatsSink(stream=target.stream, subject_prefix=target.prefix)
    running = Running(Publisher(service.store, sink, options))
    await running.caught_up(service.store)
    await running.finish()
    return await target.messages()


def one(received: list[Received], event_type: str) -> Received:
    [message] = [m for m in received if m.body["type"] == event_type]
    return message


@pytest.mark.parametrize("personal_data", ["encrypted", "omit"])
async def test_no_personal_plaintext_is_published(
    service: DatabaseService, jetstream: JetStreamTarget, personal_data: str
) -> None:
    await scenario(service)
    received = await publish_all(service, jetstream, personal_data)
    everything = repr([(m.body, m.headers) for m in received])
    for secret in (EMAIL, "ada.lovelace", IP, AGENT):
        assert secret not in everything
    rejected = one(received, "LoginRejected").body
    assert {"ip", "user_agent"} <= set(rejected["withheld"])
    assert "ip" not in rejected["data"]
    registered = one(received, "UserRegistered").body
    if personal_data == "omit":
        assert {"email", "username"} <= set(registered["withheld"])
        assert "email" not in registered["data"]
    else:
        assert "withheld" not in registered
        assert set(registered["data"]["email"]) == {MARK, "ct"}


async def test_forget_makes_the_published_ciphertext_unreadable(
    service: DatabaseService, jetstream: JetStreamTarget
) -> None:
    user_id = await scenario(service)
    data = one(await publish_all(service, jetstream, "encrypted"), "UserRegistered").body["data"]
    ring = keyring(service.engine)
    async with service.engine.connect() as conn:
        opened = await ring.open(conn, "UserRegistered", data)
    assert opened.data["email"] == EMAIL  # the real ciphertext, readable with the key
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        assert await repos.get_user_repository().forget_user(user_id)
    async with service.engine.connect() as conn:
        opened = await ring.open(conn, "UserRegistered", data)
    assert opened.data["email"] == ERASED
    assert "email" in opened.erased
