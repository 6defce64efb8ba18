"""PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) server exchanges."""

from __future__ import annotations

import pytest

from postkeep.sasl.mechanisms import (
    MAX_FIELD_OCTETS,
    MECHANISMS,
    Challenge,
    Credentials,
    Done,
    Login,
    Plain,
    SaslError,
    UnknownMechanism,
    server_mechanism,
)

SECRET = "correct horse battery staple"


def creds(step: object) -> Credentials:
    assert isinstance(step, Done), step
    return step.credentials


# --- registry -----------------------------------------------------------------------------


def test_mechanisms_advertised_plain_first() -> None:
    assert MECHANISMS == ("PLAIN", "LOGIN")


@pytest.mark.parametrize(
    ("name", "cls"), [("PLAIN", Plain), ("plain", Plain), ("Login", Login), ("LOGIN", Login)]
)
def test_server_mechanism_is_case_insensitive(name: str, cls: type) -> None:
    mech = server_mechanism(name)
    assert isinstance(mech, cls)
    assert mech.name == name.upper()


def test_server_mechanism_gives_a_fresh_exchange_each_time() -> None:
    assert server_mechanism("PLAIN") is not server_mechanism("PLAIN")


@pytest.mark.parametrize("name", ["CRAM-MD5", "XOAUTH2", "", "PLAIN ", " plain", "pla\u0131n"])
def test_unknown_mechanism_is_both_sasl_error_and_key_error(name: str) -> None:
    with pytest.raises(UnknownMechanism) as info:
        server_mechanism(name)
    assert isinstance(info.value, SaslError)
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "unsupported SASL mechanism"  # plain text, no echo


def test_unknown_mechanism_message_does_not_echo_client_text() -> None:
    with pytest.raises(SaslError) as info:
        server_mechanism("EVIL\r\n<script>")
    assert "EVIL" not in str(info.value)


# --- PLAIN --------------------------------------------------------------------------------


def test_plain_initial_response_completes_in_one_step() -> None:
    step = Plain().start(b"\x00alice@example.com\x00" + SECRET.encode())
    assert creds(step) == Credentials("alice@example.com", "alice@example.com", SECRET)


def test_plain_without_initial_response_sends_empty_challenge() -> None:
    mech = Plain()
    assert mech.start(None) == Challenge(b"")
    assert creds(mech.step(b"\x00bob\x00pw")).authcid == "bob"


def test_plain_empty_initial_response_sends_empty_challenge() -> None:
    # "AUTH PLAIN =" (RFC 4954 §4): an empty initial response.
    mech = Plain()
    assert mech.start(b"") == Challenge(b"")
    assert creds(mech.step(b"\x00bob\x00pw")).password == "pw"


def test_plain_authzid_equal_to_authcid_is_accepted() -> None:
    c = creds(Plain().start(b"bob\x00bob\x00pw"))
    assert (c.authzid, c.authcid, c.password) == ("bob", "bob", "pw")


def test_plain_empty_authzid_means_authcid() -> None:
    assert creds(Plain().start(b"\x00bob\x00pw")).authzid == "bob"


def test_plain_refuses_proxy_authorization() -> None:
    with pytest.raises(SaslError, match="authorization identity"):
        Plain().start(b"admin\x00bob\x00pw")


def test_plain_authzid_comparison_is_exact() -> None:
    with pytest.raises(SaslError):
        Plain().start(b"Bob\x00bob\x00pw")


def test_plain_utf8_fields_are_decoded() -> None:
    c = creds(Plain().start("\x00jürgen@bücher.example\x00pässwörd€".encode()))
    assert c.authcid == "jürgen@bücher.example"
    assert c.password == "pässwörd€"


@pytest.mark.parametrize(
    "message",
    [
        b"bob\x00pw",  # one NUL
        b"bobpw",  # none
        b"\x00bob\x00pw\x00",  # three: a NUL inside passwd
        b"\x00bob\x00p\x00w",
        b"\x00\x00pw",  # empty authcid
        b"\x00bob\x00",  # empty password
        b"\x00\x00",
        b"\x00",
    ],
)
def test_plain_malformed_messages_are_refused(message: bytes) -> None:
    with pytest.raises(SaslError):
        Plain().start(message)


@pytest.mark.parametrize(
    "message",
    [
        b"\x00b\xffob\x00pw",  # invalid byte
        b"\x00bob\x00p\xc3",  # truncated sequence
        b"\x00bob\x00\xc0\xafpw",  # overlong "/"
        b"\x00bob\x00\xed\xa0\x80",  # UTF-8-encoded surrogate
        b"\xff\x00bob\x00pw",  # in authzid
    ],
)
def test_plain_refuses_invalid_utf8(message: bytes) -> None:
    with pytest.raises(SaslError, match="UTF-8"):
        Plain().start(message)


@pytest.mark.parametrize("user", [b"bo\rb", b"bob\n", b"b\x1bob", b"bob\x7f", "bob\x85".encode()])
def test_plain_refuses_control_characters_in_identity(user: bytes) -> None:
    with pytest.raises(SaslError, match="control"):
        Plain().start(b"\x00" + user + b"\x00pw")


