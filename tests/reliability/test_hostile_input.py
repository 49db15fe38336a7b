"""Hostile input through the public API: a typed refusal or success, never a driver
error, never a partial write."""

from __future__ import annotations

import asyncio
import inspect
import itertools
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import typer.main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from domain.errors import (
    AlreadyExists,
    AuthenticationError,
    DomainError,
    InvalidCommand,
    InvalidCredentials,
    NotFound,
)
from domain.permissions import SYSTEM_ACTOR
from domain.projects import CreateProject
from eventstore.errors import InvalidAppend, StoreUnavailable
from eventstore.schema import events
from projections.errors import InvalidFilter, InvalidQuery, ProjectionTimeout
from projections.query import MAX_IN
from tests.conftest import PASSWORD
from tiu.cli import app as cli_app
from tiu.repositories import (
    AuditRepository,
    ProjectRepository,
    SessionRepository,
    TaskRepository,
    UserRepository,
)
from tiu.service import DatabaseService

# These storage tests also run as the least-privilege role of sql/app_role.sql.
pytestmark = pytest.mark.least_privilege

TYPED = (DomainError, InvalidAppend, InvalidQuery)

hostile_text = st.one_of(
    st.text(max_size=50),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=30),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "a\x00b",
            "\u202e\u200b",
            "x" * 100_000,
            "Robert'); DROP TABLE events;--",
            "%_\\",
            "\U0010ffff",
            "\ufffd",
            "\r\n\t",
            "😀" * 500,
        ]
    ),
)
hostile_value = st.one_of(
    hostile_text,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.datetimes(),
    st.datetimes(timezones=st.just(UTC), min_value=datetime(9000, 1, 1)),
    # aware, but in the year 0 or 10000 once in UTC
    st.datetimes(max_value=datetime(1, 1, 2), timezones=st.just(timezone(timedelta(hours=14)))),
    st.datetimes(
        min_value=datetime(9999, 12, 31), timezones=st.just(timezone(-timedelta(hours=14)))
    ),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def _count(service) -> int:
    async with service.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(events)) or 0)


async def _attempt(service, action) -> tuple[bool, BaseException | None]:
    before = await _count(service)
    try:
        await action()
    except TYPED as error:
        assert await _count(service) == before, "a refused command wrote something"
        return False, error
    return True, None


@pytest.fixture
async def owner(service):
    async with service.get_repositories() as repos:
        user = await repos.get_user_repository().create_user(
            email="owner@example.com", username="owner", password=PASSWORD
        )
    async with service.get_repositories(actor_id=user.id) as repos:
        project = await repos.get_project_repository().create_project("Target", visibility="public")
    return user, project


@given(email=hostile_value, username=hostile_value, password=hostile_value, name=hostile_value)
@SETTINGS
async def test_registration_with_hostile_fields_is_typed(service, email, username, password, name):
    async def register() -> None:
        async with service.get_repositories() as repos:
            await repos.get_user_repository().create_user(
                email=email, username=username, password=password, display_name=name
            )

    await _attempt(service, register)


@given(title=hostile_value, description=hostile_value, priority=hostile_value, due=hostile_value)
@SETTINGS
async def test_task_creation_with_hostile_fields_is_typed(
    service, owner, title, description, priority, due
):
    user, project = owner

    async def create() -> None:
        async with service.get_repositories(actor_id=user.id) as repos:
            await repos.get_task_repository().create_task(
                project.id, title, description, priority=priority, due_date=due
            )

    await _attempt(service, create)


@given(
    field=st.one_of(st.sampled_from(["title", "status", "due_at", "priority_rank"]), hostile_text),
    op=st.one_of(
        st.sampled_from(["eq", "ne", "lt", "in", "like", "ilike", "between", "isnull"]),
        hostile_text,
    ),
    value=hostile_value,
)
@SETTINGS
async def test_hostile_filters_are_refused_or_answered_never_an_sql_error(
    service, owner, field, op, value
):
    user, _ = owner

    async def query() -> None:
        async with service.get_repositories(actor_id=user.id) as repos:
            await repos.get_task_repository().list_tasks({f"{field}__{op}": value})

    await _attempt(service, query)


@given(
    action=hostile_text,
    resource=hostile_text,
    details=st.dictionaries(hostile_text, hostile_value, max_size=4),
)
@SETTINGS
async def test_audit_actions_with_hostile_details_are_typed(
    service, owner, action, resource, details
):
    user, _ = owner

    async def log() -> None:
        async with service.get_repositories(actor_id=user.id) as repos:
            await repos.get_audit_repository().log_action(action, resource, None, details)

    await _attempt(service, log)


