"""Copying one installation's store into another (``postkeep db copy``), resumably.

The source is read only through the ``Store`` protocol's ``ReadTx``, so it may be either
backend (in practice the SQLite store of a single node moving to PostgreSQL). The target
is a ``CopyTarget`` (``store/postgres/importer.py``): it writes rows with the source's own
UIDs, UIDVALIDITYs and modseqs, which the ``WriteTx`` protocol rightly cannot do, and it
keeps in its own database what it has copied, so a run that stopped at any moment (even
killed) goes on where it stopped.

A run is a sync, not a blind copy, so running it again is always safe:

1. directory: domains, accounts (password hashes as they are), aliases, DKIM keys and
   password exposures are made equal to the source's (one transaction);
2. mailboxes: each source mailbox has one target mailbox with the same name, UIDVALIDITY,
   special-use and subscription (one transaction per account);
3. messages: per mailbox, target UIDs the source no longer has are removed, flags that
   changed are updated, and the missing UIDs are copied in batches — each batch one
   committed transaction, with the same UID, modseq, flags, internal date, envelope,
   bodystructure and bytes; then UIDNEXT and HIGHESTMODSEQ are set to the source's;
4. queue: outbound entries with their per-recipient state (never a lease);
5. verification: each mailbox's UID set in the target equals the source's.

Invariants:
- A batch is all or nothing (one target transaction): messages are copied with their
  blob and the blob map row, so a killed run leaves no half message and no orphan blob.
- A source blob shared by several messages or queue entries is copied once and shared.
- Nothing is written to a target that holds domains or accounts that no copy from this
  source put there (``CopyRefused``): two installations are never merged by accident.
- The source is never written to.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from postkeep.store.api import (
    Account,
    Alias,
    BlobRef,
    DkimKey,
    Domain,
    Exposure,
    Mailbox,
    MailboxId,
    MessageRow,
    QueueEntry,
    ReadTx,
    StorageError,
    StorageErrorKind,
    Store,
    Uid,
)
from postkeep.store.rules import flags_text

#: Messages per target transaction unless the caller says otherwise.
DEFAULT_BATCH = 200
#: A batch also ends once it holds this many message bytes (memory stays bounded).
BATCH_BYTES = 32 * 1024 * 1024
#: ``queue_entries``/``outbound`` take a limit; this is "all of them".
_ALL = 2**62


class CopyRefused(Exception):
    """The target cannot take this copy; the message is a sentence for the operator."""


@dataclass(frozen=True, slots=True)
class Directory:
    """Everything of the source that is not a mailbox or the queue."""

    domains: list[Domain]
    accounts: list[Account]
    aliases: list[Alias]
    dkim_keys: list[DkimKey]
    exposures: list[Exposure]


@dataclass(frozen=True, slots=True)
class DirectoryResult:
    accounts: dict[int, int]  # source account id → target account id
    domains_copied: int
    domains_kept: int
    accounts_copied: int
    accounts_kept: int
    accounts_removed: int


@dataclass(frozen=True, slots=True)
class QueueItem:
    entry: QueueEntry
    last_error: str | None


@dataclass(slots=True)
class CopyReport:
    previous_finish: datetime | None = None
    domains_copied: int = 0
    domains_kept: int = 0
    accounts_copied: int = 0
    accounts_kept: int = 0
    accounts_removed: int = 0
    aliases: int = 0
    dkim_keys: int = 0
    mailboxes_copied: int = 0
    mailboxes_kept: int = 0
    mailboxes_removed: int = 0
    messages_copied: int = 0
    messages_kept: int = 0
    messages_removed: int = 0
    messages_reflagged: int = 0
    messages_vanished: int = 0  # expunged in the source while this run was copying
    bytes_copied: int = 0
    blobs_copied: int = 0
    queue_copied: int = 0
    queue_kept: int = 0
    queue_removed: int = 0
    mismatched: list[str] = field(default_factory=list)  # mailboxes whose UIDs differ

    @property
    def verified(self) -> bool:
        return not self.mismatched


class CopyTarget(Protocol):
    """Where a copy goes: a database that keeps its copy state next to the data."""

    async def begin(self, source: str, label: str) -> datetime | None:
        """Lock the target for this copy, refuse (``CopyRefused``) a target holding another
        installation, record the source; when the last run from it finished, if one did."""

    async def sync_directory(self, source: str, directory: Directory) -> DirectoryResult: ...

    async def sync_mailboxes(
        self, source: str, account_id: int, boxes: Sequence[Mailbox]
    ) -> tuple[dict[MailboxId, MailboxId], int, int, int]:
        """Target mailboxes for these source mailboxes of one account (whose target id is
        ``account_id``), created or updated; mapped ones the source no longer has are
        deleted. Returns (source id → target id, copied, kept, removed)."""

    async def message_state(self, mailbox_id: MailboxId) -> dict[Uid, tuple[int, str]]:
        """Every message of a target mailbox: uid → (modseq, flags text)."""

    async def apply_changes(
        self, mailbox_id: MailboxId, remove: Sequence[Uid],
        flags: Sequence[tuple[Uid, int, frozenset[str]]],
    ) -> None:
        """Remove these UIDs (freeing their bytes) and set (uid, modseq, flags), at once."""

    async def known_blobs(self, source: str, source_ids: Sequence[int]) -> dict[int, int]:
        """Source blob id → target blob id, for those already copied."""

    async def insert_messages(
        self, source: str, mailbox_id: MailboxId, rows: Sequence[MessageRow],
        blobs: Mapping[int, bytes],
    ) -> int:
        """One committed transaction: copy ``blobs`` (source id → bytes, not yet copied)
        and ``rows`` with their own UIDs into the mailbox. Returns the blobs written."""

    async def finish_mailbox(self, mailbox_id: MailboxId, uidnext: int, modseq: int) -> None: ...

    async def sync_queue_removed(self, source: str, keep: Sequence[int]) -> int:
        """Remove copied queue entries whose source id is not in ``keep``; how many."""

    async def known_queue(self, source: str) -> set[int]: ...

    async def insert_queue(
        self, source: str, items: Sequence[QueueItem], blobs: Mapping[int, bytes]
    ) -> None:
        """New queue entries (one committed transaction), leases left out."""

    async def update_queue(self, source: str, items: Sequence[QueueItem]) -> None:
        """Copied entries: their schedule and per-recipient state as in the source."""

    async def target_uids(self, mailbox_id: MailboxId) -> list[Uid]: ...

    async def finish(self, source: str) -> None:
        """Record that a run from this source ended with everything copied."""


class Progress(Protocol):
    def phase(self, text: str) -> None:
        """One line saying what happens now."""

    def start(self, messages: int, nbytes: int) -> None:
        """The message phase begins: this much is to be copied."""

    def advance(self, messages: int, nbytes: int) -> None: ...

    def done(self) -> None: ...


class SilentProgress:
    def phase(self, text: str) -> None:
        pass

    def start(self, messages: int, nbytes: int) -> None:
        pass

    def advance(self, messages: int, nbytes: int) -> None:
        pass

    def done(self) -> None:
        pass


async def source_identity(tx: ReadTx) -> str:
    """A fingerprint of the source installation, stable across runs and across moving its
    files: its oldest domain's name and creation time (to the microsecond), which no
    other installation shares. ``"empty"`` for a store without domains."""
    domains = await tx.list_domains()
    if not domains:
        return "empty"
    first = min(domains, key=lambda d: (d.created, d.name))
    stamp = f"{first.name}\x00{first.created.isoformat()}"
    return "pk1:" + hashlib.sha256(stamp.encode()).hexdigest()[:32]


@dataclass(slots=True)
class _Plan:
    target: MailboxId
    source: Mailbox
    missing: list[MessageRow]


async def _read_directory(tx: ReadTx) -> Directory:
    domains = await tx.list_domains()
    keys: list[DkimKey] = []
    for d in domains:
        keys += await tx.dkim_keys(d.name)
    return Directory(
        domains=domains,
        accounts=await tx.list_accounts(),
        aliases=await tx.list_aliases(),
        dkim_keys=keys,
        exposures=await tx.exposures(),
    )


async def copy_installation(
    source: Store,
    target: CopyTarget,
    *,
    label: str,
    batch: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> CopyReport:
    """Make the target hold what the source holds; see the module docstring."""
    if batch < 1:
        raise ValueError("the batch size must be at least 1")
    show: Progress = progress or SilentProgress()
    report = CopyReport()

    async with source.read() as tx:
        ident = await source_identity(tx)
        directory = await _read_directory(tx)
    report.previous_finish = await target.begin(ident, label)

    show.phase(
        f"directory: {len(directory.domains)} domain(s), {len(directory.accounts)} "
        f"account(s), {len(directory.aliases)} alias(es)"
    )
    done = await target.sync_directory(ident, directory)
    report.domains_copied, report.domains_kept = done.domains_copied, done.domains_kept
    report.accounts_copied, report.accounts_kept = done.accounts_copied, done.accounts_kept
    report.accounts_removed = done.accounts_removed
    report.aliases, report.dkim_keys = len(directory.aliases), len(directory.dkim_keys)

    show.phase("mailboxes")
    plans: list[_Plan] = []
    async with source.read() as tx:
        for account in directory.accounts:
            boxes = await tx.mailboxes(account.id)
            mapping, copied, kept, removed = await target.sync_mailboxes(
                ident, done.accounts[account.id], boxes
            )
            report.mailboxes_copied += copied
            report.mailboxes_kept += kept
            report.mailboxes_removed += removed
            for box in boxes:
                plans.append(await _plan_mailbox(tx, target, mapping[box.id], box, report))

    total = sum(len(p.missing) for p in plans)
    total_bytes = sum(r.size for p in plans for r in p.missing)
    show.phase(
        f"messages: {total} to copy ({total_bytes} bytes), {report.messages_kept} already there"
    )
    show.start(total, total_bytes)
    for plan in plans:
        await _copy_messages(source, target, ident, plan, batch, report, show)
        await target.finish_mailbox(plan.target, plan.source.uidnext, plan.source.highestmodseq)
    show.done()

    show.phase("outbound queue")
    await _copy_queue(source, target, ident, batch, report)

    show.phase("verifying UIDs")
    async with source.read() as tx:
        for plan in plans:
            want = await tx.uids(plan.source.id)
            have = await target.target_uids(plan.target)
            if want != have:
                owner = next(
                    (a.address for a in directory.accounts if a.id == plan.source.account_id), "?"
                )
                report.mismatched.append(f"{owner} {plan.source.name}")
    if report.verified:
        await target.finish(ident)
    return report


async def _plan_mailbox(
    tx: ReadTx, target: CopyTarget, target_id: MailboxId, box: Mailbox, report: CopyReport
) -> _Plan:
    """Bring the mailbox's existing messages in line; return what is still to copy."""
    rows = await tx.messages(box.id)
    have = await target.message_state(target_id)
    wanted = {r.uid for r in rows}
    remove = sorted(u for u in have if u not in wanted)
    reflag: list[tuple[Uid, int, frozenset[str]]] = []
    missing: list[MessageRow] = []
    for r in rows:
        known = have.get(r.uid)
        if known is None:
            missing.append(r)
            continue
        report.messages_kept += 1
        if known != (r.modseq, flags_text(r.flags)):
            reflag.append((r.uid, r.modseq, r.flags))
    if remove or reflag:
        await target.apply_changes(target_id, remove, reflag)
    report.messages_removed += len(remove)
    report.messages_reflagged += len(reflag)
    return _Plan(target_id, box, missing)


