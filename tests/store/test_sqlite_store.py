"""What only the SQLite backend promises: migrations, pragmas, group-commit mechanics,
failure handling, threads. The backend-neutral promises are in test_store_contract.py.
"""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from postkeep.store.api import StorageError, StorageErrorKind
from postkeep.store.sqlite import SqliteStore, writer
from postkeep.store.sqlite.connection import convert
from postkeep.store.sqlite.migrate import migrations, statements
from postkeep.store.sqlite.ops import BLOB_CHUNK


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "postkeep.sqlite"


@pytest.fixture
async def sq(db: Path) -> AsyncIterator[SqliteStore]:
    # A wide batch window: tests that stage a hand-off must not depend on machine speed.
    s = SqliteStore(db, batch_window=60.0)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def _inbox_id(store: SqliteStore) -> int:
    async with store.write() as tx:
        await tx.add_domain("example.com")
        account = await tx.add_account("bob@example.com", "h")
        inbox = await tx.mailbox(account.id, "INBOX")
    assert inbox is not None
    return inbox.id


async def _count(store: SqliteStore, mailbox_id: int) -> int:
    async with store.read() as tx:
        return len(await tx.messages(mailbox_id))


def _raw(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db, isolation_level=None)


# ---------------------------------------------------------------- migrations


async def test_fresh_file_is_migrated_and_reopening_is_a_no_op(db: Path) -> None:
    latest = len(migrations())
    first = SqliteStore(db)
    await first.open()
    await first.close()
    assert first.migrated == tuple(range(1, latest + 1))
    second = SqliteStore(db)
    await second.open()
    await second.close()
    assert second.migrated == ()
    with _raw(db) as conn:
        rows = conn.execute("SELECT version, name FROM schema_version ORDER BY version")
        assert [v for v, _ in rows] == list(range(1, latest + 1))


async def test_open_twice_is_harmless_and_close_twice_too(db: Path) -> None:
    s = SqliteStore(db)
    await s.open()
    await s.open()
    await s.close()
    await s.close()


async def test_newer_schema_is_refused_untouched(db: Path) -> None:
    s = SqliteStore(db)
    await s.open()
    await s.close()
    with _raw(db) as conn:
        conn.execute("INSERT INTO schema_version VALUES (999, 'from_the_future', 0)")
    with pytest.raises(StorageError) as err:
        await SqliteStore(db).open()
    assert err.value.kind is StorageErrorKind.PERM
    assert "999" in err.value.detail


_OPEN_CHILD = """
import asyncio, pathlib, sys
from postkeep.store.sqlite import SqliteStore
async def main():
    s = SqliteStore(pathlib.Path(sys.argv[1]))
    await s.open()
    print(len(s.migrated))
    await s.close()
asyncio.run(main())
"""


