"""POP3 reply values and their wire form: byte-stuffing, TOP, validation (RFC 1939 §3)."""

from __future__ import annotations

import pytest

from postkeep.pop3 import replies
from postkeep.pop3.replies import MessageBody, Reply


def body(reply: Reply) -> bytes:
    """The wire bytes after the status line."""
    wire = reply.render()
    return wire[wire.index(b"\r\n") + 2 :]


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b".\r\n"),  # empty message: just the terminator
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"no final crlf", b"no final crlf\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),  # a lone dot line is stuffed, not a terminator
        (b"..\r\n", b"...\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b".start\r\nmid.dle\r\n.end", b"..start\r\nmid.dle\r\n..end\r\n.\r\n"),
        (b"\r\n\r\n", b"\r\n\r\n.\r\n"),
        (b"\r\n.", b"\r\n..\r\n.\r\n"),
        # Binary-ish bytes go out untouched.
        (b"\x00\xff\xfe\x1b[0m\t\x7f\r\n", b"\x00\xff\xfe\x1b[0m\t\x7f\r\n.\r\n"),
        (bytes(range(14, 256)), bytes(range(14, 256)) + b"\r\n.\r\n"),
    ],
)
def test_retr_body_is_byte_stuffed_and_terminated(message: bytes, wire: bytes) -> None:
    reply = replies.retr_reply(message)
    assert reply.render() == f"+OK {len(message)} octets\r\n".encode() + wire


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        # A bare LF before "." would end the body for a client that splits lines on LF.
        (b"a\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\n.", b"a\r\n..\r\n.\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r", b"a\r\n.\r\n"),
        (b"\n", b"\r\n.\r\n"),
        (b"\r\r\n\n", b"\r\n\r\n\r\n.\r\n"),
    ],
)
def test_bare_cr_and_lf_go_out_as_crlf(message: bytes, wire: bytes) -> None:
    assert body(replies.retr_reply(message)) == wire


def test_a_large_crlf_message_is_sent_byte_for_byte() -> None:
    message = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + b"\xe9t\xe9\r\n" * 10_000
    assert body(replies.retr_reply(message)) == message + b".\r\n"


def test_multiline_lines_are_stuffed() -> None:
    reply = replies.multiline("list", [b".hidden", b"plain", b"", b"."])
    assert reply.render() == b"+OK list\r\n..hidden\r\nplain\r\n\r\n..\r\n.\r\n"


MSG = b"Subject: t\r\nX: y\r\n\r\nb1\r\nb2\r\nb3"


@pytest.mark.parametrize(
    ("message", "lines", "sent"),
    [
        (MSG, 0, b"Subject: t\r\nX: y\r\n\r\n"),
        (MSG, 1, b"Subject: t\r\nX: y\r\n\r\nb1\r\n"),
        (MSG, 2, b"Subject: t\r\nX: y\r\n\r\nb1\r\nb2\r\n"),
        (MSG, 3, MSG + b"\r\n"),
        (MSG, 100, MSG + b"\r\n"),
        (b"Subject: only headers\r\n", 5, b"Subject: only headers\r\n"),
        (b"Subject: no crlf at all", 0, b"Subject: no crlf at all\r\n"),
        (b"\r\nbody1\r\nbody2\r\n", 1, b"\r\nbody1\r\n"),  # no header fields
        (b"\r\nbody1\r\n", 0, b"\r\n"),
        (b"H: v\r\n\r\n.dot\r\nx\r\n", 1, b"H: v\r\n\r\n..dot\r\n"),
        (b"H: v\r\n\r\n\r\n\r\nz", 2, b"H: v\r\n\r\n\r\n\r\n"),  # empty body lines count
        (b"H: v\n\nb1\nb2\n", 1, b"H: v\r\n\r\nb1\r\n"),  # bare LF message
        (b"", 3, b""),
    ],
)
def test_top_sends_headers_blank_line_and_n_body_lines(
    message: bytes, lines: int, sent: bytes
) -> None:
    reply = replies.top_reply(message, lines)
    assert reply.render() == b"+OK Top of message follows\r\n" + sent + b".\r\n"


