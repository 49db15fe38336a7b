"""A FastAPI service over tiu-core, as a backend engineer would start one.

    make serve                                  # the embedded SQLite default, port 8000
    TIU_DATABASE_URL=postgresql+asyncpg://... python -m examples.service

Bearer session tokens resolve to the acting user through ``SessionRepository`` (one
read; a session's idle clock is touched at most once per ``TIU_SESSION_TOUCH_INTERVAL``).
Writes call the repositories' write methods; an ``Idempotency-Key`` header becomes
their ``command_id`` (see :func:`command_id`). Errors are answered by
:mod:`examples.service.errors`, the README's table, and nowhere else.
``/health/live``, ``/health/ready``, ``/metrics``; expired sessions are cleaned up by a
background task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from domain.tasks import Priority, TaskStatus
from eventstore import telemetry
from examples.service import errors
from examples.service.schemas import (
    Assignment,
    AuditEntryOut,
    Liveness,
    Login,
    LoginOut,
    MemberOut,
    NewMember,
    NewProject,
    NewTask,
    ProjectOut,
    ProjectPage,
    Readiness,
    Register,
    StatusChange,
    TaskOut,
    TaskPage,
    UserOut,
)
from tiu import (
    AccountInactive,
    DatabaseService,
    InvalidCommand,
    NotFound,
    Repositories,
    SessionInvalid,
    create_database_service,
)
from tiu.models import Task, User

log = logging.getLogger("examples.service")

#: An Idempotency-Key: what a client may send (a UUID, a ULID, a counter...).
IDEMPOTENCY_KEY: Final = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
DEFAULT_CLEANUP_INTERVAL: Final = 300.0
Id = Annotated[str, Query(max_length=64)]


@dataclass(frozen=True)
class Actor:
    """Who is calling, from the bearer token."""

    user: User
    session_id: str
    ip: str | None
    user_agent: str | None
    correlation_id: str


def _service(request: Request) -> DatabaseService:
    service: DatabaseService = request.app.state.service
    return service


def _correlation(request: Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", given) else str(uuid.uuid4())


_bearer = HTTPBearer(auto_error=False, description="A session token from POST /sessions")


async def current_actor(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Actor:
    """The session's user: one read (session and user in one statement); the session's
    last activity is recorded at most once per touch interval."""
    if credentials is None:
        raise SessionInvalid("unknown")
    service = _service(request)
    ip = request.client.host if request.client else None
    agent = request.headers.get("User-Agent")
    correlation = _correlation(request)
    async with service.get_repositories(
        ip=ip, user_agent=agent, correlation_id=correlation
    ) as repos:
        check = await repos.get_session_repository().validate_session(credentials.credentials)
    if not check.valid or check.user is None or check.session is None:
        if check.reason == "inactive" and check.session is not None:
            raise AccountInactive(check.session.user_id)
        reason = check.reason if check.reason in ("expired", "idle", "revoked") else "unknown"
        raise SessionInvalid(reason)  # type: ignore[arg-type]
    return Actor(check.user, check.session.session_id, ip, agent, correlation)


CurrentActor = Annotated[Actor, Depends(current_actor)]


@asynccontextmanager
async def acting(request: Request, actor: Actor | None) -> AsyncIterator[Repositories]:
    service = _service(request)
    async with service.get_repositories(
        actor.user.user_id if actor else None,
        ip=actor.ip if actor else (request.client.host if request.client else None),
        user_agent=actor.user_agent if actor else request.headers.get("User-Agent"),
        correlation_id=actor.correlation_id if actor else _correlation(request),
    ) as repos:
        yield repos


def command_id(request: Request, actor: Actor | None) -> str | None:
    """The ``command_id`` for a write from the request's ``Idempotency-Key``: a retried
    request then returns the first result and appends nothing. The key is scoped to
    the caller and the route (a key is the client's; two clients, or two endpoints, may
    pick the same one), hashed to fit the repositories' 64 characters."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidCommand("Idempotency-Key", "1-200 letters, digits or _.:-")
    scope = f"{actor.user.user_id if actor else '-'}|{request.method} {request.url.path}"
    return hashlib.sha256(f"{scope}|{key}".encode()).hexdigest()[:48]