async def _read_blobs(
    source: Store, refs: Mapping[int, int]
) -> tuple[dict[int, bytes], set[int]]:
    """Bytes of these source blobs (id → size); and the ids that are gone meanwhile."""
    got: dict[int, bytes] = {}
    gone: set[int] = set()
    async with source.read() as tx:
        try:
            return await tx.read_blobs([BlobRef(i, size) for i, size in refs.items()]), gone
        except StorageError as e:
            if e.kind is not StorageErrorKind.NOT_FOUND:
                raise
        # Some were freed since the rows were read (expunged meanwhile): one at a time.
        for blob_id, size in refs.items():
            try:
                got[blob_id] = await tx.read_blob(BlobRef(blob_id, size))
            except StorageError as e:
                if e.kind is not StorageErrorKind.NOT_FOUND:
                    raise
                gone.add(blob_id)
    return got, gone


def _batches(rows: Sequence[MessageRow], batch: int) -> list[list[MessageRow]]:
    out: list[list[MessageRow]] = []
    current: list[MessageRow] = []
    size = 0
    for r in rows:
        if current and (len(current) >= batch or size + r.size > BATCH_BYTES):
            out.append(current)
            current, size = [], 0
        current.append(r)
        size += r.size
    if current:
        out.append(current)
    return out


