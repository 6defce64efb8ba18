"""Limits and the core's contract: line lengths, budgets, reply order, API misuse."""

from __future__ import annotations

import ast
import base64
from pathlib import Path
from types import ModuleType

import pytest
from pop3_transcript import LOGIN, PASSWORD, USER, driver

from postkeep.pop3 import protocol, replies
from postkeep.pop3.protocol import (
    NEED_DATA,
    AuthStart,
    Capa,
    ConnectionClosed,
    Limits,
    List,
    Noop,
    ProtocolError,
    Quit,
    Retr,
    Stat,
    State,
)

TOO_LONG = b"-ERR Line too long; the line was discarded\r\n"
CLOSING = b"-ERR Too many errors, closing connection\r\n"


def test_a_line_at_the_limit_is_accepted_and_one_more_octet_is_not() -> None:
    limits = Limits(line_length=255)
    d = driver(tls_active=True, limits=limits)
    name = "a" * (255 - len("USER \r\n"))
    assert d.feed(f"USER {name}\r\n".encode()) == b"+OK Send your password with PASS\r\n"
    d = driver(tls_active=True, limits=limits)
    assert d.feed(f"USER {name}a\r\n".encode()) == TOO_LONG
    assert d.session.events == []


def test_an_overlong_line_is_refused_once_and_its_tail_discarded() -> None:
    d = driver(tls_active=True, limits=Limits(line_length=300))
    # The error goes out as soon as the limit is crossed, before the line ends...
    assert d.feed(b"USER " + b"x" * 400) == TOO_LONG
    assert d.core.buffered == 0
    # ...and the rest of that line, however long, is dropped without another reply.
    for _ in range(10):
        assert d.feed(b"y" * 1000) == b""
        assert d.core.buffered == 0
    assert d.feed(b"zzz\r\nCAPA\r\n").startswith(b"+OK Capability list follows\r\n")
    assert d.session.events == [Capa()]


def test_an_overlong_line_inside_one_read_is_cut_at_its_line_end() -> None:
    d = driver(tls_active=True, limits=Limits(line_length=300))
    out = d.feed(b"NOOP " + b"x" * 500 + b"\r\nQUIT\r\n")
    assert out == TOO_LONG + b"+OK postkeep POP3 server signing off\r\n"


def test_the_buffer_stays_bounded_without_line_ends() -> None:
    d = driver(tls_active=True, limits=Limits(line_length=512))
    errors = 0
    for _ in range(200):
        d.core.receive_data(b"A" * 4096)
        while True:
            try:
                event = d.core.next_event()
            except ProtocolError as exc:
                d.core.send(exc.hint)
                errors += 1
                continue
            assert event is NEED_DATA
            break
        assert d.core.buffered < 512
    assert errors == 1  # one line, one error


def test_auth_lines_may_be_longer_than_commands() -> None:
    limits = Limits(line_length=512, auth_line_length=8192)
    # PLAIN with 1 KiB fields, as sasl.mechanisms allows: longer than a command line.
    message = f"\0{USER}\0".encode() + b"p" * 1024
    encoded = base64.b64encode(message)
    d = driver(tls_active=True, limits=limits)
    d.core.receive_data(b"AUTH PLAIN " + encoded + b"\r\n")
    assert d.core.next_event() == AuthStart("PLAIN", message)
    d.core.send(replies.AUTH_FAILED)
    d.core.receive_data(b"AUTH PLAIN\r\n")
    assert d.core.next_event() == AuthStart("PLAIN", None)
    d.core.send(replies.challenge(b""))
    d.core.receive_data(encoded + b"\r\n")
    assert d.core.next_event().data == message  # type: ignore[union-attr]
    d.core.send(replies.AUTH_FAILED)
    # Other commands keep the command limit.
    d.core.receive_data(b"USER " + b"u" * 600 + b"\r\n")
    with pytest.raises(ProtocolError) as exc:
        d.core.next_event()
    assert exc.value.hint == replies.LINE_TOO_LONG


def test_an_overlong_sasl_response_ends_the_exchange() -> None:
    d = driver(tls_active=True, limits=Limits(auth_line_length=2048))
    d.feed(b"AUTH PLAIN\r\n")
    assert d.core.state is State.AUTH_EXCHANGE
    assert d.feed(b"A" * 3000) == TOO_LONG
    assert d.core.state is State.AUTHORIZATION
    assert d.feed(b"AAAA\r\nCAPA\r\n").startswith(b"+OK Capability list follows")


def test_error_budget_closes_the_connection() -> None:
    d = driver(tls_active=True, limits=Limits(errors=3))
    assert d.feed(b"BAD\r\n" * 3 + b"CAPA\r\nCAPA\r\n") == (
        b"-ERR Unknown command\r\n" * 3 + CLOSING
    )
    assert d.closed and d.core.state is State.CLOSED
    assert d.session.events == []


def test_the_sessions_errors_count_too() -> None:
    # Failed logins are -ERRs like any other: a password guesser is cut off.
    d = driver(tls_active=True, limits=Limits(errors=3))
    out = d.feed(f"USER {USER}\r\nPASS wrong\r\n".encode() * 3 + LOGIN)
    attempt = b"+OK Send your password with PASS\r\n-ERR [AUTH] Authentication failed\r\n"
    assert out == attempt * 3 + CLOSING
    assert d.core.errors == 4
    assert d.core.state is State.CLOSED


def test_quit_is_honoured_after_the_error_budget_is_spent() -> None:
    d = driver([b"x\r\n"], tls_active=True, limits=Limits(errors=2))
    d.feed(LOGIN + b"DELE 1\r\nRETR 9\r\nRETR 9\r\n")
    assert d.feed(b"QUIT\r\n") == b"+OK postkeep POP3 server signing off (0 messages left)\r\n"
    assert d.session.committed == {1}  # RFC 1939 §6: the deletions still happen