async def test_a_naive_due_date_is_refused_not_guessed(service, owner):
    user, project = owner
    ok, error = await _attempt(
        service,
        lambda: _create(service, user, project, due=datetime(2030, 1, 1)),  # naive
    )
    assert not ok
    assert "timezone" in str(error).lower() or "aware" in str(error).lower()


async def _create(service, user, project, **fields: Any):
    async with service.get_repositories(actor_id=user.id) as repos:
        return await repos.get_task_repository().create_task(
            project.id, "Title", due_date=fields.get("due", datetime.now(UTC) + timedelta(days=1))
        )


@pytest.mark.parametrize(
    ("field", "call"),
    [
        ("to", lambda tasks, projects, p, t, u: tasks.update_task_status(t.id, "bogus")),
        ("priority", lambda tasks, projects, p, t, u: tasks.create_task(p.id, "x", priority="x")),
        (
            "due_date",
            lambda tasks, projects, p, t, u: tasks.create_task(
                p.id, "x", due_date=datetime(2030, 1, 1)
            ),
        ),
        (
            "visibility",
            lambda tasks, projects, p, t, u: projects.create_project("x", visibility="x"),
        ),
        ("role", lambda tasks, projects, p, t, u: projects.add_member(p.id, u.id, "owner")),
        ("title", lambda tasks, projects, p, t, u: tasks.create_task(p.id, None)),
        (
            "x",
            lambda tasks, projects, p, t, u: tasks.create_tasks(
                [{"project_id": p.id, "title": "t", "x": 1}]
            ),
        ),
    ],
)
async def test_a_value_the_command_refuses_is_an_invalid_command_naming_its_field(
    service, owner, field, call
):
    user, project = owner
    async with service.get_repositories(actor_id=user.id) as repos:
        task = await repos.get_task_repository().create_task(project.id, "Existing")
    before = await _count(service)
    async with service.get_repositories(actor_id=user.id) as repos:
        with pytest.raises(InvalidCommand) as refused:
            await call(
                repos.get_task_repository(), repos.get_project_repository(), project, task, user
            )
    assert await _count(service) == before
    assert refused.value.field == field


#: Aware, yet outside the years 1-9999 once converted to UTC, where the log keeps times.
BEYOND_UTC = (
    datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))),
    datetime(9999, 12, 31, 23, tzinfo=timezone(-timedelta(hours=14))),
)


@pytest.mark.parametrize("due", BEYOND_UTC, ids=["year-0-in-utc", "year-10000-in-utc"])
async def test_a_due_date_beyond_the_years_utc_holds_is_an_invalid_command(service, owner, due):
    # It was accepted, then failed in the tasks projector (ProjectionFailed: OverflowError).
    user, project = owner
    async with service.get_repositories(actor_id=user.id) as repos:
        task = await repos.tasks.create_task(project.id, "Existing")
    before = await _count(service)
    async with service.get_repositories(actor_id=user.id) as repos:
        with pytest.raises(InvalidCommand) as created:
            await repos.tasks.create_task(project.id, "x", due_date=due)
        with pytest.raises(InvalidCommand) as edited:
            await repos.tasks.edit_task(task.id, due_date=due)
        with pytest.raises(InvalidCommand) as bulk:
            await repos.tasks.create_tasks(
                [{"project_id": project.id, "title": "t", "due_date": due}]
            )
    assert created.value.field == edited.value.field == bulk.value.field == "due_date"
    assert "1 to 9999" in created.value.reason
    assert await _count(service) == before


AUDIT_TIMES = [
    *((m, f) for m in ("get_events", "failed", "suspicious", "stats") for f in ("since", "until")),
    ("archive", "before"),
]


async def test_an_audit_time_naive_or_beyond_utc_is_an_invalid_command_naming_it(service, owner):
    # These failed in the driver's bind of the time: a StatementError (ValueError or
    # OverflowError) on both backends.
    for method, field in AUDIT_TIMES:
        for when in (datetime(2026, 1, 1), *BEYOND_UTC):
            async with service.get_repositories(SYSTEM_ACTOR) as repos:
                with pytest.raises(InvalidCommand) as refused:
                    await getattr(repos.audit, method)(**{field: when})
            assert refused.value.field == field
            assert ("timezone" if when.tzinfo is None else "1 to 9999") in refused.value.reason


