"""The asyncio driver of the POP3 server: moves bytes between a ``Stream`` and the core.

The core (``protocol.py``) decides what is legal; the session (``session.py``) decides
policy and talks to the store; this module only reads, writes, upgrades to TLS, keeps
time and makes sure the session is closed (its maildrop lock released) however the
connection ends.

Invariants:

- Replies go out in order; output is flushed when the core needs more data (RFC 2449
  §6.6 PIPELINING), and after every reply that carries a message (RETR, TOP) the driver
  awaits ``drain()``, so a slow client holds at most one message in our buffers.
- STLS is the four steps of STYLE.md, in order: stop reading, send ``+OK``, drop unread
  plaintext (core and stream), handshake (RFC 2595 §4). Nothing read before the
  handshake is parsed.
- A connection that ends without a QUIT in TRANSACTION (EOF, idle timeout after
  :data:`IDLE_TIMEOUT`, shutdown, handshake failure, crash) never reaches UPDATE, so
  nothing is deleted (RFC 1939 §6); ``session.close()`` runs in every case.
- Only this function catches everything: an unexpected exception becomes a generic
  ``-ERR [SYS/TEMP]`` (never exception text on the wire) and the connection closes.
- No TRACE line holds a password, an AUTH payload or message content: only byte counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from postkeep import log
from postkeep.net.stream import ShuttingDown, Stream, upgrade
from postkeep.pop3 import replies
from postkeep.pop3.protocol import NEED_DATA, ConnectionClosed, Pop3Server, ProtocolError, Stls
from postkeep.pop3.session import Pop3Session
from postkeep.sasl.mechanisms import Credentials
from postkeep.tls.policy import TlsContext

logger = log.get_logger("pop3")

#: RFC 1939 §3: "an inactivity autologout timer ... MUST be of at least 10 minutes".
IDLE_TIMEOUT: Final = 600.0


async def serve(
    stream: Stream,
    core: Pop3Server,
    session: Pop3Session,
    *,
    tls_context: Callable[[], TlsContext] | None,
    idle_timeout: float = IDLE_TIMEOUT,
    greeting: str = "postkeep ready",
    on_plaintext_refused: Callable[[], None] | None = None,
    on_leaked: Callable[[Credentials], Awaitable[None]] | None = None,
) -> None:
    """Serve one connection. ``on_plaintext_refused`` is called each time the core refuses
    USER, PASS or AUTH with ``-ERR [AUTH]`` because TLS has not started, for metrics.
    ``on_leaked`` is awaited with the credentials of a refused command that carried them
    before TLS, after the refusal is on its way (auth/exposure.py)."""
    try:
        stream.write(core.greet(greeting))
        while True:
            try:
                event = core.next_event()
            except ProtocolError as exc:
                stream.write(core.send(exc.hint))
                # Before TLS, [AUTH] is only the core's "STLS first" (RFC 2595 §2.3).
                if on_plaintext_refused is not None and exc.hint.code == "AUTH" and (
                    not core.tls_active
                ):
                    on_plaintext_refused()
                if exc.leaked is not None and on_leaked is not None:
                    await stream.drain()  # the -ERR goes out whatever the password was
                    await on_leaked(exc.leaked)
                if exc.hint.closes:
                    logger.info("pop3.closed_by_error", extra={"reply": exc.hint.text})
                    break
                continue
            if event is NEED_DATA:
                await stream.drain()
                try:
                    data = await stream.read(idle_timeout, idle=True)
                except TimeoutError:
                    logger.info("pop3.timeout", extra={"state": core.state.name})
                    stream.write(replies.TIMEOUT.render())
                    break
                except ShuttingDown:
                    stream.write(replies.SHUTTING_DOWN.render())
                    break
                if data:
                    logger.log(log.TRACE, "pop3.recv", extra={"bytes": len(data)})
                core.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                logger.info("pop3.client_disconnected", extra={"state": core.state.name})
                break
            if isinstance(event, Stls):
                assert tls_context is not None, "the core offers STLS only with TLS"
                if not await upgrade(stream, go_ahead=core.send(replies.BEGIN_TLS),
                                     forget=core.start_tls, ctx=tls_context(),
                                     protocol="pop3"):
                    break
                continue
            reply = await session.handle(event)
            stream.write(core.send(reply))
            if reply.body is not None:
                await stream.drain()  # backpressure: one message at a time in our buffers
            if reply.closes:
                break
    except Exception:
        logger.exception("pop3.session.crashed")
        stream.write(replies.TEMP_ERROR.render())
    finally:
        try:
            await session.close()
        except Exception:
            logger.exception("pop3.session.close_failed")
    await stream.drain()
