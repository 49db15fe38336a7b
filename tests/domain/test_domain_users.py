from datetime import timedelta

import pytest
from domain_support import (
    ADMIN_ID,
    FAKE,
    PASSWORD,
    T0,
    TOKEN,
    FakeHasher,
    actor,
    admin,
    ctx,
    fold_users,
    minutes,
    registered,
)
from gwt import given
from pydantic import SecretStr

from domain import (
    SYSTEM_ACTOR,
    AccountInactive,
    AccountLocked,
    AlreadyExists,
    Conflict,
    InvalidCommand,
    InvalidCredentials,
    NotFound,
    PermissionDenied,
    ResetTokenInvalid,
    Role,
    SecurityPolicy,
    WeakPassword,
    hash_token,
    users,
)

NEW_PASSWORD = "violet marmalade 77"


def register(**overrides):
    fields = {
        "user_id": "alice",
        "email": "  Alice.Smith@Example.ORG ",
        "username": "alice",
        "password": SecretStr(PASSWORD),
        "display_name": " Alice Smith ",
    } | overrides
    return users.RegisterUser(**fields)


def login(password=PASSWORD, user_id="alice"):
    return users.AttemptLogin(user_id=user_id, password=SecretStr(password))


def failed(at):
    return users.LoginFailed(user_id="alice", at=at, ip="203.0.113.7", user_agent="pytest")


# --- registration -------------------------------------------------------------------


def test_registering_normalises_email_and_stores_only_the_password_hash():
    given().when(register(), ctx=ctx()).then(
        users.UserRegistered(
            user_id="alice",
            email="Alice.Smith@example.org",
            username="alice",
            display_name="Alice Smith",
            password_hash=FAKE.hash(PASSWORD),
            roles=(Role.MEMBER,),
            at=T0,
        )
    )


def test_registering_an_existing_user_raises_already_exists():
    given(registered("alice")).when(register(), ctx=ctx()).then_raises(AlreadyExists)


@pytest.mark.parametrize(
    "email", ["no-at-sign", "a@b", "a@@example.org", "a b@example.org", "a@-x.org", "a@x.123"]
)
def test_a_malformed_email_is_refused_naming_the_field(email):
    error = given().when(register(email=email), ctx=ctx()).then_raises(InvalidCommand)
    assert error.field == "email"


@pytest.mark.parametrize("username", ["al", "x" * 33, "_alice", "al ice", "alïce"])
def test_a_username_breaking_the_rules_is_refused(username):
    error = given().when(register(username=username), ctx=ctx()).then_raises(InvalidCommand)
    assert error.field == "username"


def test_a_weak_password_is_refused_with_every_reason():
    error = (
        given()
        .when(register(password=SecretStr("alice"), email="alice@example.org"), ctx=ctx())
        .then_raises(WeakPassword)
    )
    assert error.reasons == (
        "must be at least 12 characters (has 5)",
        "must not contain the username",
        "must not contain the email address",
    )


def test_self_registration_cannot_grant_admin_but_an_admin_can():
    command = register(roles=(Role.ADMIN, Role.MEMBER))
    given().when(command, ctx=ctx()).then_raises(PermissionDenied)
    events = given().when(command, ctx=ctx(ADMIN_ID), related=admin()).events()
    assert events[0].roles == (Role.ADMIN, Role.MEMBER)
    assert given().when(command, ctx=ctx(SYSTEM_ACTOR)).events()[0].roles == events[0].roles


# --- login and lockout --------------------------------------------------------------


def test_the_right_password_logs_in():
    given(registered("alice")).when(login(), ctx=ctx()).then(
        users.LoginSucceeded(user_id="alice", at=T0, ip="203.0.113.7", user_agent="pytest")
    )


def test_an_unknown_user_costs_a_dummy_verification_and_reads_like_a_wrong_password():
    hasher = FakeHasher()
    unknown = (
        given()
        .when(login(user_id=None), ctx=ctx(), hasher=hasher)
        .then_raises(InvalidCredentials, record=())
    )
    assert hasher.verified == [(PASSWORD, hasher.dummy_hash)]
    unregistered = given().when(login(user_id="ghost"), ctx=ctx()).then_raises(InvalidCredentials)
    wrong = (
        given(registered("alice")).when(login("wrong"), ctx=ctx()).then_raises(InvalidCredentials)
    )
    assert str(unknown) == str(unregistered) == str(wrong) == "invalid email or password"


