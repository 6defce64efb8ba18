"""The SQL of every store operation, as async functions of an asyncpg connection.

The PostgreSQL twin of ``store/sqlite/ops.py``: the same checks, the same lower-casing,
the same row decoding (all three from ``store/rules.py``), the same error kinds and the
same MODSEQ rules; only the SQL and the concurrency control differ, because several nodes
may write at once.
``store.py`` runs each changing call so that one that raises leaves the transaction as
it was (a SAVEPOINT, or a new transaction when nothing was changed yet) and converts
asyncpg errors.

Invariants:
- Functions never BEGIN, COMMIT or ROLLBACK: they run inside a transaction someone else
  owns (a write transaction, or a REPEATABLE READ read snapshot).
- Every read-modify-write of a mailbox starts with ``SELECT … FOR UPDATE`` or an
  ``UPDATE … RETURNING`` of its row: that row lock serialises UID and modseq allocation
  between nodes, so two nodes appending at once get unique, increasing UIDs.
- Queue claims take rows with ``FOR UPDATE SKIP LOCKED``; lease, lock and ``last_attempt``
  times come from the database clock (``pk_now_us()``) where several nodes compare them.
- A blob is deleted in the operation that removes its last reference (``free_blobs``).
- Functions that change mailboxes append their ``Change``s to ``log``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, BinaryIO, TypeAlias

import asyncpg

from postkeep.store import rules
from postkeep.store.api import (
    DEFAULT_MAILBOXES,
    Account,
    AccountId,
    Alias,
    BlobRef,
    Change,
    ChangeKind,
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
    QueueRecipient,
    RecipientState,
    StorageError,
    StorageErrorKind,
    Uid,
)
from postkeep.store.rules import from_us, now_us, to_us

#: An ``asyncpg.Connection`` (asyncpg ships no type information).
Conn: TypeAlias = Any
_NOW = "pk_now_us()"


# ---------------------------------------------------------------- domains, accounts, aliases


async def domain_exists(conn: Conn, name: str) -> bool:
    try:
        d = rules.domain(name)
    except ValueError:
        return False
    return await conn.fetchval("SELECT 1 FROM domains WHERE name = $1", d) is not None


async def list_domains(conn: Conn) -> list[Domain]:
    rows = await conn.fetch("SELECT name, created FROM domains ORDER BY name")
    return [rules.decode_domain(r) for r in rows]


async def add_domain(conn: Conn, name: str) -> Domain:
    d = rules.domain(name)
    created = now_us()
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO domains (name, created) VALUES ($1, $2)", d, created)
    except asyncpg.UniqueViolationError as e:
        raise StorageError(StorageErrorKind.EXISTS, f"domain {d} already exists") from e
    return Domain(d, from_us(created))


async def del_domain(conn: Conn, name: str) -> None:
    d = rules.domain(name)
    # FOR UPDATE: an account added to the domain by another node meanwhile waits for us.
    if await conn.fetchval("SELECT 1 FROM domains WHERE name = $1 FOR UPDATE", d) is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"domain {d} does not exist")
    accounts = await conn.fetchval("SELECT count(*) FROM accounts WHERE domain = $1", d)
    aliases = await conn.fetchval("SELECT count(*) FROM aliases WHERE domain = $1", d)
    if accounts or aliases:
        raise rules.domain_in_use(d, accounts, aliases)
    await conn.execute("DELETE FROM domains WHERE name = $1", d)


async def get_account(conn: Conn, address: str) -> Account | None:
    try:
        a, _ = rules.address(address)
    except ValueError:
        return None
    row = await conn.fetchrow(f"SELECT {rules.ACCOUNT_COLS} FROM accounts WHERE address = $1", a)
    return None if row is None else rules.decode_account(row)


async def list_accounts(conn: Conn, domain: str | None = None) -> list[Account]:
    if domain is None:
        rows = await conn.fetch(f"SELECT {rules.ACCOUNT_COLS} FROM accounts ORDER BY address")
    else:
        rows = await conn.fetch(
            f"SELECT {rules.ACCOUNT_COLS} FROM accounts WHERE domain = $1 ORDER BY address",
            rules.domain(domain),
        )
    return [rules.decode_account(r) for r in rows]


async def add_account(conn: Conn, address: str, password_hash: str, log: list[Change]) -> Account:
    a, d = rules.address(address)
    if not await domain_exists(conn, d):
        raise rules.unknown_domain(d)
    created = now_us()
    try:
        async with conn.transaction():
            account_id = await conn.fetchval(
                "INSERT INTO accounts (address, domain, password_hash, created)"
                " VALUES ($1, $2, $3, $4) RETURNING id",
                a, d, password_hash, created,
            )
    except asyncpg.UniqueViolationError as e:
        raise StorageError(StorageErrorKind.EXISTS, f"account {a} already exists") from e
    except asyncpg.ForeignKeyViolationError as e:  # the domain was deleted meanwhile
        raise StorageError(StorageErrorKind.NOT_FOUND, f"domain {d} does not exist") from e
    made = [
        await _insert_mailbox(conn, account_id, name, special_use, subscribed=True)
        for name, special_use in DEFAULT_MAILBOXES
    ]
    log.extend(Change(m.id, ChangeKind.MAILBOX, (), m.highestmodseq) for m in made)
    return Account(account_id, a, password_hash, from_us(created))


async def set_password(conn: Conn, address: str, password_hash: str) -> None:
    a, _ = rules.address(address)
    done = await conn.fetchval(
        "UPDATE accounts SET password_hash = $1 WHERE address = $2 RETURNING id",
        password_hash, a,
    )
    if done is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"account {a} does not exist")
    # A new password is no longer exposed (auth/exposure.py).
    await conn.execute("DELETE FROM password_exposures WHERE account_id = $1", done)


async def _account_id(conn: Conn, address: str) -> int:
    a, _ = rules.address(address)
    # FOR SHARE: the account cannot be deleted by another node before we commit.
    account_id = await conn.fetchval(
        "SELECT id FROM accounts WHERE address = $1 FOR SHARE", a
    )
    if account_id is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"account {a} does not exist")
    return int(account_id)


async def exposures(conn: Conn, address: str | None = None) -> list[Exposure]:
    sql = (
        f"SELECT {rules.EXPOSURE_COLS}"
        " FROM password_exposures e JOIN accounts a ON a.id = e.account_id"
    )
    args: list[str] = []
    if address is not None:
        try:
            a, _ = rules.address(address)
        except ValueError:
            return []
        sql += " WHERE a.address = $1"
        args.append(a)
    rows = await conn.fetch(
        sql + " ORDER BY e.last_at DESC, a.address, e.peer, e.service", *args
    )
    return [rules.decode_exposure(r) for r in rows]


async def record_exposure(
    conn: Conn, address: str, peer: str, service: str, when: datetime, notify_every: timedelta
) -> bool:
    account_id = await _account_id(conn, address)
    at = to_us(when)
    # New (peer, service): insert it, told now. Two nodes inserting at once: the second
    # waits for the first, finds the conflict and goes on below with the committed row.
    inserted = await conn.fetchval(
        "INSERT INTO password_exposures"
        " (account_id, peer, service, first_at, last_at, notified_at)"
        " VALUES ($1, $2, $3, $4, $4, $4) ON CONFLICT DO NOTHING RETURNING 1",
        account_id, peer, service, at,
    )
    if inserted is not None:
        return True
    # Known: the row lock makes "was it told within notify_every?" and the update one step.
    notified = await conn.fetchval(
        "SELECT notified_at FROM password_exposures"
        " WHERE account_id = $1 AND peer = $2 AND service = $3 FOR UPDATE",
        account_id, peer, service,
    )
    due = rules.exposure_due(notified, at, notify_every)
    await conn.execute(
        "UPDATE password_exposures SET last_at = greatest(last_at, $4),"
        " notified_at = CASE WHEN $5 THEN $4 ELSE notified_at END"
        " WHERE account_id = $1 AND peer = $2 AND service = $3",
        account_id, peer, service, at, due,
    )
    return due


async def clear_exposures(conn: Conn, address: str) -> int:
    account_id = await _account_id(conn, address)
    rows = await conn.fetch(
        "DELETE FROM password_exposures WHERE account_id = $1 RETURNING 1", account_id
    )
    return len(rows)


async def del_account(conn: Conn, address: str, log: list[Change]) -> None:
    a, _ = rules.address(address)
    account_id = await conn.fetchval(
        "SELECT id FROM accounts WHERE address = $1 FOR UPDATE", a
    )
    if account_id is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"account {a} does not exist")
    boxes = await conn.fetch(
        "SELECT id, highestmodseq FROM mailboxes WHERE account_id = $1 ORDER BY id FOR UPDATE",
        account_id,
    )
    blob_ids = [
        r[0]
        for r in await conn.fetch(
            "SELECT DISTINCT m.blob_id FROM messages m JOIN mailboxes x ON x.id = m.mailbox_id"
            " WHERE x.account_id = $1",
            account_id,
        )
    ]
    await conn.execute("DELETE FROM accounts WHERE id = $1", account_id)
    await free_blobs(conn, blob_ids)
    log.extend(Change(r[0], ChangeKind.MAILBOX, (), r[1]) for r in boxes)


async def alias_targets(conn: Conn, source: str) -> list[str]:
    try:
        s, _ = rules.alias_source(source)
    except ValueError:
        return []
    rows = await conn.fetch("SELECT target FROM aliases WHERE source = $1 ORDER BY target", s)
    return [r[0] for r in rows]


async def list_aliases(conn: Conn, source: str | None = None) -> list[Alias]:
    if source is None:
        rows = await conn.fetch("SELECT source, target FROM aliases ORDER BY source, target")
    else:
        rows = await conn.fetch(
            "SELECT source, target FROM aliases WHERE source = $1 ORDER BY target",
            rules.alias_source(source)[0],
        )
    return [Alias(r[0], r[1]) for r in rows]


async def add_alias(conn: Conn, source: str, target: str) -> Alias:
    s, d = rules.alias_source(source)
    t, _ = rules.address(target)
    if not await domain_exists(conn, d):
        raise rules.unknown_alias_domain(d)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO aliases (source, target, domain, created) VALUES ($1, $2, $3, $4)",
                s, t, d, now_us(),
            )
    except asyncpg.UniqueViolationError as e:
        raise StorageError(StorageErrorKind.EXISTS, f"alias {s} -> {t} already exists") from e
    return Alias(s, t)


async def del_alias(conn: Conn, source: str, target: str) -> None:
    s, _ = rules.alias_source(source)
    t, _ = rules.address(target)
    done = await conn.fetchval(
        "DELETE FROM aliases WHERE source = $1 AND target = $2 RETURNING 1", s, t
    )
    if done is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"alias {s} -> {t} does not exist")


# ---------------------------------------------------------------- DKIM keys


async def dkim_keys(conn: Conn, domain: str) -> list[DkimKey]:
    try:
        d = rules.domain(domain)
    except ValueError:
        return []
    rows = await conn.fetch(
        f"SELECT {rules.DKIM_COLS} FROM dkim_keys WHERE domain = $1 ORDER BY created, selector", d
    )
    return [rules.decode_dkim_key(r) for r in rows]


async def add_dkim_key(
    conn: Conn, domain: str, selector: str, algorithm: str, private_pem: str, public_txt: str
) -> DkimKey:
    d = rules.domain(domain)
    sel = rules.dkim_selector(selector, algorithm)
    if not await domain_exists(conn, d):
        raise rules.unknown_domain(d)
    created = now_us()
    try:
        async with conn.transaction():
            await conn.execute(
                f"INSERT INTO dkim_keys ({rules.DKIM_COLS}) VALUES ($1, $2, $3, $4, $5, $6)",
                d, sel, algorithm, private_pem, public_txt, created,
            )
    except asyncpg.UniqueViolationError as e:
        raise StorageError(
            StorageErrorKind.EXISTS, f"domain {d} already has a DKIM key {sel}"
        ) from e
    return DkimKey(d, sel, algorithm, private_pem, public_txt, from_us(created))


# ---------------------------------------------------------------- mailboxes and messages


async def mailboxes(conn: Conn, account_id: AccountId) -> list[Mailbox]:
    rows = await conn.fetch(
        f"SELECT {rules.MAILBOX_COLS} FROM mailboxes WHERE account_id = $1 ORDER BY id", account_id
    )
    return [rules.decode_mailbox(r) for r in rows]


async def mailbox(conn: Conn, account_id: AccountId, name: str) -> Mailbox | None:
    try:
        n = rules.mailbox_name(name)
    except ValueError:
        return None
    row = await conn.fetchrow(
        f"SELECT {rules.MAILBOX_COLS} FROM mailboxes WHERE account_id = $1 AND name = $2",
        account_id, n,
    )
    return None if row is None else rules.decode_mailbox(row)


async def mailbox_by_id(conn: Conn, mailbox_id: MailboxId) -> Mailbox | None:
    row = await conn.fetchrow(
        f"SELECT {rules.MAILBOX_COLS} FROM mailboxes WHERE id = $1", mailbox_id
    )
    return None if row is None else rules.decode_mailbox(row)


async def _lock_mailbox(conn: Conn, mailbox_id: MailboxId) -> Mailbox:
    """The mailbox, its row locked until the transaction ends (UID and modseq allocation
    are read-modify-writes of this row: other nodes wait here, then see our values)."""
    row = await conn.fetchrow(
        f"SELECT {rules.MAILBOX_COLS} FROM mailboxes WHERE id = $1 FOR UPDATE", mailbox_id
    )
    if row is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"mailbox id {mailbox_id} does not exist")
    return rules.decode_mailbox(row)


async def _next_uidvalidity(conn: Conn) -> int:
    # RFC 3501 §2.3.1.1: strictly increasing across the store, even across nodes: the
    # counter row is locked by the UPDATE until our transaction ends.
    value = await conn.fetchval(
        "UPDATE counters SET value = greatest(value + 1, $1) WHERE name = 'uidvalidity'"
        " RETURNING value",
        int(time.time()),
    )
    return rules.check_uidvalidity(int(value))


async def _insert_mailbox(
    conn: Conn, account_id: AccountId, name: str, special_use: str | None, *, subscribed: bool
) -> Mailbox:
    n = rules.mailbox_name(name)
    uidvalidity = await _next_uidvalidity(conn)
    try:
        async with conn.transaction():
            mailbox_id = await conn.fetchval(
                "INSERT INTO mailboxes (account_id, name, uidvalidity, uidnext, highestmodseq,"
                " special_use, subscribed) VALUES ($1, $2, $3, 1, 1, $4, $5) RETURNING id",
                account_id, n, uidvalidity, special_use, subscribed,
            )
    except asyncpg.UniqueViolationError as e:
        raise StorageError(StorageErrorKind.EXISTS, f"mailbox {n!r} already exists") from e
    except asyncpg.ForeignKeyViolationError as e:
        raise StorageError(
            StorageErrorKind.NOT_FOUND, f"account id {account_id} does not exist"
        ) from e
    return Mailbox(mailbox_id, account_id, n, uidvalidity, 1, 1, special_use, subscribed)


async def create_mailbox(
    conn: Conn, account_id: AccountId, name: str, special_use: str | None, log: list[Change]
) -> Mailbox:
    # RFC 3501 §6.3.3: CREATE does not subscribe.
    box = await _insert_mailbox(conn, account_id, name, special_use, subscribed=False)
    log.append(Change(box.id, ChangeKind.MAILBOX, (), box.highestmodseq))
    return box


def _uid_list(uids: Sequence[Uid]) -> list[int]:
    # Out-of-range values cannot exist as UIDs; leaving them out keeps bigint[] happy.
    return sorted({u for u in uids if 0 < u <= rules.MAX_UID})


async def messages(
    conn: Conn, mailbox_id: MailboxId, uids: Sequence[Uid] | None = None
) -> list[MessageRow]:
    if uids is None:
        rows = await conn.fetch(
            f"SELECT {rules.MESSAGE_COLS} FROM messages m WHERE m.mailbox_id = $1 ORDER BY m.uid",
            mailbox_id,
        )
    else:
        rows = await _by_uid(conn, rules.MESSAGE_COLS, mailbox_id, uids)
    return [rules.decode_message(r) for r in rows]


async def _by_uid(
    conn: Conn, cols: str, mailbox_id: MailboxId, uids: Sequence[Uid], *, lock: bool = False
) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT {cols} FROM messages m WHERE m.mailbox_id = $1"
            " AND m.uid = ANY($2::bigint[]) ORDER BY m.uid" + (" FOR UPDATE" if lock else ""),
            mailbox_id, _uid_list(uids),
        )
    )


async def uids(conn: Conn, mailbox_id: MailboxId) -> list[Uid]:
    rows = await conn.fetch(
        "SELECT uid FROM messages WHERE mailbox_id = $1 ORDER BY uid", mailbox_id
    )
    return [r[0] for r in rows]


async def messages_since(conn: Conn, mailbox_id: MailboxId, modseq: int) -> list[MessageRow]:
    # RFC 7162 §3.1.4.1 CHANGEDSINCE: the messages_modseq index finds the rows.
    rows = await conn.fetch(
        f"SELECT {rules.MESSAGE_COLS} FROM messages m WHERE m.mailbox_id = $1 AND m.modseq > $2"
        " ORDER BY m.uid",
        mailbox_id, modseq,
    )
    return [rules.decode_message(r) for r in rows]


async def _blob_size(conn: Conn, blob_id: int) -> int:
    size = await conn.fetchval("SELECT size FROM blobs WHERE id = $1", blob_id)
    if size is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"blob {blob_id} does not exist")
    return int(size)


async def append(
    conn: Conn,
    mailbox_id: MailboxId,
    blob: BlobRef,
    flags: frozenset[str],
    when: datetime | None,
    envelope: str | None,
    bodystructure: str | None,
    log: list[Change],
) -> Uid:
    flag_text = rules.flags_text(rules.flags(flags))
    internal, tz_minutes = rules.internal_date(when)
    # The UPDATE takes the mailbox row lock: a second node appending to this mailbox waits
    # until we commit, then increments our uidnext (READ COMMITTED re-reads the row).
    row = await conn.fetchrow(
        "UPDATE mailboxes SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1"
        " WHERE id = $1 AND uidnext <= $2 RETURNING uidnext - 1, highestmodseq",
        mailbox_id, rules.MAX_UID,
    )
    if row is None:
        if await conn.fetchval("SELECT 1 FROM mailboxes WHERE id = $1", mailbox_id) is None:
            raise StorageError(
                StorageErrorKind.NOT_FOUND, f"mailbox id {mailbox_id} does not exist"
            )
        raise StorageError(StorageErrorKind.LIMIT, f"mailbox id {mailbox_id} has run out of UIDs")
    uid, modseq = int(row[0]), int(row[1])
    # The blob is checked after the mailbox, as SQLite does, in the INSERT itself: no row
    # is inserted unless the blob exists with the size the reference gives. Then the
    # raise below rolls the UPDATE back (the caller's savepoint or transaction).
    inserted = await conn.fetchval(
        "INSERT INTO messages (mailbox_id, uid, modseq, flags, internal_date, internal_tz,"
        " size, blob_id, envelope, bodystructure)"
        " SELECT $1, $2, $3, $4, $5, $6, b.size, b.id, $9, $10 FROM blobs b"
        " WHERE b.id = $8 AND b.size = $7 RETURNING 1",
        mailbox_id, uid, modseq, flag_text, internal, tz_minutes, blob.size, blob.id,
        envelope, bodystructure,
    )
    if inserted is None:
        rules.check_blob_ref(blob, await _blob_size(conn, blob.id))  # raises
        raise StorageError(StorageErrorKind.TEMP, f"blob {blob.id} changed while appending")
    log.append(Change(mailbox_id, ChangeKind.APPEND, (uid,), modseq))
    return uid


async def _new_modseq(conn: Conn, mailbox_id: MailboxId) -> int:
    """Raise the mailbox's HIGHESTMODSEQ by one and return it (RFC 7162 §2)."""
    return int(
        await conn.fetchval(
            "UPDATE mailboxes SET highestmodseq = highestmodseq + 1 WHERE id = $1"
            " RETURNING highestmodseq",
            mailbox_id,
        )
    )


