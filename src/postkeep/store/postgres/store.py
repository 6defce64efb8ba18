"""``PostgresStore``: the ``Store`` on PostgreSQL through an asyncpg connection pool.

A write transaction (``async with store.write()``, a *block*) runs in a PostgreSQL
transaction (READ COMMITTED, with row locks where a value is read and then written:
mailbox rows for UIDs and modseqs, ``FOR UPDATE SKIP LOCKED`` for queue claims) that
blocks ready at the same moment share, with one COMMIT: group commit (``batch.py``). Each
block after the first of a transaction runs in a SAVEPOINT of its own, so a block that
raises is undone alone. A changing call that raises leaves its block as it was and the
caller may go on: the first changing call in a transaction that holds no work yet runs
without a SAVEPOINT (if it raises, the empty transaction is rolled back and begun again),
every later one in a SAVEPOINT of its own. A SAVEPOINT is released only when the next one
is taken (``RELEASE …; SAVEPOINT …`` in one round trip) or by the COMMIT. A read
transaction is a REPEATABLE READ, READ ONLY snapshot.

Invariants:
- ``async with store.write()`` returns only after COMMIT returned, with
  ``synchronous_commit = on`` set on every connection: the COMMIT is in the server's
  durable WAL (and on synchronous standbys, if the operator configured any) before the
  caller may acknowledge anything. A COMMIT that failed or whose outcome is unknown (the
  connection dropped) raises TEMP in every block it carried: the sender retries, so a
  message may arrive twice, never zero times.
- Changes are published on ``store.changes`` after COMMIT, never for a rolled-back
  transaction or a call that raised: locally right after the COMMIT, and to the other
  nodes by a NOTIFY sent inside the transaction (delivered only if it commits). Each node
  LISTENs on one extra connection and feeds what other nodes did into its
  ``LocalChangeFeed`` (``notify.py``). While that connection is down (it is reopened),
  other nodes' changes are not heard; sessions still see them when they next read.
- One batch is one pooled connection; its blocks take turns and each block's calls are
  serialised by a lock (asyncpg runs one query at a time per connection). A write block
  must await only the store (as with SQLite's writer): a slow block stalls its batch.
  A transaction object is dead after its block.
- Pooled connections keep no session state (no SET, LISTEN, session advisory lock or
  cursor outside a transaction: LISTEN has its own connection, the migration lock is
  transaction-level), so the pool returns a connection without asyncpg's reset query
  (one round trip less per transaction); asyncpg still rolls back an open transaction.
- No asyncpg exception leaves the package: callers see ``StorageError``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, BinaryIO, TypeAlias, TypeVar

import asyncpg

from postkeep.store.api import (
    Account,
    AccountId,
    Alias,
    BlobRef,
    Change,
    ChangeFeed,
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
    ReadTx,
    RecipientState,
    StorageError,
    StorageErrorKind,
    StoreStats,
    Uid,
    WriteTx,
)
from postkeep.store.feed import DEFAULT_BACKLOG, LocalChangeFeed
from postkeep.store.postgres import ops
from postkeep.store.postgres.batch import (
    DEFAULT_BATCH_CAP,
    DEFAULT_BATCH_WINDOW,
    Batch,
    Batcher,
    Block,
)
from postkeep.store.postgres.migrate import migrate
from postkeep.store.postgres.notify import CHANNEL, decode, encode

log = logging.getLogger(__name__)

T = TypeVar("T")
#: An ``asyncpg.Connection`` (asyncpg ships no type information).
Conn: TypeAlias = Any

#: Per-connection settings. synchronous_commit is the durability point of the store
#: (a cluster default of "off" or "local" must not weaken it).
SERVER_SETTINGS = {"synchronous_commit": "on", "application_name": "postkeep"}


def convert(e: BaseException, doing: str = "") -> StorageError:
    """The ``StorageError`` for an asyncpg or connection error. Raise it ``from e``."""
    detail = f"{doing}: {type(e).__name__}: {e}" if doing else f"{type(e).__name__}: {e}"
    if isinstance(e, asyncpg.UniqueViolationError):
        return StorageError(StorageErrorKind.EXISTS, detail)
    if isinstance(e, asyncpg.ForeignKeyViolationError):
        return StorageError(StorageErrorKind.NOT_FOUND, detail)
    if isinstance(e, asyncpg.IntegrityConstraintViolationError):
        # CHECK / NOT NULL: the data breaks a rule of the schema; retrying will not help.
        return StorageError(StorageErrorKind.PERM, detail)
    if isinstance(e, asyncpg.ProgramLimitExceededError):
        return StorageError(StorageErrorKind.LIMIT, detail)
    # Connection problems, serialization failures, deadlocks, a server shutting down,
    # disk full…: TEMP, the safe answer for mail (4xx, the sender retries).
    return StorageError(StorageErrorKind.TEMP, detail)


_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


async def _keep_session(_conn: Conn) -> None:
    """The pool's reset: nothing to undo (see the module docstring)."""