def test_top_refuses_negative_lines() -> None:
    with pytest.raises(ValueError):
        replies.top_reply(MSG, -1)


def test_status_lines() -> None:
    assert replies.ok().render() == b"+OK\r\n"
    assert replies.ok("fine").render() == b"+OK fine\r\n"
    assert replies.err("no").render() == b"-ERR no\r\n"
    assert replies.IN_USE.render() == (
        b"-ERR [IN-USE] Mailbox is in use by another session, try again later\r\n"
    )
    assert replies.err("", "SYS/PERM").render() == b"-ERR [SYS/PERM]\r\n"
    assert replies.stat_reply(2, 320).render() == b"+OK 2 320\r\n"
    assert replies.scan_listing(1, 120).render() == b"+OK 1 120\r\n"
    assert replies.greeting("mail.example.test ready").render() == (
        b"+OK mail.example.test ready\r\n"
    )
    assert replies.ok("caf\u00e9").render() == b"+OK caf\xc3\xa9\r\n"


def test_challenges() -> None:
    assert replies.challenge(b"").render() == b"+ \r\n"
    assert replies.challenge(b"Username:").render() == b"+ VXNlcm5hbWU6\r\n"
    # RFC 5034 §4: a challenge is as long as the mechanism needs.
    assert len(replies.challenge(b"x" * 3000).render()) > 4000
    with pytest.raises(ValueError):
        Reply(True, "not base64!", challenge=True)
    with pytest.raises(ValueError):
        Reply(True, "", challenge=True, closes=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: replies.ok("two\r\nlines"),
        lambda: replies.err("bare\nlf"),
        lambda: replies.err("nul\x00"),
        lambda: replies.err("c1\x85"),
        lambda: replies.err("x", code="SYS]"),
        lambda: replies.err("x", code="SYS//TEMP"),
        lambda: replies.err("x", code=""),
        lambda: replies.err("x", code="A B"),
        lambda: replies.ok("x" * 508),  # "+OK " + 508 + CRLF = 514 > 512
        lambda: Reply(False, "x", lines=(b"a",)),  # only +OK has a body
        lambda: Reply(True, "x", lines=(b"a",), body=MessageBody(b"a")),
        lambda: replies.multiline("x", [b"evil\r\n.\r\n-ERR"]),
        lambda: replies.multiline("x", [b"lf\n"]),
        lambda: replies.uidl_one(1, "has space"),
        lambda: replies.uidl_one(1, ""),
        lambda: replies.uidl_one(1, "x" * 71),
        lambda: replies.uidl_reply([(1, "ok"), (2, "caf\u00e9")]),
    ],
)
def test_replies_that_could_break_framing_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_first_line_limit_is_512_octets_with_crlf() -> None:
    assert len(replies.ok("x" * 506).render()) == 512
    assert len(replies.multiline("x" * 506, [b"y" * 2000]).render()) > 2000


def test_uidl_listing() -> None:
    assert replies.uidl_reply([(1, "a!~"), (3, "z" * 70)]).render() == (
        b"+OK Unique-id listing follows\r\n1 a!~\r\n3 " + b"z" * 70 + b"\r\n.\r\n"
    )
    assert replies.uidl_one(2, "QhdPYR:00WBw1Ph7x7").render() == b"+OK 2 QhdPYR:00WBw1Ph7x7\r\n"


def test_reprs_never_show_message_content() -> None:
    reply = replies.retr_reply(b"Subject: secret plans\r\n\r\nattack at dawn\r\n")
    assert "secret" not in repr(reply) and "dawn" not in repr(reply)
    assert "41 bytes" in repr(reply)
    assert repr(replies.AUTH_FAILED) == "Reply(-ERR [AUTH] 'Authentication failed')"


def test_closing_replies() -> None:
    assert replies.signing_off().closes and replies.signing_off(3).closes
    assert replies.TOO_MANY_ERRORS.closes and not replies.TOO_MANY_ERRORS.ok
    assert replies.UPDATE_FAILED.closes
    assert not replies.AUTH_FAILED.closes
    assert replies.signing_off(1).render() == (
        b"+OK postkeep POP3 server signing off (1 message left)\r\n"
    )
