"""PostgreSQL: a changing call that raises leaves its write transaction as it was, whether
it was the first change of the transaction (no SAVEPOINT: the empty transaction is begun
again) or a later one (its own SAVEPOINT), and whether the error came from a check or from
the server (an error that aborts the PostgreSQL transaction). Pooled connections are
returned without a reset query, so nothing a transaction did may reach the next one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pg_server import PgServer, unavailable

from postkeep.store.api import BlobRef, StorageError, StorageErrorKind, WriteTx
from postkeep.store.postgres import PostgresStore
from postkeep.store.postgres.store import PgWriteTx


@pytest.fixture
async def store(pg_server: PgServer | str) -> AsyncIterator[PostgresStore]:
    if isinstance(pg_server, str):
        unavailable(pg_server)
    assert isinstance(pg_server, PgServer)
    s = PostgresStore(pg_server.new_database(), min_connections=1, max_connections=1)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def _server_error(tx: WriteTx) -> None:
    """A changing call that fails in the server: the PostgreSQL transaction is aborted."""
    assert isinstance(tx, PgWriteTx)

    async def op(conn: Any) -> None:
        await conn.execute("INSERT INTO domains (name, created) VALUES ('made.example', 0)")
        await conn.execute("SELECT 1 / 0")

    await tx._plain(op)


async def _domains(store: PostgresStore) -> list[str]:
    async with store.read() as tx:
        return [d.name for d in await tx.list_domains()]


async def test_a_first_call_failing_in_the_server_leaves_the_transaction_usable(
    store: PostgresStore,
) -> None:
    async with store.write() as tx:
        with pytest.raises(StorageError) as e:
            await _server_error(tx)
        assert e.value.kind is StorageErrorKind.TEMP
        with pytest.raises(StorageError):  # twice in a row: still nothing to protect
            await _server_error(tx)
        await tx.add_domain("kept.example")
    assert await _domains(store) == ["kept.example"]


async def test_a_later_call_failing_in_the_server_keeps_the_earlier_changes(
    store: PostgresStore,
) -> None:
    async with store.write() as tx:
        await tx.add_domain("a.example")
        with pytest.raises(StorageError):
            await _server_error(tx)
        with pytest.raises(StorageError):
            await _server_error(tx)
        await tx.add_domain("b.example")
        with pytest.raises(StorageError):
            await _server_error(tx)
    assert await _domains(store) == ["a.example", "b.example"]


async def test_a_refused_first_call_is_undone_and_the_next_one_commits(
    store: PostgresStore,
) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
        account = await tx.add_account("bob@example.com", "h")
        inbox = await tx.mailbox(account.id, "INBOX")
        blob = await tx.put_blob(b"12345")
    assert inbox is not None
    async with store.write() as tx:
        # First change of this transaction: the mailbox row is updated before the blob
        # reference is refused, and that update must not survive.
        with pytest.raises(ValueError):
            await tx.append(inbox.id, BlobRef(blob.id, 4))
        with pytest.raises(StorageError) as e:
            await tx.append(inbox.id, BlobRef(blob.id + 1000, 5))
        assert e.value.kind is StorageErrorKind.NOT_FOUND
        assert await tx.append(inbox.id, blob) == 1
        # Later changes: each in its own savepoint.
        with pytest.raises(ValueError):
            await tx.append(inbox.id, BlobRef(blob.id, 6))
        with pytest.raises(StorageError) as e:
            await tx.append(inbox.id + 1000, BlobRef(blob.id + 1000, 5))
        assert e.value.kind is StorageErrorKind.NOT_FOUND
        assert "mailbox" in str(e.value)  # the mailbox is checked before the blob
        assert await tx.append(inbox.id, blob) == 2
    async with store.read() as rtx:
        assert await rtx.uids(inbox.id) == [1, 2]
        after = await rtx.mailbox_by_id(inbox.id)
    assert after is not None and after.uidnext == 3


async def test_a_transaction_that_raises_leaves_nothing_for_the_next_one(
    store: PostgresStore,
) -> None:
    # One pooled connection: the next transaction gets the same one.
    with pytest.raises(RuntimeError):
        async with store.write() as tx:
            await tx.add_domain("gone.example")
            with pytest.raises(StorageError):
                await _server_error(tx)
            raise RuntimeError("the caller gives up")
    async with store.write() as tx:
        await tx.add_domain("next.example")
    assert await _domains(store) == ["next.example"]


async def test_a_cancelled_first_call_leaves_the_transaction_usable(
    store: PostgresStore,
) -> None:
    async with store.write() as tx:
        assert isinstance(tx, PgWriteTx)

        async def slow(conn: Any) -> None:
            await conn.execute("INSERT INTO domains (name, created) VALUES ('slow.example', 0)")
            await conn.execute("SELECT pg_sleep(5)")

        call = asyncio.ensure_future(tx._plain(slow))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await tx.add_domain("after.example")
    assert await _domains(store) == ["after.example"]