class PgReadTx:
    """Implements ``postkeep.store.api.ReadTx``."""

    __slots__ = ("_conn", "_lock", "active")

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()
        self.active = True

    async def _read(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        async with self._lock:
            if not self.active:
                raise RuntimeError("this transaction has ended")
            try:
                return await op(self._conn)
            except _ERRORS as e:
                raise convert(e) from e

    async def domain_exists(self, name: str) -> bool:
        return await self._read(lambda c: ops.domain_exists(c, name))

    async def list_domains(self) -> list[Domain]:
        return await self._read(ops.list_domains)

    async def get_account(self, address: str) -> Account | None:
        return await self._read(lambda c: ops.get_account(c, address))

    async def list_accounts(self, domain: str | None = None) -> list[Account]:
        return await self._read(lambda c: ops.list_accounts(c, domain))

    async def exposures(self, address: str | None = None) -> list[Exposure]:
        return await self._read(lambda c: ops.exposures(c, address))

    async def alias_targets(self, source: str) -> list[str]:
        return await self._read(lambda c: ops.alias_targets(c, source))

    async def list_aliases(self, source: str | None = None) -> list[Alias]:
        return await self._read(lambda c: ops.list_aliases(c, source))

    async def dkim_keys(self, domain: str) -> list[DkimKey]:
        return await self._read(lambda c: ops.dkim_keys(c, domain))

    async def mailboxes(self, account_id: AccountId) -> list[Mailbox]:
        return await self._read(lambda c: ops.mailboxes(c, account_id))

    async def mailbox(self, account_id: AccountId, name: str) -> Mailbox | None:
        return await self._read(lambda c: ops.mailbox(c, account_id, name))

    async def mailbox_by_id(self, mailbox_id: MailboxId) -> Mailbox | None:
        return await self._read(lambda c: ops.mailbox_by_id(c, mailbox_id))

    async def uids(self, mailbox_id: MailboxId) -> list[Uid]:
        return await self._read(lambda c: ops.uids(c, mailbox_id))

    async def messages_since(self, mailbox_id: MailboxId, modseq: int) -> list[MessageRow]:
        return await self._read(lambda c: ops.messages_since(c, mailbox_id, modseq))

    async def maildrop_holder(self, account_id: AccountId) -> str | None:
        return await self._read(lambda c: ops.maildrop_holder(c, account_id))

    async def messages(
        self, mailbox_id: MailboxId, uids: Sequence[Uid] | None = None
    ) -> list[MessageRow]:
        return await self._read(lambda c: ops.messages(c, mailbox_id, uids))

    async def read_blob(self, ref: BlobRef, offset: int = 0, length: int | None = None) -> bytes:
        return await self._read(lambda c: ops.read_blob(c, ref, offset, length))

    async def read_blobs(
        self, refs: Sequence[BlobRef], length: int | None = None
    ) -> dict[int, bytes]:
        return await self._read(lambda c: ops.read_blobs(c, refs, length))

    async def outbound(self, limit: int = 100) -> list[OutboundRow]:
        return await self._read(lambda c: ops.outbound(c, limit))

    async def queue_entries(self, limit: int = 100) -> list[QueueEntry]:
        return await self._read(lambda c: ops.queue_entries(c, limit))


class PgWriteTx(PgReadTx):
    """Implements ``postkeep.store.api.WriteTx``; reads see this transaction's own changes
    (and those of the blocks before it in its batch)."""

    __slots__ = ("_block", "changes")

    def __init__(self, block: Block) -> None:
        super().__init__(block.batch.conn)
        #: What this transaction did to mailboxes, for ``store.changes`` after the COMMIT.
        self.changes: list[Change] = []
        self._block = block

    async def _write(self, op: Callable[[Conn, list[Change]], Awaitable[T]]) -> T:
        """Run a changing operation so that, if it raises, the transaction is as it was;
        keep its changes if it returned."""
        async with self._lock:
            if not self.active:
                raise RuntimeError("this transaction has ended")
            mine: list[Change] = []
            try:
                result = await self._block.call(lambda c: op(c, mine))
            except _ERRORS as e:
                raise convert(e) from e
            self.changes.extend(mine)
            return result

    async def _plain(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._write(lambda c, _log: op(c))

    async def add_domain(self, name: str) -> Domain:
        return await self._plain(lambda c: ops.add_domain(c, name))

    async def del_domain(self, name: str) -> None:
        await self._plain(lambda c: ops.del_domain(c, name))

    async def add_account(self, address: str, password_hash: str) -> Account:
        return await self._write(lambda c, log: ops.add_account(c, address, password_hash, log))

    async def set_password(self, address: str, password_hash: str) -> None:
        await self._plain(lambda c: ops.set_password(c, address, password_hash))

    async def record_exposure(
        self, address: str, peer: str, service: str, when: datetime, notify_every: timedelta
    ) -> bool:
        return await self._plain(
            lambda c: ops.record_exposure(c, address, peer, service, when, notify_every)
        )

    async def clear_exposures(self, address: str) -> int:
        return await self._plain(lambda c: ops.clear_exposures(c, address))

    async def del_account(self, address: str) -> None:
        await self._write(lambda c, log: ops.del_account(c, address, log))

    async def add_alias(self, source: str, target: str) -> Alias:
        return await self._plain(lambda c: ops.add_alias(c, source, target))

    async def del_alias(self, source: str, target: str) -> None:
        await self._plain(lambda c: ops.del_alias(c, source, target))

    async def add_dkim_key(
        self, domain: str, selector: str, algorithm: str, private_pem: str, public_txt: str
    ) -> DkimKey:
        return await self._plain(
            lambda c: ops.add_dkim_key(c, domain, selector, algorithm, private_pem, public_txt)
        )

    async def create_mailbox(
        self, account_id: AccountId, name: str, special_use: str | None = None
    ) -> Mailbox:
        return await self._write(
            lambda c, log: ops.create_mailbox(c, account_id, name, special_use, log)
        )

    async def put_blob(self, data: bytes | BinaryIO, size: int | None = None) -> BlobRef:
        return await self._plain(lambda c: ops.put_blob(c, data, size))

    async def append(
        self,
        mailbox_id: MailboxId,
        blob: BlobRef,
        flags: frozenset[str] = frozenset(),
        when: datetime | None = None,
        envelope: str | None = None,
        bodystructure: str | None = None,
    ) -> Uid:
        return await self._write(
            lambda c, log: ops.append(c, mailbox_id, blob, flags, when, envelope, bodystructure,
                                      log)
        )

    async def enqueue(self, sender: str, recipients: Sequence[str], blob: BlobRef) -> QueueId:
        return await self._plain(lambda c: ops.enqueue(c, sender, recipients, blob))

    async def claim_due(
        self, now: datetime, limit: int, holder: str, lease_seconds: float
    ) -> list[QueueEntry]:
        return await self._plain(lambda c: ops.claim_due(c, now, limit, holder, lease_seconds))

    async def record_attempt(
        self,
        queue_id: QueueId,
        holder: str,
        results: Mapping[str, tuple[RecipientState, str | None]],
        next_attempt: datetime | None = None,
        delay_notified: bool | None = None,
    ) -> bool:
        given = dict(results)  # a snapshot: the caller may change its mapping meanwhile
        return await self._plain(
            lambda c: ops.record_attempt(c, queue_id, holder, given, next_attempt, delay_notified)
        )

    async def release_leases(self, holder_prefix: str) -> int:
        return await self._plain(lambda c: ops.release_leases(c, holder_prefix))

    async def dequeue(self, queue_id: QueueId) -> bool:
        return await self._plain(lambda c: ops.dequeue(c, queue_id))

    async def retry(self, queue_id: QueueId | None = None) -> int:
        return await self._plain(lambda c: ops.retry(c, queue_id))

    async def set_flags(
        self,
        mailbox_id: MailboxId,
        uids: Sequence[Uid],
        op: FlagOp,
        flags: frozenset[str],
        unchanged_since: int | None = None,
    ) -> tuple[list[FlagChange], list[Uid]]:
        return await self._write(
            lambda c, log: ops.set_flags(c, mailbox_id, uids, op, flags, unchanged_since, log)
        )

    async def expunge(self, mailbox_id: MailboxId, uids: Sequence[Uid]) -> list[Uid]:
        return await self._write(lambda c, log: ops.expunge(c, mailbox_id, uids, log))

    async def copy(
        self, src: MailboxId, uids: Sequence[Uid], dst: MailboxId
    ) -> list[tuple[Uid, Uid]]:
        return await self._write(lambda c, log: ops.copy(c, src, uids, dst, log))

    async def move(
        self, src: MailboxId, uids: Sequence[Uid], dst: MailboxId
    ) -> list[tuple[Uid, Uid]]:
        return await self._write(lambda c, log: ops.move(c, src, uids, dst, log))

    async def rename_mailbox(self, mailbox_id: MailboxId, new_name: str) -> None:
        await self._write(lambda c, log: ops.rename_mailbox(c, mailbox_id, new_name, log))

    async def delete_mailbox(self, mailbox_id: MailboxId) -> None:
        await self._write(lambda c, log: ops.delete_mailbox(c, mailbox_id, log))

    async def set_subscribed(self, mailbox_id: MailboxId, subscribed: bool) -> None:
        await self._plain(lambda c: ops.set_subscribed(c, mailbox_id, subscribed))

    async def acquire_maildrop(self, account_id: AccountId, holder: str, ttl: float) -> bool:
        return await self._plain(lambda c: ops.acquire_maildrop(c, account_id, holder, ttl))

    async def release_maildrop(self, account_id: AccountId, holder: str) -> None:
        await self._plain(lambda c: ops.release_maildrop(c, account_id, holder))


class PostgresStore:
    """Implements ``postkeep.store.api.Store`` on a PostgreSQL database (``dsn``)."""

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout: float = 10.0,
        change_backlog: int = DEFAULT_BACKLOG,
        batch_cap: int = DEFAULT_BATCH_CAP,
        batch_window: float = DEFAULT_BATCH_WINDOW,
    ) -> None:
        if not 1 <= min_connections <= max_connections:
            raise ValueError("need 1 <= min_connections <= max_connections")
        if batch_cap < 1:
            raise ValueError("batch_cap must be at least 1")
        #: Most write blocks one COMMIT carries (1: every block commits alone), and the
        #: longest a batch stays open while blocks still join it (``batch.py``).
        self._batch_cap = batch_cap
        self._batch_window = batch_window
        self._batcher: Batcher | None = None
        self._dsn = dsn
        self._min = min_connections
        self._max = max_connections
        self._timeout = connect_timeout
        self.stats = StoreStats()
        self._feed = LocalChangeFeed(change_backlog)
        self.changes: ChangeFeed = self._feed
        #: Migration versions the last ``open()`` applied; ``()`` when the schema was current.
        self.migrated: tuple[int, ...] = ()
        self._pool: asyncpg.Pool | None = None
        self._state = "new"  # new → open → closed
        #: This store's id in NOTIFY payloads: its own changes are published locally.
        self.node = uuid.uuid4().hex
        self._listener: Any = None
        self._listen_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        if self._state == "open":
            return
        if self._state == "closed":
            raise RuntimeError("a closed PostgresStore cannot be opened again; make a new one")
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min,
                max_size=self._max,
                timeout=self._timeout,
                server_settings=SERVER_SETTINGS,
                reset=_keep_session,
            )
        except _ERRORS as e:
            # The DSN may hold a password: say which server, not the DSN.
            raise convert(e, "cannot connect to PostgreSQL") from e
        try:
            async with pool.acquire() as conn:
                self.migrated = await migrate(conn)
        except BaseException as e:
            await pool.close()
            self._state = "closed"
            if isinstance(e, _ERRORS):
                raise convert(e, "migrating the schema") from e
            raise
        self._pool = pool
        self._batcher = Batcher(acquire=self._acquire, release=self._release,
                                commit=self._commit, stats=self.stats,
                                batch_cap=self._batch_cap, batch_window=self._batch_window)
        try:
            await self._listen()
        except _ERRORS as e:
            await pool.close()
            self._state = "closed"
            raise convert(e, "LISTEN") from e
        self._state = "open"
        log.info("store.postgres.open", extra={"migrated": list(self.migrated)})

    async def close(self) -> None:
        if self._state == "closed":
            return
        was_open = self._state == "open"
        self._state = "closed"
        if self._listen_task is not None:
            self._listen_task.cancel()
            await asyncio.gather(self._listen_task, return_exceptions=True)
        await self._unlisten()
        if self._batcher is not None:
            await self._batcher.close()  # admitted blocks and their COMMIT first
        self._feed.close()
        if was_open and self._pool is not None:
            # Waits for every acquired connection (every open transaction) to come back.
            await self._pool.close()
            self._pool = None

    async def _listen(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, timeout=self._timeout, server_settings=SERVER_SETTINGS
        )
        conn.add_termination_listener(self._on_lost)
        await conn.add_listener(CHANNEL, self._on_notify)
        self._listener = conn

    async def _unlisten(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            conn.remove_termination_listener(self._on_lost)
            try:
                await conn.close(timeout=self._timeout)
            except _ERRORS:
                conn.terminate()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        got = decode(payload)
        if got is None:
            log.warning("store.postgres.notify_ignored", extra={"bytes": len(payload)})
            return
        node, changes = got
        if node != self.node:
            self._feed.publish(changes)

    def _on_lost(self, _conn: Any) -> None:
        if self._state == "open" and self._listen_task is None:
            log.error("store.postgres.listen_lost")
            self._listen_task = asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self) -> None:
        delay = 0.5
        try:
            while self._state == "open":
                await asyncio.sleep(delay)
                try:
                    await self._listen()
                except _ERRORS:
                    delay = min(delay * 2, 30.0)
                    continue
                log.info("store.postgres.listen_restored")
                return
        finally:
            self._listen_task = None

    def read(self) -> AbstractAsyncContextManager[ReadTx]:
        return self._read()

    def write(self) -> AbstractAsyncContextManager[WriteTx]:
        return self._write()

    async def _acquire(self) -> Any:
        if self._state != "open" or self._pool is None:
            raise StorageError(StorageErrorKind.TEMP, "the store is closed or not open")
        try:
            return await self._pool.acquire(timeout=self._timeout)
        except _ERRORS as e:
            raise convert(e, "getting a connection") from e

    async def _release(self, conn: Conn) -> None:
        assert self._pool is not None
        await self._pool.release(conn)

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[ReadTx]:
        conn = await self._acquire()
        tx = PgReadTx(conn)
        try:
            tr = conn.transaction(isolation="repeatable_read", readonly=True)
            try:
                await tr.start()
            except _ERRORS as e:
                raise convert(e, "starting a read transaction") from e
            try:
                yield tx
            finally:
                tx.active = False
                try:
                    await tr.rollback()  # read-only: nothing to keep
                except _ERRORS:
                    log.warning("store.postgres.read_end_failed")
        finally:
            await self._release(conn)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[WriteTx]:
        batcher = self._batcher
        if batcher is None:
            raise StorageError(StorageErrorKind.TEMP, "the store is closed or not open")
        # A write() inside a block of this task would wait for its own turn: it runs alone.
        batch, token = await batcher.begin(alone=self._batch_cap == 1 or batcher.nested())
        block = Block(batch)
        tx = PgWriteTx(block)
        try:
            yield tx
        except BaseException:
            tx.active = False
            await batcher.end(block, token, failed=True, wait_for=tx._lock, changes=())
            raise
        tx.active = False
        await batcher.end(block, token, failed=False, wait_for=tx._lock, changes=tx.changes)

    async def _commit(self, batch: Batch) -> None:
        """NOTIFY the batch's changes and COMMIT; publish them locally after the COMMIT."""
        conn = batch.conn
        try:
            # Inside the transaction: the other nodes hear of it only if it commits.
            for payload in encode(self.node, batch.changes):
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
            await batch.tr.commit()
        except _ERRORS as e:
            # Refused or outcome unknown: no member may acknowledge.
            if not conn.is_closed() and conn.is_in_transaction():
                try:
                    await batch.tr.rollback()
                except _ERRORS:
                    log.warning("store.postgres.rollback_failed")
            raise convert(e, "COMMIT") from e
        # After COMMIT only: subscribers never hear about a change they cannot read yet.
        self._feed.publish(batch.changes)
