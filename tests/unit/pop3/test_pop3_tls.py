"""TLS in the POP3 core: credential gating, CAPA, and STLS without leftovers (RFC 2595)."""

from __future__ import annotations

import pytest
from pop3_transcript import HINT, LOGIN, PASSWORD, USER, driver

from postkeep.pop3 import replies
from postkeep.pop3.protocol import (
    Capa,
    Limits,
    Pop3Server,
    ProtocolError,
    State,
    Stls,
    User,
)

REFUSED = b"-ERR [AUTH] " + HINT.encode() + b"\r\n"
BASE_CAPS = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]


@pytest.mark.parametrize(
    "line",
    [
        f"USER {USER}".encode(),
        b"USER",  # refused for TLS before its syntax is looked at
        f"PASS {PASSWORD}".encode(),  # the TLS answer, not "send USER first"
        b"AUTH PLAIN",
        b"AUTH PLAIN AHVzZXIAcGFzcw==",
        b"AUTH",
        b"auth login",
    ],
)
def test_credentials_before_tls_get_auth_code_and_the_hint(line: bytes) -> None:
    d = driver(require_tls=True)
    assert d.feed(line + b"\r\n") == REFUSED
    assert d.session.events == []
    assert d.core.state is State.AUTHORIZATION


def test_pipelined_login_before_tls_never_reaches_the_session() -> None:
    d = driver(require_tls=True)
    assert d.feed(LOGIN + b"STAT\r\n") == REFUSED * 2 + (
        b"-ERR Not logged in: log in with USER and PASS, or AUTH, first\r\n"
    )
    assert d.session.events == []


def test_the_hint_is_the_drivers_sentence() -> None:
    core = Pop3Server(
        limits=Limits(),
        tls_active=False,
        tls_offered=False,
        require_tls=True,
        starttls_hint="Use SSL/TLS on port 995",
    )
    core.receive_data(b"USER a\r\n")
    with pytest.raises(ProtocolError) as exc:
        core.next_event()
    assert core.send(exc.value.hint) == b"-ERR [AUTH] Use SSL/TLS on port 995\r\n"


def test_a_hint_that_could_inject_a_line_is_refused() -> None:
    with pytest.raises(ValueError):
        Pop3Server(
            limits=Limits(),
            tls_active=False,
            tls_offered=True,
            require_tls=True,
            starttls_hint="x\r\n+OK evil",
        )


def test_capa_before_tls_offers_stls_and_no_credentials() -> None:
    d = driver(require_tls=True)
    assert d.core.capabilities() == [*BASE_CAPS, "STLS", "IMPLEMENTATION postkeep"]
    assert d.feed(b"CAPA\r\n") == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nSTLS\r\nIMPLEMENTATION postkeep\r\n.\r\n"
    )


def test_capa_after_stls_offers_user_and_sasl_but_not_stls() -> None:
    d = driver(require_tls=True)
    d.feed(b"STLS\r\n")
    assert d.core.tls_active
    assert d.core.capabilities() == [*BASE_CAPS, "USER", "SASL PLAIN", "IMPLEMENTATION postkeep"]


def test_capa_without_required_tls_offers_stls_and_credentials() -> None:
    d = driver(require_tls=False)
    assert d.core.capabilities() == [
        *BASE_CAPS,
        "STLS",
        "USER",
        "SASL PLAIN",
        "IMPLEMENTATION postkeep",
    ]


def test_capa_on_implicit_tls_and_without_stls_offer() -> None:
    assert driver(tls_active=True, tls_offered=False).core.capabilities() == [
        *BASE_CAPS,
        "USER",
        "SASL PLAIN",
        "IMPLEMENTATION postkeep",
    ]
    # A plaintext port that requires TLS but cannot offer it: no way in is advertised.
    assert driver(tls_offered=False, require_tls=True).core.capabilities() == [
        *BASE_CAPS,
        "IMPLEMENTATION postkeep",
    ]


def test_capa_in_transaction_lists_what_authorization_listed() -> None:
    # RFC 2449 §6 / IANA registry: USER, SASL and STLS are announced in both states.
    d = driver(tls_active=True)
    before = d.feed(b"CAPA\r\n")
    d.feed(LOGIN)
    assert d.core.state is State.TRANSACTION
    assert d.feed(b"CAPA\r\n") == before
    assert d.session.events.count(Capa()) == 2


