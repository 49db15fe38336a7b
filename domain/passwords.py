"""Password hashing, the password policy and token digests.

This is the only module that touches bcrypt. Passwords are NFC-normalised, so the
same password typed on different systems hashes the same, and lengths are counted in
Unicode code points of that normal form.
"""

from __future__ import annotations

import base64
import hashlib
import unicodedata
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Protocol

import bcrypt

from domain.errors import WeakPassword

if TYPE_CHECKING:
    from domain.base import SecurityPolicy

MIN_IDENTITY_LENGTH = 3  # shorter usernames / email local parts are not checked


class PasswordHasher(Protocol):
    """Hashes and verifies passwords; deciders reach it only through ``ctx.hasher``.

    ``dummy_hash`` is a valid hash at this hasher's cost, verified against when the
    account is unknown so that a login for an unknown email costs the same work.
    """

    def hash(self, password: str) -> str: ...

    def verify(self, password: str, hashed: str) -> bool: ...

    @property
    def dummy_hash(self) -> str: ...


def _prehash(password: str) -> bytes:
    # bcrypt reads at most 72 bytes and silently ignores the rest. Rather than truncate,
    # feed it base64(SHA-256(password)): 44 ASCII bytes, the whole password counts, and
    # base64 cannot contain the NUL byte that would end bcrypt's input early.
    digest = hashlib.sha256(unicodedata.normalize("NFC", password).encode("utf-8")).digest()
    return base64.b64encode(digest)


@cache
def _dummy_hash(rounds: int) -> str:
    return bcrypt.hashpw(b"dummy password for unknown accounts", bcrypt.gensalt(rounds)).decode()


@dataclass(frozen=True)
class BcryptHasher:
    """bcrypt with a SHA-256 pre-hash; ``rounds`` is the cost factor (4..31)."""

    rounds: int = 12

    def __post_init__(self) -> None:
        if not 4 <= self.rounds <= 31:
            raise ValueError(f"bcrypt rounds must be within 4..31, got {self.rounds}")

    def hash(self, password: str) -> str:
        return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(self.rounds)).decode("ascii")

    def verify(self, password: str, hashed: str) -> bool:
        # checkpw compares in constant time; a malformed stored hash is a plain mismatch.
        try:
            return bcrypt.checkpw(_prehash(password), hashed.encode("ascii"))
        except ValueError:
            return False

    @property
    def dummy_hash(self) -> str:
        """A valid hash at this cost, computed once per ``rounds`` value."""
        return _dummy_hash(self.rounds)


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a session or reset token (or a unique key); only this is
    ever stored."""
    # surrogatepass: a lone surrogate (a JSON body can carry "\\ud800") gives a key no
    # stored value has, so a lookup by it finds nothing instead of raising.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@cache
def common_passwords() -> frozenset[str]:
    """The shipped list of commonly breached passwords, case-folded."""
    text = resources.files("domain").joinpath("common_passwords.txt").read_text("utf-8")
    return frozenset(
        line.strip().casefold()
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    )


def check_password_strength(
    password: str, *, username: str | None, email: str | None, policy: SecurityPolicy
) -> None:
    """Raise ``WeakPassword`` listing every way ``password`` breaks the policy.

    Length limits, the common-password list and containing the username or the local
    part of the email; deliberately no composition rules (NIST SP 800-63B).
    """
    normalized = unicodedata.normalize("NFC", password)
    folded = normalized.casefold()
    reasons: list[str] = []
    length = len(normalized)
    if length < policy.password_min_length:
        reasons.append(f"must be at least {policy.password_min_length} characters (has {length})")
    if length > policy.password_max_length:
        reasons.append(f"must be at most {policy.password_max_length} characters (has {length})")
    if folded in common_passwords():
        reasons.append("is a commonly used password")
    if username and len(username) >= MIN_IDENTITY_LENGTH and username.casefold() in folded:
        reasons.append("must not contain the username")
    local_part = email.rpartition("@")[0] if email else ""
    if len(local_part) >= MIN_IDENTITY_LENGTH and local_part.casefold() in folded:
        reasons.append("must not contain the email address")
    if reasons:
        raise WeakPassword(reasons)
