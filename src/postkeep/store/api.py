"""The one storage interface every protocol and service talks to.

Mail-shaped, not key-value: domains, accounts, aliases, DKIM keys, mailboxes, messages
with UIDs and flags, message blobs, and the outbound table. Two backends implement it
(SQLite now, PostgreSQL later); nothing above this module knows which one is in use.

Invariants:
- A write transaction is durable when ``async with store.write()`` exits without error:
  the caller may acknowledge the data (SMTP 250, IMAP OK) only after that point.
- UIDs in a mailbox strictly increase and are never reused; UIDVALIDITY never changes for
  the life of a mailbox; every change to a message raises the mailbox's HIGHESTMODSEQ.
- Message bytes are stored exactly as given, and freed with the last message or queue
  entry that refers to them.
- What a write transaction did to mailboxes is published on ``store.changes`` only after
  its COMMIT, never for a transaction or call that was rolled back.
- Failures are reported as ``StorageError`` with one of a small set of kinds; protocol
  layers map kinds to their own replies in one table each.
- Addresses and domain names are stored lower-case (the local part of an address is
  treated case-insensitively by postkeep, as almost every real server does). Outbound
  senders and recipients are the exception: a remote local part is case-sensitive
  (RFC 5321 §2.4), so the queue keeps them as given.
- An outbound entry leaves the queue only through ``dequeue`` (the scheduler calls it once
  no recipient is pending any more; the CLI's ``queue delete``). A queue entry is claimed
  by at most one holder at a time: ``claim_due`` skips entries whose lease has not
  expired, and ``record_attempt`` changes nothing for a holder whose lease was taken over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum, auto
from typing import BinaryIO, Protocol

MailboxId = int
AccountId = int
Uid = int
QueueId = int

#: The mailboxes every new account gets, with their RFC 6154 SPECIAL-USE attribute.
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
)


class StorageErrorKind(Enum):
    """After Dovecot's mail_error: few kinds, each mapped to a reply by every protocol."""

    NOT_FOUND = auto()
    EXISTS = auto()
    NO_QUOTA = auto()
    PERM = auto()
    EXPUNGED = auto()
    IN_USE = auto()
    LIMIT = auto()
    TEMP = auto()


class StorageError(Exception):
    def __init__(self, kind: StorageErrorKind, detail: str = "") -> None:
        super().__init__(f"{kind.name}: {detail}" if detail else kind.name)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    created: datetime


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A DKIM signing key of a local domain (``mail/dkim.py``); deleted with the domain."""

    domain: str
    selector: str  # lower-case DNS label: published at <selector>._domainkey.<domain>
    algorithm: str  # "ed25519" (RFC 8463) or "rsa"
    private_pem: str  # PKCS#8 PEM, unencrypted: the store is as secret as the key
    public_txt: str  # the TXT record text, "v=DKIM1; k=…; p=…"
    created: datetime


#: The DKIM key algorithms the store accepts.
DKIM_ALGORITHMS = ("ed25519", "rsa")


@dataclass(frozen=True, slots=True)
class Account:
    id: AccountId
    address: str
    password_hash: str
    created: datetime


@dataclass(frozen=True, slots=True)
class Exposure:
    """The account's correct password was sent before TLS by ``peer`` on ``service``
    (refused; ``auth/exposure.py``). ``notified_at``: when its owner was last told."""

    address: str
    peer: str
    service: str
    first_at: datetime
    last_at: datetime
    notified_at: datetime | None


@dataclass(frozen=True, slots=True)
class Alias:
    """``source`` is a full address, or ``@domain`` for that domain's catch-all."""

    source: str
    target: str


@dataclass(frozen=True, slots=True)
class Mailbox:
    id: MailboxId
    account_id: AccountId
    name: str
    uidvalidity: int
    uidnext: Uid
    highestmodseq: int
    special_use: str | None
    subscribed: bool


@dataclass(frozen=True, slots=True)
class BlobRef:
    id: int
    size: int


@dataclass(frozen=True, slots=True)
class MessageRow:
    mailbox_id: MailboxId
    uid: Uid
    modseq: int
    flags: frozenset[str]
    internal_date: datetime
    size: int
    blob: BlobRef
    envelope: str | None  # computed once at ingest (JSON), for IMAP FETCH ENVELOPE
    bodystructure: str | None  # likewise for BODYSTRUCTURE