async def set_flags(
    conn: Conn,
    mailbox_id: MailboxId,
    uids: Sequence[Uid],
    op: FlagOp,
    flags: frozenset[str],
    unchanged_since: int | None,
    log: list[Change],
) -> tuple[list[FlagChange], list[Uid]]:
    given = rules.flags(flags)
    rules.check_unchanged_since(unchanged_since)
    await _lock_mailbox(conn, mailbox_id)  # no other node changes these messages meanwhile
    rows = await _by_uid(conn, "m.uid, m.modseq, m.flags", mailbox_id, uids)
    changed, refused = rules.flag_updates(rows, op, given, unchanged_since)
    if not changed:
        return [], refused
    modseq = await _new_modseq(conn, mailbox_id)
    await conn.execute(
        "UPDATE messages m SET flags = c.flags, modseq = $2"
        " FROM unnest($3::bigint[], $4::text[]) AS c(uid, flags)"
        " WHERE m.mailbox_id = $1 AND m.uid = c.uid",
        mailbox_id, modseq, [u for u, _ in changed], [rules.flags_text(n) for _, n in changed],
    )
    log.append(Change(mailbox_id, ChangeKind.FLAGS, tuple(u for u, _ in changed), modseq))
    return [FlagChange(uid, modseq, new) for uid, new in changed], refused


