"""The service under uvicorn on 127.0.0.1, over a real socket: a scenario driven with
httpx, and schemathesis generating requests from the OpenAPI schema (a bounded number
of examples per operation) and finding no 500 and no response that breaks the schema."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from domain.permissions import SYSTEM_ACTOR
from examples.service.app import create_app
from tests.conftest import PASSWORD
from tiu import create_database_service

pytestmark = pytest.mark.sqlite

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _with_admin(url: str) -> None:
    service = await create_database_service(url, bcrypt_rounds=4)
    async with service, service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        await repos.get_user_repository().create_user(
            email="root@example.com", username="root", password=PASSWORD, roles=["admin"]
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app under uvicorn in a thread of its own (its own event loop), on an embedded
    SQLite file holding one admin."""
    import asyncio

    path: Path = tmp_path_factory.mktemp("served") / "service.db"
    url = f"sqlite+aiosqlite:///{path}"
    asyncio.run(_with_admin(url))
    port = free_port()
    app = create_app(database_url=url, bcrypt_rounds=4)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def login(base: str, email: str = "root@example.com", password: str = PASSWORD) -> dict:
    answer = httpx.post(f"{base}/sessions", json={"email": email, "password": password})
    assert answer.status_code == 201, answer.text
    return {"Authorization": f"Bearer {answer.json()['token']}"}


def test_a_scenario_over_a_real_socket(server: str):
    with httpx.Client(base_url=server, timeout=10) as client:
        assert client.get("/health/live").json() == {"status": "ok"}
        assert client.get("/health/ready").json()["ready"] is True
        user = client.post(
            "/users",
            json={"email": "ada@example.com", "username": "ada", "password": PASSWORD},
        )
        assert user.status_code == 201, user.text
        ada = login(server, "ada@example.com")
        project = client.post("/projects", json={"name": "Over the wire"}, headers=ada)
        assert project.status_code == 201, project.text
        pid = project.json()["project_id"]
        task = client.post(f"/projects/{pid}/tasks", json={"title": "Socket"}, headers=ada)
        assert task.status_code == 201, task.text
        listed = client.get("/tasks", params={"project_id": pid}, headers=ada).json()
        assert [t["title"] for t in listed["items"]] == ["Socket"]
        assert "tiu_command_duration_seconds" in client.get("/metrics").text
        assert client.delete("/sessions/current", headers=ada).status_code == 204
        assert client.get("/me", headers=ada).status_code == 401


@pytest.fixture
def admin(server: str) -> dict:
    return login(server)


def test_generated_requests_get_no_500_and_answers_that_match_the_schema(server, admin):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 17
    # Logging out ends the admin's session: last, so the others run authenticated.
    operations.sort(key=lambda operation: operation.path == "/sessions/current")
    for operation in operations:
        name = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy())
        @settings(
            max_examples=15,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            # the admin's token, not one generated from the security scheme
            case.headers = {**(case.headers or {}), **admin}
            case.call_and_validate(base_url=server, checks=CHECKS, timeout=30)

        try:
            check()
        except Exception as error:
            raise AssertionError(f"{name}: {error}") from error
