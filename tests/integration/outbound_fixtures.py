"""The world outside, on loopback, for outbound-delivery tests (helpers; no pytest fixtures).

- ``LocalDns``: a DNS server (``dnslib``) on 127.0.0.1, UDP and TCP on one free port, serving
  a ``Zone`` the test fills (MX, A, AAAA, TXT; null MX; anything else is NXDOMAIN). Give
  ``dns.nameserver`` to ``DnsConfig(nameservers=...)``.
- ``Receiver``: a receiving SMTP server written by someone else (``aiosmtpd``) on
  127.0.0.2, 127.0.0.3, … — all of 127.0.0.0/8 is loopback on Linux, so every "MX host"
  has its own address and they can share the one ``[outbound] mx_port``. STARTTLS or
  implicit TLS with a certificate from the test's ``trustme`` CA, per-recipient replies on
  demand, and counters: messages received, connections, RSETs, AUTH attempts. It can also
  inject bytes right after its 220 to STARTTLS (the response-injection attack).
- ``MtaStsServer``: an HTTPS server (aiohttp) serving ``/.well-known/mta-sts.txt`` for
  ``mta-sts.<domain>`` names, with a certificate from the same CA.
- ``Remote``: all of the above for one test, plus ``deliverer()`` building a
  ``queue.deliver.Deliverer`` whose config points at them.

Typical use (async test)::

    with Remote(ca, ca_file, tmp_path) as remote:
        mx1 = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2", 10)
        deliverer = remote.deliverer()
        report = await deliverer.deliver("a@sender.test", ["b@remote.test"], MESSAGE)
        await deliverer.close()
        assert mx1.messages[0].data == MESSAGE
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import trustme
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer
from server_harness import write_cert

from postkeep.config.schema import Config, DnsConfig, OutboundConfig, TlsConfig
from postkeep.dns.resolver import DnsResolver
from postkeep.queue.deliver import Deliverer, Timeouts
from postkeep.tls.policy import TlsPolicy

#: Short waits: every server here is local, a slow answer is a bug.
TEST_TIMEOUTS = Timeouts(
    greeting=10, command=10, mail=10, rcpt=10, data_init=10, data_block=10, data_end=10,
    tls_handshake=10, quit=2, idle=1,
)


# -- DNS -------------------------------------------------------------------------------
class Zone(BaseResolver):  # type: ignore[misc]
    """Records by name; a name with no records at all answers NXDOMAIN."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, list[RR]] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".") + "."

    def _add(self, name: str, rtype: int, rdata: Any) -> None:
        with self._lock:
            self._records.setdefault(self._key(name), []).append(
                RR(self._key(name), rtype, rdata=rdata, ttl=60)
            )

    def mx(self, domain: str, preference: int, host: str) -> None:
        self._add(domain, QTYPE.MX, MX(host.rstrip(".") + ".", preference))

    def null_mx(self, domain: str) -> None:
        """RFC 7505: ``MX 0 .``"""
        self._add(domain, QTYPE.MX, MX(".", 0))

    def a(self, name: str, address: str) -> None:
        self._add(name, QTYPE.AAAA if ":" in address else QTYPE.A,
                  AAAA(address) if ":" in address else A(address))

    def txt(self, name: str, text: str) -> None:
        self._add(name, QTYPE.TXT, TXT(text))

    def clear(self, name: str, rtype: str) -> None:
        with self._lock:
            key = self._key(name)
            self._records[key] = [
                r for r in self._records.get(key, []) if QTYPE[r.rtype] != rtype
            ]

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).lower()
        with self._lock:
            records = self._records.get(name)
            if records is None:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            for rr in records:
                if rr.rtype == request.q.qtype:
                    reply.add_answer(rr)
        return reply


def _free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            try:
                tcp.bind((host, port))
            except OSError:
                continue
            return port
        finally:
            udp.close()
            tcp.close()
    raise RuntimeError("no free port for UDP and TCP")


