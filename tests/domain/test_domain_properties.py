"""Properties of the deciders over generated command sequences."""

from datetime import timedelta
from functools import reduce

from domain_support import (
    ADMIN_ID,
    PASSWORD,
    T0,
    admin,
    ctx,
    decide,
    member_added,
    project_state,
    registered,
    user_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from domain import (
    TASKS,
    USERS,
    DomainError,
    ProjectRole,
    Role,
    decode_event,
    encode_event,
    tasks,
    users,
)
from domain.tasks import TRANSITIONS, TaskStatus
from eventstore.hashing import canonical_json

FAST = settings(max_examples=60, deadline=None)
WRONG = "not the password"


def run(decider, events, steps):
    """A minimal dispatcher: decide each command on the folded state, append the events,
    or the refusal's ``record``."""
    log = list(events)
    for command, context, related in steps:
        state = reduce(decider.evolve, log, decider.initial_state())
        try:
            log.extend(decide(decider, command, state, context, related))
        except DomainError as error:
            log.extend(error.record)
    return log


# --- users --------------------------------------------------------------------------

user_actions = st.lists(
    st.tuples(
        st.sampled_from(["login", "wrong", "unlock", "deactivate", "reactivate", "change"]),
        st.integers(min_value=0, max_value=10),  # minutes since the previous step
    ),
    max_size=25,
)


def user_steps(actions):
    now = T0
    for action, gap in actions:
        now += timedelta(minutes=gap)
        match action:
            case "login" | "wrong":
                password = PASSWORD if action == "login" else WRONG
                command = users.AttemptLogin(user_id="alice", password=SecretStr(password))
                yield command, ctx(at=now), {}
            case "unlock":
                yield users.UnlockUser(user_id="alice"), ctx(ADMIN_ID, at=now), admin()
            case "deactivate":
                yield users.DeactivateUser(user_id="alice"), ctx(ADMIN_ID, at=now), admin()
            case "reactivate":
                yield users.ReactivateUser(user_id="alice"), ctx(ADMIN_ID, at=now), admin()
            case "change":
                command = users.ChangePassword(
                    user_id="alice",
                    old_password=SecretStr(WRONG),
                    new_password=SecretStr("fresh new passphrase"),
                )
                yield command, ctx("alice", at=now), {}


@FAST
@given(user_actions)
def test_user_decisions_are_deterministic(actions):
    log = [registered("alice")]
    for command, context, related in user_steps(actions):
        state = reduce(users.evolve, log, users.initial_state())
        outcomes = []
        for _ in range(2):
            try:
                outcomes.append(("ok", decide(USERS, command, state, context, related)))
            except DomainError as error:
                outcomes.append((type(error), error.record))
        assert outcomes[0] == outcomes[1]
        _, events = outcomes[0]
        log.extend(events)


@FAST
@given(user_actions, st.data())
def test_folding_in_two_parts_equals_folding_everything(actions, data):
    log = run(USERS, [registered("alice")], user_steps(actions))
    cut = data.draw(st.integers(min_value=0, max_value=len(log)))
    whole = reduce(users.evolve, log, users.initial_state())
    snapshot = reduce(users.evolve, log[:cut], users.initial_state())
    assert reduce(users.evolve, log[cut:], snapshot) == whole
    stepwise = users.initial_state()
    for event in log:
        stepwise = users.evolve(stepwise, event)
    assert stepwise == whole


@FAST
@given(user_actions)
def test_a_locked_or_deactivated_account_never_logs_in(actions):
    log = run(USERS, [registered("alice")], user_steps(actions))
    state = users.initial_state()
    for event in log:
        if isinstance(event, users.LoginSucceeded):
            assert not state.is_locked(event.at)
            assert state.active
        state = users.evolve(state, event)


@FAST
@given(user_actions)
def test_reaching_the_threshold_inside_the_window_always_locks(actions):
    policy = ctx().policy
    log = run(USERS, [registered("alice")], user_steps(actions))
    state = users.initial_state()
    for i, event in enumerate(log):
        state = users.evolve(state, event)
        if isinstance(event, users.LoginFailed):
            window_start = event.at - policy.lockout_window
            recent = [t for t in state.failed_logins if t > window_start]
            locked_next = i + 1 < len(log) and isinstance(log[i + 1], users.AccountLocked)
            assert locked_next == (len(recent) >= policy.lockout_threshold)


def decodes_from_dict_and_from_stored_text(event):
    event_type, version, data = encode_event(event)
    assert decode_event(event_type, version, data) == event
    text = canonical_json(data)  # what the store keeps; validated without building a dict
    assert decode_event(event_type, version, text) == event
    assert decode_event(event_type, version, text.encode()) == event


@FAST
@given(user_actions)
def test_every_stored_event_survives_encoding(actions):
    for event in run(USERS, [registered("alice")], user_steps(actions)):
        decodes_from_dict_and_from_stored_text(event)


# --- tasks --------------------------------------------------------------------------

PROJECT = project_state(member_added("ed", ProjectRole.EDITOR), member_added("vic", "viewer"))
PEOPLE = ["owen", "ed", "vic", "zed"]  # zed is not in the project
ACCOUNTS = {name: user_state(name, roles=(Role.MEMBER,)) for name in PEOPLE}

task_actions = st.lists(
    st.one_of(
        st.tuples(st.just("status"), st.sampled_from(list(TaskStatus))),
        st.tuples(st.just("assign"), st.sampled_from(PEOPLE)),
        st.tuples(st.just("unassign"), st.none()),
        st.tuples(st.just("edit"), st.sampled_from(list(tasks.Priority))),
        st.tuples(st.just("delete"), st.none()),
    ),
    max_size=30,
)


def task_steps(actions):
    related = {"project": PROJECT, "actor": ACCOUNTS["ed"]}
    yield tasks.CreateTask(task_id="t1", project_id="p1", title="Spec"), ctx("ed"), related
    for kind, value in actions:
        ids = {"task_id": "t1", "project_id": "p1"}
        match kind:
            case "status":
                yield tasks.ChangeTaskStatus(**ids, to=value), ctx("ed"), related
            case "assign":
                command = tasks.AssignTask(**ids, assignee_id=value)
                yield command, ctx("ed"), {**related, "assignee": ACCOUNTS[value]}
            case "unassign":
                yield tasks.UnassignTask(**ids), ctx("ed"), related
            case "edit":
                yield tasks.EditTask(**ids, priority=value), ctx("ed"), related
            case "delete":
                yield tasks.DeleteTask(**ids), ctx("ed"), related


def reachable_from_todo():
    seen, frontier = {TaskStatus.TODO}, [TaskStatus.TODO]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()] - seen:
            seen.add(nxt)
            frontier.append(nxt)
    return seen


