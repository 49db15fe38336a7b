"""The example service against the real backends, through httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from domain.permissions import SYSTEM_ACTOR
from examples.service.app import create_app
from tests.conftest import PASSWORD
from tiu import DatabaseService


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient
    service: DatabaseService

    async def register(self, name: str) -> dict:
        answer = await self.client.post(
            "/users",
            json={"email": f"{name}@example.com", "username": name, "password": PASSWORD},
        )
        assert answer.status_code == 201, answer.text
        return answer.json()

    async def login(self, name: str, password: str = PASSWORD) -> dict[str, str]:
        answer = await self.client.post(
            "/sessions", json={"email": f"{name}@example.com", "password": password}
        )
        assert answer.status_code == 201, answer.text
        return {"Authorization": f"Bearer {answer.json()['token']}"}

    async def user(self, name: str) -> tuple[dict, dict[str, str]]:
        return await self.register(name), await self.login(name)

    async def admin(self, name: str = "root") -> dict[str, str]:
        async with self.service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
            await repos.get_user_repository().create_user(
                email=f"{name}@example.com", username=name, password=PASSWORD, roles=["admin"]
            )
        return await self.login(name)


@pytest.fixture
async def api(service: DatabaseService) -> AsyncIterator[Api]:
    app = create_app(service)
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 4711))
    async with httpx.AsyncClient(transport=transport, base_url="http://service.test") as client:
        yield Api(app, client, service)
