"""The writer: one thread, one connection, and group commit.

Every write transaction of the process goes through one ``Writer``. Its connection lives in
a single-thread executor, so SQLite calls never run on the event loop and the write
statements of all transactions form one FIFO queue.

Group commit, as built
----------------------
An ``asyncio.Lock`` (documented FIFO-fair) admits one write transaction at a time: the
*turn*. A *batch* is one SQLite transaction shared by consecutive turns::

    turn 1: BEGIN IMMEDIATE; SAVEPOINT tx; …body…; RELEASE tx   → others waiting: hand on
    turn 2:                  SAVEPOINT tx; …body…; ROLLBACK TO tx; RELEASE tx (body raised)
    turn 3:                  SAVEPOINT tx; …body…; RELEASE tx   → nobody waiting: COMMIT
            batch.done resolves → turns 1 and 3 return from ``async with``; turn 2 had
            already re-raised its own exception.

Round trips between the event loop and the writer thread are what a turn costs while it
holds the lock, so a turn makes as few as it can: ``SAVEPOINT tx`` runs in the same trip
as the turn's first operation, and the turn's end (``RELEASE tx`` or the rollback to it) is
queued on the writer thread without waiting for it before the lock is handed on — the
thread is FIFO, so it runs before anything of the next turn. Whether the end worked is
decided in the thread: a failure there poisons the batch, which the next operation and the
COMMIT step (both in the thread, both after it) see.

At the end of its turn a transaction hands the lock to the next waiter if there is one, the
batch has fewer than ``batch_cap`` members and has been open less than ``batch_window``
seconds; the batch stays open and the transaction awaits ``batch.done``. Otherwise it
COMMITs — one fsync of the WAL for every member — and resolves ``batch.done`` for all of
them, or (after a ROLLBACK) sets the COMMIT's error on it for all of them.

Each turn that ends well adds its transaction's ``Change``s to the batch; once the COMMIT
returned, the batch's changes go to ``publish`` (the store's change feed), in turn order,
*before* the members are released. A turn that rolled back adds nothing, and a batch whose
COMMIT failed publishes nothing.

Nothing ever sleeps waiting for company: a lone transaction commits at once. Transactions
that arrive while a body or an fsync runs queue on the lock and join or form the next
batch, so batches grow exactly when the disk is the bottleneck. The cap and the window only
stop hand-offs, bounding the first member's wait under sustained load.

Invariants:
- A write turn (``async with store.write()``) exits without error only after the COMMIT
  containing its changes returned; a caller acknowledges data (SMTP 250, IMAP OK) only
  after that.
- At most one turn holds the lock; only the holder issues statements for the batch, and
  each turn is ended by exactly one ``_end_turn`` — which hands the lock on or finishes the
  batch, and never raises. The protocol steps after the lock is taken run in tasks the
  caller's cancellation cannot interrupt (``store/tasks.py`` + ``asyncio.shield``).
- A turn's changes live in its own SAVEPOINT: a body that raises rolls back only itself.
- If the shared transaction becomes unusable (SQLite rolled it back on its own after
  SQLITE_FULL/IOERR, or a savepoint could not be undone), the batch is *poisoned*: no
  further statement runs in it (so nothing ever runs in autocommit by accident), it is
  rolled back, and every member gets ``StorageError(TEMP)``.
- The callers' side of the bargain: a write body never waits on network I/O (it only
  calls store methods, which only touch the local disk), so holding the lock across the
  body is short. Never await a socket, another task's write transaction, or a ``write()``
  nested in the same task inside it — the last is refused with ``RuntimeError``, the
  others would stall every writer.
- ``close()`` refuses new turns, waits for admitted ones and their COMMIT, then closes.
- Changes are published only after the COMMIT that made them durable returned, never for
  a rolled-back turn or a failed batch, and before ``async with store.write()`` returns
  for that batch. A failing subscriber callback is logged, never fails the batch.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from postkeep.store.api import Change, StorageError, StorageErrorKind, StoreStats, WriteTx
from postkeep.store.sqlite.connection import connect, convert
from postkeep.store.sqlite.migrate import migrate
from postkeep.store.sqlite.tx import SqliteWriteTx
from postkeep.store.tasks import Tasks

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Most transactions one COMMIT may carry, and the longest a batch stays open (seconds)
#: before it commits even with transactions still waiting. Together they bound how long
#: the first member of a batch waits for its acknowledgement under sustained load.
DEFAULT_BATCH_CAP = 256
DEFAULT_BATCH_WINDOW = 0.1


class _TransactionLost(Exception):
    """Raised in the writer thread when the batch's transaction is gone or unrecoverable."""

    def __init__(self, error: StorageError) -> None:
        super().__init__(str(error))
        self.error = error