@FAST
@given(task_actions)
def test_tasks_only_move_along_the_machine_and_assignees_are_participants(actions):
    log = run(TASKS, [], task_steps(actions))
    state = tasks.initial_state()
    for event in log:
        assert not state.deleted, "a deleted task decided something"
        match event:
            case tasks.TaskStatusChanged():
                assert event.from_status == state.status
                assert event.to_status in TRANSITIONS[state.status]
            case tasks.TaskAssigned():
                assert PROJECT.is_participant(event.assignee_id)
        state = tasks.evolve(state, event)
        assert state.status in reachable_from_todo()
        assert state.assignee_id is None or PROJECT.is_participant(state.assignee_id)


@FAST
@given(task_actions)
def test_every_stored_task_event_survives_encoding(actions):
    for event in run(TASKS, [], task_steps(actions)):
        decodes_from_dict_and_from_stored_text(event)


@FAST
@given(task_actions)
def test_task_decisions_are_deterministic_and_folds_compose(actions):
    first = run(TASKS, [], task_steps(actions))
    assert run(TASKS, [], task_steps(actions)) == first
    half = len(first) // 2
    snapshot = reduce(tasks.evolve, first[:half], tasks.initial_state())
    assert reduce(tasks.evolve, first[half:], snapshot) == reduce(
        tasks.evolve, first, tasks.initial_state()
    )
