"""The seed API as written (the original specification's usage examples and repository methods),
as event-sourced commands and queries, on both backends."""

from __future__ import annotations

import gzip
import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from domain.permissions import SYSTEM_ACTOR
from eventstore import verify
from eventstore.retention import RetentionError
from eventstore.schema import events
from tests.conftest import PASSWORD
from tiu import BulkOperationError, InvalidCommand, NotFound, PermissionDenied

pytestmark = pytest.mark.least_privilege


async def test_seed_basic_usage_as_written(service):
    async with service.get_repositories() as repos:
        user_repo = repos.get_user_repository()
        user = await user_repo.create_user(
            email="test@example.com", username="testuser", password="SecurePass123!"
        )
    assert user is not None
    assert (user.email, user.username) == ("test@example.com", "testuser")


async def test_seed_transaction_example_as_written(service):
    async def create_user_with_project(repositories):
        user_repo = repositories.get_user_repository()
        project_repo = repositories.get_project_repository()

        user = await user_repo.create_user(
            email="grace@example.com", username="grace", password=PASSWORD
        )
        project = await project_repo.create_project(
            owner_id=user.id, name="Compiler", description="The A-0 system"
        )

        return user, project

    user, project = await service.execute_in_transaction(create_user_with_project)
    assert project.owner_id == user.id
    async with service.get_repositories(actor_id=user.id) as repos:
        assert await repos.get_project_repository().get_project(project.id) == project


async def test_naming_another_owner_is_for_the_service_and_admins_only(service):
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        admin = await repos.users.create_user(
            email="root@example.com", username="root", password=PASSWORD, roles=["admin"]
        )
        ada = await repos.users.create_user(
            email="ada@example.com", username="ada", password=PASSWORD
        )
        bob = await repos.users.create_user(
            email="bob@example.com", username="bob", password=PASSWORD
        )
    async with service.get_repositories(actor_id=admin.id) as repos:
        made = await repos.projects.create_project("For Ada", owner_id=ada.id)
        assert made.owner_id == ada.id
        with pytest.raises(NotFound):
            await repos.projects.create_project("For nobody", owner_id="no-such-user")
    async with service.get_repositories(actor_id=bob.id) as repos:
        with pytest.raises(PermissionDenied):
            await repos.projects.create_project("Mine, says Bob", owner_id=ada.id)
        own = await repos.projects.create_project("Bob's", owner_id=bob.id)
        assert own.owner_id == bob.id
    async with service.get_repositories(actor_id=admin.id) as repos:
        denials = await repos.audit.failed(actor_id=bob.id)
    assert [d.data["error_code"] for d in denials] == ["permission_denied"]


async def test_deleting_a_task_drops_its_row_keeps_its_history_and_refuses_further_commands(
    service,
):
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        owner = await repos.users.create_user(
            email="o@example.com", username="owner", password=PASSWORD
        )
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Apollo")
        keep = await repos.tasks.create_task(project.id, "Keep")
        gone = await repos.tasks.create_task(project.id, "Go")
        await repos.tasks.update_task_status(gone.id, "in_progress")
        await repos.tasks.delete_task(gone.id)
        assert await repos.tasks.get_task(gone.id) is None
        assert [t.id for t in await repos.tasks.get_project_tasks(project.id)] == [keep.id]
        stats = await repos.projects.get_project_statistics(project.id)
        assert (stats.total, stats.by_status["in_progress"], stats.by_status["todo"]) == (1, 0, 1)
        for refused in (
            lambda: repos.tasks.update_task_status(gone.id, "review"),
            lambda: repos.tasks.edit_task(gone.id, title="Back"),
            lambda: repos.tasks.delete_task(gone.id),
        ):
            with pytest.raises(NotFound):
                await refused()
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        history = await repos.audit.get_events(stream_id=f"task-{gone.id}", newest_first=False)
    assert [e.event_type for e in history] == ["TaskCreated", "TaskStatusChanged", "TaskDeleted"]
    assert history[-1].actor_id == owner.id
    assert history[-1].data["by"] == owner.id


