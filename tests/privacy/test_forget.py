"""Right to erasure on the immutable log, through the service, on both backends."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, String, func, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import users as user_domain
from domain.base import ERASED
from domain.passwords import BcryptHasher
from domain.permissions import SYSTEM_ACTOR
from eventstore import keyring, verify
from eventstore.schema import events, subject_keys, unique_keys
from projections import replay
from projections.readmodels import ALL_PROJECTORS
from tests.conftest import PASSWORD
from tiu import (
    DatabaseService,
    InvalidCredentials,
    NotFound,
    PermissionDenied,
    Settings,
    SubjectForgotten,
)

ALICE = {
    "email": "alice.private@example.org",
    "username": "alice_priv",
    "display_name": "Alice Wonderfield",
}
ALICE_IP = "203.0.113.77"
ALICE_UA = "AliceAgent/9.1 (erasure test)"
BOB = {"email": "bob.keeps@example.org", "username": "bob_keeps", "display_name": "Bob Staysput"}
BOB_IP = "198.51.100.42"
BOB_UA = "BobAgent/3.3 (erasure test)"

ALICE_NEEDLES = [*ALICE.values(), ALICE_IP, ALICE_UA]
BOB_NEEDLES = [*BOB.values(), BOB_IP, BOB_UA]  # only the first three are plaintext anywhere


async def _text_columns(conn: AsyncConnection) -> dict[str, list[str]]:
    def read(sync: Any) -> dict[str, list[str]]:
        found = {}
        insp = inspect(sync)
        for table in insp.get_table_names():
            found[table] = [
                c["name"] for c in insp.get_columns(table) if isinstance(c["type"], String | JSON)
            ]
        return found

    return await conn.run_sync(read)


async def scan(service, needles: list[str]) -> dict[str, list[str]]:
    """Where each needle occurs (case-insensitively) in any text or JSON column of any
    table: ``{needle: ["table.column", ...]}``."""
    hits: dict[str, list[str]] = {n: [] for n in needles}
    async with service.engine.connect() as conn:
        for table, columns in (await _text_columns(conn)).items():
            for column in columns:
                quoted = conn.dialect.identifier_preparer.quote
                rows = await conn.exec_driver_sql(
                    f"SELECT CAST({quoted(column)} AS TEXT) FROM {quoted(table)}"
                )
                values = [str(v).casefold() for (v,) in rows if v is not None]
                for needle in needles:
                    if any(needle.casefold() in v for v in values):
                        hits[needle].append(f"{table}.{column}")
    return hits


async def populate(service) -> tuple[str, str, str]:
    """An admin, Alice and Bob, each with personal data in several streams."""
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        admin = await repos.users.create_user(
            email="root@example.org", username="root", password=PASSWORD, roles=["admin"]
        )
    ids = {}
    for person, ip, ua in ((ALICE, ALICE_IP, ALICE_UA), (BOB, BOB_IP, BOB_UA)):
        async with service.get_repositories(ip=ip, user_agent=ua) as repos:
            user = await repos.users.create_user(password=PASSWORD, **person)
            await repos.sessions.create_session(person["email"], PASSWORD)
        async with service.get_repositories(user.id, ip=ip, user_agent=ua) as repos:
            await repos.audit.log_action(
                "export", "report", "r1", {"note": f"{person['display_name']} asked"}
            )
            with pytest.raises(PermissionDenied):  # a refusal in their security stream
                await repos.users.deactivate(admin.id)
            project = await repos.projects.create_project("a project")
            await repos.tasks.create_task(project.id, "a task", assignee_id=user.id)
        ids[person["username"]] = user.id
    return admin.id, ids["alice_priv"], ids["bob_keeps"]


async def read_models(service) -> dict[str, list[dict[str, Any]]]:
    rows = {}
    async with service.engine.connect() as conn:
        for projector in ALL_PROJECTORS:
            for table in projector.tables:
                result = await conn.execute(select(table).order_by(*table.primary_key.columns))
                rows[table.name] = [dict(r) for r in result.mappings()]
    return rows


async def count_events(service, event_type: str) -> int:
    async with service.engine.connect() as conn:
        return int(
            await conn.scalar(
                select(func.count()).select_from(events).where(events.c.event_type == event_type)
            )
            or 0
        )


async def test_personal_data_is_stored_encrypted_and_reads_back_in_plaintext(service):
    _admin, alice_id, _bob = await populate(service)
    hits = await scan(service, ALICE_NEEDLES)
    # only the users and sessions read models hold it in plaintext; the log holds
    # ciphertext
    assert {where for found in hits.values() for where in found} <= {
        "users.email",
        "users.email_lower",
        "users.username",
        "users.username_lower",
        "users.display_name",
        "sessions.ip",
        "sessions.user_agent",
    }
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        alice = await repos.users.get_by_id(alice_id)
        assert alice.email == ALICE["email"]
        entries = await repos.audit.get_events(stream_id=f"user-{alice_id}")
    registered = next(e for e in entries if e.event_type == "UserRegistered")
    assert registered.data["email"] == ALICE["email"]
    async with service.engine.connect() as conn:
        data = await conn.scalar(
            select(events.c.data).where(
                events.c.stream_id == f"user-{alice_id}", events.c.version == 1
            )
        )
    assert set(data["email"]) == {"$pd", "ct"}


async def test_forgetting_erases_everything_of_that_user_only(service, clock):
    admin_id, alice_id, bob_id = await populate(service)
    clock.advance(minutes=1)
    async with service.get_repositories(admin_id) as repos:
        assert await repos.users.forget_user(alice_id) is True

    hits = await scan(service, ALICE_NEEDLES + BOB_NEEDLES)
    assert {n: hits[n] for n in ALICE_NEEDLES} == {n: [] for n in ALICE_NEEDLES}
    assert all(hits[n] for n in BOB.values())  # Bob's read model is intact...
    async with service.engine.connect() as conn:
        assert (await verify(conn)).ok
        claims = (
            await conn.execute(
                select(unique_keys.c.key).where(unique_keys.c.stream_id == f"user-{alice_id}")
            )
        ).all()
        assert claims == []
        assert (
            await conn.scalar(
                select(func.count())
                .select_from(subject_keys)
                .where(subject_keys.c.subject_id == alice_id, subject_keys.c.material.is_not(None))
            )
            == 0
        )

    async with service.get_repositories(admin_id) as repos:
        alice = await repos.users.get_by_id(alice_id)
        assert (alice.email, alice.username, alice.display_name) == (ERASED, ERASED, ERASED)
        assert alice.active is False
        bob = await repos.users.get_by_id(bob_id)
        assert bob.email == BOB["email"]
        # ...and his encrypted data in the log still opens
        bobs = await repos.audit.get_events(stream_id=f"user-{bob_id}", newest_first=False)
        assert bobs[0].data["display_name"] == BOB["display_name"]
        bob_login = next(e for e in bobs if e.event_type == "LoginSucceeded").data
        assert (bob_login["ip"], bob_login["user_agent"]) == (BOB_IP, BOB_UA)
        entries = await repos.audit.get_events(stream_id=f"user-{alice_id}", newest_first=False)
        assert [e.event_type for e in entries][-1] == "UserForgotten"
        registered = entries[0].data
        assert registered["email"] == ERASED and registered["user_id"] == alice_id
        login = next(e for e in entries if e.event_type == "LoginSucceeded").data
        assert (login["ip"], login["user_agent"]) == (ERASED, ERASED)
        sessions = await repos.sessions.get_user_sessions(alice_id, active_only=False)
        assert sessions
        assert all(s.revoked_reason == "user_forgotten" for s in sessions)
    # the email and username are free again
    async with service.get_repositories() as repos:
        again = await repos.users.create_user(
            email=ALICE["email"], username=ALICE["username"], password=PASSWORD
        )
        assert again.id != alice_id


async def test_commands_about_a_forgotten_user_fail_and_forgetting_twice_is_harmless(service):
    admin_id, alice_id, _bob = await populate(service)
    async with service.get_repositories(SYSTEM_ACTOR) as repos:  # the system may forget
        assert await repos.users.forget_user(alice_id) is True
    async with service.get_repositories(admin_id) as repos:
        with pytest.raises(SubjectForgotten) as raised:
            await repos.users.assign_role(alice_id, "admin")
        assert "forgotten" in str(raised.value)
        assert isinstance(raised.value, NotFound)
        with pytest.raises(SubjectForgotten):
            await repos.users.change_email(alice_id, "new@example.org")
        with pytest.raises(SubjectForgotten):
            await repos.users.rotate_key(alice_id)
        assert await repos.users.forget_user(alice_id) is False
    async with service.get_repositories() as repos:
        with pytest.raises(InvalidCredentials):
            await repos.users.authenticate(ALICE["email"], PASSWORD)
    assert await count_events(service, "UserForgotten") == 1
    async with service.engine.connect() as conn:
        assert (await verify(conn)).ok


async def test_a_non_admin_cannot_forget_someone_else(service):
    _admin, alice_id, bob_id = await populate(service)
    async with service.get_repositories(bob_id) as repos:
        with pytest.raises(PermissionDenied):
            await repos.users.forget_user(alice_id)
        with pytest.raises(PermissionDenied):
            await repos.users.rotate_key(alice_id)
        assert (await repos.users.get_by_id(alice_id)).email == ALICE["email"]
    assert await count_events(service, "UserForgotten") == 0
    assert all((await scan(service, list(ALICE.values()))).values())


async def test_a_replay_rebuilds_the_same_erased_read_models(service):
    admin_id, alice_id, _bob = await populate(service)
    async with service.get_repositories(admin_id) as repos:
        await repos.users.forget_user(alice_id)
    live = await read_models(service)
    keyring(service.engine).cache.clear()  # decode from the key table, not from memory
    for projector in ALL_PROJECTORS:
        await replay.rebuild(service.store, projector, batch_size=7)
    rebuilt = await read_models(service)
    assert rebuilt == live
    assert not any((await scan(service, ALICE_NEEDLES)).values())


async def test_rotation_gives_new_events_a_new_key_and_old_ones_stay_readable(service):
    admin_id, alice_id, _bob = await populate(service)

    async def key_ids() -> list[str]:
        async with service.engine.connect() as conn:
            rows = await conn.execute(
                select(events.c.data)
                .where(events.c.stream_id == f"user-{alice_id}")
                .order_by(events.c.version)
            )
            return [v["$pd"] for (d,) in rows for v in d.values() if isinstance(v, dict)]

    before = set(await key_ids())
    assert len(before) == 1
    async with service.get_repositories(admin_id) as repos:
        new_key = await repos.users.rotate_key(alice_id)
    async with service.get_repositories(ip=ALICE_IP, user_agent=ALICE_UA) as repos:
        await repos.users.authenticate(ALICE["email"], PASSWORD)  # folds old and new
        await repos.users.authenticate(ALICE["email"], PASSWORD)
    assert set(await key_ids()) == before | {new_key}
    keyring(service.engine).cache.clear()
    async with service.get_repositories(admin_id) as repos:
        entries = await repos.audit.get_events(stream_id=f"user-{alice_id}", newest_first=False)
        assert entries[0].data["email"] == ALICE["email"]
        assert entries[-1].data["ip"] == ALICE_IP
        await repos.users.forget_user(alice_id)
    assert not any((await scan(service, ALICE_NEEDLES)).values())


async def test_another_cache_in_the_process_forgets_at_once(service, engine):
    from eventstore.crypto import SubjectKeys

    admin_id, alice_id, _bob = await populate(service)
    other = SubjectKeys()
    async with engine.connect() as conn:
        record = (
            await conn.execute(
                select(events.c.event_type, events.c.data).where(
                    events.c.stream_id == f"user-{alice_id}", events.c.version == 1
                )
            )
        ).one()
        assert (await other.open(conn, record.event_type, record.data)).data["email"] == (
            ALICE["email"]
        )
    assert len(other.cache) == 1
    async with service.get_repositories(admin_id) as repos:
        await repos.users.forget_user(alice_id)
    assert len(other.cache) == 0
    async with engine.connect() as conn:
        assert (await other.open(conn, record.event_type, record.data)).erased == {
            "email",
            "username",
            "display_name",
            "password_hash",
        }


async def test_security_events_of_an_anonymous_actor_have_no_subject_and_stay_plain(service):
    """Documented limitation: no subject, no key; retention covers these."""
    async with service.get_repositories(ip="192.0.2.200", user_agent="NoOne/1") as repos:
        with pytest.raises(InvalidCredentials):
            await repos.users.authenticate("nobody@example.org", PASSWORD)
    hits = await scan(service, ["192.0.2.200"])
    assert hits["192.0.2.200"] == ["events.data"]


def test_user_forgotten_is_a_plain_event_without_personal_fields():
    assert user_domain.UserForgotten.personal_fields == frozenset()


async def test_a_failed_login_on_a_known_account_is_sealed_for_that_account_and_forgotten(
    service,
):
    admin_id, alice_id, _bob = await populate(service)
    stranger_ip, stranger_ua = "192.0.2.201", "Prober/1.0 (erasure test)"
    async with service.get_repositories(ip=stranger_ip, user_agent=stranger_ua) as repos:
        with pytest.raises(InvalidCredentials):
            await repos.users.authenticate(ALICE["email"], "not-her-password-1")
        with pytest.raises(InvalidCredentials):  # an unknown email: no subject
            await repos.users.authenticate("nobody@example.org", "not-a-password-1")
    async with service.engine.connect() as conn:
        rows = (
            await conn.execute(select(events.c.data).where(events.c.event_type == "LoginRejected"))
        ).all()
    by_user = {row.data["user_id"]: row.data for row in rows}
    assert set(by_user[alice_id]["ip"]) == {"$pd", "ct"}
    assert by_user[alice_id]["subject_id"] == alice_id
    assert by_user[None]["ip"] == stranger_ip  # kept in plaintext, under retention

    async with service.get_repositories(admin_id) as repos:
        entries = await repos.audit.failed(event_types=["LoginRejected"])
        seen = {e.data["user_id"]: e.data for e in entries}
        assert (seen[alice_id]["ip"], seen[alice_id]["user_agent"]) == (stranger_ip, stranger_ua)
        await repos.users.forget_user(alice_id)
        entries = await repos.audit.failed(event_types=["LoginRejected"])
    seen = {e.data["user_id"]: e.data for e in entries}
    assert (seen[alice_id]["ip"], seen[alice_id]["user_agent"]) == (ERASED, ERASED)
    assert seen[None]["ip"] == stranger_ip


@pytest.mark.sqlite
async def test_sqlite_zeroes_what_it_deletes_so_forgotten_rows_do_not_survive_in_the_file(
    sqlite_engine, tmp_path
):
    """secure_delete is set on every connection, whatever the build's default: the file
    keeps no trace of a forgotten person's read-model rows in its free space."""
    path = sqlite_engine.url.database
    async with sqlite_engine.connect() as conn:
        assert await conn.scalar(text("PRAGMA secure_delete")) == 1

    def deleted_marker_survives(connect, marker: bytes) -> bool:
        db = connect()
        db.execute("CREATE TABLE IF NOT EXISTS scratch (x TEXT)")
        db.execute("INSERT INTO scratch VALUES (?)", (marker.decode() * 20,))
        db.commit()
        db.execute("DELETE FROM scratch")
        db.commit()
        db.close()
        return marker in _checkpointed_file(path)

    def unprotected() -> sqlite3.Connection:
        db = sqlite3.connect(path)
        db.execute("PRAGMA secure_delete=OFF")
        return db

    # The control: without secure_delete, deleted content stays in the file.
    assert deleted_marker_survives(unprotected, b"control-marker-4711")

    service = DatabaseService(
        Settings(database_url=str(sqlite_engine.url), bcrypt_rounds=4),
        engine=sqlite_engine,
        hasher=BcryptHasher(rounds=4),
    )
    await service.start(migrate=False)
    try:
        _admin, alice_id, _bob = await populate(service)
        async with service.get_repositories(SYSTEM_ACTOR) as repos:
            assert await repos.users.forget_user(alice_id)
    finally:
        await service.store.aclose()
    await sqlite_engine.dispose()
    stored = _checkpointed_file(path)
    for needle in ALICE.values():
        assert needle.encode() not in stored, needle


def _checkpointed_file(path: str) -> bytes:
    """The database file's bytes once the WAL is written back and emptied."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return Path(path).read_bytes()
