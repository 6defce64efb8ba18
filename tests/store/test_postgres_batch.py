"""PostgreSQL group commit: write blocks that are ready at once share one transaction and
one COMMIT. A block that raises is undone alone; a COMMIT that fails fails every block of
the batch and publishes nothing; under concurrency there are fewer COMMITs than write
transactions (``store.stats``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from pg_server import PgServer, unavailable

from postkeep.store.api import StorageError, StorageErrorKind
from postkeep.store.postgres import PostgresStore

#: A domain whose row makes the COMMIT fail (a deferred constraint trigger).
POISON = "fails-at-commit.example"


@pytest.fixture
async def dsn(pg_server: PgServer | str) -> str:
    if isinstance(pg_server, str):
        unavailable(pg_server)
    assert isinstance(pg_server, PgServer)
    return pg_server.new_database()


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(dsn, min_connections=1, max_connections=4)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def _domains(store: PostgresStore) -> list[str]:
    async with store.read() as tx:
        return [d.name for d in await tx.list_domains()]


async def _concurrently(store: PostgresStore, names: list[str], fail: str = "") -> list[
    BaseException | None
]:
    """One write block per name, all started at once; the block for ``fail`` raises after
    its change. Returns each block's outcome."""
    go = asyncio.Event()

    async def block(name: str) -> None:
        await go.wait()
        async with store.write() as tx:
            await tx.add_domain(name)
            if name == fail:
                raise RuntimeError("this block gives up")

    tasks = [asyncio.create_task(block(n)) for n in names]
    await asyncio.sleep(0)
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


async def test_concurrent_blocks_share_commits(store: PostgresStore) -> None:
    names = [f"d{i:02}.example" for i in range(20)]
    before = (store.stats.write_transactions, store.stats.commits)
    assert await _concurrently(store, names) == [None] * 20
    transactions = store.stats.write_transactions - before[0]
    commits = store.stats.commits - before[1]
    assert transactions == 20
    assert 1 <= commits < transactions
    assert await _domains(store) == names


async def test_a_block_that_raises_in_a_batch_is_undone_alone(store: PostgresStore) -> None:
    names = [f"d{i:02}.example" for i in range(12)]
    before = (store.stats.write_transactions, store.stats.commits)
    # Blocks 0 (the batch's first: no SAVEPOINT of its own) and 5 (a later one) raise.
    for failing in (names[0], names[5]):
        outcomes = await _concurrently(store, [f"{failing}.{n}" for n in names],
                                       fail=f"{failing}.{failing}")
        raised = [i for i, o in enumerate(outcomes) if o is not None]
        assert raised == [names.index(failing)]
        assert isinstance(outcomes[raised[0]], RuntimeError)
    assert store.stats.commits - before[1] < store.stats.write_transactions - before[0]
    expected = sorted(f"{f}.{n}" for f in (names[0], names[5]) for n in names if n != f)
    assert await _domains(store) == expected


async def test_a_call_that_raises_in_a_later_block_keeps_the_block_and_the_batch(
    store: PostgresStore,
) -> None:
    go = asyncio.Event()

    async def block(i: int) -> None:
        await go.wait()
        async with store.write() as tx:
            await tx.add_domain(f"b{i}.example")
            with pytest.raises(StorageError) as e:
                await tx.add_domain(f"b{i}.example")  # the second change: its own SAVEPOINT
            assert e.value.kind is StorageErrorKind.EXISTS
            await tx.add_domain(f"c{i}.example")

    tasks = [asyncio.create_task(block(i)) for i in range(6)]
    await asyncio.sleep(0)
    go.set()
    await asyncio.gather(*tasks)
    assert await _domains(store) == sorted(
        [f"b{i}.example" for i in range(6)] + [f"c{i}.example" for i in range(6)]
    )


async def test_a_commit_failure_fails_every_block_of_the_batch(
    store: PostgresStore, dsn: str
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"""
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.name = '{POISON}' THEN RAISE EXCEPTION 'refused at commit'; END IF;
                RETURN NULL;
            END $$;
            CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON domains
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse();
        """)
    finally:
        await conn.close()
    async with store.write() as tx:
        await tx.add_domain("watched.example")
        account = await tx.add_account("a@watched.example", "h")
    sub = store.changes.subscribe()
    names = [f"d{i:02}.example" for i in range(10)]
    names[3] = POISON
    commits = store.stats.commits
    go = asyncio.Event()

    async def block(name: str) -> None:
        await go.wait()
        async with store.write() as tx:
            await tx.add_domain(name)
            await tx.create_mailbox(account.id, name)

    tasks = [asyncio.create_task(block(n)) for n in names]
    await asyncio.sleep(0)
    go.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    # The poisoned block shares its COMMIT with others: all of them fail with TEMP.
    failed = [n for n, o in zip(names, outcomes, strict=True) if o is not None]
    assert POISON in failed and len(failed) > 1
    for n, o in zip(names, outcomes, strict=True):
        if o is not None:
            assert isinstance(o, StorageError) and o.kind is StorageErrorKind.TEMP, (n, o)
    kept = await _domains(store)
    assert sorted(kept) == sorted(["watched.example"] + [
        n for n, o in zip(names, outcomes, strict=True) if o is None
    ])
    # Only the batches that committed were published: one CREATE per kept mailbox.
    published = {c.mailbox_id for c in await sub.wait(timeout=1.0)}
    async with store.read() as rtx:
        boxes = {m.id: m.name for m in await rtx.mailboxes(account.id)}
    assert published <= boxes.keys()  # nothing of a batch that did not commit
    assert {boxes[i] for i in published} == {n for n in kept if n in names}
    assert store.stats.commits - commits < len(names)
    sub.close()
    # The store goes on.
    async with store.write() as tx:
        await tx.add_domain("after.example")
    assert "after.example" in await _domains(store)


async def test_a_write_nested_in_a_block_runs_alone(store: PostgresStore) -> None:
    async with store.write() as outer:
        await outer.add_domain("outer.example")
        async with store.write() as inner:
            await inner.add_domain("inner.example")
    assert await _domains(store) == ["inner.example", "outer.example"]


async def test_batching_off_commits_every_block(dsn: str) -> None:
    store = PostgresStore(dsn, max_connections=4, batch_cap=1)
    await store.open()
    try:
        names = [f"d{i:02}.example" for i in range(8)]
        assert await _concurrently(store, names) == [None] * 8
        assert store.stats.commits == store.stats.write_transactions == 8
    finally:
        await store.close()