async def test_deleting_a_project_takes_its_tasks_and_members_from_the_read_models(service):
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        admin = await repos.users.create_user(
            email="root@example.com", username="root", password=PASSWORD, roles=["admin"]
        )
        owner = await repos.users.create_user(
            email="o@example.com", username="owner", password=PASSWORD
        )
        member = await repos.users.create_user(
            email="m@example.com", username="member", password=PASSWORD
        )
    async with service.get_repositories(actor_id=owner.id) as repos:
        doomed = await repos.projects.create_project("Doomed")
        other = await repos.projects.create_project("Other")
        await repos.projects.add_member(doomed.id, member.id, "editor")
        task = (
            await repos.tasks.create_tasks(
                [{"project_id": doomed.id, "title": f"t{n}"} for n in range(3)]
            )
        )[0]
        survivor = await repos.tasks.create_task(other.id, "Survivor")
    async with service.get_repositories(actor_id=member.id) as repos:
        with pytest.raises(PermissionDenied):  # an editor may not delete the project
            await repos.projects.delete_project(doomed.id)
    async with service.get_repositories(actor_id=owner.id) as repos:
        await repos.projects.delete_project(doomed.id)
        assert await repos.projects.get_project(doomed.id) is None
        assert [p.id for p in await repos.projects.get_user_projects()] == [other.id]
        assert [t.id for t in await repos.tasks.list_tasks()] == [survivor.id]
        for refused in (
            lambda: repos.projects.get_members(doomed.id),
            lambda: repos.projects.get_project_statistics(doomed.id),
            lambda: repos.projects.restore_project(doomed.id),
            lambda: repos.projects.delete_project(doomed.id),
            lambda: repos.tasks.update_task_status(task.id, "in_progress"),
            lambda: repos.tasks.create_task(doomed.id, "After"),
        ):
            with pytest.raises(NotFound):
                await refused()
    async with service.get_repositories(actor_id=admin.id) as repos:
        history = await repos.audit.get_events(stream_id=f"project-{doomed.id}")
        assert history[0].event_type == "ProjectDeleted"
        assert history[0].actor_id == owner.id
        assert await repos.audit.get_events(stream_id=f"task-{task.id}")  # kept in the log
        # Bulk deletes: all or nothing, one key per call.
        tasks = [await repos.tasks.create_task(other.id, f"b{n}") for n in range(2)]
        with pytest.raises(BulkOperationError) as refused:
            await repos.tasks.bulk_delete_tasks([tasks[0].id, "no-such-task"])
        assert refused.value.index == 1
        assert await repos.tasks.get_task(tasks[0].id) is not None
        assert await repos.tasks.bulk_delete_tasks([t.id for t in tasks], command_id="b") == 2
        assert [t.id for t in await repos.tasks.list_tasks()] == [survivor.id]
        assert await repos.projects.bulk_delete_projects([other.id]) == 1
        assert await repos.tasks.list_tasks() == []
    async with service.engine.connect() as conn:
        assert (await verify(conn)).ok


async def test_sessions_show_their_ip_and_user_agent(service):
    async with service.get_repositories() as repos:
        await repos.users.create_user(email="s@example.com", username="sam", password=PASSWORD)
    async with service.get_repositories(ip="203.0.113.9", user_agent="Browser/1.0") as repos:
        started = await repos.sessions.create_session("s@example.com", PASSWORD)
        assert (started.session.ip, started.session.user_agent) == ("203.0.113.9", "Browser/1.0")
        listed = await repos.sessions.get_user_sessions(started.user.id)
    assert [(s.ip, s.user_agent) for s in listed] == [("203.0.113.9", "Browser/1.0")]


async def test_user_activity_through_the_user_repository(service):
    async with service.get_repositories() as repos:
        user = await repos.users.create_user(
            email="u@example.com", username="una", password=PASSWORD
        )
        with pytest.raises(Exception, match="invalid email or password"):
            await repos.users.authenticate("u@example.com", "not-the-password-1")
        await repos.sessions.create_session("u@example.com", PASSWORD)
    async with service.get_repositories(actor_id=user.id) as repos:
        project = await repos.projects.create_project("Mine")
        task = await repos.tasks.create_task(project.id, "Do", assignee_id=user.id)
        for status in ("in_progress", "review", "done"):
            await repos.tasks.update_task_status(task.id, status)
        activity = await repos.users.get_user_activity(user.id)
        assert await repos.users.get_user_activity("no-such-user") is None
        busy = await repos.users.list_user_activity({"tasks_completed__gte": 1})
    assert (activity.logins, activity.failed_logins) == (1, 1)
    assert (activity.tasks_created, activity.tasks_completed, activity.tasks_assigned) == (1, 1, 1)
    assert [a.user_id for a in busy] == [user.id]