async def free_blobs(conn: Conn, blob_ids: Sequence[int]) -> None:
    """Delete those of these blobs that no message and no queue entry refers to any more."""
    ids = sorted(set(blob_ids))
    if ids:
        await conn.execute(
            "DELETE FROM blobs b WHERE b.id = ANY($1::bigint[])"
            " AND NOT EXISTS (SELECT 1 FROM messages WHERE blob_id = b.id)"
            " AND NOT EXISTS (SELECT 1 FROM outbound WHERE blob_id = b.id)",
            ids,
        )


async def expunge(
    conn: Conn, mailbox_id: MailboxId, uids: Sequence[Uid], log: list[Change]
) -> list[Uid]:
    await _lock_mailbox(conn, mailbox_id)
    rows = await conn.fetch(
        "DELETE FROM messages WHERE mailbox_id = $1 AND uid = ANY($2::bigint[])"
        " RETURNING uid, blob_id",
        mailbox_id, _uid_list(uids),
    )
    if not rows:
        return []
    removed = sorted(int(r[0]) for r in rows)
    # RFC 7162 §3.2 (QRESYNC): an expunge is a change too; HIGHESTMODSEQ rises.
    modseq = await _new_modseq(conn, mailbox_id)
    await free_blobs(conn, [r[1] for r in rows])
    log.append(Change(mailbox_id, ChangeKind.EXPUNGE, tuple(removed), modseq))
    return removed


