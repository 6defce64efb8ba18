"""The probe's side of a connection: bytes over TCP, then TLS, with a buffer that is ours.

``net.stream.Stream`` is the server side; this is its client mirror image, small and with a
deadline on every step, because a probe must never hang on a silent or hostile server.
Like ``Stream`` (and unlike ``asyncio.StreamReader``) the read buffer is ours, so after the
server's go-ahead for STARTTLS the caller can *take* every byte the server sent before the
handshake and report it instead of reading it as if it had come over TLS.

Invariants:
- Every wait has a timeout: ``connect``, ``read`` and ``start_tls`` raise ``TimeoutError``.
- ``start_tls`` refuses to run while unread plaintext is buffered (the caller must take it).
- Contexts come from ``tls.policy`` only; this module never configures TLS.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from postkeep.tls.policy import TlsContext

#: The most a probe buffers from one server; a greeting or a capability list is far less.
MAX_BUFFER = 256 * 1024


class WireError(Exception):
    """The server sent more than ``MAX_BUFFER`` or something else impossible to probe."""


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_BUFFER and self._transport is not None:
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- use --------------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        timeout: float,
        ctx: TlsContext | None = None,
        server_hostname: str | None = None,
    ) -> Connection:
        """Connect (and, with ``ctx``, handshake: implicit TLS) within ``timeout``."""
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if ctx is not None:
            kwargs = {
                "ssl": ctx,
                "server_hostname": server_hostname or "",
                "ssl_handshake_timeout": timeout,
            }
        _, proto = await asyncio.wait_for(
            loop.create_connection(cls, host, port, **kwargs), timeout
        )
        return proto

    async def read(self, timeout: float) -> bytes:
        """Everything buffered, waiting up to ``timeout`` for one byte; ``b""`` at EOF."""
        while not self._buffer and not self._eof:
            self._waiter = self._loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
        if len(self._buffer) > MAX_BUFFER:
            raise WireError(f"the server sent more than {MAX_BUFFER} bytes at once")
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._transport is not None and not self._eof:
            self._transport.resume_reading()
        return data

    def take_buffer(self) -> bytes:
        """Remove and return every unread byte (plaintext the server sent after its go-ahead)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def start_tls(
        self, ctx: TlsContext, *, server_hostname: str | None, timeout: float
    ) -> None:
        """Handshake as the client (STARTTLS/STLS). The caller must have taken the buffer."""
        assert self._transport is not None
        if self._buffer:
            raise RuntimeError("unread plaintext must be taken before the handshake")
        new = await self._loop.start_tls(
            self._transport,
            self,
            ctx,
            server_side=False,
            server_hostname=server_hostname or "",
            ssl_handshake_timeout=timeout,
        )
        assert isinstance(new, asyncio.Transport)
        self._transport = new

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        obj = None if self._transport is None else self._transport.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()
