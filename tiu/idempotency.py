"""What the idempotency record of a refused command holds, and the refusal it gives back.

A command's ``command_id`` is its idempotency key (``processed_commands``): a resend
returns the first outcome and appends nothing. For a refusal that outcome is the
refusal itself: the resend raises an error of the same class, with the same message
and fields (``.field``, ``.until``...), so a service maps it to the same answer; the
rebuilt error's ``replayed`` attribute is the command id. Nothing is decided again and
nothing is appended (no second ``CommandRejected`` or ``LoginFailed``), however the
state changed since.

Refusals that depend on the command alone (``InvalidCommand``) are not remembered:
resending the same command gives the same refusal anyway.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Final

from domain.errors import DomainError, InvalidCommand
from tiu.errors import DuplicateRejectedCommand

_DATETIME: Final = "$datetime"
_NAMESPACE: Final = uuid.UUID("5d0f8c1e-2b7a-4c57-9a43-3e1f6a0c9b21")
_SKIPPED: Final = frozenset({"message", "record", "replayed"})


def derived_command_id(command_id: str, part: object) -> str:
    """The key of one command of a call that issues several under one ``command_id``
    (item ``part`` of a bulk call, the session of a login): the same for the same key
    and part, 36 characters whatever the key's length."""
    return str(uuid.uuid5(_NAMESPACE, f"{command_id}\x1f{part}"))


def leaves_trace(error: DomainError) -> bool:
    """Whether a refusal with ``error`` writes anything: the facts and the
    security event the refusal carries, and the idempotency record of the refusal.
    A refusal given back from that record (``replayed``) writes nothing again."""
    if getattr(error, "replayed", None) is not None:
        return False
    return bool(error.record) or error.security_relevant or not isinstance(error, InvalidCommand)


def refusal_outcome(error: DomainError) -> dict[str, Any]:
    """The idempotency record's outcome for a refusal: its code, message and fields."""
    fields = {name: _dump(value) for name, value in vars(error).items() if name not in _SKIPPED}
    return {"ok": False, "code": error.code, "message": error.message, "fields": fields}


def replayed_refusal(command_id: str, outcome: dict[str, Any]) -> DomainError:
    """The refusal ``outcome`` holds, rebuilt as its own class (a record written before
    refusals kept their fields, or of a class this code lacks, gives
    :class:`DuplicateRejectedCommand`)."""
    code = str(outcome.get("code", "?"))
    message = str(outcome.get("message", ""))
    cls = _by_code().get(code)
    fields = outcome.get("fields")
    error: DomainError
    if cls is None or not isinstance(fields, dict):
        error = DuplicateRejectedCommand(command_id, code, message)
    else:
        # Built without __init__: every class has its own signature, and the fields are
        # what its __init__ set the first time.
        error = cls.__new__(cls)
        Exception.__init__(error, message)
        error.message = message
        error.record = ()  # the facts it carried were appended the first time
        for name, value in fields.items():
            setattr(error, name, _load(value))
    error.replayed = command_id  # type: ignore[attr-defined]
    return error


def _by_code() -> dict[str, type[DomainError]]:
    found: dict[str, type[DomainError]] = {}
    pending: list[type[DomainError]] = [DomainError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def _dump(value: Any) -> Any:
    if isinstance(value, datetime):
        return {_DATETIME: value.isoformat()}
    if isinstance(value, tuple | list):
        return [_dump(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _load(value: Any) -> Any:
    if isinstance(value, dict) and _DATETIME in value:
        return datetime.fromisoformat(value[_DATETIME])
    if isinstance(value, list):
        return tuple(_load(v) for v in value)
    return value