async def copy(
    conn: Conn, src: MailboxId, uids: Sequence[Uid], dst: MailboxId, log: list[Change]
) -> list[tuple[Uid, Uid]]:
    # Lock in id order, so that two nodes copying in opposite directions cannot deadlock.
    for mid in sorted({src, dst}):
        await _lock_mailbox(conn, mid)
    target = await _lock_mailbox(conn, dst)
    found = [r[0] for r in await _by_uid(conn, "m.uid", src, uids)]
    if not found:
        return []
    rules.check_uid_room(target, len(found))
    first = target.uidnext
    modseq = target.highestmodseq + 1
    # RFC 4315 §4.3 (COPYUID): new UIDs in the order of the source UIDs; the rows are
    # copied inside the database and the blob is shared, not copied.
    await conn.execute(
        "INSERT INTO messages (mailbox_id, uid, modseq, flags, internal_date, internal_tz,"
        " size, blob_id, envelope, bodystructure)"
        " SELECT $1, $2 + row_number() OVER (ORDER BY uid), $3, flags, internal_date,"
        " internal_tz, size, blob_id, envelope, bodystructure FROM messages"
        " WHERE mailbox_id = $4 AND uid = ANY($5::bigint[])",
        dst, first - 1, modseq, src, found,
    )
    await conn.execute(
        "UPDATE mailboxes SET uidnext = $1, highestmodseq = $2 WHERE id = $3",
        first + len(found), modseq, dst,
    )
    pairs = [(uid, first + i) for i, uid in enumerate(found)]
    log.append(Change(dst, ChangeKind.APPEND, tuple(new for _, new in pairs), modseq))
    return pairs


