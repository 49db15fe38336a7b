#!/usr/bin/env python3
"""Check tiu-core's proofs offline: the standard library plus ``cryptography`` (for the
Ed25519 signature), no tiu-core import, no database. An auditor copies this one file.

    python offline_verify.py inclusion PROOF.json --key VERIFIER_KEY
    python offline_verify.py consistency PROOF.json --key VERIFIER_KEY [--old KEPT.note]

``PROOF.json`` is what ``tiu prove POSITION`` (inclusion) or ``tiu prove --since
KEPT.note`` (consistency) prints; the verifier key is what ``tiu checkpoint keygen``
printed (``name+hash+base64``). Exit status 0 means every check passed.

The tree is RFC 9162's (section 2.1): a leaf hash is SHA-256(0x00 || leaf), an interior
node SHA-256(0x01 || left || right). A leaf is the event's chain hash (32 bytes) followed
by its stream category in UTF-8 (the one column the chain hash does not cover); the
leaf's index is the event's position minus one. Checkpoints are C2SP signed notes
(``tlog-checkpoint``): origin, tree size, base64 root hash, then a ``time`` extension line,
signed with Ed25519 as Go's ``sumdb/note`` does.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
_SIG_PREFIX: Final = "\u2014 "
_ED25519: Final = b"\x01"


class ProofError(Exception):
    """A proof, note or signature that does not check out; the message says which part."""


# -- RFC 9162 hashing ---------------------------------------------------------------------


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def event_leaf(event_hash: str, category: str) -> bytes:
    """The leaf of an event: its chain hash's 32 bytes, then its stream category."""
    try:
        raw = bytes.fromhex(event_hash)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ProofError(f"an event hash is 64 hex digits, not {event_hash!r}")
    return raw + category.encode()


def _inner_border(index: int, size: int) -> tuple[int, int]:
    # The proof's first `inner` hashes are siblings below the point where the paths to
    # `index` and to the last leaf part; the rest (`border`) are left siblings above it.
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return inner, border


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root an inclusion proof of ``leaf`` (a leaf hash) at ``index`` implies."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    inner, border = _inner_border(index, size)
    if len(proof) != inner + border:
        raise ProofError(f"an inclusion proof here has {inner + border} hashes, not {len(proof)}")
    _check_lengths(proof)
    node = leaf
    for i, sibling in enumerate(proof[:inner]):
        node = node_hash(sibling, node) if (index >> i) & 1 else node_hash(node, sibling)
    for sibling in proof[inner:]:
        node = node_hash(sibling, node)
    return node


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    if root_from_inclusion(index, size, leaf, proof) != root:
        raise ProofError(f"inclusion proof of leaf {index} does not lead to the root of {size}")


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]
) -> None:
    """Raise unless the tree of ``size2`` (``root2``) extends that of ``size1`` (``root1``)."""
    _check_lengths(proof)
    if size1 < 0 or size2 < size1:
        raise ProofError(f"tree size {size2} cannot extend tree size {size1}")
    if size1 == size2:
        if proof:
            raise ProofError("a proof between equal sizes is empty")
        if root1 != root2:
            raise ProofError(f"two different roots for tree size {size1}")
        return
    if size1 == 0:
        if proof:
            raise ProofError("a proof from the empty tree is empty")
        return
    if not proof:
        raise ProofError("empty consistency proof")
    inner, border = _inner_border(size1 - 1, size2)
    shift = (size1 & -size1).bit_length() - 1  # levels of the largest subtree ending at size1
    inner -= shift
    seed, start = (root1, 0) if size1 == 1 << shift else (proof[0], 1)
    if len(proof) != start + inner + border:
        raise ProofError(
            f"a consistency proof here has {start + inner + border} hashes, not {len(proof)}"
        )
    rest = proof[start:]
    mask = (size1 - 1) >> shift
    old = new = seed
    for i, sibling in enumerate(rest[:inner]):
        if (mask >> i) & 1:
            old = node_hash(sibling, old)
            new = node_hash(sibling, new)
        else:
            new = node_hash(new, sibling)
    for sibling in rest[inner:]:
        old = node_hash(sibling, old)
        new = node_hash(sibling, new)
    if old != root1:
        raise ProofError(f"consistency proof does not lead to the root of size {size1}")
    if new != root2:
        raise ProofError(f"consistency proof does not lead to the root of size {size2}")


def _check_lengths(proof: Sequence[bytes]) -> None:
    for item in proof:
        if len(item) != 32:
            raise ProofError("a proof hash is 32 bytes")


# -- signed notes and checkpoints (C2SP signed-note, tlog-checkpoint) ------------------


@dataclass(frozen=True, slots=True)
class VerifierKey:
    name: str
    key_id: bytes
    public: bytes

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        try:
            name, key_id, encoded = text.strip().split("+", 2)
            public = base64.b64decode(encoded, validate=True)
            wanted = bytes.fromhex(key_id)
        except (ValueError, binascii.Error) as error:
            raise ProofError(f"not a verifier key (name+hash+base64): {error}") from None
        if public[:1] != _ED25519 or len(public) != 33:
            raise ProofError("the verifier key is not an Ed25519 key")
        if key_id_of(name, public[1:]) != wanted:
            raise ProofError("the verifier key's hash does not match its name and key")
        return cls(name, wanted, public[1:])


def key_id_of(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + public).digest()[:4]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    time: datetime | None
    note: str

    @property
    def root_hex(self) -> str:
        return self.root.hex()


