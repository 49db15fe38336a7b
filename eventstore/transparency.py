"""Signed checkpoints of the log's Merkle tree, and the proofs an auditor checks.

A checkpoint is a C2SP signed note (``tlog-checkpoint``): origin (the key's name), tree
size, base64 root hash and a ``time`` line, signed with an Ed25519 key that lives
outside the database (a file or an environment variable, see ``tiu.Settings``). Keys
use Go's ``sumdb/note`` text forms: ``PRIVATE+KEY+name+hash+base64`` for the signer and
``name+hash+base64`` for verifiers. :mod:`eventstore.offline_verify` checks everything
this module produces without tiu-core or the database.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from eventstore import merkle
from eventstore.engine import begin_write
from eventstore.errors import EventStoreError
from eventstore.hashing import GENESIS
from eventstore.offline_verify import (
    Checkpoint,
    ProofError,
    VerifierKey,
    key_id_of,
    parse_checkpoint,
)
from eventstore.retention import RetentionError, read_archive, row_to_json
from eventstore.schema import checkpoints, events

log = logging.getLogger("eventstore.transparency")
_ED25519 = b"\x01"


class TransparencyError(EventStoreError):
    """No signing key, a malformed key or checkpoint, or nothing to prove."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    name: str
    private: Ed25519PrivateKey

    @classmethod
    def parse(cls, text: str) -> SigningKey:
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise TransparencyError("not a signing key (PRIVATE+KEY+name+hash+base64)")
        _, _, name, key_id, encoded = parts
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise TransparencyError("the signing key is not base64") from None
        if raw[:1] != b"\x01" or len(raw) != 33:
            raise TransparencyError("the signing key is not an Ed25519 key")
        key = cls(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if key_id_of(name, key.public_bytes()).hex() != key_id:
            raise TransparencyError("the signing key's hash does not match its name and key")
        return key

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        if not name or "+" in name or any(c.isspace() for c in name):
            raise TransparencyError("a key name is not empty and has no '+' or spaces")
        return cls(name, Ed25519PrivateKey.generate())

    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def encoded(self) -> str:
        seed = base64.b64encode(_ED25519 + self.private.private_bytes_raw()).decode()
        key_id = key_id_of(self.name, self.public_bytes()).hex()
        return f"PRIVATE+KEY+{self.name}+{key_id}+{seed}"

    def verifier(self) -> str:
        public = base64.b64encode(_ED25519 + self.public_bytes()).decode()
        return f"{self.name}+{key_id_of(self.name, self.public_bytes()).hex()}+{public}"

    def verifier_key(self) -> VerifierKey:
        return VerifierKey.parse(self.verifier())

    def sign(self, text: str) -> str:
        """``text`` (ending in a newline) as a signed note."""
        blob = key_id_of(self.name, self.public_bytes()) + self.private.sign(text.encode())
        return f"{text}\n\u2014 {self.name} {base64.b64encode(blob).decode()}\n"


def checkpoint_text(origin: str, size: int, root: bytes, when: datetime) -> str:
    stamp = when.astimezone(UTC).isoformat(timespec="seconds")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\ntime {stamp}\n"


def read_checkpoint(note: str, key: VerifierKey) -> Checkpoint:
    """A kept checkpoint note, once its signature by ``key`` checks out."""
    try:
        return parse_checkpoint(note, key)
    except ProofError as error:
        raise TransparencyError(f"checkpoint refused: {error}") from None


async def extend_tree(engine: AsyncEngine) -> merkle.TreeState:
    """Bring the stored tree up to the log's head, in a write transaction of its own."""
    async with engine.connect() as conn:
        await begin_write(conn)
        state = await merkle.extend(conn)
        await conn.commit()
    return state


async def write_checkpoint(engine: AsyncEngine, key: SigningKey) -> Checkpoint:
    """Extend the tree to the head, sign a checkpoint of it and keep a copy."""
    async with engine.connect() as conn:
        await begin_write(conn)
        state = await merkle.extend(conn)
        now = datetime.now(UTC)
        note = key.sign(checkpoint_text(key.name, state.size, state.root, now))
        await conn.execute(
            checkpoints.insert().values(
                tree_size=state.size, signed_at=now, root=state.root.hex(), note=note
            )
        )
        await conn.commit()
    return parse_checkpoint(note, key.verifier_key())


async def latest_note(conn: AsyncConnection) -> str | None:
    return await conn.scalar(
        select(checkpoints.c.note)
        .order_by(checkpoints.c.signed_at.desc(), checkpoints.c.tree_size.desc())
        .limit(1)
    )


async def status(conn: AsyncConnection) -> dict[str, Any]:
    """How far the tree and the newest checkpoint are behind the log's head."""
    head = int(await conn.scalar(select(func.coalesce(func.max(events.c.position), 0))) or 0)
    state = await merkle.load_state(conn)
    row = (
        await conn.execute(
            select(checkpoints.c.tree_size, checkpoints.c.signed_at)
            .order_by(checkpoints.c.signed_at.desc(), checkpoints.c.tree_size.desc())
            .limit(1)
        )
    ).one_or_none()
    return {
        "tree_size": state.size,
        "tree_lag": head - state.size,
        "tree_updated_at": state.updated_at,
        "checkpoint_size": int(row.tree_size) if row else None,
        "checkpoint_at": row.signed_at if row else None,
        "checkpoint_lag": head - int(row.tree_size) if row else head,
    }


async def prove_inclusion(
    engine: AsyncEngine, position: int, checkpoint: Checkpoint, *, archive: Path | None = None
) -> dict[str, Any]:
    """An inclusion proof of the event at ``position`` against ``checkpoint``, with the
    event itself and the previous hash of its stream, so its content can be rechecked.
    An archived event is read from ``archive`` (its leaf stayed in the tree)."""
    if not 1 <= position <= checkpoint.size:
        raise TransparencyError(
            f"position {position} is not covered by the checkpoint (size {checkpoint.size})"
        )
    async with engine.connect() as conn:
        state = await merkle.load_state(conn)
        if state.size < checkpoint.size:
            raise TransparencyError("the stored tree is behind the checkpoint (tampered?)")
        if await merkle.stored_leaf_run(conn, position - 1, 1) == merkle.PLACEHOLDER_LEAF:
            raise TransparencyError(
                f"position {position} was archived before the Merkle tree existed: the "
                "tree holds a placeholder leaf there, not the event's, so the event cannot "
                "be proven on its own (its archive file and the retention record vouch for it)"
            )
        row = (await conn.execute(select(events).where(events.c.position == position))).mappings()
        found = row.one_or_none()
        if found is not None:
            event = row_to_json(dict(found))
        elif archive is not None:
            event, prev = await asyncio.to_thread(_from_archive, archive, position)
        else:
            raise TransparencyError(
                f"no event at position {position}; if it was archived, pass its archive file"
            )
        if found is not None or prev is None:
            prev = GENESIS
            if event["version"] > 1:
                prev = (
                    await conn.scalar(
                        select(events.c.hash).where(
                            events.c.stream_id == event["stream_id"],
                            events.c.version == event["version"] - 1,
                        )
                    )
                ) or GENESIS
        proof = await merkle.inclusion_proof(conn, position - 1, checkpoint.size)
    event["category"] = event.pop("stream_category")
    return {
        "checkpoint": checkpoint.note,
        "event": event,
        "prev_hash": prev,
        "proof": [h.hex() for h in proof],
    }


def _from_archive(path: Path, position: int) -> tuple[dict[str, Any], str | None]:
    """The archived event at ``position`` and, if the archive has it, its stream's
    previous hash."""
    rows: dict[tuple[str, int], str] = {}
    wanted = None
    try:
        for row in read_archive(path):
            rows[(row["stream_id"], row["version"])] = row["hash"]
            if row["position"] == position:
                wanted = row
    except RetentionError as error:
        raise TransparencyError(str(error)) from None
    if wanted is None:
        raise TransparencyError(f"position {position} is in neither the log nor {path}")
    wanted["recorded_at"] = wanted["recorded_at"].isoformat(timespec="microseconds")
    before = (wanted["stream_id"], wanted["version"] - 1)
    prev = GENESIS if wanted["version"] == 1 else rows.get(before)
    return wanted, prev


async def prove_consistency(
    engine: AsyncEngine, old: Checkpoint, new: Checkpoint
) -> dict[str, Any]:
    """A consistency proof that checkpoint ``new`` extends checkpoint ``old``."""
    if new.size < old.size:
        raise TransparencyError("the newer checkpoint is smaller than the kept one")
    async with engine.connect() as conn:
        proof = await merkle.consistency_proof(conn, old.size, new.size)
    return {"old": old.note, "new": new.note, "proof": [h.hex() for h in proof]}


async def keep_up(
    engine: AsyncEngine,
    key: SigningKey | None,
    stop: asyncio.Event,
    *,
    every: int,
    interval: float,
) -> None:
    """The worker's step: once the log has grown by ``every`` events, or ``interval``
    seconds after the last round if it grew at all, extend the tree, and sign a
    checkpoint when there is a key. Runs until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    while not stop.is_set():
        async with engine.connect() as conn:
            st = await status(conn)
        lag = st["checkpoint_lag"] if key is not None else st["tree_lag"]
        if lag >= every or (lag > 0 and loop.time() - last >= interval):
            if key is not None:
                cp = await write_checkpoint(engine, key)
                log.info("checkpoint at size %d", cp.size)
            else:
                await extend_tree(engine)
            last = loop.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(interval, 1.0))


__all__ = [
    "SigningKey",
    "TransparencyError",
    "checkpoint_text",
    "extend_tree",
    "keep_up",
    "latest_note",
    "prove_consistency",
    "prove_inclusion",
    "read_checkpoint",
    "status",
    "write_checkpoint",
]
