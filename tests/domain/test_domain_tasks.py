from datetime import datetime, timedelta

import pytest
from domain_support import (
    T0,
    actor,
    ctx,
    member_added,
    project_state,
    user_state,
)
from gwt import given

from domain import (
    AlreadyExists,
    Conflict,
    IllegalTransition,
    InvalidCommand,
    NotFound,
    PermissionDenied,
    ProjectRole,
    Role,
    projects,
    tasks,
    users,
)
from domain.tasks import TRANSITIONS, Priority, TaskStatus

DUE = T0 + timedelta(days=7)
PROJECT = project_state(member_added("ed", ProjectRole.EDITOR), member_added("vic", "viewer"))
AS_ED = {"project": PROJECT, **actor("ed")}
CREATED = tasks.TaskCreated(
    task_id="t1",
    project_id="p1",
    title="Write spec",
    description="",
    priority=Priority.MEDIUM,
    due_date=None,
    assignee_id=None,
    created_by="ed",
    at=T0,
)


def status(from_status, to_status):
    return tasks.TaskStatusChanged(
        task_id="t1",
        project_id="p1",
        from_status=from_status,
        to_status=to_status,
        by="ed",
        at=T0,
    )


def move(to):
    return tasks.ChangeTaskStatus(task_id="t1", project_id="p1", to=to)


def test_an_editor_creates_a_task_in_todo():
    command = tasks.CreateTask(task_id="t1", project_id="p1", title=" Write spec ")
    given().when(command, ctx=ctx("ed"), related=AS_ED).then(CREATED)
    state = tasks.evolve(tasks.initial_state(), CREATED)
    assert state.status is TaskStatus.TODO


def test_creating_with_an_assignee_checks_membership():
    command = tasks.CreateTask(
        task_id="t1",
        project_id="p1",
        title="Spec",
        priority=Priority.URGENT,
        assignee_id="vic",
        due_date=DUE,
    )
    events = (
        given()
        .when(command, ctx=ctx("ed"), related={**AS_ED, "assignee": user_state("vic")})
        .events()
    )
    assert (events[0].assignee_id, events[0].priority, events[0].due_date) == (
        "vic",
        Priority.URGENT,
        DUE,
    )
    outsider = command.model_copy(update={"assignee_id": "zed"})
    given().when(
        outsider, ctx=ctx("ed"), related={**AS_ED, "assignee": user_state("zed")}
    ).then_raises(Conflict)


def test_viewers_outsiders_and_read_only_accounts_cannot_write_tasks():
    command = tasks.CreateTask(task_id="t1", project_id="p1", title="Spec")
    for related in (
        {"project": PROJECT, **actor("vic")},
        {"project": PROJECT, **actor("zed")},
        {"project": PROJECT, **actor("ed", roles=(Role.VIEWER,))},
        {"project": PROJECT},
    ):
        given().when(command, ctx=ctx("ed"), related=related).then_raises(PermissionDenied)


def test_tasks_need_an_existing_unarchived_project():
    command = tasks.CreateTask(task_id="t1", project_id="p1", title="Spec")
    given().when(command, ctx=ctx("ed"), related=actor("ed")).then_raises(NotFound)
    archived = PROJECT.model_copy(update={"archived": True})
    given().when(command, ctx=ctx("ed"), related={**AS_ED, "project": archived}).then_raises(
        Conflict
    )


def test_creating_twice_and_touching_a_missing_task_are_refused():
    command = tasks.CreateTask(task_id="t1", project_id="p1", title="Spec")
    given(CREATED).when(command, ctx=ctx("ed"), related=AS_ED).then_raises(AlreadyExists)
    given().when(move(TaskStatus.IN_PROGRESS), ctx=ctx("ed"), related=AS_ED).then_raises(NotFound)


def test_a_task_is_only_found_under_its_own_project():
    other = project_state().model_copy(update={"project_id": "p2"})
    command = tasks.ChangeTaskStatus(task_id="t1", project_id="p2", to=TaskStatus.IN_PROGRESS)
    given(CREATED).when(
        command, ctx=ctx("owen"), related={"project": other, **actor("owen")}
    ).then_raises(NotFound)


def test_editing_changes_only_the_given_fields_and_can_clear_the_due_date():
    dated = CREATED.model_copy(update={"due_date": DUE})
    edit = tasks.EditTask(task_id="t1", project_id="p1", priority=Priority.HIGH)
    given(dated).when(edit, ctx=ctx("ed"), related=AS_ED).then(
        tasks.TaskEdited(
            task_id="t1",
            project_id="p1",
            title="Write spec",
            description="",
            priority=Priority.HIGH,
            due_date=DUE,
            by="ed",
        )
    )
    clear = tasks.EditTask(task_id="t1", project_id="p1", due_date=None)
    assert given(dated).when(clear, ctx=ctx("ed"), related=AS_ED).events()[0].due_date is None
    same = tasks.EditTask(task_id="t1", project_id="p1", title="Write spec")
    given(dated).when(same, ctx=ctx("ed"), related=AS_ED).then()
    blank = tasks.EditTask(task_id="t1", project_id="p1", title=" ")
    given(dated).when(blank, ctx=ctx("ed"), related=AS_ED).then_raises(InvalidCommand)


def test_due_dates_must_be_timezone_aware():
    with pytest.raises(InvalidCommand, match="timezone") as refused:
        tasks.CreateTask(project_id="p1", title="x", due_date=datetime(2025, 1, 1))
    assert refused.value.field == "due_date"


