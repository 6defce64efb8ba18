"""What only the SQLite backend promises for IMAP and POP3: the 0002 migration, query
plans, blob rows actually freed, and how the change feed rides on group commit (published
after the COMMIT, before ``write()`` returns; nothing from a failed batch)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from postkeep.store.api import Change, ChangeKind, FlagOp, StorageError, StorageErrorKind
from postkeep.store.sqlite import SqliteStore, ops, writer
from postkeep.store.sqlite.migrate import migrations, statements


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "postkeep.sqlite"


@pytest.fixture
async def sq(db: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(db, batch_window=60.0)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def _inbox_id(store: SqliteStore, address: str = "bob@example.com") -> int:
    async with store.write() as tx:
        domain = address.rpartition("@")[2]
        if not await tx.domain_exists(domain):
            await tx.add_domain(domain)
        account = await tx.add_account(address, "h")
        inbox = await tx.mailbox(account.id, "INBOX")
    assert inbox is not None
    return inbox.id


async def _deliver(store: SqliteStore, mailbox_id: int, n: int = 1) -> list[int]:
    async with store.write() as tx:
        return [await tx.append(mailbox_id, await tx.put_blob(b"message %d" % i)) for i in range(n)]


def _count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# ---------------------------------------------------------------- schema and plans


async def test_version_1_database_is_migrated_in_place(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("BEGIN")
    conn.execute(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied INTEGER NOT NULL)"
    )
    first = migrations()[0]
    for stmt in statements(first.sql):
        conn.execute(stmt)
    conn.execute("INSERT INTO schema_version VALUES (1, ?, 0)", (first.name,))
    conn.execute("INSERT INTO domains VALUES ('example.com', 0)")
    conn.execute("INSERT INTO accounts VALUES (1, 'bob@example.com', 'example.com', 'h', 0)")
    conn.execute(
        "INSERT INTO mailboxes (id, account_id, name, uidvalidity) VALUES (1, 1, 'INBOX', 7)"
    )
    conn.execute("INSERT INTO blobs (id, size, created, data) VALUES (1, 1, 0, x'41')")
    conn.execute(
        "INSERT INTO messages (mailbox_id, uid, modseq, internal_date, size, blob_id)"
        " VALUES (1, 1, 2, 0, 1, 1)"
    )
    conn.execute("COMMIT")
    conn.close()
    s = SqliteStore(db)
    await s.open()
    try:
        assert s.migrated == tuple(range(2, len(migrations()) + 1))
        async with s.read() as tx:
            assert await tx.uids(1) == [1]
        async with s.write() as tx:
            assert await tx.acquire_maildrop(1, "pop3", 60)
    finally:
        await s.close()


async def _plans(store: SqliteStore, call: str, mailbox_id: int) -> list[str]:
    """The query plan of every SELECT a read call ran."""
    sql: list[str] = []

    def trace(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(sql.append)

    def untrace(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(None)

    for reader in store._readers:
        await reader.call(trace)
    async with store.read() as tx:
        await getattr(tx, call)(mailbox_id, *([0] if call == "messages_since" else []))
    for reader in store._readers:
        await reader.call(untrace)
    selects = [s for s in sql if s.startswith("SELECT") and "schema_version" not in s]
    assert selects

    def explain(conn: sqlite3.Connection) -> list[str]:
        return [str(row[3]) for s in selects for row in conn.execute("EXPLAIN QUERY PLAN " + s)]

    return await store._writer._thread(explain)


async def test_uids_reads_only_the_covering_index(sq: SqliteStore) -> None:
    inbox = await _inbox_id(sq)
    plans = await _plans(sq, "uids", inbox)
    assert plans == ["SEARCH messages USING COVERING INDEX messages_uids (mailbox_id=?)"]


async def test_messages_since_uses_the_modseq_index(sq: SqliteStore) -> None:
    inbox = await _inbox_id(sq)
    plans = await _plans(sq, "messages_since", inbox)
    assert any("INDEX messages_modseq (mailbox_id=? AND modseq>?)" in p for p in plans), plans


# ---------------------------------------------------------------- blob rows


async def test_blob_rows_are_deleted_with_their_last_message(sq: SqliteStore) -> None:
    inbox = await _inbox_id(sq)
    async with sq.write() as tx:
        account = await tx.get_account("bob@example.com")
        assert account is not None
        archive = await tx.create_mailbox(account.id, "Archive")
    await _deliver(sq, inbox, 4)
    assert _count(sq.path, "blobs") == 4
    async with sq.write() as tx:
        await tx.copy(inbox, [1, 2], archive.id)
        await tx.expunge(inbox, [1, 2, 3])
    assert _count(sq.path, "blobs") == 3  # 1 and 2 live on in Archive
    async with sq.write() as tx:
        await tx.move(inbox, [4], archive.id)
    assert _count(sq.path, "blobs") == 3  # moved, not freed
    async with sq.write() as tx:
        await tx.delete_mailbox(archive.id)
    assert _count(sq.path, "blobs") == 0


async def test_deleting_an_account_frees_its_blobs_and_announces_its_mailboxes(
    sq: SqliteStore,
) -> None:
    inbox = await _inbox_id(sq)
    other = await _inbox_id(sq, "carol@example.com")
    await _deliver(sq, inbox, 3)
    await _deliver(sq, other, 1)
    sub = sq.changes.subscribe()
    async with sq.write() as tx:
        await tx.acquire_maildrop(1, "pop3", 60)
        await tx.del_account("bob@example.com")
    got = await sub.wait(0)
    sub.close()
    assert _count(sq.path, "blobs") == 1
    assert _count(sq.path, "maildrop_locks") == 0
    assert {c.kind for c in got} == {ChangeKind.MAILBOX}
    assert inbox in {c.mailbox_id for c in got} and len(got) == 5


# ---------------------------------------------------------------- atomicity


async def test_move_whose_expunge_fails_leaves_nothing_behind(
    sq: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = await _inbox_id(sq)
    await _deliver(sq, inbox, 2)
    async with sq.write() as tx:
        account = await tx.get_account("bob@example.com")
        assert account is not None
        archive = await tx.create_mailbox(account.id, "Archive")
    sub = sq.changes.subscribe([inbox, archive.id])

    def failing_expunge(*args: object) -> list[int]:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ops, "expunge", failing_expunge)
    async with sq.write() as tx:
        with pytest.raises(StorageError) as err:
            await tx.move(inbox, [1, 2], archive.id)
        assert err.value.kind is StorageErrorKind.TEMP
        assert await tx.uids(archive.id) == []  # the copy half was undone with it
        await tx.set_flags(inbox, [1], FlagOp.ADD, frozenset({"\\Seen"}))
    monkeypatch.undo()
    async with sq.read() as rtx:
        assert await rtx.uids(inbox) == [1, 2]
        assert await rtx.uids(archive.id) == []
    got = await sub.wait(0)
    sub.close()
    assert [(c.kind, c.uids) for c in got] == [(ChangeKind.FLAGS, (1,))]


# ---------------------------------------------------------------- change feed and group commit


async def test_changes_are_published_before_write_returns(sq: SqliteStore) -> None:
    inbox = await _inbox_id(sq)
    sub = sq.changes.subscribe([inbox])
    (uid,) = await _deliver(sq, inbox)
    # No waiting needed: the COMMIT and the publication happened before write() returned.
    assert [c.uids for c in await sub.wait(0)] == [(uid,)]
    sub.close()


async def test_a_batch_publishes_its_members_in_order_without_the_failed_one(
    sq: SqliteStore,
) -> None:
    inbox = await _inbox_id(sq)
    sub = sq.changes.subscribe([inbox])
    commits0 = sq.stats.commits

    class Boom(Exception):
        pass

    async def deliver(i: int) -> int:
        async with sq.write() as tx:
            uid = await tx.append(inbox, await tx.put_blob(b"m%d" % i))
            if i == 2:
                raise Boom
            return uid

    results = await asyncio.gather(*(deliver(i) for i in range(6)), return_exceptions=True)
    assert sq.stats.commits - commits0 == 1  # one batch
    kept = [r for r in results if isinstance(r, int)]
    got = await sub.wait(0)
    sub.close()
    assert [c.uids for c in got] == [(uid,) for uid in kept]
    assert all(c.kind is ChangeKind.APPEND for c in got)


async def test_failed_commit_publishes_nothing(
    sq: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = await _inbox_id(sq)
    sub = sq.changes.subscribe()

    def failing_commit(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(writer, "_commit", failing_commit)
    with pytest.raises(StorageError):
        await _deliver(sq, inbox)
    monkeypatch.undo()
    assert await sub.wait(0.05) == []
    (uid,) = await _deliver(sq, inbox)
    assert [c.uids for c in await sub.wait(0)] == [(uid,)]
    sub.close()


async def test_a_failing_subscriber_callback_does_not_fail_the_write(
    sq: SqliteStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = await _inbox_id(sq)

    def broken(changes: Sequence[Change]) -> None:
        raise RuntimeError("subscriber bug")

    monkeypatch.setattr(sq._writer, "_publish", broken)
    with caplog.at_level(logging.ERROR):
        assert await _deliver(sq, inbox) == [1]
    assert "store.sqlite.publish_failed" in caplog.text
    async with sq.read() as tx:
        assert await tx.uids(inbox) == [1]


async def test_small_backlog_collapses_per_mailbox(db: Path) -> None:
    s = SqliteStore(db, change_backlog=5)
    await s.open()
    try:
        inbox = await _inbox_id(s)
        sub = s.changes.subscribe([inbox])
        for _ in range(8):
            await _deliver(s, inbox)
        async with s.read() as tx:
            box = await tx.mailbox_by_id(inbox)
        assert box is not None
        got = await sub.wait(0)
        assert got == [Change(inbox, ChangeKind.MAILBOX, (), box.highestmodseq)]
        await _deliver(s, inbox)
        assert [c.kind for c in await sub.wait(0)] == [ChangeKind.APPEND]
    finally:
        await s.close()
    assert await sub.wait() == []  # the store closed the subscription
