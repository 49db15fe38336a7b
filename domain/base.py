"""The building blocks every decider shares: events, commands, the command context and
the security policy, plus the event registry that encodes and decodes stored events.

An event type is registered when its class is defined. Stored events are never
rewritten: when an event's shape changes, bump its ``schema_version`` and register an
upcaster lifting the old dict one version up; ``decode_event`` chains them on read.
"""

from __future__ import annotations

import json
import os
import time
import unicodedata
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Final

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from domain.errors import InvalidCommand, UnknownEventType
from domain.passwords import NO_PASSWORD_WORK, PasswordOutcomes

EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})

# Failed logins kept in a user's state; bounds the state and the lockout threshold.
MAX_TRACKED_FAILURES: Final = 50

ERASED: Final = "[erased]"
"""What an erased personal field decodes to when its type takes a string; otherwise
None when optional, else ``{"erased": True}`` for a mapping (see ``erased_value``)."""

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_EVENT_TYPES: dict[str, type[Event]] = {}
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class Event(BaseModel):
    """An immutable fact. Subclasses set ``event_type`` (stable, stored) and are
    registered under it on definition.

    ``personal_fields`` names the fields holding personal data of the data subject whose
    id is in ``subject_field``; those fields get encrypted per subject (and shredded on
    erasure), so every field with an email, a name, an IP, a user agent or
    self-descriptive free text must be listed.
    """

    # No string cache: events are decoded from their stored JSON text, whose strings
    # (ids, times, names) are mostly unique, so the cache was a miss and an insert into
    # its table per string: without it a log event decodes in 2.1 us instead of 2.4
    # (CPU time, the bench's 100k-event log). Values are the same either way.
    model_config = ConfigDict(frozen=True, extra="forbid", cache_strings=False)

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1
    personal_fields: ClassVar[frozenset[str]] = frozenset()
    subject_field: ClassVar[str | None] = None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "event_type" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must set event_type")
        if cls.event_type in _EVENT_TYPES:
            raise TypeError(f"event type {cls.event_type!r} is already registered")
        unknown = cls.personal_fields - cls.model_fields.keys()
        if unknown:
            raise TypeError(f"{cls.__name__}.personal_fields names unknown fields {unknown}")
        if cls.personal_fields and cls.subject_field not in cls.model_fields:
            raise TypeError(f"{cls.__name__} has personal fields but no valid subject_field")
        _EVENT_TYPES[cls.event_type] = cls


def registered_event_types() -> Mapping[str, type[Event]]:
    """Every registered event class by ``event_type`` (read-only view)."""
    return MappingProxyType(_EVENT_TYPES)


def registered_upcasters() -> Mapping[tuple[str, int], Upcaster]:
    """Every registered upcaster by ``(event_type, from_version)`` (read-only view)."""
    return MappingProxyType(_UPCASTERS)


def register_upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function lifting ``event_type``'s stored dict from ``from_version`` to
    ``from_version + 1``. It must not mutate its argument."""

    def register(upcaster: Upcaster) -> Upcaster:
        key = (event_type, from_version)
        if key in _UPCASTERS:
            raise TypeError(f"upcaster for {event_type} v{from_version} already registered")
        _UPCASTERS[key] = upcaster
        return upcaster

    return register


def encode_event(event: Event) -> tuple[str, int, dict[str, Any]]:
    """``(event_type, schema_version, json-ready data)`` for storage."""
    return event.event_type, event.schema_version, event.model_dump(mode="json")


#: Per event type, once it was first decoded: its current schema version and its
#: model's JSON validator. The common read (a stored text at the current version,
#: nothing erased) then costs one lookup before pydantic: looking up the class, its
#: version and its validator in ``decode_event`` took 0.8 of the 5.1 us a log event's
#: decoding cost (thread time, 100k events of the bench's log).
_TEXT_VALIDATORS: dict[str, tuple[object, Callable[[str | bytes], Any]]] = {}
#: What ``decode_event`` takes for a type not in ``_TEXT_VALIDATORS``: a version equal
#: to none. A subscript and its KeyError, not ``get``: 0.2k instructions fewer a decode.
_UNDECODED: Final[tuple[object, Callable[[str | bytes], Any]]] = (object(), str)


def decode_event(
    event_type: str,
    schema_version: int,
    data: Mapping[str, Any] | str | bytes,
    erased: Collection[str] = (),
) -> Event:
    """Rebuild a stored event, upcasting it to the current schema version first.

    ``data`` is the stored dict, or its JSON text: an event at the current version is
    then validated straight from the text (pydantic's JSON mode, ~2 us instead of ~4.5
    for parsing, then validating, a task event), and read as ``json.loads`` reads it
    wherever JSON mode refuses it (a lone surrogate in a string, say). ``erased`` names
    stored fields whose personal data was shredded; each decodes to the erased value of
    its field's type (``erased_value``)."""
    try:
        version, validate = _TEXT_VALIDATORS[event_type]
    except KeyError:  # not decoded yet, or no such type: decided by _decode
        version, validate = _UNDECODED
    if version == schema_version and not erased:
        kind = type(data)
        if kind is str or kind is bytes:
            try:
                event: Event = validate(data)  # type: ignore[arg-type]
            except ValidationError:
                pass  # decided below, on the document as the stdlib reads it
            else:
                return event
    return _decode(event_type, schema_version, data, erased)