class _Turn:
    """One write transaction's savepoint, as the writer thread sees it."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = False  # SAVEPOINT tx was issued (set and read in the writer thread only)


class _Batch:
    """One SQLite transaction shared by consecutive turns, and its COMMIT's outcome."""

    __slots__ = ("changes", "done", "members", "opened", "poisoned")

    def __init__(self, done: asyncio.Future[None], opened: float) -> None:
        self.done = done  # result: committed; exception: nobody may acknowledge
        self.opened = opened  # loop.time() at BEGIN
        self.members = 0
        # Set in the writer thread (or on the loop after a failed trip); once set, no
        # statement runs in the batch any more.
        self.poisoned: StorageError | None = None
        # Of the turns whose RELEASE worked, appended in the writer thread; read on the loop
        # only after the COMMIT (queued behind every RELEASE) returned.
        self.changes: list[Change] = []


# ---------------------------------------------------------------- in the writer thread


def _begin_immediate(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        # Leftover of a batch whose COMMIT and ROLLBACK both failed: nobody was told it
        # succeeded, so dropping it is right, and it must not leak into the new batch.
        conn.execute("ROLLBACK")
    # IMMEDIATE: take the write lock now, waiting up to busy_timeout for another process,
    # instead of failing later on a read-to-write upgrade that cannot wait.
    conn.execute("BEGIN IMMEDIATE")


def _in_batch(
    conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], T], savepoint: str | None
) -> T:
    """Run ``op`` inside the open batch, optionally in its own savepoint."""
    if not conn.in_transaction:
        raise _TransactionLost(
            StorageError(StorageErrorKind.TEMP, "the write transaction was lost; try again")
        )
    if savepoint is not None:
        conn.execute(f"SAVEPOINT {savepoint}")
    try:
        result = op(conn)
    except BaseException as e:
        error = convert(e) if isinstance(e, sqlite3.Error) else None
        if not conn.in_transaction:
            # SQLite rolled the whole transaction back (SQLITE_FULL, IOERR, NOMEM…): the
            # changes of every earlier member of the batch are gone with it.
            raise _TransactionLost(
                error or StorageError(StorageErrorKind.TEMP, f"write transaction lost: {e!r}")
            ) from e
        if savepoint is not None:
            try:
                conn.execute(f"ROLLBACK TO {savepoint}")
                conn.execute(f"RELEASE {savepoint}")
            except sqlite3.Error as undo:
                raise _TransactionLost(convert(undo, "undoing a failed operation")) from undo
        if error is not None:
            raise error from e
        raise
    if not conn.in_transaction:
        # Only a bug could get here (an operation that ended the transaction); catch it now,
        # before anything else runs in autocommit mode.
        raise _TransactionLost(
            StorageError(StorageErrorKind.TEMP, "an operation ended the write transaction")
        )
    if savepoint is not None:
        try:
            conn.execute(f"RELEASE {savepoint}")
        except sqlite3.Error as e:
            raise _TransactionLost(convert(e, "releasing a savepoint")) from e
    return result


def _in_turn(
    conn: sqlite3.Connection,
    batch: _Batch,
    turn: _Turn,
    op: Callable[[sqlite3.Connection], T],
    savepoint: str | None,
) -> T:
    """One operation of a turn; the turn's first one opens its savepoint in the same trip."""
    if batch.poisoned is not None:
        raise StorageError(
            StorageErrorKind.TEMP, f"the write transaction failed: {batch.poisoned.detail}"
        )
    try:
        if not turn.open:
            _in_batch(conn, _savepoint_tx, None)
            turn.open = True
        return _in_batch(conn, op, savepoint)
    except _TransactionLost as e:
        if batch.poisoned is None:
            batch.poisoned = e.error
        raise


