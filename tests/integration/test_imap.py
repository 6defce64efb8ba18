"""IMAP on 143 (STARTTLS required) and 993 (implicit TLS): connection security and limits.

Real server, real TLS, clients nobody here wrote (imaplib, imapclient) plus a raw socket
where the exact bytes matter. The helpers at the top are shared by the other
``test_imap_*.py`` files (commands, FETCH, concurrent sessions).
"""

from __future__ import annotations

import base64
import imaplib
import re
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from imapclient import IMAPClient
from server_harness import PASSWORDS, Instance

ALICE = "alice@example.test"
BOB = "bob@example.test"
HOST = "127.0.0.1"
_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


# -- helpers (used by every test_imap_*.py) -----------------------------------------------
class Wire:
    """A raw IMAP connection: we send exact bytes and read whole responses, literals
    included, so a test sees precisely what the server said and in which order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    @classmethod
    def connect(cls, port: int, ctx: ssl.SSLContext | None = None, timeout: float = 10) -> Wire:
        sock = socket.create_connection((HOST, port), timeout=timeout)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname="mail.example.test")
        return cls(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def _raw_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        i = self.buf.index(b"\r\n") + 2
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def response(self) -> bytes:
        """One response (``* …``, ``+ …`` or tagged) with any literals inlined, CRLF kept."""
        out = self._raw_line()
        while (m := _LITERAL.search(out)) is not None:
            n = int(m.group(1))
            while len(self.buf) < n:
                self._fill()
            out += self.buf[:n]
            self.buf = self.buf[n:]
            out += self._raw_line()
        return out

    def until(self, tag: str) -> list[bytes]:
        """Responses up to and including the tagged one for ``tag``."""
        lines = []
        while True:
            line = self.response()
            lines.append(line)
            if line.startswith(tag.encode() + b" "):
                return lines

    def cmd(self, tag: str, text: str | bytes) -> list[bytes]:
        data = text.encode() if isinstance(text, str) else text
        self.send(tag.encode() + b" " + data + b"\r\n")
        return self.until(tag)

    def login(self, user: str = ALICE) -> None:
        assert self.cmd("l", f'LOGIN {user} "{PASSWORDS[user]}"')[-1].startswith(b"l OK")

    def closed(self, timeout: float = 5) -> bool:
        """Whether the server closes the connection (EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True

    def close(self) -> None:
        self.sock.close()


def wire_993(server: Instance, ctx: ssl.SSLContext, user: str | None = ALICE) -> Wire:
    w = Wire.connect(server.ports["imaps"], ctx)
    assert w.response().startswith(b"* OK [CAPABILITY ")
    if user is not None:
        w.login(user)
    return w


def client_993(server: Instance, ctx: ssl.SSLContext, user: str = ALICE) -> IMAPClient:
    c = IMAPClient(HOST, port=server.ports["imaps"], ssl=True, ssl_context=ctx, timeout=10)
    c.login(user, PASSWORDS[user])
    return c


def client_143(server: Instance, ctx: ssl.SSLContext, user: str = ALICE) -> IMAPClient:
    c = IMAPClient(HOST, port=server.ports["imap"], ssl=False, timeout=10)
    c.starttls(ctx)
    c.login(user, PASSWORDS[user])
    return c


def message(subject: str, body: str = "hello\r\n", to: str = ALICE) -> bytes:
    return (
        f"From: sender@example.test\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.test>\r\n\r\n{body}"
    ).encode()


def code_of(text: bytes, name: bytes) -> bytes:
    """The data of response code ``[name data]`` in ``text``."""
    m = re.search(rb"\[" + re.escape(name) + rb" ([^\]]*)\]", text)
    assert m is not None, text
    return m.group(1)


@pytest.fixture
def alice(server: Instance, tls_ctx: ssl.SSLContext) -> Iterator[IMAPClient]:
    c = client_993(server, tls_ctx)
    yield c
    try:
        c.logout()
    except Exception:
        pass


# -- port 143: STARTTLS required ----------------------------------------------------------
def test_login_disabled_and_starttls_advertised_before_tls(server: Instance) -> None:
    w = Wire.connect(server.ports["imap"])
    greeting = w.response()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    caps = w.cmd("a", "CAPABILITY")[0].split()
    assert b"STARTTLS" in caps and b"LOGINDISABLED" in caps
    assert not any(c.startswith(b"AUTH=") for c in caps)
    assert b"IMAP4rev2" not in caps
    assert b"STARTTLS" in greeting and b"LOGINDISABLED" in greeting


def test_login_before_starttls_is_privacy_required_naming_993(server: Instance) -> None:
    w = Wire.connect(server.ports["imap"])
    w.response()
    [reply] = w.cmd("a", f'LOGIN {ALICE} "{PASSWORDS[ALICE]}"')
    assert reply.startswith(b"a NO [PRIVACYREQUIRED] ")
    assert b"STARTTLS" in reply and f"port {server.ports['imaps']}".encode() in reply


def test_authenticate_before_starttls_is_privacy_required(server: Instance) -> None:
    w = Wire.connect(server.ports["imap"])
    w.response()
    ir = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode()
    [reply] = w.cmd("a", f"AUTHENTICATE PLAIN {ir}")
    assert reply.startswith(b"a NO [PRIVACYREQUIRED] ")
    assert f"port {server.ports['imaps']}".encode() in reply
    # A password literal is refused before it is asked for: no "+" ever comes.
    w.send(b"b LOGIN {5}\r\n")
    reply = w.response()
    assert reply.startswith(b"b NO [PRIVACYREQUIRED] ")


def test_imaplib_login_refused_before_tls(server: Instance) -> None:
    m = imaplib.IMAP4(HOST, server.ports["imap"], timeout=10)
    assert "LOGINDISABLED" in m.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        m.login(ALICE, PASSWORDS[ALICE])
    m.shutdown()


def test_capabilities_change_after_starttls(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    m = imaplib.IMAP4(HOST, server.ports["imap"], timeout=10)
    before = set(m.capabilities)
    m.starttls(ssl_context=tls_ctx)  # imaplib asks for CAPABILITY again afterwards
    after = set(m.capabilities)
    assert "STARTTLS" in before and "STARTTLS" not in after
    assert "LOGINDISABLED" in before and "LOGINDISABLED" not in after
    assert "AUTH=PLAIN" in after
    typ, data = m.login(ALICE, PASSWORDS[ALICE])
    assert typ == "OK" and b"[CAPABILITY " in data[0] and b"IDLE" in data[0]
    assert m.logout()[0] == "BYE"


def test_starttls_injection_is_never_answered_inside_tls(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    w = Wire.connect(server.ports["imap"])
    w.response()
    w.send(b"a STARTTLS\r\nb NOOP\r\n")  # one segment: "b NOOP" was sent before our OK
    ok = w.response()
    assert ok.startswith(b"a OK ")
    assert w.buf == b""  # and nothing else came in plaintext
    w.sock = tls_ctx.wrap_socket(w.sock, server_hostname="mail.example.test")
    lines = w.cmd("c", "NOOP")
    assert lines == [b"c OK NOOP completed\r\n"], lines
    caps = w.cmd("d", "CAPABILITY")[0].split()
    assert b"STARTTLS" not in caps and b"AUTH=PLAIN" in caps


def test_starttls_then_login_on_143_with_imapclient(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    c = client_143(server, tls_ctx)
    assert b"IDLE" in c.capabilities()
    assert c.select_folder("INBOX")[b"EXISTS"] == 0
    c.logout()


# -- port 993: implicit TLS ---------------------------------------------------------------
def test_993_plaintext_client_gets_hint_and_close(server: Instance) -> None:
    w = Wire.connect(server.ports["imaps"])
    w.send(b"a CAPABILITY\r\n")
    line = w.response()
    p993, p143 = server.ports["imaps"], server.ports["imap"]
    assert line == (
        f"* BYE [ALERT] Port {p993} expects SSL/TLS from the first byte: use SSL/TLS on "
        f"port {p993}, or STARTTLS on port {p143}\r\n"
    ).encode()
    assert w.closed()


def test_993_silent_client_gets_hint(make_instance) -> None:  # type: ignore[no-untyped-def]
    server = make_instance(extra="[security]\nimplicit_tls_hint_timeout = 0.5\n")
    w = Wire.connect(server.ports["imaps"])
    start = time.monotonic()
    line = w.response()  # we send nothing, like a client waiting for a greeting
    assert line.startswith(b"* BYE [ALERT] Port ")
    assert b"expects SSL/TLS from the first byte" in line
    assert time.monotonic() - start < 5
    assert w.closed()


def test_993_imaplib_login(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    m = imaplib.IMAP4_SSL(HOST, server.ports["imaps"], ssl_context=tls_ctx, timeout=10)
    assert "AUTH=PLAIN" in m.capabilities and "STARTTLS" not in m.capabilities
    assert m.login(ALICE, PASSWORDS[ALICE])[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()


def test_authenticate_plain_with_sasl_ir(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    w = wire_993(server, tls_ctx, user=None)
    ir = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode()
    [reply] = w.cmd("a", f"AUTHENTICATE PLAIN {ir}")  # RFC 4959: no round trip
    assert reply.startswith(b"a OK [CAPABILITY IMAP4rev1 ")
    assert w.cmd("b", "SELECT INBOX")[-1].startswith(b"b OK [READ-WRITE]")


def test_authenticate_plain_with_continuation(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    c = IMAPClient(HOST, port=server.ports["imaps"], ssl=True, ssl_context=tls_ctx, timeout=10)
    c.plain_login(BOB, PASSWORDS[BOB])  # AUTHENTICATE PLAIN, "+ ", response
    assert c.select_folder("INBOX")[b"EXISTS"] == 0
    c.logout()


def test_authenticate_cancel_and_unknown_mechanism(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    w = wire_993(server, tls_ctx, user=None)
    w.send(b"a AUTHENTICATE PLAIN\r\n")
    assert w.response() == b"+ \r\n"
    w.send(b"*\r\n")
    assert w.response().startswith(b"a BAD ")  # RFC 3501 §6.2.2
    assert w.cmd("b", "AUTHENTICATE CRAM-MD5")[-1].startswith(b"b NO ")


def test_wrong_password_is_authenticationfailed(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    w = wire_993(server, tls_ctx, user=None)
    [reply] = w.cmd("a", f'LOGIN {ALICE} "wrong"')
    assert reply.startswith(b"a NO [AUTHENTICATIONFAILED] ")
    [reply] = w.cmd("b", 'LOGIN nobody@example.test "wrong"')
    assert reply.startswith(b"b NO [AUTHENTICATIONFAILED] ")  # same answer: no user probe


def test_throttled_login_is_unavailable(make_instance, tls_ctx: ssl.SSLContext) -> None:  # type: ignore[no-untyped-def]
    server = make_instance(
        extra="[auth]\nfailures_before_delay = 10\nmax_delay = 0\nfailures_before_lockout = 2\n"
    )
    w = wire_993(server, tls_ctx, user=None)
    for tag in ("a", "b"):
        assert w.cmd(tag, f'LOGIN {ALICE} "wrong"')[-1].startswith(tag.encode() + b" NO [AUTH")
    # Locked: even the right password is refused, as a temporary failure.
    [reply] = w.cmd("c", f'LOGIN {ALICE} "{PASSWORDS[ALICE]}"')
    assert reply.startswith(b"c NO [UNAVAILABLE] ")


# -- limits and bad input -----------------------------------------------------------------
def test_huge_append_literal_refused_before_reading(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    w = wire_993(server, tls_ctx)
    caps = w.cmd("c", "CAPABILITY")[0]
    assert b"APPENDLIMIT=52428800" in caps
    w.send(b"a APPEND INBOX {999999999}\r\n")
    reply = w.response()  # at once: no "+", and we never send the octets
    assert reply.startswith(b"a NO [TOOBIG] ")
    assert w.cmd("b", "NOOP") == [b"b OK NOOP completed\r\n"]
    assert w.cmd("s", "STATUS INBOX (MESSAGES)")[0] == b"* STATUS INBOX (MESSAGES 0)\r\n"


def test_append_literal_plus_over_limit_is_dropped(
    make_instance, tls_ctx: ssl.SSLContext  # type: ignore[no-untyped-def]
) -> None:
    server = make_instance(extra="[limits]\nmessage_size = 1000\n")
    w = wire_993(server, tls_ctx)
    assert b"APPENDLIMIT=1000" in w.cmd("c", "CAPABILITY")[0]
    w.send(b"a APPEND INBOX {2000+}\r\n" + b"x" * 2000 + b"\r\n")
    assert w.response().startswith(b"a NO [TOOBIG] ")
    assert w.cmd("b", "NOOP") == [b"b OK NOOP completed\r\n"]  # the octets were skipped


def test_bad_command_budget_ends_with_bye(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    w = wire_993(server, tls_ctx)
    lines: list[bytes] = []
    for i in range(30):
        try:
            w.send(f"x{i} FROBNICATE\r\n".encode())
            lines.append(w.response())
        except (ConnectionError, ssl.SSLError, OSError):
            break
        if lines[-1].startswith(b"* BYE"):
            break
    assert lines[0].startswith(b"x0 BAD ") and b"Unknown command" in lines[0]
    assert lines[-1] == b"* BYE Too many bad commands, closing connection\r\n"
    assert w.closed()


def test_parse_errors_are_tagged_bad_with_a_reason(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    w = wire_993(server, tls_ctx)
    w.cmd("s", "SELECT INBOX")
    [reply] = w.cmd("a", "FETCH 1:x (FLAGS)")
    assert reply.startswith(b"a BAD ") and b"sequence set" in reply
    nested = "(" * 40 + "ALL" + ")" * 40
    [reply] = w.cmd("b", f"SEARCH {nested}")
    assert reply.startswith(b"b BAD ") and b"nested too deeply" in reply
    [reply] = w.cmd("c", "FETCH 7 (FLAGS)")  # no such message in an empty mailbox
    assert reply.startswith(b"c BAD ")
    [reply] = w.cmd("d", "SEARCH CHARSET KOI8-R ALL")
    assert reply.startswith(b"d NO [BADCHARSET")


def test_overlong_line_is_refused(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    w = wire_993(server, tls_ctx)
    w.send(b"a NOOP " + b"x" * 70000 + b"\r\n")
    assert w.response().startswith(b"a BAD Command line too long")
    assert w.cmd("b", "NOOP") == [b"b OK NOOP completed\r\n"]


def test_preauth_idle_timeout_closes_with_bye(make_instance) -> None:  # type: ignore[no-untyped-def]
    server = make_instance(extra="[limits]\nidle_timeout = 1\n")
    w = Wire.connect(server.ports["imap"])
    w.response()
    assert w.response() == b"* BYE Autologout: idle for too long\r\n"
    assert w.closed()


def test_logout(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    w = wire_993(server, tls_ctx)
    lines = w.cmd("z", "LOGOUT")
    assert lines == [b"* BYE postkeep logging out\r\n", b"z OK LOGOUT completed\r\n"]
    assert w.closed()


# -- failures: one mapping table, never exception text on the wire ------------------------
def test_unexpected_exception_is_generic_bye(
    server: Instance, tls_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from postkeep.imap.session import ImapSession

    async def boom(*args: object) -> None:
        raise RuntimeError("secret-detail-xyz")

    monkeypatch.setattr(ImapSession, "_status", boom)
    w = wire_993(server, tls_ctx)
    w.send(b"a STATUS INBOX (MESSAGES)\r\n")
    assert w.response() == b"* BYE Internal server error, closing connection\r\n"
    assert w.closed()


def test_temporary_storage_failure_is_unavailable(
    server: Instance, tls_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextlib import asynccontextmanager

    from postkeep.store.api import StorageError, StorageErrorKind

    @asynccontextmanager
    async def failing_write():  # type: ignore[no-untyped-def]
        raise StorageError(StorageErrorKind.TEMP, "disk on fire")
        yield

    w = wire_993(server, tls_ctx)
    monkeypatch.setattr(server.store, "write", failing_write)
    [reply] = w.cmd("a", "CREATE Newbox")
    assert reply == b"a NO [UNAVAILABLE] Temporary failure, please try again\r\n"
    monkeypatch.undo()
    assert w.cmd("b", "CREATE Newbox")[-1].startswith(b"b OK")


def test_message_bytes_gone_before_streaming_is_expungeissued(
    server: Instance, tls_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from postkeep.imap import server as imap_server
    from postkeep.store.api import StorageError, StorageErrorKind

    w = wire_993(server, tls_ctx)
    data = message("vanishing")
    w.send(f"ap APPEND INBOX {{{len(data)}+}}\r\n".encode() + data + b"\r\n")
    w.until("ap")
    w.cmd("s", "SELECT INBOX")

    async def gone(*args: object) -> bytes:
        raise StorageError(StorageErrorKind.NOT_FOUND, "blob freed by an expunge")

    monkeypatch.setattr(imap_server, "_read", gone)  # as if expunged after the row was read
    lines = w.cmd("a", "FETCH 1 (UID BODY.PEEK[])")
    assert lines == [b"a NO [EXPUNGEISSUED] Some of the requested messages no longer exist\r\n"]
    monkeypatch.undo()
    assert w.cmd("b", "FETCH 1 (UID)")[0] == b"* 1 FETCH (UID 1)\r\n"
