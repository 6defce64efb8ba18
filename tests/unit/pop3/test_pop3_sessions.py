"""Whole POP3 sessions as byte transcripts through the sans-IO core (RFC 1939, RFC 5034)."""

from __future__ import annotations

import base64

import pytest
from pop3_transcript import LOGIN, PASSWORD, USER, driver

from postkeep.pop3 import replies
from postkeep.pop3.protocol import (
    NEED_DATA,
    AuthResponse,
    AuthStart,
    ConnectionClosed,
    Pass,
    ProtocolError,
    Quit,
    Retr,
    State,
    Top,
    User,
)

MSG1 = b"From: bob@example.test\r\nSubject: hi\r\n\r\nline one\r\n.line two\r\n"
MSG2 = b"Subject: two\r\n\r\nbody"
PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
CAPA_TLS = (
    b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
    b"PIPELINING\r\nUSER\r\nSASL PLAIN\r\nIMPLEMENTATION postkeep\r\n.\r\n"
)


def test_user_pass_session_over_implicit_tls_pipelined() -> None:
    d = driver([MSG1, MSG2], tls_active=True)
    assert d.core.greet() == b"+OK postkeep ready\r\n"
    out = d.feed(
        b"CAPA\r\n" + LOGIN + b"STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 1\r\nRETR 1\r\n"
        b"DELE 1\r\nRETR 1\r\nLIST\r\nNOOP\r\nQUIT\r\n"
    )
    assert out == (
        CAPA_TLS + b"+OK Send your password with PASS\r\n"
        b"+OK Maildrop has 2 messages (80 octets)\r\n"
        b"+OK 2 80\r\n"
        b"+OK Scan listing follows\r\n1 60\r\n2 20\r\n.\r\n"
        b"+OK 2 20\r\n"
        b"+OK Unique-id listing follows\r\n1 uid1\r\n2 uid2\r\n.\r\n"
        b"+OK 1 uid1\r\n"
        b"+OK 60 octets\r\n"
        b"From: bob@example.test\r\nSubject: hi\r\n\r\nline one\r\n..line two\r\n.\r\n"
        b"+OK Message 1 deleted\r\n"
        b"-ERR Message already deleted\r\n"
        b"+OK Scan listing follows\r\n2 20\r\n.\r\n"
        b"+OK\r\n"
        b"+OK postkeep POP3 server signing off (1 message left)\r\n"
    )
    assert d.core.state is State.CLOSED
    assert d.session.committed == {1}


def test_quit_in_transaction_passes_through_update() -> None:
    d = driver([MSG1], tls_active=True)
    d.feed(LOGIN)
    d.core.receive_data(b"DELE 1\r\nQUIT\r\n")
    d.core.send(d.session.handle(d.core.next_event()))  # type: ignore[arg-type]
    assert d.core.next_event() == Quit()
    # RFC 1939 §6: the session deletes while the core is in UPDATE, then replies.
    assert d.core.state is State.UPDATE
    assert d.core.send(replies.signing_off(0)) == (
        b"+OK postkeep POP3 server signing off (0 messages left)\r\n"
    )
    assert d.core.state is State.CLOSED


def test_update_failure_still_closes() -> None:
    d = driver([MSG1], tls_active=True)
    d.feed(LOGIN)
    d.core.receive_data(b"QUIT\r\n")
    assert d.core.next_event() == Quit()
    out = d.core.send(replies.UPDATE_FAILED)
    assert out == b"-ERR [SYS/TEMP] Some deleted messages not removed, try again later\r\n"
    assert d.core.state is State.CLOSED


def test_quit_in_authorization_closes_without_update() -> None:
    d = driver(tls_active=True)
    assert d.feed(b"QUIT\r\nUSER x\r\n") == b"+OK postkeep POP3 server signing off\r\n"
    assert d.core.state is State.CLOSED
    assert d.session.committed is None
    assert d.core.next_event() == ConnectionClosed()


def test_connection_closed_in_transaction_deletes_nothing() -> None:
    d = driver([MSG1], tls_active=True)
    d.feed(LOGIN + b"DELE 1\r\n")
    assert d.feed(b"") == b""
    assert d.closed and d.core.state is State.CLOSED
    assert d.session.committed is None  # RFC 1939 §6: no QUIT, no UPDATE


