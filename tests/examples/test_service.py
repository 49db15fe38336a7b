"""One end-to-end scenario per resource of the example service, on both backends."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select

from eventstore import PoolExhausted, StoreUnavailable
from eventstore.schema import events
from examples.service.app import create_app
from examples.service.errors import TABLE, response_for
from tests.conftest import PASSWORD
from tiu import (
    AccountLocked,
    ConcurrencyError,
    DatabaseService,
    InvalidCredentials,
    Settings,
    WeakPassword,
)

from .conftest import Api


async def test_users_and_sessions_register_log_in_act_and_log_out(api: Api):
    created = await api.register("ada")
    assert created["username"] == "ada" and "password" not in created
    weak = await api.client.post(
        "/users", json={"email": "weak@example.com", "username": "weak", "password": "short"}
    )
    assert weak.status_code == 400
    assert weak.json()["error"] == "weak_password" and weak.json()["field"] == "password"
    again = await api.client.post(
        "/users", json={"email": "ada@example.com", "username": "ada2", "password": PASSWORD}
    )
    assert again.status_code == 409

    wrong = await api.client.post(
        "/sessions", json={"email": "ada@example.com", "password": "not-the-password-9"}
    )
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    unknown = await api.client.post(
        "/sessions", json={"email": "nobody@example.com", "password": "not-the-password-9"}
    )
    assert unknown.json()["message"] == wrong.json()["message"], "never say which"

    auth = await api.login("ada")
    me = await api.client.get("/me", headers=auth)
    assert me.status_code == 200 and me.json()["user_id"] == created["user_id"]
    assert (await api.client.get("/me")).status_code == 401
    assert (
        await api.client.get("/me", headers={"Authorization": "Bearer nope"})
    ).status_code == 401
    assert (await api.client.delete("/sessions/current", headers=auth)).status_code == 204
    after = await api.client.get("/me", headers=auth)
    assert after.status_code == 401 and after.json()["error"] == "session_invalid"


async def test_a_session_is_touched_at_most_once_per_interval_and_dies_when_idle(api: Api, clock):
    await api.register("ada")
    auth = await api.login("ada")

    async def touches() -> int:
        async with api.service.engine.connect() as conn:
            rows = await conn.execute(
                select(events.c.event_type).where(events.c.event_type == "SessionTouched")
            )
            return len(rows.all())

    for _ in range(3):
        assert (await api.client.get("/me", headers=auth)).status_code == 200
    assert await touches() == 0  # within the touch interval: reads only
    clock.advance(minutes=2)
    for _ in range(3):
        assert (await api.client.get("/me", headers=auth)).status_code == 200
    assert await touches() == 1
    clock.advance(minutes=31)
    idle = await api.client.get("/me", headers=auth)
    assert idle.status_code == 401


async def test_an_account_locked_by_failed_logins_gets_retry_after(api: Api):
    await api.register("ada")
    for _ in range(5):
        answer = await api.client.post(
            "/sessions", json={"email": "ada@example.com", "password": "not-the-password-9"}
        )
        assert answer.status_code == 401
    locked = await api.client.post(
        "/sessions", json={"email": "ada@example.com", "password": PASSWORD}
    )
    assert locked.status_code == 401
    assert locked.json()["error"] == "account_locked"
    assert 14 * 60 <= int(locked.headers["Retry-After"]) <= 15 * 60
    assert locked.json()["retry_after"] == int(locked.headers["Retry-After"])


async def test_projects_and_members_with_keyset_pages_and_visibility(api: Api):
    _, ada = await api.user("ada")
    bob_user, bob = await api.user("bob")
    ids = []
    for n in range(3):
        answer = await api.client.post("/projects", json={"name": f"Engine {n}"}, headers=ada)
        assert answer.status_code == 201, answer.text
        ids.append(answer.json()["project_id"])
    first = await api.client.get("/projects", params={"limit": 2}, headers=ada)
    assert first.status_code == 200
    page = first.json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    second = await api.client.get(
        "/projects", params={"limit": 2, "after": page["next_cursor"]}, headers=ada
    )
    assert second.json()["next_cursor"] is None
    seen = [p["project_id"] for p in page["items"] + second.json()["items"]]
    assert sorted(seen) == sorted(ids)
    bad = await api.client.get("/projects", params={"after": "garbage"}, headers=ada)
    assert bad.status_code == 400 and bad.json()["error"] == "InvalidCursor"

    private = ids[0]
    assert (await api.client.get(f"/projects/{private}", headers=bob)).status_code == 404
    added = await api.client.post(
        f"/projects/{private}/members",
        json={"user_id": bob_user["user_id"], "role": "editor"},
        headers=ada,
    )
    assert added.status_code == 201, added.text
    assert added.json()["role"] == "editor"
    assert (await api.client.get(f"/projects/{private}", headers=bob)).status_code == 200
    listed = await api.client.get(f"/projects/{private}/members", headers=bob)
    assert [m["user_id"] for m in listed.json()] == [bob_user["user_id"]]
    denied = await api.client.post(
        f"/projects/{ids[1]}/members", json={"user_id": bob_user["user_id"]}, headers=bob
    )
    assert denied.status_code in (403, 404)
    removed = await api.client.delete(
        f"/projects/{private}/members/{bob_user['user_id']}", headers=ada
    )
    assert removed.status_code == 204
    assert (await api.client.get(f"/projects/{private}", headers=bob)).status_code == 404
    malformed = await api.client.post(
        f"/projects/{private}/members", json={"user_id": "not an id!"}, headers=ada
    )
    assert malformed.status_code == 400 and malformed.json()["field"] == "user_id"


async def test_tasks_create_assign_change_status_and_list_with_filters(api: Api):
    _, ada = await api.user("ada")
    bob_user, _bob = await api.user("bob")
    project = (await api.client.post("/projects", json={"name": "Engine"}, headers=ada)).json()
    pid = project["project_id"]
    await api.client.post(
        f"/projects/{pid}/members", json={"user_id": bob_user["user_id"]}, headers=ada
    )
    created = []
    for n in range(5):
        answer = await api.client.post(
            f"/projects/{pid}/tasks",
            json={"title": f"Part {n}", "priority": "high" if n % 2 else "low"},
            headers=ada,
        )
        assert answer.status_code == 201, answer.text
        created.append(answer.json())
    task = created[0]
    assigned = await api.client.put(
        f"/tasks/{task['task_id']}/assignee", json={"user_id": bob_user["user_id"]}, headers=ada
    )
    assert assigned.status_code == 200 and assigned.json()["assignee_id"] == bob_user["user_id"]
    moved = await api.client.put(
        f"/tasks/{task['task_id']}/status", json={"status": "in_progress"}, headers=ada
    )
    assert moved.json()["status"] == "in_progress"
    illegal = await api.client.put(
        f"/tasks/{created[1]['task_id']}/status", json={"status": "done"}, headers=ada
    )
    assert illegal.status_code == 409 and illegal.json()["error"] == "illegal_transition"

    mine = await api.client.get(
        "/tasks", params={"assignee_id": bob_user["user_id"], "status": "in_progress"}, headers=ada
    )
    assert [t["task_id"] for t in mine.json()["items"]] == [task["task_id"]]
    high, cursor = [], None
    while True:
        params = {"project_id": pid, "priority": "high", "limit": 1}
        if cursor:
            params["after"] = cursor
        page = (await api.client.get("/tasks", params=params, headers=ada)).json()
        high += [t["title"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert high == ["Part 1", "Part 3"]
    missing = await api.client.get("/tasks/does-not-exist", headers=ada)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    outsider = await api.register("eve")
    del outsider
    eve = await api.login("eve")
    assert (await api.client.get(f"/tasks/{task['task_id']}", headers=eve)).status_code == 404


async def test_an_idempotency_key_makes_a_retried_write_apply_once(api: Api):
    _, ada = await api.user("ada")
    pid = (await api.client.post("/projects", json={"name": "E"}, headers=ada)).json()["project_id"]
    headers = {**ada, "Idempotency-Key": "retry-1"}
    first = await api.client.post(f"/projects/{pid}/tasks", json={"title": "Once"}, headers=headers)
    again = await api.client.post(f"/projects/{pid}/tasks", json={"title": "Once"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["task_id"] == again.json()["task_id"]
    listed = await api.client.get("/tasks", params={"project_id": pid}, headers=ada)
    assert len(listed.json()["items"]) == 1
    other = await api.client.post(
        f"/projects/{pid}/tasks", json={"title": "Once"}, headers={**ada, "Idempotency-Key": "2"}
    )
    assert other.json()["task_id"] != first.json()["task_id"]
    bad = await api.client.post(
        f"/projects/{pid}/tasks", json={"title": "x"}, headers={**ada, "Idempotency-Key": "a b"}
    )
    assert bad.status_code == 400 and bad.json()["field"] == "Idempotency-Key"


async def test_an_idempotency_key_passes_through_registration_login_and_status_changes(api: Api):
    body = {"email": "kim@example.com", "username": "kim", "password": PASSWORD}
    key = {"Idempotency-Key": "signup-1"}
    first = await api.client.post("/users", json=body, headers=key)
    again = await api.client.post("/users", json=body, headers=key)
    assert first.status_code == again.status_code == 201
    assert first.json()["user_id"] == again.json()["user_id"]
    login = {"email": "kim@example.com", "password": PASSWORD}
    started = await api.client.post("/sessions", json=login, headers={"Idempotency-Key": "in-1"})
    assert started.status_code == 201
    # the first login's token cannot be shown again: the resent one is refused
    resent = await api.client.post("/sessions", json=login, headers={"Idempotency-Key": "in-1"})
    assert resent.status_code == 409 and resent.json()["error"] == "already_exists"
    kim = {"Authorization": f"Bearer {started.json()['token']}"}
    pid = (await api.client.post("/projects", json={"name": "K"}, headers=kim)).json()["project_id"]
    tid = (
        await api.client.post(f"/projects/{pid}/tasks", json={"title": "T"}, headers=kim)
    ).json()["task_id"]
    change = {**kim, "Idempotency-Key": "status-1"}
    moved = await api.client.put(
        f"/tasks/{tid}/status", json={"status": "in_progress"}, headers=change
    )
    assert moved.status_code == 200 and moved.json()["status"] == "in_progress"
    await api.client.put(f"/tasks/{tid}/status", json={"status": "todo"}, headers=kim)
    # resent after another change: the first outcome, not a second transition
    resent_change = await api.client.put(
        f"/tasks/{tid}/status", json={"status": "in_progress"}, headers=change
    )
    assert resent_change.status_code == 200 and resent_change.json()["status"] == "todo"


async def test_audit_queries_are_for_admins_and_carry_the_request_id(api: Api):
    _, ada = await api.user("ada")
    root = await api.admin()
    await api.client.post(
        "/projects", json={"name": "Traced"}, headers={**ada, "X-Request-ID": "req-42"}
    )
    denied = await api.client.get("/audit/events", headers=ada)
    assert denied.status_code == 403 and denied.json()["error"] == "permission_denied"
    found = await api.client.get("/audit/events", params={"correlation_id": "req-42"}, headers=root)
    assert found.status_code == 200
    assert [e["event_type"] for e in found.json()] == ["ProjectCreated"]
    refused = await api.client.get(
        "/audit/events", params={"event_type": "CommandRejected"}, headers=root
    )
    assert any(e["data"]["error_code"] == "permission_denied" for e in refused.json())


async def test_a_request_is_a_server_span_with_its_commands_and_queries_below(api: Api):
    from tests.telemetry.support import in_memory

    with in_memory() as otel:
        answer = await api.client.post(
            "/users",
            json={"email": "ada@example.com", "username": "ada", "password": PASSWORD},
        )
    assert answer.status_code == 201
    (request,) = otel.named("POST /users")
    assert request.attributes["http.route"] == "/users"
    assert request.attributes["http.response.status_code"] == 201
    below = {s.name for s in otel.descendants(request)}
    assert {"tiu.command RegisterUser", "SELECT users"} <= below


async def test_health_and_metrics(api: Api):
    assert (await api.client.get("/health/live")).json() == {"status": "ok"}
    ready = await api.client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    await api.register("ada")
    metrics = await api.client.get("/metrics")
    assert metrics.status_code == 200
    assert "tiu_command_duration_seconds_count" in metrics.text
    assert 'tiu_command_type="RegisterUser"' in metrics.text


@pytest.mark.sqlite
async def test_readiness_is_red_while_migrations_are_pending(tmp_path):
    service = DatabaseService(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/new.db"))
    try:
        app = create_app(service)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
            ready = await client.get("/health/ready")
            assert (await client.get("/health/live")).status_code == 200
    finally:
        await service.aclose()
    assert ready.status_code == 503
    assert ready.json()["pending_migrations"] is True and ready.json()["ready"] is False


@pytest.mark.postgres
async def test_readiness_is_red_while_the_store_is_down():
    service = DatabaseService(
        Settings(database_url="postgresql+asyncpg://postgres@127.0.0.1:1/test", pool_timeout=1)
    )
    try:
        app = create_app(service)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
            ready = await client.get("/health/ready")
    finally:
        await service.aclose()
    assert ready.status_code == 503
    assert ready.json()["healthy"] is False and ready.json()["error"]


async def test_expired_sessions_are_cleaned_up_in_the_background(service, clock):
    app = create_app(service, cleanup_interval=0.05)
    async with service.get_repositories() as repos:
        await repos.get_user_repository().create_user(
            email="ada@example.com", username="ada", password=PASSWORD
        )
        started = await repos.get_session_repository().create_session("ada@example.com", PASSWORD)
    clock.advance(hours=13)
    async with app.router.lifespan_context(app):
        for _ in range(200):
            await asyncio.sleep(0.05)
            async with service.get_repositories() as repos:
                session = await repos.get_session_repository().get_session(
                    started.session.session_id
                )
            if session is not None and session.revoked_at is not None:
                break
    assert session is not None and session.revoked_at is not None


def test_the_error_table_answers_retry_after_where_waiting_helps():
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, tzinfo=UTC)
    locked = response_for(AccountLocked(now + timedelta(seconds=90)), now)
    assert locked.status_code == 401 and locked.headers["Retry-After"] == "90"
    assert response_for(PoolExhausted(2.5), now).headers["Retry-After"] == "3"
    for error in (StoreUnavailable("down"), ConcurrencyError("busy")):
        answer = response_for(error, now)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert response_for(WeakPassword(["too short"]), now).status_code == 400
    assert "Retry-After" not in response_for(InvalidCredentials(), now).headers
    assert response_for(ValueError("not ours"), now) is None
    # most specific first: no row is shadowed by an earlier, broader one
    for i, row in enumerate(TABLE):
        assert not any(issubclass(row.error, earlier.error) for earlier in TABLE[:i]), row


def test_the_openapi_schema_declares_every_body_and_every_error_answer():
    schema = create_app().openapi()
    error_body = "#/components/schemas/ErrorBody"
    operations = [
        (f"{method.upper()} {path}", operation)
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    ]
    assert len(operations) >= 17
    for name, operation in operations:
        answers = operation["responses"]
        success = [code for code in answers if code.startswith("2")]
        assert success, f"{name} declares no success"
        for code in success:
            if code != "204":
                content = answers[code]["content"]
                media = next(iter(content.values()))
                assert media["schema"], f"{name} {code} has no schema"
        if "operations" in operation["tags"]:  # health and metrics: no error table
            assert not {"400", "401", "403", "404", "409"} & set(answers), name
            continue
        for code in ("400", "401", "403", "404", "409", "503"):
            body = answers[code]["content"]["application/json"]["schema"]
            assert body == {"$ref": error_body}, f"{name} {code}"
        if "requestBody" in operation:
            content = operation["requestBody"]["content"]["application/json"]
            assert content["schema"]["$ref"].startswith("#/components/schemas/"), name
    assert {"error", "message"} <= set(schema["components"]["schemas"]["ErrorBody"]["required"])
