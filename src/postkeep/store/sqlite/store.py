"""``SqliteStore``: the embedded backend of ``postkeep.store.api.Store``.

One file, WAL mode, one writer thread with group commit (``writer.py``) and a small pool of
reader connections, each with a thread of its own, for snapshot reads. ``changes`` is an
in-process ``LocalChangeFeed`` (``store/feed.py``) that the writer feeds after each COMMIT: it
sees the writes of this process only, not those of another process sharing the file
(the CLI's ``user del``, say), which is fine for what it serves — waking IDLE sessions.

Invariants:
- ``open()`` creates or migrates the schema before anything else may run, and running it on
  an up-to-date file is a no-op; ``close()`` waits for in-flight transactions, closes every
  connection and stops every thread; it is safe to call twice.
- A read transaction is one SQLite read transaction on one reader connection: a consistent
  snapshot taken by its first operation (BEGIN runs in the same trip to the reader thread,
  as PostgreSQL's REPEATABLE READ takes its snapshot at the first statement). It does not
  see writes committed after that, nor the uncommitted changes of a write transaction
  open in the same task.
- Each reader connection is used only by its own single thread, so the operations of one
  transaction run in order even when the caller is cancelled halfway; a connection goes
  back to the pool once the end of its transaction is queued on that thread (FIFO), so
  the next transaction's BEGIN runs only after it — without a round trip to wait for it.
- Do not wait for ``write()`` while holding a read transaction: with every reader held
  that way, a write body that reads would wait forever.
- ``close()`` closes the change feed after the last COMMIT was published: every
  subscription ends and its ``wait()`` returns [].
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from postkeep.store.api import (
    ChangeFeed,
    ReadTx,
    StorageError,
    StorageErrorKind,
    StoreStats,
    WriteTx,
)
from postkeep.store.feed import DEFAULT_BACKLOG, LocalChangeFeed
from postkeep.store.sqlite.connection import DEFAULT_BUSY_TIMEOUT, connect, convert
from postkeep.store.sqlite.tx import SqliteReadTx
from postkeep.store.sqlite.writer import DEFAULT_BATCH_CAP, DEFAULT_BATCH_WINDOW, Writer

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Reader:
    """A reader connection and the one thread allowed to use it."""

    __slots__ = ("conn", "executor", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.conn: sqlite3.Connection | None = None  # set and used in the executor's thread

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self.conn
            if conn is None:
                raise StorageError(StorageErrorKind.TEMP, "the store is not open")
            try:
                return fn(conn)
            except sqlite3.Error as e:
                raise convert(e) from e

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    def post(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        """Queue ``fn(conn)`` on this reader's thread without waiting; errors are logged."""

        def run() -> None:
            conn = self.conn
            if conn is not None:
                try:
                    fn(conn)
                except Exception:
                    # Nothing to lose in a read-only transaction; _begin_read() cleans up.
                    log.exception("store.sqlite.read_end_failed")

        self.executor.submit(run)


