"""PROXY protocol v1/v2 in front of postkeep: the node sees the client's address.

The ``[proxy_protocol]`` listeners read the header on the raw socket before anything else
(before the ClientHello on 465), then use the client address it names for connection
limits, throttling, the Received header and every log line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from haproxy_fixture import Route, ensure_haproxy, start_haproxy, stop_process
from server_harness import PASSWORDS, Instance, free_port, wait_for

from postkeep.config.schema import Address, Mode, Service
from postkeep.log import LogfmtFormatter
from postkeep.net.listener import ConnectionLimits, ConnectionTracker, ConnInfo, Listener
from postkeep.net.proxy import encode_v1, encode_v2
from postkeep.net.stream import Stream

CLIENT = ("203.0.113.7", 40001)
OTHER = ("198.51.100.9", 40002)
NODE_ADDR = ("127.0.0.1", 25)
ALICE = "alice@example.test"
TRUST_LOOPBACK = '\n[proxy_protocol]\nsmtp = ["127.0.0.0/8"]\nsubmissions = ["127.0.0.0/8"]\n'


class Lines(logging.Handler):
    """Log lines of ``postkeep.net`` as logfmt, formatted in the connection's context."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(LogfmtFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def having(self, *parts: str) -> list[str]:
        return [line for line in list(self.lines) if all(p in line for p in parts)]


@pytest.fixture
def net_log() -> Iterator[Lines]:
    # On the logger itself: log.setup() would stop propagation to the root.
    handler = Lines()
    logger = logging.getLogger("postkeep.net")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def header(version: int, client: tuple[str, int], port: int) -> bytes:
    node = ("127.0.0.1", port)
    return encode_v1(client, node) if version == 1 else encode_v2(client, node)


class ProxiedSMTP(smtplib.SMTP):
    """smtplib, with a PROXY header written right after connect."""

    proxy_header = b""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        sock.sendall(self.proxy_header)
        return sock


class ProxiedSMTP_SSL(smtplib.SMTP_SSL):
    """smtplib's implicit TLS, with the PROXY header before the ClientHello."""

    proxy_header = b""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        sock.sendall(self.proxy_header)
        return self.context.wrap_socket(sock, server_hostname=host)


def message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = ALICE, ALICE, subject
    msg.set_content("hello\n")
    return msg


def received_of(server: Instance, subject: str) -> str:
    for _row, raw in server.inbox(ALICE):
        msg = BytesParser(policy=default_policy).parsebytes(raw)
        if msg["Subject"] == subject:
            return str(msg["Received"])
    raise AssertionError(f"no message {subject!r}")


def raw_greeting(port: int, data: bytes) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), 5)
    sock.sendall(data)
    return sock, recv_line(sock)


def recv_line(sock: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        try:
            chunk = sock.recv(1)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        out += chunk
    return out


# -- port 25 and 465 ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_header_on_25_makes_the_client_address_the_peer(
    make_instance: Callable[..., Instance], net_log: Lines, version: int
) -> None:
    server = make_instance(extra=TRUST_LOOPBACK)
    port = server.ports["smtp"]
    subject = f"via proxy v{version}"
    with ProxiedSMTP() as smtp:
        smtp.proxy_header = header(version, CLIENT, port)
        smtp.connect("127.0.0.1", port)
        smtp.ehlo("client.example.net")
        smtp.send_message(message(subject))
    assert "[203.0.113.7]" in received_of(server, subject)
    assert net_log.having("event=conn.open", "service=smtp", "peer=203.0.113.7", "via=127.0.0.1")
    assert not net_log.having("service=smtp", "peer=127.0.0.1", "event=conn.open")


@pytest.mark.parametrize("version", [1, 2])
def test_header_before_the_clienthello_on_465(
    make_instance: Callable[..., Instance], net_log: Lines, tls_ctx: ssl.SSLContext, version: int
) -> None:
    server = make_instance(extra=TRUST_LOOPBACK)
    port = server.ports["submissions"]
    subject = f"submitted via proxy v{version}"
    with ProxiedSMTP_SSL(context=tls_ctx) as smtp:
        smtp.proxy_header = header(version, CLIENT, port)
        smtp.connect("127.0.0.1", port)
        smtp.login(ALICE, PASSWORDS[ALICE])
        smtp.send_message(message(subject))
    assert "[203.0.113.7]" in received_of(server, subject)
    lines = net_log.having("event=conn.open", "service=submissions", "peer=203.0.113.7")
    assert lines and "tls=" in lines[0]


# -- limits and refusals ------------------------------------------------------------------


def test_per_ip_limit_counts_the_claimed_address(
    make_instance: Callable[..., Instance],
) -> None:
    server = make_instance(extra=TRUST_LOOPBACK + "\n[limits]\nconnections_per_ip = 1\n")
    port = server.ports["smtp"]
    first, greeting = raw_greeting(port, header(2, CLIENT, port))
    assert greeting.startswith(b"220 ")
    try:
        # The same claimed client: over its limit, though HAProxy's address is shared.
        second, reply = raw_greeting(port, header(2, (CLIENT[0], 40009), port))
        second.close()
        assert reply.startswith(b"421 ")
        # Another client behind the same balancer is served.
        third, reply = raw_greeting(port, header(1, OTHER, port))
        third.close()
        assert reply.startswith(b"220 ")
    finally:
        first.close()