async def test_audit_retention_from_python_follows_the_cli_rules(service, clock, tmp_path):
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        admin = await repos.users.create_user(
            email="root@example.com", username="root", password=PASSWORD, roles=["admin"]
        )
        user = await repos.users.create_user(
            email="u@example.com", username="una", password=PASSWORD
        )
    async with service.get_repositories(actor_id=user.id) as repos:
        for _ in range(3):
            with pytest.raises(PermissionDenied):
                await repos.users.deactivate(admin.id)
        with pytest.raises(PermissionDenied):  # needs audit:read; the denial is recorded
            await repos.audit.archive(before=clock.now + timedelta(days=1))
    clock.advance(days=2)
    async with service.get_repositories(actor_id=admin.id) as repos:
        with pytest.raises(InvalidCommand):
            await repos.audit.archive(before=clock.now.replace(tzinfo=None))
        if str(service.engine.url.username).startswith("tiu_app_"):
            # The least-privilege role may not remove events: a typed refusal.
            with pytest.raises(RetentionError, match="owner"):
                await repos.audit.archive(before=clock.now, output=tmp_path / "security.jsonl.gz")
            return
        report = await repos.audit.archive(
            before=clock.now - timedelta(days=1), output=tmp_path / "security.jsonl.gz"
        )
    assert report.count == 3  # of the 4 denials, each stream keeps its newest event
    with gzip.open(report.path, "rt") as archived:
        lines = [json.loads(line) for line in archived]
    assert {line["event_type"] for line in lines} == {"CommandRejected"}
    async with service.engine.connect() as conn:
        assert (await verify(conn)).ok
        record = (
            await conn.execute(
                select(events.c.actor_id).where(events.c.event_type == "AuditArchived")
            )
        ).one()
    assert record.actor_id == admin.id
    again = await service.archive_audit_log(before=clock.now - timedelta(days=1))
    assert again.count == 0 and again.path is None


async def test_the_seed_repository_tour(service, clock):
    """The seed's repository features, one after another, as a service would use them."""
    async with service.get_repositories() as repos:
        user = await repos.users.create_user(
            email="tour@example.com", username="tour", password=PASSWORD
        )
    async with service.get_repositories(actor_id=user.id) as repos:
        project = await repos.projects.create_project("Tour", "seed tour", "public")
        created = await repos.tasks.create_tasks(
            [
                {
                    "project_id": project.id,
                    "title": "a",
                    "due_date": clock.now + timedelta(hours=1),
                },
                {
                    "project_id": project.id,
                    "title": "b",
                    "due_date": clock.now - timedelta(hours=1),
                },
            ]
        )
        assert await repos.tasks.bulk_update_task_status([t.id for t in created], "in_progress")
        assert [t.title for t in await repos.tasks.get_overdue_tasks(project.id)] == ["b"]
        assert [t.title for t in await repos.tasks.get_due_soon_tasks(project_id=project.id)] == [
            "a"
        ]
        assert [p.name for p in await repos.projects.search_projects("tou")] == ["Tour"]
        await repos.projects.archive_project(project.id)
        await repos.projects.restore_project(project.id)
        stats = await repos.projects.get_project_statistics(project.id)
        assert (stats.total, stats.overdue, stats.completion_rate) == (2, 1, 0.0)
        page = await repos.tasks.page_tasks(limit=1)
        assert len(page.items) == 1 and page.next_cursor is not None
        assert (await repos.tasks.page_tasks(limit=1, after=page.next_cursor)).items
    clock.advance(hours=13)
    assert await service.cleanup_expired_sessions() == 0
    assert (await service.health_check())["healthy"] is True
    assert (await service.get_statistics())["events_by_type"]["TaskCreated"] == 2


async def test_bulk_revoking_sessions_is_all_or_nothing_and_a_logout_by_their_user(service):
    async with service.get_repositories() as repos:
        await repos.users.create_user(email="s@example.com", username="sam", password=PASSWORD)
        first = await repos.sessions.create_session("s@example.com", PASSWORD)
        second = await repos.sessions.create_session("s@example.com", PASSWORD)
        ids = [first.session.id, second.session.id]
        with pytest.raises(BulkOperationError) as refused:
            await repos.sessions.bulk_revoke_sessions([*ids, "no-such-session"])
        assert (refused.value.index, type(refused.value.error)) == (2, NotFound)
        assert len(await repos.sessions.get_user_sessions(first.user.id)) == 2
        assert await repos.sessions.bulk_revoke_sessions(ids, command_id="logout-all") == 2
        assert await repos.sessions.bulk_revoke_sessions(ids, command_id="logout-all") == 2
        gone = await repos.sessions.get_user_sessions(first.user.id, active_only=False)
    assert {s.revoked_reason for s in gone} == {"logout"}


@pytest.mark.parametrize("task_id", ["a\x00b", "\ud800", "x" * 65, ""])
async def test_task_commands_on_an_id_no_task_can_have_are_not_found(service, task_id):
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        for call in (
            lambda: repos.tasks.delete_task(task_id),
            lambda: repos.tasks.update_task_status(task_id, "done"),
            lambda: repos.tasks.bulk_delete_tasks([task_id]),
        ):
            with pytest.raises((NotFound, BulkOperationError)):
                await call()