async def move(
    conn: Conn, src: MailboxId, uids: Sequence[Uid], dst: MailboxId, log: list[Change]
) -> list[tuple[Uid, Uid]]:
    # RFC 6851 §3.1: COPY then EXPUNGE, atomically (one savepoint around both).
    pairs = await copy(conn, src, uids, dst, log)
    if pairs:
        await expunge(conn, src, [old for old, _ in pairs], log)
    return pairs


async def rename_mailbox(
    conn: Conn, mailbox_id: MailboxId, new_name: str, log: list[Change]
) -> None:
    box = await _lock_mailbox(conn, mailbox_id)
    target = rules.rename_target(new_name)
    if box.name == "INBOX":
        # RFC 3501 §6.3.5: INBOX's messages move to a new mailbox; INBOX stays, empty.
        made = await _insert_mailbox(conn, box.account_id, target, None, subscribed=False)
        log.append(Change(made.id, ChangeKind.MAILBOX, (), made.highestmodseq))
        await move(conn, box.id, await uids(conn, box.id), made.id, log)
        return
    prefix = rules.check_rename(box, target)
    # The mailbox and its inferiors; starts_with() is exact (no LIKE wildcards).
    inferiors = await conn.fetch(
        "SELECT id, name, highestmodseq FROM mailboxes"
        " WHERE account_id = $1 AND starts_with(name, $2) ORDER BY name FOR UPDATE",
        box.account_id, prefix,
    )
    family = [(box.id, box.name, box.highestmodseq), *[tuple(r) for r in inferiors]]
    ids = {mid for mid, _, _ in family}
    renames = rules.renames(box.name, target, [(mid, name) for mid, name, _ in family])
    for _, name in renames:
        other = await conn.fetchval(
            "SELECT id FROM mailboxes WHERE account_id = $1 AND name = $2",
            box.account_id, name,
        )
        if other is not None and other not in ids:
            raise StorageError(StorageErrorKind.EXISTS, f"mailbox {name!r} already exists")
    # One UPDATE: PostgreSQL checks a (non-deferrable) UNIQUE per row, so go through names
    # no client can create first (as in SQLite), then to the new names.
    await conn.execute(
        "UPDATE mailboxes SET name = E'\\x01renaming ' || id WHERE id = ANY($1::bigint[])",
        [m for m, _ in renames],
    )
    await conn.execute(
        "UPDATE mailboxes m SET name = r.name FROM unnest($1::bigint[], $2::text[]) AS r(id, name)"
        " WHERE m.id = r.id",
        [m for m, _ in renames], [n for _, n in renames],
    )
    log.extend(Change(mid, ChangeKind.MAILBOX, (), modseq) for mid, _, modseq in family)


