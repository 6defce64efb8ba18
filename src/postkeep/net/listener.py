"""Listeners: bind one service to one address in one security mode, accept, hand off.

We run our own accept loop instead of ``loop.create_server(ssl=…)`` so that, before any
TLS layer exists, we can look at (peek, never consume) a new connection's first bytes:

- On an implicit-TLS port (465/993/995) a client that speaks plaintext first, or waits
  for a greeting that never comes, gets one plaintext line naming the right setting,
  instead of a handshake error its user cannot read.
- On a STARTTLS port given ``sniff`` seconds (587/143/110, ``[security] tls_sniff_ms``;
  never 25) we wait that long before the plaintext greeting. A TLS ClientHello (a mail
  program set to SSL/TLS) is served exactly as on the implicit-TLS port: the same
  context, the greeting after the handshake. A silent client gets the greeting, late by
  at most ``sniff``. Bytes that are not TLS, received before the greeting, are answered
  with the protocol's error (``pregreet_error``) and the connection closes.

Invariants:
- Connection limits (in total and per client IP) are counted here, for every service.
- The handler runs with ``cid``, ``service`` and ``peer`` bound in the logging context.
- Only this module and ``stream.py`` touch sockets; TLS contexts come from ``tls.policy``
  per connection, so a reloaded certificate serves the next connection.
- Every connection, however it ends, releases its slot and closes its socket.
- The first-bytes outcome of a sniffed connection is logged once (``conn.first_bytes``)
  and counted once; nothing is consumed from the socket before TLS or the core reads it.
- ``ConnInfo.mode`` is the listener's mode; ``tls_sniffed`` says that a STARTTLS port's
  connection is TLS from the first byte (the core then neither offers nor needs STARTTLS).
- With ``proxy_trusted`` set (``[proxy_protocol]``), a PROXY v1/v2 header is read before
  anything else — before the first-bytes sniff and the TLS handshake — and exactly to its
  end, never into the ClientHello or the first command. A connection from outside the
  trusted networks, or without a valid header in time, is closed (``conn.proxy.refused``)
  before it takes a slot. Otherwise the client address in the header is ``peer`` for
  the connection limits, the auth throttle, the Received header and every log line, and
  the load balancer's address is logged as ``via``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from postkeep import log
from postkeep.config.schema import Address, Mode, Service
from postkeep.net.proxy import HeaderReader, ProxyError, ProxyHeader
from postkeep.net.stream import Stream
from postkeep.tls.policy import TlsContext, describe

logger = log.get_logger("net")

TLS_HANDSHAKE_RECORD = 0x16  # RFC 8446 §5.1: ContentType handshake(22)
HANDSHAKE_TIMEOUT = 30.0
#: Above the configured limits by this factor, connections are dropped without a reply.
HARD_LIMIT_FACTOR = 2
#: Seconds a trusted load balancer has to send the PROXY header (it sends it at connect).
PROXY_HEADER_TIMEOUT = 5.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class ConnInfo:
    service: Service
    mode: Mode
    peer_ip: str
    peer_port: int
    cid: str
    over_limit: bool = False  # the handler must refuse politely (421 / BYE / -ERR) and close
    tls_sniffed: bool = False  # STARTTLS port, but the client sent a ClientHello first
    via: str | None = None  # the load balancer's address, when a PROXY header named the peer
    started: float = field(default_factory=time.monotonic)


Handler = Callable[[Stream, ConnInfo], Awaitable[None]]


class ConnectionMetrics(Protocol):
    """What a listener reports for metrics (``web.metrics.Metrics`` implements it)."""

    def connection_opened(self, service: Service, tls_version: str | None) -> None: ...
    def connection_upgraded(self, service: Service, tls_version: str | None) -> None: ...
    def first_bytes(self, service: Service, outcome: str) -> None: ...


@dataclass(slots=True)
class ConnectionLimits:
    total: int = 1000
    per_ip: int = 100


class ConnectionTracker:
    """Counts open connections across all listeners and finds them again at shutdown."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_ip: dict[str, int] = {}
        self.streams: set[Stream] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def acquire(self, ip: str) -> tuple[bool, bool]:
        """Take a slot. Returns (over_soft_limit, over_hard_limit)."""
        self.total += 1
        n = self.per_ip.get(ip, 0) + 1
        self.per_ip[ip] = n
        over = self.total > self.limits.total or n > self.limits.per_ip
        hard = (
            self.total > self.limits.total * HARD_LIMIT_FACTOR
            or n > self.limits.per_ip * HARD_LIMIT_FACTOR
        )
        return over, hard

    def release(self, ip: str) -> None:
        self.total -= 1
        n = self.per_ip.get(ip, 1) - 1
        if n:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)


