"""Group commit for the PostgreSQL store: write blocks of one node share a COMMIT.

A *batch* is one PostgreSQL transaction on one pooled connection, shared by write blocks
(``async with store.write()``) that are ready at the same moment. An ``asyncio.Lock``
(FIFO-fair) admits one block at a time: the *turn*. A block's calls run on the batch's
connection one after another; a block that raises is undone alone::

    block 1: BEGIN; …calls…                      (the transaction is empty: no SAVEPOINT)
    block 2: RELEASE pk_tx?; SAVEPOINT pk_tx; …calls…; ROLLBACK TO pk_tx (it raised)
    block 3: SAVEPOINT pk_tx; …calls…            → nobody waiting: NOTIFY; COMMIT
             batch.done resolves → blocks 1 and 3 return from ``async with``; block 2
             had re-raised its own exception already.

A block's first changing call takes its SAVEPOINT ``pk_tx`` (none when the transaction
holds no work yet: if that call raises, the transaction is rolled back and begun again);
its later calls each take ``pk_call``, so a call that raises leaves the block as it was.
A block's SAVEPOINT is released with the next block's first changing call (one round trip)
or by the COMMIT.

At the end of its turn a block hands the lock to the next waiter if there is one, the batch
has fewer than ``batch_cap`` members and has been open less than ``batch_window`` seconds;
it then awaits ``batch.done``. Otherwise the batch is closed: the lock is released at once
(the next batch begins on another connection while this one commits) and the batch sends
one NOTIFY with every member's changes, then COMMIT, and resolves ``batch.done`` for all.

Nothing waits for company: a lone block commits at once; batches grow only while blocks
queue behind a running one or a COMMIT. The cap and the window bound how long the first
member waits and how long a batch holds its row locks (mailbox rows for UIDs, queue claims,
maildrop locks), which other nodes may be waiting for. The cap also keeps a batch's
subtransactions (two at most per block) under PostgreSQL's 64 cached per backend.

Invariants:
- A block returns from ``async with`` without error only after the COMMIT holding its
  changes returned (``synchronous_commit = on``); a COMMIT that failed or whose outcome is
  unknown raises ``StorageError(TEMP)`` in every member that had not raised itself.
- Only the turn holder issues statements for the open batch; each admitted block is ended
  by exactly one ``_end``, which runs in a task the caller's cancellation cannot stop.
- If the batch's transaction cannot go on (a SAVEPOINT could not be undone, the connection
  dropped), the batch is *lost*: no statement runs in it any more, it is rolled back and
  every member gets TEMP.
- The NOTIFY carries the changes of members that committed only; local subscribers hear
  them after the COMMIT returned, before any member returns.
- Callers' side, as for SQLite's writer: a write block awaits only the store, never a
  socket or another task's write block. A ``write()`` nested in a block of the same task
  (or a task it started) does not join the batch: it runs alone on its own connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias, TypeVar

from postkeep.store.api import Change, StorageError, StorageErrorKind, StoreStats
from postkeep.store.tasks import Tasks

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn: TypeAlias = Any

#: Most blocks one COMMIT carries, and the longest a batch stays open (seconds) before it
#: commits even with blocks still waiting: they bound the first member's wait and how long
#: row locks are held for other nodes.
DEFAULT_BATCH_CAP = 16
DEFAULT_BATCH_WINDOW = 0.02

_BLOCK = "pk_tx"  # a block's SAVEPOINT
_CALL = "pk_call"  # a changing call's SAVEPOINT (after the block's first)

#: The batcher whose turn the current task (or the task that started it) holds.
_holding: contextvars.ContextVar[Batcher | None] = contextvars.ContextVar(
    "postkeep_pg_batch_turn", default=None
)


class Batch:
    """One PostgreSQL transaction shared by consecutive blocks, and its COMMIT's outcome."""

    __slots__ = ("alone", "changes", "clean", "conn", "done", "lost", "members", "opened",
                 "release", "tr")

    def __init__(self, conn: Conn, tr: Any, done: asyncio.Future[None], opened: float,
                 alone: bool = False) -> None:
        self.conn = conn
        self.tr = tr  # the started top-level asyncpg transaction (ops nest theirs in it)
        self.alone = alone  # one block outside the turns: nobody joins, no lock to hand on
        self.done = done  # result: committed; exception: nobody may acknowledge
        self.opened = opened  # loop.time() at BEGIN
        self.members = 0
        self.clean = True  # the transaction holds no work (of any block)
        self.lost: StorageError | None = None  # set once the transaction cannot go on
        self.release = ""  # the SAVEPOINT a finished block left open ("" for none)
        self.changes: list[Change] = []  # of the blocks that ended well, in turn order


