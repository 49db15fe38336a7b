"""The README's error table as HTTP: the one place where a tiu-core error becomes a
status code, a JSON body (:class:`ErrorBody`) and, where waiting helps, ``Retry-After``.

Order matters: the first row whose class matches wins, so subclasses come first
(``PoolExhausted`` is a ``StoreUnavailable``, ``WeakPassword`` an ``InvalidCommand``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from projections.errors import InvalidQuery
from tiu import (
    AccountInactive,
    AccountLocked,
    AlreadyExists,
    AppendTimeout,
    BulkOperationError,
    ConcurrencyError,
    Conflict,
    DomainError,
    DuplicateRejectedCommand,
    IllegalTransition,
    InvalidCommand,
    InvalidCredentials,
    InvalidCursor,
    InvalidFilter,
    NotFound,
    PermissionDenied,
    PoolExhausted,
    ProjectionTimeout,
    ResetTokenInvalid,
    SessionInvalid,
    StoreUnavailable,
    SubjectForgotten,
    WeakPassword,
)


class ErrorBody(BaseModel):
    """Every error response: a stable code, a message fit to show, and the field at
    fault (input errors) or the seconds to wait (``Retry-After``) where they apply."""

    error: str
    message: str
    field: str | None = None
    retry_after: int | None = None


def _locked_for(error: Exception, now: datetime) -> int:
    assert isinstance(error, AccountLocked)
    return max(1, math.ceil((error.until - now).total_seconds()))


def _pool_wait(error: Exception, _now: datetime) -> int:
    return max(1, math.ceil(getattr(error, "timeout", 1)))


def _soon(_error: Exception, _now: datetime) -> int:
    return 1


@dataclass(frozen=True)
class Row:
    error: type[Exception]
    status: int
    retry_after: Callable[[Exception, datetime], int] | None = None


#: The README's table ("Handling errors"), most specific first.
TABLE: tuple[Row, ...] = (
    Row(WeakPassword, 400),
    Row(InvalidCommand, 400),
    Row(ResetTokenInvalid, 400),
    Row(AccountLocked, 401, _locked_for),
    Row(InvalidCredentials, 401),
    Row(AccountInactive, 401),
    Row(SessionInvalid, 401),
    Row(PermissionDenied, 403),
    Row(SubjectForgotten, 404),
    Row(NotFound, 404),
    Row(AlreadyExists, 409),
    Row(IllegalTransition, 409),
    Row(Conflict, 409),
    Row(DuplicateRejectedCommand, 409),
    Row(BulkOperationError, 409),
    Row(PoolExhausted, 503, _pool_wait),
    Row(StoreUnavailable, 503, _soon),
    Row(AppendTimeout, 503, _soon),
    Row(ConcurrencyError, 503, _soon),
    Row(ProjectionTimeout, 503, _soon),
    Row(InvalidCursor, 400),
    Row(InvalidFilter, 400),
    Row(InvalidQuery, 400),
    Row(DomainError, 400),
)

#: What each status's body looks like, for the OpenAPI schema of every route.
RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody, "description": "The input breaks a rule (InvalidCommand...)"},
    401: {"model": ErrorBody, "description": "Authentication refused; never says why"},
    403: {"model": ErrorBody, "description": "PermissionDenied (recorded in the log)"},
    404: {"model": ErrorBody, "description": "NotFound"},
    409: {"model": ErrorBody, "description": "AlreadyExists, IllegalTransition, Conflict"},
    503: {"model": ErrorBody, "description": "Store unavailable or saturated: retry later"},
}

_AUTH_MESSAGE = "authentication failed"


def response_for(error: Exception, now: datetime | None = None) -> JSONResponse | None:
    """The HTTP answer for ``error`` at ``now`` (the service's clock), or None if no row
    of the table matches."""
    for row in TABLE:
        if isinstance(error, row.error):
            break
    else:
        return None
    headers: dict[str, str] = {}
    when = now or datetime.now(UTC)
    retry = row.retry_after(error, when) if row.retry_after is not None else None
    if retry is not None:
        headers["Retry-After"] = str(retry)
    code = str(getattr(error, "code", None) or type(error).__name__)
    message = str(getattr(error, "message", None) or error)
    if row.status == 401:
        # One answer for unknown emails, wrong passwords, locked or inactive accounts
        # and dead sessions: the code tells the client what to do, never which it was.
        headers["WWW-Authenticate"] = "Bearer"
        message = _AUTH_MESSAGE
    body = ErrorBody(
        error=code,
        message=message,
        field=getattr(error, "field", None) if row.status == 400 else None,
        retry_after=retry,
    )
    return JSONResponse(body.model_dump(), status_code=row.status, headers=headers)


def install(app: FastAPI) -> None:
    """Answer every error of the table through :func:`response_for`."""

    async def handle(request: Request, error: Exception) -> JSONResponse:
        service = getattr(request.app.state, "service", None)
        answer = response_for(error, service.now() if service is not None else None)
        if answer is None:
            raise error
        return answer

    for error_type in {row.error for row in TABLE}:
        app.add_exception_handler(error_type, handle)