def test_lines_before_eof_are_processed_and_a_partial_line_is_dropped() -> None:
    d = driver([MSG1], tls_active=True)
    d.core.receive_data(LOGIN + b"STAT\r\nDELE")
    d.core.receive_data(b"")
    out = d.feed(b"")
    assert out.endswith(b"+OK 1 60\r\n")
    assert d.core.next_event() == ConnectionClosed()
    assert d.core.next_event() == ConnectionClosed()


def test_auth_plain_with_initial_response() -> None:
    d = driver([MSG1], tls_active=True)
    assert d.feed(b"AUTH PLAIN " + PLAIN + b"\r\nSTAT\r\n") == (
        b"+OK Maildrop has 1 message (60 octets)\r\n+OK 1 60\r\n"
    )
    assert d.session.events[0] == AuthStart("PLAIN", f"\0{USER}\0{PASSWORD}".encode())
    assert d.core.state is State.TRANSACTION


def test_auth_plain_without_initial_response_gets_an_empty_challenge() -> None:
    d = driver([MSG1], tls_active=True)
    assert d.feed(b"auth plain\r\n") == b"+ \r\n"
    assert d.core.state is State.AUTH_EXCHANGE
    assert d.feed(PLAIN + b"\r\n") == b"+OK Maildrop has 1 message (60 octets)\r\n"
    assert d.session.events == [
        AuthStart("PLAIN", None),
        AuthResponse(f"\0{USER}\0{PASSWORD}".encode()),
    ]
    assert d.core.state is State.TRANSACTION


def test_auth_equals_sign_is_an_empty_initial_response() -> None:
    d = driver(tls_active=True)
    assert d.feed(b"AUTH PLAIN =\r\n") == b"+ \r\n"
    assert d.session.events == [AuthStart("PLAIN", b"")]


def test_auth_cancel_returns_to_authorization() -> None:
    d = driver(tls_active=True)
    d.feed(b"AUTH PLAIN\r\n")
    assert d.feed(b"*\r\n") == b"-ERR Authentication cancelled\r\n"
    assert d.session.events[-1] == AuthResponse(None)
    assert d.core.state is State.AUTHORIZATION
    # A new exchange may start; RETR is still refused.
    assert d.feed(b"RETR 1\r\nAUTH PLAIN " + PLAIN + b"\r\n") == (
        b"-ERR Not logged in: log in with USER and PASS, or AUTH, first\r\n"
        b"+OK Maildrop has 0 messages (0 octets)\r\n"
    )


def test_auth_failure_says_auth_and_allows_another_try() -> None:
    d = driver(tls_active=True)
    bad = base64.b64encode(f"\0{USER}\0wrong".encode())
    assert d.feed(b"AUTH PLAIN " + bad + b"\r\n") == b"-ERR [AUTH] Authentication failed\r\n"
    assert d.core.state is State.AUTHORIZATION
    d.feed(b"AUTH PLAIN\r\n")
    assert d.feed(bad + b"\r\n") == b"-ERR [AUTH] Authentication failed\r\n"
    assert d.core.state is State.AUTHORIZATION


def test_auth_bad_base64_in_a_response_ends_the_exchange() -> None:
    d = driver(tls_active=True)
    d.feed(b"AUTH PLAIN\r\n")
    assert d.feed(b"not base64!\r\n") == (
        b"-ERR Invalid base64 data in the authentication exchange\r\n"
    )
    assert d.core.state is State.AUTHORIZATION
    # The next line is a command again, not a SASL response.
    assert d.feed(b"CAPA\r\n") == CAPA_TLS


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"AUTH PLAIN abc\r\n", replies.AUTH_BAD_BASE64),  # bad padding
        (b"AUTH PLAIN =x\r\n", replies.AUTH_BAD_BASE64),
        (b"AUTH\r\n", replies.AUTH_MECHANISM_MISSING),
        (b"AUTH CRAM-MD5\r\n", replies.AUTH_MECHANISM_UNSUPPORTED),
        (b"AUTH LOGIN\r\n", replies.AUTH_MECHANISM_UNSUPPORTED),  # not advertised
        (b"AUTH PL@IN\r\n", replies.AUTH_MECHANISM_UNSUPPORTED),
        (b"AUTH PLAIN a b\r\n", replies.syntax_error("AUTH <mechanism> [<initial response>]")),
    ],
)
def test_malformed_auth_commands_are_refused_by_the_core(line: bytes, reply: object) -> None:
    d = driver(tls_active=True)
    d.core.receive_data(line)
    with pytest.raises(ProtocolError) as exc:
        d.core.next_event()
    assert exc.value.hint == reply
    d.core.send(exc.value.hint)
    assert d.core.state is State.AUTHORIZATION
    assert d.session.events == []