class Block:
    """One write block's part of a batch: its SAVEPOINTs and the calls that ran in them."""

    __slots__ = ("bare", "batch", "in_call", "started")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.started = False  # a changing call returned: the block holds work
        self.bare = False  # it began in an empty transaction: no SAVEPOINT of its own
        self.in_call = False  # SAVEPOINT pk_call is open

    def _check(self) -> None:
        lost = self.batch.lost
        if lost is not None:
            raise StorageError(StorageErrorKind.TEMP, f"the write transaction failed: "
                                                      f"{lost.detail}")

    async def _undo(self, sql: str) -> None:
        try:
            await self.batch.conn.execute(sql)
        except BaseException as e:
            self.batch.lost = StorageError(StorageErrorKind.TEMP, f"undoing a call: {e!r}")
            raise

    async def _restart(self) -> None:
        """Roll the batch's (otherwise empty) transaction back and begin it again."""
        batch = self.batch
        try:
            await batch.tr.rollback()
            tr = batch.conn.transaction()
            await tr.start()
        except BaseException as e:
            batch.lost = StorageError(StorageErrorKind.TEMP, f"beginning again: {e!r}")
            raise
        batch.tr = tr
        batch.clean = True
        batch.release = ""

    async def call(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        """Run a changing call so that, if it raises, the block is as it was.

        Raises the call's own exception (asyncpg's, for the caller to convert).
        """
        self._check()
        batch, conn = self.batch, self.batch.conn
        if self.started:
            take = f"SAVEPOINT {_CALL}"
            if self.in_call:
                take = f"RELEASE SAVEPOINT {_CALL}; {take}"
            self.in_call = False
            await conn.execute(take)
            self.in_call = True
            try:
                return await op(conn)
            except BaseException:
                self.in_call = False
                await self._undo(f"ROLLBACK TO SAVEPOINT {_CALL}; RELEASE SAVEPOINT {_CALL}")
                raise
        if batch.clean:
            # Nothing to protect: no SAVEPOINT. If the call raises, the transaction (maybe
            # aborted now) is rolled back and begun again: as empty as before.
            try:
                result = await op(conn)
            except BaseException:
                await self._restart()
                raise
            batch.clean = False
            self.started = self.bare = True
            return result
        take = f"{batch.release}SAVEPOINT {_BLOCK}"
        batch.release = ""
        await conn.execute(take)
        try:
            result = await op(conn)
        except BaseException:
            await self._undo(f"ROLLBACK TO SAVEPOINT {_BLOCK}; RELEASE SAVEPOINT {_BLOCK}")
            raise
        self.started = True
        return result

    async def finish(self, failed: bool) -> None:
        """Keep the block's work (its SAVEPOINT is released later) or undo it. Never raises;
        a failed undo loses the batch."""
        if not self.started or self.batch.lost is not None:
            return
        batch = self.batch
        if not failed:
            if self.bare:
                batch.release = f"RELEASE SAVEPOINT {_CALL}; " if self.in_call else ""
            else:
                batch.release = f"RELEASE SAVEPOINT {_BLOCK}; "
            return
        try:
            if self.bare:
                await self._restart()
            else:
                await batch.conn.execute(
                    f"ROLLBACK TO SAVEPOINT {_BLOCK}; RELEASE SAVEPOINT {_BLOCK}"
                )
        except Exception as e:
            batch.lost = StorageError(StorageErrorKind.TEMP, f"undoing a block: {e!r}")


class Batcher:
    """Admits write blocks into batches and commits them (see the module docstring)."""

    def __init__(
        self,
        *,
        acquire: Callable[[], Awaitable[Conn]],
        release: Callable[[Conn], Awaitable[None]],
        commit: Callable[[Batch], Awaitable[None]],
        stats: StoreStats,
        batch_cap: int = DEFAULT_BATCH_CAP,
        batch_window: float = DEFAULT_BATCH_WINDOW,
    ) -> None:
        if batch_cap < 1:
            raise ValueError("batch_cap must be at least 1")
        self._acquire = acquire
        self._release = release
        self._commit = commit  # NOTIFY + COMMIT; raises StorageError if not committed
        self._stats = stats
        self._cap = batch_cap
        self._window = batch_window
        self._lock = asyncio.Lock()
        self._waiting = 0  # blocks in _lock.acquire(): the "someone is waiting" test
        self._batch: Batch | None = None
        self._closing = False
        self._tasks = Tasks(log, "store.postgres.batch_task_failed")

    def nested(self) -> bool:
        """Whether the current task runs inside a block's turn of this batcher."""
        return _holding.get() is self


    async def close(self) -> None:
        """Refuse new blocks; wait for admitted ones and their COMMIT."""
        self._closing = True
        async with self._lock:
            batch, self._batch = self._batch, None
            if batch is not None:  # orphaned by a cancelled waiter, see _rescue
                await self._finish(batch)
        await self._tasks.wait()

    # -- turns

    async def begin(self, *, alone: bool = False
                    ) -> tuple[Batch, contextvars.Token[Batcher | None]]:
        """Wait for the turn; return the open batch the block runs in (``alone``: a batch
        of its own, without the turn)."""
        if self._closing:
            raise StorageError(StorageErrorKind.TEMP, "the store is closed or closing")
        if alone:
            batch = await self._start_shielded(alone=True)
            batch.members += 1
            self._stats.write_transactions += 1
            return batch, _holding.set(_holding.get())
        self._waiting += 1
        try:
            await self._lock.acquire()
        except asyncio.CancelledError:
            self._waiting -= 1
            self._rescue()
            raise
        self._waiting -= 1
        joined = self._batch
        if joined is not None:
            batch = joined
        else:
            # Holding the lock: exactly one _end must follow, so the steps run in a task
            # the caller's cancellation cannot stop.
            batch = await self._start_shielded()
        batch.members += 1
        self._stats.write_transactions += 1
        return batch, _holding.set(self)

    async def _start_shielded(self, alone: bool = False) -> Batch:
        """``_start`` in a task the caller's cancellation cannot stop; if the caller is
        cancelled, the batch it was starting is abandoned once it has started."""
        start = self._tasks.spawn(self._start(alone=alone))
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            start.add_done_callback(self._abandon)
            raise

    async def _start(self, alone: bool = False) -> Batch:
        try:
            conn = await self._acquire()
        except BaseException:
            if not alone:
                self._lock.release()
            raise
        tr = conn.transaction()  # READ COMMITTED; row locks where values are allocated
        try:
            await tr.start()
        except BaseException as e:
            await self._release(conn)
            if not alone:
                self._lock.release()
            if isinstance(e, Exception):
                raise StorageError(
                    StorageErrorKind.TEMP, f"starting a write transaction: {e!r}"
                ) from e
            raise
        loop = asyncio.get_running_loop()
        batch = Batch(conn, tr, loop.create_future(), loop.time(), alone)
        if not alone:
            self._batch = batch
        return batch

    def _abandon(self, start: asyncio.Task[Batch]) -> None:
        """The caller of begin() was cancelled after the batch began: end its turn."""
        if start.cancelled() or start.exception() is not None:
            return  # _start() released the lock
        batch = start.result()
        batch.members += 1
        self._tasks.spawn(self._end(Block(batch), failed=True))

    async def end(self, block: Block, token: contextvars.Token[Batcher | None], *,
                  failed: bool, wait_for: asyncio.Lock, changes: Sequence[Change]) -> None:
        """End a block's turn; unless ``failed``, return once its batch committed."""
        _holding.reset(token)
        ending = self._tasks.spawn(self._end(block, failed=failed, wait_for=wait_for,
                                       changes=changes))
        await asyncio.shield(ending)
        if not failed:
            await asyncio.shield(block.batch.done)  # raises the StorageError if not committed

    async def _end(self, block: Block, *, failed: bool, wait_for: asyncio.Lock | None = None,
                   changes: Sequence[Change] = ()) -> None:
        """Finish the block, then hand the lock on or close the batch. Never raises."""
        batch = block.batch
        try:
            if wait_for is not None:
                async with wait_for:  # a call still running (its caller did not await it)
                    pass
            await block.finish(failed)
            if not failed and batch.lost is None:
                batch.changes.extend(changes)
        finally:
            if batch.alone:
                await self._finish(batch)
            elif (
                batch.lost is None
                and self._waiting > 0
                and batch.members < self._cap
                and asyncio.get_running_loop().time() - batch.opened < self._window
            ):
                self._lock.release()  # hand on: the next block joins this batch
            else:
                self._batch = None
                self._lock.release()  # the next batch may begin while this one commits
                await self._finish(batch)

    async def _finish(self, batch: Batch) -> None:
        """COMMIT (or roll back a lost batch) and tell every member. Never raises."""
        started = time.perf_counter()
        error = batch.lost
        try:
            if error is None:
                try:
                    await self._commit(batch)
                except StorageError as e:
                    error = e
                except BaseException as e:
                    error = StorageError(StorageErrorKind.TEMP, f"COMMIT interrupted: {e!r}")
                    raise
            else:
                try:
                    await batch.tr.rollback()
                except Exception:
                    log.warning("store.postgres.rollback_failed")
        finally:
            try:
                await self._release(batch.conn)
            finally:
                if error is None:
                    self._stats.commits += 1
                    self._stats.commit_seconds += time.perf_counter() - started
                    batch.done.set_result(None)
                else:
                    log.error("store.postgres.batch_failed",
                              extra={"members": batch.members, "error": error.detail})
                    batch.done.set_exception(StorageError(
                        StorageErrorKind.TEMP, f"the write transaction failed: {error.detail}"
                    ))
                    batch.done.exception()  # retrieved: the members may all be gone

    def _rescue(self) -> None:
        """A waiter was cancelled: if it was the one a finished block handed the lock to
        and nobody else is coming, commit the open batch rather than leave it hanging."""
        if self._batch is not None and self._waiting == 0 and not self._lock.locked():
            self._tasks.spawn(self._adopt())

    async def _adopt(self) -> None:
        await self._lock.acquire()
        batch, self._batch = self._batch, None
        self._lock.release()
        if batch is not None:
            await self._finish(batch)
