"""POP3 on 110 (STLS) and 995 (implicit TLS), end to end, with clients nobody here wrote.

stdlib ``poplib`` for every command, raw sockets for the wire-level rules (exact bytes,
pipelining, STLS injection, the 995 plaintext hint), and, where the machine has them,
``curl`` and ``fetchmail``. Messages are put in the INBOX through the store or delivered
by SMTP; RETR is compared byte for byte with what the store holds.
"""

from __future__ import annotations

import base64
import getpass
import os
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from server_harness import PASSWORDS, Instance, free_port, wait_for

from postkeep.pop3 import server as pop3_server
from postkeep.pop3 import session as pop3_session
from postkeep.store.api import StorageError, StorageErrorKind
from postkeep.store.sqlite.tx import SqliteReadTx

ALICE = "alice@example.test"
BOB = "bob@example.test"
HOST = "mail.example.test"


# -- helpers ----------------------------------------------------------------------------
def message(i: int, extra: bytes = b"") -> bytes:
    return (
        b"From: someone@remote.test\r\nTo: alice@example.test\r\n"
        b"Subject: message %d\r\nMessage-ID: <%d@remote.test>\r\n\r\n"
        b"line one of %d\r\n%sthe end\r\n" % (i, i, i, extra)
    )


#: Lines that need dot-stuffing on the way out (RFC 1939 §3), including a lone ".".
DOTTY = message(0, b".starts with a dot\r\n..two dots\r\n.\r\nafter the lone dot\r\n")


def put(server: Instance, address: str, *datas: bytes) -> None:
    """Append messages to the INBOX through the store: the bytes are exactly these."""

    async def run() -> None:
        async with server.store.write() as tx:
            account = await tx.get_account(address)
            assert account is not None
            mbox = await tx.mailbox(account.id, "INBOX")
            assert mbox is not None
            for data in datas:
                await tx.append(mbox.id, await tx.put_blob(data))

    server.call(run)


def deliver(server: Instance, address: str, data: bytes) -> None:
    """Deliver by SMTP to port 25, as another server would."""
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        assert s.sendmail("someone@remote.test", [address], data) == {}


def stored(server: Instance, address: str = ALICE) -> list[bytes]:
    return [data for _, data in server.inbox(address)]


def uidvalidity(server: Instance, address: str = ALICE) -> int:
    async def run() -> int:
        async with server.store.read() as tx:
            account = await tx.get_account(address)
            assert account is not None
            mbox = await tx.mailbox(account.id, "INBOX")
            assert mbox is not None
            return mbox.uidvalidity

    return server.call(run)


def pop3s(server: Instance, tls_ctx: ssl.SSLContext) -> poplib.POP3_SSL:
    return poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_ctx, timeout=10)


def pop3(server: Instance) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)


def login(server: Instance, tls_ctx: ssl.SSLContext, user: str = ALICE) -> poplib.POP3_SSL:
    p = pop3s(server, tls_ctx)
    p.user(user)
    p.pass_(PASSWORDS[user])
    return p


def error_of(call: Callable[[], object]) -> bytes:
    with pytest.raises(poplib.error_proto) as info:
        call()
    reply = info.value.args[0]
    assert isinstance(reply, bytes)
    return reply


def cmd(p: poplib.POP3, line: str) -> bytes:
    """Send any command line and return its one-line reply (poplib's own helper)."""
    shortcmd: Callable[[str], bytes] = p._shortcmd  # type: ignore[attr-defined]
    return shortcmd(line)


