"""eventstore.crypto on its own: sealing, opening, AAD binding, rotation, destruction,
and that every personal field of every event type has an erased value."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from domain.base import ERASED, erased_value, registered_event_types
from eventstore.crypto import MARK, KeyCache, SubjectKeys, keyring, may_be_sealed
from eventstore.errors import SubjectKeysDestroyed, UndecryptableField
from eventstore.hashing import canonical_json
from eventstore.schema import subject_keys

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def test_every_personal_field_of_every_event_type_has_an_erased_value():
    for cls in registered_event_types().values():
        for name in cls.personal_fields:
            value = erased_value(cls, name)
            cls.model_fields[name]  # the field exists
            assert value in (ERASED, None, {"erased": True}, [])


async def _seal(engine, ring, subject, context, data, fields):
    async with engine.begin() as conn:
        writer = ring.writer(conn, lambda: NOW)
        try:
            return await writer.seal(subject, context, data, fields)
        finally:
            writer.close()


async def _open(engine, ring, context, data):
    async with engine.connect() as conn:
        return await ring.open(conn, context, data)


async def test_seal_and_open_round_trip_and_none_stays_plain(engine):
    ring = SubjectKeys()
    data = {"user_id": "u1", "email": "a@example.org", "ip": None, "details": {"x": [1, 2]}}
    sealed = await _seal(engine, ring, "u1", "Ev", data, {"email", "ip", "details"})
    assert sealed["user_id"] == "u1"
    assert sealed["ip"] is None
    assert set(sealed["email"]) == {MARK, "ct"}
    assert "a@example.org" not in str(sealed)
    opened = await _open(engine, ring, "Ev", sealed)
    assert opened.data == data
    assert opened.erased == frozenset()
    # a fresh ring (cold cache) opens it from the table too
    assert (await _open(engine, SubjectKeys(), "Ev", sealed)).data == data


async def test_a_sealed_document_is_told_from_its_stored_text_without_parsing(engine):
    ring = SubjectKeys()
    data = {"user_id": "u1", "email": "a@example.org"}
    sealed = await _seal(engine, ring, "u1", "Ev", data, {"email"})
    assert may_be_sealed(sealed)
    assert may_be_sealed(canonical_json(sealed))
    assert may_be_sealed(canonical_json(sealed).encode())
    assert not may_be_sealed(data)
    assert not may_be_sealed(canonical_json(data))
    assert not may_be_sealed(canonical_json(data).encode())
    # a nested dict without the mark still counts as a candidate (open_many looks closer)
    assert may_be_sealed({"details": {"x": 1}})
    # an escaped key could spell the mark: text with escapes is parsed to be sure
    assert may_be_sealed('{"email":{"\\u0024pd":"k1","ct":"..."}}')


async def test_no_subject_means_plaintext(engine):
    data = {"ip": "198.51.100.1"}
    assert await _seal(engine, SubjectKeys(), None, "Ev", data, {"ip"}) == data


async def test_ciphertext_is_bound_to_event_type_and_field(engine):
    ring = SubjectKeys()
    sealed = await _seal(engine, ring, "u1", "Ev", {"a": "x", "b": "y"}, {"a", "b"})
    with pytest.raises(UndecryptableField):
        await _open(engine, ring, "Ev", {"a": sealed["b"], "b": sealed["a"]})
    with pytest.raises(UndecryptableField):
        await _open(engine, ring, "Other", sealed)
    tampered = dict(sealed["a"], ct=sealed["a"]["ct"][:-4] + "AAAA")
    with pytest.raises(UndecryptableField):
        await _open(engine, ring, "Ev", {"a": tampered})


async def test_rotation_keeps_old_keys_readable_and_destroy_erases_all(engine):
    ring = SubjectKeys()
    old = await _seal(engine, ring, "u1", "Ev", {"a": "old"}, {"a"})
    async with engine.begin() as conn:
        new_key = await ring.rotate(conn, "u1", NOW)
    new = await _seal(engine, ring, "u1", "Ev", {"a": "new"}, {"a"})
    assert new["a"][MARK] == new_key != old["a"][MARK]
    assert (await _open(engine, ring, "Ev", old)).data == {"a": "old"}
    assert (await _open(engine, ring, "Ev", new)).data == {"a": "new"}

    other = SubjectKeys()  # another cache of this process, already holding the keys
    assert (await _open(engine, other, "Ev", old)).data == {"a": "old"}
    async with engine.begin() as conn:
        assert await ring.destroy(conn, "u1", NOW) == 2
    for r in (ring, other, SubjectKeys()):
        for sealed in (old, new):
            opened = await _open(engine, r, "Ev", sealed)
            assert opened.data == {"a": ERASED}
            assert opened.erased == {"a"}
    # a forgotten subject never gets a key again
    later = await _seal(engine, ring, "u1", "Ev", {"a": "later"}, {"a"})
    assert later == {"a": {MARK: None}}
    assert (await _open(engine, ring, "Ev", later)).erased == {"a"}
    async with engine.begin() as conn:
        with pytest.raises(SubjectKeysDestroyed):
            await ring.rotate(conn, "u1", NOW)
    async with engine.connect() as conn:
        rows = (await conn.execute(subject_keys.select())).all()
    assert rows and all(r.material is None and r.destroyed_at is not None for r in rows)


async def test_a_rolled_back_key_is_not_cached(engine):
    ring = SubjectKeys()
    async with engine.connect() as conn:
        await conn.begin()
        writer = ring.writer(conn, lambda: NOW)
        sealed = await writer.seal("u2", "Ev", {"a": "x"}, {"a"})
        await conn.rollback()
        writer.close()
    assert ring.cache.active("u2") is None
    assert (await _open(engine, ring, "Ev", sealed)).erased == {"a"}  # key never existed
    again = await _seal(engine, ring, "u2", "Ev", {"a": "y"}, {"a"})
    assert again["a"][MARK] != sealed["a"][MARK]
    assert (await _open(engine, ring, "Ev", again)).data == {"a": "y"}


def test_cache_is_an_lru_with_a_ttl():
    now = [0.0]
    cache = KeyCache(max_keys=2, ttl=10, clock=lambda: now[0])
    from eventstore.crypto import _Key

    keys = [_Key(f"k{i}", "s", None) for i in range(3)]
    for key in keys:
        cache.put(key, generation=cache.generation)
    assert cache.key("k0") is None and cache.key("k2") is keys[2]
    now[0] = 11
    assert cache.key("k2") is None
    stale = cache.generation
    cache.evict("s")
    cache.put(keys[0], generation=stale)  # a load that raced an eviction is dropped
    assert cache.key("k0") is None


def test_one_keyring_per_engine(engine):
    assert keyring(engine) is keyring(engine)


@pytest.mark.sqlite
async def test_a_load_of_many_keys_runs_off_the_event_loop_on_sqlite(sqlite_engine):
    """An audit page's missing keys are one lookup, a seek (and page reads) per key:
    many of them are looked up on a worker thread, as SQLite's thread runs them."""
    import threading

    ring = SubjectKeys()
    sealed = [
        await _seal(sqlite_engine, ring, f"u{n}", "Ev", {"ip": f"10.0.0.{n}"}, {"ip"})
        for n in range(40)
    ]
    ran_on: list[int] = []
    async with sqlite_engine.connect() as conn:
        db = (await conn.get_raw_connection()).driver_connection
        db.set_trace_callback(
            lambda sql: ran_on.append(threading.get_ident()) if "subject_keys" in sql else None
        )
        try:
            opened = await SubjectKeys().open_many(conn, [("Ev", data) for data in sealed])
        finally:
            db.set_trace_callback(None)
    assert [o.data["ip"] for o in opened] == [f"10.0.0.{n}" for n in range(40)]
    assert ran_on
    assert threading.get_ident() not in ran_on
