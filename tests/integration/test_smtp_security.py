"""Raw-socket attacks on the SMTP server: STARTTLS injection, smuggling, cut connections."""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable

import pytest
from server_harness import Instance, wait_for


class Raw:
    """A line-oriented SMTP client over a socket that can be upgraded to TLS."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=10
        )
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r} {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.buf == b""
        self.sock = ctx.wrap_socket(self.sock, server_hostname="mail.example.test")

    def close(self) -> None:
        self.sock.close()


def test_starttls_injection_in_one_segment_is_not_executed(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    c = Raw(server.ports["smtp"])
    assert c.reply()[0] == 220
    c.send(b"EHLO attacker.test\r\n")
    assert c.reply()[0] == 250
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@attacker.test>\r\n")
    code, _ = c.reply()
    assert code == 220
    c.buf = b""  # nothing else must have been answered in plaintext
    c.starttls(tls_ctx)
    # Inside TLS the server must expect EHLO afresh and must not have run the injected MAIL.
    c.send(b"MAIL FROM:<real@remote.test>\r\n")
    code, text = c.reply()
    assert code == 503, text  # "EHLO first": the injected commands never ran
    c.send(b"EHLO good.test\r\n")
    assert c.reply()[0] == 250
    c.send(b"MAIL FROM:<real@remote.test>\r\n")
    assert c.reply()[0] == 250  # not "nested MAIL": the injected MAIL did not happen
    c.close()


def test_starttls_injection_in_second_segment_is_not_executed(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    c = Raw(server.ports["submission"])
    assert c.reply()[0] == 220
    c.send(b"EHLO attacker.test\r\n")
    c.reply()
    c.send(b"STARTTLS\r\n")
    time.sleep(0.05)
    c.send(b"NOOP\r\nNOOP\r\n")  # a second segment, before our ClientHello
    code, _ = c.reply()
    assert code == 220
    time.sleep(0.2)
    c.buf = b""
    try:
        c.starttls(tls_ctx)
    except (ssl.SSLError, OSError):
        return  # the server treated the bytes as a broken handshake: also nothing executed
    c.send(b"EHLO good.test\r\n")
    code, text = c.reply()
    assert code == 250, text  # the first answer over TLS is for EHLO, not an injected NOOP
    c.close()


SMUGGLING = [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r",
]


@pytest.mark.parametrize("ending", SMUGGLING, ids=[repr(e) for e in SMUGGLING])
def test_smuggling_variants_leave_one_message_or_a_rejection(
    server: Instance, ending: bytes
) -> None:
    c = Raw(server.ports["smtp"])
    c.reply()
    c.send(b"EHLO remote.test\r\n")
    c.reply()
    c.send(b"MAIL FROM:<a@remote.test>\r\n")
    assert c.reply()[0] == 250
    c.send(b"RCPT TO:<alice@example.test>\r\n")
    assert c.reply()[0] == 250
    c.send(b"DATA\r\n")
    assert c.reply()[0] == 354
    c.send(
        b"Subject: one\r\n\r\nfirst"
        + ending
        + b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    )
    code, text = c.reply()
    c.send(b"QUIT\r\n")
    c.close()
    assert server.inbox("bob@example.test") == []
    alice = server.inbox("alice@example.test")
    if code == 250:
        [(_, data)] = alice
        assert b"smuggled" in data  # the "smuggled" part stayed inside the one message
    else:
        assert code == 554 and b"5.5.2" in text
        assert alice == []


def test_bare_lf_in_command_is_refused(server: Instance) -> None:
    c = Raw(server.ports["smtp"])
    c.reply()
    c.send(b"EHLO remote.test\nMAIL FROM:<a@remote.test>\r\n")
    code, text = c.reply()
    assert code == 500 and b"5.5.2" in text
    assert c.sock.recv(100) == b""  # closed: nothing after a bare LF is read as a command
    c.close()


def test_connection_killed_mid_data_delivers_nothing(server: Instance) -> None:
    c = Raw(server.ports["smtp"])
    c.reply()
    c.send(b"EHLO remote.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    for _ in range(3):
        c.reply()
    c.send(b"DATA\r\n")
    assert c.reply()[0] == 354
    c.send(b"Subject: cut\r\n\r\npartial body\r\n")
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()  # RST
    time.sleep(0.5)
    assert server.inbox("alice@example.test") == []
    # and the server is fine
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        assert s.noop()[0] == 250


def test_long_command_line_is_refused_and_bounded(server: Instance) -> None:
    c = Raw(server.ports["smtp"])
    c.reply()
    c.send(b"EHLO " + b"a" * 100_000 + b"\r\n")
    code, text = c.reply()
    assert code == 500 and b"5.5.6" in text
    c.send(b"NOOP\r\n")
    assert c.reply()[0] == 250
    c.close()


def test_error_budget_closes_the_session(server: Instance) -> None:
    c = Raw(server.ports["smtp"])
    c.reply()
    codes = []
    for _ in range(30):
        c.send(b"BOGUS\r\n")
        try:
            code, _ = c.reply()
        except ConnectionError:
            break
        codes.append(code)
        if code == 421:
            break
    assert codes[-1] == 421
    assert len(codes) <= 12


def test_per_ip_connection_limit(make_instance: Callable[..., Instance]) -> None:
    inst = make_instance(extra="[limits]\nconnections_per_ip = 5\n")
    held = [Raw(inst.ports["smtp"]) for _ in range(5)]
    for c in held:
        assert c.reply()[0] == 220
    extra = Raw(inst.ports["smtp"])
    code, text = extra.reply()
    assert code == 421 and b"4.7.0" in text
    for c in [*held, extra]:
        c.close()


def test_200_concurrent_sessions(make_instance: Callable[..., Instance]) -> None:
    # All clients come from 127.0.0.1 here, so the per-IP limit is raised to let 200 in.
    server = make_instance(extra="[limits]\nconnections_per_ip = 300\n")
    n = 200
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n, timeout=60)

    def one(i: int) -> None:
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=60) as s:
            barrier.wait()  # all 200 are connected at the same time
            refused = s.sendmail(
                "a@remote.test", ["alice@example.test"],
                b"Subject: %d\r\n\r\nmessage %d\r\n" % (i, i),
            )
            with lock:
                results.append(len(refused))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [0] * n
    assert wait_for(lambda: len(server.inbox("alice@example.test")) == n)
    bodies = {d.split(b"\r\n\r\n", 1)[1] for _, d in server.inbox("alice@example.test")}
    assert bodies == {b"message %d\r\n" % i for i in range(n)}
    stats = server.store.stats
    assert stats.commits < stats.write_transactions  # group commit under concurrency


def test_idle_client_is_timed_out(make_instance: Callable[..., Instance]) -> None:
    inst = make_instance(extra="[limits]\nidle_timeout = 1\n")
    c = Raw(inst.ports["smtp"])
    assert c.reply()[0] == 220
    start = time.monotonic()
    code, text = c.reply()  # nothing sent: the server gives up on us
    assert code == 421 and b"4.4.2" in text
    assert time.monotonic() - start < 5
    assert c.sock.recv(10) == b""
    c.close()


def test_slow_data_is_timed_out_and_delivers_nothing(
    make_instance: Callable[..., Instance],
) -> None:
    inst = make_instance(extra="[limits]\nidle_timeout = 1\ndata_timeout = 2\n")
    c = Raw(inst.ports["smtp"])
    c.reply()
    c.send(b"EHLO r.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    for _ in range(4):
        c.reply()
    # A trickle of one line every 0.3 s never trips the 1 s idle timeout, but the whole
    # DATA phase is bounded by data_timeout: the server must give up and deliver nothing.
    start = time.monotonic()
    answer = None
    while time.monotonic() - start < 10 and answer is None:
        try:
            c.send(b"x\r\n")
        except OSError:
            break
        time.sleep(0.3)
        if _readable(c.sock):
            answer = c.reply()
    assert answer is not None and answer[0] == 421
    assert 1.5 < time.monotonic() - start < 6
    assert inst.inbox("alice@example.test") == []


def _readable(sock: socket.socket | ssl.SSLSocket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])