async def delete_mailbox(conn: Conn, mailbox_id: MailboxId, log: list[Change]) -> None:
    box = await _lock_mailbox(conn, mailbox_id)
    rules.check_deletable(box)
    rows = await conn.fetch(
        "DELETE FROM messages WHERE mailbox_id = $1 RETURNING blob_id", mailbox_id
    )
    await conn.execute("DELETE FROM mailboxes WHERE id = $1", mailbox_id)
    await free_blobs(conn, [r[0] for r in rows])
    log.append(Change(mailbox_id, ChangeKind.MAILBOX, (), box.highestmodseq))


async def set_subscribed(conn: Conn, mailbox_id: MailboxId, subscribed: bool) -> None:
    done = await conn.fetchval(
        "UPDATE mailboxes SET subscribed = $1 WHERE id = $2 RETURNING 1", subscribed, mailbox_id
    )
    if done is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"mailbox id {mailbox_id} does not exist")


# ---------------------------------------------------------------- POP3 maildrop lock


async def maildrop_holder(conn: Conn, account_id: AccountId) -> str | None:
    holder = await conn.fetchval(
        f"SELECT holder FROM maildrop_locks WHERE account_id = $1 AND expires > {_NOW}",
        account_id,
    )
    return None if holder is None else str(holder)