def test_concurrent_processes_opening_a_fresh_file(db: Path) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_CHILD, str(db)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    results = [c.communicate(timeout=60) for c in children]
    for child, (_, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err.decode()
    applied = sorted(int(out) for out, _ in results)
    # Exactly one process built the schema; the others found it done.
    assert applied == [0, 0, 0, len(migrations())]
    with _raw(db) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == len(
            migrations()
        )


def test_statement_splitter_respects_strings_and_comments() -> None:
    script = """
        -- a comment; with a semicolon
        CREATE TABLE t (x TEXT DEFAULT 'a;b');
        INSERT INTO t VALUES ('it''s; fine');  -- trailing
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;
    """
    got = statements(script)
    assert len(got) == 3
    assert "CREATE TRIGGER" in got[2] and got[2].endswith("END;")
    with pytest.raises(ValueError):
        statements("CREATE TABLE u (x)")


# ---------------------------------------------------------------- settings


async def test_connection_settings(sq: SqliteStore, db: Path) -> None:
    def pragmas(conn: sqlite3.Connection) -> tuple[Any, ...]:
        return tuple(
            conn.execute(f"PRAGMA {p}").fetchone()[0]
            for p in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        )

    mode, sync, fks, busy = await sq._writer._thread(pragmas)
    assert (mode, sync, fks) == ("wal", 2, 1)  # 2 = FULL: every COMMIT fsyncs the WAL
    assert busy > 0
    async with sq.read() as tx:
        runner: Any = tx._runner  # type: ignore[attr-defined]
        assert await runner.run(pragmas, changes=False) == (mode, sync, fks, busy)
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600


async def test_no_sqlite_call_on_the_event_loop_thread(sq: SqliteStore) -> None:
    threads: set[int] = set()

    def trace(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(lambda _sql: threads.add(threading.get_ident()))

    await sq._writer._thread(trace)
    for reader in sq._readers:
        await reader.call(trace)
    mailbox_id = await _inbox_id(sq)
    async with sq.write() as tx:
        await tx.append(mailbox_id, await tx.put_blob(b"x" * 10))
    async with sq.read() as rtx:
        await rtx.messages(mailbox_id)
    assert threads
    assert threading.get_ident() not in threads


# ---------------------------------------------------------------- group commit


async def test_concurrent_writes_share_one_commit(sq: SqliteStore) -> None:
    mailbox_id = await _inbox_id(sq)
    commits0, txs0 = sq.stats.commits, sq.stats.write_transactions

    async def deliver() -> int:
        async with sq.write() as tx:
            return await tx.append(mailbox_id, await tx.put_blob(b"m"))

    await asyncio.gather(*(deliver() for _ in range(50)))
    assert sq.stats.write_transactions - txs0 == 50
    # All 50 queue while the first one's BEGIN runs: one batch, one fsync.
    assert sq.stats.commits - commits0 <= 2


async def test_batch_cap_bounds_a_commit(db: Path) -> None:
    s = SqliteStore(db, batch_cap=8)
    await s.open()
    try:
        mailbox_id = await _inbox_id(s)
        commits0 = s.stats.commits

        async def deliver() -> None:
            async with s.write() as tx:
                await tx.append(mailbox_id, await tx.put_blob(b"m"))

        await asyncio.gather(*(deliver() for _ in range(50)))
        assert s.stats.commits - commits0 >= 50 // 8
        assert await _count(s, mailbox_id) == 50
    finally:
        await s.close()


async def test_batch_window_bounds_how_long_a_batch_stays_open(db: Path) -> None:
    s = SqliteStore(db, batch_window=0.0)  # every batch is already "too old" to hand on
    await s.open()
    try:
        mailbox_id = await _inbox_id(s)
        commits0, txs0 = s.stats.commits, s.stats.write_transactions

        async def deliver() -> None:
            async with s.write() as tx:
                await tx.append(mailbox_id, await tx.put_blob(b"m"))

        await asyncio.gather(*(deliver() for _ in range(10)))
        assert s.stats.commits - commits0 == s.stats.write_transactions - txs0 == 10
    finally:
        await s.close()


async def test_a_lone_write_commits_without_waiting_for_company(sq: SqliteStore) -> None:
    commits0 = sq.stats.commits
    async with sq.write() as tx:
        await tx.add_domain("example.com")
    assert sq.stats.commits == commits0 + 1


# ---------------------------------------------------------------- failures


async def test_failed_commit_fails_every_member_and_nothing_is_visible(
    sq: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox_id = await _inbox_id(sq)

    def failing_commit(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(writer, "_commit", failing_commit)

    async def deliver() -> int:
        async with sq.write() as tx:
            return await tx.append(mailbox_id, await tx.put_blob(b"m"))

    results = await asyncio.gather(*(deliver() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, StorageError) for r in results), results
    assert all(r.kind is StorageErrorKind.TEMP for r in results if isinstance(r, StorageError))
    monkeypatch.undo()
    assert await _count(sq, mailbox_id) == 0
    # The store recovers: the next write starts a clean transaction.
    assert await deliver() == 1


async def test_lost_transaction_poisons_the_batch(sq: SqliteStore) -> None:
    """SQLite may roll the whole transaction back by itself (SQLITE_FULL, IOERR): every
    member of the batch must then fail, nothing may run in autocommit mode, and the next
    transaction starts a clean batch."""
    mailbox_id = await _inbox_id(sq)
    gate = asyncio.Event()
    queued = asyncio.Event()

    async def first() -> None:
        async with sq.write() as tx:
            await tx.append(mailbox_id, await tx.put_blob(b"first"))
            queued.set()
            await gate.wait()  # the others queue up behind this turn

    async def saboteur() -> None:
        async with sq.write() as tx:
            runner: Any = tx._runner  # type: ignore[attr-defined]
            await runner.run(lambda c: c.execute("ROLLBACK"), changes=False)

    async def later() -> None:
        async with sq.write() as tx:
            await tx.append(mailbox_id, await tx.put_blob(b"later"))

    t1 = asyncio.create_task(first())
    await queued.wait()
    t2 = asyncio.create_task(saboteur())
    t3 = asyncio.create_task(later())
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(t1, t2, t3, return_exceptions=True)
    # The poisoned batch is not handed on: "later" is not in it and commits on its own.
    assert [type(r) for r in results] == [StorageError, StorageError, type(None)], results
    async with sq.read() as rtx:
        rows = await rtx.messages(mailbox_id)
        assert [await rtx.read_blob(r.blob) for r in rows] == [b"later"]


async def test_database_locked_by_another_process_is_temp(db: Path) -> None:
    s = SqliteStore(db, busy_timeout=0.2)
    await s.open()
    try:
        other = _raw(db)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StorageError) as err:
                async with s.write() as tx:
                    await tx.add_domain("example.com")
            assert err.value.kind is StorageErrorKind.TEMP
        finally:
            other.execute("ROLLBACK")
            other.close()
        async with s.write() as tx:
            await tx.add_domain("example.com")
    finally:
        await s.close()


def test_sqlite_errors_map_to_storage_error_kinds(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.sqlite", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, u TEXT UNIQUE CHECK (u <> 'bad'))")
    conn.execute("CREATE TABLE c (p INTEGER REFERENCES p(id))")
    conn.execute("INSERT INTO p VALUES (1, 'a')")
    cases = [
        ("INSERT INTO p VALUES (1, 'b')", StorageErrorKind.EXISTS),
        ("INSERT INTO p VALUES (2, 'a')", StorageErrorKind.EXISTS),
        ("INSERT INTO c VALUES (7)", StorageErrorKind.NOT_FOUND),
        ("INSERT INTO p VALUES (3, 'bad')", StorageErrorKind.PERM),
        ("SELECT * FROM no_such_table", StorageErrorKind.TEMP),
    ]
    for sql, kind in cases:
        with pytest.raises(sqlite3.Error) as raw:
            conn.execute(sql)
        assert convert(raw.value).kind is kind, sql
    conn.close()


# ---------------------------------------------------------------- misuse and cancellation


async def test_nested_write_in_the_same_task_is_refused(sq: SqliteStore) -> None:
    async with sq.write():
        with pytest.raises(RuntimeError):
            async with sq.write():
                pass
    async with sq.write() as tx:
        await tx.add_domain("still-works.example")


async def test_transaction_object_is_dead_after_the_block(sq: SqliteStore) -> None:
    async with sq.write() as wtx:
        pass
    with pytest.raises(RuntimeError):
        await wtx.add_domain("late.example")
    async with sq.read() as rtx:
        pass
    with pytest.raises(RuntimeError):
        await rtx.list_domains()


async def test_cancelled_body_rolls_back_and_others_commit(sq: SqliteStore) -> None:
    mailbox_id = await _inbox_id(sq)
    inside = asyncio.Event()

    async def stuck() -> None:
        async with sq.write() as tx:
            await tx.append(mailbox_id, await tx.put_blob(b"cancelled"))
            inside.set()
            await asyncio.sleep(3600)

    async def deliver() -> int:
        async with sq.write() as tx:
            return await tx.append(mailbox_id, await tx.put_blob(b"kept"))

    t = asyncio.create_task(stuck())
    await inside.wait()
    others = [asyncio.create_task(deliver()) for _ in range(3)]
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    uids = await asyncio.gather(*others)
    async with sq.read() as rtx:
        rows = await rtx.messages(mailbox_id)
        bodies = [await rtx.read_blob(r.blob) for r in rows]
    assert [r.uid for r in rows] == sorted(uids)
    assert bodies == [b"kept"] * 3


async def test_batch_is_finished_when_the_next_waiter_is_cancelled(
    sq: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn hands the lock to a waiter that is then cancelled before it runs: the batch
    has no holder and nobody else is coming, yet the first turn must still get its COMMIT."""
    mailbox_id = await _inbox_id(sq)
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def first() -> int:
        async with sq.write() as tx:
            uid = await tx.append(mailbox_id, await tx.put_blob(b"first"))
            inside.set()
            await leave.wait()
            return uid

    async def waiter() -> None:
        async with sq.write() as tx:
            await tx.add_domain("never.example")

    t1 = asyncio.create_task(first())
    await inside.wait()
    t2 = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)  # t2 is now blocked on the writer's lock

    lock = sq._writer._lock
    real_release = lock.release

    def release_then_cancel_heir() -> None:
        real_release()  # wakes t2 ...
        t2.cancel()  # ... which is cancelled before it can run

    monkeypatch.setattr(lock, "release", release_then_cancel_heir)
    leave.set()
    uid = await asyncio.wait_for(t1, timeout=5)
    monkeypatch.undo()
    with pytest.raises(asyncio.CancelledError):
        await t2
    async with sq.read() as rtx:
        assert [r.uid for r in await rtx.messages(mailbox_id)] == [uid]
        assert not await rtx.domain_exists("never.example")


async def test_close_waits_for_in_flight_writes(db: Path) -> None:
    s = SqliteStore(db)
    await s.open()
    mailbox_id = await _inbox_id(s)
    inside = asyncio.Event()

    async def slow() -> int:
        async with s.write() as tx:
            inside.set()
            await asyncio.sleep(0.05)
            return await tx.append(mailbox_id, await tx.put_blob(b"slow"))

    t = asyncio.create_task(slow())
    await inside.wait()
    await s.close()
    assert t.done() and t.result() == 1
    with pytest.raises(StorageError) as err:
        async with s.write():
            pass
    assert err.value.kind is StorageErrorKind.TEMP
    with pytest.raises(StorageError):
        async with s.read():
            pass
    again = SqliteStore(db)
    await again.open()
    try:
        assert await _count(again, mailbox_id) == 1
    finally:
        await again.close()


# ---------------------------------------------------------------- blobs


class _RecordingFile(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int] = []

    def read(self, n: int | None = -1, /) -> bytes:
        self.reads.append(-1 if n is None else n)
        return super().read(n)


async def test_blob_from_a_file_is_copied_in_chunks(sq: SqliteStore) -> None:
    data = os.urandom(3 * BLOB_CHUNK + 17)
    f = _RecordingFile(data)
    async with sq.write() as tx:
        ref = await tx.put_blob(f, len(data))
    assert f.reads and all(0 < n <= BLOB_CHUNK for n in f.reads)
    async with sq.read() as rtx:
        assert await rtx.read_blob(ref) == data


async def test_short_file_is_refused_and_leaves_no_blob(sq: SqliteStore) -> None:
    async with sq.write() as tx:
        with pytest.raises(ValueError):
            await tx.put_blob(io.BytesIO(b"abc"), 10)
        ref = await tx.put_blob(b"ok")
    async with sq.read() as rtx:
        assert await rtx.read_blob(ref) == b"ok"
    with _raw(sq.path) as conn:
        assert conn.execute("SELECT count(*) FROM blobs").fetchone()[0] == 1


async def test_naive_internal_date_is_refused(sq: SqliteStore) -> None:
    from datetime import datetime

    mailbox_id = await _inbox_id(sq)
    async with sq.write() as tx:
        ref = await tx.put_blob(b"x")
        with pytest.raises(ValueError):
            await tx.append(mailbox_id, ref, when=datetime(2024, 1, 1))


async def test_group_commit_many_concurrent_writes(db: Path) -> None:
    # Moved from the contract suite: fewer COMMITs than transactions is SQLite's group
    # commit. PostgreSQL commits each transaction itself (its WAL flushes may be shared,
    # but the store cannot see that), so there commits == transactions.
    store = SqliteStore(db)
    await store.open()
    try:
        inbox_id = await _inbox_id(store)
        txs0, commits0 = store.stats.write_transactions, store.stats.commits

        async def deliver(i: int) -> int:
            async with store.write() as tx:
                blob = await tx.put_blob(b"message %d" % i)
                return await tx.append(inbox_id, blob)

        uids = await asyncio.gather(*(deliver(i) for i in range(50)))
        txs = store.stats.write_transactions - txs0
        commits = store.stats.commits - commits0
        assert txs == 50
        assert 1 <= commits < txs
        assert len(set(uids)) == 50
    finally:
        await store.close()
    store = SqliteStore(db)
    await store.open()
    try:
        async with store.read() as tx:
            rows = await tx.messages(inbox_id)
            got = {r.uid: await tx.read_blob(r.blob) for r in rows}
    finally:
        await store.close()
    assert got == {uid: b"message %d" % i for i, uid in enumerate(uids)}