async def test_more_event_types_than_a_query_binds_is_an_invalid_command(service, owner):
    # 70,000 types were an asyncpg InterfaceError (at most 32767 query arguments).
    many = [f"Type{i}" for i in range(MAX_IN + 1)]
    async with service.get_repositories(SYSTEM_ACTOR) as repos:
        for method in (repos.audit.get_events, repos.audit.stats, repos.audit.failed):
            with pytest.raises(InvalidCommand) as refused:
                await method(event_types=many)
            assert refused.value.field == "event_types"
        assert await repos.audit.get_events(event_types=many[:MAX_IN]) == []


@pytest.mark.parametrize("output", ["a\x00b.gz", "a\ud800b.gz", 7], ids=repr)
async def test_an_archive_path_no_file_system_takes_is_an_invalid_command(
    service, owner, tmp_path, output
):
    # It was a ValueError ("embedded null byte"), a UnicodeEncodeError or a TypeError.
    async with service.get_repositories() as repos:  # a refused login: a security event
        with pytest.raises(InvalidCredentials):
            await repos.sessions.create_session("owner@example.com", "wrong password")
    before = await _count(service)
    with pytest.raises(InvalidCommand) as refused:
        await service.archive_audit_log(
            before=datetime(2100, 1, 1, tzinfo=UTC),
            output=output if not isinstance(output, str) else str(tmp_path / output),
        )
    assert refused.value.field == "output"
    assert await _count(service) == before


@pytest.mark.parametrize("bad", ["a\x00b", "a\ud800b"])
async def test_reads_by_text_no_database_can_hold_answer_not_found_on_both_backends(
    service, owner, bad
):
    user, _ = owner
    async with service.get_repositories(actor_id=user.id) as repos:
        assert await repos.get_user_repository().get_by_email(bad) is None
        assert await repos.get_user_repository().get_by_username(bad) is None
        assert await repos.get_task_repository().get_task(bad) is None
        assert await repos.get_project_repository().get_project(bad) is None
    async with service.engine.connect() as conn:
        assert await service.store.read_stream(conn, f"task-{bad}") == []
        assert await service.store.stream_version(conn, f"task-{bad}") == 0
        assert await service.store.read_all(conn, types=[bad]) == []
        assert await service.store.read_all(conn, categories=[bad]) == []
        users_only = await service.store.read_all(conn, categories=["user", bad])
    assert [e.stream_id for e in users_only] == [f"user-{user.id}"]


CALLER_FIELDS = ("actor_id", "ip", "user_agent", "correlation_id")


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        *((field, bad) for field in CALLER_FIELDS for bad in ("a\x00b", "a\ud800b", 7)),
        ("actor_id", ["a"]),
        ("user_agent", b"Mozilla"),
        ("actor_id", "x" * 65),
        ("correlation_id", "x" * 201),
        ("correlation_id", "tab\tbed"),
    ],
    ids=lambda value: repr(value)[:12],
)
async def test_who_and_where_values_a_command_cannot_carry_are_refused_naming_them(
    service, owner, field, bad
):
    # A service passes these from a request (X-Request-ID, User-Agent, a session's
    # user): they failed in the driver (value too long, NUL, a surrogate) or in pydantic.
    user, _ = owner
    caller = {"actor_id": user.id, field: bad}
    before = await _count(service)
    calls = {
        "a write": lambda repos: repos.projects.create_project("P"),
        "a read": lambda repos: repos.tasks.list_tasks(),
        "a login": lambda repos: repos.sessions.create_session("owner@example.com", PASSWORD),
        "an audited action": lambda repos: repos.audit.log_action("export", "report"),
    }
    for what, call in calls.items():
        with pytest.raises(InvalidCommand) as refused:
            async with service.get_repositories(**caller) as repos:
                await call(repos)
        assert refused.value.field == field, what
    with pytest.raises(InvalidCommand) as refused:
        await service.dispatch(CreateProject(owner_id=user.id, name="P"), service.context(**caller))
    assert refused.value.field == field
    with pytest.raises(InvalidCommand) as refused:
        await service.execute_in_transaction(
            lambda repos: repos.projects.create_project("P"), **caller
        )
    assert refused.value.field == field
    assert await _count(service) == before