def test_a_wrong_password_is_refused_but_its_failure_is_recorded():
    given(registered("alice")).when(login("wrong password"), ctx=ctx()).then_raises(
        InvalidCredentials, record=(failed(T0),)
    )


def test_the_fifth_failure_within_the_window_also_records_the_lock():
    history = [failed(T0 - minutes(m)) for m in (14, 10, 5, 1)]
    given(registered("alice"), *history).when(login("wrong"), ctx=ctx()).then_raises(
        InvalidCredentials,
        record=(
            failed(T0),
            users.AccountLocked(user_id="alice", until=T0 + minutes(15), failed_attempts=5),
        ),
    )


def test_failures_older_than_the_window_do_not_count():
    history = [failed(T0 - minutes(m)) for m in (40, 30, 20, 16)]
    given(registered("alice"), *history).when(login("wrong"), ctx=ctx()).then_raises(
        InvalidCredentials, record=(failed(T0),)
    )


def test_a_locked_account_refuses_even_the_right_password():
    lock = users.AccountLocked(user_id="alice", until=T0 + minutes(3), failed_attempts=5)
    error = (
        given(registered("alice"), lock)
        .when(login(), ctx=ctx())
        .then_raises(AccountLocked, record=())
    )
    assert error.until == T0 + minutes(3)
    assert error.security_relevant


def test_a_lock_expires_on_its_own():
    lock = users.AccountLocked(user_id="alice", until=T0, failed_attempts=5)
    events = given(registered("alice"), lock).when(login(), ctx=ctx()).events()
    assert isinstance(events[0], users.LoginSucceeded)


def test_a_success_resets_the_failure_count():
    history = [failed(T0 - minutes(m)) for m in (9, 8, 7, 6)]
    success = users.LoginSucceeded(user_id="alice", at=T0 - minutes(5), ip=None, user_agent=None)
    given(registered("alice"), *history, success).when(login("wrong"), ctx=ctx()).then_raises(
        InvalidCredentials, record=(failed(T0),)
    )


def test_a_deactivated_account_refuses_the_right_password_with_account_inactive():
    off = users.UserDeactivated(user_id="alice", by=ADMIN_ID, at=T0 - minutes(1))
    given(registered("alice"), off).when(login(), ctx=ctx()).then_raises(AccountInactive)
    given(registered("alice"), off).when(login("wrong"), ctx=ctx()).then_raises(InvalidCredentials)


def test_the_lockout_threshold_comes_from_the_policy():
    strict = ctx(policy=SecurityPolicy(lockout_threshold=1))
    error = (
        given(registered("alice")).when(login("wrong"), ctx=strict).then_raises(InvalidCredentials)
    )
    assert isinstance(error.record[-1], users.AccountLocked)


# --- passwords ----------------------------------------------------------------------


def change(old=PASSWORD, new=NEW_PASSWORD):
    return users.ChangePassword(
        user_id="alice", old_password=SecretStr(old), new_password=SecretStr(new)
    )


def test_changing_the_password_revokes_older_sessions():
    given(registered("alice")).when(change(), ctx=ctx("alice")).then(
        users.PasswordChanged(
            user_id="alice", password_hash=FAKE.hash(NEW_PASSWORD), via="change", at=T0
        )
    )
    state = fold_users(
        registered("alice"),
        users.PasswordChanged(user_id="alice", password_hash="h", via="change", at=T0),
    )
    assert state.sessions_valid_after == T0


def test_changing_the_password_needs_the_old_one_and_counts_a_wrong_one():
    given(registered("alice")).when(change(old="nope"), ctx=ctx("alice")).then_raises(
        InvalidCredentials, record=(failed(T0),)
    )


def test_only_the_user_may_change_their_own_password():
    given(registered("alice")).when(change(), ctx=ctx(ADMIN_ID)).then_raises(PermissionDenied)


def test_the_new_password_must_meet_the_policy_and_differ_from_the_old():
    error = (
        given(registered("alice"))
        .when(change(new=PASSWORD), ctx=ctx("alice"))
        .then_raises(WeakPassword)
    )
    assert error.reasons == ("must differ from the current password",)
    assert error.field == "new_password"
    error = (
        given(registered("alice"))
        .when(change(new="short"), ctx=ctx("alice"))
        .then_raises(WeakPassword)
    )
    assert error.reasons == ("must be at least 12 characters (has 5)",)


