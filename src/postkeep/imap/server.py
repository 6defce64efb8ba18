"""The asyncio driver of the IMAP server: moves bytes between a ``Stream`` and the core.

The core (``protocol.py``) decides what is legal; the session (``session.py``) decides
policy and talks to the store; this module only reads, writes (streaming message bytes
from the store), upgrades to TLS, keeps time, and runs IDLE.

Timers (RFC 3501 §5.4, RFC 2177 §3):

- Before login, a connection silent for ``preauth_timeout`` (the config's
  ``[limits] idle_timeout``) is closed; after login the autologout timer is
  :data:`AUTOLOGOUT`, 30 minutes, the least RFC 3501 §5.4 allows.
- IDLE re-arms it: an idling client is expected to be silent, so it is not logged out
  after 30 minutes of silence. Instead we send ``* OK Still here`` every
  :data:`IDLE_KEEPALIVE` seconds (so NAT boxes keep the connection and dead peers are
  found by TCP), and a single IDLE may last :data:`IDLE_MAX`. RFC 2177 §3 advises clients
  to re-issue IDLE at least every 29 minutes; one that does never meets that bound, and
  one that forgets is logged out with ``* BYE`` after twice that.

Invariants:

- Responses go out in order; output is flushed when the core needs more data, and every
  response that carries message bytes is followed by ``drain()`` (chunk by chunk, each
  chunk read in its own short read transaction), so a slow client holds at most
  :data:`BLOB_CHUNK` octets of a message in our buffers and never a store transaction.
- STARTTLS is the four steps of STYLE.md, in order: stop reading, send the tagged OK,
  drop unread plaintext (core and stream), handshake (RFC 9051 §6.2.1, RFC 2595 §3.1).
  Nothing read before the handshake is parsed: ``a STARTTLS\\r\\nb NOOP\\r\\n`` in one
  segment never gets ``b`` answered.
- Only this function catches everything: an unexpected exception becomes a generic
  ``* BYE`` (never exception text on the wire), logged with its traceback, and the
  connection closes. ``session.close()`` runs however the connection ends.
- No TRACE line holds a password, an AUTH payload or message content: only byte counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

from postkeep import log
from postkeep.imap import responses as r
from postkeep.imap.grammar import Event, StartTls
from postkeep.imap.protocol import (
    ConnectionClosed,
    ContinueLiteral,
    ImapServer,
    NeedData,
    ProtocolError,
    Rejected,
    State,
)
from postkeep.imap.responses import BlobSlice, Condition, Continuation, Output, Response
from postkeep.imap.session import ImapSession
from postkeep.net.stream import ShuttingDown, Stream, upgrade
from postkeep.sasl.mechanisms import Credentials
from postkeep.store.api import BlobRef, ReadTx, StorageError, StorageErrorKind, Store
from postkeep.tls.policy import TlsContext

logger = log.get_logger("imap")

#: RFC 3501 §5.4: an autologout timer after login must be at least 30 minutes.
AUTOLOGOUT: Final = 30 * 60.0
#: Seconds between ``* OK Still here`` during IDLE.
IDLE_KEEPALIVE: Final = 120.0
#: Longest single IDLE: twice the 29 minutes after which RFC 2177 §3 tells clients to
#: re-issue it.
IDLE_MAX: Final = 2 * 29 * 60.0
#: Octets of a message read per store transaction and written before each ``drain()``.
BLOB_CHUNK: Final = 256 * 1024
#: A client that reads nothing for this long while we write is gone.
WRITE_TIMEOUT: Final = 300.0

TEXT_AUTOLOGOUT = "Autologout: idle for too long"
TEXT_IDLE_TOO_LONG = "IDLE for too long: re-issue IDLE at least every 29 minutes (RFC 2177)"
TEXT_STILL_HERE = "Still here"
TEXT_SHUTTING_DOWN = "Server shutting down, please reconnect later"
TEXT_INTERNAL_ERROR = "Internal server error, closing connection"
TEXT_BEGIN_TLS = "Begin TLS negotiation now"


class _ClientGone(Exception):
    """The client stopped reading, or the connection is broken mid-response: close."""


class _Writer:
    """Turns responses into bytes through the core and writes them, streaming blobs."""

    def __init__(self, stream: Stream, core: ImapServer, store: Store) -> None:
        self.stream = stream
        self.core = core
        self.store = store

    async def emit(self, item: Response | ContinueLiteral) -> None:
        out = self.core.send(item)
        if any(isinstance(part, BlobSlice) for part in out):
            await self._stream_blobs(out)
        else:
            self.stream.write(b"".join(p for p in out if isinstance(p, bytes)))
        await self.drain()

    async def drain(self) -> None:
        try:
            await asyncio.wait_for(self.stream.drain(), WRITE_TIMEOUT)
        except TimeoutError:
            raise _ClientGone("write timeout") from None

    async def _stream_blobs(self, out: Output) -> None:
        """Write ``out``, reading each blob slice from the store in chunks.

        The first chunk of every slice is read before anything of the response is
        written, so a message expunged (and its bytes freed) since the session read its
        row fails cleanly with ``StorageError`` and nothing is sent. A later chunk can
        fail only if the bytes vanish while we stream them: then the connection closes,
        as the literal we announced cannot be completed.
        """
        firsts: dict[int, bytes] = {}
        async with self.store.read() as tx:
            for i, part in enumerate(out):
                if isinstance(part, BlobSlice):
                    firsts[i] = await _read(tx, part, part.offset, min(part.length, BLOB_CHUNK))
        for i, part in enumerate(out):
            if isinstance(part, bytes):
                self.stream.write(part)
                continue
            first = firsts[i]
            self.stream.write(first)
            done = len(first)
            while done < part.length:
                await self.drain()
                n = min(part.length - done, BLOB_CHUNK)
                try:
                    async with self.store.read() as tx:
                        chunk = await _read(tx, part, part.offset + done, n)
                except StorageError as exc:
                    logger.warning("imap.fetch.vanished", extra={"kind": exc.kind.name})
                    raise _ClientGone("message bytes vanished mid-literal") from exc
                self.stream.write(chunk)
                done += n


async def _read(tx: ReadTx, part: BlobSlice, offset: int, length: int) -> bytes:
    assert isinstance(part.ref, BlobRef), "the session puts BlobRefs in BlobSlices"
    data = await tx.read_blob(part.ref, offset, length)
    if len(data) != length:
        # The row said the message has more bytes than the blob holds: never send a
        # literal shorter than announced.
        raise StorageError(StorageErrorKind.EXPUNGED, "blob shorter than its row says")
    return data


async def serve(
    stream: Stream,
    core: ImapServer,
    session: ImapSession,
    store: Store,
    *,
    tls_context: Callable[[], TlsContext] | None,
    preauth_timeout: float,
    on_plaintext_refused: Callable[[], None] | None = None,
    on_leaked: Callable[[Credentials], Awaitable[None]] | None = None,
) -> None:
    """Serve one connection. ``on_plaintext_refused`` is called each time the core refuses
    LOGIN or AUTHENTICATE with ``NO [PRIVACYREQUIRED]`` because TLS has not started.
    ``on_leaked`` is awaited with the credentials of a refused command that carried them
    before TLS, after the refusal is on its way (auth/exposure.py)."""
    writer = _Writer(stream, core, store)
    pending: Event | NeedData | None = None
    try:
        stream.write(core.greet())
        while True:
            if pending is not None:
                event, pending = pending, None
            else:
                try:
                    event = core.next_event()
                except ProtocolError as exc:
                    await writer.emit(exc.hint)
                    logger.info("imap.closed_by_error", extra={"reason": exc.hint.text})
                    break
            if isinstance(event, NeedData):
                await writer.drain()
                authed = core.state not in (State.NOT_AUTHENTICATED, State.AUTHENTICATING)
                try:
                    data = await stream.read(AUTOLOGOUT if authed else preauth_timeout, idle=True)
                except TimeoutError:
                    logger.info("imap.timeout", extra={"state": core.state.name})
                    await writer.emit(r.bye(TEXT_AUTOLOGOUT))
                    break
                except ShuttingDown:
                    await writer.emit(r.bye(TEXT_SHUTTING_DOWN))
                    break
                if data:
                    logger.log(log.TRACE, "imap.recv", extra={"bytes": len(data)})
                core.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                logger.info("imap.client_disconnected", extra={"state": core.state.name})
                break
            if isinstance(event, StartTls):
                assert tls_context is not None, "the core offers STARTTLS only with TLS"
                go_ahead = core.send(r.tagged(event.tag, Condition.OK, TEXT_BEGIN_TLS))
                if not await upgrade(stream, go_ahead=_bytes_only(go_ahead),
                                     forget=core.start_tls, ctx=tls_context(),
                                     protocol="imap"):
                    break
                continue
            if on_plaintext_refused is not None and _privacy_required(event):
                on_plaintext_refused()
            reply = await session.handle(event, writer.emit)
            if reply is not None:
                await writer.emit(reply)
            if isinstance(event, Rejected) and event.leaked is not None and on_leaked:
                await stream.drain()  # the NO goes out whatever the password was
                await on_leaked(event.leaked)
            state = core.state
            if state is State.LOGOUT:
                break
            if isinstance(reply, Continuation) and state is State.IDLE:
                pending = await _idle(stream, core, session, writer)
                if pending is None:
                    break
    except _ClientGone as exc:
        logger.info("imap.client_gone", extra={"reason": str(exc)})
        stream.abort()
    except Exception:
        logger.exception("imap.session.crashed")
        # Whatever the core expected, an untagged BYE is always legal (RFC 3501 §7.1.5).
        stream.write(r.encode_bytes(r.bye(TEXT_INTERNAL_ERROR)))
    finally:
        session.close()
    try:
        await asyncio.wait_for(stream.drain(), 5.0)
    except TimeoutError:
        stream.abort()


async def _idle(
    stream: Stream, core: ImapServer, session: ImapSession, writer: _Writer
) -> Event | None:
    """Between ``+ idling`` and the client's DONE (RFC 2177 §3).

    Reports mailbox changes as they are committed, says ``* OK Still here`` every
    :data:`IDLE_KEEPALIVE` seconds, and returns the event that ends the IDLE (``IdleDone``
    or ``ConnectionClosed``), or ``None`` after a ``* BYE`` (shutdown, :data:`IDLE_MAX`).
    """
    loop = asyncio.get_running_loop()
    ends = loop.time() + IDLE_MAX
    await session.sync(writer.emit, expunge=True)  # what happened before the IDLE
    reader: asyncio.Task[bytes] = loop.create_task(stream.read(None, idle=True))
    watcher: asyncio.Task[bool] | None = None
    watch = True  # False once the change feed ended (store closing) or nothing is selected
    try:
        while True:
            if watcher is None and watch and session.watching:
                watcher = loop.create_task(session.wait_for_changes())
            left = ends - loop.time()
            last_wait = left <= IDLE_KEEPALIVE  # this wait ends at IDLE_MAX, not a keepalive
            waiting = {reader} if watcher is None else {reader, watcher}
            done, _ = await asyncio.wait(
                waiting, timeout=max(0.0, min(IDLE_KEEPALIVE, left)),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if watcher is not None and watcher in done:
                watch = watcher.result()
                watcher = None
                if watch:
                    await session.sync(writer.emit, expunge=True)  # RFC 2177: at any time
                    if core.state is State.LOGOUT:  # the mailbox was deleted: * BYE sent
                        return None
            if reader in done:
                try:
                    data = reader.result()
                except ShuttingDown:
                    await writer.emit(r.bye(TEXT_SHUTTING_DOWN))
                    return None
                if data:
                    logger.log(log.TRACE, "imap.recv", extra={"bytes": len(data)})
                core.receive_data(data)
                try:
                    event = core.next_event()
                except ProtocolError as exc:
                    await writer.emit(exc.hint)
                    return None
                if not isinstance(event, NeedData):
                    return event
                reader = loop.create_task(stream.read(None, idle=True))
            elif not done and last_wait:
                logger.info("imap.idle.too_long")
                await writer.emit(r.bye(TEXT_IDLE_TOO_LONG))
                return None
            elif not done:
                await writer.emit(r.untagged_status(Condition.OK, TEXT_STILL_HERE))
    finally:
        for task in (reader, watcher):
            if task is not None and not task.done():
                task.cancel()


def _privacy_required(event: Event | NeedData) -> bool:
    """The core refused credentials before TLS (RFC 2595 §3.2, RFC 5530 §3)."""
    if not isinstance(event, Rejected) or event.response.code is None:
        return False
    return event.response.code.name == r.CodeName.PRIVACYREQUIRED


def _bytes_only(out: list[bytes | BlobSlice]) -> bytes:
    """Core output that can hold no message data (e.g. a status response)."""
    assert all(isinstance(p, bytes) for p in out)
    return b"".join(p for p in out if isinstance(p, bytes))