def test_header_from_an_untrusted_source_is_refused(
    make_instance: Callable[..., Instance], net_log: Lines
) -> None:
    server = make_instance(extra='\n[proxy_protocol]\nsmtp = ["192.0.2.0/24"]\n')
    port = server.ports["smtp"]
    sock, reply = raw_greeting(port, header(2, CLIENT, port))
    sock.close()
    assert reply == b""  # closed without a greeting
    assert wait_for(lambda: bool(net_log.having("event=conn.proxy.refused", "trusted")))
    assert not net_log.having("event=conn.open", "service=smtp")


def test_no_header_on_a_proxy_listener_is_refused(
    make_instance: Callable[..., Instance], net_log: Lines
) -> None:
    server = make_instance(extra=TRUST_LOOPBACK)
    port = server.ports["smtp"]
    sock, reply = raw_greeting(port, b"EHLO client.example.net\r\n")
    sock.close()
    assert reply == b""
    assert wait_for(lambda: bool(net_log.having("event=conn.proxy.refused", "no PROXY header")))


def test_listener_without_proxy_protocol_treats_proxy_as_a_bad_command(
    make_instance: Callable[..., Instance], net_log: Lines
) -> None:
    server = make_instance(extra='\n[proxy_protocol]\nsubmissions = ["127.0.0.0/8"]\n')
    port = server.ports["smtp"]
    sock, greeting = raw_greeting(port, b"")
    try:
        assert greeting.startswith(b"220 ")
        sock.sendall(header(1, CLIENT, port))
        assert recv_line(sock).startswith(b"500 ")
    finally:
        sock.close()
    assert net_log.having("event=conn.open", "service=smtp", "peer=127.0.0.1")
    assert not net_log.having("peer=203.0.113.7")


# -- HAProxy ------------------------------------------------------------------------------


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[int], int]]:
    ensure_haproxy()  # skips here, before a server is started, when there is none
    procs: list[subprocess.Popen[bytes]] = []

    def start(backend_port: int) -> int:
        front = free_port()
        route = Route("pk", ("127.0.0.2", front), ("127.0.0.1", backend_port))
        procs.append(start_haproxy([route], tmp_path / f"haproxy-{len(procs)}"))
        return front

    yield start
    for proc in procs:
        stop_process(proc)


@pytest.mark.timeout(600)
def test_haproxy_send_proxy_v2_in_front_of_465(
    make_instance: Callable[..., Instance],
    net_log: Lines,
    tls_ctx: ssl.SSLContext,
    haproxy: Callable[[int], int],
) -> None:
    server = make_instance(extra='\n[proxy_protocol]\nsubmissions = ["127.0.0.1/32"]\n')
    front = haproxy(server.ports["submissions"])
    net_log.lines.clear()  # the readiness probe's connection is not the one under test
    subject = "through haproxy"
    # The certificate names 127.0.0.1 and the server's name, not HAProxy's 127.0.0.2: the
    # chain is still verified, the name is not.
    tls_ctx.check_hostname = False
    kwargs: dict[str, Any] = {"context": tls_ctx, "source_address": ("127.0.0.3", 0)}
    with smtplib.SMTP_SSL("127.0.0.2", front, timeout=15, **kwargs) as smtp:
        smtp.login(ALICE, PASSWORDS[ALICE])
        smtp.send_message(message(subject))
    # HAProxy connects from 127.0.0.1; the node must see the client, 127.0.0.3.
    assert "[127.0.0.3]" in received_of(server, subject)
    lines = net_log.having("event=conn.open", "service=submissions", "peer=127.0.0.3")
    assert lines, "\n".join(net_log.lines)
    assert "via=127.0.0.1" in lines[0]


# -- the listener alone: exact reads and the header timeout -------------------------------


async def _listener_with(
    handler: Callable[[Stream, ConnInfo], Awaitable[None]], timeout: float = 5.0
) -> Listener:
    listener = Listener(
        service=Service.SMTP,
        mode=Mode.STARTTLS,
        address=Address("127.0.0.1", 0),
        handler=handler,
        tracker=ConnectionTracker(ConnectionLimits()),
        proxy_trusted=(ipaddress.ip_network("127.0.0.0/8"),),
        proxy_timeout=timeout,
    )
    listener.start()
    return listener


async def test_the_first_command_after_the_header_reaches_the_handler_whole() -> None:
    seen: list[tuple[str, int, str | None, bytes]] = []

    async def handler(stream: Stream, info: ConnInfo) -> None:
        data = b""
        while not data.endswith(b"\r\n"):
            data += await stream.read(5)
        seen.append((info.peer_ip, info.peer_port, info.via, data))

    listener = await _listener_with(handler)
    try:
        tlvs = b"\x04\x00\x01x"
        for raw in (encode_v1(CLIENT, NODE_ADDR), encode_v2(CLIENT, NODE_ADDR, tlvs=tlvs)):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(raw + b"EHLO client.example.net\r\n")  # one segment
            await writer.drain()
            await reader.read()  # the handler returns, the listener closes
            writer.close()
    finally:
        await listener.stop_accepting()
    assert seen == [(CLIENT[0], CLIENT[1], "127.0.0.1", b"EHLO client.example.net\r\n")] * 2


@pytest.mark.parametrize(
    "sent", [b"", b"PROXY TCP4 203.0.113.7", encode_v2(CLIENT, NODE_ADDR)[:20]]
)
async def test_an_incomplete_header_is_refused_after_the_timeout(sent: bytes) -> None:
    served: list[ConnInfo] = []

    async def handler(stream: Stream, info: ConnInfo) -> None:
        served.append(info)

    listener = await _listener_with(handler, timeout=0.3)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(sent)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
    finally:
        await listener.stop_accepting()
    assert served == []