def test_pass_only_right_after_a_successful_user() -> None:
    d = driver(tls_active=True)
    assert d.feed(f"PASS {PASSWORD}\r\n".encode()) == b"-ERR Send USER first\r\n"
    # Another command between USER and PASS breaks the pair (RFC 1939 §7).
    out = d.feed(f"USER {USER}\r\nCAPA\r\nPASS {PASSWORD}\r\n".encode())
    assert out.endswith(b".\r\n-ERR Send USER first\r\n")
    # A failed PASS needs a new USER.
    out = d.feed(f"USER {USER}\r\nPASS wrong\r\nPASS {PASSWORD}\r\n".encode())
    assert out == (
        b"+OK Send your password with PASS\r\n-ERR [AUTH] Authentication failed\r\n"
        b"-ERR Send USER first\r\n"
    )
    assert d.feed(LOGIN).endswith(b"+OK Maildrop has 0 messages (0 octets)\r\n")
    assert d.core.state is State.TRANSACTION


def test_user_refused_by_the_session_does_not_allow_pass() -> None:
    d = driver(tls_active=True)
    d.core.receive_data(b"USER nobody\r\nPASS x\r\n")
    assert d.core.next_event() == User("nobody")
    d.core.send(replies.err("No such user"))
    with pytest.raises(ProtocolError) as exc:
        d.core.next_event()
    assert exc.value.hint == replies.USER_FIRST


def test_pass_takes_the_rest_of_the_line_spaces_included() -> None:
    d = driver(tls_active=True)
    d.core.receive_data(b"USER a\r\nPASS  two  spaces \r\n")
    assert d.core.next_event() == User("a")
    d.core.send(replies.USER_OK)
    event = d.core.next_event()
    assert event == Pass(" two  spaces ")
    assert "two" not in repr(event)


def test_secrets_are_not_in_event_reprs() -> None:
    assert "hunter2" not in repr(Pass("hunter2"))
    assert "hunter2" not in repr(AuthStart("PLAIN", b"\0u\0hunter2"))
    assert "hunter2" not in repr(AuthResponse(b"\0u\0hunter2"))
    assert "PLAIN" in repr(AuthStart("PLAIN", b"x"))


def test_commands_are_case_insensitive_and_lf_alone_ends_a_line() -> None:
    d = driver([MSG2], tls_active=True)
    out = d.feed(f"user {USER}\npAsS {PASSWORD}\nStAt\nlist 1 \r\n".encode())
    assert out == (
        b"+OK Send your password with PASS\r\n+OK Maildrop has 1 message (20 octets)\r\n"
        b"+OK 1 20\r\n+OK 1 20\r\n"
    )


def test_a_command_split_across_reads_waits_for_its_line_end() -> None:
    d = driver([MSG2], tls_active=True)
    d.feed(LOGIN)
    for chunk in (b"R", b"ET", b"R 1", b"\r"):
        assert d.feed(chunk) == b""
    assert d.feed(b"\n") == b"+OK 20 octets\r\nSubject: two\r\n\r\nbody\r\n.\r\n"


def test_top_zero_and_n_lines() -> None:
    msg = b"Subject: t\r\nX: y\r\n\r\nb1\r\n.b2\r\nb3\r\n"
    d = driver([msg], tls_active=True)
    d.feed(LOGIN)
    assert d.feed(b"TOP 1 0\r\n") == (
        b"+OK Top of message follows\r\nSubject: t\r\nX: y\r\n\r\n.\r\n"
    )
    assert d.feed(b"TOP 1 2\r\n") == (
        b"+OK Top of message follows\r\nSubject: t\r\nX: y\r\n\r\nb1\r\n..b2\r\n.\r\n"
    )
    assert d.feed(b"TOP 1 2147483647\r\n") == b"+OK Top of message follows\r\n" + (
        b"Subject: t\r\nX: y\r\n\r\nb1\r\n..b2\r\nb3\r\n.\r\n"
    )
    assert d.session.events[-1] == Top(1, 2147483647)


