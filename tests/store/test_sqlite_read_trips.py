"""What a SQLite read transaction costs in trips to its reader thread, and what it keeps.

Entering ``store.read()`` makes no trip (BEGIN rides with the first operation), each
operation makes one, and the end is queued on the reader's thread without being awaited.
None of that may weaken the snapshot, the bound on reader connections, or cleanup after a
cancelled caller.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from postkeep.store.sqlite import SqliteStore


@pytest.fixture
async def sq(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "postkeep.sqlite", readers=1)
    await s.open()
    try:
        async with s.write() as tx:
            await tx.add_domain("example.com")
            await tx.add_account("bob@example.com", "h")
        yield s
    finally:
        await s.close()


def _count_submissions(store: SqliteStore) -> list[str]:
    """Record every job handed to a reader thread: "awaited" or "posted" (not awaited)."""
    seen: list[str] = []
    for reader in store._readers:
        _watch(reader.executor, seen)
    return seen


def _watch(executor: ThreadPoolExecutor, seen: list[str]) -> None:
    submit = executor.submit

    def counting(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future = submit(fn, *args, **kwargs)
        mine = len(seen)
        seen.append("posted")
        # run_in_executor chains an asyncio future to this one: that is a trip back.
        real = future.add_done_callback

        def chained(cb: Callable[[Future[Any]], object]) -> None:
            seen[mine] = "awaited"
            real(cb)

        future.add_done_callback = chained  # type: ignore[method-assign, assignment]
        return future

    executor.submit = counting  # type: ignore[method-assign]


async def test_one_trip_per_operation_and_none_to_enter_or_end(sq: SqliteStore) -> None:
    seen = _count_submissions(sq)
    async with sq.read() as tx:
        assert seen == []  # entering: no trip, BEGIN waits for the first operation
        account = await tx.get_account("bob@example.com")
        assert account is not None
        assert await tx.mailbox(account.id, "INBOX") is not None
        assert seen == ["awaited", "awaited"]
    # The end (COMMIT of the read) is queued on the reader thread, not waited for.
    assert seen == ["awaited", "awaited", "posted"]


async def test_ending_does_not_wait_for_a_busy_reader_thread(sq: SqliteStore) -> None:
    (reader,) = sq._readers
    release = threading.Event()

    async def use() -> None:
        async with sq.read() as tx:
            assert await tx.domain_exists("example.com")
            reader.executor.submit(release.wait)  # the thread is busy from here on

    try:
        # Awaiting the end would wait for the busy thread and time out.
        await asyncio.wait_for(use(), 5)
        assert not release.is_set()
    finally:
        release.set()
    # The end ran on the thread before the next transaction's BEGIN (FIFO).
    async with sq.read() as tx:
        assert await tx.domain_exists("example.com")


async def test_snapshot_starts_at_the_first_operation_and_holds_to_the_end(
    sq: SqliteStore,
) -> None:
    async with sq.read() as tx:
        async with sq.write() as wtx:
            await wtx.add_account("early@example.com", "h")
        # Committed before the first operation: inside the snapshot.
        assert await tx.get_account("early@example.com") is not None
        async with sq.write() as wtx:
            await wtx.add_account("late@example.com", "h")
        # Committed between two reads of one transaction: not seen.
        assert await tx.get_account("late@example.com") is None
        assert [a.address for a in await tx.list_accounts("example.com")] == [
            "bob@example.com",
            "early@example.com",
        ]
    async with sq.read() as tx:
        assert await tx.get_account("late@example.com") is not None


async def test_a_cancelled_reader_leaks_neither_connection_nor_transaction(
    sq: SqliteStore,
) -> None:
    (reader,) = sq._readers
    release = threading.Event()
    started = asyncio.Event()

    async def reading() -> None:
        async with sq.read() as tx:
            started.set()
            await tx.get_account("bob@example.com")  # queued behind the busy thread

    try:
        reader.executor.submit(release.wait)
        task = asyncio.create_task(reading())
        await started.wait()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()

    def state(conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    # The one reader is back in the pool, and its transaction ended.
    assert await asyncio.wait_for(reader.call(state), 5) is False
    async with sq.read() as tx:
        assert await tx.get_account("bob@example.com") is not None
    assert await reader.call(state) is False
