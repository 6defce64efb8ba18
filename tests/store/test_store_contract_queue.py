"""The store contract for the durable outbound queue: per-recipient state, leases, retry,
dequeue. Backend-neutral: only ``store.api`` is used (the ``store`` fixture is
parametrized over every backend)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from store_backends import Reopen

from postkeep.store.api import (
    QueueEntry,
    RecipientState,
    StorageError,
    StorageErrorKind,
    Store,
)

PENDING, DELIVERED, FAILED = (
    RecipientState.PENDING, RecipientState.DELIVERED, RecipientState.FAILED)


def _now() -> datetime:
    return datetime.now(UTC)


async def _enqueue(store: Store, rcpts: list[str], sender: str = "Alice@Example.com",
                   data: bytes = b"Subject: x\r\n\r\nhi\r\n") -> int:
    async with store.write() as tx:
        blob = await tx.put_blob(data)
        return await tx.enqueue(sender, rcpts, blob)


async def _claim(store: Store, holder: str = "node-a/1", *, at: datetime | None = None,
                 limit: int = 10, lease: float = 60.0) -> list[QueueEntry]:
    async with store.write() as tx:
        return await tx.claim_due(at or _now(), limit, holder, lease)


async def _entry(store: Store, queue_id: int) -> QueueEntry | None:
    async with store.read() as tx:
        return next((e for e in await tx.queue_entries(1000) if e.id == queue_id), None)


async def test_enqueued_entry_has_pending_recipients_in_order(store: Store) -> None:
    before = _now()
    qid = await _enqueue(store, ["X@Remote.example", "y@other.example"])
    entry = await _entry(store, qid)
    assert entry is not None
    assert entry.sender == "Alice@Example.com"
    # RFC 5321 §2.4: remote local parts keep their case.
    assert [r.address for r in entry.recipients] == ["X@Remote.example", "y@other.example"]
    assert all(r.state is PENDING and r.attempts == 0 and r.last_error is None
               and r.last_attempt is None for r in entry.recipients)
    assert entry.pending == ("X@Remote.example", "y@other.example")
    assert entry.attempts == 0 and not entry.delay_notified
    assert entry.lease_holder is None and entry.lease_until is None
    assert before - timedelta(seconds=1) <= entry.created <= _now()
    assert entry.next_attempt <= _now()


async def test_claim_leases_due_entries_once(store: Store) -> None:
    q1 = await _enqueue(store, ["a@r.example"])
    q2 = await _enqueue(store, ["b@r.example"])
    got = await _claim(store, "node-a/1")
    assert [e.id for e in got] == [q1, q2]
    assert all(e.lease_holder == "node-a/1" for e in got)
    assert all(e.lease_until is not None and e.lease_until > _now() for e in got)
    # Leased: nobody else gets them, not even the same holder again.
    assert await _claim(store, "node-b/1") == []
    assert await _claim(store, "node-a/1") == []


async def test_claim_respects_limit_and_due_time(store: Store) -> None:
    ids = [await _enqueue(store, [f"r{i}@r.example"]) for i in range(3)]
    first = await _claim(store, limit=2)
    assert [e.id for e in first] == ids[:2]
    # Not yet due at a time before it was queued.
    assert await _claim(store, "other", at=_now() - timedelta(hours=1)) == []
    assert [e.id for e in await _claim(store, "other")] == ids[2:]


async def test_concurrent_claims_never_share_an_entry(store: Store) -> None:
    ids = {await _enqueue(store, [f"r{i}@r.example"]) for i in range(20)}
    results = await asyncio.gather(*(_claim(store, f"h{i}", limit=3) for i in range(10)))
    claimed = [e.id for batch in results for e in batch]
    assert len(claimed) == len(set(claimed)) == len(ids)
    assert set(claimed) == ids


async def test_expired_lease_is_taken_over(store: Store) -> None:
    qid = await _enqueue(store, ["a@r.example"])
    await _claim(store, "dead-node/1", lease=60)
    later = _now() + timedelta(seconds=120)
    (again,) = await _claim(store, "live-node/1", at=later)
    assert again.id == qid and again.lease_holder == "live-node/1"
    # The dead holder's late report changes nothing.
    async with store.write() as tx:
        ok = await tx.record_attempt(qid, "dead-node/1", {"a@r.example": (DELIVERED, None)},
                                     next_attempt=_now())
    assert ok is False
    got = await _entry(store, qid)
    assert got is not None and got.recipients[0].state is PENDING


async def test_record_attempt_per_recipient(store: Store) -> None:
    qid = await _enqueue(store, ["a@one.example", "b@two.example", "c@two.example"])
    await _claim(store, "h")
    async with store.write() as tx:
        # A partial result keeps the lease (more groups of this round follow).
        assert await tx.record_attempt(qid, "h", {"a@one.example": (DELIVERED, None)})
    got = await _entry(store, qid)
    assert got is not None and got.lease_holder == "h"
    later = _now() + timedelta(minutes=5)
    async with store.write() as tx:
        assert await tx.record_attempt(
            qid, "h",
            {"b@two.example": (PENDING, "mx.two.example: 451 4.3.0 try later"),
             "c@two.example": (FAILED, "mx.two.example: 550 5.1.1 no such user")},
            next_attempt=later,
        )
    got = await _entry(store, qid)
    assert got is not None
    states = {r.address: (r.state, r.attempts, r.last_error) for r in got.recipients}
    assert states == {
        "a@one.example": (DELIVERED, 1, None),
        "b@two.example": (PENDING, 1, "mx.two.example: 451 4.3.0 try later"),
        "c@two.example": (FAILED, 1, "mx.two.example: 550 5.1.1 no such user"),
    }
    assert all(r.last_attempt is not None for r in got.recipients)
    assert got.pending == ("b@two.example",)
    # The round is over: lease released, due at next_attempt, one more round counted.
    assert got.lease_holder is None
    assert got.next_attempt == later
    assert got.attempts == 1
    assert await _claim(store, "h") == []
    assert [e.id for e in await _claim(store, "h", at=later)] == [qid]


async def test_final_states_do_not_change(store: Store) -> None:
    qid = await _enqueue(store, ["a@r.example", "b@r.example"])
    await _claim(store, "h")
    async with store.write() as tx:
        await tx.record_attempt(qid, "h", {"a@r.example": (DELIVERED, None)})
        await tx.record_attempt(qid, "h", {"a@r.example": (PENDING, "again?")})
    got = await _entry(store, qid)
    assert got is not None
    assert (got.recipients[0].state, got.recipients[0].attempts) == (DELIVERED, 1)


async def test_record_attempt_sets_delay_notified(store: Store) -> None:
    qid = await _enqueue(store, ["a@r.example"])
    await _claim(store, "h")
    async with store.write() as tx:
        assert await tx.record_attempt(qid, "h", {}, next_attempt=_now(), delay_notified=True)
    got = await _entry(store, qid)
    assert got is not None and got.delay_notified


async def test_record_attempt_for_missing_entry_is_false(store: Store) -> None:
    async with store.write() as tx:
        assert await tx.record_attempt(424242, "h", {}, next_attempt=_now()) is False


async def test_entries_without_pending_recipients_are_not_claimed(store: Store) -> None:
    qid = await _enqueue(store, ["a@r.example"])
    await _claim(store, "h")
    async with store.write() as tx:
        await tx.record_attempt(qid, "h", {"a@r.example": (DELIVERED, None)},
                                next_attempt=_now())
    assert await _claim(store, "h", at=_now() + timedelta(days=1)) == []


async def test_release_leases_by_prefix(store: Store) -> None:
    q1 = await _enqueue(store, ["a@r.example"])
    q2 = await _enqueue(store, ["b@r.example"])
    await _claim(store, "mail.example.com/node1/aaaa", limit=1)
    await _claim(store, "mail.example.com/node10/bbbb", limit=1)
    async with store.write() as tx:
        assert await tx.release_leases("mail.example.com/node1/") == 1
    # node1's entry is free again; node10's is not (a prefix is not a substring match).
    assert [e.id for e in await _claim(store, "x")] == [q1]
    got = await _entry(store, q2)
    assert got is not None and got.lease_holder == "mail.example.com/node10/bbbb"


async def test_release_leases_takes_like_wildcards_literally(store: Store) -> None:
    await _enqueue(store, ["a@r.example"])
    await _claim(store, "node_1/x")
    async with store.write() as tx:
        assert await tx.release_leases("node%") == 0
        assert await tx.release_leases("node_1/") == 1


async def test_retry_makes_entries_due_now(store: Store) -> None:
    q1 = await _enqueue(store, ["a@r.example"])
    q2 = await _enqueue(store, ["b@r.example"])
    later = _now() + timedelta(hours=1)
    for qid in (q1, q2):
        await _claim(store, "h")
        async with store.write() as tx:
            await tx.record_attempt(qid, "h", {}, next_attempt=later)
    assert await _claim(store, "h") == []
    async with store.write() as tx:
        assert await tx.retry(q1) == 1
        assert await tx.retry(999999) == 0
    assert [e.id for e in await _claim(store, "h")] == [q1]
    async with store.write() as tx:
        assert await tx.retry() == 1  # q1 is due already; q2 is the one changed
    assert [e.id for e in await _claim(store, "h2")] == [q2]


async def test_dequeue_frees_the_blob_when_unreferenced(store: Store) -> None:
    qid = await _enqueue(store, ["a@r.example"])
    entry = await _entry(store, qid)
    assert entry is not None
    async with store.write() as tx:
        assert await tx.dequeue(qid) is True
        assert await tx.dequeue(qid) is False
    assert await _entry(store, qid) is None
    async with store.read() as tx:
        with pytest.raises(StorageError) as info:
            await tx.read_blob(entry.blob)
    assert info.value.kind is StorageErrorKind.NOT_FOUND


async def test_dequeue_keeps_a_blob_still_in_a_mailbox(store: Store) -> None:
    async with store.write() as tx:
        await tx.add_domain("example.com")
        account = await tx.add_account("bob@example.com", "h")
        inbox = await tx.mailbox(account.id, "INBOX")
        assert inbox is not None
        blob = await tx.put_blob(b"shared bytes")
        await tx.append(inbox.id, blob)
        qid = await tx.enqueue("bob@example.com", ["x@r.example"], blob)
    async with store.write() as tx:
        assert await tx.dequeue(qid)
    async with store.read() as tx:
        assert await tx.read_blob(blob) == b"shared bytes"


async def test_queue_entries_lists_soonest_first_with_limit(store: Store) -> None:
    q1 = await _enqueue(store, ["a@r.example"])
    q2 = await _enqueue(store, ["b@r.example"])
    await _claim(store, "h", limit=1)
    async with store.write() as tx:
        await tx.record_attempt(q1, "h", {}, next_attempt=_now() + timedelta(hours=1))
    async with store.read() as tx:
        assert [e.id for e in await tx.queue_entries()] == [q2, q1]
        assert [e.id for e in await tx.queue_entries(limit=1)] == [q2]


async def test_queue_state_survives_reopen(store: Store, reopen: Reopen) -> None:
    qid = await _enqueue(store, ["a@r.example", "b@r.example"])
    await _claim(store, "h")
    async with store.write() as tx:
        await tx.record_attempt(qid, "h", {"a@r.example": (DELIVERED, None),
                                           "b@r.example": (PENDING, "451 later")},
                                next_attempt=_now(), delay_notified=True)
    store = await reopen(store)
    got = await _entry(store, qid)
    assert got is not None
    assert [(r.state, r.last_error) for r in got.recipients] == [
        (DELIVERED, None), (PENDING, "451 later")]
    assert got.delay_notified and got.attempts == 1


async def test_outbound_rows_still_reflect_the_queue(store: Store) -> None:
    qid = await _enqueue(store, ["a@r.example"])
    await _claim(store, "h")
    async with store.write() as tx:
        await tx.record_attempt(qid, "h", {"a@r.example": (PENDING, "451 later")},
                                next_attempt=_now())
    async with store.read() as tx:
        (row,) = await tx.outbound()
    assert (row.id, row.attempts, row.last_error) == (qid, 1, "451 later")