def _decode(
    event_type: str,
    schema_version: int,
    data: Mapping[str, Any] | str | bytes,
    erased: Collection[str],
) -> Event:
    """``decode_event`` for all but a text its known validator took."""
    cls = _EVENT_TYPES.get(event_type)
    if cls is None:
        raise UnknownEventType(event_type, schema_version, "no such event type")
    latest = cls.schema_version
    # Taken from the class at a decode, not at its definition: a model whose
    # annotations pydantic resolves later holds a placeholder validator until then.
    validator = cls.__pydantic_validator__
    _TEXT_VALIDATORS[event_type] = (latest, validator.validate_json)
    event: Event
    if schema_version == latest and not erased:
        # The common case: nothing to change. Validated by the model's validator itself
        # (model_validate_json's wrapper was 0.45 of its 1.7 us), without a copy.
        kind = type(data)
        if kind is str or kind is bytes:
            try:
                event = validator.validate_json(data)  # type: ignore[arg-type]
            except ValidationError:
                pass  # decided below, on the document as the stdlib reads it
            else:
                return event
        elif kind is dict:
            event = validator.validate_python(data)
            return event
    elif not 1 <= schema_version <= latest:
        raise UnknownEventType(event_type, schema_version, f"this code knows versions 1..{latest}")
    payload = json.loads(data) if isinstance(data, str | bytes) else dict(data)
    for version in range(schema_version, cls.schema_version):
        upcaster = _UPCASTERS.get((event_type, version))
        if upcaster is None:
            raise UnknownEventType(event_type, schema_version, f"no upcaster from v{version}")
        payload = upcaster(payload)
    for name in erased:
        if name in payload and name in cls.model_fields:
            payload[name] = erased_value(cls, name)
    return cls.model_validate(payload)


_ERASED_CANDIDATES: Final[tuple[Any, ...]] = (ERASED, None, {"erased": True}, [])
_erased_values: dict[tuple[type[Event], str], Any] = {}


def erased_value(cls: type[Event], field: str) -> Any:
    """The value an erased ``field`` of ``cls`` decodes to: :data:`ERASED` if the field
    takes a string, else None if optional, else ``{"erased": True}`` or ``[]``."""
    key = (cls, field)
    if key not in _erased_values:
        annotation: Any = cls.model_fields[field].annotation
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        for candidate in _ERASED_CANDIDATES:
            try:
                adapter.validate_python(candidate)
            except ValidationError:
                continue
            _erased_values[key] = candidate
            break
        else:
            raise TypeError(f"{cls.__name__}.{field} accepts no erased value")
    value = _erased_values[key]
    return dict(value) if isinstance(value, dict) else value


