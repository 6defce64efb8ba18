"""The PostgreSQL side of ``postkeep db copy``: rows written as they are in the source.

``PgImporter`` implements ``store.copy.CopyTarget``. Unlike ``ops`` (which allocates
UIDs, modseqs and UIDVALIDITYs, as a server must), it writes the source's own values, so
IMAP clients keep their caches (same UIDVALIDITY and UIDs) and POP3 clients their UIDL
lists (``<uidvalidity>.<uid>``, ``pop3/session.py``). What it copied is recorded in the
``copy_*`` tables (migration 3), in the same transaction as the rows themselves.

It works on one connection of its own, after ``PostgresStore(dsn).open()`` migrated the
schema. That connection holds a session advisory lock for the whole run: two copies into
one database at once are refused, and the lock goes when the process does, even killed.

Invariants:
- Every method that writes is one transaction, committed before it returns (with
  ``synchronous_commit = on``): a run killed at any moment leaves whole batches only.
- A target that holds a domain or an account not recorded as copied from this source is
  refused before anything is written.
- The ``uidvalidity`` counter ends at least at the highest UIDVALIDITY copied, so
  mailboxes created later on the target get larger values (RFC 3501 §2.3.1.1).
- Blobs are freed with their last message or queue entry, by ``ops.free_blobs``.
- No asyncpg exception leaves the module: callers see ``StorageError``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

import asyncpg

from postkeep.store.api import (
    Mailbox,
    MailboxId,
    MessageRow,
    StorageError,
    StorageErrorKind,
    Uid,
)
from postkeep.store.copy import CopyRefused, Directory, DirectoryResult, QueueItem
from postkeep.store.postgres.ops import free_blobs
from postkeep.store.postgres.store import SERVER_SETTINGS, PostgresStore, convert
from postkeep.store.rules import flags_text, from_us, internal_date, now_us, to_us

#: An ``asyncpg.Connection`` (asyncpg ships no type information).
Conn: TypeAlias = Any
T = TypeVar("T")

_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)
#: pg_try_advisory_lock key of a running copy: "pkcopy" in ASCII.
_COPY_LOCK = 0x706B636F7079
#: Names a client cannot create (the control character), used while renaming mailboxes.
_PARKED = "E'\\x01copy ' || id"


class PgImporter:
    """Implements ``postkeep.store.copy.CopyTarget`` on the PostgreSQL database ``dsn``."""

    def __init__(self, dsn: str, *, connect_timeout: float = 10.0) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout
        self._conn: Conn = None
        #: Migration versions ``open()`` applied to the target (``()``: it was current).
        self.migrated: tuple[int, ...] = ()

    async def open(self) -> None:
        store = PostgresStore(self._dsn, min_connections=1, max_connections=1,
                              connect_timeout=self._timeout)
        await store.open()  # creates or migrates the schema (raises StorageError)
        self.migrated = store.migrated
        await store.close()
        try:
            self._conn = await asyncpg.connect(
                self._dsn, timeout=self._timeout, server_settings=SERVER_SETTINGS
            )
        except _ERRORS as e:
            raise convert(e, "cannot connect to PostgreSQL") from e

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=self._timeout)
            except _ERRORS:
                conn.terminate()

    async def _run(self, op: Callable[[Conn], Awaitable[T]], *, tx: bool = True) -> T:
        if self._conn is None:
            raise StorageError(StorageErrorKind.TEMP, "the importer is not open")
        try:
            if not tx:
                return await op(self._conn)
            async with self._conn.transaction():
                return await op(self._conn)
        except _ERRORS as e:
            raise convert(e, "copying into PostgreSQL") from e

    # ------------------------------------------------------------ the run

    async def begin(self, source: str, label: str) -> datetime | None:
        async def locked(c: Conn) -> bool:
            return bool(await c.fetchval("SELECT pg_try_advisory_lock($1)", _COPY_LOCK))

        if not await self._run(locked, tx=False):
            raise CopyRefused(
                "another 'postkeep db copy' into this database is running; "
                "wait for it to end (or stop it), then run this again"
            )

        async def check(c: Conn) -> datetime | None:
            domains = [
                r[0] for r in await c.fetch(
                    "SELECT d.name FROM domains d WHERE NOT EXISTS (SELECT 1 FROM copy_domains"
                    " x WHERE x.source = $1 AND x.name = d.name) ORDER BY d.name", source,
                )
            ]
            accounts = [
                r[0] for r in await c.fetch(
                    "SELECT a.address FROM accounts a WHERE NOT EXISTS (SELECT 1 FROM"
                    " copy_accounts x WHERE x.source = $1 AND x.account_id = a.id)"
                    " ORDER BY a.address", source,
                )
            ]
            if domains or accounts:
                example = (domains or accounts)[0]
                raise CopyRefused(
                    f"the target database already holds {len(domains)} domain(s) and "
                    f"{len(accounts)} account(s) that were not copied from this source "
                    f"(for example {example}); refusing to merge two installations — "
                    "copy into an empty database"
                )
            finished = await c.fetchval(
                "SELECT finished FROM copy_sources WHERE source = $1", source
            )
            await c.execute(
                "INSERT INTO copy_sources (source, label, started) VALUES ($1, $2, $3)"
                " ON CONFLICT (source) DO UPDATE SET label = EXCLUDED.label",
                source, label, now_us(),
            )
            return None if finished is None else from_us(finished)

        return await self._run(check)

    async def finish(self, source: str) -> None:
        async def op(c: Conn) -> None:
            await c.execute(
                "UPDATE copy_sources SET finished = $2 WHERE source = $1", source, now_us()
            )

        await self._run(op)

    # ------------------------------------------------------------ directory

    async def sync_directory(self, source: str, directory: Directory) -> DirectoryResult:
        return await self._run(lambda c: self._sync_directory(c, source, directory))

    async def _sync_directory(self, c: Conn, source: str, d: Directory) -> DirectoryResult:
        mapped = {
            r[0]: r[1] for r in await c.fetch(
                "SELECT source_id, account_id FROM copy_accounts WHERE source = $1", source
            )
        }
        wanted = {a.id for a in d.accounts}
        gone = [target for src, target in mapped.items() if src not in wanted]
        if gone:
            blobs = [
                r[0] for r in await c.fetch(
                    "SELECT DISTINCT m.blob_id FROM messages m JOIN mailboxes x"
                    " ON x.id = m.mailbox_id WHERE x.account_id = ANY($1::bigint[])", gone,
                )
            ]
            await c.execute("DELETE FROM accounts WHERE id = ANY($1::bigint[])", gone)
            await free_blobs(c, blobs)
        # Aliases and DKIM keys are few: replaced wholesale (the target holds only what
        # copies from this source put there, checked by begin()).
        await c.execute("DELETE FROM aliases")
        await c.execute("DELETE FROM dkim_keys")
        names = {x.name for x in d.domains}
        await c.execute(
            "DELETE FROM domains WHERE name IN (SELECT name FROM copy_domains WHERE source = $1)"
            " AND NOT (name = ANY($2::text[]))", source, sorted(names),
        )
        have = {r[0] for r in await c.fetch("SELECT name FROM domains")}
        new_domains = [x for x in d.domains if x.name not in have]
        await c.executemany(
            "INSERT INTO domains (name, created) VALUES ($1, $2)",
            [(x.name, to_us(x.created)) for x in new_domains],
        )
        await c.executemany(
            "INSERT INTO copy_domains (source, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(source, x.name) for x in d.domains],
        )
        result: dict[int, int] = {}
        copied = kept = 0
        for a in d.accounts:
            target = mapped.get(a.id)
            if target is not None:
                await c.execute(
                    "UPDATE accounts SET password_hash = $2 WHERE id = $1", target, a.password_hash
                )
                kept += 1
            else:
                target = await c.fetchval(
                    "INSERT INTO accounts (address, domain, password_hash, created)"
                    " VALUES ($1, $2, $3, $4) RETURNING id",
                    a.address, a.address.rpartition("@")[2], a.password_hash, to_us(a.created),
                )
                await c.execute(
                    "INSERT INTO copy_accounts (source, source_id, account_id) VALUES ($1, $2, $3)",
                    source, a.id, target,
                )
                copied += 1
            result[a.id] = int(target)
        await c.executemany(
            "INSERT INTO aliases (source, target, domain, created) VALUES ($1, $2, $3, $4)",
            [(x.source, x.target, x.source.rpartition("@")[2], now_us()) for x in d.aliases],
        )
        await c.executemany(
            "INSERT INTO dkim_keys (domain, selector, algorithm, private_pem, public_txt, created)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [(k.domain, k.selector, k.algorithm, k.private_pem, k.public_txt, to_us(k.created))
             for k in d.dkim_keys],
        )
        await c.execute(
            "DELETE FROM password_exposures WHERE account_id = ANY($1::bigint[])",
            list(result.values()),
        )
        ids = {a.address: result[a.id] for a in d.accounts}
        await c.executemany(
            "INSERT INTO password_exposures"
            " (account_id, peer, service, first_at, last_at, notified_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [(ids[e.address], e.peer, e.service, to_us(e.first_at), to_us(e.last_at),
              None if e.notified_at is None else to_us(e.notified_at))
             for e in d.exposures if e.address in ids],
        )
        return DirectoryResult(
            accounts=result,
            domains_copied=len(new_domains),
            domains_kept=len(d.domains) - len(new_domains),
            accounts_copied=copied,
            accounts_kept=kept,
            accounts_removed=len(gone),
        )

    # ------------------------------------------------------------ mailboxes

    async def sync_mailboxes(
        self, source: str, account_id: int, boxes: Sequence[Mailbox]
    ) -> tuple[dict[MailboxId, MailboxId], int, int, int]:
        return await self._run(lambda c: self._sync_mailboxes(c, source, account_id, boxes))

    async def _sync_mailboxes(
        self, c: Conn, source: str, account_id: int, boxes: Sequence[Mailbox]
    ) -> tuple[dict[MailboxId, MailboxId], int, int, int]:
        rows = await c.fetch(
            "SELECT x.source_id, m.id, m.uidvalidity FROM copy_mailboxes x"
            " JOIN mailboxes m ON m.id = x.mailbox_id"
            " WHERE x.source = $1 AND m.account_id = $2",
            source, account_id,
        )
        mapped = {r[0]: (r[1], r[2]) for r in rows}
        wanted = {b.id for b in boxes}
        gone = [target for src, (target, _) in mapped.items() if src not in wanted]
        if gone:
            blobs = [
                r[0] for r in await c.fetch(
                    "DELETE FROM messages WHERE mailbox_id = ANY($1::bigint[]) RETURNING blob_id",
                    gone,
                )
            ]
            await c.execute("DELETE FROM mailboxes WHERE id = ANY($1::bigint[])", gone)
            await free_blobs(c, blobs)
        keep = [target for src, (target, _) in mapped.items() if src in wanted]
        # Renames may swap names: park the kept mailboxes on names no client can make.
        await c.execute(
            f"UPDATE mailboxes SET name = {_PARKED} WHERE id = ANY($1::bigint[])", keep
        )
        result: dict[MailboxId, MailboxId] = {}
        copied = kept = 0
        for b in boxes:
            known = mapped.get(b.id)
            if known is None:
                target = await c.fetchval(
                    "INSERT INTO mailboxes (account_id, name, uidvalidity, uidnext,"
                    " highestmodseq, special_use, subscribed)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    account_id, b.name, b.uidvalidity, b.uidnext, b.highestmodseq,
                    b.special_use, b.subscribed,
                )
                await c.execute(
                    "INSERT INTO copy_mailboxes (source, source_id, mailbox_id)"
                    " VALUES ($1, $2, $3)", source, b.id, target,
                )
                copied += 1
            else:
                target, uidvalidity = known
                if uidvalidity != b.uidvalidity:
                    # A new UIDVALIDITY means new UIDs (RFC 3501 §2.3.1.1): start over.
                    blobs = [
                        r[0] for r in await c.fetch(
                            "DELETE FROM messages WHERE mailbox_id = $1 RETURNING blob_id",
                            target,
                        )
                    ]
                    await free_blobs(c, blobs)
                await c.execute(
                    "UPDATE mailboxes SET name = $2, uidvalidity = $3, special_use = $4,"
                    " subscribed = $5 WHERE id = $1",
                    target, b.name, b.uidvalidity, b.special_use, b.subscribed,
                )
                kept += 1
            result[b.id] = int(target)
        await c.execute(
            "UPDATE counters SET value = greatest(value,"
            " (SELECT coalesce(max(uidvalidity), 0) FROM mailboxes)) WHERE name = 'uidvalidity'"
        )
        return result, copied, kept, len(gone)

    async def finish_mailbox(self, mailbox_id: MailboxId, uidnext: int, modseq: int) -> None:
        async def op(c: Conn) -> None:
            await c.execute(
                "UPDATE mailboxes SET uidnext = $2, highestmodseq = $3 WHERE id = $1",
                mailbox_id, uidnext, modseq,
            )

        await self._run(op)

    # ------------------------------------------------------------ messages

    async def message_state(self, mailbox_id: MailboxId) -> dict[Uid, tuple[int, str]]:
        async def op(c: Conn) -> dict[Uid, tuple[int, str]]:
            rows = await c.fetch(
                "SELECT uid, modseq, flags FROM messages WHERE mailbox_id = $1", mailbox_id
            )
            return {int(r[0]): (int(r[1]), str(r[2])) for r in rows}

        return await self._run(op, tx=False)

    async def target_uids(self, mailbox_id: MailboxId) -> list[Uid]:
        async def op(c: Conn) -> list[Uid]:
            rows = await c.fetch(
                "SELECT uid FROM messages WHERE mailbox_id = $1 ORDER BY uid", mailbox_id
            )
            return [int(r[0]) for r in rows]

        return await self._run(op, tx=False)

    async def apply_changes(
        self, mailbox_id: MailboxId, remove: Sequence[Uid],
        flags: Sequence[tuple[Uid, int, frozenset[str]]],
    ) -> None:
        async def op(c: Conn) -> None:
            if remove:
                blobs = [
                    r[0] for r in await c.fetch(
                        "DELETE FROM messages WHERE mailbox_id = $1 AND uid = ANY($2::bigint[])"
                        " RETURNING blob_id", mailbox_id, list(remove),
                    )
                ]
                await free_blobs(c, blobs)
            if flags:
                await c.execute(
                    "UPDATE messages m SET modseq = f.modseq, flags = f.flags"
                    " FROM unnest($2::bigint[], $3::bigint[], $4::text[]) AS f(uid, modseq, flags)"
                    " WHERE m.mailbox_id = $1 AND m.uid = f.uid",
                    mailbox_id, [u for u, _, _ in flags], [m for _, m, _ in flags],
                    [flags_text(f) for _, _, f in flags],
                )

        await self._run(op)

    async def known_blobs(self, source: str, source_ids: Sequence[int]) -> dict[int, int]:
        async def op(c: Conn) -> dict[int, int]:
            rows = await c.fetch(
                "SELECT source_id, blob_id FROM copy_blobs"
                " WHERE source = $1 AND source_id = ANY($2::bigint[])",
                source, list(source_ids),
            )
            return {int(r[0]): int(r[1]) for r in rows}

        return await self._run(op, tx=False)

    async def _blob_ids(
        self, c: Conn, source: str, wanted: Sequence[int], blobs: Mapping[int, bytes]
    ) -> tuple[dict[int, int], int]:
        """Target blob ids for these source blobs: copied before, or written now from
        ``blobs`` (with their map rows, in the caller's transaction)."""
        ids = {
            int(r[0]): int(r[1]) for r in await c.fetch(
                "SELECT source_id, blob_id FROM copy_blobs"
                " WHERE source = $1 AND source_id = ANY($2::bigint[])",
                source, sorted(set(wanted)),
            )
        }
        written = 0
        created = now_us()
        for src in sorted(set(wanted)):
            if src in ids:
                continue
            data = blobs[src]
            ids[src] = int(await c.fetchval(
                "INSERT INTO blobs (size, created, data) VALUES ($1, $2, $3) RETURNING id",
                len(data), created, data,
            ))
            await c.execute(
                "INSERT INTO copy_blobs (source, source_id, blob_id) VALUES ($1, $2, $3)",
                source, src, ids[src],
            )
            written += 1
        return ids, written

    async def insert_messages(
        self, source: str, mailbox_id: MailboxId, rows: Sequence[MessageRow],
        blobs: Mapping[int, bytes],
    ) -> int:
        async def op(c: Conn) -> int:
            ids, written = await self._blob_ids(c, source, [r.blob.id for r in rows], blobs)
            await c.executemany(
                "INSERT INTO messages (mailbox_id, uid, modseq, flags, internal_date,"
                " internal_tz, size, blob_id, envelope, bodystructure)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                [(mailbox_id, r.uid, r.modseq, flags_text(r.flags),
                  *internal_date(r.internal_date), r.size, ids[r.blob.id], r.envelope,
                  r.bodystructure) for r in rows],
            )
            return written

        return await self._run(op)

    # ------------------------------------------------------------ outbound queue

    async def known_queue(self, source: str) -> set[int]:
        async def op(c: Conn) -> set[int]:
            rows = await c.fetch("SELECT source_id FROM copy_queue WHERE source = $1", source)
            return {int(r[0]) for r in rows}

        return await self._run(op, tx=False)

    async def sync_queue_removed(self, source: str, keep: Sequence[int]) -> int:
        async def op(c: Conn) -> int:
            rows = await c.fetch(
                "DELETE FROM outbound o USING copy_queue x WHERE x.queue_id = o.id"
                " AND x.source = $1 AND NOT (x.source_id = ANY($2::bigint[]))"
                " RETURNING o.blob_id",
                source, list(keep),
            )
            await free_blobs(c, [r[0] for r in rows])
            return len(rows)

        return await self._run(op)

    async def insert_queue(
        self, source: str, items: Sequence[QueueItem], blobs: Mapping[int, bytes]
    ) -> None:
        async def op(c: Conn) -> None:
            ids, _ = await self._blob_ids(c, source, [i.entry.blob.id for i in items], blobs)
            for item in items:
                e = item.entry
                queue_id = await c.fetchval(
                    "INSERT INTO outbound (sender, recipients, blob_id, created, next_attempt,"
                    " attempts, last_error, delay_notified)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                    e.sender, json.dumps([r.address for r in e.recipients]), ids[e.blob.id],
                    to_us(e.created), to_us(e.next_attempt), e.attempts, item.last_error,
                    e.delay_notified,
                )
                await c.executemany(
                    "INSERT INTO outbound_rcpts (queue_id, position, address, state, attempts,"
                    " last_error, last_attempt) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    [(queue_id, n, r.address, r.state.value, r.attempts, r.last_error,
                      None if r.last_attempt is None else to_us(r.last_attempt))
                     for n, r in enumerate(e.recipients)],
                )
                await c.execute(
                    "INSERT INTO copy_queue (source, source_id, queue_id) VALUES ($1, $2, $3)",
                    source, e.id, queue_id,
                )

        await self._run(op)

    async def update_queue(self, source: str, items: Sequence[QueueItem]) -> None:
        async def op(c: Conn) -> None:
            for item in items:
                e = item.entry
                queue_id = await c.fetchval(
                    "UPDATE outbound o SET next_attempt = $3, attempts = $4, last_error = $5,"
                    " delay_notified = $6 FROM copy_queue x WHERE x.queue_id = o.id"
                    " AND x.source = $1 AND x.source_id = $2 RETURNING o.id",
                    source, e.id, to_us(e.next_attempt), e.attempts, item.last_error,
                    e.delay_notified,
                )
                if queue_id is None:
                    continue
                await c.executemany(
                    "UPDATE outbound_rcpts SET state = $3, attempts = $4, last_error = $5,"
                    " last_attempt = $6 WHERE queue_id = $1 AND position = $2",
                    [(queue_id, n, r.state.value, r.attempts, r.last_error,
                      None if r.last_attempt is None else to_us(r.last_attempt))
                     for n, r in enumerate(e.recipients)],
                )

        await self._run(op)