def test_assigning_needs_an_active_member_and_unassigning_is_idempotent():
    assign = tasks.AssignTask(task_id="t1", project_id="p1", assignee_id="owen")
    given(CREATED).when(
        assign, ctx=ctx("ed"), related={**AS_ED, "assignee": user_state("owen")}
    ).then(tasks.TaskAssigned(task_id="t1", project_id="p1", assignee_id="owen", by="ed"))
    gone = user_state("vic", users.UserDeactivated(user_id="vic", by="x", at=T0))
    given(CREATED).when(
        assign.model_copy(update={"assignee_id": "vic"}),
        ctx=ctx("ed"),
        related={**AS_ED, "assignee": gone},
    ).then_raises(Conflict)
    given(CREATED).when(assign, ctx=ctx("ed"), related=AS_ED).then_raises(NotFound)
    unassign = tasks.UnassignTask(task_id="t1", project_id="p1")
    given(CREATED).when(unassign, ctx=ctx("ed"), related=AS_ED).then()
    assigned = tasks.TaskAssigned(task_id="t1", project_id="p1", assignee_id="owen", by="ed")
    given(CREATED, assigned).when(unassign, ctx=ctx("ed"), related=AS_ED).then(
        tasks.TaskUnassigned(task_id="t1", project_id="p1", previous_assignee_id="owen", by="ed")
    )


@pytest.mark.parametrize(
    ("path", "to"),
    [
        ((), TaskStatus.IN_PROGRESS),
        ((TaskStatus.IN_PROGRESS,), TaskStatus.REVIEW),
        ((TaskStatus.IN_PROGRESS, TaskStatus.REVIEW), TaskStatus.DONE),
        ((TaskStatus.IN_PROGRESS, TaskStatus.REVIEW), TaskStatus.IN_PROGRESS),
        ((TaskStatus.IN_PROGRESS,), TaskStatus.TODO),
        ((TaskStatus.IN_PROGRESS,), TaskStatus.CANCELLED),
        ((TaskStatus.CANCELLED,), TaskStatus.TODO),
        ((TaskStatus.IN_PROGRESS, TaskStatus.REVIEW, TaskStatus.DONE), TaskStatus.TODO),
    ],
)
def test_allowed_status_changes(path, to):
    history, current = [CREATED], TaskStatus.TODO
    for step in path:
        history.append(status(current, step))
        current = step
    given(*history).when(move(to), ctx=ctx("ed"), related=AS_ED).then(status(current, to))


@pytest.mark.parametrize(
    ("path", "to"),
    [
        ((), TaskStatus.DONE),
        ((), TaskStatus.REVIEW),
        ((), TaskStatus.TODO),
        ((TaskStatus.CANCELLED,), TaskStatus.DONE),
        ((TaskStatus.IN_PROGRESS, TaskStatus.REVIEW, TaskStatus.DONE), TaskStatus.CANCELLED),
    ],
)
def test_illegal_status_changes_name_both_ends(path, to):
    history, current = [CREATED], TaskStatus.TODO
    for step in path:
        history.append(status(current, step))
        current = step
    error = (
        given(*history).when(move(to), ctx=ctx("ed"), related=AS_ED).then_raises(IllegalTransition)
    )
    assert (error.from_status, error.to_status) == (current, to)
    assert f"from {current.value!r} to {to.value!r}" in str(error)


def test_the_transition_table_covers_every_status():
    assert set(TRANSITIONS) == set(TaskStatus)
    assert [p.rank for p in Priority] == [1, 2, 3, 4]


def test_deleting_a_task_records_who_and_the_status_it_leaves_then_refuses_everything():
    started = status(TaskStatus.TODO, TaskStatus.IN_PROGRESS)
    delete = tasks.DeleteTask(task_id="t1", project_id="p1")
    deleted = tasks.TaskDeleted(
        task_id="t1", project_id="p1", status=TaskStatus.IN_PROGRESS, by="ed", at=T0
    )
    given(CREATED, started).when(delete, ctx=ctx("ed"), related=AS_ED).then(deleted)
    for command in (
        delete,
        move(TaskStatus.REVIEW),
        tasks.EditTask(task_id="t1", project_id="p1", title="Back"),
    ):
        given(CREATED, started, deleted).when(command, ctx=ctx("ed"), related=AS_ED).then_raises(
            NotFound
        )
    again = tasks.CreateTask(task_id="t1", project_id="p1", title="Again")
    given(CREATED, deleted).when(again, ctx=ctx("ed"), related=AS_ED).then_raises(AlreadyExists)
    as_vic = {"project": PROJECT, **actor("vic")}
    given(CREATED).when(delete, ctx=ctx("vic"), related=as_vic).then_raises(PermissionDenied)


def test_the_tasks_of_a_deleted_project_take_no_command():
    gone = project_state(
        member_added("ed", ProjectRole.EDITOR),
        projects.ProjectDeleted(project_id="p1", by="owen", at=T0),
    )
    related = {"project": gone, **actor("ed")}
    given(CREATED).when(move(TaskStatus.IN_PROGRESS), ctx=ctx("ed"), related=related).then_raises(
        NotFound
    )
    create = tasks.CreateTask(task_id="t2", project_id="p1", title="New")
    given().when(create, ctx=ctx("ed"), related=related).then_raises(NotFound)
