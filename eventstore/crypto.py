"""Per-subject keys for personal data in events: encrypt on append, shred on erasure.

The store stays generic: callers say which fields of an event's data hold personal
data and whose (the *subject*, any string id); this module encrypts them with the
subject's active key (AES-256-GCM), keeps the keys in ``subject_keys`` outside the
log, caches them, rotates them and destroys them. A stored field becomes::

    {"$pd": "<key_id>", "ct": "<base64 of nonce(12) | ciphertext | tag(16)>"}

The plaintext is ``s`` + the UTF-8 of a string, or ``j`` + the JSON of another value.
The AAD is ``<context>\\x1f<field>`` (the event type and the field name), so a
ciphertext cannot be moved to another field or event type. ``None`` values are stored
as they are (they reveal nothing). A field written for a subject whose keys were
already destroyed is stored as ``{"$pd": null}``: a forgotten subject never gets a
key again.

The hash chain covers what is stored (the ciphertext), so destroying a key never
breaks :func:`eventstore.integrity.verify`. Once a key is destroyed, opening yields
:data:`ERASED` for each of its fields and names them in :attr:`Opened.erased`.

Caching: one :class:`SubjectKeys` per engine (:func:`keyring`), whose LRU holds
recently used keys for ``ttl`` seconds. Destroying keys evicts the subject from every
cache in this process at once (and again after the transaction ends); other
processes see the destruction when their entries expire, so until then they can
still open that subject's data. A transaction that creates, rotates or destroys a
subject's key keeps that subject out of the shared cache until it ends, so a rolled
back transaction never leaves a key behind in memory.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from eventstore.errors import SubjectKeysDestroyed, UndecryptableField
from eventstore.schema import subject_keys
from eventstore.sqlite_driver import OFF_LOOP
from eventstore.translate import translate_errors

MARK: Final = "$pd"
ERASED: Final = "[erased]"
"""What an erased field opens to in :attr:`Opened.data` (callers may map it further)."""

DEFAULT_CACHE_SIZE: Final = 10_000
DEFAULT_TTL: Final = 300.0
_NONCE: Final = 12
_IN_CHUNK: Final = 500
#: Keys a load looks up inline on SQLite; a load of more runs off the loop
#: (``OFF_LOOP``): a seek per key, a page read or more each, grows with the keys an
#: audit page misses (up to :data:`_IN_CHUNK`: ~4 ms of the loop's CPU, and its waits
#: for pages the disk holds, in case 9's ``get_events`` stalls of 15-18 ms).
_INLINE_KEYS: Final = 16
#: The keys of some ids, built once: an audit read of 10,000 rows with a cold cache
#: loads keys once a chunk, and building the IN clause each time was ~0.2 ms of the
#: ~1.1 ms a load took (profiled).
_KEYS: Final = select(
    subject_keys.c.key_id, subject_keys.c.subject_id, subject_keys.c.material
).where(subject_keys.c.key_id.in_(bindparam("key_ids", expanding=True)))
_KEYS_OFF_LOOP: Final = _KEYS.execution_options(**{OFF_LOOP: True})


def may_be_sealed(document: Mapping[str, Any] | str | bytes) -> bool:
    """Whether a stored document may hold an encrypted field (a ``{"$pd": ...}`` value),
    told without parsing JSON text: the store writes ``$`` as itself, so text without
    ``$pd`` and without ``\\u`` escapes holds no such field. A dict is looked at as
    :meth:`SubjectKeys.open_many` looks at it first."""
    if isinstance(document, str):
        return MARK in document or "\\u" in document
    if isinstance(document, bytes):
        return b"$pd" in document or b"\\u" in document
    return dict in map(type, document.values())


class Opened(NamedTuple):
    """An event's data with its personal fields decrypted; ``erased`` names the fields
    whose key is gone (their value in ``data`` is :data:`ERASED`)."""

    data: Mapping[str, Any]
    erased: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _Key:
    key_id: str
    subject_id: str
    aead: AESGCM | None  # None: destroyed


_NOTHING: Final[frozenset[str]] = frozenset()
_FORGOTTEN: Final = "-"  # active-key cache value of a subject whose keys are destroyed


class KeyCache:
    """An LRU of keys by id and of each subject's active key id, entries living ``ttl``
    seconds. Safe to share between tasks of one event loop."""

    def __init__(
        self,
        max_keys: int = DEFAULT_CACHE_SIZE,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_keys = max_keys
        self.ttl = ttl
        self._clock = clock
        self._keys: OrderedDict[str, tuple[float, _Key]] = OrderedDict()
        self._active: OrderedDict[str, tuple[float, str]] = OrderedDict()
        #: Bumped by every eviction: a load that began before one must not be cached.
        self.generation = 0
        #: Subjects whose keys a running transaction changes: never cached meanwhile.
        self._in_flux: dict[str, int] = {}
        _CACHES.add(self)

    def key(self, key_id: str) -> _Key | None:
        entry = self._keys.get(key_id)
        if entry is None:
            return None
        if self._clock() - entry[0] > self.ttl:
            del self._keys[key_id]
            return None
        self._keys.move_to_end(key_id)
        return entry[1]

    def active(self, subject_id: str) -> str | None:
        """The active key id, :data:`_FORGOTTEN`, or None when not cached."""
        entry = self._active.get(subject_id)
        if entry is None:
            return None
        if self._clock() - entry[0] > self.ttl:
            del self._active[subject_id]
            return None
        self._active.move_to_end(subject_id)
        return entry[1]

    def put(self, key: _Key, *, generation: int, active: bool = False) -> None:
        if generation != self.generation or key.subject_id in self._in_flux:
            return
        now = self._clock()
        self._keys[key.key_id] = (now, key)
        self._keys.move_to_end(key.key_id)
        if active:
            self._active[key.subject_id] = (now, key.key_id)
            self._active.move_to_end(key.subject_id)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        while len(self._active) > self.max_keys:
            self._active.popitem(last=False)

    def put_forgotten(self, subject_id: str, *, generation: int) -> None:
        if generation == self.generation and subject_id not in self._in_flux:
            self._active[subject_id] = (self._clock(), _FORGOTTEN)

    def evict(self, subject_id: str) -> None:
        self.generation += 1
        self._active.pop(subject_id, None)
        for key_id in [k for k, (_, key) in self._keys.items() if key.subject_id == subject_id]:
            del self._keys[key_id]

    def hold(self, subject_id: str) -> None:
        self._in_flux[subject_id] = self._in_flux.get(subject_id, 0) + 1
        self.evict(subject_id)

    def release(self, subject_id: str) -> None:
        count = self._in_flux.get(subject_id, 0) - 1
        if count > 0:
            self._in_flux[subject_id] = count
        else:
            self._in_flux.pop(subject_id, None)
        self.evict(subject_id)

    def clear(self) -> None:
        self.generation += 1
        self._keys.clear()
        self._active.clear()

    def __len__(self) -> int:
        return len(self._keys)


_CACHES: weakref.WeakSet[KeyCache] = weakref.WeakSet()
_RINGS: weakref.WeakKeyDictionary[Engine, SubjectKeys] = weakref.WeakKeyDictionary()
_RINGS_LOCK = threading.Lock()


def evict_everywhere(subject_id: str) -> None:
    """Drop ``subject_id``'s keys from every key cache of this process."""
    for cache in list(_CACHES):
        cache.evict(subject_id)


