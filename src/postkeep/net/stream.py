"""Our own byte stream over an asyncio transport, with STARTTLS that leaves nothing behind.

We do not use ``asyncio.StreamReader``: its buffer is private, and on CPython 3.11 bytes a
client pipelined after ``STARTTLS`` stay in it and are read back as if they had come over
TLS (the CVE-2011-0411 class; aiosmtpd CVE-2024-34083). Here the buffer is ours:
``take_buffer()`` hands every unread byte to the caller, who drops and logs it, before
``start_tls()`` begins the handshake.

Invariants:
- The read buffer never holds more than ``max_buffer`` bytes plus one ``data_received``
  chunk: above the mark, reading from the socket pauses until the driver consumes.
- After ``start_tls()`` returns, every byte ``read()`` yields came through TLS.
- ``read()`` returns ``b""`` only at end of stream; a timeout raises ``TimeoutError``;
  an idle read interrupted by shutdown raises ``ShuttingDown``.
- Writes honour transport flow control: ``drain()`` waits while the peer is slow.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from postkeep import log
from postkeep.tls.policy import TlsContext, describe

logger = log.get_logger("net")

DEFAULT_MAX_BUFFER = 256 * 1024


class ShuttingDown(Exception):
    """The server is stopping and this connection was waiting for a new command."""


class Stream(asyncio.Protocol):
    def __init__(self, *, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self._loop = asyncio.get_running_loop()
        self._max_buffer = max_buffer
        self._buffer = bytearray()
        self._eof = False
        self._lost = False
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed = self._loop.create_future()
        self._idle = False
        self._interrupted = False
        self.tls_active = False

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.tls_active = transport.get_extra_info("ssl_object") is not None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= self._max_buffer and not self._reading_paused:
            self._pause()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        self._wake()
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    # -- reading ----------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.pause_reading()
        self._reading_paused = True

    def pause_reading(self) -> None:
        """Stop reading from the socket: bytes not yet read stay in the kernel."""
        self._pause()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and not self._lost:
            self._reading_paused = False
            self._transport.resume_reading()

    async def read(self, timeout: float | None = None, *, idle: bool = False) -> bytes:
        """Everything buffered, waiting for at least one byte; ``b""`` at end of stream.

        ``idle`` marks a wait between commands, which a shutdown may interrupt.
        """
        while not self._buffer and not self._eof:
            if idle and self._interrupted:
                raise ShuttingDown
            self.resume_reading()
            self._waiter = self._loop.create_future()
            self._idle = idle
            try:
                await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
                self._idle = False
            if idle and self._interrupted and not self._buffer:
                raise ShuttingDown
        data = bytes(self._buffer)
        self._buffer.clear()
        if not self._eof:
            self.resume_reading()
        return data

    def take_buffer(self) -> bytes:
        """Remove and return every unread byte (used to discard plaintext before TLS)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def interrupt_idle(self) -> None:
        """Ask a connection waiting between commands to stop (graceful shutdown)."""
        self._interrupted = True
        if self._idle:
            self._wake()

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    # -- writing ----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._lost and not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self._lost:
            fut = self._loop.create_future()
            self._drain_waiters.append(fut)
            await fut

    # -- TLS --------------------------------------------------------------------------
    async def start_tls(self, ctx: TlsContext, timeout: float = 30.0) -> None:
        """Upgrade to TLS as the server. The caller must have taken the buffer first."""
        assert self._transport is not None
        assert not self._buffer, "unread plaintext must be discarded before the handshake"
        # loop.start_tls pauses the raw transport, inserts the TLS layer and resumes
        # reading itself; bytes still in the kernel belong to the handshake.
        self._reading_paused = False
        new = await self._loop.start_tls(
            self._transport, self, ctx, server_side=True, ssl_handshake_timeout=timeout
        )
        assert isinstance(new, asyncio.Transport)
        self._transport = new
        self.tls_active = True

    async def start_tls_client(
        self, ctx: TlsContext, server_hostname: str, timeout: float = 30.0
    ) -> None:
        """Upgrade to TLS as the client (outbound STARTTLS), the mirror of ``start_tls``.

        The caller must have taken the buffer first: bytes the server sent after its 220
        are dropped, never read as if they had come through TLS (response injection).
        ``server_hostname`` is sent as SNI and, if ``ctx`` checks names, verified.
        """
        assert self._transport is not None
        assert not self._buffer, "unread plaintext must be discarded before the handshake"
        self._reading_paused = False
        new = await self._loop.start_tls(
            self._transport, self, ctx, server_side=False, server_hostname=server_hostname,
            ssl_handshake_timeout=timeout,
        )
        assert isinstance(new, asyncio.Transport)
        self._transport = new
        self.tls_active = True

    # -- info and closing -------------------------------------------------------------
    def extra(self, name: str) -> Any:
        return None if self._transport is None else self._transport.get_extra_info(name)

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        obj = self.extra("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        except TimeoutError:
            self.abort()


async def upgrade(
    stream: Stream, *, go_ahead: bytes, forget: Callable[[], bytes], ctx: TlsContext,
    protocol: str,
) -> bool:
    """The STARTTLS/STLS upgrade, the same four steps for every protocol (STYLE.md).

    ``go_ahead`` is the core's rendered "ready for TLS" reply; ``forget`` is the core's
    ``start_tls()``, which drops what the core had buffered and resets its state. Returns
    False when the handshake fails (the caller closes the connection).
    """
    stream.pause_reading()  # 1. nothing more is read as plaintext
    stream.write(go_ahead)  # 2. the go-ahead: a real client sends its ClientHello only now
    # 3. Anything already read was sent before the go-ahead: hostile or broken, never a
    #    command (RFC 3207 §4.2, RFC 2595 §3.1/§4; CVE-2011-0411). Discard and log it.
    dropped = forget() + stream.take_buffer()
    if dropped:
        logger.warning(f"{protocol}.starttls.plaintext_dropped", extra={"bytes": len(dropped)})
    try:
        await stream.start_tls(ctx)  # 4. loop.start_tls(); it resumes reading itself
    except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
        logger.info("tls.handshake.failed", extra={"error": type(exc).__name__})
        return False
    obj = stream.ssl_object
    if obj is not None:
        log.bind(tls=describe(obj))
    logger.info(f"{protocol}.starttls.ok")
    return True
