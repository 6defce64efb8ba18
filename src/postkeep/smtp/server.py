"""The asyncio driver of the SMTP server: moves bytes between a ``Stream`` and the core.

The core (``protocol.py``) decides what is legal; the session (``session.py``) decides
policy; this module only reads, writes, upgrades to TLS and keeps time.

Invariants:
- Replies go out in order; output is flushed when the core needs more data (RFC 2920).
  The replies to a pipelined group (MAIL, RCPT..., DATA) are written together: one write,
  one TLS record, one send (RFC 2920 §3.2 asks servers to send the responses to grouped
  MAIL/RCPT/RSET as a unit). No reply is held while waiting to read, and everything
  pending is written before the STARTTLS go-ahead and before closing.
- STARTTLS is the four steps of STYLE.md, in order: stop reading, send 220, drop unread
  plaintext (core and stream), handshake. Nothing read before the handshake is parsed.
- Only this function catches everything: an unexpected exception becomes a generic
  ``421 4.3.0`` (never exception text on the wire) and the connection closes.
- A message is abandoned (never delivered) unless its DataEnd/BdatEnd got a 2xx reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from postkeep import log
from postkeep.net.stream import ShuttingDown, Stream, upgrade
from postkeep.sasl.mechanisms import Credentials
from postkeep.smtp import replies
from postkeep.smtp.protocol import (
    NEED_DATA,
    Bdat,
    BdatEnd,
    ConnectionClosed,
    Data,
    DataAbort,
    DataChunk,
    DataEnd,
    ProtocolError,
    Role,
    SmtpServer,
    StartTls,
)
from postkeep.smtp.session import SmtpSession
from postkeep.tls.policy import TlsContext

logger = log.get_logger("smtp")

SHUTTING_DOWN = replies.reply(421, "4.3.2", "Server shutting down, please try again later")


async def serve(
    stream: Stream,
    core: SmtpServer,
    session: SmtpSession,
    *,
    tls_context: Callable[[], TlsContext] | None,
    idle_timeout: float,
    data_timeout: float,
    on_plaintext_refused: Callable[[], None] | None = None,
    on_leaked: Callable[[Credentials], Awaitable[None]] | None = None,
) -> None:
    """Serve one connection. ``on_plaintext_refused`` is called each time the core refuses
    AUTH or mail on submission because TLS has not started (the 530 5.7.0 naming the
    settings to use), for metrics.
    ``on_leaked`` is awaited with the credentials of a refused command that carried them
    before TLS, after the refusal is on its way (auth/exposure.py)."""
    in_data = False
    data_deadline = 0.0
    loop = asyncio.get_running_loop()
    pending: list[bytes] = []  # replies not written yet, in order

    def flush() -> None:
        data = b"".join(pending)
        pending.clear()
        if data:
            stream.write(data)

    try:
        stream.write(core.greet())
        while True:
            try:
                event = core.next_event()
            except ProtocolError as exc:
                pending.append(core.send(exc.hint))
                if on_plaintext_refused is not None and _before_tls(core, exc.hint.code):
                    on_plaintext_refused()
                if exc.leaked is not None and on_leaked is not None:
                    flush()
                    await stream.drain()  # the 530 goes out whatever the password was
                    await on_leaked(exc.leaked)
                if exc.hint.closes:
                    logger.info("smtp.closed_by_error", extra={"code": exc.hint.code})
                    break
                continue
            if event is NEED_DATA:
                flush()  # RFC 2920 §3.2: never wait for input with replies held back
                await stream.drain()
                if in_data:
                    timeout = max(0.0, min(idle_timeout, data_deadline - loop.time()))
                else:
                    timeout = idle_timeout
                try:
                    data = await stream.read(timeout, idle=not in_data)
                except TimeoutError:
                    logger.info("smtp.timeout", extra={"in_data": in_data})
                    stream.write(replies.TIMEOUT.render())
                    break
                except ShuttingDown:
                    stream.write(SHUTTING_DOWN.render())
                    break
                if data:
                    logger.log(log.TRACE, "smtp.recv", extra={"bytes": len(data)})
                core.receive_data(data)
                continue
            match event:
                case DataChunk(data=chunk):
                    session.data_chunk(chunk)
                    continue
                case ConnectionClosed():
                    session.abandon()
                    logger.info("smtp.client_disconnected", extra={"in_data": in_data})
                    break
                case StartTls():
                    assert tls_context is not None, "the core offers STARTTLS only with TLS"
                    flush()  # earlier replies go before the go-ahead, in plaintext
                    if not await upgrade(stream, go_ahead=core.send(replies.READY_FOR_TLS),
                                         forget=core.start_tls, ctx=tls_context(),
                                         protocol="smtp"):
                        break
                    session.tls_started(stream)
                    continue
                case Data():
                    reply = await session.handle(event)
                    in_data = reply.code == 354
                    data_deadline = loop.time() + data_timeout
                case DataEnd() | BdatEnd() | DataAbort():
                    reply = await session.handle(event)
                    in_data = False
                case Bdat():
                    reply = await session.handle(event)
                    in_data = True
                    data_deadline = loop.time() + data_timeout
                case _:
                    reply = await session.handle(event)
            pending.append(core.send(reply))
            if reply.closes:
                break
    except Exception:
        logger.exception("smtp.session.crashed")
        session.abandon()
        pending.append(replies.TEMP_ERROR.render())
    flush()
    await stream.drain()


def _before_tls(core: SmtpServer, code: int) -> bool:
    """A 530 on submission before TLS is the core's "STARTTLS first" (its TLS guard comes
    before the AUTH-required one: RFC 3207 §4, RFC 6409 §4.3)."""
    return code == 530 and core.role is Role.SUBMISSION and not core.tls_active