def test_capa_names_the_configured_implementation_and_mechanisms() -> None:
    core = Pop3Server(
        limits=Limits(),
        tls_active=True,
        tls_offered=False,
        require_tls=True,
        implementation="postkeep 0.1",
        sasl_mechanisms=("PLAIN", "LOGIN"),
    )
    assert core.capabilities()[-2:] == ["SASL PLAIN LOGIN", "IMPLEMENTATION postkeep 0.1"]
    core.receive_data(b"AUTH login\r\n")
    assert core.next_event().mechanism == "LOGIN"  # type: ignore[union-attr]


def test_stls_drops_pipelined_plaintext_and_stays_in_authorization() -> None:
    d = driver(require_tls=True)
    out = d.feed(b"CAPA\r\nSTLS\r\nUSER evil@example.test\r\nPASS injected\r\n")
    assert out.endswith(b".\r\n+OK Begin TLS negotiation\r\n")
    # RFC 2595 §4 / CVE-2011-0411: nothing sent before the handshake is parsed.
    assert d.dropped == [b"USER evil@example.test\r\nPASS injected\r\n"]
    assert d.core.state is State.AUTHORIZATION and d.core.tls_active
    assert d.core.buffered == 0
    # Over "TLS" the client starts again, and now may log in.
    assert d.feed(LOGIN) == (
        b"+OK Send your password with PASS\r\n+OK Maildrop has 0 messages (0 octets)\r\n"
    )
    assert [e for e in d.session.events if isinstance(e, User)] == [User(USER)]


def test_stls_forgets_a_user_accepted_in_plaintext() -> None:
    d = driver(require_tls=False)
    d.feed(f"USER {USER}\r\n".encode())
    d.feed(b"STLS\r\n")
    assert d.feed(f"PASS {PASSWORD}\r\n".encode()) == b"-ERR Send USER first\r\n"


def test_stls_forgets_a_half_discarded_overlong_line() -> None:
    d = driver(require_tls=True, limits=Limits(line_length=255))
    d.core.receive_data(b"STLS\r\n" + b"X" * 300)
    assert d.core.next_event() == Stls()
    d.core.send(replies.BEGIN_TLS)
    assert d.core.start_tls() == b"X" * 300
    # The first TLS line is a command, not the tail of the plaintext line.
    assert d.feed(b"CAPA\r\n").startswith(b"+OK Capability list follows\r\n")


@pytest.mark.parametrize(
    ("tls_active", "tls_offered", "reply"),
    [
        (True, True, b"-ERR Already using TLS\r\n"),
        (True, False, b"-ERR Already using TLS\r\n"),
        (False, False, b"-ERR STLS not available on this port\r\n"),
    ],
)
def test_stls_refused_when_active_or_not_offered(
    tls_active: bool, tls_offered: bool, reply: bytes
) -> None:
    d = driver(tls_active=tls_active, tls_offered=tls_offered)
    assert d.feed(b"STLS\r\n") == reply
    assert d.session.events == []


def test_second_stls_is_refused() -> None:
    d = driver()
    d.feed(b"STLS\r\n")
    assert d.feed(b"STLS\r\n") == b"-ERR Already using TLS\r\n"


def test_stls_with_an_argument_is_a_syntax_error() -> None:
    d = driver()
    assert d.feed(b"STLS now\r\n") == b"-ERR Syntax error, use: STLS\r\n"
    assert not d.core.tls_active


def test_stls_after_login_is_refused() -> None:
    d = driver(require_tls=False)
    d.feed(LOGIN)
    assert d.feed(b"STLS\r\n") == b"-ERR Already logged in\r\n"


def test_nothing_is_parsed_between_stls_ok_and_start_tls() -> None:
    d = driver()
    d.core.receive_data(b"STLS\r\nCAPA\r\n")
    assert d.core.next_event() == Stls()
    d.core.send(replies.BEGIN_TLS)
    with pytest.raises(RuntimeError):
        d.core.next_event()
    with pytest.raises(RuntimeError):
        d.core.send(replies.NOOP_OK)
    assert d.core.start_tls() == b"CAPA\r\n"


def test_start_tls_without_stls_ok_is_refused() -> None:
    d = driver()
    with pytest.raises(RuntimeError):
        d.core.start_tls()
    d.core.receive_data(b"STLS\r\n")
    assert d.core.next_event() == Stls()
    d.core.send(replies.err("TLS is unavailable right now", "SYS/TEMP"))
    with pytest.raises(RuntimeError):
        d.core.start_tls()
    assert not d.core.tls_active


def test_implicit_tls_needs_no_stls() -> None:
    d = driver(tls_active=True, tls_offered=False)
    assert d.feed(LOGIN).endswith(b"+OK Maildrop has 0 messages (0 octets)\r\n")