async def acquire_maildrop(conn: Conn, account_id: AccountId, holder: str, ttl: float) -> bool:
    rules.check_maildrop_lock(holder, ttl)
    # One statement: insert, or take over when ours or expired (by the database clock).
    # ON CONFLICT locks the existing row, so two nodes cannot both win.
    try:
        async with conn.transaction():
            got = await conn.fetchval(
                "INSERT INTO maildrop_locks (account_id, holder, expires)"
                f" VALUES ($1, $2, {_NOW} + $3)"
                " ON CONFLICT (account_id) DO UPDATE SET holder = EXCLUDED.holder,"
                "  expires = EXCLUDED.expires"
                f" WHERE maildrop_locks.holder = EXCLUDED.holder"
                f"  OR maildrop_locks.expires <= {_NOW}"
                " RETURNING 1",
                account_id, holder, rules.seconds_us(ttl),
            )
    except asyncpg.ForeignKeyViolationError as e:
        raise StorageError(
            StorageErrorKind.NOT_FOUND, f"account id {account_id} does not exist"
        ) from e
    return got is not None


async def release_maildrop(conn: Conn, account_id: AccountId, holder: str) -> None:
    await conn.execute(
        "DELETE FROM maildrop_locks WHERE account_id = $1 AND holder = $2", account_id, holder
    )


# ---------------------------------------------------------------- blobs


async def put_blob(conn: Conn, data: bytes | BinaryIO, size: int | None) -> BlobRef:
    """One ``bytea`` per blob. A file is read in ``BLOB_CHUNK`` pieces but sent as one
    parameter: the bytes are in memory once, bounded by the message size limit."""
    total = rules.blob_size(data, size)
    if isinstance(data, bytes | bytearray | memoryview):
        payload = bytes(data)
    else:
        payload = b"".join(rules.file_chunks(data, total))
    blob_id = await conn.fetchval(
        "INSERT INTO blobs (size, created, data) VALUES ($1, $2, $3) RETURNING id",
        len(payload), now_us(), payload,
    )
    return BlobRef(blob_id, len(payload))


async def read_blob(conn: Conn, ref: BlobRef, offset: int = 0, length: int | None = None) -> bytes:
    rules.check_range(offset, length)
    end = rules.range_end(await _blob_size(conn, ref.id), offset, length)
    if offset >= end:
        return b""
    data = await conn.fetchval(
        "SELECT substring(data FROM $2 FOR $3) FROM blobs WHERE id = $1",
        ref.id, offset + 1, end - offset,
    )
    return bytes(data)


async def read_blobs(
    conn: Conn, refs: Sequence[BlobRef], length: int | None = None
) -> dict[int, bytes]:
    """Each blob's bytes (its first ``length``), by id, in one query: the
    ``ReadTx.read_blobs`` rules. ``substring`` of an uncompressed (STORAGE EXTERNAL)
    value fetches only the TOAST chunks of the prefix."""
    ids = rules.blob_ids(refs, length)
    if not ids:
        return {}
    if length is None:
        rows = await conn.fetch("SELECT id, data FROM blobs WHERE id = ANY($1::bigint[])", ids)
    else:
        rows = await conn.fetch(
            "SELECT id, substring(data FROM 1 FOR $2) FROM blobs WHERE id = ANY($1::bigint[])",
            ids, length,
        )
    out = {int(r[0]): bytes(r[1]) for r in rows}
    rules.missing_blobs(ids, out)
    return out


# ---------------------------------------------------------------- outbound


async def enqueue(conn: Conn, sender: str, recipients: Sequence[str], blob: BlobRef) -> QueueId:
    rcpts = rules.queue_recipients(recipients)
    await _blob_size(conn, blob.id)
    now = now_us()
    queue_id = await conn.fetchval(
        "INSERT INTO outbound (sender, recipients, blob_id, created, next_attempt, attempts)"
        " VALUES ($1, $2, $3, $4, $4, 0) RETURNING id",
        sender, json.dumps(rcpts), blob.id, now,
    )
    await conn.execute(
        "INSERT INTO outbound_rcpts (queue_id, position, address)"
        " SELECT $1, p - 1, a FROM unnest($2::text[]) WITH ORDINALITY AS r(a, p)",
        queue_id, rcpts,
    )
    return int(queue_id)


async def outbound(conn: Conn, limit: int = 100) -> list[OutboundRow]:
    rows = await conn.fetch(
        f"SELECT {rules.OUTBOUND_COLS} FROM outbound o JOIN blobs b ON b.id = o.blob_id"
        " ORDER BY o.next_attempt, o.id LIMIT $1",
        max(limit, 0),
    )
    return [rules.decode_outbound(r) for r in rows]


