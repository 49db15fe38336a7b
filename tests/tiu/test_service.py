"""The face users hold, on both backends."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text

from domain.permissions import SYSTEM_ACTOR
from tests.conftest import PASSWORD
from tiu import (
    AccountLocked,
    AlreadyExists,
    BulkOperationError,
    IllegalTransition,
    InvalidCredentials,
    InvalidFilter,
    NotFound,
    Page,
    PermissionDenied,
    Priority,
    Project,
    Task,
    WeakPassword,
)

# These storage tests also run as the least-privilege role of sql/app_role.sql.
pytestmark = pytest.mark.least_privilege


async def make_user(service, name: str, **extra):
    async with service.get_repositories() as repos:
        return await repos.get_user_repository().create_user(
            email=f"{name}@example.com", username=name, password=PASSWORD, **extra
        )


async def test_seed_example_create_a_user(service):
    async with service.get_repositories() as repos:
        users = repos.get_user_repository()
        user = await users.create_user(
            email="Ada@Example.com", username="ada", password=PASSWORD, display_name="Ada"
        )
        assert user is not None
        assert user.email == "Ada@example.com"
        assert user.roles == ("member",)
        assert await users.get_by_email("ada@example.com") == user
        assert await users.get_by_username("ADA") == user
        assert "tasks:write" in await users.get_user_permissions(user.id)


async def test_seed_example_user_and_project_in_one_transaction(service):
    async def create_user_with_project(repos):
        user = await repos.get_user_repository().create_user(
            email="grace@example.com", username="grace", password=PASSWORD
        )
        project = (
            await repos.as_actor(user.id)
            .get_project_repository()
            .create_project("Compiler", "A-0", visibility="private")
        )
        return user, project

    user, project = await service.execute_in_transaction(create_user_with_project)
    assert project.owner_id == user.id
    async with service.get_repositories(actor_id=user.id) as repos:
        assert await repos.get_project_repository().get_project(project.id) == project


async def test_a_transaction_that_fails_half_way_leaves_nothing(service):
    await make_user(service, "linus")

    async def work(repos):
        await repos.get_user_repository().create_user(
            email="new@example.com", username="newbie", password=PASSWORD
        )
        await repos.get_user_repository().create_user(
            email="linus@example.com", username="other", password=PASSWORD
        )

    with pytest.raises(AlreadyExists):
        await service.execute_in_transaction(work)
    async with service.get_repositories() as repos:
        assert await repos.get_user_repository().get_by_email("new@example.com") is None
    stats = await service.get_statistics()
    assert stats["events_by_type"] == {"UserRegistered": 1}


async def test_weak_passwords_are_refused_with_the_reason(service):
    async with service.get_repositories() as repos:
        with pytest.raises(WeakPassword) as weak:
            await repos.get_user_repository().create_user(
                email="x@example.com", username="xavier", password="short"
            )
    assert "12" in str(weak.value)


async def test_authentication_does_not_reveal_which_emails_exist(service):
    await make_user(service, "mia")
    async with service.get_repositories() as repos:
        users = repos.get_user_repository()
        assert (await users.authenticate("mia@example.com", PASSWORD)).username == "mia"
        with pytest.raises(InvalidCredentials) as unknown:
            await users.authenticate("nobody@example.com", PASSWORD)
        with pytest.raises(InvalidCredentials) as wrong:
            await users.authenticate("mia@example.com", "not-the-password-9")
    assert str(unknown.value) == str(wrong.value)


async def test_lockout_then_admin_unlock(service, clock):
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        admin = await repos.get_user_repository().create_user(
            email="root@example.com", username="root", password=PASSWORD, roles=["admin"]
        )
    victim = await make_user(service, "nina")
    async with service.get_repositories() as repos:
        users = repos.get_user_repository()
        for _ in range(service.policy.lockout_threshold):
            with pytest.raises(InvalidCredentials):
                await users.authenticate("nina@example.com", "wrong-password-000")
        with pytest.raises(AccountLocked) as locked:
            await users.authenticate("nina@example.com", PASSWORD)
        assert locked.value.until > clock.now
    async with service.get_repositories(actor_id=admin.id) as repos:
        await repos.get_user_repository().unlock(victim.id)
    async with service.get_repositories() as repos:
        again = await repos.get_user_repository().authenticate("nina@example.com", PASSWORD)
        assert again.id == victim.id


async def test_sessions_validate_then_expire_idle_and_die_on_password_change(service, clock):
    user = await make_user(service, "omar")
    async with service.get_repositories() as repos:
        sessions = repos.get_session_repository()
        started = await sessions.create_session("omar@example.com", PASSWORD)
        assert len(started.token) >= 43
        ok = await sessions.validate_session(started.token)
        assert ok.valid and ok.user.id == user.id and "tasks:write" in ok.permissions
        assert (await sessions.validate_session("forged-token")).reason == "unknown"
        clock.advance(minutes=45)
        assert (await sessions.validate_session(started.token)).reason == "idle"

        second = await sessions.create_session("omar@example.com", PASSWORD)
        assert (await sessions.validate_session(second.token)).valid
    clock.advance(seconds=1)
    async with service.get_repositories(actor_id=user.id) as repos:
        await repos.get_user_repository().change_password(user.id, PASSWORD, PASSWORD + "-new")
        after = await repos.get_session_repository().validate_session(second.token)
        assert after.reason == "revoked"


async def test_logout_revokes_and_cleanup_revokes_expired_sessions(service, clock):
    user = await make_user(service, "pia")
    async with service.get_repositories() as repos:
        sessions = repos.get_session_repository()
        one = await sessions.create_session("pia@example.com", PASSWORD)
        two = await sessions.create_session("pia@example.com", PASSWORD)
    async with service.get_repositories(actor_id=user.id) as repos:
        await repos.get_session_repository().revoke(one.session.id)
        after = await repos.get_session_repository().validate_session(one.token)
        assert after.reason == "revoked"
    clock.advance(hours=13)
    assert await service.cleanup_expired_sessions() == 1
    async with service.get_repositories() as repos:
        expired = await repos.get_session_repository().get_session(two.session.id)
        assert expired.revoked_at is not None


async def test_private_projects_and_their_tasks_are_invisible_to_outsiders(service):
    owner = await make_user(service, "quinn")
    member = await make_user(service, "rita")
    outsider = await make_user(service, "sam")
    async with service.get_repositories(actor_id=owner.id) as repos:
        projects = repos.get_project_repository()
        secret = await projects.create_project("Secret", visibility="private")
        open_ = await projects.create_project("Open", visibility="public")
        await projects.add_member(secret.id, member.id, "editor")
        await repos.get_task_repository().create_task(secret.id, "Hidden task")
        await repos.get_task_repository().create_task(open_.id, "Visible task")

    async with service.get_repositories(actor_id=outsider.id) as repos:
        projects = repos.get_project_repository()
        tasks = repos.get_task_repository()
        assert await projects.get_project(secret.id) is None
        assert [p.name for p in await projects.get_user_projects()] == ["Open"]
        assert [p.name for p in await projects.search_projects("e")] == ["Open"]
        private = await projects.search_projects(filters={"visibility": "private"})
        assert private == []
        assert [t.title for t in await tasks.list_tasks()] == ["Visible task"]
        assert await tasks.count_tasks({"title__contains": "Hidden"}) == 0
        assert await tasks.get_project_tasks(secret.id) == []
        with pytest.raises(NotFound):
            await projects.get_project_statistics(secret.id)
        with pytest.raises(PermissionDenied):
            await tasks.create_task(open_.id, "Not allowed")

    async with service.get_repositories(actor_id=member.id) as repos:
        assert {p.name for p in await repos.get_project_repository().get_user_projects()} == {
            "Secret",
            "Open",
        }
        assert len(await repos.get_task_repository().get_project_tasks(secret.id)) == 1


async def test_a_granted_read_all_permission_shows_every_project_from_the_next_session(service):
    owner = await make_user(service, "tara")
    viewer = await make_user(service, "uma")
    async with service.get_repositories(actor_id=owner.id) as repos:
        vault = await repos.get_project_repository().create_project("Vault", visibility="private")
        await repos.get_task_repository().create_task(vault.id, "Inside")
    async with service.get_repositories(actor_id=viewer.id) as repos:
        assert await repos.get_task_repository().count_tasks() == 0
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        await repos.get_user_repository().assign_role(viewer.id, "admin")
    async with service.get_repositories(actor_id=viewer.id) as repos:
        found = await repos.get_project_repository().get_project(vault.id)
        assert found is not None and found.name == "Vault"
        assert [t.title for t in await repos.get_task_repository().list_tasks()] == ["Inside"]
        assert await repos.get_task_repository().count_tasks() == 1


async def test_task_lifecycle_statistics_overdue_and_due_soon(service, clock):
    owner = await make_user(service, "tara")
    async with service.get_repositories(actor_id=owner.id) as repos:
        projects = repos.get_project_repository()
        tasks = repos.get_task_repository()
        project = await projects.create_project("Pipeline")
        late = await tasks.create_task(project.id, "Late", due_date=clock.now + timedelta(hours=1))
        soon = await tasks.create_task(project.id, "Soon", due_date=clock.now + timedelta(days=2))
        done = await tasks.create_task(project.id, "Done")
        await tasks.assign_task(late.id, owner.id)
        for status in ("in_progress", "review", "done"):
            await tasks.update_task_status(done.id, status)
        with pytest.raises(IllegalTransition):
            await tasks.update_task_status(late.id, "done")
        clock.advance(hours=2)
        assert [t.id for t in await tasks.get_overdue_tasks()] == [late.id]
        assert [t.id for t in await tasks.get_due_soon_tasks()] == [soon.id]
        assert [t.id for t in await tasks.get_user_tasks()] == [late.id]
        stats = await projects.get_project_statistics(project.id)
    assert stats.total == 3
    assert stats.by_status["done"] == 1
    assert stats.overdue == 1
    assert stats.completion_rate == pytest.approx(1 / 3)


async def test_an_archived_project_refuses_new_tasks(service):
    owner = await make_user(service, "uma")
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.get_project_repository().create_project("Old")
        await repos.get_project_repository().archive_project(project.id)
        with pytest.raises(Exception, match="archived"):
            await repos.get_task_repository().create_task(project.id, "Too late")
        await repos.get_project_repository().restore_project(project.id)
        assert await repos.get_task_repository().create_task(project.id, "Fine now")


async def test_bulk_operations_are_all_or_nothing_and_name_the_failing_item(service):
    owner = await make_user(service, "vera")
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.get_project_repository().create_project("Bulk")
        tasks = repos.get_task_repository()
        created = await tasks.create_tasks(
            [{"project_id": project.id, "title": f"T{n}"} for n in range(5)]
        )
        ids = [t.id for t in created]
        assert await tasks.bulk_update_task_status(ids, "in_progress") == 5
        await tasks.update_task_status(ids[2], "review")
        with pytest.raises(BulkOperationError) as refused:
            await tasks.bulk_update_task_status(ids, "todo")
        assert refused.value.index == 2
        assert refused.value.item == ids[2]
        assert isinstance(refused.value.error, IllegalTransition)
        statuses = [t.status for t in await tasks.get_project_tasks(project.id, order_by=["title"])]
        assert statuses == ["in_progress", "in_progress", "review", "in_progress", "in_progress"]
        assert await tasks.bulk_assign(ids, owner.id) == 5


async def test_bad_filters_are_refused_naming_the_field(service):
    owner = await make_user(service, "walt")
    async with service.get_repositories(actor_id=owner.id) as repos:
        with pytest.raises(InvalidFilter, match="stauts"):
            await repos.get_task_repository().list_tasks({"stauts": "todo"})
        with pytest.raises(InvalidFilter, match="token_hash"):
            await repos.get_task_repository().list_tasks({"token_hash": "x"})


async def test_audit_repository_reads_the_log_and_records_actions(service):
    user = await make_user(service, "xena")
    async with service.get_repositories(actor_id=user.id) as repos:
        await repos.get_audit_repository().log_action("export", "project", "p1", {"rows": 10})
        with pytest.raises(PermissionDenied):
            await repos.get_audit_repository().get_events()
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        entries = await repos.get_audit_repository().get_events(actor_id=user.id)
        assert [e.event_type for e in entries] == ["CommandRejected", "ActionLogged"]
        registered = await repos.get_audit_repository().get_events(event_types=["UserRegistered"])
        assert registered[0].data["password_hash"] == "[redacted]"


async def test_health_pool_and_statistics_are_plain_data(service):
    await make_user(service, "yuri")
    health = await service.health_check()
    assert health["healthy"] and health["pending_migrations"] is False
    assert "pool_class" in service.get_pool_status()
    stats = await service.get_statistics()
    assert stats["events_by_category"] == {"user": 1}
    assert stats["read_model_rows"]["users"] == 1
    assert stats["max_lag"] == 0


async def test_reads_take_one_snapshot_on_sqlite_and_skip_begin_on_postgres(service):
    """A repository read on SQLite holds a read transaction (one snapshot for all its
    statements). On PostgreSQL it runs without one: under READ COMMITTED each statement
    takes its own snapshot inside a transaction too, and BEGIN and ROLLBACK would be
    two round trips more."""
    async with service.get_repositories() as repos, repos.users._channel.read() as conn:
        await conn.execute(text("SELECT 1"))
        driver = (await conn.get_raw_connection()).driver_connection
        if service.engine.dialect.name == "sqlite":
            assert driver.in_transaction
        else:
            assert not driver.is_in_transaction()


async def test_pages_hold_typed_models_as_lists_do(service):
    owner = await make_user(service, "pager")
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Paged", visibility="public")
        for n in range(3):
            await repos.tasks.create_task(project.id, f"task {n}", priority="high")
        first = await repos.tasks.page_tasks({"project_id": project.id}, limit=2)
        rest = await repos.tasks.page_tasks(
            {"project_id": project.id}, limit=2, after=first.next_cursor
        )
        projects_page = await repos.projects.page_projects(limit=5)
    assert isinstance(first, Page)
    assert all(isinstance(t, Task) for t in first.items + rest.items)
    assert [t.title for t in first.items + rest.items] == ["task 0", "task 1", "task 2"]
    assert first.items[0].priority == Priority.HIGH
    assert rest.next_cursor is None
    assert project.id in [p.id for p in projects_page.items]
    assert all(isinstance(p, Project) for p in projects_page.items)


async def test_priority_sorts_and_compares_by_rank_not_by_name(service):
    owner = await make_user(service, "ranker")
    names = ["medium", "urgent", "low", "high"]  # by name: high < low < medium < urgent
    async with service.get_repositories(actor_id=owner.id) as repos:
        project = await repos.projects.create_project("Ranked", visibility="public")
        for name in names:
            await repos.tasks.create_task(project.id, name, priority=name)
        mine = {"project_id": project.id}
        ascending = await repos.tasks.list_tasks(mine, order_by=["priority"])
        descending = await repos.tasks.list_tasks(mine, order_by=["-priority"])
        above_medium = await repos.tasks.list_tasks({**mine, "priority__gt": "medium"})
        between = await repos.tasks.list_tasks({**mine, "priority__between": ["low", "medium"]})
        first = await repos.tasks.page_tasks(mine, order_by=["-priority"], limit=2)
        second = await repos.tasks.page_tasks(
            mine, order_by=["-priority"], limit=2, after=first.next_cursor
        )
        named = await repos.tasks.list_tasks({**mine, "priority": "high"})
        with pytest.raises(InvalidFilter) as refused:
            await repos.tasks.list_tasks({**mine, "priority__gt": "extreme"})
    assert [t.title for t in ascending] == ["low", "medium", "high", "urgent"]
    assert [t.title for t in descending] == ["urgent", "high", "medium", "low"]
    assert {t.title for t in above_medium} == {"high", "urgent"}
    assert {t.title for t in between} == {"low", "medium"}
    assert [t.title for t in first.items + second.items] == ["urgent", "high", "medium", "low"]
    assert [t.title for t in named] == ["high"]
    assert refused.value.field == "priority"


async def test_reads_in_a_transaction_see_the_read_model_rows_written_before_them(service):
    """execute_in_transaction's promise: reads inside see the writes before them, the
    rows of the inline projectors included (tasks, project_stats, user_activity)."""
    user = await make_user(service, "tessa")

    async def work(repos):
        projects, task_repo = repos.get_project_repository(), repos.get_task_repository()
        project = await projects.create_project("Inside")
        created = await task_repo.create_task(project.id, "inside")
        edited = await task_repo.edit_task(created.id, title="renamed")
        assigned = await task_repo.assign_task(created.id, user.id)
        done = await task_repo.update_task_status(created.id, "in_progress")
        stats = await projects.get_project_statistics(project.id)
        activity = await repos.get_user_repository().get_user_activity(user.id)
        return created, edited, assigned, done, stats, activity

    created, edited, assigned, done, stats, activity = await service.execute_in_transaction(
        work, actor_id=user.id
    )
    assert created.title == "inside"
    assert edited is not None and edited.title == "renamed"
    assert assigned is not None and assigned.assignee_id == user.id
    assert done is not None and done.status == "in_progress"
    assert (stats.total, stats.by_status["in_progress"]) == (1, 1)
    assert activity is not None
    assert (activity.tasks_created, activity.tasks_assigned) == (1, 1)


async def test_a_command_id_sent_twice_in_one_transaction_answers_as_the_first(service):
    user = await make_user(service, "kay")

    async def twice(repos):
        projects = repos.get_project_repository()
        first = await projects.create_project("Once", command_id="same-key")
        again = await projects.create_project("Once", command_id="same-key")
        return first, again

    first, again = await service.execute_in_transaction(twice, actor_id=user.id)
    assert first == again
    async with service.get_repositories(actor_id=user.id) as repos:
        assert [p.id for p in await repos.get_project_repository().get_user_projects(user.id)] == [
            first.id
        ]
