import pytest
from domain_support import T0, ctx, registered
from pydantic import SecretStr

from domain import (
    PROJECTS,
    SESSIONS,
    SYSTEM_ACTOR,
    TASKS,
    USERS,
    Claim,
    Command,
    Conflict,
    InvalidCredentials,
    PermissionDenied,
    claims,
    hash_token,
    projects,
    route,
    security,
    sessions,
    tasks,
    users,
)
from domain.base import decode_event


def test_a_refused_login_becomes_a_login_rejected_audit_event():
    command = users.AttemptLogin(user_id="alice", password=SecretStr("x"), command_id="c1")
    event = security.rejection_event(command, InvalidCredentials(), ctx())
    assert event == security.LoginRejected(
        command_id="c1",
        user_id="alice",
        subject_id="alice",  # the targeted account's key seals the IP and user agent
        error_code="invalid_credentials",
        reason="invalid email or password",
        actor_id=None,
        ip="203.0.113.7",
        user_agent="pytest",
        at=T0,
    )
    assert security.stream_id(None) == "security-anonymous"
    unknown = users.AttemptLogin(user_id=None, password=SecretStr("x"), command_id="c3")
    assert security.rejection_event(unknown, InvalidCredentials(), ctx()).subject_id is None


def test_a_version_1_login_rejected_reads_with_the_actor_as_its_subject():
    stored = {
        "command_id": "c1",
        "user_id": "alice",
        "error_code": "invalid_credentials",
        "reason": "invalid email or password",
        "actor_id": "bob",
        "ip": "203.0.113.7",
        "user_agent": "pytest",
        "at": T0.isoformat(),
    }
    event = decode_event("LoginRejected", 1, stored)
    assert isinstance(event, security.LoginRejected)
    assert (event.subject_id, event.user_id, event.ip) == ("bob", "alice", "203.0.113.7")


def test_a_permission_denial_becomes_a_command_rejected_event_naming_the_target():
    command = projects.ArchiveProject(project_id="p1", command_id="c2")
    error = PermissionDenied("bob", "manage", "project p1")
    event = security.rejection_event(command, error, ctx("bob"))
    assert isinstance(event, security.CommandRejected)
    assert (event.command_type, event.target, event.error_code, event.actor_id) == (
        "ArchiveProject",
        "project_id=p1",
        "permission_denied",
        "bob",
    )
    assert security.stream_id("bob") == "security-bob"


def test_refusals_that_are_not_security_relevant_are_not_audited():
    command = projects.ArchiveProject(project_id="p1")
    assert security.rejection_event(command, Conflict("archived"), ctx("bob")) is None


def test_task_commands_load_the_project_the_actor_and_the_assignee():
    command = tasks.AssignTask(task_id="t1", project_id="p1", assignee_id="vic")
    r = route(command, ctx("ed"))
    assert (r.decider, r.stream_id) == (TASKS, "task-t1")
    assert dict(r.related) == {
        "project": (PROJECTS, "project-p1"),
        "actor": (USERS, "user-ed"),
        "assignee": (USERS, "user-vic"),
    }


def test_routes_of_user_project_and_session_commands():
    login = users.AttemptLogin(user_id=None, password=SecretStr("x"))
    assert route(login, ctx()).stream_id == "user-_unknown"
    assert dict(route(login, ctx()).related) == {}
    add = projects.AddMember(project_id="p1", user_id="ed", role="editor")
    assert dict(route(add, ctx("owen")).related) == {
        "actor": (USERS, "user-owen"),
        "member": (USERS, "user-ed"),
    }
    touch = sessions.TouchSession(session_id="s1", user_id="alice")
    r = route(touch, ctx())
    assert (r.decider, r.stream_id, dict(r.related)) == (
        SESSIONS,
        "session-s1",
        {"user": (USERS, "user-alice")},
    )
    unlock = users.UnlockUser(user_id="alice")
    assert dict(route(unlock, ctx(SYSTEM_ACTOR)).related) == {}


def test_an_unroutable_command_is_a_type_error():
    class Stray(Command):
        pass

    with pytest.raises(TypeError, match="no route"):
        route(Stray(), ctx())


def test_registration_claims_hashed_email_and_username():
    event = registered("alice", email="Alice@Example.org")
    assert claims(event) == [
        Claim("email", hash_token("alice@example.org")),
        Claim("username", hash_token("alice")),
    ]
    assert all(len(claim.key) == 64 and "alice" not in claim.key for claim in claims(event))


def test_an_email_change_releases_the_old_key_and_claims_the_new():
    event = users.EmailChanged(
        user_id="alice", previous_email="a@example.org", email="b@example.org", by="alice"
    )
    assert claims(event) == [
        Claim("email", users.email_claim_key("a@example.org"), release=True),
        Claim("email", users.email_claim_key("b@example.org")),
    ]
    assert claims(users.LoginSucceeded(user_id="a", at=T0, ip=None, user_agent=None)) == []


def test_each_decider_is_named_by_its_category_and_stream_prefix():
    for decider, module in ((USERS, users), (PROJECTS, projects), (TASKS, tasks)):
        assert decider.category == module.CATEGORY
        assert module.stream_id("x") == f"{module.CATEGORY}-x"
        assert decider.initial_state() == module.initial_state()
    assert SESSIONS.category == "session"