async def _entries(conn: Conn, ids: Sequence[QueueId], now: int) -> list[QueueEntry]:
    heads = {
        r[0]: r
        for r in await conn.fetch(
            f"SELECT {rules.ENTRY_COLS} FROM outbound o JOIN blobs b ON b.id = o.blob_id"
            " WHERE o.id = ANY($1::bigint[])",
            list(ids),
        )
    }
    rcpts: dict[int, list[QueueRecipient]] = {}
    for r in await conn.fetch(
        f"SELECT {rules.RCPT_COLS}"
        " FROM outbound_rcpts WHERE queue_id = ANY($1::bigint[]) ORDER BY queue_id, position",
        list(ids),
    ):
        rcpts.setdefault(r[0], []).append(rules.decode_recipient(r))
    return rules.assemble_entries(ids, heads, rcpts, now)


async def queue_entries(conn: Conn, limit: int = 100) -> list[QueueEntry]:
    ids = [
        r[0]
        for r in await conn.fetch(
            "SELECT id FROM outbound ORDER BY next_attempt, id LIMIT $1", max(limit, 0)
        )
    ]
    return await _entries(conn, ids, now_us())


async def claim_due(
    conn: Conn, now: datetime, limit: int, holder: str, lease_seconds: float
) -> list[QueueEntry]:
    rules.check_lease(holder, lease_seconds)
    at = to_us(now)
    # FOR UPDATE SKIP LOCKED: an entry another node is claiming right now is skipped, not
    # waited for, and never handed to both.
    ids = [
        r[0]
        for r in await conn.fetch(
            "SELECT o.id FROM outbound o"
            " WHERE o.next_attempt <= $1 AND (o.lease_until IS NULL OR o.lease_until <= $1)"
            " AND EXISTS (SELECT 1 FROM outbound_rcpts r"
            "             WHERE r.queue_id = o.id AND r.state = 'pending')"
            " ORDER BY o.next_attempt, o.id LIMIT $2 FOR UPDATE OF o SKIP LOCKED",
            at, max(limit, 0),
        )
    ]
    if not ids:
        return []
    until = at + rules.seconds_us(lease_seconds)
    await conn.execute(
        "UPDATE outbound SET lease_holder = $1, lease_until = $2 WHERE id = ANY($3::bigint[])",
        holder, until, ids,
    )
    return await _entries(conn, ids, at)


async def record_attempt(
    conn: Conn,
    queue_id: QueueId,
    holder: str,
    results: Mapping[str, tuple[RecipientState, str | None]],
    next_attempt: datetime | None,
    delay_notified: bool | None,
) -> bool:
    current = await conn.fetchrow(
        "SELECT lease_holder FROM outbound WHERE id = $1 FOR UPDATE", queue_id
    )
    if current is None or current[0] != holder:
        return False
    now = now_us()
    last_error: str | None = None
    for address, (state, error) in results.items():
        state = RecipientState(state)
        await conn.execute(
            "UPDATE outbound_rcpts SET state = $1, attempts = attempts + 1, last_error = $2,"
            " last_attempt = $3 WHERE queue_id = $4 AND address = $5 AND state = 'pending'",
            state.value, error, now, queue_id, address,
        )
        if error is not None:
            last_error = error
    if last_error is not None:
        await conn.execute(
            "UPDATE outbound SET last_error = $1 WHERE id = $2", last_error, queue_id
        )
    if delay_notified is not None:
        await conn.execute(
            "UPDATE outbound SET delay_notified = $1 WHERE id = $2", delay_notified, queue_id
        )
    if next_attempt is not None:
        await conn.execute(
            "UPDATE outbound SET next_attempt = $1, attempts = attempts + 1,"
            " lease_holder = NULL, lease_until = NULL WHERE id = $2",
            to_us(next_attempt), queue_id,
        )
    return True


async def release_leases(conn: Conn, holder_prefix: str) -> int:
    rules.check_holder_prefix(holder_prefix)
    rows = await conn.fetch(
        "UPDATE outbound SET lease_holder = NULL, lease_until = NULL"
        " WHERE lease_holder IS NOT NULL AND starts_with(lease_holder, $1) RETURNING id",
        holder_prefix,
    )
    return len(rows)


async def dequeue(conn: Conn, queue_id: QueueId) -> bool:
    blob_id = await conn.fetchval(
        "DELETE FROM outbound WHERE id = $1 RETURNING blob_id", queue_id
    )
    if blob_id is None:
        return False
    await free_blobs(conn, [blob_id])
    return True


async def retry(conn: Conn, queue_id: QueueId | None = None) -> int:
    pending = (
        "EXISTS (SELECT 1 FROM outbound_rcpts r WHERE r.queue_id = outbound.id"
        " AND r.state = 'pending')"
    )
    now = now_us()
    if queue_id is None:
        rows = await conn.fetch(
            f"UPDATE outbound SET next_attempt = $1 WHERE next_attempt > $1 AND {pending}"
            " RETURNING id",
            now,
        )
    else:
        rows = await conn.fetch(
            f"UPDATE outbound SET next_attempt = least(next_attempt, $1) WHERE id = $2"
            f" AND {pending} RETURNING id",
            now, queue_id,
        )
    return len(rows)