def keyring(bind: AsyncEngine | AsyncConnection) -> SubjectKeys:
    """The key ring (and its cache) of ``bind``'s engine, created on first use: every
    writer and reader of one engine shares one cache."""
    engine = bind.sync_engine
    with _RINGS_LOCK:
        ring = _RINGS.get(engine)
        if ring is None:
            ring = _RINGS[engine] = SubjectKeys()
        return ring


def _insert(conn: AsyncConnection) -> Any:
    return pg_insert if conn.dialect.name == "postgresql" else sqlite_insert


class SubjectKeys:
    """Encrypt, open, rotate and destroy per-subject keys (see the module docstring)."""

    def __init__(self, cache: KeyCache | None = None) -> None:
        self.cache = cache or KeyCache()

    def writer(self, conn: AsyncConnection, now: Callable[[], datetime] | None = None) -> KeyWriter:
        """Key operations for the transaction open on ``conn``; call
        :meth:`KeyWriter.close` when it ends (committed or not)."""
        return KeyWriter(self, conn, now or (lambda: datetime.now(UTC)))

    # -- opening -----------------------------------------------------------------------

    async def open_many(
        self, conn: AsyncConnection, items: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[Opened]:
        """Open each ``(context, data)``; keys missing from the cache are loaded in one
        query. Data without encrypted fields is passed through untouched."""
        opened = [Opened(data, _NOTHING) for _, data in items]
        marked: list[tuple[int, list[tuple[str, Any]]]] = []
        keys: dict[str, _Key | None] = {}  # this call's view: one cache lookup per key
        key_of = self.cache.key
        for index, (_, data) in enumerate(items):
            if not may_be_sealed(data):  # the common case
                continue
            fields = [(k, v) for k, v in data.items() if type(v) is dict and MARK in v]
            if not fields:
                continue
            marked.append((index, fields))
            for _, value in fields:
                key_id = value[MARK]
                if type(key_id) is str and key_id not in keys:
                    keys[key_id] = key_of(key_id)
        if not marked:
            return opened
        wanted = [key_id for key_id, key in keys.items() if key is None]
        if wanted:
            keys.update(await self._load(conn, wanted))
        for index, fields in marked:
            context, data = items[index]
            out = dict(data)
            erased: list[str] = []
            for name, value in fields:
                key_id = value[MARK]
                key = keys.get(key_id) if type(key_id) is str else None
                if key is None or key.aead is None:
                    out[name] = ERASED
                    erased.append(name)
                else:
                    out[name] = _open(key, context, name, value)
            opened[index] = Opened(out, frozenset(erased) if erased else _NOTHING)
        return opened

    async def open(self, conn: AsyncConnection, context: str, data: Mapping[str, Any]) -> Opened:
        return (await self.open_many(conn, [(context, data)]))[0]

    async def _load(self, conn: AsyncConnection, key_ids: Iterable[str]) -> dict[str, _Key]:
        generation = self.cache.generation
        ids = sorted(key_ids)
        found: dict[str, _Key] = {}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            with translate_errors():
                query = _KEYS_OFF_LOOP if len(chunk) > _INLINE_KEYS else _KEYS
                rows = await conn.execute(query, {"key_ids": chunk})
            for row in rows:
                key = _Key(row.key_id, row.subject_id, _aead(row.material))
                found[key.key_id] = key
                self.cache.put(key, generation=generation)
        return found

    # -- maintenance outside a writer -------------------------------------------------

    async def destroy(self, conn: AsyncConnection, subject_id: str, now: datetime) -> int:
        """Destroy every key of ``subject_id`` in the transaction on ``conn``."""
        writer = self.writer(conn, lambda: now)
        try:
            return await writer.destroy(subject_id)
        finally:
            writer.close()

    async def rotate(self, conn: AsyncConnection, subject_id: str, now: datetime) -> str:
        """Give ``subject_id`` a new active key; older keys still open old events."""
        writer = self.writer(conn, lambda: now)
        try:
            return await writer.rotate(subject_id)
        finally:
            writer.close()


class KeyWriter:
    """The key operations of one write transaction: seal fields (creating the subject's
    first key if needed), rotate, destroy. Keys it creates stay out of the shared cache
    until :meth:`close`."""

    def __init__(
        self, ring: SubjectKeys, conn: AsyncConnection, now: Callable[[], datetime]
    ) -> None:
        self.ring = ring
        self.conn = conn
        self._now = now
        self._own: dict[str, _Key | None] = {}  # subject -> active key made here (None: gone)
        self._held: list[str] = []
        self.destroyed: set[str] = set()

    async def seal(
        self,
        subject_id: str | None,
        context: str,
        data: Mapping[str, Any],
        fields: Iterable[str],
    ) -> dict[str, Any]:
        """``data`` with each of ``fields`` (present and not None) encrypted for
        ``subject_id``; unchanged when there is no subject or nothing to encrypt."""
        names = [f for f in fields if data.get(f) is not None]
        if subject_id is None or not names:
            return dict(data)
        key = await self._active(subject_id)
        out = dict(data)
        for name in names:
            if key is None or key.aead is None:
                out[name] = {MARK: None}
                continue
            plain = _plaintext(out[name])
            nonce = os.urandom(_NONCE)
            sealed = key.aead.encrypt(nonce, plain, _aad(context, name))
            out[name] = {MARK: key.key_id, "ct": base64.b64encode(nonce + sealed).decode()}
        return out

    async def _active(self, subject_id: str) -> _Key | None:
        if subject_id in self._own:
            return self._own[subject_id]
        cache = self.ring.cache
        key_id = cache.active(subject_id)
        if key_id == _FORGOTTEN:
            return None
        if key_id is not None:
            key = cache.key(key_id)
            if key is not None:
                return key
        generation = cache.generation
        found = await self._select_active(subject_id)
        if found is not None:
            cache.put(found, generation=generation, active=True)
            return found
        if await self._forgotten(subject_id):
            cache.put_forgotten(subject_id, generation=generation)
            return None
        return await self._create(subject_id, 1)

    async def _select_active(self, subject_id: str) -> _Key | None:
        with translate_errors():
            row = (
                await self.conn.execute(
                    select(subject_keys.c.key_id, subject_keys.c.material).where(
                        subject_keys.c.subject_id == subject_id, subject_keys.c.active.is_(True)
                    )
                )
            ).first()
        if row is None or row.material is None:
            return None
        return _Key(row.key_id, subject_id, _aead(row.material))

    async def _forgotten(self, subject_id: str) -> bool:
        with translate_errors():
            count = await self.conn.scalar(
                select(func.count())
                .select_from(subject_keys)
                .where(
                    subject_keys.c.subject_id == subject_id,
                    subject_keys.c.destroyed_at.is_not(None),
                )
            )
        return bool(count)

    async def _create(self, subject_id: str, version: int) -> _Key:
        self._hold(subject_id)
        material = AESGCM.generate_key(bit_length=256)
        values = {
            "subject_id": subject_id,
            "version": version,
            "key_id": secrets.token_hex(16),
            "material": material,
            "active": True,
            "created_at": self._now(),
            "destroyed_at": None,
        }
        with translate_errors():
            # A concurrent first use of the same subject: keep theirs (READ COMMITTED
            # waits for it, then sees it).
            await self.conn.execute(
                _insert(self.conn)(subject_keys).values(**values).on_conflict_do_nothing()
            )
        key = await self._select_active(subject_id)
        if key is None:
            raise SubjectKeysDestroyed(subject_id)
        self._own[subject_id] = key
        return key

    async def rotate(self, subject_id: str) -> str:
        """A new active key for ``subject_id``; its old keys still open old events."""
        self._hold(subject_id)
        with translate_errors():
            latest = await self.conn.scalar(
                select(func.max(subject_keys.c.version)).where(
                    subject_keys.c.subject_id == subject_id
                )
            )
        if await self._forgotten(subject_id):
            raise SubjectKeysDestroyed(subject_id)
        with translate_errors():
            await self.conn.execute(
                update(subject_keys)
                .where(subject_keys.c.subject_id == subject_id, subject_keys.c.active.is_(True))
                .values(active=False)
            )
        self._own.pop(subject_id, None)
        key = await self._create(subject_id, int(latest or 0) + 1)
        return key.key_id

    async def destroy(self, subject_id: str) -> int:
        """Destroy every key of ``subject_id``; returns how many were destroyed. A
        subject that never had a key gets a tombstone, so it never gets one later."""
        self._hold(subject_id)
        self.destroyed.add(subject_id)
        evict_everywhere(subject_id)
        now = self._now()
        with translate_errors():
            result = await self.conn.execute(
                update(subject_keys)
                .where(
                    subject_keys.c.subject_id == subject_id,
                    subject_keys.c.destroyed_at.is_(None),
                )
                .values(material=None, active=False, destroyed_at=now)
            )
            if not result.rowcount and not await self._forgotten(subject_id):
                await self.conn.execute(
                    _insert(self.conn)(subject_keys)
                    .values(
                        subject_id=subject_id,
                        version=1,
                        key_id=secrets.token_hex(16),
                        material=None,
                        active=False,
                        created_at=now,
                        destroyed_at=now,
                    )
                    .on_conflict_do_nothing()
                )
        self._own[subject_id] = None
        return int(result.rowcount or 0)

    def mark(self) -> tuple[dict[str, _Key | None], set[str]]:
        """The writer's own state, to :meth:`restore` after a rolled-back savepoint."""
        return dict(self._own), set(self.destroyed)

    def restore(self, mark: tuple[dict[str, _Key | None], set[str]]) -> None:
        own, destroyed = mark
        self._own = dict(own)
        self.destroyed = set(destroyed)

    def _hold(self, subject_id: str) -> None:
        if subject_id not in self._held:
            self._held.append(subject_id)
            self.ring.cache.hold(subject_id)

    def close(self) -> None:
        """The transaction ended (either way): let its subjects be cached again, and
        evict destroyed subjects from every cache of the process."""
        for subject_id in self._held:
            self.ring.cache.release(subject_id)
        for subject_id in self.destroyed:
            evict_everywhere(subject_id)
        self._held.clear()
        self._own.clear()


_AADS: dict[tuple[str, str], bytes] = {}
_decode_json = json.JSONDecoder().decode


def _aad(context: str, field: str) -> bytes:
    aad = _AADS.get((context, field))
    if aad is None:
        aad = f"{context}\x1f{field}".encode()
        if len(_AADS) < 10_000:  # event types x personal fields: a small, fixed set
            _AADS[context, field] = aad
    return aad


def _aead(material: bytes | None) -> AESGCM | None:
    return AESGCM(bytes(material)) if material is not None else None


def _open(key: _Key, context: str, field: str, value: Mapping[str, Any]) -> Any:
    assert key.aead is not None
    try:
        blob = binascii.a2b_base64(value["ct"], strict_mode=True)
        plain = key.aead.decrypt(blob[:_NONCE], blob[_NONCE:], _aad(context, field))
    except (KeyError, TypeError, ValueError, binascii.Error, InvalidTag) as error:
        raise UndecryptableField(context, field, key.key_id) from error
    if plain[:1] == b"s":
        return plain[1:].decode()
    return _decode_json(plain[1:].decode())


def _plaintext(value: Any) -> bytes:
    if isinstance(value, str):
        return b"s" + value.encode()
    return b"j" + json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = [
    "ERASED",
    "MARK",
    "KeyCache",
    "KeyWriter",
    "Opened",
    "SubjectKeys",
    "evict_everywhere",
    "keyring",
]
