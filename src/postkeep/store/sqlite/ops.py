"""The SQL of every store operation, as plain synchronous functions of a connection.

Each function takes the connection first and runs in a store thread (the writer thread
or a reader's thread), never on the event loop. ``tx.py`` wraps them as the async
``ReadTx``/``WriteTx`` methods; the thread wrappers there own transactions, savepoints and
error conversion, so the functions here only raise ``StorageError`` for the cases they
explain better than SQLite would, and ``ValueError`` for malformed arguments to a write
(a lookup of a malformed name simply finds nothing). The argument checks, normalisation
and row decoding are ``store/rules.py``, shared with the PostgreSQL backend.

Invariants:
- Functions never BEGIN, COMMIT, ROLLBACK or SAVEPOINT: they run inside a transaction
  someone else owns (a write batch or a read snapshot).
- Addresses and domains are lower-cased on the way in (``rules``), for writes and lookups
  alike. Outbound senders and recipients are *not*: a remote local part is case-sensitive
  (RFC 5321 §2.4).
- ``append`` takes the UID from ``uidnext`` and the modseq from ``highestmodseq + 1`` and
  bumps both in the same transaction; with one writer there is no read-modify-write race.
- Blob bytes are copied in chunks of at most ``BLOB_CHUNK`` with incremental blob I/O, so
  a message is never held in memory twice.
- Every change to a message takes a new modseq from ``highestmodseq + 1`` and stores it
  on the mailbox in the same operation (RFC 7162 §2); one operation (one STORE, one
  EXPUNGE, one COPY) uses one new modseq for all the messages it changes.
- A blob is deleted in the operation that removes the last message or queue entry
  referring to it (``expunge``, ``dequeue``, …, through ``_free_blobs``); nothing else
  deletes blobs.
- Queue leases (``claim_due``) are taken and checked in the writer's transaction, so two
  claimers never get the same entry; a recipient's DELIVERED or FAILED state is final.
- Functions that change mailboxes or messages append what they did, as ``Change``s, to
  their ``log`` argument. ``tx.py`` gives each call a fresh list and keeps it only if the
  call returned; the writer publishes it only after the COMMIT of its batch.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, BinaryIO

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
from postkeep.store.rules import BLOB_CHUNK, from_us, now_us, to_us

# Bound parameters per IN (...) list; SQLite before 3.32 allows 999 in total.
_IN_CHUNK = 500


def _chunks(values: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(values), _IN_CHUNK):
        yield values[i : i + _IN_CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


# ---------------------------------------------------------------- domains, accounts, aliases


def domain_exists(conn: sqlite3.Connection, name: str) -> bool:
    try:
        d = rules.domain(name)
    except ValueError:
        return False  # lookups of malformed names find nothing; only writes refuse them
    row = conn.execute("SELECT 1 FROM domains WHERE name = ?", (d,)).fetchone()
    return row is not None


def list_domains(conn: sqlite3.Connection) -> list[Domain]:
    rows = conn.execute("SELECT name, created FROM domains ORDER BY name").fetchall()
    return [rules.decode_domain(r) for r in rows]


def add_domain(conn: sqlite3.Connection, name: str) -> Domain:
    d = rules.domain(name)
    created = now_us()
    try:
        conn.execute("INSERT INTO domains (name, created) VALUES (?, ?)", (d, created))
    except sqlite3.IntegrityError as e:
        if e.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
            raise StorageError(StorageErrorKind.EXISTS, f"domain {d} already exists") from e
        raise
    return Domain(d, from_us(created))


def del_domain(conn: sqlite3.Connection, name: str) -> None:
    d = rules.domain(name)
    if not domain_exists(conn, d):
        raise StorageError(StorageErrorKind.NOT_FOUND, f"domain {d} does not exist")
    accounts = conn.execute("SELECT count(*) FROM accounts WHERE domain = ?", (d,)).fetchone()[0]
    aliases = conn.execute("SELECT count(*) FROM aliases WHERE domain = ?", (d,)).fetchone()[0]
    if accounts or aliases:
        raise rules.domain_in_use(d, accounts, aliases)
    conn.execute("DELETE FROM domains WHERE name = ?", (d,))


def get_account(conn: sqlite3.Connection, address: str) -> Account | None:
    try:
        a, _ = rules.address(address)
    except ValueError:
        return None  # e.g. a bare "postmaster" the caller has not qualified
    row = conn.execute(
        f"SELECT {rules.ACCOUNT_COLS} FROM accounts WHERE address = ?", (a,)
    ).fetchone()
    return None if row is None else rules.decode_account(row)


def list_accounts(conn: sqlite3.Connection, domain: str | None = None) -> list[Account]:
    if domain is None:
        cur = conn.execute(f"SELECT {rules.ACCOUNT_COLS} FROM accounts ORDER BY address")
    else:
        cur = conn.execute(
            f"SELECT {rules.ACCOUNT_COLS} FROM accounts WHERE domain = ? ORDER BY address",
            (rules.domain(domain),),
        )
    return [rules.decode_account(r) for r in cur.fetchall()]


def add_account(
    conn: sqlite3.Connection, address: str, password_hash: str, log: list[Change]
) -> Account:
    a, d = rules.address(address)
    if not domain_exists(conn, d):
        raise rules.unknown_domain(d)
    created = now_us()
    try:
        cur = conn.execute(
            "INSERT INTO accounts (address, domain, password_hash, created) VALUES (?, ?, ?, ?)",
            (a, d, password_hash, created),
        )
    except sqlite3.IntegrityError as e:
        if e.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_UNIQUE:
            raise StorageError(StorageErrorKind.EXISTS, f"account {a} already exists") from e
        raise
    account_id = cur.lastrowid
    assert account_id is not None
    # The default mailboxes are part of the account: same transaction, so an account
    # without an INBOX is never visible. Defaults are subscribed (RFC 6154 clients expect
    # to see them).
    made = [
        _insert_mailbox(conn, account_id, name, special_use, subscribed=True)
        for name, special_use in DEFAULT_MAILBOXES
    ]
    log.extend(Change(m.id, ChangeKind.MAILBOX, (), m.highestmodseq) for m in made)
    return Account(account_id, a, password_hash, from_us(created))


def set_password(conn: sqlite3.Connection, address: str, password_hash: str) -> None:
    a, _ = rules.address(address)
    cur = conn.execute(
        "UPDATE accounts SET password_hash = ? WHERE address = ?", (password_hash, a)
    )
    if cur.rowcount == 0:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"account {a} does not exist")
    # A new password is no longer exposed (auth/exposure.py).
    conn.execute(
        "DELETE FROM password_exposures WHERE account_id ="
        " (SELECT id FROM accounts WHERE address = ?)",
        (a,),
    )


def _account_id(conn: sqlite3.Connection, address: str) -> int:
    a, _ = rules.address(address)
    row = conn.execute("SELECT id FROM accounts WHERE address = ?", (a,)).fetchone()
    if row is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"account {a} does not exist")
    return int(row[0])


def exposures(conn: sqlite3.Connection, address: str | None = None) -> list[Exposure]:
    sql = (
        f"SELECT {rules.EXPOSURE_COLS}"
        " FROM password_exposures e JOIN accounts a ON a.id = e.account_id"
    )
    args: tuple[str, ...] = ()
    if address is not None:
        try:
            a, _ = rules.address(address)
        except ValueError:
            return []
        sql += " WHERE a.address = ?"
        args = (a,)
    rows = conn.execute(sql + " ORDER BY e.last_at DESC, a.address, e.peer, e.service", args)
    return [rules.decode_exposure(r) for r in rows.fetchall()]


def record_exposure(
    conn: sqlite3.Connection,
    address: str,
    peer: str,
    service: str,
    when: datetime,
    notify_every: timedelta,
) -> bool:
    account_id = _account_id(conn, address)
    at = to_us(when)
    row = conn.execute(
        "SELECT notified_at FROM password_exposures"
        " WHERE account_id = ? AND peer = ? AND service = ?",
        (account_id, peer, service),
    ).fetchone()
    due = rules.exposure_due(None if row is None else row[0], at, notify_every)
    if row is None:
        conn.execute(
            "INSERT INTO password_exposures"
            " (account_id, peer, service, first_at, last_at, notified_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (account_id, peer, service, at, at, at),
        )
    else:
        conn.execute(
            "UPDATE password_exposures SET last_at = max(last_at, ?),"
            " notified_at = CASE WHEN ? THEN ? ELSE notified_at END"
            " WHERE account_id = ? AND peer = ? AND service = ?",
            (at, due, at, account_id, peer, service),
        )
    return due


def clear_exposures(conn: sqlite3.Connection, address: str) -> int:
    account_id = _account_id(conn, address)
    cur = conn.execute("DELETE FROM password_exposures WHERE account_id = ?", (account_id,))
    return cur.rowcount


def del_account(conn: sqlite3.Connection, address: str, log: list[Change]) -> None:
    a, _ = rules.address(address)
    row = conn.execute("SELECT id FROM accounts WHERE address = ?", (a,)).fetchone()
    if row is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"account {a} does not exist")
    account_id = row[0]
    boxes = conn.execute(
        "SELECT id, highestmodseq FROM mailboxes WHERE account_id = ? ORDER BY id",
        (account_id,),
    ).fetchall()
    blob_ids = [
        b
        for (b,) in conn.execute(
            "SELECT DISTINCT m.blob_id FROM messages m JOIN mailboxes x ON x.id = m.mailbox_id"
            " WHERE x.account_id = ?",
            (account_id,),
        )
    ]
    # ON DELETE CASCADE removes the mailboxes, their messages and the maildrop lock.
    conn.execute("DELETE FROM accounts WHERE id = ?", (account_id,))
    _free_blobs(conn, blob_ids)
    log.extend(Change(mid, ChangeKind.MAILBOX, (), modseq) for mid, modseq in boxes)


def alias_targets(conn: sqlite3.Connection, source: str) -> list[str]:
    try:
        s, _ = rules.alias_source(source)
    except ValueError:
        return []
    rows = conn.execute(
        "SELECT target FROM aliases WHERE source = ? ORDER BY target", (s,)
    ).fetchall()
    return [t for (t,) in rows]


def list_aliases(conn: sqlite3.Connection, source: str | None = None) -> list[Alias]:
    if source is None:
        cur = conn.execute("SELECT source, target FROM aliases ORDER BY source, target")
    else:
        cur = conn.execute(
            "SELECT source, target FROM aliases WHERE source = ? ORDER BY target",
            (rules.alias_source(source)[0],),
        )
    return [Alias(s, t) for s, t in cur.fetchall()]


def add_alias(conn: sqlite3.Connection, source: str, target: str) -> Alias:
    s, d = rules.alias_source(source)
    t, _ = rules.address(target)
    if not domain_exists(conn, d):
        raise rules.unknown_alias_domain(d)
    try:
        conn.execute(
            "INSERT INTO aliases (source, target, domain, created) VALUES (?, ?, ?, ?)",
            (s, t, d, now_us()),
        )
    except sqlite3.IntegrityError as e:
        if e.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
            raise StorageError(StorageErrorKind.EXISTS, f"alias {s} -> {t} already exists") from e
        raise
    return Alias(s, t)


def del_alias(conn: sqlite3.Connection, source: str, target: str) -> None:
    s, _ = rules.alias_source(source)
    t, _ = rules.address(target)
    cur = conn.execute("DELETE FROM aliases WHERE source = ? AND target = ?", (s, t))
    if cur.rowcount == 0:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"alias {s} -> {t} does not exist")


# ---------------------------------------------------------------- DKIM keys


def dkim_keys(conn: sqlite3.Connection, domain: str) -> list[DkimKey]:
    try:
        d = rules.domain(domain)
    except ValueError:
        return []
    rows = conn.execute(
        f"SELECT {rules.DKIM_COLS} FROM dkim_keys WHERE domain = ? ORDER BY created, selector", (d,)
    ).fetchall()
    return [rules.decode_dkim_key(r) for r in rows]


def add_dkim_key(
    conn: sqlite3.Connection, domain: str, selector: str, algorithm: str, private_pem: str,
    public_txt: str,
) -> DkimKey:
    d = rules.domain(domain)
    sel = rules.dkim_selector(selector, algorithm)
    if not domain_exists(conn, d):
        raise rules.unknown_domain(d)
    created = now_us()
    try:
        conn.execute(
            f"INSERT INTO dkim_keys ({rules.DKIM_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
            (d, sel, algorithm, private_pem, public_txt, created),
        )
    except sqlite3.IntegrityError as e:
        if e.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
            raise StorageError(
                StorageErrorKind.EXISTS, f"domain {d} already has a DKIM key {sel}"
            ) from e
        raise
    return DkimKey(d, sel, algorithm, private_pem, public_txt, from_us(created))


# ---------------------------------------------------------------- mailboxes and messages


def mailboxes(conn: sqlite3.Connection, account_id: AccountId) -> list[Mailbox]:
    rows = conn.execute(
        f"SELECT {rules.MAILBOX_COLS} FROM mailboxes WHERE account_id = ? ORDER BY id",
        (account_id,),
    ).fetchall()
    return [rules.decode_mailbox(r) for r in rows]


def mailbox(conn: sqlite3.Connection, account_id: AccountId, name: str) -> Mailbox | None:
    try:
        n = rules.mailbox_name(name)
    except ValueError:
        return None  # lookups of malformed names find nothing
    row = conn.execute(
        f"SELECT {rules.MAILBOX_COLS} FROM mailboxes WHERE account_id = ? AND name = ?",
        (account_id, n),
    ).fetchone()
    return None if row is None else rules.decode_mailbox(row)


def mailbox_by_id(conn: sqlite3.Connection, mailbox_id: MailboxId) -> Mailbox | None:
    row = conn.execute(
        f"SELECT {rules.MAILBOX_COLS} FROM mailboxes WHERE id = ?", (mailbox_id,)
    ).fetchone()
    return None if row is None else rules.decode_mailbox(row)


def _require_mailbox(conn: sqlite3.Connection, mailbox_id: MailboxId) -> Mailbox:
    box = mailbox_by_id(conn, mailbox_id)
    if box is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"mailbox id {mailbox_id} does not exist")
    return box


def _next_uidvalidity(conn: sqlite3.Connection) -> int:
    # RFC 3501 §2.3.1.1: a mailbox deleted and recreated under the same name must get a new
    # UIDVALIDITY. Taking max(last + 1, now) makes values strictly increase across the
    # whole store — even when the clock steps back or many mailboxes appear in one second.
    last = conn.execute("SELECT value FROM counters WHERE name = 'uidvalidity'").fetchone()[0]
    value = rules.check_uidvalidity(max(last + 1, int(time.time())))
    conn.execute("UPDATE counters SET value = ? WHERE name = 'uidvalidity'", (value,))
    return int(value)


def _insert_mailbox(
    conn: sqlite3.Connection,
    account_id: AccountId,
    name: str,
    special_use: str | None,
    *,
    subscribed: bool,
) -> Mailbox:
    n = rules.mailbox_name(name)
    uidvalidity = _next_uidvalidity(conn)
    try:
        cur = conn.execute(
            "INSERT INTO mailboxes (account_id, name, uidvalidity, uidnext, highestmodseq,"
            " special_use, subscribed) VALUES (?, ?, ?, 1, 1, ?, ?)",
            (account_id, n, uidvalidity, special_use, int(subscribed)),
        )
    except sqlite3.IntegrityError as e:
        if e.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_UNIQUE:
            raise StorageError(StorageErrorKind.EXISTS, f"mailbox {n!r} already exists") from e
        if e.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY:
            raise StorageError(
                StorageErrorKind.NOT_FOUND, f"account id {account_id} does not exist"
            ) from e
        raise
    mailbox_id = cur.lastrowid
    assert mailbox_id is not None
    return Mailbox(mailbox_id, account_id, n, uidvalidity, 1, 1, special_use, subscribed)


def create_mailbox(
    conn: sqlite3.Connection,
    account_id: AccountId,
    name: str,
    special_use: str | None,
    log: list[Change],
) -> Mailbox:
    # RFC 3501 §6.3.3: CREATE does not subscribe; SUBSCRIBE is a separate command.
    box = _insert_mailbox(conn, account_id, name, special_use, subscribed=False)
    log.append(Change(box.id, ChangeKind.MAILBOX, (), box.highestmodseq))
    return box


def messages(
    conn: sqlite3.Connection, mailbox_id: MailboxId, uids: Sequence[Uid] | None = None
) -> list[MessageRow]:
    """Rows in UID order; UIDs that do not exist are left out (as IMAP FETCH does)."""
    if uids is None:
        rows = conn.execute(
            f"SELECT {rules.MESSAGE_COLS} FROM messages m WHERE m.mailbox_id = ? ORDER BY m.uid",
            (mailbox_id,),
        ).fetchall()
        return [rules.decode_message(r) for r in rows]
    return [rules.decode_message(r) for r in _by_uid(conn, rules.MESSAGE_COLS, mailbox_id, uids)]


def _by_uid(
    conn: sqlite3.Connection, cols: str, mailbox_id: MailboxId, uids: Iterable[Uid]
) -> list[tuple[Any, ...]]:
    """``cols`` of the messages with these UIDs (those that exist), in UID order."""
    wanted = sorted(set(uids))
    out: list[tuple[Any, ...]] = []
    # Chunks in ascending order keep the whole result in UID order.
    for chunk in _chunks(wanted):
        out.extend(
            conn.execute(
                f"SELECT {cols} FROM messages m"
                f" WHERE m.mailbox_id = ? AND m.uid IN ({_marks(len(chunk))}) ORDER BY m.uid",
                (mailbox_id, *chunk),
            ).fetchall()
        )
    return out


def _existing_uids(
    conn: sqlite3.Connection, mailbox_id: MailboxId, uids: Iterable[Uid]
) -> list[Uid]:
    return [int(r[0]) for r in _by_uid(conn, "m.uid", mailbox_id, uids)]


def uids(conn: sqlite3.Connection, mailbox_id: MailboxId) -> list[Uid]:
    # Covering index messages_uids (0002): no message row is read.
    return [
        u
        for (u,) in conn.execute(
            "SELECT uid FROM messages WHERE mailbox_id = ? ORDER BY uid", (mailbox_id,)
        )
    ]


def messages_since(
    conn: sqlite3.Connection, mailbox_id: MailboxId, modseq: int
) -> list[MessageRow]:
    # RFC 7162 §3.1.4.1 CHANGEDSINCE. INDEXED BY: the planner would otherwise walk the
    # whole mailbox in UID order to avoid a sort; the modseq index finds the few rows that
    # changed, and sorting those is cheap.
    rows = conn.execute(
        f"SELECT {rules.MESSAGE_COLS} FROM messages m INDEXED BY messages_modseq"
        " WHERE m.mailbox_id = ? AND m.modseq > ? ORDER BY m.uid",
        (mailbox_id, modseq),
    ).fetchall()
    return [rules.decode_message(r) for r in rows]


def append(
    conn: sqlite3.Connection,
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
    row = conn.execute(
        "SELECT uidnext, highestmodseq FROM mailboxes WHERE id = ?", (mailbox_id,)
    ).fetchone()
    if row is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"mailbox id {mailbox_id} does not exist")
    uid, modseq = row[0], row[1] + 1
    if uid > rules.MAX_UID:
        # RFC 3501 §2.3.1.1: UIDs are 32-bit. The mailbox needs a new UIDVALIDITY (a rename
        # and re-create), which is an operator decision.
        raise StorageError(StorageErrorKind.LIMIT, f"mailbox id {mailbox_id} has run out of UIDs")
    size = _blob_size(conn, blob.id)
    rules.check_blob_ref(blob, size)
    conn.execute(
        "UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
        (uid + 1, modseq, mailbox_id),
    )
    conn.execute(
        "INSERT INTO messages (mailbox_id, uid, modseq, flags, internal_date, internal_tz,"
        " size, blob_id, envelope, bodystructure) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            mailbox_id,
            uid,
            modseq,
            flag_text,
            internal,
            tz_minutes,
            size,
            blob.id,
            envelope,
            bodystructure,
        ),
    )
    log.append(Change(mailbox_id, ChangeKind.APPEND, (uid,), modseq))
    return int(uid)


def _new_modseq(conn: sqlite3.Connection, box: Mailbox) -> int:
    """Raise the mailbox's HIGHESTMODSEQ by one and return it (RFC 7162 §2: every change
    gets a mod-sequence greater than any before it in the mailbox)."""
    modseq = box.highestmodseq + 1
    conn.execute("UPDATE mailboxes SET highestmodseq = ? WHERE id = ?", (modseq, box.id))
    return modseq


def set_flags(
    conn: sqlite3.Connection,
    mailbox_id: MailboxId,
    uids: Sequence[Uid],
    op: FlagOp,
    flags: frozenset[str],
    unchanged_since: int | None,
    log: list[Change],
) -> tuple[list[FlagChange], list[Uid]]:
    given = rules.flags(flags)
    rules.check_unchanged_since(unchanged_since)
    box = _require_mailbox(conn, mailbox_id)
    rows = _by_uid(conn, "m.uid, m.modseq, m.flags", mailbox_id, uids)
    changed, refused = rules.flag_updates(rows, op, given, unchanged_since)
    if not changed:
        return [], refused
    # One new mod-sequence shared by every message this STORE changed: RFC 7162 §2 asks
    # only that it be greater than every earlier one in the mailbox.
    modseq = _new_modseq(conn, box)
    conn.executemany(
        "UPDATE messages SET flags = ?, modseq = ? WHERE mailbox_id = ? AND uid = ?",
        [(rules.flags_text(new), modseq, mailbox_id, uid) for uid, new in changed],
    )
    log.append(Change(mailbox_id, ChangeKind.FLAGS, tuple(u for u, _ in changed), modseq))
    return [FlagChange(uid, modseq, new) for uid, new in changed], refused


def _free_blobs(conn: sqlite3.Connection, blob_ids: Iterable[int]) -> None:
    """Delete those of these blobs that no message and no queue entry refers to any more.

    Called with the blobs of the rows an operation just deleted, in the same transaction:
    a blob is freed exactly when its last reference goes, so no sweep is ever needed, and
    a message copied to two mailboxes keeps its bytes until both copies are gone.
    """
    candidates = sorted(set(blob_ids))
    for chunk in _chunks(candidates):
        conn.execute(
            f"DELETE FROM blobs WHERE id IN ({_marks(len(chunk))})"
            " AND NOT EXISTS (SELECT 1 FROM messages WHERE blob_id = blobs.id)"
            " AND NOT EXISTS (SELECT 1 FROM outbound WHERE blob_id = blobs.id)",
            chunk,
        )


def expunge(
    conn: sqlite3.Connection, mailbox_id: MailboxId, uids: Sequence[Uid], log: list[Change]
) -> list[Uid]:
    box = _require_mailbox(conn, mailbox_id)
    rows = _by_uid(conn, "m.uid, m.blob_id", mailbox_id, uids)
    if not rows:
        return []
    removed = [int(r[0]) for r in rows]
    conn.executemany(
        "DELETE FROM messages WHERE mailbox_id = ? AND uid = ?",
        [(mailbox_id, uid) for uid in removed],
    )
    # RFC 7162 §3.2 (QRESYNC): an expunge is a change too; HIGHESTMODSEQ rises.
    modseq = _new_modseq(conn, box)
    _free_blobs(conn, (r[1] for r in rows))
    log.append(Change(mailbox_id, ChangeKind.EXPUNGE, tuple(removed), modseq))
    return removed


def copy(
    conn: sqlite3.Connection,
    src: MailboxId,
    uids: Sequence[Uid],
    dst: MailboxId,
    log: list[Change],
) -> list[tuple[Uid, Uid]]:
    _require_mailbox(conn, src)
    target = _require_mailbox(conn, dst)
    found = _existing_uids(conn, src, uids)
    if not found:
        return []
    rules.check_uid_room(target, len(found))
    first = target.uidnext
    modseq = target.highestmodseq + 1
    # RFC 4315 §4.3 (COPYUID): new UIDs in the order of the source UIDs. The rows are
    # copied inside SQLite (INSERT … SELECT), so envelopes never pass through Python, and
    # the blob is shared, not copied. row_number() over each ascending chunk, offset by
    # the UIDs already given, keeps the order across chunks.
    done = 0
    for chunk in _chunks(found):
        conn.execute(
            "INSERT INTO messages (mailbox_id, uid, modseq, flags, internal_date, internal_tz,"
            " size, blob_id, envelope, bodystructure)"
            " SELECT ?, ? + row_number() OVER (ORDER BY uid), ?, flags, internal_date,"
            " internal_tz, size, blob_id, envelope, bodystructure FROM messages"
            f" WHERE mailbox_id = ? AND uid IN ({_marks(len(chunk))})",
            (dst, first + done - 1, modseq, src, *chunk),
        )
        done += len(chunk)
    conn.execute(
        "UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
        (first + len(found), modseq, dst),
    )
    pairs = [(uid, first + i) for i, uid in enumerate(found)]
    log.append(Change(dst, ChangeKind.APPEND, tuple(new for _, new in pairs), modseq))
    return pairs


def move(
    conn: sqlite3.Connection,
    src: MailboxId,
    uids: Sequence[Uid],
    dst: MailboxId,
    log: list[Change],
) -> list[tuple[Uid, Uid]]:
    # RFC 6851 §3.1: as COPY then EXPUNGE of the same messages, atomically: both run in
    # this one operation's savepoint, so either both happen or neither does.
    pairs = copy(conn, src, uids, dst, log)
    if pairs:
        expunge(conn, src, [old for old, _ in pairs], log)
    return pairs


def rename_mailbox(
    conn: sqlite3.Connection, mailbox_id: MailboxId, new_name: str, log: list[Change]
) -> None:
    box = _require_mailbox(conn, mailbox_id)
    target = rules.rename_target(new_name)
    if box.name == "INBOX":
        # RFC 3501 §6.3.5: renaming INBOX moves its messages to a new mailbox (new
        # UIDVALIDITY, new UIDs) and leaves INBOX there, empty; INBOX's inferiors are
        # unaffected.
        made = _insert_mailbox(conn, box.account_id, target, None, subscribed=False)
        log.append(Change(made.id, ChangeKind.MAILBOX, (), made.highestmodseq))
        move(conn, box.id, uids(conn, box.id), made.id, log)
        return
    prefix = rules.check_rename(box, target)
    # The mailbox and its inferiors ("a", "a/b", "a/b/c"). Names in [prefix, name + "0")
    # are exactly those starting with the prefix ("0" follows "/"), a range on the
    # (account_id, name) index.
    assert rules.DELIMITER == "/"
    inferiors = conn.execute(
        "SELECT id, name, highestmodseq FROM mailboxes"
        " WHERE account_id = ? AND name >= ? AND name < ? ORDER BY name",
        (box.account_id, prefix, box.name + "0"),
    ).fetchall()
    family = [(box.id, box.name, box.highestmodseq), *inferiors]
    ids = {mid for mid, _, _ in family}
    renames = rules.renames(box.name, target, [(mid, name) for mid, name, _ in family])
    for _, name in renames:
        row = conn.execute(
            "SELECT id FROM mailboxes WHERE account_id = ? AND name = ?",
            (box.account_id, name),
        ).fetchone()
        if row is not None and row[0] not in ids:
            raise StorageError(StorageErrorKind.EXISTS, f"mailbox {name!r} already exists")
    # Two steps, through names no client can create (NUL): a new name may be the old name
    # of another member of the family, and UNIQUE is checked row by row. Renaming "a/b" to
    # "a" turns "a/b/b/c" into "a/b/c" while "a/b/c" (to become "a/c") may still be there.
    conn.executemany(
        "UPDATE mailboxes SET name = ? WHERE id = ?",
        [(f"\x00renaming {mid}", mid) for mid, _ in renames],
    )
    conn.executemany("UPDATE mailboxes SET name = ? WHERE id = ?", [(n, m) for m, n in renames])
    # UIDVALIDITY, UIDs, special-use and subscription stay with the mailbox (RFC 3501
    # §6.3.5 and §2.3.1.1 allow keeping UIDVALIDITY across a rename).
    log.extend(Change(mid, ChangeKind.MAILBOX, (), modseq) for mid, _, modseq in family)


def delete_mailbox(conn: sqlite3.Connection, mailbox_id: MailboxId, log: list[Change]) -> None:
    box = _require_mailbox(conn, mailbox_id)
    rules.check_deletable(box)
    blob_ids = [
        b
        for (b,) in conn.execute(
            "SELECT DISTINCT blob_id FROM messages WHERE mailbox_id = ?", (mailbox_id,)
        )
    ]
    # RFC 3501 §6.3.4 would turn a mailbox with inferiors into \Noselect; postkeep deletes
    # just this mailbox and leaves the inferiors as they are (they need no parent).
    conn.execute("DELETE FROM messages WHERE mailbox_id = ?", (mailbox_id,))
    conn.execute("DELETE FROM mailboxes WHERE id = ?", (mailbox_id,))
    _free_blobs(conn, blob_ids)
    log.append(Change(mailbox_id, ChangeKind.MAILBOX, (), box.highestmodseq))


def set_subscribed(conn: sqlite3.Connection, mailbox_id: MailboxId, subscribed: bool) -> None:
    cur = conn.execute(
        "UPDATE mailboxes SET subscribed = ? WHERE id = ?", (int(subscribed), mailbox_id)
    )
    if cur.rowcount == 0:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"mailbox id {mailbox_id} does not exist")


# ---------------------------------------------------------------- POP3 maildrop lock


def maildrop_holder(conn: sqlite3.Connection, account_id: AccountId) -> str | None:
    row = conn.execute(
        "SELECT holder FROM maildrop_locks WHERE account_id = ? AND expires > ?",
        (account_id, now_us()),
    ).fetchone()
    return None if row is None else str(row[0])


def acquire_maildrop(
    conn: sqlite3.Connection, account_id: AccountId, holder: str, ttl: float
) -> bool:
    rules.check_maildrop_lock(holder, ttl)
    now = now_us()
    row = conn.execute(
        "SELECT holder, expires FROM maildrop_locks WHERE account_id = ?", (account_id,)
    ).fetchone()
    if row is not None and row[0] != holder and row[1] > now:
        return False  # RFC 1939 §8: someone else has the maildrop
    # Free, expired (its holder died: take it over) or ours (refresh). One writer at a
    # time (BEGIN IMMEDIATE, across processes too), so nobody can slip in between.
    # A missing account fails the foreign key: NOT_FOUND.
    conn.execute(
        "INSERT OR REPLACE INTO maildrop_locks (account_id, holder, expires) VALUES (?, ?, ?)",
        (account_id, holder, now + rules.seconds_us(ttl)),
    )
    return True


def release_maildrop(conn: sqlite3.Connection, account_id: AccountId, holder: str) -> None:
    # Only the holder releases: a session whose lock expired and was taken over must not
    # free the new holder's lock on its way out.
    conn.execute(
        "DELETE FROM maildrop_locks WHERE account_id = ? AND holder = ?", (account_id, holder)
    )


# ---------------------------------------------------------------- blobs


def _blob_size(conn: sqlite3.Connection, blob_id: int) -> int:
    row = conn.execute("SELECT size FROM blobs WHERE id = ?", (blob_id,)).fetchone()
    if row is None:
        raise StorageError(StorageErrorKind.NOT_FOUND, f"blob {blob_id} does not exist")
    return int(row[0])


def put_blob(conn: sqlite3.Connection, data: bytes | BinaryIO, size: int | None) -> BlobRef:
    total = rules.blob_size(data, size)
    # zeroblob() reserves the space without building the bytes in memory; the content is
    # then written in place, chunk by chunk.
    cur = conn.execute(
        "INSERT INTO blobs (size, created, data) VALUES (?, ?, zeroblob(?))",
        (total, now_us(), total),
    )
    blob_id = cur.lastrowid
    assert blob_id is not None
    if total:
        with conn.blobopen("blobs", "data", blob_id) as b:
            if isinstance(data, bytes | bytearray | memoryview):
                view = memoryview(data).cast("B")
                for start in range(0, total, BLOB_CHUNK):
                    b.write(view[start : start + BLOB_CHUNK])
            else:
                for chunk in rules.file_chunks(data, total):
                    b.write(chunk)
    return BlobRef(blob_id, total)


def read_blob(
    conn: sqlite3.Connection, ref: BlobRef, offset: int = 0, length: int | None = None
) -> bytes:
    """``length`` bytes from ``offset`` (fewer at the end; ``b""`` past it)."""
    rules.check_range(offset, length)
    end = rules.range_end(_blob_size(conn, ref.id), offset, length)
    if offset >= end:
        return b""
    with conn.blobopen("blobs", "data", ref.id, readonly=True) as b:
        b.seek(offset)
        return b.read(end - offset)


def read_blobs(
    conn: sqlite3.Connection, refs: Sequence[BlobRef], length: int | None = None
) -> dict[int, bytes]:
    """Each blob's bytes (its first ``length``), by id: the ``ReadTx.read_blobs`` rules.

    One statement per ``_IN_CHUNK`` ids finds the sizes; each blob is then read through
    incremental blob I/O, so a prefix read touches only the pages it needs.
    """
    ids = rules.blob_ids(refs, length)
    sizes: dict[int, int] = {}
    for chunk in _chunks(ids):
        sizes.update(
            conn.execute(
                f"SELECT id, size FROM blobs WHERE id IN ({_marks(len(chunk))})", chunk
            ).fetchall()
        )
    rules.missing_blobs(ids, sizes)
    out: dict[int, bytes] = {}
    for blob_id in ids:
        end = rules.range_end(sizes[blob_id], 0, length)
        if end == 0:
            out[blob_id] = b""
            continue
        with conn.blobopen("blobs", "data", blob_id, readonly=True) as b:
            out[blob_id] = b.read(end)
    return out


# ---------------------------------------------------------------- outbound


def enqueue(
    conn: sqlite3.Connection, sender: str, recipients: Sequence[str], blob: BlobRef
) -> QueueId:
    rcpts = rules.queue_recipients(recipients)
    _blob_size(conn, blob.id)  # NOT_FOUND with a clear message rather than a bare FK error
    now = now_us()
    cur = conn.execute(
        "INSERT INTO outbound (sender, recipients, blob_id, created, next_attempt, attempts)"
        " VALUES (?, ?, ?, ?, ?, 0)",
        (sender, json.dumps(rcpts), blob.id, now, now),
    )
    queue_id = cur.lastrowid
    assert queue_id is not None
    conn.executemany(
        "INSERT INTO outbound_rcpts (queue_id, position, address) VALUES (?, ?, ?)",
        [(queue_id, i, r) for i, r in enumerate(rcpts)],
    )
    return queue_id


def outbound(conn: sqlite3.Connection, limit: int = 100) -> list[OutboundRow]:
    rows = conn.execute(
        f"SELECT {rules.OUTBOUND_COLS} FROM outbound o JOIN blobs b ON b.id = o.blob_id"
        " ORDER BY o.next_attempt, o.id LIMIT ?",
        (limit,),
    ).fetchall()
    return [rules.decode_outbound(r) for r in rows]


def _entries(conn: sqlite3.Connection, ids: Sequence[QueueId], now: int) -> list[QueueEntry]:
    """The entries with these ids, with their recipients, in the order of ``ids``."""
    heads: dict[int, tuple[Any, ...]] = {}
    rcpts: dict[int, list[QueueRecipient]] = {}
    for chunk in _chunks(list(ids)):
        for row in conn.execute(
            f"SELECT {rules.ENTRY_COLS} FROM outbound o JOIN blobs b ON b.id = o.blob_id"
            f" WHERE o.id IN ({_marks(len(chunk))})",
            chunk,
        ):
            heads[row[0]] = row
        for r in conn.execute(
            f"SELECT {rules.RCPT_COLS}"
            f" FROM outbound_rcpts WHERE queue_id IN ({_marks(len(chunk))})"
            " ORDER BY queue_id, position",
            chunk,
        ):
            rcpts.setdefault(r[0], []).append(rules.decode_recipient(r))
    return rules.assemble_entries(ids, heads, rcpts, now)


def queue_entries(conn: sqlite3.Connection, limit: int = 100) -> list[QueueEntry]:
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM outbound ORDER BY next_attempt, id LIMIT ?", (max(limit, 0),)
        )
    ]
    return _entries(conn, ids, now_us())


def claim_due(
    conn: sqlite3.Connection, now: datetime, limit: int, holder: str, lease_seconds: float
) -> list[QueueEntry]:
    rules.check_lease(holder, lease_seconds)
    at = to_us(now)
    # One writer at a time (BEGIN IMMEDIATE, across processes too): nobody can claim the
    # same rows between this SELECT and the UPDATE. PostgreSQL: FOR UPDATE SKIP LOCKED.
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT o.id FROM outbound o"
            " WHERE o.next_attempt <= ? AND (o.lease_until IS NULL OR o.lease_until <= ?)"
            " AND EXISTS (SELECT 1 FROM outbound_rcpts r"
            "             WHERE r.queue_id = o.id AND r.state = 'pending')"
            " ORDER BY o.next_attempt, o.id LIMIT ?",
            (at, at, max(limit, 0)),
        )
    ]
    if not ids:
        return []
    until = at + rules.seconds_us(lease_seconds)
    for chunk in _chunks(ids):
        conn.execute(
            f"UPDATE outbound SET lease_holder = ?, lease_until = ?"
            f" WHERE id IN ({_marks(len(chunk))})",
            (holder, until, *chunk),
        )
    return _entries(conn, ids, at)


def record_attempt(
    conn: sqlite3.Connection,
    queue_id: QueueId,
    holder: str,
    results: Mapping[str, tuple[RecipientState, str | None]],
    next_attempt: datetime | None,
    delay_notified: bool | None,
) -> bool:
    row = conn.execute(
        "SELECT lease_holder FROM outbound WHERE id = ?", (queue_id,)
    ).fetchone()
    if row is None or row[0] != holder:
        return False  # gone, or our lease expired and someone else took the entry over
    now = now_us()
    last_error: str | None = None
    for address, (state, error) in results.items():
        state = RecipientState(state)
        # Only pending recipients change: delivered and failed are final.
        conn.execute(
            "UPDATE outbound_rcpts SET state = ?, attempts = attempts + 1, last_error = ?,"
            " last_attempt = ? WHERE queue_id = ? AND address = ? AND state = 'pending'",
            (state.value, error, now, queue_id, address),
        )
        if error is not None:
            last_error = error
    if last_error is not None:
        conn.execute("UPDATE outbound SET last_error = ? WHERE id = ?", (last_error, queue_id))
    if delay_notified is not None:
        conn.execute(
            "UPDATE outbound SET delay_notified = ? WHERE id = ?",
            (int(delay_notified), queue_id),
        )
    if next_attempt is not None:
        conn.execute(
            "UPDATE outbound SET next_attempt = ?, attempts = attempts + 1,"
            " lease_holder = NULL, lease_until = NULL WHERE id = ?",
            (to_us(next_attempt), queue_id),
        )
    return True


def release_leases(conn: sqlite3.Connection, holder_prefix: str) -> int:
    rules.check_holder_prefix(holder_prefix)
    # substr, not LIKE: a holder name may contain % or _.
    cur = conn.execute(
        "UPDATE outbound SET lease_holder = NULL, lease_until = NULL"
        " WHERE lease_holder IS NOT NULL AND substr(lease_holder, 1, ?) = ?",
        (len(holder_prefix), holder_prefix),
    )
    return cur.rowcount


def dequeue(conn: sqlite3.Connection, queue_id: QueueId) -> bool:
    row = conn.execute("SELECT blob_id FROM outbound WHERE id = ?", (queue_id,)).fetchone()
    if row is None:
        return False
    # outbound_rcpts rows go with it (ON DELETE CASCADE).
    conn.execute("DELETE FROM outbound WHERE id = ?", (queue_id,))
    _free_blobs(conn, [row[0]])
    return True


def retry(conn: sqlite3.Connection, queue_id: QueueId | None = None) -> int:
    pending = (
        "EXISTS (SELECT 1 FROM outbound_rcpts r WHERE r.queue_id = outbound.id"
        " AND r.state = 'pending')"
    )
    now = now_us()
    if queue_id is None:
        cur = conn.execute(
            f"UPDATE outbound SET next_attempt = ? WHERE next_attempt > ? AND {pending}",
            (now, now),
        )
        return cur.rowcount
    cur = conn.execute(
        f"UPDATE outbound SET next_attempt = min(next_attempt, ?) WHERE id = ? AND {pending}",
        (now, queue_id),
    )
    return cur.rowcount