class LocalDns:
    """A DNS server for ``zone`` on 127.0.0.1 (UDP and TCP), in threads."""

    def __init__(self, zone: Zone | None = None) -> None:
        self.zone = zone or Zone()
        self.port = _free_udp_tcp_port()
        quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data",
                          prefix=False, logf=lambda _s: None)
        self._servers = [
            DNSServer(self.zone, address="127.0.0.1", port=self.port, tcp=tcp, logger=quiet)
            for tcp in (False, True)
        ]

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LocalDns:
        for server in self._servers:
            server.start_thread()
        return self

    def stop(self) -> None:
        # socketserver's shutdown() waits for a 0.5 s poll: stop both servers at once.
        stoppers = [threading.Thread(target=s.stop) for s in self._servers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for server in self._servers:
            server.server.server_close()

    def __enter__(self) -> LocalDns:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- TLS helpers -----------------------------------------------------------------------
def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server context with a certificate for ``names`` from ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


# -- receiving SMTP servers -------------------------------------------------------------
@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    mail_options: list[str]
    tls: bool


class _Handler:
    def __init__(self, receiver: Receiver) -> None:
        self.r = receiver

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self.r.rcpt_replies.get(address.lower())
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        if self.r.data_reply is not None:
            return self.r.data_reply
        content = envelope.original_content or b""
        self.r.messages.append(Received(
            envelope.mail_from or "", list(envelope.rcpt_tos), bytes(content),
            list(envelope.mail_options), session.ssl is not None,
        ))
        return "250 2.0.0 OK: queued"

    async def handle_RSET(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        self.r.rsets += 1
        return "250 2.0.0 OK"


class _SMTP(SMTP):  # type: ignore[misc]
    """aiosmtpd's SMTP with counters and an optional STARTTLS response injection."""

    def __init__(self, handler: Any, *, receiver: Receiver, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._receiver = receiver

    def connection_made(self, transport: Any) -> None:
        if self._original_transport is None:  # not the second call after STARTTLS
            self._receiver.connections += 1
        super().connection_made(transport)

    async def push(self, status: Any) -> None:
        greeting = self._receiver.greeting
        if greeting and isinstance(status, str) and status.startswith(f"220 {self.hostname}"):
            status = greeting
        inject = self._receiver.inject_after_starttls
        if inject and isinstance(status, str) and status.startswith("220 Ready to start TLS"):
            # In the same write as the 220, as a man in the middle would send them.
            self._writer.write(status.encode() + b"\r\n" + inject)
            await self._writer.drain()
            return
        await super().push(status)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._receiver.refuse_starttls:
            await self.push(self._receiver.refuse_starttls)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        self._receiver.auth_attempts += 1
        await super().smtp_AUTH(arg)


class _Controller(Controller):  # type: ignore[misc]
    def __init__(self, receiver: Receiver, **kwargs: Any) -> None:
        self._receiver = receiver
        super().__init__(_Handler(receiver), **kwargs)

    def factory(self) -> SMTP:
        return _SMTP(self.handler, receiver=self._receiver, **self.SMTP_kwargs)


@dataclass
class Receiver:
    """An aiosmtpd server on ``address:port`` named ``name``.

    ``starttls``: a server context to offer STARTTLS with; ``implicit_tls``: TLS from the
    first byte instead. ``rcpt_replies`` maps a recipient to the reply it gets
    (``"451 4.2.0 try later"``); ``data_reply`` replaces the final reply; ``greeting``
    replaces the 220 greeting (``"554 5.3.2 go away"``); ``refuse_starttls`` is the reply
    to STARTTLS instead of 220 (``"454 4.7.0 TLS not available"``).
    """

    address: str
    port: int
    name: str = "mx.remote.test"
    starttls: ssl.SSLContext | None = None
    implicit_tls: ssl.SSLContext | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    inject_after_starttls: bytes = b""
    greeting: str | None = None
    refuse_starttls: str | None = None
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    rsets: int = 0
    auth_attempts: int = 0
    _controller: _Controller | None = None

    def start(self) -> Receiver:
        kwargs: dict[str, Any] = {
            "hostname": self.address, "port": self.port, "server_hostname": self.name,
            "ready_timeout": 10,
        }
        if self.starttls is not None:
            kwargs.update(tls_context=self.starttls, require_starttls=False)
        if self.implicit_tls is not None:
            kwargs["ssl_context"] = self.implicit_tls
        self._controller = _Controller(self, **kwargs)
        self._controller.start()
        self.connections = 0  # the controller's own readiness probe is not a client
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- MTA-STS ---------------------------------------------------------------------------
class MtaStsServer:
    """HTTPS on ``address:port`` with a certificate for ``mta-sts.<domain>`` of every
    domain given; serves ``policies[domain]`` as text/plain, 404 otherwise."""

    def __init__(self, ca: trustme.CA, address: str, port: int, domains: list[str]) -> None:
        self.address = address
        self.port = port
        self.policies: dict[str, str] = {}
        self.fetches = 0
        self._ctx = server_context(ca, *(f"mta-sts.{d}" for d in domains))
        self._runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        host = request.host.split(":")[0].lower()
        domain = host.removeprefix("mta-sts.")
        if domain not in self.policies:
            return web.Response(status=404)
        return web.Response(text=self.policies[domain], content_type="text/plain")

    async def start(self) -> MtaStsServer:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.address, self.port, ssl_context=self._ctx).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def sts_policy(mode: str, *mx: str, max_age: int = 86400) -> str:
    """An RFC 8461 §3.2 policy file."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx),
             f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


# -- one test's world ------------------------------------------------------------------
class Remote:
    """A DNS server, receivers on one shared port, and a way to build a ``Deliverer``.

    ``port`` is the ``mx_port`` every receiver added with ``add_mx`` listens on.
    """

    def __init__(self, ca: trustme.CA, ca_file: Path, tmp_path: Path) -> None:
        self.ca = ca
        self.ca_file = ca_file
        self.tmp_path = tmp_path
        self.dns = LocalDns()
        self.port = _free_udp_tcp_port("127.0.0.2")
        self.receivers: list[Receiver] = []
        self._sts: MtaStsServer | None = None
        self._deliverers: list[Deliverer] = []

    @property
    def zone(self) -> Zone:
        return self.dns.zone

    def add_mx(
        self, domain: str, host: str, address: str, preference: int = 10, *,
        starttls: bool = True, cert_names: tuple[str, ...] | None = None,
        start: bool = True, **receiver: Any,
    ) -> Receiver:
        """An MX record for ``domain``, an A record for ``host`` and (``start``) a running
        receiver there, offering STARTTLS with a certificate for ``cert_names`` (default:
        the host name) unless ``starttls`` is false."""
        self.zone.mx(domain, preference, host)
        self.zone.a(host, address)
        ctx = server_context(self.ca, *(cert_names or (host,))) if starttls else None
        r = Receiver(address, self.port, name=host, starttls=ctx, **receiver)
        if start:
            r.start()
            self.receivers.append(r)
        return r

    async def mta_sts(self, domain: str, policy: str, *, policy_id: str = "1",
                      address: str = "127.0.0.50") -> MtaStsServer:
        """Publish ``_mta-sts.<domain>`` TXT and serve ``policy`` over HTTPS."""
        if self._sts is None:
            self._sts = await MtaStsServer(
                self.ca, address, _free_udp_tcp_port(address), [domain]
            ).start()
        self._sts.policies[domain] = policy
        self.zone.txt(f"_mta-sts.{domain}", f"v=STSv1; id={policy_id}")
        self.zone.a(f"mta-sts.{domain}", self._sts.address)
        return self._sts

    def config(self, **outbound: Any) -> Config:
        cert, key = write_cert(self.ca, self.tmp_path / "sender-tls", "out.sender.test")
        base = OutboundConfig(mx_port=self.port, ca_file=self.ca_file, connect_timeout=5.0,
                              mta_sts_port=self._sts.port if self._sts else 443)
        return Config(
            path=self.tmp_path / "postkeep.toml", hostname="out.sender.test",
            data_dir=self.tmp_path / "data", tls=TlsConfig(cert=cert, key=key),
            dns=DnsConfig(nameservers=(self.dns.nameserver,), timeout=3.0),
            outbound=replace(base, **outbound),
        )

    def deliverer(self, *, relay_password: str | None = None, **outbound: Any) -> Deliverer:
        config = self.config(**outbound)
        d = Deliverer(
            config=config, resolver=DnsResolver(config.dns),
            tls=TlsPolicy(config.tls, hostname=config.hostname),
            relay_password=relay_password, timeouts=TEST_TIMEOUTS,
        )
        self._deliverers.append(d)
        return d

    def __enter__(self) -> Remote:
        self.dns.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for r in self.receivers:
            r.stop()
        self.dns.stop()

    async def aclose(self) -> None:
        """Close deliverers and the HTTPS server (call before leaving the ``with``)."""
        for d in self._deliverers:
            await d.close()
        if self._sts is not None:
            await self._sts.stop()
        await asyncio.sleep(0)