def request_reset():
    return users.RequestPasswordReset(user_id="alice", token=SecretStr(TOKEN))


def complete_reset(token=TOKEN, new=NEW_PASSWORD):
    return users.CompletePasswordReset(
        user_id="alice", token=SecretStr(token), new_password=SecretStr(new)
    )


REQUESTED = users.PasswordResetRequested(
    user_id="alice", token_hash=hash_token(TOKEN), expires_at=T0 + timedelta(hours=1)
)


def test_a_reset_request_stores_only_the_token_hash_with_an_expiry():
    given(registered("alice")).when(request_reset(), ctx=ctx()).then(REQUESTED)


def test_a_reset_token_must_be_long_enough():
    short = users.RequestPasswordReset(user_id="alice", token=SecretStr("abc"))
    given(registered("alice")).when(short, ctx=ctx()).then_raises(InvalidCommand)


def test_a_reset_for_an_unknown_user_is_not_found():
    given().when(request_reset(), ctx=ctx()).then_raises(NotFound)


def test_completing_a_reset_sets_the_password_and_lifts_a_lock():
    lock = users.AccountLocked(user_id="alice", until=T0 + minutes(10), failed_attempts=5)
    spec = given(registered("alice"), lock, REQUESTED).when(complete_reset(), ctx=ctx())
    events = spec.events()
    assert events == [
        users.PasswordChanged(
            user_id="alice", password_hash=FAKE.hash(NEW_PASSWORD), via="reset", at=T0
        )
    ]
    state = fold_users(registered("alice"), lock, REQUESTED, *events)
    assert not state.is_locked(T0)
    assert state.reset_token_hash is None


def test_a_reset_token_is_single_use():
    used = users.PasswordChanged(user_id="alice", password_hash="h", via="reset", at=T0)
    given(registered("alice"), REQUESTED, used).when(complete_reset(), ctx=ctx()).then_raises(
        ResetTokenInvalid
    )


def test_a_wrong_or_expired_reset_token_is_refused():
    error = (
        given(registered("alice"), REQUESTED)
        .when(complete_reset(token=TOKEN + "y"), ctx=ctx())
        .then_raises(ResetTokenInvalid)
    )
    assert error.reason == "unknown"
    error = (
        given(registered("alice"), REQUESTED)
        .when(complete_reset(), ctx=ctx(at=T0 + timedelta(hours=1)))
        .then_raises(ResetTokenInvalid)
    )
    assert error.reason == "expired"


def test_a_reset_checks_the_password_policy():
    given(registered("alice"), REQUESTED).when(
        complete_reset(new="password1234"), ctx=ctx()
    ).then_raises(WeakPassword)


# --- administration -----------------------------------------------------------------


def test_assigning_a_role_needs_users_manage():
    command = users.AssignRole(user_id="alice", role=Role.ADMIN)
    given(registered("alice")).when(command, ctx=ctx("bob"), related=actor("bob")).then_raises(
        PermissionDenied
    )
    given(registered("alice")).when(command, ctx=ctx(ADMIN_ID), related=admin()).then(
        users.RoleAssigned(user_id="alice", role=Role.ADMIN, by=ADMIN_ID)
    )


def test_a_deactivated_admin_has_no_permissions():
    off = users.UserDeactivated(user_id=ADMIN_ID, by="x", at=T0)
    related = actor(ADMIN_ID, off, roles=(Role.ADMIN,))
    command = users.AssignRole(user_id="alice", role=Role.ADMIN)
    given(registered("alice")).when(command, ctx=ctx(ADMIN_ID), related=related).then_raises(
        PermissionDenied
    )


def test_role_changes_that_change_nothing_emit_nothing():
    given(registered("alice")).when(
        users.AssignRole(user_id="alice", role=Role.MEMBER), ctx=ctx(ADMIN_ID), related=admin()
    ).then()
    given(registered("alice")).when(
        users.RevokeRole(user_id="alice", role=Role.ADMIN), ctx=ctx(ADMIN_ID), related=admin()
    ).then()