def new_id() -> str:
    """A fresh id for commands, users, projects, tasks and sessions: a time-ordered
    UUID (version 7) string, 74 random bits after the creation millisecond.

    Time-ordered, not random (uuid4): the stream id, the read-model keys and the
    idempotency record of a new aggregate land at the right edge of their B-tree
    indexes instead of on a random page of each. With random ids a SQLite append into a
    log of 1,000,000 events ran ~13% slower than into one of 10,000, the raw driver
    alike; with time-ordered ids the rate stays flat (bench case 7). An id reveals
    when it was made, as ``created_at`` does; it is no secret (session tokens are
    ``secrets.token_urlsafe``).

    The clock read here does not make decisions depend on time: the id is made when
    the command is built, an input to ``decide`` like any other field. (The layout is
    ``eventstore.records.uuid7``'s, the default event id; ``domain`` imports no other
    package of the project, so it makes its own.)"""
    value = time.time_ns() // 1_000_000 << 80 | int.from_bytes(os.urandom(10))
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    # str(uuid.UUID(int=value)) without the object: 1.3 us instead of 2.2-3.2 (every
    # command makes one, a new aggregate's another).
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Command(BaseModel):
    """An intent. ``command_id`` is the idempotency key: a command id already processed
    returns the first result and appends nothing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    command_id: str = Field(default_factory=new_id, min_length=1, max_length=64)

    def __init__(self, /, **data: Any) -> None:
        # Commands are built from callers' input: a value the model refuses (a bad enum,
        # a naive datetime, a None id, an unknown field) is the caller's InvalidCommand,
        # never pydantic's ValidationError, for every command alike.
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise invalid_command(error) from None
        # Text no database can hold is refused here, before it reaches a key, a hash or
        # a driver: NUL (PostgreSQL's text cannot hold it; refused on both backends, as
        # appends refuse it) and lone surrogates (not encodable as UTF-8).
        # The fields' values as validated, from the instance's dict: the class's
        # ``model_fields`` and a getattr each cost more than the checks of most fields.
        for name, value in self.__dict__.items():
            if value is None:  # most optional fields: no need for the checks' calls
                continue
            reason = _unstorable(value)
            if reason is not None:
                raise InvalidCommand(name, reason)


def invalid_command(error: ValidationError) -> InvalidCommand:
    """The first problem pydantic found, as ``InvalidCommand(field, reason)``. The
    reason is pydantic's message without the input (which may be huge or secret)."""
    first = error.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or "command"
    return InvalidCommand(field, first["msg"])


def _unstorable(value: object) -> str | None:
    """Why ``value`` (or a string inside it) cannot be stored, or None."""
    if isinstance(value, str):
        if "\x00" in value:
            return "must not contain NUL characters"
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "must be valid Unicode (it holds a lone surrogate)"
        return None
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        return _unstorable(secret) if isinstance(secret, str) else None
    if isinstance(value, Mapping):
        items: Collection[object] = [*value.keys(), *value.values()]
    elif isinstance(value, tuple | list | frozenset | set):
        items = value
    else:
        return None
    for item in items:
        reason = _unstorable(item)
        if reason is not None:
            return reason
    return None


@dataclass(frozen=True)
class SecurityPolicy:
    """Tunable security rules; the defaults are the production ones."""

    lockout_threshold: int = 5
    lockout_window: timedelta = timedelta(minutes=15)
    lockout_duration: timedelta = timedelta(minutes=15)
    session_lifetime: timedelta = timedelta(hours=12)
    session_idle_timeout: timedelta = timedelta(minutes=30)
    session_touch_interval: timedelta = timedelta(minutes=1)
    password_reset_ttl: timedelta = timedelta(hours=1)
    password_min_length: int = 12
    password_max_length: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.lockout_threshold <= MAX_TRACKED_FAILURES:
            raise ValueError(f"lockout_threshold must be within 1..{MAX_TRACKED_FAILURES}")
        if not 1 <= self.password_min_length <= self.password_max_length:
            raise ValueError("password_min_length must be within 1..password_max_length")
        if self.password_max_length < 64:
            raise ValueError("password_max_length must allow at least 64 characters")
        durations = (
            self.lockout_window,
            self.lockout_duration,
            self.session_lifetime,
            self.session_idle_timeout,
            self.password_reset_ttl,
        )
        if any(d <= timedelta(0) for d in durations) or self.session_touch_interval < timedelta(0):
            raise ValueError("security policy durations must be positive")


@dataclass(frozen=True)
class CommandContext:
    """Everything a command is issued with besides itself. ``now`` is the only clock the
    domain sees and must be timezone-aware. ``passwords`` holds the outcomes of the
    password work the decision asked for (computed off the event loop before it is
    decided again; see :class:`domain.passwords.PasswordWorkNeeded`)."""

    now: datetime
    actor_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    policy: SecurityPolicy = field(default_factory=SecurityPolicy)
    passwords: PasswordOutcomes = NO_PASSWORD_WORK

    def __post_init__(self) -> None:
        if self.now.tzinfo is None or self.now.utcoffset() is None:
            raise ValueError("CommandContext.now must be timezone-aware")
        check_caller(
            actor_id=self.actor_id,
            correlation_id=self.correlation_id,
            causation_id=self.causation_id,
            ip=self.ip,
            user_agent=self.user_agent,
        )


