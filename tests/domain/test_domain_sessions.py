from domain_support import ADMIN_ID, T0, TOKEN, actor, admin, ctx, minutes, user_state
from gwt import given
from pydantic import SecretStr

from domain import (
    AccountInactive,
    AccountLocked,
    AlreadyExists,
    InvalidCommand,
    NotFound,
    PermissionDenied,
    SecurityPolicy,
    SessionInvalid,
    hash_token,
    sessions,
    users,
)
from domain.sessions import session_status

POLICY = SecurityPolicy()
ALICE = {"user": user_state("alice")}
STARTED = sessions.SessionStarted(
    session_id="s1",
    user_id="alice",
    token_hash=hash_token(TOKEN),
    started_at=T0,
    expires_at=T0 + POLICY.session_lifetime,
    ip="203.0.113.7",
    user_agent="pytest",
)
TOUCH = sessions.TouchSession(session_id="s1", user_id="alice")


def touched(at):
    return sessions.SessionTouched(session_id="s1", user_id="alice", at=at)


def test_starting_a_session_stores_the_token_hash_and_absolute_expiry():
    command = sessions.StartSession(session_id="s1", user_id="alice", token=SecretStr(TOKEN))
    given().when(command, ctx=ctx(), related=ALICE).then(STARTED)
    given(STARTED).when(command, ctx=ctx(), related=ALICE).then_raises(AlreadyExists)


def test_a_session_needs_an_active_unlocked_registered_user_and_a_long_token():
    command = sessions.StartSession(session_id="s1", user_id="alice", token=SecretStr(TOKEN))
    given().when(command, ctx=ctx()).then_raises(NotFound)
    off = user_state("alice", users.UserDeactivated(user_id="alice", by="x", at=T0))
    given().when(command, ctx=ctx(), related={"user": off}).then_raises(AccountInactive)
    lock = users.AccountLocked(user_id="alice", until=T0 + minutes(5), failed_attempts=5)
    locked = user_state("alice", lock)
    given().when(command, ctx=ctx(), related={"user": locked}).then_raises(AccountLocked)
    short = command.model_copy(update={"token": SecretStr("short")})
    given().when(short, ctx=ctx(), related=ALICE).then_raises(InvalidCommand)


def test_touches_are_throttled_to_one_per_interval():
    given(STARTED).when(TOUCH, ctx=ctx(at=T0 + minutes(0.5)), related=ALICE).then()
    given(STARTED).when(TOUCH, ctx=ctx(at=T0 + minutes(1)), related=ALICE).then(
        touched(T0 + minutes(1))
    )


def test_an_idle_session_is_refused_and_a_touch_keeps_it_alive():
    error = (
        given(STARTED)
        .when(TOUCH, ctx=ctx(at=T0 + minutes(30)), related=ALICE)
        .then_raises(SessionInvalid)
    )
    assert error.reason == "idle"
    given(STARTED, touched(T0 + minutes(20))).when(
        TOUCH, ctx=ctx(at=T0 + minutes(45)), related=ALICE
    ).then(touched(T0 + minutes(45)))


def test_a_session_expires_at_its_absolute_lifetime_even_when_busy():
    almost = T0 + POLICY.session_lifetime - minutes(1)
    error = (
        given(STARTED, touched(almost))
        .when(TOUCH, ctx=ctx(at=T0 + POLICY.session_lifetime), related=ALICE)
        .then_raises(SessionInvalid)
    )
    assert error.reason == "expired"


def test_a_password_change_revokes_sessions_started_before_it():
    changed = users.PasswordChanged(user_id="alice", password_hash="h", via="change", at=T0)
    later = {"user": user_state("alice", changed)}
    error = (
        given(STARTED.model_copy(update={"started_at": T0 - minutes(1)}))
        .when(TOUCH, ctx=ctx(at=T0 + minutes(2)), related=later)
        .then_raises(SessionInvalid)
    )
    assert error.reason == "revoked"
    given(STARTED).when(TOUCH, ctx=ctx(at=T0 + minutes(2)), related=later).then(
        touched(T0 + minutes(2))
    )


def test_an_unknown_or_foreign_session_is_invalid():
    assert given().when(TOUCH, ctx=ctx(), related=ALICE).then_raises(SessionInvalid).reason == (
        "unknown"
    )
    foreign = sessions.TouchSession(session_id="s1", user_id="bob")
    given(STARTED).when(foreign, ctx=ctx(), related={"user": user_state("bob")}).then_raises(
        SessionInvalid
    )


def test_the_owner_or_an_admin_revokes_a_session_once():
    revoke = sessions.RevokeSession(session_id="s1", user_id="alice")
    revoked = sessions.SessionRevoked(session_id="s1", user_id="alice", by="alice", at=T0)
    given(STARTED).when(revoke, ctx=ctx("alice"), related=ALICE).then(revoked)
    events = given(STARTED).when(revoke, ctx=ctx(ADMIN_ID), related=admin()).events()
    assert events[0].by == ADMIN_ID
    given(STARTED).when(revoke, ctx=ctx("bob"), related=actor("bob")).then_raises(PermissionDenied)
    given(STARTED, revoked).when(revoke, ctx=ctx("alice"), related=ALICE).then()
    given().when(revoke, ctx=ctx("alice")).then_raises(NotFound)
    error = (
        given(STARTED, revoked)
        .when(TOUCH, ctx=ctx(at=T0 + minutes(2)), related=ALICE)
        .then_raises(SessionInvalid)
    )
    assert error.reason == "revoked"


def test_session_status_reports_each_state():
    state = sessions.evolve(sessions.initial_state(), STARTED)
    assert session_status(sessions.initial_state(), None, T0, POLICY) == "unknown"
    assert session_status(state, None, T0 + minutes(5), POLICY) == "active"
    assert session_status(state, None, T0 + minutes(31), POLICY) == "idle"
    assert session_status(state, None, T0 + POLICY.session_lifetime, POLICY) == "expired"
    assert session_status(state, T0 + minutes(1), T0 + minutes(5), POLICY) == "revoked"
