"""The IMAP and POP3 client cores and the probe's SMTP exchange, driven with bytes."""

from __future__ import annotations

import pytest

from postkeep.imap import client as imap
from postkeep.pop3 import client as pop3
from postkeep.probe import smtp


def drain_imap(c: imap.ImapClient) -> list[object]:
    out: list[object] = []
    while (ev := c.next_event()) is not imap.NEED_DATA:
        out.append(ev)
        if isinstance(ev, imap.ConnectionClosed) or c.state is imap.State.TLS_PENDING:
            break
    return out


def test_imap_greeting_capability_code_is_remembered() -> None:
    c = imap.ImapClient()
    c.receive_data(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n")
    (greeting,) = drain_imap(c)
    assert isinstance(greeting, imap.Greeting) and greeting.status == "OK"
    assert c.starttls_offered and c.login_disabled and c.auth_mechanisms == ()


def test_imap_starttls_drops_bytes_sent_after_the_ok_and_forgets_capabilities() -> None:
    c = imap.ImapClient()
    c.receive_data(b"* OK hi\r\n")
    drain_imap(c)
    assert c.send(imap.Capability()) == b"p1 CAPABILITY\r\n"
    c.receive_data(b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\np1 OK done\r\n")
    events = drain_imap(c)
    assert isinstance(events[0], imap.Untagged) and isinstance(events[1], imap.Tagged)
    assert c.auth_mechanisms == ("PLAIN",)
    assert c.send(imap.StartTls()) == b"p2 STARTTLS\r\n"
    c.receive_data(b"p2 OK begin TLS\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n")
    (ok,) = drain_imap(c)
    assert isinstance(ok, imap.Tagged) and ok.ok and ok.command == "STARTTLS"
    with pytest.raises(imap.UsageError):
        c.next_event()
    assert c.start_tls() == b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n"
    assert c.capabilities == frozenset() and c.tls_active


def test_imap_literal_in_a_response_is_inlined() -> None:
    c = imap.ImapClient()
    c.receive_data(b"* OK hi\r\n")
    drain_imap(c)
    c.send(imap.Noop())
    c.receive_data(b"* 1 FETCH (BODY[] {5}\r\nab\ncd)\r\np1 OK done\r\n")
    events = drain_imap(c)
    assert isinstance(events[0], imap.Untagged) and "ab\ncd" in events[0].text
    assert isinstance(events[1], imap.Tagged)


def test_imap_line_limit_and_foreign_tag_are_protocol_errors() -> None:
    c = imap.ImapClient(max_line=64)
    c.receive_data(b"* OK " + b"x" * 100)
    with pytest.raises(imap.ProtocolError):
        c.next_event()
    c = imap.ImapClient()
    c.receive_data(b"* OK hi\r\nzz OK what\r\n")
    c.next_event()  # the greeting
    with pytest.raises(imap.ProtocolError):
        c.next_event()


def test_imap_login_password_not_in_repr() -> None:
    assert "secret" not in repr(imap.Login("u", "secret"))


def drain_pop3(c: pop3.Pop3Client) -> list[object]:
    out: list[object] = []
    while (ev := c.next_event()) is not pop3.NEED_DATA:
        out.append(ev)
        if isinstance(ev, pop3.ConnectionClosed) or c.state is pop3.State.TLS_PENDING:
            break
    return out


def test_pop3_capa_multiline_and_pipelined_stls_drop() -> None:
    c = pop3.Pop3Client()
    c.receive_data(b"+OK ready\r\n")
    assert drain_pop3(c) == [pop3.Greeting(True, "ready")]
    data = c.send(pop3.Capa()) + c.send(pop3.Stls())
    assert data == b"CAPA\r\nSTLS\r\n"
    c.receive_data(b"+OK caps\r\nUSER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n..dotted\r\n.\r\n")
    c.receive_data(b"+OK go ahead\r\n+OK injected\r\n")
    capa, stls = drain_pop3(c)
    assert isinstance(capa, pop3.Reply) and capa.lines[-1] == ".dotted"
    assert c.user_offered and c.stls_offered and c.sasl_mechanisms == ("PLAIN", "LOGIN")
    assert isinstance(stls, pop3.Reply) and stls.ok and stls.command == "STLS"
    with pytest.raises(pop3.UsageError):
        c.next_event()
    assert c.start_tls() == b"+OK injected\r\n"
    assert c.capabilities == {}


def test_pop3_error_code_and_unsolicited_reply() -> None:
    c = pop3.Pop3Client()
    c.receive_data(b"+OK hi\r\n")
    drain_pop3(c)
    c.send(pop3.User("x"))
    c.receive_data(b"-ERR [AUTH] Use STLS first\r\n")
    (reply,) = drain_pop3(c)
    assert isinstance(reply, pop3.Reply) and reply.code == "AUTH" and not reply.ok
    c.receive_data(b"+OK nobody asked\r\n")
    with pytest.raises(pop3.ProtocolError):
        c.next_event()


def test_pop3_pass_not_in_repr_and_crlf_refused() -> None:
    assert "secret" not in repr(pop3.Pass("secret"))
    c = pop3.Pop3Client()
    c.receive_data(b"+OK hi\r\n")
    drain_pop3(c)
    with pytest.raises(pop3.UsageError):
        c.send(pop3.User("a\r\nDELE 1"))


def test_smtp_exchange_ehlo_keywords_and_starttls_drop() -> None:
    x = smtp.SmtpExchange()
    x.receive_data(b"220 mx ESMTP\r\n")
    greeting = x.next_reply()
    assert isinstance(greeting, smtp.SmtpReply) and greeting.code == 220
    x.send("EHLO", "me")
    x.receive_data(b"250-mx\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n")
    ehlo = x.next_reply()
    assert isinstance(ehlo, smtp.SmtpReply) and ehlo.code == 250
    assert x.starttls_offered and x.auth_mechanisms == ("PLAIN", "LOGIN")
    x.send("STARTTLS")
    x.receive_data(b"220 go\r\n250 injected\r\n")
    ready = x.next_reply()
    assert isinstance(ready, smtp.SmtpReply) and ready.command == "STARTTLS"
    with pytest.raises(RuntimeError):
        x.next_reply()
    assert x.start_tls() == b"250 injected\r\n"
    assert x.keywords == {}


def test_smtp_exchange_rejects_garbage() -> None:
    x = smtp.SmtpExchange()
    x.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(smtp.SmtpProtocolError):
        x.next_reply()