def test_command_budget() -> None:
    d = driver(tls_active=True, limits=Limits(commands=3))
    out = d.feed(b"CAPA\r\n" * 3 + b"CAPA\r\n")
    assert out.endswith(b"-ERR Too many commands in one connection, closing\r\n")
    assert d.session.events == [Capa()] * 3
    assert d.closed


def test_pipelined_replies_come_in_command_order() -> None:
    d = driver([b"a\r\n", b"bb\r\n"], tls_active=True)
    d.feed(LOGIN)
    out = d.feed(b"LIST 2\r\nRETR 1\r\nXX\r\nLIST 1\r\nNOOP\r\n")
    assert out == (
        b"+OK 2 4\r\n+OK 3 octets\r\na\r\n.\r\n-ERR Unknown command\r\n+OK 1 3\r\n+OK\r\n"
    )
    assert d.session.events[-4:] == [List(2), Retr(1), List(1), Noop()]


# -- contract: one reply per event, in order ----------------------------------------------
def test_next_event_before_the_reply_is_a_usage_error() -> None:
    d = driver(tls_active=True)
    d.core.receive_data(b"CAPA\r\nCAPA\r\n")
    assert d.core.next_event() == Capa()
    with pytest.raises(RuntimeError):
        d.core.next_event()
    d.core.send(d.core.capa_reply())
    assert d.core.next_event() == Capa()


def test_send_without_an_event_is_a_usage_error() -> None:
    d = driver(tls_active=True)
    with pytest.raises(RuntimeError):
        d.core.send(replies.NOOP_OK)


def test_a_protocol_error_must_be_answered_before_the_next_event() -> None:
    d = driver(tls_active=True)
    d.core.receive_data(b"BAD\r\nCAPA\r\n")
    with pytest.raises(ProtocolError):
        d.core.next_event()
    with pytest.raises(RuntimeError):
        d.core.next_event()
    with pytest.raises(RuntimeError):
        d.core.send(replies.NOOP_OK)  # +OK does not answer an error
    d.core.send(replies.UNKNOWN_COMMAND)
    assert d.core.next_event() == Capa()


@pytest.mark.parametrize(
    ("commands", "reply"),
    [
        (b"NOOP\r\n", replies.multiline("x", [b"y"])),  # single-line command
        (b"STAT\r\n", replies.retr_reply(b"x")),
        (b"RETR 1\r\n", replies.ok("1 octets")),  # multi-line command
        (b"LIST\r\n", replies.scan_listing(1, 1)),
        (b"LIST 1\r\n", replies.list_reply([(1, 1)])),
        (b"UIDL\r\n", replies.uidl_one(1, "a")),
        (b"CAPA\r\n", replies.ok()),
        (b"STAT\r\n", replies.challenge(b"")),  # challenges only answer AUTH
        (b"QUIT\r\n", replies.ok("bye")),  # QUIT's reply must close
    ],
)
def test_a_reply_of_the_wrong_form_is_a_usage_error(commands: bytes, reply: object) -> None:
    d = driver([b"x"], tls_active=True)
    d.feed(LOGIN)
    d.core.receive_data(commands)
    d.core.next_event()
    with pytest.raises(RuntimeError):
        d.core.send(reply)  # type: ignore[arg-type]


def test_errors_to_multiline_commands_are_single_line() -> None:
    d = driver(tls_active=True)
    d.feed(LOGIN)
    assert d.feed(b"RETR 1\r\nUIDL 1\r\nTOP 1 1\r\n") == b"-ERR No such message\r\n" * 3


def test_a_closing_reply_to_any_event_closes() -> None:
    d = driver(tls_active=True)
    d.feed(LOGIN)
    d.core.receive_data(b"STAT\r\nSTAT\r\n")
    assert d.core.next_event() == Stat()
    assert d.core.send(replies.TEMP_ERROR).startswith(b"-ERR [SYS/TEMP]")
    assert d.core.state is State.CLOSED
    assert d.core.next_event() == ConnectionClosed()
    d.core.receive_data(b"more\r\n")
    assert d.core.buffered == 0


def test_receive_after_eof_is_a_usage_error() -> None:
    d = driver(tls_active=True)
    d.core.receive_data(b"")
    d.core.receive_data(b"")  # EOF twice is harmless
    with pytest.raises(RuntimeError):
        d.core.receive_data(b"x")
    assert d.core.next_event() == ConnectionClosed()


def test_quit_after_eof_in_the_buffer_still_counts() -> None:
    d = driver([b"x"], tls_active=True)
    d.feed(LOGIN + b"DELE 1\r\n")
    d.core.receive_data(b"QUIT\r\n")
    d.core.receive_data(b"")
    assert d.core.next_event() == Quit()
    d.core.send(replies.signing_off(0))
    assert d.core.state is State.CLOSED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"line_length": 254},
        {"line_length": 2000, "auth_line_length": 1000},
        {"errors": 0},
        {"commands": 0},
    ],
)
def test_limits_are_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)


def test_default_limits() -> None:
    limits = Limits()
    assert limits.line_length >= 255  # RFC 2449 §4
    assert (limits.errors, limits.commands) == (10, 10_000)
    assert PASSWORD  # the helper's account exists


@pytest.mark.parametrize("module", [protocol, replies])
def test_the_core_is_sans_io(module: ModuleType) -> None:
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    io = {"asyncio", "ssl", "socket", "logging"}
    assert not {n for n in imported if n.split(".")[0] in io or n.startswith("postkeep.store")}
