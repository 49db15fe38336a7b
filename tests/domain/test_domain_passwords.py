import unicodedata

import pytest

from domain import BcryptHasher, SecurityPolicy, WeakPassword, check_password_strength, hash_token
from domain.passwords import common_passwords

POLICY = SecurityPolicy()


def reasons_for(password: str, username: str | None = "alice", email: str | None = None):
    with pytest.raises(WeakPassword) as info:
        check_password_strength(password, username=username, email=email, policy=POLICY)
    return info.value.reasons


def test_a_long_uncommon_password_passes():
    check_password_strength(
        "plum orbit kettle 42", username="alice", email="alice@example.org", policy=POLICY
    )


def test_a_weak_password_lists_every_reason_in_the_message():
    with pytest.raises(WeakPassword) as info:
        check_password_strength("alice", username="alice", email="alice@x.org", policy=POLICY)
    error = info.value
    assert error.reasons == (
        "must be at least 12 characters (has 5)",
        "must not contain the username",
        "must not contain the email address",
    )
    assert str(error) == (
        "password is too weak: must be at least 12 characters (has 5); "
        "must not contain the username; must not contain the email address"
    )
    assert error.field == "password"


@pytest.mark.parametrize(
    "password", ["password1234", "QwertyUiop123", "123456789012", "ILOVEYOU1234"]
)
def test_common_passwords_are_refused_case_insensitively(password):
    assert reasons_for(password) == ("is a commonly used password",)


def test_the_shipped_list_is_substantial_and_holds_long_entries():
    listed = common_passwords()
    assert len(listed) >= 300
    assert sum(len(p) >= 12 for p in listed) >= 150


def test_length_limits_count_characters_after_nfc_not_bytes():
    composed = "é" * 12
    decomposed = unicodedata.normalize("NFD", composed)
    assert len(decomposed) == 24
    check_password_strength(decomposed, username=None, email=None, policy=POLICY)
    assert reasons_for("é" * 11, username=None) == ("must be at least 12 characters (has 11)",)
    check_password_strength("ü" * 128, username=None, email=None, policy=POLICY)
    assert reasons_for("ü" * 129, username=None) == ("must be at most 128 characters (has 129)",)


def test_a_64_character_passphrase_is_allowed():
    check_password_strength("w" * 30 + " " + "z" * 33, username=None, email=None, policy=POLICY)


def test_username_and_email_checks_ignore_case_and_skip_very_short_identities():
    assert reasons_for("my AliCe secret phrase") == ("must not contain the username",)
    check_password_strength(
        "bo was here today!", username="bo", email="bo@example.org", policy=POLICY
    )
    assert reasons_for("plum JSMITH kettle", username=None, email="jsmith@example.org") == (
        "must not contain the email address",
    )


def test_hash_token_is_sha256_hex():
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- real bcrypt, lowest cost -------------------------------------------------------

BCRYPT = BcryptHasher(rounds=4)


def test_bcrypt_hash_verifies_only_the_same_password():
    hashed = BCRYPT.hash("plum orbit kettle 42")
    assert hashed.startswith("$2b$04$")
    assert BCRYPT.verify("plum orbit kettle 42", hashed)
    assert not BCRYPT.verify("plum orbit kettle 43", hashed)


def test_passwords_differing_only_after_byte_72_do_not_verify_against_each_other():
    prefix = "ä" * 40  # 80 UTF-8 bytes: raw bcrypt would see only the first 72
    first, second = prefix + "one", prefix + "two"
    hashed = BCRYPT.hash(first)
    assert BCRYPT.verify(first, hashed)
    assert not BCRYPT.verify(second, hashed)


def test_nfc_and_nfd_spellings_of_a_password_verify_alike():
    hashed = BCRYPT.hash("Café au lait 2025")
    assert BCRYPT.verify(unicodedata.normalize("NFD", "Café au lait 2025"), hashed)


def test_a_malformed_stored_hash_is_a_mismatch_not_a_crash():
    assert not BCRYPT.verify("anything at all", "not-a-bcrypt-hash")


def test_dummy_hash_is_a_valid_hash_at_the_hashers_cost_computed_once():
    assert BCRYPT.dummy_hash.startswith("$2b$04$")
    assert BCRYPT.dummy_hash is BcryptHasher(rounds=4).dummy_hash
    assert not BCRYPT.verify("whatever", BCRYPT.dummy_hash)


def test_bcrypt_rounds_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"4\.\.31"):
        BcryptHasher(rounds=3)