def _visible_task(task: Task | None, task_id: str) -> TaskOut:
    """A task as the caller sees it; one it may not see (or a deleted one) is a 404."""
    if task is None:
        raise NotFound("task", task_id)
    return TaskOut.model_validate(task.model_dump())


def _user(user: User) -> UserOut:
    return UserOut(
        user_id=user.user_id,
        email=user.email,
        username=user.username,
        display_name=user.display_name,
        active=user.active,
        roles=list(user.roles),
        created_at=user.created_at,
    )


def create_app(
    service: DatabaseService | None = None,
    *,
    database_url: str | None = None,
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL,
    **settings: Any,
) -> FastAPI:
    """The app on ``service`` (left open when the app stops), or on a service it
    creates at start-up from ``database_url`` and ``settings`` (closed when it stops)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = getattr(app.state, "service", None) is None
        if owned:
            app.state.service = await create_database_service(database_url, **settings)
        cleaner = asyncio.create_task(clean_sessions(app.state.service, cleanup_interval))
        try:
            yield
        finally:
            cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleaner
            if owned:
                await app.state.service.aclose()
                app.state.service = None

    app = FastAPI(
        title="tiu-core example service",
        version="0.1.0",
        description="Users, sessions, projects, members, tasks and the audit log over tiu-core.",
        lifespan=lifespan,
    )
    app.state.service = service
    errors.install(app)
    app.middleware("http")(traced)
    if telemetry.ENABLED:
        telemetry.prometheus_reader()
    _routes(app)
    return app


async def traced(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """A server span per request (without an SDK, nothing): the commands and queries the
    request causes become its children."""
    with telemetry.span(
        f"{request.method}", {"http.request.method": request.method, "url.path": request.url.path}
    ) as span:
        response = await call_next(request)
        route = request.scope.get("route")
        if route is not None:
            span.update_name(f"{request.method} {getattr(route, 'path', '')}")
            span.set_attribute("http.route", getattr(route, "path", ""))
        span.set_attribute("http.response.status_code", response.status_code)
        return response


async def clean_sessions(service: DatabaseService, interval: float) -> None:
    """Every ``interval`` seconds, revoke sessions past their expiry (logged as events)."""
    while True:
        await asyncio.sleep(interval)
        try:
            cleaned = await service.cleanup_expired_sessions()
        except Exception:  # the next round tries again; the service keeps serving
            log.warning("expired-session clean-up failed", exc_info=True)
        else:
            if cleaned:
                log.info("cleaned up %d expired sessions", cleaned)


def _routes(app: FastAPI) -> None:  # one place that lists every route
    # Every route of the API may answer with the error table; the operations routes
    # (health, metrics) answer only as they declare.
    api = APIRouter(responses=errors.RESPONSES)

    # -- users and sessions --------------------------------------------------------------

    @api.post("/users", status_code=201, tags=["users"])
    async def register(request: Request, body: Register) -> UserOut:
        """Register; the password must pass the strength policy."""
        async with acting(request, None) as repos:
            user = await repos.get_user_repository().create_user(
                email=body.email,
                username=body.username,
                password=body.password,
                display_name=body.display_name,
                command_id=command_id(request, None),
            )
        return _user(user)

    @api.post("/sessions", status_code=201, tags=["sessions"])
    async def login(request: Request, body: Login) -> LoginOut:
        """Log in: a new session and its token (shown once)."""
        async with acting(request, None) as repos:
            started = await repos.get_session_repository().create_session(
                body.email, body.password, command_id=command_id(request, None)
            )
        return LoginOut.model_validate(
            {
                "token": started.token,
                "session": started.session.model_dump(),
                "user": _user(started.user).model_dump(),
            }
        )

    @api.delete("/sessions/current", status_code=204, tags=["sessions"])
    async def logout(request: Request, actor: CurrentActor) -> Response:
        """End the calling session."""
        async with acting(request, actor) as repos:
            await repos.get_session_repository().revoke(
                actor.session_id, command_id=command_id(request, actor)
            )
        return Response(status_code=204)

    @api.get("/me", tags=["users"])
    async def me(actor: CurrentActor) -> UserOut:
        return _user(actor.user)

    # -- projects and members ------------------------------------------------------------

    @api.post("/projects", status_code=201, tags=["projects"])
    async def create_project(request: Request, actor: CurrentActor, body: NewProject) -> ProjectOut:
        async with acting(request, actor) as repos:
            project = await repos.get_project_repository().create_project(
                body.name,
                body.description,
                body.visibility.value,
                command_id=command_id(request, actor),
            )
        return ProjectOut.model_validate(project.model_dump())

    @api.get("/projects", tags=["projects"])
    async def list_projects(
        request: Request,
        actor: CurrentActor,
        name: Annotated[str | None, Query(max_length=200, description="Name contains")] = None,
        archived: bool | None = None,
        after: Annotated[str | None, Query(max_length=2000)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> ProjectPage:
        """The projects the caller may see, newest first, in keyset pages."""
        filters: dict[str, Any] = {}
        if name:
            filters["name__contains"] = name
        if archived is not None:
            filters["archived"] = archived
        async with acting(request, actor) as repos:
            page = await repos.get_project_repository().page_projects(
                filters, after=after, limit=limit
            )
        return ProjectPage(
            items=[ProjectOut.model_validate(dict(row)) for row in page.items],
            next_cursor=page.next_cursor,
        )

    @api.get("/projects/{project_id}", tags=["projects"])
    async def get_project(
        request: Request, actor: CurrentActor, project_id: Annotated[str, Id]
    ) -> ProjectOut:
        async with acting(request, actor) as repos:
            project = await repos.get_project_repository().get_project(project_id)
        if project is None:
            raise NotFound("project", project_id)
        return ProjectOut.model_validate(project.model_dump())

    @api.post("/projects/{project_id}/members", status_code=201, tags=["projects"])
    async def add_member(
        request: Request, actor: CurrentActor, project_id: Annotated[str, Id], body: NewMember
    ) -> MemberOut:
        async with acting(request, actor) as repos:
            await repos.get_project_repository().add_member(
                project_id, body.user_id, body.role.value, command_id=command_id(request, actor)
            )
        for member in await members(request, actor, project_id):
            if member.user_id == body.user_id:
                return member
        raise NotFound("member", body.user_id)

    @api.get("/projects/{project_id}/members", tags=["projects"])
    async def members(
        request: Request, actor: CurrentActor, project_id: Annotated[str, Id]
    ) -> list[MemberOut]:
        async with acting(request, actor) as repos:
            found = await repos.get_project_repository().get_members(project_id)
        return [MemberOut.model_validate(m.model_dump()) for m in found]

    @api.delete("/projects/{project_id}/members/{user_id}", status_code=204, tags=["projects"])
    async def remove_member(
        request: Request,
        actor: CurrentActor,
        project_id: Annotated[str, Id],
        user_id: Annotated[str, Id],
    ) -> Response:
        async with acting(request, actor) as repos:
            await repos.get_project_repository().remove_member(
                project_id, user_id, command_id=command_id(request, actor)
            )
        return Response(status_code=204)

    # -- tasks ---------------------------------------------------------------------------

    @api.post("/projects/{project_id}/tasks", status_code=201, tags=["tasks"])
    async def create_task(
        request: Request, actor: CurrentActor, project_id: Annotated[str, Id], body: NewTask
    ) -> TaskOut:
        async with acting(request, actor) as repos:
            task = await repos.get_task_repository().create_task(
                project_id,
                body.title,
                body.description,
                priority=body.priority.value,
                due_date=body.due_date,
                assignee_id=body.assignee_id,
                command_id=command_id(request, actor),
            )
        return TaskOut.model_validate(task.model_dump())

    @api.get("/tasks", tags=["tasks"])
    async def list_tasks(
        request: Request,
        actor: CurrentActor,
        project_id: Annotated[str | None, Id] = None,
        status: TaskStatus | None = None,
        priority: Priority | None = None,
        assignee_id: Annotated[str | None, Id] = None,
        due_before: datetime | None = None,
        after: Annotated[str | None, Query(max_length=2000)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> TaskPage:
        """The tasks the caller may see, oldest first, filtered, in keyset pages (pass
        ``next_cursor`` as ``after``, with the same filters)."""
        filters: dict[str, Any] = {}
        for field, value in (
            ("project_id", project_id),
            ("status", status),
            ("priority", priority),
            ("assignee_id", assignee_id),
        ):
            if value is not None:
                filters[field] = value
        if due_before is not None:
            filters["due_at__lt"] = due_before
        async with acting(request, actor) as repos:
            page = await repos.get_task_repository().page_tasks(filters, after=after, limit=limit)
        return TaskPage(
            items=[TaskOut.model_validate(dict(row)) for row in page.items],
            next_cursor=page.next_cursor,
        )

    @api.get("/tasks/{task_id}", tags=["tasks"])
    async def get_task(
        request: Request, actor: CurrentActor, task_id: Annotated[str, Id]
    ) -> TaskOut:
        async with acting(request, actor) as repos:
            task = await repos.get_task_repository().get_task(task_id)
        return _visible_task(task, task_id)

    @api.put("/tasks/{task_id}/assignee", tags=["tasks"])
    async def assign(
        request: Request, actor: CurrentActor, task_id: Annotated[str, Id], body: Assignment
    ) -> TaskOut:
        async with acting(request, actor) as repos:
            task = await repos.get_task_repository().assign_task(
                task_id, body.user_id, command_id=command_id(request, actor)
            )
        return _visible_task(task, task_id)

    @api.put("/tasks/{task_id}/status", tags=["tasks"])
    async def change_status(
        request: Request, actor: CurrentActor, task_id: Annotated[str, Id], body: StatusChange
    ) -> TaskOut:
        async with acting(request, actor) as repos:
            task = await repos.get_task_repository().update_task_status(
                task_id, body.status.value, command_id=command_id(request, actor)
            )
        return _visible_task(task, task_id)

    # -- audit ---------------------------------------------------------------------------

    @api.get("/audit/events", tags=["audit"])
    async def audit_events(
        request: Request,
        actor: CurrentActor,
        actor_id: Annotated[str | None, Id] = None,
        stream_id: Annotated[str | None, Query(max_length=200)] = None,
        category: Annotated[str | None, Query(max_length=50)] = None,
        event_type: Annotated[list[str] | None, Query(max_length=20)] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        correlation_id: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[AuditEntryOut]:
        """The event log, newest first; needs the ``audit:read`` permission (admins)."""
        async with acting(request, actor) as repos:
            entries = await repos.get_audit_repository().get_events(
                actor_id=actor_id,
                stream_id=stream_id,
                category=category,
                event_types=event_type,
                since=since,
                until=until,
                correlation_id=correlation_id,
                limit=limit,
            )
        return [AuditEntryOut.model_validate(e.model_dump()) for e in entries]

    app.include_router(api)

    # -- operations ----------------------------------------------------------------------

    @app.get("/health/live", tags=["operations"])
    async def live() -> Liveness:
        """The process answers."""
        return Liveness(status="ok")

    @app.get(
        "/health/ready",
        tags=["operations"],
        responses={
            200: {"model": Readiness, "description": "Ready"},
            503: {"model": Readiness, "description": "Not ready"},
        },
    )
    async def ready(request: Request) -> JSONResponse:
        """Ready when the store answers and its schema is at the code's migration head."""
        report = await _service(request).health_check()
        body = Readiness(
            ready=bool(report["healthy"]) and report["pending_migrations"] is False,
            healthy=report["healthy"],
            backend=report["backend"],
            pending_migrations=report["pending_migrations"],
            current_revision=report["current_revision"],
            head_revision=report["head_revision"],
            error=report["error"],
        )
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> PlainTextResponse:
        """Prometheus text: tiu-core's metrics (needs the otel extra)."""
        if not telemetry.ENABLED:
            return PlainTextResponse("", status_code=200)
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415

        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)