async def _copy_messages(
    source: Store, target: CopyTarget, ident: str, plan: _Plan, batch: int,
    report: CopyReport, show: Progress,
) -> None:
    for rows in _batches(plan.missing, batch):
        known = await target.known_blobs(ident, sorted({r.blob.id for r in rows}))
        need = {r.blob.id: r.blob.size for r in rows if r.blob.id not in known}
        blobs, gone = await _read_blobs(source, need)
        keep = [r for r in rows if r.blob.id not in gone]
        report.blobs_copied += await target.insert_messages(ident, plan.target, keep, blobs)
        report.messages_copied += len(keep)
        report.messages_vanished += len(rows) - len(keep)
        report.bytes_copied += sum(r.size for r in keep)
        show.advance(len(rows), sum(r.size for r in rows))


async def _copy_queue(
    source: Store, target: CopyTarget, ident: str, batch: int, report: CopyReport
) -> None:
    async with source.read() as tx:
        entries = await tx.queue_entries(_ALL)
        errors = {row.id: row.last_error for row in await tx.outbound(_ALL)}
    items = [QueueItem(e, errors.get(e.id)) for e in entries]
    report.queue_removed = await target.sync_queue_removed(ident, [e.id for e in entries])
    known = await target.known_queue(ident)
    old = [i for i in items if i.entry.id in known]
    new = [i for i in items if i.entry.id not in known]
    await target.update_queue(ident, old)
    report.queue_kept = len(old)
    for start in range(0, len(new), batch):
        chunk = new[start : start + batch]
        have = await target.known_blobs(ident, sorted({i.entry.blob.id for i in chunk}))
        need = {i.entry.blob.id: i.entry.blob.size for i in chunk if i.entry.blob.id not in have}
        blobs, gone = await _read_blobs(source, need)
        chunk = [i for i in chunk if i.entry.blob.id not in gone]  # dequeued meanwhile
        await target.insert_queue(ident, chunk, blobs)
        report.queue_copied += len(chunk)