def open_note(note: str, key: VerifierKey) -> str:
    """The text of a signed note, once ``key``'s signature on it has been checked."""
    split = note.rfind("\n\n")
    if split < 0:
        raise ProofError("not a signed note: no blank line before the signatures")
    text, signatures = note[: split + 1], note[split + 2 :]
    for line in signatures.splitlines():
        if not line.startswith(_SIG_PREFIX):
            raise ProofError(f"not a signature line: {line!r}")
        name, _, encoded = line[len(_SIG_PREFIX) :].rpartition(" ")
        if name != key.name:
            continue
        try:
            blob = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ProofError("a signature is not base64") from None
        if blob[:4] != key.key_id:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(key.public).verify(blob[4:], text.encode())
        except InvalidSignature:
            raise ProofError(f"the signature of {key.name} does not match the note") from None
        return text
    raise ProofError(f"the note carries no signature by {key.name}")


def parse_checkpoint(note: str, key: VerifierKey) -> Checkpoint:
    """A checkpoint note whose signature by ``key`` checks out."""
    lines = open_note(note, key).split("\n")[:-1]
    if len(lines) < 3:
        raise ProofError("a checkpoint has an origin, a size and a root hash")
    origin, size_text, root_text, *extensions = lines
    if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise ProofError(f"not a tree size: {size_text!r}")
    try:
        root = base64.b64decode(root_text, validate=True)
    except binascii.Error:
        raise ProofError("the root hash is not base64") from None
    if len(root) != 32:
        raise ProofError("the root hash is not 32 bytes")
    when = None
    for line in extensions:
        if line.startswith("time "):
            when = datetime.fromisoformat(line[5:])
    return Checkpoint(origin, int(size_text), root, when, note)


# -- events: the chain hash (eventstore.hashing's rules, restated) ---------------------


def _normalise(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProofError("NaN and infinity are not JSON")
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


def _canonical(value: Any) -> str:
    return json.dumps(_normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def chain_hash_of(event: Mapping[str, Any], prev_hash: str) -> str:
    """An event's chain hash from its fields (as ``tiu prove`` prints them) and the hash
    of the previous event of its stream: SHA-256 of a canonical JSON array."""
    recorded = datetime.fromisoformat(str(event["recorded_at"])).isoformat(timespec="microseconds")
    head = _compact([prev_hash, event["stream_id"], event["version"]])
    middle = _compact([event["event_id"], event["event_type"], event["schema_version"]])
    tail = _compact(
        [
            event["actor_id"],
            event["correlation_id"],
            event["causation_id"],
            event["command_id"],
            recorded,
        ]
    )
    text = (
        f"{head[:-1]},{middle[1:-1]},{_canonical(event['data'])},"
        f"{_canonical(event['metadata'])},{tail[1:]}"
    )
    return hashlib.sha256(text.encode()).hexdigest()


# -- the proofs `tiu prove` prints -----------------------------------------------------


def _hashes(items: Sequence[str]) -> list[bytes]:
    try:
        return [bytes.fromhex(h) for h in items]
    except ValueError:
        raise ProofError("a proof hash is not hex") from None


def check_inclusion(document: Mapping[str, Any], key: VerifierKey) -> Checkpoint:
    """Check a ``tiu prove POSITION`` document: the checkpoint's signature, the event's
    content against its chain hash, and the inclusion proof against the checkpoint."""
    checkpoint = parse_checkpoint(str(document["checkpoint"]), key)
    event = document["event"]
    if chain_hash_of(event, str(document["prev_hash"])) != event["hash"]:
        raise ProofError("the event's content does not match its hash")
    position = int(event["position"])
    leaf = leaf_hash(event_leaf(str(event["hash"]), str(event["category"])))
    verify_inclusion(
        position - 1, checkpoint.size, leaf, _hashes(document["proof"]), checkpoint.root
    )
    return checkpoint


def check_consistency(
    document: Mapping[str, Any], key: VerifierKey, kept: str | None = None
) -> tuple[Checkpoint, Checkpoint]:
    """Check a ``tiu prove --since`` document: both signatures and that the newer
    checkpoint extends the older one. ``kept`` (the auditor's own copy of the older
    note) must then be that note."""
    old = parse_checkpoint(str(document["old"]), key)
    new = parse_checkpoint(str(document["new"]), key)
    if kept is not None and parse_checkpoint(kept, key).root != old.root:
        raise ProofError("the proof starts from another checkpoint than the one kept")
    verify_consistency(old.size, new.size, old.root, new.root, _hashes(document["proof"]))
    return old, new


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check tiu-core proofs offline.")
    parser.add_argument("kind", choices=["inclusion", "consistency"])
    parser.add_argument("proof", help="the JSON `tiu prove` printed ('-': standard input)")
    parser.add_argument("--key", required=True, help="verifier key: name+hash+base64")
    parser.add_argument("--old", help="consistency: the checkpoint note you kept")
    args = parser.parse_args(argv)
    try:
        if args.proof == "-":
            document = json.load(sys.stdin)
        else:
            with open(args.proof, encoding="utf-8") as handle:
                document = json.load(handle)
        key = VerifierKey.parse(args.key)
        if args.kind == "inclusion":
            cp = check_inclusion(document, key)
            print(
                f"ok: position {document['event']['position']} is in {cp.origin} at size {cp.size}"
            )
        else:
            kept = None
            if args.old:
                with open(args.old, encoding="utf-8") as handle:
                    kept = handle.read()
            old, new = check_consistency(document, key, kept)
            print(f"ok: {new.origin} at size {new.size} extends size {old.size}")
    except (ProofError, OSError, ValueError, KeyError, TypeError) as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