async def test_a_correlation_id_of_200_printable_characters_is_stored(service, owner):
    user, _ = owner
    async with service.get_repositories(user.id, correlation_id="r" * 200) as repos:
        result = await repos.audit.log_action("export", "report")
    async with service.engine.connect() as conn:
        stored = await service.store.read_stream(conn, result.stream_id)
    assert [e.correlation_id for e in stored] == ["r" * 200]


async def test_a_lone_surrogate_in_a_login_email_is_invalid_credentials(service, owner):
    before = await _count(service)
    async with service.get_repositories(ip="203.0.113.9") as repos:
        with pytest.raises(InvalidCredentials):
            await repos.get_session_repository().create_session("ow\ud800ner@example.com", "x")
    # The unknown-email refusal is audited, as for any unknown email.
    assert await _count(service) >= before


@pytest.mark.parametrize(
    "details", [{"k": "\ud800"}, {"\udfff": 1}, {"k": ["a", "\x00"]}, {"k": {"n": "\ud800"}}]
)
async def test_text_that_cannot_be_stored_in_an_audit_detail_is_refused(service, owner, details):
    user, _ = owner
    before = await _count(service)
    async with service.get_repositories(actor_id=user.id) as repos:
        with pytest.raises(InvalidCommand) as refused:
            await repos.get_audit_repository().log_action("export", "report", None, details)
    assert refused.value.field == "details"
    assert await _count(service) == before


@pytest.mark.parametrize("details", [{"k": float("nan")}, {"k": [1, {"n": float("-inf")}]}])
async def test_an_audit_detail_json_cannot_hold_nan_or_infinity_is_refused(service, owner, details):
    # They were stored, and came back out of `tiu audit --format json` as NaN and
    # -Infinity: tokens jq and strict encoders (Starlette's JSONResponse) refuse.
    user, _ = owner
    before = await _count(service)
    async with service.get_repositories(actor_id=user.id) as repos:
        with pytest.raises(InvalidCommand) as refused:
            await repos.get_audit_repository().log_action("export", "report", None, details)
    assert refused.value.field == "details"
    assert "not JSON" in refused.value.reason
    assert await _count(service) == before


async def test_not_found_repeats_at_most_80_characters_of_the_input(service, owner):
    user, _ = owner
    async with service.get_repositories(actor_id=user.id) as repos:
        with pytest.raises(NotFound) as refused:
            await repos.get_task_repository().update_task_status("x" * 5_000_000, "done")
    assert len(str(refused.value)) < 120
    assert refused.value.id == "x" * 5_000_000  # the field keeps the value


async def test_a_taken_email_says_so_without_naming_it(service, owner):
    async with service.get_repositories() as repos:
        with pytest.raises(AlreadyExists) as refused:
            await repos.get_user_repository().create_user(
                email="OWNER@example.com", username="other", password=PASSWORD
            )
    assert str(refused.value) == "this email is taken"
    assert "(taken)" not in str(refused.value)


# -- the rule, over the whole public surface --------------------------------------------
#
# Every public coroutine method of the repositories and the service's operations, and
# every option of every CLI subcommand, fed hostile values for each parameter (chosen by
# its annotation; sometimes a valid value, so calls get past the first check): the
# outcome is success or a documented, typed error, with a field where one applies, and
# a refused call writes nothing but the security events that record refusals.

REPOSITORIES = {
    "users": UserRepository,
    "projects": ProjectRepository,
    "tasks": TaskRepository,
    "sessions": SessionRepository,
    "audit": AuditRepository,
}
SERVICE_OPERATIONS = ("cleanup_expired_sessions", "get_statistics", "health_check", "wait_for")
#: The error table of docs/errors.md: what a call may raise.
DOCUMENTED = (DomainError, InvalidQuery, InvalidAppend, StoreUnavailable, ProjectionTimeout)
#: CLI commands left out: `worker` runs until stopped, `demo` builds a database of its own.
CLI_SKIPPED = frozenset({"worker", "demo"})

huge_or_negative = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**400]),
)
wrong_type = st.one_of(
    st.none(), st.booleans(), huge_or_negative, st.floats(), st.lists(st.integers(), max_size=2)
)


def _methods(cls: type) -> list[str]:
    return sorted(
        name
        for name, fn in inspect.getmembers(cls, inspect.iscoroutinefunction)
        if not name.startswith("_")
    )


