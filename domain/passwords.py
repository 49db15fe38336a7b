"""Password hashing, the password policy and token digests.

This is the only module that touches bcrypt. Passwords are NFC-normalised, so the
same password typed on different systems hashes the same, and lengths are counted in
Unicode code points of that normal form.
"""

from __future__ import annotations

import base64
import hashlib
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import bcrypt

from domain.errors import WeakPassword

if TYPE_CHECKING:
    from domain.base import SecurityPolicy

MIN_IDENTITY_LENGTH = 3  # shorter usernames / email local parts are not checked


class PasswordHasher(Protocol):
    """Hashes and verifies passwords. Deciders never call it: the dispatcher runs the
    work a decision asks for (:class:`PasswordWorkNeeded`) on a worker thread and
    hands the outcomes in as ``ctx.passwords``.

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


# --- password work: computed before a decision, handed to it as data -------------------


@dataclass(frozen=True, slots=True)
class Verify:
    """Check the command's password field ``field`` against ``hashed``; ``None`` stands
    for the hasher's dummy hash (an unknown account costs the same work)."""

    field: str
    hashed: str | None


@dataclass(frozen=True, slots=True)
class NewHash:
    """Hash the command's password field ``field`` for storage."""

    field: str


PasswordTask = Verify | NewHash


class PasswordWorkNeeded(Exception):  # a request, not an error anyone sees
    """Raised by a decider that needs password outcomes it was not given. The caller
    computes ``tasks`` (off the event loop) and decides again with them; the decider
    stays pure: the same inputs always ask for the same work or give the same events."""

    def __init__(self, *tasks: PasswordTask) -> None:
        # The message names the kinds of work only: a task holds a password hash, and
        # this exception may be recorded (a span's exception event, a log line).
        super().__init__("password work needed: " + ", ".join(type(t).__name__ for t in tasks))
        self.tasks = tasks


_NO_MATCHES: Mapping[tuple[str, str | None], bool] = MappingProxyType({})
_NO_HASHES: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class PasswordOutcomes:
    """The outcomes of a command's password work: which field matched which hash, and
    the new hashes. Kept across retries of a command: a password verified against a
    hash the stream still holds is not verified again."""

    matched: Mapping[tuple[str, str | None], bool] = field(default_factory=lambda: _NO_MATCHES)
    hashes: Mapping[str, str] = field(default_factory=lambda: _NO_HASHES)

    def matches(self, name: str, hashed: str | None) -> bool:
        """Whether the command's ``name`` field matched ``hashed``."""
        try:
            return self.matched[(name, hashed)]
        except KeyError:
            raise PasswordWorkNeeded(Verify(name, hashed)) from None

    def hash_of(self, name: str) -> str:
        """The bcrypt hash of the command's ``name`` field."""
        try:
            return self.hashes[name]
        except KeyError:
            raise PasswordWorkNeeded(NewHash(name)) from None

    def require(self, *tasks: PasswordTask) -> None:
        """Ask for every task of ``tasks`` not done yet, all at once."""
        missing = [t for t in tasks if not self._done(t)]
        if missing:
            raise PasswordWorkNeeded(*missing)

    def _done(self, task: PasswordTask) -> bool:
        if isinstance(task, Verify):
            return (task.field, task.hashed) in self.matched
        return task.field in self.hashes


NO_PASSWORD_WORK: PasswordOutcomes = PasswordOutcomes()


def perform(
    tasks: tuple[PasswordTask, ...], command: Any, hasher: PasswordHasher, done: PasswordOutcomes
) -> PasswordOutcomes:
    """``done`` with ``tasks`` computed: blocking bcrypt work, to run on a worker thread
    (bcrypt releases the GIL, so concurrent commands use every core). The passwords are
    read from ``command``'s fields (``SecretStr``)."""
    matched = dict(done.matched)
    hashes = dict(done.hashes)
    for task in tasks:
        plain = getattr(command, task.field).get_secret_value()
        if isinstance(task, Verify):
            hashed = hasher.dummy_hash if task.hashed is None else task.hashed
            matched[(task.field, task.hashed)] = hasher.verify(plain, hashed)
        else:
            hashes[task.field] = hasher.hash(plain)
    return PasswordOutcomes(MappingProxyType(matched), MappingProxyType(hashes))


T = TypeVar("T")


def with_password_work(
    decide: Callable[[PasswordOutcomes], T], command: Any, hasher: PasswordHasher
) -> T:
    """Run ``decide(outcomes)`` until it asks for no more password work, doing that work
    inline: for tests and tools; the dispatcher does the same off the event loop."""
    outcomes = NO_PASSWORD_WORK
    while True:
        try:
            return decide(outcomes)
        except PasswordWorkNeeded as needed:
            outcomes = perform(needed.tasks, command, hasher, outcomes)


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
