"""``LocalChangeFeed`` on its own: routing, ordering, the backlog bound, closing."""

from __future__ import annotations

import asyncio

import pytest

from postkeep.store.api import Change, ChangeKind
from postkeep.store.feed import LocalChangeFeed


def _append(mailbox_id: int, uid: int, modseq: int) -> Change:
    return Change(mailbox_id, ChangeKind.APPEND, (uid,), modseq)


async def test_routes_by_mailbox_once_each_in_order() -> None:
    feed = LocalChangeFeed()
    both = feed.subscribe([1, 2, 2])
    one = feed.subscribe([1])
    everything = feed.subscribe()
    changes = [_append(1, 1, 2), _append(2, 1, 2), _append(3, 1, 2), _append(1, 2, 3)]
    feed.publish(changes)
    assert await both.wait(0) == [changes[0], changes[1], changes[3]]
    assert await one.wait(0) == [changes[0], changes[3]]
    assert await everything.wait(0) == changes
    assert await both.wait(0) == []


async def test_wait_wakes_on_publish() -> None:
    feed = LocalChangeFeed()
    sub = feed.subscribe([1])
    waiter = asyncio.create_task(sub.wait(5))
    await asyncio.sleep(0)
    feed.publish([_append(2, 1, 2)])  # not ours: keeps waiting
    await asyncio.sleep(0.01)
    assert not waiter.done()
    feed.publish([_append(1, 1, 2)])
    assert await waiter == [_append(1, 1, 2)]


async def test_collapse_keeps_one_mailbox_change_per_mailbox_with_the_latest_modseq() -> None:
    feed = LocalChangeFeed(backlog=10)
    sub = feed.subscribe()
    feed.publish([_append(7, 1, 2), _append(8, 1, 2)])
    feed.publish([Change(7, ChangeKind.FLAGS, tuple(range(1, 10)), 3)])  # weight 10: over
    feed.publish([_append(9, 1, 5), _append(7, 2, 4)])  # folded in until the next wait()
    assert await sub.wait(0) == [
        Change(7, ChangeKind.MAILBOX, (), 4),
        Change(8, ChangeKind.MAILBOX, (), 2),
        Change(9, ChangeKind.MAILBOX, (), 5),
    ]
    feed.publish([_append(7, 3, 6)])
    assert await sub.wait(0) == [_append(7, 3, 6)]


async def test_closing_ends_waits_and_unsubscribes() -> None:
    feed = LocalChangeFeed()
    sub = feed.subscribe([1])
    other = feed.subscribe()
    assert feed.subscribers == 2
    waiter = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)
    sub.close()
    assert await waiter == []
    assert feed.subscribers == 1
    feed.close()
    assert await other.wait() == []
    assert feed.subscribers == 0
    late = feed.subscribe([1])
    feed.publish([_append(1, 1, 2)])
    assert await late.wait() == []


def test_backlog_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LocalChangeFeed(backlog=0)