def test_an_admin_cannot_revoke_their_own_admin_role_or_deactivate_themself():
    me = registered(ADMIN_ID, roles=(Role.ADMIN,))
    given(me).when(
        users.RevokeRole(user_id=ADMIN_ID, role=Role.ADMIN), ctx=ctx(ADMIN_ID), related=admin()
    ).then_raises(Conflict)
    given(me).when(
        users.DeactivateUser(user_id=ADMIN_ID), ctx=ctx(ADMIN_ID), related=admin()
    ).then_raises(Conflict)


def test_deactivation_revokes_sessions_and_reactivation_restores_login():
    off = users.UserDeactivated(user_id="alice", by=ADMIN_ID, at=T0)
    given(registered("alice")).when(
        users.DeactivateUser(user_id="alice"), ctx=ctx(ADMIN_ID), related=admin()
    ).then(off)
    assert fold_users(registered("alice"), off).sessions_valid_after == T0
    given(registered("alice"), off).when(
        users.ReactivateUser(user_id="alice"), ctx=ctx(ADMIN_ID), related=admin()
    ).then(users.UserReactivated(user_id="alice", by=ADMIN_ID, at=T0))
    given(registered("alice")).when(
        users.DeactivateUser(user_id="alice"), ctx=ctx("bob"), related=actor("bob")
    ).then_raises(PermissionDenied)


def test_an_admin_unlocks_a_locked_account():
    lock = users.AccountLocked(user_id="alice", until=T0 + minutes(10), failed_attempts=5)
    unlock = users.AccountUnlocked(user_id="alice", by=ADMIN_ID, at=T0)
    given(registered("alice"), lock).when(
        users.UnlockUser(user_id="alice"), ctx=ctx(ADMIN_ID), related=admin()
    ).then(unlock)
    events = given(registered("alice"), lock, unlock).when(login(), ctx=ctx()).events()
    assert isinstance(events[0], users.LoginSucceeded)
    given(registered("alice")).when(
        users.UnlockUser(user_id="alice"), ctx=ctx(ADMIN_ID), related=admin()
    ).then()


def test_a_user_or_an_admin_revokes_all_of_the_users_sessions():
    command = users.RevokeAllSessions(user_id="alice")
    given(registered("alice")).when(command, ctx=ctx("alice"), related=actor("alice")).then(
        users.UserSessionsRevoked(user_id="alice", by="alice", at=T0)
    )
    given(registered("alice")).when(command, ctx=ctx(ADMIN_ID), related=admin()).then(
        users.UserSessionsRevoked(user_id="alice", by=ADMIN_ID, at=T0)
    )
    given(registered("alice")).when(command, ctx=ctx("bob"), related=actor("bob")).then_raises(
        PermissionDenied
    )


def test_commands_on_an_unregistered_user_raise_not_found():
    given().when(
        users.AssignRole(user_id="ghost", role=Role.ADMIN), ctx=ctx(ADMIN_ID), related=admin()
    ).then_raises(NotFound)


# --- email --------------------------------------------------------------------------


def test_changing_ones_own_email_needs_the_password():
    command = users.ChangeEmail(user_id="alice", new_email="Alice@New.example")
    given(registered("alice")).when(command, ctx=ctx("alice")).then_raises(InvalidCommand)
    wrong = command.model_copy(update={"password": SecretStr("nope")})
    given(registered("alice")).when(wrong, ctx=ctx("alice")).then_raises(
        InvalidCredentials, record=(failed(T0),)
    )
    right = command.model_copy(update={"password": SecretStr(PASSWORD)})
    given(registered("alice")).when(right, ctx=ctx("alice")).then(
        users.EmailChanged(
            user_id="alice",
            previous_email="alice@example.org",
            email="Alice@new.example",
            by="alice",
        )
    )


def test_an_admin_changes_an_email_without_a_password():
    command = users.ChangeEmail(user_id="alice", new_email="a2@example.org")
    events = given(registered("alice")).when(command, ctx=ctx(ADMIN_ID), related=admin()).events()
    assert [e.email for e in events] == ["a2@example.org"]


def test_claim_keys_ignore_case_and_surrounding_space():
    assert users.email_claim_key(" Alice@Example.org") == users.email_claim_key("alice@example.ORG")
    assert users.username_claim_key("Alice") == users.username_claim_key("alice")
    assert "alice" not in users.email_claim_key("alice@example.org")