#: The longest actor id: a user id, or ``system`` (it names ``security-<actor>`` and
#: ``audit-<actor>`` streams, and is a key of the permission lookup).
MAX_ACTOR_ID_LENGTH: Final = 64
#: The longest correlation or causation id: the log's columns hold 200 characters.
MAX_TRACE_ID_LENGTH: Final = 200


def check_caller(
    *,
    actor_id: object = None,
    correlation_id: object = None,
    causation_id: object = None,
    ip: object = None,
    user_agent: object = None,
) -> None:
    """Refuse who-is-acting-and-from-where values a command or a read cannot carry, as
    ``InvalidCommand`` naming the argument. A service takes them from a request (a
    session's user, an ``X-Request-ID``, the ``User-Agent``); they reach stream ids,
    the log's columns, personal fields and the permission lookup, where a wrong type,
    NUL, a lone surrogate or an over-long value failed in the driver or pydantic.

    ``actor_id``: 1 to 64 printable characters; ``correlation_id``, ``causation_id``:
    at most 200 printable characters; ``ip``, ``user_agent``: any storable text."""
    if actor_id is not None:
        _check_id("actor_id", actor_id, 1, MAX_ACTOR_ID_LENGTH)
    if correlation_id is not None:
        _check_id("correlation_id", correlation_id, 0, MAX_TRACE_ID_LENGTH)
    if causation_id is not None:
        _check_id("causation_id", causation_id, 0, MAX_TRACE_ID_LENGTH)
    for name, value in (("ip", ip), ("user_agent", user_agent)):
        if value is None:
            continue
        if type(value) is not str:
            raise InvalidCommand(name, f"must be a str or None, not {type(value).__name__}")
        reason = _unstorable(value)
        if reason is not None:
            raise InvalidCommand(name, reason)


def _check_id(name: str, value: object, min_length: int, max_length: int) -> None:
    if type(value) is not str:
        raise InvalidCommand(name, f"must be a str or None, not {type(value).__name__}")
    # A printable text holds no control character, NUL, lone surrogate or unassigned
    # code point (str.isprintable is false for each); a space is allowed.
    if not min_length <= len(value) <= max_length or not value.isprintable():
        raise InvalidCommand(name, f"must be {min_length} to {max_length} printable characters")


def datetime_problem(value: datetime) -> str | None:
    """Why the log and the read models cannot hold ``value``, or None: they keep aware
    times in UTC, years 1 to 9999, and ``datetime(1, 1, 1, tzinfo=+14:00)`` is in the
    year 0 there (converting it raised ``OverflowError`` in a projector or a query)."""
    if value.tzinfo is None or value.utcoffset() is None:
        return "must be timezone-aware"
    try:
        value.astimezone(UTC)
    except OverflowError:
        return "must be within the years 1 to 9999 in UTC"
    return None


def _in_utc_range(value: datetime) -> datetime:
    problem = datetime_problem(value)
    if problem is not None:
        raise PydanticCustomError("datetime_range", problem)
    return value


StorableDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc_range)]
"""A command's datetime: timezone-aware, and within the years 1 to 9999 in UTC."""

EntityId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
]
"""An aggregate id carried in commands and events (``new_id``: UUID strings in practice)."""


def clean_text(
    raw: str, field: str, *, max_length: int, required: bool = True, multiline: bool = False
) -> str:
    """Strip and NFC-normalise user-written text, raising ``InvalidCommand`` if it is
    empty (when ``required``), too long, or holds control characters (line breaks and
    tabs are allowed when ``multiline``)."""
    text = unicodedata.normalize("NFC", raw.strip())
    allowed = "\n\r\t" if multiline else ""
    if required and not text:
        raise InvalidCommand(field, "must not be empty")
    if len(text) > max_length:
        raise InvalidCommand(field, f"must be at most {max_length} characters")
    # A printable text holds no character of a "C" category (str.isprintable is false
    # for every one of them): one C call instead of a category lookup per character.
    if not text.isprintable() and any(
        unicodedata.category(c).startswith("C") and c not in allowed for c in text
    ):
        raise InvalidCommand(field, "must not contain control characters")
    return text