SURFACE = [(repo, name) for repo, cls in REPOSITORIES.items() for name in _methods(cls)] + [
    ("service", name) for name in SERVICE_OPERATIONS
]


def _value(annotation: str, name: str, valid: dict[str, list[Any]]) -> st.SearchStrategy[Any]:
    """Hostile values for a parameter, with valid ones mixed in."""
    known = [v for key, values in valid.items() if key in name for v in values]
    good = st.sampled_from(known) if known else st.nothing()
    if "Mapping" in annotation or name in ("details", "filters"):
        return st.one_of(
            st.none(),
            st.dictionaries(hostile_text, hostile_value, max_size=3),
            st.dictionaries(
                st.sampled_from(["title", "priority__gt", "status__in", "due_date__lt", "x"]),
                hostile_value,
                max_size=2,
            ),
            wrong_type,
        )
    if "Sequence" in annotation or "Iterable" in annotation:
        return st.one_of(st.lists(st.one_of(hostile_text, good), max_size=3), wrong_type)
    if "datetime" in annotation:
        return st.one_of(hostile_value, st.datetimes(), wrong_type)
    if "timedelta" in annotation:
        return st.one_of(
            st.timedeltas(), st.just(timedelta.max), st.just(timedelta.min), wrong_type
        )
    if annotation.startswith("bool"):
        return st.one_of(st.booleans(), wrong_type)
    if annotation.startswith(("int", "float")):
        return st.one_of(huge_or_negative, st.floats(), wrong_type, hostile_text)
    return st.one_of(good, good, hostile_text, wrong_type)


def _cli_commands() -> list[tuple[list[str], Any]]:
    found: list[tuple[list[str], Any]] = []

    def walk(command: Any, path: list[str]) -> None:
        if path and path[0] in CLI_SKIPPED:
            return
        if path:
            found.append((path, command))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(cli_app), [])
    return found


CLI_COMMANDS = _cli_commands()
#: Options every CLI call gets from the test (the database under test).
CLI_FIXED = frozenset({"database_url", "schema"})
cli_text = st.one_of(
    hostile_text.filter(lambda t: not t.startswith("-")),
    st.sampled_from(
        ["0", "-1", "99999999999999999999999", "1e309", "nan", "9999999d", "999999999w",
         "0001-01-01", "9999-12-31T23:59:59", "2026-02-30", "../../etc/passwd", "/", ""]
    ),
)  # fmt: skip


@st.composite
def cli_calls(draw, valid: dict[str, list[Any]]) -> list[str]:
    path, command = draw(st.sampled_from(CLI_COMMANDS))
    argv = list(path)
    for param in command.params:
        if param.name in CLI_FIXED or not draw(st.booleans()):
            continue
        known = valid.get(param.name, [])
        value = draw(st.one_of(st.sampled_from(known), cli_text) if known else cli_text)
        if getattr(param, "opts", None) and param.opts[0].startswith("-"):
            argv.append(param.opts[0])
            if not getattr(param, "is_flag", False):
                argv.append(value)
        elif param.required or draw(st.booleans()):
            argv.append(value)  # a positional argument
    return argv


@st.composite
def hostile_calls(draw, valid: dict[str, list[Any]]) -> tuple[str, str, dict[str, Any]]:
    if draw(st.integers(0, 4)) == 0:
        return "cli", "", {"argv": draw(cli_calls(valid))}
    repo, name = draw(st.sampled_from(SURFACE))
    owner = DatabaseService if repo == "service" else REPOSITORIES[repo]
    signature = inspect.signature(getattr(owner, name))
    arguments: dict[str, Any] = {}
    for param in list(signature.parameters.values())[1:]:
        if param.kind is param.VAR_KEYWORD:  # a command's fields, or a list's options
            names = FIELD_NAMES if name == "edit_task" else OPTION_NAMES
            arguments.update(
                draw(st.dictionaries(st.sampled_from(names), hostile_value, max_size=2))
            )
            continue
        annotation = str(param.annotation)
        if "SuspiciousRules" in annotation or "ColumnElement" in annotation:
            continue  # SQL expressions and rule objects come from code, not from input
        if param.default is not param.empty and draw(st.booleans()):
            continue  # leave it at its default
        arguments[param.name] = draw(_value(annotation, param.name, valid))
    return repo, name, arguments


_FRESH = itertools.count()
FIELD_NAMES = ["title", "description", "priority", "due_date", "status", "bogus"]
OPTION_NAMES = ["limit", "offset"]