def test_plain_password_may_contain_anything_but_nul() -> None:
    c = creds(Plain().start(b"\x00bob\x00 tab\tand\r\nnewline "))
    assert c.password == " tab\tand\r\nnewline "


def test_plain_fields_up_to_the_limit_are_accepted() -> None:
    user = b"u" * MAX_FIELD_OCTETS
    password = b"p" * MAX_FIELD_OCTETS
    c = creds(Plain().start(user + b"\x00" + user + b"\x00" + password))
    assert len(c.authcid) == len(c.password) == MAX_FIELD_OCTETS


@pytest.mark.parametrize(
    "message",
    [
        b"\x00" + b"u" * (MAX_FIELD_OCTETS + 1) + b"\x00pw",
        b"\x00bob\x00" + b"p" * (MAX_FIELD_OCTETS + 1),
        b"a" * (MAX_FIELD_OCTETS + 1) + b"\x00bob\x00pw",
        b"\x00" * 10 + b"x" * 10_000,
    ],
)
def test_plain_over_long_fields_are_refused(message: bytes) -> None:
    with pytest.raises(SaslError, match="too long"):
        Plain().start(message)


def test_plain_error_message_never_contains_the_payload() -> None:
    with pytest.raises(SaslError) as info:
        Plain().start(b"s3cr3t-authz\x00s3cr3t-user\x00s3cr3t-pass")
    assert "s3cr3t" not in str(info.value)


def test_plain_exchange_is_single_use() -> None:
    mech = Plain()
    mech.start(b"\x00bob\x00pw")
    with pytest.raises(SaslError):
        mech.step(b"\x00bob\x00pw")
    with pytest.raises(SaslError):
        mech.start(b"\x00bob\x00pw")


def test_plain_step_before_start_is_refused() -> None:
    with pytest.raises(SaslError):
        Plain().step(b"\x00bob\x00pw")


def test_plain_failed_exchange_cannot_be_continued() -> None:
    mech = Plain()
    assert mech.start(None) == Challenge(b"")
    with pytest.raises(SaslError):
        mech.step(b"garbage")
    with pytest.raises(SaslError):
        mech.step(b"\x00bob\x00pw")


# --- LOGIN --------------------------------------------------------------------------------


def test_login_full_exchange() -> None:
    mech = Login()
    assert mech.start(None) == Challenge(b"Username:")
    assert mech.step(b"alice@example.com") == Challenge(b"Password:")
    assert creds(mech.step(SECRET.encode())) == Credentials(
        "alice@example.com", "alice@example.com", SECRET
    )


def test_login_initial_response_is_the_user_name() -> None:
    mech = Login()
    assert mech.start(b"alice") == Challenge(b"Password:")
    assert creds(mech.step(b"pw")).authcid == "alice"


def test_login_empty_initial_response_asks_for_user_name() -> None:
    mech = Login()
    assert mech.start(b"") == Challenge(b"Username:")


@pytest.mark.parametrize(
    "user", [b"", b"a\x00b", b"\xff", b"a\r\nb", b"u" * (MAX_FIELD_OCTETS + 1)]
)
def test_login_bad_user_names_are_refused(user: bytes) -> None:
    mech = Login()
    mech.start(None)
    with pytest.raises(SaslError):
        mech.step(user)


@pytest.mark.parametrize("password", [b"", b"a\x00b", b"\xc3(", b"p" * (MAX_FIELD_OCTETS + 1)])
def test_login_bad_passwords_are_refused(password: bytes) -> None:
    mech = Login()
    mech.start(b"alice")
    with pytest.raises(SaslError):
        mech.step(password)


def test_login_bad_initial_user_name_is_refused() -> None:
    with pytest.raises(SaslError):
        Login().start(b"a\x00b")


def test_login_exchange_is_single_use() -> None:
    mech = Login()
    mech.start(b"alice")
    mech.step(b"pw")
    with pytest.raises(SaslError):
        mech.step(b"pw")
    with pytest.raises(SaslError):
        mech.start(None)


def test_login_failed_user_name_ends_the_exchange() -> None:
    mech = Login()
    mech.start(None)
    with pytest.raises(SaslError):
        mech.step(b"\xff")
    with pytest.raises(SaslError):
        mech.step(b"alice")


def test_login_step_before_start_is_refused() -> None:
    with pytest.raises(SaslError):
        Login().step(b"alice")


# --- Credentials ----------------------------------------------------------------------------


def test_credentials_repr_and_str_hide_the_password() -> None:
    c = Credentials("bob", "bob", "hunter2-secret")
    assert "hunter2-secret" not in repr(c)
    assert "hunter2-secret" not in str(c)
    assert "bob" in repr(c)


def test_credentials_are_immutable() -> None:
    c = Credentials("bob", "bob", "pw")
    with pytest.raises(AttributeError):
        c.password = "other"  # type: ignore[misc]
