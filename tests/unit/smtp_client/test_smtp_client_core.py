"""The sans-IO SMTP client core, driven with bytes and paired with the server core."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parents[2])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from helpers.transcript import Transcript, accept_all, make_core  # noqa: E402
from postkeep.smtp import replies  # noqa: E402
from postkeep.smtp.client import (  # noqa: E402
    MAX_LINE,
    MAX_LINES,
    NEED_DATA,
    Command,
    ConnectionClosed,
    ProtocolError,
    Response,
    SmtpClient,
    State,
    content_bytes,
    has_bare_line_endings,
    reply_text,
)
from postkeep.smtp.protocol import DataChunk, DataEnd, Event, RcptTo, StartTls  # noqa: E402
from postkeep.smtp.replies import Reply  # noqa: E402

EHLO_REPLY = (
    b"250-mx.remote.test Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-CHUNKING\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"
)


def greeted(tls: bool = False) -> SmtpClient:
    c = SmtpClient(hostname="out.sender.test", tls_active=tls)
    c.receive_data(b"220 mx.remote.test ESMTP\r\n")
    ev = c.next_event()
    assert isinstance(ev, Response) and ev.command is Command.GREETING
    assert c.state is State.CONNECTED
    return c


def ready(ehlo_reply: bytes = EHLO_REPLY, tls: bool = False) -> SmtpClient:
    c = greeted(tls)
    assert c.ehlo() == b"EHLO out.sender.test\r\n"
    c.receive_data(ehlo_reply)
    ev = c.next_event()
    assert isinstance(ev, Response) and ev.command is Command.EHLO and ev.reply.code == 250
    return c


def response(c: SmtpClient) -> Response:
    ev = c.next_event()
    assert isinstance(ev, Response), ev
    return ev


# -- replies ---------------------------------------------------------------------------
def test_ehlo_capabilities_are_parsed() -> None:
    c = ready()
    assert c.extended and c.pipelining
    assert c.size_limit == 1000
    for keyword in ("8BITMIME", "SMTPUTF8", "CHUNKING", "STARTTLS"):
        assert c.supports(keyword)
    assert c.auth_mechanisms == {"PLAIN", "LOGIN"}


def test_old_style_auth_equals_and_size_zero() -> None:
    c = ready(b"250-mx\r\n250-AUTH=LOGIN\r\n250 SIZE 0\r\n")
    assert c.auth_mechanisms == {"LOGIN"}
    assert c.size_limit is None  # RFC 1870 §4: 0 means no fixed limit


def test_reply_parsed_the_same_for_every_split() -> None:
    wire = b"220 mx ESMTP\r\n" + EHLO_REPLY
    for cut in range(1, len(wire)):
        c = SmtpClient(hostname="h.test")
        commands = []
        for piece in (wire[:cut], wire[cut:]):
            c.receive_data(piece)
            while isinstance(ev := c.next_event(), Response):
                commands.append(ev.command)
                if ev.command is Command.GREETING:
                    c.ehlo()
        assert commands == [Command.GREETING, Command.EHLO]
        assert c.size_limit == 1000


def test_enhanced_code_split_off_and_text_kept() -> None:
    c = ready()
    c.mail("a@sender.test")
    c.receive_data(b"550-5.1.1 first line\r\n550 5.1.1 User unknown\r\n")
    r = response(c).reply
    assert (r.code, r.enhanced, r.lines) == (550, "5.1.1", ("first line", "User unknown"))
    assert reply_text(r) == "5.1.1 first line User unknown"


def test_enhanced_code_of_another_class_is_text() -> None:
    c = ready()
    c.mail("a@sender.test")
    c.receive_data(b"451 5.1.1 odd\r\n")
    r = response(c).reply
    assert r.enhanced is None and r.lines == ("5.1.1 odd",)


def test_control_characters_and_long_lines_are_made_safe() -> None:
    c = ready()
    c.mail("a@sender.test")
    c.receive_data(b"550 5.7.1 evil\x1b[31m\ttext " + b"x" * 2000 + b"\r\n")
    r = response(c).reply
    assert "\x1b" not in r.lines[0] and "\t" not in r.lines[0]
    assert len(r.render()) <= replies.MAX_REPLY_LINE
    assert r.render().count(b"\r\n") == 1


def test_bare_lf_ends_a_reply_line() -> None:
    c = SmtpClient(hostname="h.test")
    c.receive_data(b"220 old server\n")
    assert response(c).reply.code == 220


@pytest.mark.parametrize(
    "wire",
    [
        b"hello there\r\n",  # not a reply
        b"250-a\r\n251 b\r\n",  # codes differ
        b"199 too low\r\n",
        b"2500 four digits\r\n",
    ],
)
def test_unframable_replies_are_protocol_errors(wire: bytes) -> None:
    c = SmtpClient(hostname="h.test")
    c.receive_data(wire)
    with pytest.raises(ProtocolError):
        c.next_event()
    assert c.state is State.CLOSED
    assert isinstance(c.next_event(), ConnectionClosed)


def test_reply_line_length_is_bounded() -> None:
    c = SmtpClient(hostname="h.test")
    c.receive_data(b"220 " + b"x" * MAX_LINE)
    with pytest.raises(ProtocolError):
        c.next_event()


def test_reply_line_count_is_bounded() -> None:
    c = SmtpClient(hostname="h.test")
    c.receive_data(b"220-x\r\n" * (MAX_LINES + 1))
    with pytest.raises(ProtocolError):
        c.next_event()


def test_unsolicited_data_is_bounded() -> None:
    c = ready()
    c.receive_data(b"250 x\r\n" * 1000)
    with pytest.raises(ProtocolError):
        c.next_event()


def test_eof_gives_connection_closed() -> None:
    c = greeted()
    c.ehlo()
    c.receive_data(b"250-partial\r\n")
    assert c.next_event() is NEED_DATA
    c.receive_data(b"")
    assert isinstance(c.next_event(), ConnectionClosed)


def test_421_closes_whatever_it_answers() -> None:
    c = ready()
    c.mail("a@sender.test")
    c.receive_data(b"421 4.3.2 shutting down\r\n")
    assert response(c).reply.code == 421
    assert c.state is State.CLOSED
    with pytest.raises(RuntimeError):
        c.rset()


# -- commands --------------------------------------------------------------------------
def test_helo_fallback_when_ehlo_is_refused() -> None:
    c = greeted()
    c.ehlo()
    c.receive_data(b"502 5.5.1 no EHLO here\r\n")
    assert response(c).reply.code == 502
    assert c.helo() == b"HELO out.sender.test\r\n"
    c.receive_data(b"250 mx\r\n")
    assert response(c).command is Command.HELO
    assert c.state is State.READY and not c.extended and not c.capabilities


def test_nothing_is_sent_before_the_greeting() -> None:
    c = SmtpClient(hostname="h.test")
    with pytest.raises(RuntimeError):
        c.ehlo()


def test_no_pipelining_unless_offered() -> None:
    c = ready(b"250-mx\r\n250 SIZE 100\r\n")
    c.mail("a@sender.test")
    with pytest.raises(RuntimeError):
        c.rcpt("b@remote.test")


def test_pipelining_groups_mail_rcpt_data_but_data_ends_the_group() -> None:
    c = ready()
    c.mail("a@sender.test")
    c.rcpt("b@remote.test")
    c.rcpt("c@remote.test")
    c.data()
    with pytest.raises(RuntimeError):
        c.rset()  # RFC 2920 §3.1: DATA is last in a group
    c.receive_data(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    got = [response(c) for _ in range(4)]
    assert [(g.command, g.argument, g.reply.code) for g in got] == [
        (Command.MAIL, "a@sender.test", 250), (Command.RCPT, "b@remote.test", 250),
        (Command.RCPT, "c@remote.test", 550), (Command.DATA, "", 354)]
    assert c.state is State.DATA


def test_mail_parameters_follow_the_capabilities() -> None:
    c = ready()
    assert c.mail("a@sender.test", size=10, eight_bit=True) == (
        b"MAIL FROM:<a@sender.test> SIZE=10 BODY=8BITMIME\r\n")
    plain = ready(b"250-mx\r\n250 PIPELINING\r\n")
    assert plain.mail("", size=10, eight_bit=True) == b"MAIL FROM:<>\r\n"
    with pytest.raises(ValueError):
        plain.mail("jörg@x.test", smtputf8=True)  # RFC 6531 §3.4: not offered


def test_smtputf8_parameter_when_offered() -> None:
    c = ready()
    assert c.mail("jörg@sender.test", smtputf8=True) == (
        "MAIL FROM:<jörg@sender.test> SMTPUTF8\r\n".encode())
    with pytest.raises(ValueError):
        c.rcpt("jörg@remote.test")  # non-ASCII without SMTPUTF8


@pytest.mark.parametrize("bad", ["a@b\r\nRSET", "a\n@b", "a@b\x00"])
def test_addresses_cannot_inject_commands(bad: str) -> None:
    c = ready()
    with pytest.raises(ValueError):
        c.mail(bad)
    with pytest.raises(ValueError):
        c.rcpt(bad)


def test_content_only_after_354() -> None:
    c = ready()
    with pytest.raises(RuntimeError):
        c.content(b"x\r\n")


def test_auth_never_without_tls() -> None:
    c = ready()
    with pytest.raises(RuntimeError):
        c.auth_plain("u", "p")
    with pytest.raises(RuntimeError):
        c.auth_login("u", "p")


def test_auth_plain_initial_response() -> None:
    c = ready(tls=True)
    line = c.auth_plain("user@x.test", "sekrit")
    assert line == b"AUTH PLAIN " + base64.b64encode(b"\0user@x.test\0sekrit") + b"\r\n"
    c.receive_data(b"235 2.7.0 ok\r\n")
    assert response(c).reply.code == 235


def test_auth_login_answers_two_challenges_then_cancels() -> None:
    c = ready(tls=True)
    assert c.auth_login("u", "p") == b"AUTH LOGIN\r\n"
    c.receive_data(b"334 VXNlcm5hbWU6\r\n")
    assert response(c).reply.code == 334
    assert c.auth_continue() == base64.b64encode(b"u") + b"\r\n"
    c.receive_data(b"334 UGFzc3dvcmQ6\r\n")
    response(c)
    assert c.auth_continue() == base64.b64encode(b"p") + b"\r\n"
    c.receive_data(b"334 more?\r\n")
    response(c)
    assert c.auth_continue() == b"*\r\n"


# -- STARTTLS ----------------------------------------------------------------------------
def test_start_tls_drops_bytes_after_the_220_and_forgets_ehlo() -> None:
    c = ready()
    c.starttls()
    c.receive_data(b"220 2.0.0 go ahead\r\n250-evil\r\n250 AUTH PLAIN\r\n")
    assert response(c).reply.code == 220
    with pytest.raises(RuntimeError):
        c.next_event()  # nothing is parsed until start_tls()
    with pytest.raises(RuntimeError):
        c.ehlo()
    assert c.start_tls() == b"250-evil\r\n250 AUTH PLAIN\r\n"
    assert c.tls_active and not c.capabilities and c.state is State.CONNECTED
    c.ehlo()
    c.receive_data(b"250-mx\r\n250 AUTH PLAIN\r\n")
    assert response(c).reply.code == 250 and c.auth_mechanisms == {"PLAIN"}


def test_starttls_refused_keeps_plaintext_session() -> None:
    c = ready()
    c.starttls()
    c.receive_data(b"454 4.7.0 TLS not available\r\n")
    assert response(c).reply.code == 454
    assert c.state is State.READY and not c.tls_active
    with pytest.raises(RuntimeError):
        c.start_tls()


# -- content -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b".a\r\n..b\r\n", b"..a\r\n...b\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
        # Bare line endings become CRLF, and the dots after them are stuffed too.
        (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\n\r\n.\r\n", b"a\r\n\r\n..\r\n.\r\n"),
    ],
)
def test_content_is_dot_stuffed_and_terminated_exactly(message: bytes, wire: bytes) -> None:
    assert content_bytes(message) == wire
    crlf_only = message.count(b"\r") == message.count(b"\n") == message.count(b"\r\n")
    assert has_bare_line_endings(message) is not crlf_only


def test_content_never_contains_a_bare_line_ending_or_early_terminator() -> None:
    nasty = b"x\n.\r\nMAIL FROM:<evil>\r\n\r.\r\n.\n"
    wire = content_bytes(nasty)
    assert wire.endswith(b"\r\n.\r\n")
    body = wire[:-3]
    assert b"\r\n.\r\n" not in body
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")


# -- paired with the server core ---------------------------------------------------------
class Pair:
    """Our client core against our server core, bytes carried by hand."""

    def __init__(self, server: Transcript) -> None:
        self.server = server
        self.client = SmtpClient(hostname="out.sender.test")
        self.seen: list[Event] = []
        self.sent = 0
        self.deliver()

    def deliver(self) -> list[Response]:
        wire = bytes(self.server.wire[self.sent :])
        self.sent = len(self.server.wire)
        self.client.receive_data(wire)
        out = []
        while self.client.state is not State.TLS_PENDING and isinstance(
            ev := self.client.next_event(), Response
        ):
            out.append(ev)
        return out

    def say(self, data: bytes) -> list[Response]:
        self.server.client(data)
        items = self.server.run(self.answer)
        self.seen += items
        if items and isinstance(items[-1], StartTls):
            self.server.send(replies.READY_FOR_TLS)
        return self.deliver()

    def answer(self, event: Event) -> Reply:
        if isinstance(event, RcptTo) and event.address.startswith("nobody@"):
            return replies.reply(550, "5.1.1", "User unknown")
        return accept_all(self.server.core)(event)


def test_pair_full_pipelined_transaction_round_trips_the_exact_message() -> None:
    pair = Pair(Transcript(make_core()))
    assert pair.client.state is State.CONNECTED
    [ehlo] = pair.say(pair.client.ehlo())
    assert ehlo.reply.code == 250 and pair.client.pipelining and pair.client.supports("STARTTLS")
    message = b"Subject: t\r\n\r\n.leading dot\r\n.\r\n..\r\nend"
    c = pair.client
    batch = (c.mail("a@sender.test", size=len(message)) + c.rcpt("b@mx.test")
             + c.rcpt("nobody@mx.test") + c.data())
    got = pair.say(batch)
    assert [(g.command, g.reply.code) for g in got] == [
        (Command.MAIL, 250), (Command.RCPT, 250), (Command.RCPT, 550), (Command.DATA, 354)]
    [end] = pair.say(c.content(message))
    assert end.command is Command.CONTENT and end.reply.code == 250
    received = b"".join(e.data for e in pair.seen if isinstance(e, DataChunk))
    assert received == message + b"\r\n"
    assert any(isinstance(e, DataEnd) for e in pair.seen)
    [rset] = pair.say(c.rset())
    assert rset.reply.code == 250
    [bye] = pair.say(c.quit())
    assert bye.reply.code == 221 and c.state is State.CLOSED


def test_pair_starttls_then_ehlo_again() -> None:
    pair = Pair(Transcript(make_core()))
    c = pair.client
    pair.say(c.ehlo())
    [go] = pair.say(c.starttls())
    assert go.reply.code == 220
    assert pair.server.core.start_tls() == b""
    assert c.start_tls() == b""
    [ehlo] = pair.say(c.ehlo())
    assert ehlo.reply.code == 250 and not c.supports("STARTTLS")


def test_pair_server_refusals_reach_the_client_as_replies() -> None:
    pair = Pair(Transcript(make_core(require_tls=True)))
    c = pair.client
    pair.say(c.ehlo())
    [mail] = pair.say(c.mail("a@sender.test"))
    assert (mail.reply.code, mail.reply.enhanced) == (530, "5.7.0")
