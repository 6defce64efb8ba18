"""The single path by which a message enters postkeep.

Every accepted message — from port 25, 587 or 465, and later from DSNs — comes through
``Ingest.accept``: trace and submission headers are added, the bytes are stored once, the
copy for each local recipient is appended to its INBOX and the remote recipients are put on
the outbound queue, all in one write transaction.

DKIM (``mail/dkim.py``): a message from an authenticated user that goes to at least one
remote recipient is signed, before it is stored, with the keys of the envelope sender's
domain — the address submission checked belongs to the user — when that domain is ours
and has keys. The message is stored once, so its local recipients get the signed copy
too. Mail that only stays here is not signed, and mail from port 25 never is (a
forwarding alias must not sign a stranger's message as ours).

Invariants:
- ``accept`` returns only after the transaction that holds the message has committed:
  the SMTP 250 is sent after that, never before (RFC 5321 §6.1).
- The client's bytes are stored exactly; postkeep only prepends header fields.
- Recipient resolution (accounts, aliases, catch-alls) lives here and nowhere else, and
  expands aliases to a bounded depth (no alias loop can hang a delivery).
- A message reaches each account at most once, however many aliases lead there.
- Only a signature for the authenticated sender's own domain is ever added (DKIM ``d=``).
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import BinaryIO, cast

from postkeep import log
from postkeep.mail import address as addr
from postkeep.mail import dkim, mime
from postkeep.mail.headers import missing_submission_headers, split_header
from postkeep.mail.received import received_header
from postkeep.store.api import (
    MailboxId,
    ReadTx,
    StorageError,
    StorageErrorKind,
    Store,
    Uid,
)

logger = log.get_logger("ingest")

ALIAS_DEPTH = 10
MAX_EXPANSION = 1000
HEADER_PEEK = 64 * 1024  # how much of the message we read to find its header block
#: Messages up to this size are analysed on the event loop: for them the MIME walk costs
#: tens of microseconds (about 30 µs for 10 KB), less than the round trip to a worker
#: thread, and it holds the GIL either way. Larger ones go to a thread so that a 50 MB
#: message does not stall every other connection.
ANALYZE_INLINE = 256 * 1024


class Disposition(Enum):
    LOCAL = "local"  # delivered to these accounts' INBOXes
    REMOTE = "remote"  # not a local domain: the outbound queue
    UNKNOWN = "unknown"  # a local domain, but no such account or alias


@dataclass(frozen=True, slots=True)
class Resolution:
    disposition: Disposition
    accounts: tuple[str, ...] = ()  # local accounts that receive a copy
    remote: tuple[str, ...] = ()  # remote addresses (forwarding aliases, or the address)
    # The INBOX of each of ``accounts`` (same order) as found at RCPT time, so that DATA
    # need not look it up again in the write transaction; None (or a shorter tuple): look
    # it up then. An INBOX is never renamed or deleted on its own and mailbox ids are never
    # reused, so the id either still is that account's INBOX or no longer exists.
    inboxes: tuple[MailboxId | None, ...] = ()


@dataclass(slots=True)
class Envelope:
    sender: str
    helo: str
    peer_ip: str
    tls: str | None  # "TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)"
    authenticated: bool
    esmtp: bool = True
    smtputf8: bool = False
    submission: bool = False  # add Message-ID/Date where missing (RFC 6409 §8)
    recipients: list[tuple[str, Resolution]] = field(default_factory=list)


def new_queue_id() -> str:
    return secrets.token_hex(8).upper()


class Ingest:
    def __init__(self, store: Store, hostname: str) -> None:
        self.store = store
        self.hostname = hostname
        #: Called after a commit that put something on the outbound queue (app.py sets it
        #: to the scheduler's wake), so delivery starts at once instead of at the next poll.
        self.on_enqueue: Callable[[], None] | None = None

    async def is_local_domain(self, domain: str) -> bool:
        async with self.store.read() as tx:
            return await tx.domain_exists(domain.lower())

    async def resolve(self, recipient: str) -> Resolution:
        async with self.store.read() as tx:
            return await _resolve(tx, recipient)

    async def accept(self, env: Envelope, body: BinaryIO, size: int) -> str:
        """Store the message for every recipient; returns the queue id once durable."""
        queue_id = new_queue_id()
        now = datetime.now(UTC)
        body.seek(0)
        head = body.read(HEADER_PEEK)
        body.seek(0)
        header_block, _ = split_header(head)
        prefix = received_header(
            helo=env.helo,
            peer_ip=env.peer_ip,
            peer_host=None,
            by_host=self.hostname,
            protocol=_with_keyword(env),
            tls=env.tls,
            authenticated=env.authenticated,
            queue_id=queue_id,
            recipient=env.recipients[0][0] if len(env.recipients) == 1 else None,
            when=now,
        )
        if env.submission:
            prefix += missing_submission_headers(header_block, self.hostname, now)
        accounts: dict[str, MailboxId | None] = {}  # address → INBOX id if known
        remote: list[str] = []
        for _, res in env.recipients:
            for i, a in enumerate(res.accounts):
                if accounts.get(a) is None:
                    accounts[a] = res.inboxes[i] if i < len(res.inboxes) else None
            remote.extend(r for r in res.remote if r not in remote)
        signed_by = ""
        if remote and env.authenticated and env.sender:
            signature, signed_by = await self._dkim_signature(env.sender, prefix, body)
            prefix = signature + prefix  # DKIM-Signature fields go on top (RFC 6376 §5.6)
        envelope = structure = None
        if accounts:  # only mailboxes need the IMAP analysis; the queue does not
            envelope, structure = await _analyze(cast(BinaryIO, _Prefixed(prefix, body)))
            body.seek(0)
        # _Prefixed only reads forwards; put_blob needs nothing else when it is given the size.
        data = cast(BinaryIO, _Prefixed(prefix, body))
        async with self.store.write() as tx:
            blob = await tx.put_blob(data, len(prefix) + size)
            for account_address, inbox_id in accounts.items():
                if inbox_id is None:
                    account = await tx.get_account(account_address)
                    if account is None:  # deleted since RCPT: deliver to the others
                        continue
                    inbox = await tx.mailbox(account.id, "INBOX")
                    if inbox is None:
                        continue
                    inbox_id = inbox.id
                try:
                    await tx.append(inbox_id, blob, when=now, envelope=envelope,
                                    bodystructure=structure)
                except StorageError as exc:
                    # The account (and its INBOX with it) was deleted since RCPT: deliver
                    # to the others. append() is atomic, so the transaction is unharmed.
                    if exc.kind is not StorageErrorKind.NOT_FOUND:
                        raise
            if remote:
                await tx.enqueue(env.sender, remote, blob)
        if remote and self.on_enqueue is not None:
            self.on_enqueue()  # after the COMMIT: the scheduler will find the entry
        logger.info(
            "ingest.accepted",
            extra={"queue_id": queue_id, "size": len(prefix) + size,
                   "local": len(accounts), "remote": len(remote),
                   **({"dkim": signed_by} if signed_by else {})},
        )
        return queue_id

    async def _dkim_signature(
        self, sender: str, prefix: bytes, body: BinaryIO
    ) -> tuple[bytes, str]:
        """(DKIM-Signature fields, the signing domain), or (b"", "") when not signing.

        ``d=`` is the envelope sender's domain: submission checked that the user may send
        as that address, so this never signs for a domain the user is not in. A From field
        of another domain gets no aligned signature (RFC 7489 §3.1), as it should.
        """
        domain = sender.rpartition("@")[2].lower()
        async with self.store.read() as tx:
            keys = await tx.dkim_keys(domain)
        if not keys:
            return b"", ""
        body.seek(0)
        message = prefix + body.read()
        body.seek(0)
        try:
            # A worker thread: RSA signing takes milliseconds, and hashing a large body longer.
            signature = await asyncio.to_thread(dkim.sign, message, domain, keys)
        except dkim.DkimError as exc:
            # Sending unsigned is better than refusing the user's mail: a receiver may still
            # accept it (DMARC quarantine at worst), and the log says why.
            logger.warning("ingest.dkim.unsigned", extra={"domain": domain, "reason": str(exc)})
            return b"", ""
        if dkim.from_domain(message) != domain:
            logger.info("ingest.dkim.unaligned", extra={"domain": domain})
        return signature, domain


    async def append(
        self,
        mailbox_id: MailboxId,
        body: BinaryIO,
        size: int,
        flags: frozenset[str] = frozenset(),
        when: datetime | None = None,
    ) -> tuple[Uid, int]:
        """IMAP APPEND: store the client's bytes exactly, with the analysis IMAP needs.

        Returns (uid, uidvalidity) once the message is durable (RFC 4315 APPENDUID).
        Raises StorageError(NOT_FOUND) if the mailbox vanished meanwhile.
        """
        body.seek(0)
        envelope, structure = await _analyze(body)
        body.seek(0)
        async with self.store.write() as tx:
            mailbox = await tx.mailbox_by_id(mailbox_id)
            if mailbox is None:
                raise StorageError(StorageErrorKind.NOT_FOUND, "mailbox does not exist")
            blob = await tx.put_blob(body, size)
            uid = await tx.append(mailbox_id, blob, flags, when, envelope=envelope,
                                  bodystructure=structure)
        return uid, mailbox.uidvalidity


async def _analyze(source: BinaryIO) -> tuple[str, str]:
    """ENVELOPE and BODYSTRUCTURE, computed once here so that FETCH never parses MIME.

    The ``envelope`` column holds the ENVELOPE as JSON; the ``bodystructure`` column holds
    the whole ``mime.Analysis`` (BODY, BODYSTRUCTURE and part offsets for BODY[n]).
    """
    data = source.read()
    assert data is not None
    if len(data) <= ANALYZE_INLINE:
        analysis = mime.analyze(data)
    else:
        analysis = await asyncio.to_thread(mime.analyze, data)
    return json.dumps(analysis.envelope, separators=(",", ":")), analysis.to_json()


async def _resolve(tx: ReadTx, recipient: str) -> Resolution:
    local_part, domain = addr.split_address(recipient)
    domain = domain.lower()
    local_domains: dict[str, bool] = {}  # each domain is asked about once

    async def is_local(name: str) -> bool:
        known = local_domains.get(name)
        if known is None:
            known = local_domains[name] = await tx.domain_exists(name)
        return known

    first = f"{local_part}@{domain}".lower()
    # The common case first: the address is an account. An account's domain always exists
    # (the store refuses to delete a domain with accounts), so this is the answer the walk
    # below would give, one question sooner.
    account = await tx.get_account(first)
    if account is not None:
        inbox = await tx.mailbox(account.id, "INBOX")
        return Resolution(
            Disposition.LOCAL, accounts=(first,), inboxes=(None if inbox is None else inbox.id,)
        )
    if not await is_local(domain):
        return Resolution(Disposition.REMOTE, remote=(recipient,))
    accounts: list[str] = []
    inboxes: list[MailboxId | None] = []
    remote: list[str] = []
    seen: set[str] = set()
    frontier: list[str] = [first]
    for _ in range(ALIAS_DEPTH):
        following: list[str] = []
        for current in frontier:
            if current in seen or len(seen) >= MAX_EXPANSION:
                continue
            seen.add(current)
            _, cur_domain = addr.split_address(current)
            if not await is_local(cur_domain):
                remote.append(current)
                continue
            account = None if current == first else await tx.get_account(current)
            if account is not None:
                accounts.append(current)
                inbox = await tx.mailbox(account.id, "INBOX")
                inboxes.append(None if inbox is None else inbox.id)
                continue  # an account shadows an alias of the same name
            targets = await tx.alias_targets(current)
            if not targets:
                targets = await tx.alias_targets("@" + cur_domain)  # the catch-all
            following.extend(t.lower() for t in targets)
        frontier = following
        if not frontier:
            break
    if not accounts and not remote:
        return Resolution(Disposition.UNKNOWN)
    return Resolution(
        Disposition.LOCAL, accounts=tuple(accounts), remote=tuple(remote), inboxes=tuple(inboxes)
    )


def _with_keyword(env: Envelope) -> str:
    """RFC 3848 / RFC 6531 §4.3: the WITH protocol of the Received field."""
    if not env.esmtp:
        return "SMTP"
    word = "UTF8SMTP" if env.smtputf8 else "ESMTP"
    if env.tls:
        word += "S"
    if env.authenticated:
        word += "A"
    return word


class _Prefixed(io.RawIOBase):
    """Reads ``prefix`` and then ``body``, so the store streams both without a copy."""

    def __init__(self, prefix: bytes, body: BinaryIO) -> None:
        self._prefix = prefix
        self._pos = 0
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Sequence[int] | memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        if self._pos < len(self._prefix):
            part = self._prefix[self._pos : self._pos + len(view)]
            self._pos += len(part)
            view[: len(part)] = part
            return len(part)
        chunk = self._body.read(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)