def plain_token(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def wire(data: bytes) -> bytes:
    """RFC 1939 §3 byte-stuffing of a CRLF message that does not start with a dot."""
    assert not data.startswith(b".") and data.endswith(b"\r\n")
    return data.replace(b"\r\n.", b"\r\n..")


class Raw:
    """A line-oriented client over a socket that can be upgraded to TLS."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock: socket.socket = sock if ctx is None else ctx.wrap_socket(
            sock, server_hostname=HOST
        )
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; unread {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def line_exactly(self) -> bytes:
        """One line, read byte by byte: nothing after its CRLF is taken from the socket."""
        out = b""
        while not out.endswith(b"\r\n"):
            b = self.sock.recv(1)
            if not b:
                raise ConnectionError(f"closed after {out!r}")
            out += b
        return out[:-2]

    def until_eof(self) -> bytes:
        out = self.buf
        self.buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            out += chunk
        return out

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.buf == b""
        self.sock = ctx.wrap_socket(self.sock, server_hostname=HOST)

    def close(self) -> None:
        self.sock.close()


def stls_first_hint(server: Instance) -> bytes:
    return (
        b"-ERR [AUTH] Use STLS first, or SSL/TLS on port %d: passwords are never sent "
        b"unencrypted" % server.ports["pop3s"]
    )


# -- CAPA and the STLS rules (RFC 2449, RFC 2595) ----------------------------------------
def test_capa_before_stls_offers_stls_and_no_credentials(server: Instance) -> None:
    p = pop3(server)
    try:
        assert p.getwelcome() == b"+OK mail.example.test POP3 server ready"
        caps = p.capa()
        assert "STLS" in caps
        assert "USER" not in caps and "SASL" not in caps
        for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"):
            assert cap in caps
        assert caps["IMPLEMENTATION"][0] == "postkeep"
    finally:
        p.quit()


def test_capa_after_stls_offers_user_and_sasl_plain(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    p = pop3(server)
    p.stls(context=tls_ctx)
    caps = p.capa()
    assert "STLS" not in caps
    assert "USER" in caps and caps["SASL"] == ["PLAIN"]
    for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION"):
        assert cap in caps
    assert error_of(lambda: cmd(p, "STLS")) == b"-ERR Already using TLS"
    p.user(ALICE)
    assert p.pass_(PASSWORDS[ALICE]).startswith(b"+OK Maildrop has 0 messages")
    assert p.capa() == caps  # RFC 2449 §6: the same list in TRANSACTION
    p.quit()


def test_capa_on_995_has_no_stls(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    p = pop3s(server, tls_ctx)
    caps = p.capa()
    assert "STLS" not in caps and "USER" in caps and caps["SASL"] == ["PLAIN"]
    p.quit()


def test_user_pass_and_auth_before_stls_get_auth_code_and_port_hint(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    hint = stls_first_hint(server)
    p = pop3(server)
    assert error_of(lambda: p.user(ALICE)) == hint
    assert error_of(lambda: p.pass_(PASSWORDS[ALICE])) == hint
    token = plain_token(ALICE, PASSWORDS[ALICE])
    assert error_of(lambda: cmd(p, f"AUTH PLAIN {token}")) == hint
    assert error_of(lambda: cmd(p, "AUTH PLAIN")) == hint
    assert error_of(lambda: p.stat()).startswith(b"-ERR Not logged in")
    # The same connection logs in once TLS is up.
    p.stls(context=tls_ctx)
    p.user(ALICE)
    assert p.pass_(PASSWORDS[ALICE]).startswith(b"+OK")
    p.quit()


def test_stls_injection_is_not_answered_inside_tls(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    c = Raw(server.ports["pop3"])
    assert c.line_exactly().startswith(b"+OK")
    c.send(b"STLS\r\nCAPA\r\n")  # one segment: CAPA was sent before our go-ahead
    assert c.line_exactly() == b"+OK Begin TLS negotiation"
    c.starttls(tls_ctx)
    c.send(b"NOOP\r\n")
    # Had CAPA been kept, its "+OK Capability list follows" would come first.
    assert c.line() == b"-ERR Not logged in: log in with USER and PASS, or AUTH, first"
    c.send(b"CAPA\r\n")
    assert c.line() == b"+OK Capability list follows"
    caps = []
    while (line := c.line()) != b".":
        caps.append(line)
    assert b"USER" in caps and b"STLS" not in caps
    c.close()


# -- implicit TLS port and the plaintext switch ----------------------------------------
def test_plaintext_client_on_995_gets_hint_and_close(server: Instance) -> None:
    c = Raw(server.ports["pop3s"])
    c.send(b"CAPA\r\n")
    p995, p110 = server.ports["pop3s"], server.ports["pop3"]
    expected = (
        b"-ERR Port %d expects SSL/TLS from the first byte: use SSL/TLS on port %d, "
        b"or STLS on port %d\r\n" % (p995, p995, p110)
    )
    assert c.until_eof() == expected
    c.close()


def test_silent_client_on_995_gets_hint_after_5s(server: Instance) -> None:
    c = Raw(server.ports["pop3s"])
    start = time.monotonic()
    data = c.until_eof()  # we send nothing; the default hint timeout is 5 s
    elapsed = time.monotonic() - start
    assert data.startswith(b"-ERR Port %d expects SSL/TLS" % server.ports["pop3s"])
    assert data.endswith(b"or STLS on port %d\r\n" % server.ports["pop3"])
    assert 4.5 <= elapsed < 9
    c.close()


def test_plaintext_access_false_keeps_110_closed(
    make_instance: Callable[..., Instance], tls_ctx: ssl.SSLContext
) -> None:
    p110 = free_port()
    server = make_instance(
        ports={"pop3": p110}, extra="[security]\nplaintext_access = false\n"
    )
    assert "pop3" not in server.ports
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", p110), timeout=5)
    # The 995 hint names no closed port.
    c = Raw(server.ports["pop3s"])
    c.send(b"USER x\r\n")
    p995 = server.ports["pop3s"]
    assert c.until_eof() == (
        b"-ERR Port %d expects SSL/TLS from the first byte: use SSL/TLS on port %d\r\n"
        % (p995, p995)
    )
    login(server, tls_ctx).quit()


# -- RFC 1939 commands -------------------------------------------------------------------
def test_every_transaction_command(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    put(server, ALICE, message(1), DOTTY, message(3))
    data = stored(server)
    sizes = [len(d) for d in data]
    p = login(server, tls_ctx)
    assert p.stat() == (3, sum(sizes))
    resp, listing, _ = p.list()
    assert resp == b"+OK Scan listing follows"
    assert listing == [b"%d %d" % (i, s) for i, s in enumerate(sizes, 1)]
    assert cmd(p, "LIST 2") == b"+OK 2 %d" % sizes[1]
    _, uids, _ = p.uidl()
    assert len(uids) == 3 and p.uidl(2) == b"+OK " + uids[1]
    # RETR: poplib un-stuffs and splits; the lines are the stored ones.
    resp, lines, _ = p.retr(2)
    assert resp == b"+OK %d octets" % sizes[1]
    assert b"\r\n".join(lines) + b"\r\n" == data[1]
    assert b"." in lines and b"..two dots" in lines
    # TOP 0: the header and the blank line; TOP 1: plus one body line.
    head, body = data[0].split(b"\r\n\r\n", 1)
    _, lines, _ = p.top(1, 0)
    assert b"\r\n".join(lines) + b"\r\n" == head + b"\r\n\r\n"
    _, lines, _ = p.top(1, 1)
    assert b"\r\n".join(lines) + b"\r\n" == head + b"\r\n\r\n" + body.split(b"\r\n")[0] + b"\r\n"
    _, lines, _ = p.top(3, 100)
    assert b"\r\n".join(lines) + b"\r\n" == data[2]
    assert p.noop() == b"+OK"
    # DELE marks; a marked message no longer exists for any command.
    assert p.dele(2) == b"+OK Message 2 deleted"
    assert p.stat() == (2, sizes[0] + sizes[2])
    assert [line.split()[0] for line in p.list()[1]] == [b"1", b"3"]
    assert [line.split()[0] for line in p.uidl()[1]] == [b"1", b"3"]
    for call in (lambda: p.retr(2), lambda: p.list(2), lambda: p.uidl(2), lambda: p.top(2, 0)):
        assert error_of(call) == b"-ERR No such message"
    assert error_of(lambda: p.dele(2)) == b"-ERR Message already deleted"
    for call in (lambda: p.retr(4), lambda: p.top(9, 1)):
        assert error_of(call) == b"-ERR No such message"
    assert error_of(lambda: p.retr(0)).startswith(b"-ERR Invalid message number")
    # Nine -ERRs so far; a tenth would spend the session's error budget (limits).
    # RSET unmarks.
    assert p.rset() == b"+OK Maildrop has 3 messages (%d octets)" % sum(sizes)
    assert p.stat() == (3, sum(sizes))
    assert p.quit() == b"+OK postkeep POP3 server signing off (3 messages left)"
    assert stored(server) == data
    p = login(server, tls_ctx)
    assert error_of(lambda: cmd(p, "USER bob")) == b"-ERR Already logged in"
    assert error_of(lambda: cmd(p, "RETR x")).startswith(b"-ERR Invalid message number")
    assert error_of(lambda: cmd(p, "TOP 1")).startswith(b"-ERR Syntax error, use: TOP")
    assert error_of(lambda: cmd(p, "STLS")) == b"-ERR Already logged in"
    p.quit()


def test_retr_is_byte_exact_on_the_wire(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    deliver(server, ALICE, DOTTY)  # by SMTP: the store adds a Received header
    (data,) = stored(server)
    assert data.endswith(DOTTY)
    c = Raw(server.ports["pop3s"], tls_ctx)
    c.line()
    c.send(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\nRETR 1\r\nTOP 1 0\r\nQUIT\r\n".encode())
    out = c.until_eof()
    head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    assert out == (
        b"+OK Send your password with PASS\r\n"
        b"+OK Maildrop has 1 message (%d octets)\r\n" % len(data)
        + b"+OK %d octets\r\n" % len(data) + wire(data) + b".\r\n"
        + b"+OK Top of message follows\r\n" + wire(head) + b".\r\n"
        + b"+OK postkeep POP3 server signing off (1 message left)\r\n"
    )
    c.close()


def test_pipelined_commands_in_one_write(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    put(server, ALICE, message(1), message(2))
    data = stored(server)
    v = uidvalidity(server)
    uids = [row.uid for row, _ in server.inbox(ALICE)]
    c = Raw(server.ports["pop3s"], tls_ctx)
    c.line()
    c.send(
        f"CAPA\r\nUSER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\nSTAT\r\nLIST\r\nUIDL\r\n"
        "DELE 1\r\nRETR 2\r\nNOOP\r\nQUIT\r\n".encode()
    )
    out = c.until_eof()
    caps, rest = out.split(b"\r\n.\r\n", 1)
    assert caps.startswith(b"+OK Capability list follows\r\n") and b"\r\nUSER\r\n" in caps
    total = len(data[0]) + len(data[1])
    assert rest == (
        b"+OK Send your password with PASS\r\n"
        b"+OK Maildrop has 2 messages (%d octets)\r\n" % total
        + b"+OK 2 %d\r\n" % total
        + b"+OK Scan listing follows\r\n1 %d\r\n2 %d\r\n.\r\n" % (len(data[0]), len(data[1]))
        + b"+OK Unique-id listing follows\r\n1 %d.%d\r\n2 %d.%d\r\n.\r\n"
        % (v, uids[0], v, uids[1])
        + b"+OK Message 1 deleted\r\n"
        + b"+OK %d octets\r\n" % len(data[1]) + wire(data[1]) + b".\r\n"
        + b"+OK\r\n"
        + b"+OK postkeep POP3 server signing off (1 message left)\r\n"
    )
    assert stored(server) == [data[1]]
    c.close()


# -- login: PASS and SASL PLAIN (RFC 5034), codes (RFC 3206) -------------------------------
def test_auth_plain_with_and_without_initial_response(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    token = plain_token(ALICE, PASSWORDS[ALICE])
    p = pop3s(server, tls_ctx)
    assert cmd(p, f"AUTH PLAIN {token}").startswith(b"+OK Maildrop has")
    p.quit()
    p = pop3s(server, tls_ctx)
    assert cmd(p, "AUTH PLAIN") == b"+ "  # RFC 5034 §4: an empty challenge
    assert cmd(p, token).startswith(b"+OK Maildrop has")
    p.quit()
    p = pop3s(server, tls_ctx)
    assert cmd(p, "AUTH PLAIN") == b"+ "
    assert error_of(lambda: cmd(p, "*")) == b"-ERR Authentication cancelled"
    bad = plain_token(ALICE, "wrong")
    assert error_of(lambda: cmd(p, f"AUTH PLAIN {bad}")) == (
        b"-ERR [AUTH] Authentication failed"
    )
    assert error_of(lambda: cmd(p, "AUTH LOGIN")).startswith(b"-ERR Unsupported")
    malformed = base64.b64encode(b"no-nuls-here").decode()
    assert error_of(lambda: cmd(p, f"AUTH PLAIN {malformed}")) == (
        b"-ERR Malformed authentication data"
    )
    p.user(BOB)
    assert p.pass_(PASSWORDS[BOB]).startswith(b"+OK")
    p.quit()


def test_wrong_password_gets_auth_code_and_unknown_user_the_same(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    p = pop3s(server, tls_ctx)
    assert p.user("nobody@example.test") == b"+OK Send your password with PASS"
    assert error_of(lambda: p.pass_("x")) == b"-ERR [AUTH] Authentication failed"
    assert p.user(ALICE) == b"+OK Send your password with PASS"
    assert error_of(lambda: p.pass_("wrong")) == b"-ERR [AUTH] Authentication failed"
    assert error_of(lambda: p.pass_("again")) == b"-ERR Send USER first"
    p.quit()


def test_throttled_login_gets_sys_temp(
    make_instance: Callable[..., Instance], tls_ctx: ssl.SSLContext
) -> None:
    server = make_instance(
        extra="[auth]\nfailures_before_delay = 5\nmax_delay = 0\n"
        "failures_before_lockout = 2\nlockout_seconds = 60\n"
    )
    p = pop3s(server, tls_ctx)
    for _ in range(2):
        p.user(ALICE)
        assert error_of(lambda: p.pass_("wrong")) == b"-ERR [AUTH] Authentication failed"
    p.user(ALICE)
    # Refused without checking the (right) password: not [AUTH], which would make a
    # client throw away a saved password, but a temporary condition (RFC 3206 §4).
    assert error_of(lambda: p.pass_(PASSWORDS[ALICE])) == (
        b"-ERR [SYS/TEMP] Too many failed logins, please try again later"
    )
    p.quit()


# -- the maildrop: lock, snapshot, UIDL, UPDATE -----------------------------------------
def test_second_session_gets_in_use_until_the_first_quits(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    first = login(server, tls_ctx)
    second = pop3s(server, tls_ctx)
    second.user(ALICE)
    assert error_of(lambda: second.pass_(PASSWORDS[ALICE])) == (
        b"-ERR [IN-USE] Mailbox is in use by another session, try again later"
    )
    token = plain_token(ALICE, PASSWORDS[ALICE])
    assert error_of(lambda: cmd(second, f"AUTH PLAIN {token}")).startswith(
        b"-ERR [IN-USE]"
    )
    login(server, tls_ctx, BOB).quit()  # other users are not affected
    first.quit()
    second.user(ALICE)
    assert second.pass_(PASSWORDS[ALICE]).startswith(b"+OK")
    second.quit()


def test_lock_is_refreshed_during_a_long_session(
    server: Instance, tls_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pop3_session, "MAILDROP_TTL", 1.0)
    monkeypatch.setattr(pop3_session, "MAILDROP_REFRESH", 0.2)
    first = login(server, tls_ctx)
    time.sleep(2.5)  # more than two TTLs
    second = pop3s(server, tls_ctx)
    second.user(ALICE)
    assert error_of(lambda: second.pass_(PASSWORDS[ALICE])).startswith(b"-ERR [IN-USE]")
    first.quit()
    second.user(ALICE)
    assert second.pass_(PASSWORDS[ALICE]).startswith(b"+OK")
    second.quit()


def test_uidl_is_stable_across_sessions(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    put(server, ALICE, message(1), message(2), message(3))
    v = uidvalidity(server)
    uids = [row.uid for row, _ in server.inbox(ALICE)]
    p = login(server, tls_ctx)
    first = p.uidl()[1]
    assert first == [b"%d %d.%d" % (i, v, u) for i, u in enumerate(uids, 1)]
    p.dele(1)
    p.quit()
    p = login(server, tls_ctx)
    # Message numbers move up; each message keeps its unique id.
    assert p.uidl()[1] == [b"1 %d.%d" % (v, uids[1]), b"2 %d.%d" % (v, uids[2])]
    p.quit()
    p = login(server, tls_ctx)
    assert p.uidl(2) == b"+OK 2 %d.%d" % (v, uids[2])
    p.quit()


def test_deletions_happen_only_at_quit(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    put(server, ALICE, message(1), message(2), message(3))
    before = server.inbox(ALICE)
    p = login(server, tls_ctx)
    p.dele(1)
    p.dele(3)
    time.sleep(0.2)
    assert [row.uid for row, _ in server.inbox(ALICE)] == [row.uid for row, _ in before]
    assert p.quit() == b"+OK postkeep POP3 server signing off (1 message left)"
    # QUIT's +OK came after the commit: the store already shows it.
    assert [row.uid for row, _ in server.inbox(ALICE)] == [before[1][0].uid]
    p = login(server, tls_ctx)
    assert p.stat() == (1, len(before[1][1]))
    p.quit()


def test_connection_killed_before_quit_deletes_nothing(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    put(server, ALICE, message(1), message(2))
    before = stored(server)
    p = login(server, tls_ctx)
    p.dele(1)
    p.dele(2)
    p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    p.sock.close()  # a reset, no QUIT
    p.file.close()

    def can_log_in() -> bool:
        q = pop3s(server, tls_ctx)
        q.user(ALICE)
        try:
            q.pass_(PASSWORDS[ALICE])
        except poplib.error_proto:
            q.quit()
            return False
        assert q.stat()[0] == 2
        q.quit()
        return True

    assert wait_for(can_log_in, timeout=5)  # the lock was released
    assert stored(server) == before


def test_logout_in_authorization_and_noop_before_login(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    put(server, ALICE, message(1))
    p = pop3s(server, tls_ctx)
    assert error_of(lambda: p.noop()).startswith(b"-ERR Not logged in")
    assert p.quit() == b"+OK postkeep POP3 server signing off"
    assert len(stored(server)) == 1


def test_messages_arriving_during_a_session_wait_for_the_next(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    deliver(server, ALICE, message(1))
    p = login(server, tls_ctx)
    assert p.stat()[0] == 1
    deliver(server, ALICE, message(2))
    assert len(stored(server)) == 2
    assert p.stat()[0] == 1
    assert len(p.list()[1]) == 1 and len(p.uidl()[1]) == 1
    assert error_of(lambda: p.retr(2)) == b"-ERR No such message"
    p.dele(1)
    assert p.quit() == b"+OK postkeep POP3 server signing off (0 messages left)"
    p = login(server, tls_ctx)
    assert p.stat()[0] == 1
    _, lines, _ = p.retr(1)
    assert lines[-2:] == [b"line one of 2", b"the end"]
    p.quit()


def test_message_expunged_by_another_client_during_the_session(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    put(server, ALICE, message(1), message(2))
    first = server.inbox(ALICE)[0][0]
    p = login(server, tls_ctx)

    async def expunge_first() -> None:  # what an IMAP EXPUNGE does meanwhile
        async with server.store.write() as tx:
            assert await tx.expunge(first.mailbox_id, [first.uid]) == [first.uid]

    server.call(expunge_first)
    assert p.stat()[0] == 2  # the snapshot does not change (RFC 1939 §5)
    assert error_of(lambda: p.retr(1)) == (
        b"-ERR Message no longer exists: another client removed it"
    )
    assert p.retr(2)[0].startswith(b"+OK")
    p.dele(1)
    p.dele(2)
    assert p.quit() == b"+OK postkeep POP3 server signing off (0 messages left)"
    assert stored(server) == []


# -- limits and failures -----------------------------------------------------------------
def test_long_lines_and_bad_commands_are_bounded(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    c = Raw(server.ports["pop3s"], tls_ctx)
    c.line()
    c.send(b"NOOP " + b"x" * 10_000 + b"\r\n")
    assert c.line() == b"-ERR Line too long; the line was discarded"
    c.send(b"CAPA\r\n")
    assert c.line() == b"+OK Capability list follows"
    while c.line() != b".":
        pass
    for _ in range(9):
        c.send(b"FOO\r\n")
        assert c.line() == b"-ERR Unknown command"
    c.send(b"FOO\r\n")
    assert c.line() == b"-ERR Too many errors, closing connection"
    assert c.until_eof() == b""
    c.close()


def test_idle_timeout(
    make_instance: Callable[..., Instance],
    tls_ctx: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert pop3_server.IDLE_TIMEOUT >= 600  # RFC 1939 §3: at least 10 minutes
    monkeypatch.setattr(pop3_server, "IDLE_TIMEOUT", 0.5)
    server = make_instance(extra="[limits]\nidle_timeout = 0.5\n")
    put(server, ALICE, message(1))
    c = Raw(server.ports["pop3s"], tls_ctx)
    c.line()
    c.send(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\nDELE 1\r\n".encode())
    assert c.line().startswith(b"+OK")
    assert c.line().startswith(b"+OK Maildrop")
    assert c.line() == b"+OK Message 1 deleted"
    assert c.until_eof() == b"-ERR Idle timeout, closing connection\r\n"
    c.close()
    assert len(stored(server)) == 1  # no UPDATE without QUIT
    login(server, tls_ctx).quit()  # and the lock is free


def test_storage_error_is_sys_temp_and_crash_is_generic(
    server: Instance, tls_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(server, ALICE, message(1))
    p = login(server, tls_ctx)

    async def temp_failure(self: SqliteReadTx, *args: object, **kwargs: object) -> bytes:
        raise StorageError(StorageErrorKind.TEMP, "disk on fire")

    monkeypatch.setattr(SqliteReadTx, "read_blob", temp_failure)
    assert error_of(lambda: p.retr(1)) == (
        b"-ERR [SYS/TEMP] Temporary server error, please try again later"
    )

    async def bug(self: SqliteReadTx, *args: object, **kwargs: object) -> bytes:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(SqliteReadTx, "read_blob", bug)
    reply = error_of(lambda: p.retr(1))
    assert reply == b"-ERR [SYS/TEMP] Temporary server error, please try again later"
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        p.noop()  # closed
    p.close()
    monkeypatch.undo()
    assert wait_for(lambda: _logs_in(server, tls_ctx), timeout=5)  # lock released
    assert len(stored(server)) == 1


def _logs_in(server: Instance, tls_ctx: ssl.SSLContext) -> bool:
    p = pop3s(server, tls_ctx)
    p.user(ALICE)
    try:
        p.pass_(PASSWORDS[ALICE])
    except poplib.error_proto:
        p.quit()
        return False
    p.quit()
    return True


# -- other clients -----------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_lists_and_retrieves_over_995_and_stls(
    server: Instance, ca_file: Path
) -> None:
    put(server, ALICE, message(1), DOTTY)
    data = stored(server)
    user = f"{ALICE}:{PASSWORDS[ALICE]}"

    def curl(*args: str) -> bytes:
        proc = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--cacert", str(ca_file), "--user", user,
             *args],
            capture_output=True, timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    base = f"pop3s://127.0.0.1:{server.ports['pop3s']}/"
    assert curl(base) == b"1 %d\r\n2 %d\r\n" % (len(data[0]), len(data[1]))
    assert curl(base + "2") == data[1]
    # Port 110 with STLS required (curl's --ssl-reqd).
    stls = f"pop3://127.0.0.1:{server.ports['pop3']}/1"
    assert curl("--ssl-reqd", stls) == data[0]
    assert stored(server) == data


MDA = """\
import sys
data = sys.stdin.buffer.read()
with open(sys.argv[1], "ab") as mbox:
    mbox.write(b"From fetchmail@localhost Thu Jan  1 00:00:00 1970\\n" + data + b"\\n")
"""


@pytest.fixture(scope="module")
def fetchmail() -> str:
    """fetchmail, installed from Debian's packages when missing and we are root."""
    path = shutil.which("fetchmail")
    if path:
        return path
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("fetchmail is not installed, and apt-get needs root: skipping")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "fetchmail"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    path = shutil.which("fetchmail")
    if not path:
        pytest.skip(f"apt-get install fetchmail failed: {proc.stderr.strip()[-300:]}")
    return path


def serve_cert_with_common_name(server: Instance, ca: trustme.CA, tls_ctx: ssl.SSLContext) -> None:
    """fetchmail 6.4 insists on a subject CommonName (it reads SANs only when there is
    one); the harness's certificate has SANs only. Swap in one with a CN (as ``postkeep
    init``'s self-signed certificate has) and wait for the reload."""
    tls_dir = server.config_path.parent / "tls"
    cert = ca.issue_cert(HOST, "localhost", "127.0.0.1", common_name=HOST)
    key_tmp, cert_tmp = tls_dir / "privkey.pem.new", tls_dir / "fullchain.pem.new"
    cert.private_key_pem.write_to_path(str(key_tmp))
    cert.cert_chain_pems[0].write_to_path(str(cert_tmp))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_tmp), append=True)
    os.replace(key_tmp, tls_dir / "privkey.pem")
    os.replace(cert_tmp, tls_dir / "fullchain.pem")

    def served_has_cn() -> bool:
        with socket.create_connection(("127.0.0.1", server.ports["pop3s"]), timeout=5) as s:
            with tls_ctx.wrap_socket(s, server_hostname=HOST) as t:
                peer = t.getpeercert()
        assert peer is not None
        return "'commonName'" in repr(peer["subject"])

    assert wait_for(served_has_cn, timeout=10)