@dataclass(frozen=True, slots=True)
class OutboundRow:
    id: QueueId
    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    blob: BlobRef
    created: datetime
    next_attempt: datetime
    attempts: int
    last_error: str | None


class RecipientState(Enum):
    """Where delivery to one recipient of a queue entry stands."""

    PENDING = "pending"  # not yet delivered: due again at the entry's next_attempt
    DELIVERED = "delivered"  # a remote server accepted it (2xx): our responsibility ended
    FAILED = "failed"  # permanently refused, or given up on: a DSN went to the sender


@dataclass(frozen=True, slots=True)
class QueueRecipient:
    address: str  # as given to ``enqueue`` (case preserved, RFC 5321 §2.4)
    state: RecipientState
    attempts: int  # delivery attempts to this recipient so far
    last_error: str | None  # the last reply or connection problem, for people to read
    last_attempt: datetime | None


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One message on the outbound queue, with per-recipient state."""

    id: QueueId
    sender: str  # "" for the null reverse-path
    recipients: tuple[QueueRecipient, ...]  # in the order given to ``enqueue``
    blob: BlobRef
    created: datetime  # when it was first queued (``give_up_after`` counts from here)
    next_attempt: datetime
    attempts: int  # delivery rounds so far (each ``record_attempt`` that ends a round)
    delay_notified: bool  # a "delayed" DSN (RFC 3464 Action: delayed) was sent
    lease_holder: str | None  # who is delivering it now, if the lease is unexpired
    lease_until: datetime | None

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(r.address for r in self.recipients if r.state is RecipientState.PENDING)


#: RFC 3501 §2.3.2 system flags, in their canonical spelling. The store compares these
#: case-insensitively and stores this spelling (\SEEN becomes \Seen); every other flag
#: (a keyword) is stored and compared exactly as given. \Recent is never stored: it is a
#: property of a session (RFC 3501 §2.3.2), so ``append`` and ``set_flags`` drop it.
SYSTEM_FLAGS: frozenset[str] = frozenset(
    {"\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"}
)


class FlagOp(Enum):
    SET = auto()  # IMAP STORE FLAGS
    ADD = auto()  # +FLAGS
    REMOVE = auto()  # -FLAGS


@dataclass(frozen=True, slots=True)
class FlagChange:
    uid: Uid
    modseq: int
    flags: frozenset[str]  # the message's flags after the change


class ChangeKind(Enum):
    APPEND = auto()  # ``uids`` were added (append, copy, move into the mailbox)
    FLAGS = auto()  # the flags of ``uids`` changed, each to ``modseq``
    EXPUNGE = auto()  # ``uids`` were removed (expunge, move out of the mailbox)
    # Created, renamed or deleted — or changes to it were dropped because the subscriber
    # fell too far behind (see ``Subscription``). Either way: re-read the mailbox
    # (``mailbox_by_id``, ``uids``, ``messages_since``); ``uids`` is empty.
    MAILBOX = auto()


@dataclass(frozen=True, slots=True)
class Change:
    """What a committed write did to one mailbox. Published only after the COMMIT."""

    mailbox_id: MailboxId
    kind: ChangeKind
    uids: tuple[Uid, ...]
    modseq: int  # the mailbox's HIGHESTMODSEQ after the change


class Subscription(Protocol):
    """Committed changes to some mailboxes, in commit order, each returned once.

    One consumer per subscription. The backlog is bounded: when more than about 10,000
    changed UIDs are pending (``wait()`` not called for a long time), the backlog is
    replaced by one ``ChangeKind.MAILBOX`` change per mailbox, telling the subscriber to
    resynchronise rather than keeping every change in memory.
    """

    async def wait(self, timeout: float | None = None) -> list[Change]:
        """Every change not yet returned (at least one), or [] after ``timeout``, or []
        at once when the subscription or the store is closed."""

    def close(self) -> None: ...


class ChangeFeed(Protocol):
    """``store.changes``: what committed write transactions did, for IMAP IDLE and NOTIFY.

    A change is published only after the COMMIT that holds it (never for a rolled-back
    transaction), by every write path, SMTP delivery included. It may arrive shortly after
    ``async with store.write()`` returned (LISTEN/NOTIFY is asynchronous), so a session
    re-reads the store when woken rather than trusting the change alone.
    """

    def subscribe(self, mailbox_ids: Sequence[MailboxId] | None = None) -> Subscription:
        """Changes to these mailboxes (all of them for None), from now on."""


class ReadTx(Protocol):
    """A consistent snapshot of the store."""

    # accounts
    async def domain_exists(self, name: str) -> bool: ...
    async def list_domains(self) -> list[Domain]: ...
    async def get_account(self, address: str) -> Account | None: ...
    async def list_accounts(self, domain: str | None = None) -> list[Account]: ...
    async def exposures(self, address: str | None = None) -> list[Exposure]:
        """Plaintext password exposures of one account (all accounts for None), most
        recent ``last_at`` first; [] for an account that does not exist."""

    async def alias_targets(self, source: str) -> list[str]: ...
    async def list_aliases(self, source: str | None = None) -> list[Alias]: ...
    async def dkim_keys(self, domain: str) -> list[DkimKey]:
        """The domain's DKIM keys, oldest first; [] for a domain that does not exist."""

    # mailboxes and messages
    async def mailboxes(self, account_id: AccountId) -> list[Mailbox]: ...
    async def mailbox(self, account_id: AccountId, name: str) -> Mailbox | None: ...
    async def mailbox_by_id(self, mailbox_id: MailboxId) -> Mailbox | None: ...
    async def uids(self, mailbox_id: MailboxId) -> list[Uid]:
        """Every UID in the mailbox, ascending (cheap: no message data)."""

    async def messages_since(self, mailbox_id: MailboxId, modseq: int) -> list[MessageRow]:
        """Messages whose modseq is greater than ``modseq`` (RFC 7162 CHANGEDSINCE), in UID
        order. Expunged messages are not reported (no tombstones are kept)."""

    async def maildrop_holder(self, account_id: AccountId) -> str | None:
        """Who holds the POP3 maildrop lock, if anyone holds an unexpired one."""

    async def messages(
        self, mailbox_id: MailboxId, uids: Sequence[Uid] | None = None
    ) -> list[MessageRow]: ...
    async def read_blob(
        self, ref: BlobRef, offset: int = 0, length: int | None = None
    ) -> bytes: ...
    async def read_blobs(
        self, refs: Sequence[BlobRef], length: int | None = None
    ) -> dict[int, bytes]:
        """The bytes of many blobs at once (the first ``length`` bytes of each for a
        number), keyed by blob id; NOT_FOUND if any is missing (same rules as
        ``read_blob``).

        - Only ``ref.id`` is looked at, as by ``read_blob``: each value is the stored
          blob's bytes, whatever ``ref.size`` says.
        - A blob named more than once (duplicate ids) is one key, read once; no refs is
          ``{}``.
        - ``length`` larger than a blob gives the whole blob; 0 gives ``b""`` for each
          (the blobs must still exist); a negative ``length`` is a ``ValueError``, raised
          before the store is asked.
        - NOT_FOUND (naming the missing ids) if any blob does not exist or was freed; no
          partial answer.
        - Every value is in memory at once: the caller bounds a call, by the number of
          refs and by their sizes or ``length`` (IMAP SEARCH passes its load batches).
          One call costs the backend one query (PostgreSQL) or one trip to a reader
          thread (SQLite), not one per blob.
        """
        ...

    # outbound
    async def outbound(self, limit: int = 100) -> list[OutboundRow]: ...
    async def queue_entries(self, limit: int = 100) -> list[QueueEntry]:
        """Queue entries with their recipients, soonest next attempt first (the CLI)."""