def _end_in_turn(
    conn: sqlite3.Connection, batch: _Batch, turn: _Turn, failed: bool, changes: Sequence[Change]
) -> None:
    """Release (or undo) the turn's savepoint; on failure poison the batch. Never raises."""
    if not turn.open or batch.poisoned is not None:
        return  # no statement ran for this turn, or nothing may run in the batch any more
    try:
        if not conn.in_transaction:
            raise _TransactionLost(
                StorageError(StorageErrorKind.TEMP, "the write transaction was lost")
            )
        try:
            (_rollback_tx if failed else _release_tx)(conn)
        except sqlite3.Error as e:
            # The savepoint could not be released or undone: this batch's state is not one
            # we can vouch for, so nobody in it may be told "committed".
            raise _TransactionLost(convert(e, "ending a write turn")) from e
    except _TransactionLost as e:
        batch.poisoned = e.error
        return
    if not failed:
        batch.changes.extend(changes)


def _savepoint_tx(conn: sqlite3.Connection) -> None:
    conn.execute("SAVEPOINT tx")


def _release_tx(conn: sqlite3.Connection) -> None:
    conn.execute("RELEASE tx")


def _rollback_tx(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK TO tx")
    conn.execute("RELEASE tx")


def _commit(conn: sqlite3.Connection) -> None:
    # synchronous=FULL: returns only after the WAL (commit frame included) is fsynced.
    conn.execute("COMMIT")


def _commit_batch(conn: sqlite3.Connection, batch: _Batch) -> StorageError | None:
    """COMMIT unless the batch was poisoned (decided here, after every queued turn end)."""
    if batch.poisoned is not None:
        return batch.poisoned
    if not conn.in_transaction:
        return StorageError(StorageErrorKind.TEMP, "the write transaction was lost")
    try:
        _commit(conn)
    except sqlite3.Error as e:
        return convert(e, "committing")
    return None


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


# ---------------------------------------------------------------- on the event loop


class Writer:
    def __init__(
        self,
        path: Path,
        stats: StoreStats,
        *,
        busy_timeout: float,
        batch_cap: int,
        batch_window: float,
        publish: Callable[[Sequence[Change]], None] | None = None,
    ) -> None:
        if batch_cap < 1:
            raise ValueError("batch_cap must be at least 1")
        self._path = path
        self._stats = stats
        self._busy_timeout = busy_timeout
        self._batch_cap = batch_cap
        self._batch_window = batch_window
        self._publish = publish
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used only in the writer thread
        self._lock = asyncio.Lock()
        self._waiting = 0  # turns blocked in _lock.acquire(): the "someone is waiting" test
        self._batch: _Batch | None = None
        self._holder: asyncio.Task[Any] | None = None  # the task whose body holds the turn
        self._closing = False
        self._tasks = Tasks(log, "store.sqlite.writer_task_failed")

    # -- threads

    async def _thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the writer thread, converting sqlite3 errors."""
        executor = self._executor
        if executor is None:
            raise StorageError(StorageErrorKind.TEMP, "the store is not open")

        def call() -> T:
            conn = self._conn
            if conn is None:
                raise StorageError(StorageErrorKind.TEMP, "the store is not open")
            try:
                return fn(conn)
            except sqlite3.Error as e:
                raise convert(e) from e

        return await asyncio.get_running_loop().run_in_executor(executor, call)

    async def _batch_thread(
        self, batch: _Batch, turn: _Turn, op: Callable[[sqlite3.Connection], T],
        savepoint: str | None,
    ) -> T:
        if batch.poisoned is not None:
            raise StorageError(
                StorageErrorKind.TEMP, f"the write transaction failed: {batch.poisoned.detail}"
            )
        try:
            return await self._thread(lambda conn: _in_turn(conn, batch, turn, op, savepoint))
        except _TransactionLost as e:
            if batch.poisoned is None:
                batch.poisoned = e.error
            raise e.error from None

    def _post(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        """Queue ``fn(conn)`` on the writer thread without waiting; ``fn`` never raises."""
        executor = self._executor
        assert executor is not None, "turns end before close() stops the executor"

        def call() -> None:
            conn = self._conn
            if conn is not None:
                try:
                    fn(conn)
                except BaseException:
                    log.exception("store.sqlite.writer_post_failed")

        executor.submit(call)


    # -- life cycle

    async def open(self) -> tuple[int, ...]:
        """Open the write connection and migrate; returns the migrations applied."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="postkeep-sqlite-writer")

        def do_open(_: None) -> tuple[int, ...]:
            conn = connect(self._path, reader=False, busy_timeout=self._busy_timeout)
            try:
                applied = migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            return applied

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, do_open, None)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        if self._executor is None:
            self._closing = True
            return
        self._closing = True  # begin() refuses from now on; admitted turns are queued ahead
        async with self._lock:
            batch = self._batch
            if batch is not None:
                # Only possible when the waiter a turn handed the lock to was cancelled and
                # the rescue task is queued behind us: finish the batch here instead.
                self._batch = None
                await self._finish_batch(batch)
        await self._tasks.wait()

        def do_close(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        try:
            await self._thread(do_close)
        except StorageError:
            log.exception("store.sqlite.close_failed")
        executor, self._executor = self._executor, None
        executor.shutdown(wait=True)  # idle by now: returns at once

    def context(self) -> AbstractAsyncContextManager[WriteTx]:
        return _WriteContext(self)

    # -- turns

    async def begin(self) -> _Batch:
        """Wait for the turn; the returned batch is open (its SAVEPOINT comes with the
        turn's first operation)."""
        if self._closing or self._executor is None:
            raise StorageError(StorageErrorKind.TEMP, "the store is closed or closing")
        me = asyncio.current_task()
        if me is not None and me is self._holder:
            raise RuntimeError(
                "write() inside a write transaction of the same task would wait for itself"
            )
        self._waiting += 1
        try:
            await self._lock.acquire()
        except asyncio.CancelledError:
            self._waiting -= 1
            self._rescue()
            raise
        self._waiting -= 1
        self._holder = me
        batch = self._batch
        if batch is not None:
            # Handed on into an open batch: nothing to wait for, so no await between taking
            # the lock and returning — the caller's cancellation cannot fall in between.
            batch.members += 1
            self._stats.write_transactions += 1
            return batch
        # Holding the lock: from here exactly one _end_turn() must follow, whatever happens
        # to the caller, so the steps run in a task the caller's cancellation cannot stop.
        start = self._tasks.spawn(self._start())
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            start.add_done_callback(self._abandon)
            raise

    async def _start(self) -> _Batch:
        try:
            await self._thread(_begin_immediate)
        except BaseException:
            self._end_turn()
            raise
        loop = asyncio.get_running_loop()
        batch = self._batch = _Batch(loop.create_future(), loop.time())
        batch.members += 1
        self._stats.write_transactions += 1
        return batch

    def _abandon(self, start: asyncio.Task[_Batch]) -> None:
        """The caller of begin() was cancelled: end the turn it would have had."""
        if start.cancelled() or start.exception() is not None:
            return  # _start() already ended the turn
        self.end_nowait(start.result(), _Turn(), failed=True)

    def end_nowait(
        self, batch: _Batch, turn: _Turn, *, failed: bool, changes: Sequence[Change] = ()
    ) -> None:
        """End this turn: queue its RELEASE (or rollback) and hand the lock on, or start the
        COMMIT. The outcome for the turn is ``batch.done``. Never raises, never waits."""
        # Always queued: an operation of this turn may still be running in the thread (its
        # caller was cancelled), and only the thread knows whether it opened the savepoint.
        self._post(lambda conn: _end_in_turn(conn, batch, turn, failed, changes))
        self._end_turn()

    async def end(
        self, batch: _Batch, turn: _Turn, *, failed: bool, changes: Sequence[Change] = ()
    ) -> None:
        """End this turn; unless ``failed``, return once the batch's COMMIT succeeded.

        ``changes`` (the turn's) are published after that COMMIT, unless ``failed``.
        """
        self.end_nowait(batch, turn, failed=failed, changes=changes)
        if not failed:
            # If the caller is cancelled here it stops waiting; the batch carries on.
            await asyncio.shield(batch.done)  # raises the StorageError if it did not commit

    def _end_turn(self) -> None:
        """Hand the lock to the next turn, or finish the batch and release. Never raises."""
        batch = self._batch
        self._holder = None  # the body is over, even while the COMMIT still holds the lock
        if (
            batch is not None
            and batch.poisoned is None
            and self._waiting > 0
            and batch.members < self._batch_cap
            and asyncio.get_running_loop().time() - batch.opened < self._batch_window
        ):
            # Hand on: the next turn joins this batch. A poisoning still queued in the
            # writer thread is seen there by the next turn's first operation and the COMMIT.
            self._lock.release()
            return
        self._batch = None
        if batch is None:
            self._lock.release()
            return
        self._tasks.spawn(self._commit_and_release(batch))

    async def _commit_and_release(self, batch: _Batch) -> None:
        try:
            await self._finish_batch(batch)
        finally:
            self._lock.release()

    async def _finish_batch(self, batch: _Batch) -> None:
        """COMMIT (or roll back a poisoned batch) and tell every member. Never raises."""
        started = time.perf_counter()
        try:
            error = await self._thread(lambda conn: _commit_batch(conn, batch))
        except StorageError as e:
            error = e
        except BaseException as e:  # e.g. the loop cancels this task at shutdown
            batch.done.set_exception(
                StorageError(StorageErrorKind.TEMP, f"commit interrupted: {e!r}")
            )
            batch.done.exception()  # mark retrieved: members may all be gone
            raise
        if error is None:
            self._stats.commits += 1
            # As the members see it: from the end of the last turn to the COMMIT returning.
            self._stats.commit_seconds += time.perf_counter() - started
            self._publish_changes(batch)
            batch.done.set_result(None)
            return
        log.error(
            "store.sqlite.batch_failed",
            extra={"members": batch.members, "error": error.detail},
        )
        try:
            await self._thread(_rollback)
        except StorageError:
            # _begin_immediate() rolls back leftovers before the next batch.
            log.exception("store.sqlite.rollback_failed")
        batch.done.set_exception(
            StorageError(StorageErrorKind.TEMP, f"the write transaction failed: {error.detail}")
        )
        # Failed members do not await done; mark it retrieved so asyncio does not warn.
        batch.done.exception()

    def _publish_changes(self, batch: _Batch) -> None:
        """Hand a committed batch's changes to the change feed. Never raises."""
        if self._publish is None or not batch.changes:
            return
        try:
            self._publish(batch.changes)
        except Exception:
            # A lost notification only delays an IDLE session; the data is committed.
            log.exception("store.sqlite.publish_failed")

    def _rescue(self) -> None:
        """A waiter was cancelled; make sure an open batch still gets finished.

        If it was the waiter a finished turn had just handed the lock to, the batch has no
        holder and nobody else is coming: its members would wait for ``done`` forever.
        """
        if self._batch is not None and self._waiting == 0 and not self._lock.locked():
            self._tasks.spawn(self._adopt())

    async def _adopt(self) -> None:
        await self._lock.acquire()
        self._holder = asyncio.current_task()
        self._end_turn()


class _WriteContext(AbstractAsyncContextManager[WriteTx]):
    __slots__ = ("_batch", "_runner", "_tx", "_writer")

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._batch: _Batch | None = None
        self._runner: _WriteRunner | None = None
        self._tx: SqliteWriteTx | None = None

    async def __aenter__(self) -> WriteTx:
        if self._batch is not None:
            raise RuntimeError("a write() context cannot be entered twice")
        self._batch = await self._writer.begin()
        self._runner = _WriteRunner(self._writer, self._batch)
        self._tx = SqliteWriteTx(self._runner)
        return self._tx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._batch is not None and self._runner is not None and self._tx is not None
        self._runner.active = False
        await self._writer.end(
            self._batch, self._runner.turn, failed=exc is not None, changes=self._tx.changes
        )


class _WriteRunner:
    __slots__ = ("active", "batch", "turn", "writer")

    def __init__(self, writer: Writer, batch: _Batch) -> None:
        self.writer = writer
        self.batch = batch
        self.turn = _Turn()
        self.active = True

    async def run(self, op: Callable[[sqlite3.Connection], T], *, changes: bool) -> T:
        if not self.active:
            raise RuntimeError("this write transaction has ended")
        # Writes get a savepoint of their own so a failed call leaves no partial changes.
        return await self.writer._batch_thread(
            self.batch, self.turn, op, "op" if changes else None
        )