def test_fetchmail_retrieves_100_messages_byte_exact(
    server: Instance,
    ca: trustme.CA,
    ca_file: Path,
    tls_ctx: ssl.SSLContext,
    tmp_path: Path,
    fetchmail: str,
) -> None:
    serve_cert_with_common_name(server, ca, tls_ctx)
    put(server, ALICE, *(message(i, b".dot line %d\r\n" % i) for i in range(100)))
    data = stored(server)
    assert len(data) == 100 and not any(b"\nFrom " in d for d in data)
    mbox = tmp_path / "mbox"
    mda = tmp_path / "mda.py"
    mda.write_text(MDA)
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        "set invisible\n"  # no Received header of its own: the bytes stay ours
        f"poll {HOST} via 127.0.0.1 port {server.ports['pop3s']} proto pop3\n"
        f'  user "{ALICE}" there with password "{PASSWORDS[ALICE]}"'
        f' is "{getpass.getuser()}" here\n'
        f'  ssl sslcertck sslcertfile "{ca_file}" sslcommonname "{HOST}"\n'
        "  fetchall nokeep no rewrite no stripcr no forcecr no mimedecode\n"
        f'  mda "{sys.executable} {mda} {mbox}"\n'
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)}
    start = time.monotonic()
    proc = subprocess.run(
        [fetchmail, "-f", str(rc), "--nodetach", "--nosyslog", "-s",
         "-i", str(tmp_path / "ids")],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - start < 30
    got = mbox.read_bytes().split(b"From fetchmail@localhost Thu Jan  1 00:00:00 1970\n")
    assert got[0] == b""
    assert [m[:-1] for m in got[1:]] == data  # identical bytes, in order
    assert stored(server) == []  # nokeep: deleted at QUIT