class Listener:
    def __init__(
        self,
        *,
        service: Service,
        mode: Mode,
        address: Address,
        handler: Handler,
        tracker: ConnectionTracker,
        tls: Callable[[], TlsContext] | None = None,
        plaintext_hint: bytes = b"",
        hint_timeout: float = 5.0,
        sniff: float = 0.0,
        pregreet_error: bytes = b"",
        metrics: ConnectionMetrics | None = None,
        proxy_trusted: tuple[Network, ...] | None = None,
        proxy_timeout: float = PROXY_HEADER_TIMEOUT,
    ) -> None:
        if mode is Mode.IMPLICIT and tls is None:
            raise ValueError("an implicit-TLS listener needs a TLS context")
        if sniff > 0 and (mode is not Mode.STARTTLS or tls is None or not pregreet_error):
            raise ValueError("sniffing is for STARTTLS listeners, with TLS and an error line")
        self.service = service
        self.mode = mode
        self.address = address
        self._handler = handler
        self._tracker = tracker
        self._tls = tls
        self.plaintext_hint = plaintext_hint
        self._hint_timeout = hint_timeout
        self.sniff = sniff
        self.pregreet_error = pregreet_error
        self._metrics = metrics
        # None: no PROXY protocol. Otherwise every connection must come from one of these
        # networks and start with a PROXY header.
        self.proxy_trusted = proxy_trusted
        self._proxy_timeout = proxy_timeout
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "[::]" means IPv6 only; list "0.0.0.0" separately for IPv4.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((self.address.host, self.address.port))
            sock.listen(512)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def start(self) -> None:
        if self._sock is None:
            self.bind()
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())
        logger.info(
            "listener.started",
            extra={"service": self.service.value, "mode": self.mode.value,
                   "address": f"{self.address.host}:{self.port}"},
        )

    async def stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: back off, don't spin
                logger.error("listener.accept_failed", extra={"error": str(exc)})
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, which an
            # accepted socket of ours is not; without it, Nagle holds back the second of two
            # pipelined replies until the client's delayed ACK (40 ms per round trip).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._serve(conn, str(addr[0]), int(addr[1])))
            self._tracker.tasks.add(task)
            task.add_done_callback(self._tracker.tasks.discard)

    async def _serve(self, conn: socket.socket, ip: str, port: int) -> None:
        info = ConnInfo(self.service, self.mode, ip, port, secrets.token_hex(6))
        log.bind(cid=info.cid, service=self.service.value, peer=ip)
        if self.proxy_trusted is not None:
            try:
                header = await self._proxy_header(conn, ip)
            except ProxyError as exc:
                logger.info("conn.proxy.refused", extra={"reason": str(exc)})
                conn.close()
                return
            except BaseException:  # cancelled at shutdown
                conn.close()
                raise
            if header.source is not None:
                info.via = ip
                ip, port = header.source
                info.peer_ip, info.peer_port = ip, port
                log.bind(peer=ip, via=info.via)
        over, hard = self._tracker.acquire(ip)
        stream: Stream | None = None
        try:
            if hard:
                logger.warning("conn.refused", extra={"reason": "connection limit"})
                conn.close()
                return
            info.over_limit = over
            tls = self.mode is Mode.IMPLICIT
            if self.mode is Mode.IMPLICIT or self.sniff > 0:
                implicit = self.mode is Mode.IMPLICIT
                verdict = await self._sniff(conn, self._hint_timeout if implicit else self.sniff)
                self._first_bytes(verdict)
                if verdict == "closed":
                    conn.close()
                    return
                if implicit and verdict != "tls":
                    await self._send_and_close(conn, self.plaintext_hint)
                    return
                if verdict == "plaintext":
                    await self._send_and_close(conn, self.pregreet_error)
                    return
                if not implicit and verdict == "tls":
                    # A client set to SSL/TLS on a STARTTLS port: serve it as the
                    # implicit-TLS port of this protocol would. No RFC asks for this; it
                    # mistakes no plaintext client, as no command starts with byte 0x16
                    # (RFC 8446 §5.1 handshake record).
                    info.tls_sniffed = tls = True
            stream = await self._make_stream(conn, tls=tls)
            if stream is None:
                return
            self._tracker.streams.add(stream)
            obj = stream.ssl_object
            if obj is not None:
                log.bind(tls=describe(obj))
            logger.info("conn.open")
            if self._metrics is not None:
                self._metrics.connection_opened(self.service, obj.version() if obj else None)
            await self._handler(stream, info)
        except Exception:
            logger.exception("conn.crashed")
        finally:
            self._tracker.release(ip)
            if stream is not None:
                self._tracker.streams.discard(stream)
                starttls = self.mode is Mode.STARTTLS and not info.tls_sniffed
                upgraded = stream.ssl_object if starttls else None
                if self._metrics is not None and upgraded is not None:
                    self._metrics.connection_upgraded(self.service, upgraded.version())
                stream.close()
                await stream.wait_closed()
            else:
                conn.close()
            logger.info(
                "conn.close", extra={"duration": f"{time.monotonic() - info.started:.3f}"}
            )

    async def _make_stream(self, conn: socket.socket, *, tls: bool) -> Stream | None:
        loop = asyncio.get_running_loop()
        ctx = self._tls() if tls and self._tls is not None else None
        try:
            _, proto = await loop.connect_accepted_socket(
                Stream,
                conn,
                ssl=ctx,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if ctx is not None else None,
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            logger.info("tls.handshake.failed", extra={"error": _ssl_reason(exc)})
            conn.close()
            return None
        assert isinstance(proto, Stream)
        return proto

    async def _proxy_header(self, conn: socket.socket, ip: str) -> ProxyHeader:
        """Read the PROXY header off the raw socket, exactly to its end.

        Each round peeks, lets the reader say how many of the peeked bytes are header, and
        receives only those: what follows (a ClientHello, a command) stays in the kernel.
        """
        if not _trusted(ip, self.proxy_trusted or ()):
            raise ProxyError(f"{ip} is not in the trusted networks of [proxy_protocol]")
        loop = asyncio.get_running_loop()
        reader = HeaderReader()
        deadline = loop.time() + self._proxy_timeout
        while reader.header is None:
            if not await _readable(conn, deadline - loop.time()):
                raise ProxyError(f"no complete PROXY header within {self._proxy_timeout:g}s")
            try:
                peeked = conn.recv(reader.wanted(), socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ProxyError(f"connection failed: {exc.strerror or exc}") from None
            if not peeked:
                raise ProxyError("connection closed before the PROXY header ended")
            n = reader.consume(peeked)
            try:
                got = conn.recv(n)  # already in the kernel buffer: exactly n bytes
            except OSError as exc:
                raise ProxyError(f"connection failed: {exc.strerror or exc}") from None
            if got != peeked[:n]:
                raise ProxyError("the PROXY header changed between peek and read")
        return reader.header

    def _first_bytes(self, verdict: str) -> None:
        logger.info("conn.first_bytes", extra={"outcome": verdict})
        if self._metrics is not None:
            self._metrics.first_bytes(self.service, verdict)

    async def _sniff(self, conn: socket.socket, timeout: float) -> str:
        """Peek at the first byte: "tls", "plaintext", "silent" or "closed".

        Nothing is consumed: the byte stays for the TLS layer (or is never read at all).
        """
        if not await _readable(conn, timeout):
            return "silent"
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except OSError:
            return "closed"
        if not first:
            return "closed"
        return "tls" if first[0] == TLS_HANDSHAKE_RECORD else "plaintext"

    async def _send_and_close(self, conn: socket.socket, line: bytes) -> None:
        """Write one plaintext line (a hint or an error), then close without a reset."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(loop.sock_sendall(conn, line), 2.0)
            # Half-close, then read what the client had sent, so that our close does not
            # become a reset that destroys the hint before the client reads it.
            conn.shutdown(socket.SHUT_WR)
            deadline = loop.time() + 1.0
            received = 0
            while received < 65536 and loop.time() < deadline:
                chunk = await asyncio.wait_for(loop.sock_recv(conn, 4096), deadline - loop.time())
                if not chunk:
                    break
                received += len(chunk)
        conn.close()


def _trusted(ip: str, networks: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)


async def _readable(conn: socket.socket, timeout: float) -> bool:
    """Wait until the socket has bytes (or EOF) to read; False on timeout."""
    if timeout <= 0:
        return False
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(ready, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return type(exc).__name__