async def _cli_database(service) -> list[str]:
    url = service.engine.url
    args = ["--database-url", url.render_as_string(hide_password=False)]
    if url.get_backend_name() == "postgresql":
        async with service.engine.connect() as conn:
            args += ["--schema", str(await conn.scalar(text("SELECT current_schema()")))]
    return args


async def _head(service) -> tuple[int, list[str]]:
    async with service.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(events.c.position, events.c.stream_category).order_by(events.c.position)
            )
        ).all()
    return len(rows), [r.stream_category for r in rows]


def _check_refusal(error: BaseException) -> None:
    assert isinstance(error, DOCUMENTED), f"undocumented {type(error).__name__}: {error}"
    if isinstance(error, InvalidCommand):
        assert isinstance(error.field, str) and error.field, error
    if isinstance(error, InvalidFilter):
        assert error.field is not None or error.operator is not None or "filter" in str(error)
    assert len(str(error)) < 2_000, "a message must not echo huge input"


@given(data=st.data())
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_every_public_call_gives_success_or_a_documented_error_and_a_refusal_writes_nothing(
    service, data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # CLI calls may write archive files where they run
    # Fresh targets for each example: an earlier one may have archived, deactivated or
    # forgotten the last ones.
    n = next(_FRESH)
    async with service.get_repositories() as repos:
        user = await repos.users.create_user(
            email=f"owner{n}@example.com", username=f"owner{n}", password=PASSWORD
        )
    async with service.get_repositories(actor_id=user.id) as repos:
        project = await repos.projects.create_project(f"Target {n}", visibility="public")
        task = await repos.tasks.create_task(project.id, "Target task")
    valid = {
        "user_id": [user.id],
        "actor_id": [user.id],
        "project_id": [project.id],
        "task_id": [task.id],
        "task_ids": [task.id],
        "email": [f"owner{n}@example.com"],
        "password": [PASSWORD],
        "role": ["editor", "admin", "viewer"],
        "status": ["in_progress", "todo"],
        "priority": ["high"],
        "visibility": ["public", "private"],
        "name": ["A name"],
        "title": ["A title"],
        "stream_id": [f"user-{user.id}"],
        "category": ["user", "security"],
    }
    valid |= {"actor": [user.id], "user": [user.id, f"owner{n}@example.com"]}
    repo, name, arguments = data.draw(hostile_calls(valid), label="call")
    # The owner, or the system actor, whose permissions reach the audit and admin paths.
    actor = data.draw(st.sampled_from([user.id, SYSTEM_ACTOR]), label="actor")
    # Who and where, as a service passes them from a request: now and then hostile.
    caller = data.draw(
        st.one_of(
            st.just({}),
            st.fixed_dictionaries(
                {}, optional=dict.fromkeys(("ip", "user_agent", "correlation_id"), hostile_value)
            ),
        ),
        label="caller",
    )
    before, _ = await _head(service)
    if repo == "cli":
        result = await asyncio.to_thread(
            CliRunner().invoke, cli_app, [*arguments["argv"], *await _cli_database(service)]
        )
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        assert result.exit_code in (0, 1), result.output
        if result.exit_code == 1:
            # One error line, last; a command may have shown progress on stderr before
            # it (`tiu replay` draws a bar per projector).
            lines = result.stderr.splitlines()
            assert lines and lines[-1].startswith("error: "), result.stderr
            assert sum(line.startswith("error: ") for line in lines) == 1, result.stderr
            assert result.stderr.endswith("\n") and "Traceback" not in result.stderr
            assert "Traceback" not in result.output
            assert "sqlalche" not in result.stderr.lower(), result.stderr
            _, now = await _head(service)
            assert set(now[before:]) <= {"security"}, f"{arguments} refused yet wrote"
        return
    try:
        if repo == "service":
            await getattr(service, name)(**arguments)
        else:
            async with service.get_repositories(actor_id=actor, **caller) as repos:
                await getattr(getattr(repos, repo), name)(**arguments)
    except Exception as error:  # the point: what escapes, typed or not
        _check_refusal(error)
        _, now = await _head(service)
        written = set(now[before:])
        # Refusals are audited in security streams; a refused login also records the
        # failure in the user's stream (exact lockout counting, by design).
        allowed = {"security", "user"} if isinstance(error, AuthenticationError) else {"security"}
        assert written <= allowed, f"{repo}.{name} refused yet wrote {written}"
