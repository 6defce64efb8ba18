"""The async ``ReadTx``/``WriteTx`` objects: each method runs one ``ops`` function in a thread.

A transaction object does not know which thread or connection it runs on: it hands each
operation to a ``Runner`` (a reader from the pool, or the writer inside a group-commit
batch). That keeps the SQL in ``ops.py`` and the threading in ``store.py``/``writer.py``.

Invariants:
- No SQLite call happens on the event loop thread: every method awaits the runner.
- A method of ``SqliteWriteTx`` that changes data is atomic: if it raises, the transaction
  is as it was before the call (the runner wraps it in its own SAVEPOINT), so the caller
  may catch the ``StorageError`` and go on using the transaction.
- A transaction object is dead once its ``async with`` block has exited: every method then
  raises ``RuntimeError`` instead of touching someone else's transaction.
- A write transaction's ``changes`` holds the ``Change``s of its operations that
  succeeded, in order, and nothing from a call that raised. They are recorded in the
  writer thread as the operation returns — before its savepoint is released, so even a
  caller cancelled mid-call cannot lose them — and published by the writer only after
  the COMMIT (``writer.py``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import BinaryIO, Protocol, TypeVar

from postkeep.store.api import (
    Account,
    AccountId,
    Alias,
    BlobRef,
    Change,
    DkimKey,
    Domain,
    Exposure,
    FlagChange,
    FlagOp,
    Mailbox,
    MailboxId,
    MessageRow,
    OutboundRow,
    QueueEntry,
    QueueId,
    RecipientState,
    Uid,
)
from postkeep.store.sqlite import ops

T = TypeVar("T")


class Runner(Protocol):
    async def run(self, op: Callable[[sqlite3.Connection], T], *, changes: bool) -> T:
        """Run ``op`` on this transaction's connection, in its thread.

        ``changes=True``: the operation writes, so it gets a savepoint of its own.
        """
        ...


class SqliteReadTx:
    """Implements ``postkeep.store.api.ReadTx``."""

    __slots__ = ("_runner",)

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def domain_exists(self, name: str) -> bool:
        return await self._runner.run(lambda c: ops.domain_exists(c, name), changes=False)

    async def list_domains(self) -> list[Domain]:
        return await self._runner.run(ops.list_domains, changes=False)

    async def get_account(self, address: str) -> Account | None:
        return await self._runner.run(lambda c: ops.get_account(c, address), changes=False)

    async def list_accounts(self, domain: str | None = None) -> list[Account]:
        return await self._runner.run(lambda c: ops.list_accounts(c, domain), changes=False)

    async def exposures(self, address: str | None = None) -> list[Exposure]:
        return await self._runner.run(lambda c: ops.exposures(c, address), changes=False)

    async def alias_targets(self, source: str) -> list[str]:
        return await self._runner.run(lambda c: ops.alias_targets(c, source), changes=False)

    async def list_aliases(self, source: str | None = None) -> list[Alias]:
        return await self._runner.run(lambda c: ops.list_aliases(c, source), changes=False)

    async def dkim_keys(self, domain: str) -> list[DkimKey]:
        return await self._runner.run(lambda c: ops.dkim_keys(c, domain), changes=False)

    async def mailboxes(self, account_id: AccountId) -> list[Mailbox]:
        return await self._runner.run(lambda c: ops.mailboxes(c, account_id), changes=False)

    async def mailbox(self, account_id: AccountId, name: str) -> Mailbox | None:
        return await self._runner.run(lambda c: ops.mailbox(c, account_id, name), changes=False)

    async def mailbox_by_id(self, mailbox_id: MailboxId) -> Mailbox | None:
        return await self._runner.run(lambda c: ops.mailbox_by_id(c, mailbox_id), changes=False)

    async def uids(self, mailbox_id: MailboxId) -> list[Uid]:
        return await self._runner.run(lambda c: ops.uids(c, mailbox_id), changes=False)

    async def messages_since(self, mailbox_id: MailboxId, modseq: int) -> list[MessageRow]:
        return await self._runner.run(
            lambda c: ops.messages_since(c, mailbox_id, modseq), changes=False
        )

    async def maildrop_holder(self, account_id: AccountId) -> str | None:
        return await self._runner.run(lambda c: ops.maildrop_holder(c, account_id), changes=False)

    async def messages(
        self, mailbox_id: MailboxId, uids: Sequence[Uid] | None = None
    ) -> list[MessageRow]:
        return await self._runner.run(lambda c: ops.messages(c, mailbox_id, uids), changes=False)

    async def read_blob(self, ref: BlobRef, offset: int = 0, length: int | None = None) -> bytes:
        return await self._runner.run(
            lambda c: ops.read_blob(c, ref, offset, length), changes=False
        )

    async def read_blobs(
        self, refs: Sequence[BlobRef], length: int | None = None
    ) -> dict[int, bytes]:
        return await self._runner.run(lambda c: ops.read_blobs(c, refs, length), changes=False)

    async def outbound(self, limit: int = 100) -> list[OutboundRow]:
        return await self._runner.run(lambda c: ops.outbound(c, limit), changes=False)

    async def queue_entries(self, limit: int = 100) -> list[QueueEntry]:
        return await self._runner.run(lambda c: ops.queue_entries(c, limit), changes=False)


class SqliteWriteTx(SqliteReadTx):
    """Implements ``postkeep.store.api.WriteTx``; reads see this transaction's own changes."""

    __slots__ = ("changes",)

    def __init__(self, runner: Runner) -> None:
        super().__init__(runner)
        #: What this transaction did to mailboxes, for ``store.changes`` after the COMMIT.
        self.changes: list[Change] = []

    async def _logged(self, op: Callable[[sqlite3.Connection, list[Change]], T]) -> T:
        """Run a changing operation and record its changes if (and only if) it returns."""
        changes = self.changes

        def run(conn: sqlite3.Connection) -> T:
            mine: list[Change] = []
            result = op(conn, mine)
            changes.extend(mine)  # in the writer thread, before the savepoint is released
            return result

        return await self._runner.run(run, changes=True)

    async def add_domain(self, name: str) -> Domain:
        return await self._runner.run(lambda c: ops.add_domain(c, name), changes=True)

    async def del_domain(self, name: str) -> None:
        await self._runner.run(lambda c: ops.del_domain(c, name), changes=True)

    async def add_account(self, address: str, password_hash: str) -> Account:
        return await self._logged(lambda c, log: ops.add_account(c, address, password_hash, log))

    async def set_password(self, address: str, password_hash: str) -> None:
        await self._runner.run(lambda c: ops.set_password(c, address, password_hash), changes=True)

    async def record_exposure(
        self, address: str, peer: str, service: str, when: datetime, notify_every: timedelta
    ) -> bool:
        return await self._runner.run(
            lambda c: ops.record_exposure(c, address, peer, service, when, notify_every),
            changes=True,
        )

    async def clear_exposures(self, address: str) -> int:
        return await self._runner.run(lambda c: ops.clear_exposures(c, address), changes=True)

    async def del_account(self, address: str) -> None:
        await self._logged(lambda c, log: ops.del_account(c, address, log))

    async def add_alias(self, source: str, target: str) -> Alias:
        return await self._runner.run(lambda c: ops.add_alias(c, source, target), changes=True)

    async def del_alias(self, source: str, target: str) -> None:
        await self._runner.run(lambda c: ops.del_alias(c, source, target), changes=True)

    async def add_dkim_key(
        self, domain: str, selector: str, algorithm: str, private_pem: str, public_txt: str
    ) -> DkimKey:
        return await self._runner.run(
            lambda c: ops.add_dkim_key(c, domain, selector, algorithm, private_pem, public_txt),
            changes=True,
        )

    async def create_mailbox(
        self, account_id: AccountId, name: str, special_use: str | None = None
    ) -> Mailbox:
        return await self._logged(
            lambda c, log: ops.create_mailbox(c, account_id, name, special_use, log)
        )

    async def put_blob(self, data: bytes | BinaryIO, size: int | None = None) -> BlobRef:
        # The file object is read in the writer thread, chunk by chunk (rules.BLOB_CHUNK).
        return await self._runner.run(lambda c: ops.put_blob(c, data, size), changes=True)

    async def append(
        self,
        mailbox_id: MailboxId,
        blob: BlobRef,
        flags: frozenset[str] = frozenset(),
        when: datetime | None = None,
        envelope: str | None = None,
        bodystructure: str | None = None,
    ) -> Uid:
        return await self._logged(
            lambda c, log: ops.append(
                c, mailbox_id, blob, flags, when, envelope, bodystructure, log
            )
        )

    async def enqueue(self, sender: str, recipients: Sequence[str], blob: BlobRef) -> QueueId:
        return await self._runner.run(
            lambda c: ops.enqueue(c, sender, recipients, blob), changes=True
        )

    async def claim_due(
        self, now: datetime, limit: int, holder: str, lease_seconds: float
    ) -> list[QueueEntry]:
        return await self._runner.run(
            lambda c: ops.claim_due(c, now, limit, holder, lease_seconds), changes=True
        )

    async def record_attempt(
        self,
        queue_id: QueueId,
        holder: str,
        results: Mapping[str, tuple[RecipientState, str | None]],
        next_attempt: datetime | None = None,
        delay_notified: bool | None = None,
    ) -> bool:
        given = dict(results)  # a snapshot: the caller may change its mapping meanwhile
        return await self._runner.run(
            lambda c: ops.record_attempt(c, queue_id, holder, given, next_attempt,
                                         delay_notified),
            changes=True,
        )

    async def release_leases(self, holder_prefix: str) -> int:
        return await self._runner.run(
            lambda c: ops.release_leases(c, holder_prefix), changes=True
        )

    async def dequeue(self, queue_id: QueueId) -> bool:
        return await self._runner.run(lambda c: ops.dequeue(c, queue_id), changes=True)

    async def retry(self, queue_id: QueueId | None = None) -> int:
        return await self._runner.run(lambda c: ops.retry(c, queue_id), changes=True)

    async def set_flags(
        self,
        mailbox_id: MailboxId,
        uids: Sequence[Uid],
        op: FlagOp,
        flags: frozenset[str],
        unchanged_since: int | None = None,
    ) -> tuple[list[FlagChange], list[Uid]]:
        return await self._logged(
            lambda c, log: ops.set_flags(c, mailbox_id, uids, op, flags, unchanged_since, log)
        )

    async def expunge(self, mailbox_id: MailboxId, uids: Sequence[Uid]) -> list[Uid]:
        return await self._logged(lambda c, log: ops.expunge(c, mailbox_id, uids, log))

    async def copy(
        self, src: MailboxId, uids: Sequence[Uid], dst: MailboxId
    ) -> list[tuple[Uid, Uid]]:
        return await self._logged(lambda c, log: ops.copy(c, src, uids, dst, log))

    async def move(
        self, src: MailboxId, uids: Sequence[Uid], dst: MailboxId
    ) -> list[tuple[Uid, Uid]]:
        return await self._logged(lambda c, log: ops.move(c, src, uids, dst, log))

    async def rename_mailbox(self, mailbox_id: MailboxId, new_name: str) -> None:
        await self._logged(lambda c, log: ops.rename_mailbox(c, mailbox_id, new_name, log))

    async def delete_mailbox(self, mailbox_id: MailboxId) -> None:
        await self._logged(lambda c, log: ops.delete_mailbox(c, mailbox_id, log))

    async def set_subscribed(self, mailbox_id: MailboxId, subscribed: bool) -> None:
        await self._runner.run(
            lambda c: ops.set_subscribed(c, mailbox_id, subscribed), changes=True
        )

    async def acquire_maildrop(self, account_id: AccountId, holder: str, ttl: float) -> bool:
        return await self._runner.run(
            lambda c: ops.acquire_maildrop(c, account_id, holder, ttl), changes=True
        )

    async def release_maildrop(self, account_id: AccountId, holder: str) -> None:
        await self._runner.run(lambda c: ops.release_maildrop(c, account_id, holder), changes=True)