@pytest.mark.parametrize(
    "line",
    [
        b"RETR 0",
        b"RETR -1",
        b"RETR +1",
        b"RETR 1.0",
        b"RETR 0x1",
        b"RETR 2147483648",
        b"RETR 99999999999",
        "RETR \u0661".encode(),  # ARABIC-INDIC DIGIT ONE: a digit, but not ASCII
        b"LIST x",
        b"DELE one",
        b"UIDL 0",
        b"TOP 0 1",
        b"TOP x 1",
    ],
)
def test_bad_message_numbers_are_refused(line: bytes) -> None:
    d = driver([MSG1], tls_active=True)
    d.feed(LOGIN)
    assert d.feed(line + b"\r\n") == b"-ERR Invalid message number: use a number from LIST\r\n"
    assert d.session.events[-1] == Pass(PASSWORD)  # the session never saw it


@pytest.mark.parametrize(
    ("line", "usage"),
    [
        (b"RETR", b"RETR <message>"),
        (b"RETR 1 2", b"RETR <message>"),
        (b"DELE", b"DELE <message>"),
        (b"TOP 1", b"TOP <message> <lines>"),
        (b"TOP 1 -1", b"TOP <message> <lines>"),
        (b"TOP 1 2147483648", b"TOP <message> <lines>"),
        (b"TOP 1 2 3", b"TOP <message> <lines>"),
        (b"LIST 1 2", b"LIST [<message>]"),
        (b"STAT 1", b"STAT"),
        (b"NOOP x", b"NOOP"),
        (b"QUIT now", b"QUIT"),
    ],
)
def test_argument_syntax_errors_name_the_right_form(line: bytes, usage: bytes) -> None:
    d = driver([MSG1], tls_active=True)
    d.feed(LOGIN)
    assert d.feed(line + b"\r\n") == b"-ERR Syntax error, use: " + usage + b"\r\n"
    assert d.core.state is State.TRANSACTION


def test_commands_outside_their_state() -> None:
    d = driver([MSG1], tls_active=True)
    before = d.feed(b"STAT\r\nRETR 1\r\nNOOP\r\nTOP 1 1\r\n")
    assert before == b"-ERR Not logged in: log in with USER and PASS, or AUTH, first\r\n" * 4
    d.feed(LOGIN)
    after = d.feed(b"USER x\r\nPASS y\r\nAUTH PLAIN\r\nSTLS\r\n")
    assert after == b"-ERR Already logged in\r\n" * 4
    assert d.core.state is State.TRANSACTION
    assert not any(isinstance(e, Retr) for e in d.session.events)


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"XYZZY", b"-ERR Unknown command"),
        (b"", b"-ERR Unknown command"),
        (b" STAT", b"-ERR Unknown command"),
        ("\u0131NFO".encode(), b"-ERR Unknown command"),  # dotless i must not upper() to I
        (
            b"APOP alice 0123456789abcdef0123456789abcdef",
            b"-ERR APOP is not supported: use USER and PASS, or AUTH PLAIN, over TLS",
        ),
        (b"USER a\x01b", b"-ERR Control characters are not allowed in a command line"),
        (b"USER a\rb", b"-ERR Control characters are not allowed in a command line"),
        (b"USER \xff", b"-ERR Command line is not valid UTF-8"),
    ],
)
def test_malformed_lines_get_a_sentence(line: bytes, reply: bytes) -> None:
    d = driver(tls_active=True)
    assert d.feed(line + b"\r\n") == reply + b"\r\n"
    assert d.session.events == []


def test_password_may_hold_anything_but_nul_and_cr() -> None:
    d = driver(tls_active=True)
    d.core.receive_data(b"USER a\r\nPASS tab\there\r\nUSER a\r\nPASS nul\x00\r\n")
    assert d.core.next_event() == User("a")
    d.core.send(replies.USER_OK)
    assert d.core.next_event() == Pass("tab\there")
    d.core.send(replies.AUTH_FAILED)
    assert d.core.next_event() == User("a")
    d.core.send(replies.USER_OK)
    with pytest.raises(ProtocolError) as exc:
        d.core.next_event()
    assert exc.value.hint == replies.CONTROL_CHARACTER
    assert "nul" not in str(exc.value)


def test_need_data_until_a_full_line() -> None:
    d = driver(tls_active=True)
    assert d.core.next_event() is NEED_DATA
    d.core.receive_data(b"CAP")
    assert d.core.next_event() is NEED_DATA