def _begin_read(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")  # a previous transaction that could not be ended cleanly
    conn.execute("BEGIN")
    # A deferred BEGIN takes its WAL snapshot at the first read; read now, so every
    # operation of the transaction, whatever it reads first, sees this one snapshot.
    conn.execute("SELECT count(*) FROM schema_version").fetchone()


def _end_read(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("COMMIT")  # read-only: nothing to make durable, just ends the snapshot


def _in_snapshot(
    conn: sqlite3.Connection, runner: _ReadRunner, op: Callable[[sqlite3.Connection], T]
) -> T:
    if not runner.begun:  # in the reader thread: the transaction's first operation
        runner.begun = True
        _begin_read(conn)
    if not conn.in_transaction:
        # Never answer from outside the snapshot: two queries could disagree.
        raise StorageError(StorageErrorKind.TEMP, "the read snapshot was lost; try again")
    return op(conn)


class SqliteStore:
    """Implements ``postkeep.store.api.Store`` on one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        readers: int = 4,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        batch_cap: int = DEFAULT_BATCH_CAP,
        batch_window: float = DEFAULT_BATCH_WINDOW,
        change_backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        if readers < 1:
            raise ValueError("readers must be at least 1")
        self.path = path
        self.stats = StoreStats()
        self._feed = LocalChangeFeed(change_backlog)
        self.changes: ChangeFeed = self._feed
        #: Migration versions the last ``open()`` applied; ``()`` when the file was current.
        self.migrated: tuple[int, ...] = ()
        self._busy_timeout = busy_timeout
        self._n_readers = readers
        self._writer = Writer(
            path,
            self.stats,
            busy_timeout=busy_timeout,
            batch_cap=batch_cap,
            batch_window=batch_window,
            publish=self._feed.publish,
        )
        self._pool: asyncio.Queue[_Reader] | None = None
        self._readers: list[_Reader] = []
        self._state = "new"  # new → open → closed

    async def open(self) -> None:
        if self._state == "open":
            return
        if self._state == "closed":
            raise RuntimeError("a closed SqliteStore cannot be opened again; make a new one")
        # The writer migrates first: readers must never see a half-built schema.
        self.migrated = await self._writer.open()
        pool: asyncio.Queue[_Reader] = asyncio.Queue()
        try:
            for i in range(self._n_readers):
                reader = _Reader(f"postkeep-sqlite-reader-{i}")
                self._readers.append(reader)
                await asyncio.get_running_loop().run_in_executor(
                    reader.executor, self._connect_reader, reader
                )
                pool.put_nowait(reader)
        except BaseException:
            await self._shutdown_readers()
            await self._writer.close()
            self._state = "closed"
            raise
        self._pool = pool
        self._state = "open"
        log.info(
            "store.sqlite.open",
            extra={"path": str(self.path), "migrated": list(self.migrated)},
        )

    def _connect_reader(self, reader: _Reader) -> None:
        reader.conn = connect(self.path, reader=True, busy_timeout=self._busy_timeout)

    async def close(self) -> None:
        if self._state == "closed":
            return
        was_open = self._state == "open"
        self._state = "closed"  # read() and write() refuse from now on
        await self._writer.close()
        self._feed.close()  # after the writer: the last batch has been published
        if was_open:
            assert self._pool is not None
            # Taking every reader back means every read transaction has ended.
            for _ in self._readers:
                await self._pool.get()
        await self._shutdown_readers()

    async def _shutdown_readers(self) -> None:
        def close_conn(reader: _Reader) -> None:
            if reader.conn is not None:
                reader.conn.close()
                reader.conn = None

        loop = asyncio.get_running_loop()
        for reader in self._readers:
            try:
                await loop.run_in_executor(reader.executor, close_conn, reader)
            except sqlite3.Error:
                log.exception("store.sqlite.reader_close_failed")
            reader.executor.shutdown(wait=True)
        self._readers.clear()

    def read(self) -> AbstractAsyncContextManager[ReadTx]:
        return _ReadContext(self)

    def write(self) -> AbstractAsyncContextManager[WriteTx]:
        return self._writer.context()

    async def _checkout(self) -> _Reader:
        if self._state != "open" or self._pool is None:
            raise StorageError(StorageErrorKind.TEMP, "the store is closed or not open")
        return await self._pool.get()

    def _checkin(self, reader: _Reader) -> None:
        """Queue the end of the reader's transaction (after its last operation), pool it."""
        reader.post(_end_read)
        assert self._pool is not None
        self._pool.put_nowait(reader)


class _ReadContext(AbstractAsyncContextManager[ReadTx]):
    __slots__ = ("_reader", "_runner", "_store")

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._reader: _Reader | None = None
        self._runner: _ReadRunner | None = None

    async def __aenter__(self) -> ReadTx:
        if self._reader is not None:
            raise RuntimeError("a read() context cannot be entered twice")
        reader = await self._store._checkout()
        self._reader = reader
        # No trip to the thread here: BEGIN comes with the first operation.
        self._runner = _ReadRunner(reader)
        return SqliteReadTx(self._runner)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._reader is not None and self._runner is not None
        self._runner.active = False
        self._store._checkin(self._reader)


class _ReadRunner:
    __slots__ = ("active", "begun", "reader")

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        self.active = True
        self.begun = False  # set and read in the reader's thread only

    async def run(self, op: Callable[[sqlite3.Connection], T], *, changes: bool) -> T:
        if not self.active:
            raise RuntimeError("this read transaction has ended")
        if changes:
            raise RuntimeError("a read transaction cannot change data")
        return await self.reader.call(lambda conn: _in_snapshot(conn, self, op))
