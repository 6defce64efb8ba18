"""SMTP command semantics shared by the MX and submission roles.

The core has already checked that a command is legal in this state; the session answers
the policy questions (who may send, who may receive) and spools and hands over messages.
Role-specific rules live in ``mx.py`` and ``submission.py``.

Invariants:
- A message is handed to ``ingest`` only at a DataEnd/last BdatEnd; ``abandon()`` (client
  gone, timeout, crash) discards the spool, so a cut connection delivers nothing.
- The spool is bounded by the core's size limit and lives on disk past 1 MiB.
- Storage failures become 4xx replies from one table; no exception text goes on the wire.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import BinaryIO, cast

from postkeep import log
from postkeep.ingest import Disposition, Envelope, Ingest, Resolution
from postkeep.mail import address as addr
from postkeep.net.listener import ConnInfo
from postkeep.net.stream import Stream
from postkeep.smtp import replies
from postkeep.smtp.protocol import (
    AuthResponse,
    AuthStart,
    Bdat,
    BdatEnd,
    Data,
    DataAbort,
    DataEnd,
    Event,
    Hello,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    SmtpServer,
    Vrfy,
)
from postkeep.smtp.replies import Reply, reply
from postkeep.store.api import StorageError, StorageErrorKind

logger = log.get_logger("smtp")

SPOOL_IN_MEMORY = 1024 * 1024

#: One table from storage failure kind to SMTP reply (STYLE.md: errors).
STORAGE_REPLIES: dict[StorageErrorKind, Reply] = {
    StorageErrorKind.NO_QUOTA: reply(452, "4.2.2", "Mailbox full, please try again later"),
    StorageErrorKind.LIMIT: reply(452, "4.3.1", "Insufficient system storage"),
}
STORAGE_DEFAULT = reply(451, "4.3.0", "Temporary storage failure, please try again later")

NO_SUCH_USER = reply(550, "5.1.1", "No such user here")
VRFY_REPLY = reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP_REPLY = reply(214, "2.0.0", "See RFC 5321; https://www.rfc-editor.org/rfc/rfc5321")


def tls_description(stream: Stream) -> str | None:
    obj = stream.ssl_object
    if obj is None:
        return None
    cipher = obj.cipher()
    if cipher is None:
        return obj.version()
    return f"{obj.version()} {cipher[0]} ({cipher[2]} bits)"


class SmtpSession:
    #: Called once per message acknowledged with 250 (metrics); set by the app.
    on_accepted: Callable[[], None] | None = None

    def __init__(
        self, *, core: SmtpServer, info: ConnInfo, stream: Stream, ingest: Ingest
    ) -> None:
        self.core = core
        self.info = info
        self.ingest = ingest
        self.tls = tls_description(stream)
        self.helo = ""
        self.esmtp = True
        self.user: str | None = None  # authenticated account (submission only)
        self._reset()

    # -- transaction state --------------------------------------------------------------
    def _reset(self) -> None:
        self.sender: str | None = None
        self.smtputf8 = False
        self.recipients: list[tuple[str, Resolution]] = []
        self._discard_spool()

    def _discard_spool(self) -> None:
        spool = getattr(self, "_spool", None)
        if spool is not None:
            spool.close()
        self._spool: BinaryIO | None = None
        self._size = 0

    def tls_started(self, stream: Stream) -> None:
        self.tls = tls_description(stream)
        self.helo = ""
        self._reset()

    def data_chunk(self, chunk: bytes) -> None:
        if self._spool is None:
            self._spool = cast(BinaryIO, tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY))
        self._spool.write(chunk)
        self._size += len(chunk)

    def abandon(self) -> None:
        """The connection is going away: nothing spooled is ever delivered."""
        self._discard_spool()

    # -- dispatch -----------------------------------------------------------------------
    async def handle(self, event: Event) -> Reply:
        match event:
            case Hello(name=name, extended=extended):
                self.helo = name
                self.esmtp = extended
                self._reset()
                return self.core.hello_reply()
            case MailFrom(address=sender, params=params):
                return await self.mail_from(sender, "SMTPUTF8" in params)
            case RcptTo(address=recipient):
                return await self.rcpt_to(recipient)
            case Data():
                self._discard_spool()
                return replies.START_DATA
            case Bdat(size=size, last=last):
                return self.bdat(size, last)
            case BdatEnd(last=last):
                if not last:
                    return replies.chunk_ok(self._size)
                return await self.finish()
            case DataEnd():
                return await self.finish()
            case DataAbort(reply=refusal):
                logger.info("smtp.message.refused", extra={"code": refusal.code})
                self._reset()
                return refusal
            case Rset():
                self._reset()
                return replies.OK
            case Noop():
                return replies.OK
            case Quit():
                return replies.BYE
            case Vrfy():
                return VRFY_REPLY  # RFC 5321 §3.5.3: 252, no user probing
            case Help():
                return HELP_REPLY
            case AuthStart() | AuthResponse():
                return await self.auth(event)
        raise AssertionError(f"unhandled SMTP event {event!r}")

    # -- policy hooks (mx.py / submission.py) -------------------------------------------
    async def auth(self, event: AuthStart | AuthResponse) -> Reply:
        return reply(503, "5.5.1", "AUTH is not available here")

    async def check_sender(self, sender: str) -> Reply | None:
        return None

    async def check_recipient(self, recipient: str, res: Resolution) -> Reply | None:
        raise NotImplementedError

    # -- commands -----------------------------------------------------------------------
    async def mail_from(self, sender: str, smtputf8: bool) -> Reply:
        refusal = await self.check_sender(sender)
        if refusal is not None:
            return refusal
        self._reset()
        self.sender = sender
        self.smtputf8 = smtputf8
        return reply(250, "2.1.0", "Sender OK")

    async def rcpt_to(self, recipient: str) -> Reply:
        try:
            addr.split_address(recipient)
        except addr.AddressError:
            return reply(501, "5.1.3", "Recipient address must be user@domain")
        try:
            res = await self.ingest.resolve(recipient)
        except StorageError as exc:
            return STORAGE_REPLIES.get(exc.kind, STORAGE_DEFAULT)
        refusal = await self.check_recipient(recipient, res)
        if refusal is not None:
            logger.info("smtp.rcpt.refused", extra={"rcpt": recipient, "code": refusal.code})
            return refusal
        self.recipients.append((recipient, res))
        return reply(250, "2.1.5", "Recipient OK")

    def bdat(self, size: int, last: bool) -> Reply:
        # The core streams the chunk as DataChunk events and then asks for BdatEnd's reply;
        # nothing to decide before the bytes arrive.
        return replies.OK

    async def finish(self) -> Reply:
        spool, size = self._spool, self._size
        if spool is None:
            spool = cast(BinaryIO, tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY))
        env = Envelope(
            sender=self.sender or "",
            helo=self.helo,
            peer_ip=self.info.peer_ip,
            tls=self.tls,
            authenticated=self.user is not None,
            esmtp=self.esmtp,
            smtputf8=self.smtputf8,
            submission=self.user is not None,
            recipients=list(self.recipients),
        )
        try:
            queue_id = await self.ingest.accept(env, spool, size)
        except StorageError as exc:
            logger.error("smtp.message.store_failed", extra={"kind": exc.kind.name})
            return STORAGE_DEFAULT if exc.kind is StorageErrorKind.TEMP else (
                STORAGE_REPLIES.get(exc.kind, STORAGE_DEFAULT)
            )
        finally:
            spool.close()
            self._spool = None
            self._reset()
        if self.on_accepted is not None:
            self.on_accepted()
        return replies.queued(queue_id)


def local_refusal(res: Resolution) -> Reply | None:
    return NO_SUCH_USER if res.disposition is Disposition.UNKNOWN else None