class WriteTx(ReadTx, Protocol):
    """Changes made here become visible and durable together when the transaction ends."""

    async def add_domain(self, name: str) -> Domain: ...
    async def del_domain(self, name: str) -> None: ...
    async def add_account(self, address: str, password_hash: str) -> Account: ...
    async def set_password(self, address: str, password_hash: str) -> None:
        """Replace the password hash; the account's exposures are deleted with the old
        password. NOT_FOUND if the account does not exist."""

    async def record_exposure(
        self, address: str, peer: str, service: str, when: datetime, notify_every: timedelta
    ) -> bool:
        """Record that ``peer`` sent the account's password before TLS on ``service``.
        True when its owner should be told now (never told about this peer and service,
        or not within ``notify_every``); ``notified_at`` is then set to ``when``, in the
        same transaction, so concurrent leaks tell once. NOT_FOUND for no such account."""

    async def clear_exposures(self, address: str) -> int:
        """Forget the account's exposures (``postkeep user unlock``); how many there
        were. NOT_FOUND if the account does not exist."""

    async def del_account(self, address: str) -> None: ...
    async def add_alias(self, source: str, target: str) -> Alias: ...
    async def del_alias(self, source: str, target: str) -> None: ...
    async def add_dkim_key(
        self, domain: str, selector: str, algorithm: str, private_pem: str, public_txt: str
    ) -> DkimKey:
        """Store a DKIM key. NOT_FOUND if the domain does not exist, EXISTS if it already
        has a key with this selector (compared case-insensitively); ValueError for an
        algorithm not in ``DKIM_ALGORITHMS``. ``del_domain`` deletes the domain's keys."""

    async def create_mailbox(
        self, account_id: AccountId, name: str, special_use: str | None = None
    ) -> Mailbox: ...
    async def put_blob(self, data: bytes | BinaryIO, size: int | None = None) -> BlobRef: ...
    async def append(
        self,
        mailbox_id: MailboxId,
        blob: BlobRef,
        flags: frozenset[str] = frozenset(),
        when: datetime | None = None,
        envelope: str | None = None,
        bodystructure: str | None = None,
    ) -> Uid: ...
    async def enqueue(self, sender: str, recipients: Sequence[str], blob: BlobRef) -> QueueId:
        """Queue ``blob`` for these recipients (each PENDING, 0 attempts), due at once."""

    async def claim_due(
        self, now: datetime, limit: int, holder: str, lease_seconds: float
    ) -> list[QueueEntry]:
        """Lease up to ``limit`` entries due at ``now`` to ``holder``, oldest due first.

        Due: ``next_attempt <= now``, at least one recipient PENDING, and no lease or an
        expired one (its holder died: the entry is taken over, so a message is delivered
        at least once, never zero times). The lease lasts ``lease_seconds`` from ``now``.
        Claims are atomic: two holders claiming at once never get the same entry (one
        writer in SQLite; ``FOR UPDATE SKIP LOCKED`` in PostgreSQL). The returned entries
        show the new lease."""

    async def record_attempt(
        self,
        queue_id: QueueId,
        holder: str,
        results: Mapping[str, tuple[RecipientState, str | None]],
        next_attempt: datetime | None = None,
        delay_notified: bool | None = None,
    ) -> bool:
        """Record what one delivery attempt did, if ``holder`` still holds the lease.

        ``results`` maps recipient addresses (as enqueued) to their new state and error
        text; each one's ``attempts`` goes up by one and ``last_attempt`` becomes the
        store's now. Recipients not in ``results`` are unchanged; an address the entry
        does not have is ignored. ``next_attempt`` given: the round is over, the entry is
        due again then and the lease is released; None: the lease is kept (more results
        of this round follow). ``delay_notified`` given: the flag is set to it.

        Returns False, changing nothing, when the entry is gone or its lease now belongs
        to another holder (ours expired and was taken over)."""

    async def release_leases(self, holder_prefix: str) -> int:
        """Release every lease whose holder starts with ``holder_prefix``; returns how many.

        A node calls this when it starts, for the leases its previous process held when
        it died, so that delivery resumes at once instead of when the leases expire."""

    async def dequeue(self, queue_id: QueueId) -> bool:
        """Remove the entry; its bytes are freed if no message or other entry refers to
        them (as ``expunge`` does). False if there was no such entry."""

    async def retry(self, queue_id: QueueId | None = None) -> int:
        """Make the entry (every entry, for None) with pending recipients due now.

        Leases are not touched: an entry being delivered stays with its holder. Returns
        how many entries were changed (0 when ``queue_id`` does not exist)."""
    async def set_flags(
        self,
        mailbox_id: MailboxId,
        uids: Sequence[Uid],
        op: FlagOp,
        flags: frozenset[str],
        unchanged_since: int | None = None,
    ) -> tuple[list[FlagChange], list[Uid]]:
        """Apply ``op``; returns (messages whose flags changed, each with a new modseq;
        UIDs refused because their modseq > unchanged_since, RFC 7162 §3.1.3).
        Missing UIDs are ignored.

        Both lists are in ascending UID order. All messages changed by one call share one
        new modseq (the mailbox's new HIGHESTMODSEQ). A message whose flags end up as they
        were is not changed: no new modseq, not in the result. Flag case and ``\\Recent``:
        see ``SYSTEM_FLAGS``. NOT_FOUND if the mailbox does not exist."""

    async def expunge(self, mailbox_id: MailboxId, uids: Sequence[Uid]) -> list[Uid]:
        """Remove these messages; returns the UIDs actually removed, ascending.

        Raises HIGHESTMODSEQ once if anything was removed. A message's bytes are freed in
        the same transaction once no message and no queue entry refers to them any more; a
        later ``read_blob`` of that ``BlobRef`` is NOT_FOUND. NOT_FOUND if the mailbox does
        not exist; missing UIDs are ignored."""

    async def copy(
        self, src: MailboxId, uids: Sequence[Uid], dst: MailboxId
    ) -> list[tuple[Uid, Uid]]:
        """Copy (sharing the blob); returns (source uid, new uid) pairs, ascending.

        New UIDs are given in ascending order of source UID (RFC 4315 COPYUID); flags,
        internal date, envelope and bodystructure are kept. ``dst`` may be ``src``.
        NOT_FOUND if either mailbox does not exist; missing UIDs are ignored."""

    async def move(
        self, src: MailboxId, uids: Sequence[Uid], dst: MailboxId
    ) -> list[tuple[Uid, Uid]]:
        """Copy then expunge from ``src``, atomically (RFC 6851)."""

    async def rename_mailbox(self, mailbox_id: MailboxId, new_name: str) -> None:
        """Renames children too ("a/b" with "a"). RFC 3501 §6.3.5: renaming INBOX moves its
        messages to a new mailbox and leaves INBOX empty. EXISTS if the name is taken.

        The hierarchy delimiter is "/". EXISTS also when a child's new name is taken, or
        the new name is INBOX; PERM when the new name is inside the mailbox itself ("a" to
        "a/b"). A renamed mailbox keeps its UIDVALIDITY, UIDs, special-use and subscription
        (RFC 3501 allows keeping them); the mailbox INBOX's messages move to gets a new
        UIDVALIDITY and new UIDs, and INBOX's children are not renamed."""

    async def delete_mailbox(self, mailbox_id: MailboxId) -> None:
        """Delete the mailbox and its messages (freeing their bytes as ``expunge`` does).
        Its children stay. PERM for INBOX, NOT_FOUND if it does not exist."""

    async def set_subscribed(self, mailbox_id: MailboxId, subscribed: bool) -> None: ...
    async def acquire_maildrop(self, account_id: AccountId, holder: str, ttl: float) -> bool:
        """Take (or refresh, for the same holder) the POP3 maildrop lock for ``ttl`` seconds;
        False while another holder has an unexpired lock (RFC 1939 §8 exclusive access).

        An expired lock (its holder died) is taken over. Expiry is judged by the store's
        clock, so it works across processes and nodes. The lock is seen by others once
        this transaction commits. NOT_FOUND if the account does not exist."""

    async def release_maildrop(self, account_id: AccountId, holder: str) -> None:
        """Release the lock if ``holder`` holds it; otherwise do nothing."""


@dataclass(slots=True)
class StoreStats:
    """Counters for benchmarks and metrics."""

    write_transactions: int = 0
    commits: int = 0  # each commit is one fsync of the write-ahead log
    commit_seconds: float = 0.0  # time spent in those commits, in total (latency = / commits)


class Store(Protocol):
    stats: StoreStats
    changes: ChangeFeed
    #: The schema migration versions the last ``open()`` applied; ``()`` when it was current.
    migrated: tuple[int, ...]

    async def open(self) -> None:
        """Create or migrate the schema, then get ready to serve."""

    async def close(self) -> None: ...
    def read(self) -> AbstractAsyncContextManager[ReadTx]: ...
    def write(self) -> AbstractAsyncContextManager[WriteTx]: ...
