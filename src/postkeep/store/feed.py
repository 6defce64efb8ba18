"""``LocalChangeFeed``: the in-process ``ChangeFeed`` (``store.changes``) of a store.

Both backends use it. Write transactions do not talk to subscribers. Each one collects
the ``Change``s of its operations, and the store hands them to ``publish()`` only after
their COMMIT returned: SQLite's writer for a whole group-commit batch, PostgreSQL for each
transaction, plus what other nodes did, heard by LISTEN/NOTIFY (``postgres/notify.py``;
PostgreSQL delivers a NOTIFY only when its transaction commits). A rolled-back
transaction, a failed operation and a COMMIT that failed therefore publish nothing, and a
subscriber never hears about a change it could not yet read.

Nothing here knows about either database.

Backlog bound: a subscriber that does not call ``wait()`` for a long time (a stuck IDLE
session) must not make the process run out of memory. Pending changes are weighed as
``1 + len(uids)``; once a subscriber's backlog weighs more than ``backlog``, it is
*collapsed*: replaced by one ``ChangeKind.MAILBOX`` change per mailbox (with the latest
modseq seen and no UIDs), and until the next ``wait()`` further changes only update those
entries. A MAILBOX change already means "re-read this mailbox" (created, renamed,
deleted), so the subscriber resynchronises (``mailbox_by_id``, ``uids``,
``messages_since``) instead of getting every change; nothing it needs is lost. After a
collapse a backlog holds at most one entry per mailbox.

Invariants:
- ``publish()`` and ``Subscription.wait()`` run on the event loop thread (the stores call
  ``publish()`` there, after the COMMIT); nothing here is thread-safe, nothing blocks.
- A subscription gets every published change of its mailboxes, in publication order, at
  most once, from ``subscribe()`` until ``close()`` — or, after a collapse, MAILBOX
  changes standing for the ones it missed.
- ``publish()`` never raises because of a subscriber.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from postkeep.store.api import Change, ChangeKind, MailboxId

#: Weight of pending changes (1 + UIDs per change) at which a subscriber's backlog is
#: collapsed into one MAILBOX change per mailbox.
DEFAULT_BACKLOG = 10_000


class LocalSubscription:
    """Implements ``postkeep.store.api.Subscription``."""

    __slots__ = ("_collapsed", "_event", "_feed", "_pending", "_weight", "closed", "mailboxes")

    def __init__(self, feed: LocalChangeFeed, mailboxes: frozenset[MailboxId] | None) -> None:
        self._feed = feed
        self.mailboxes = mailboxes  # None: every mailbox
        self._pending: list[Change] = []
        self._weight = 0
        # After a collapse: mailbox id -> index of its MAILBOX entry in _pending.
        self._collapsed: dict[MailboxId, int] | None = None
        self._event = asyncio.Event()
        self.closed = False

    async def wait(self, timeout: float | None = None) -> list[Change]:
        """Every change not yet returned (at least one); [] after ``timeout`` seconds or
        once the subscription or its store is closed."""
        if not self._pending and not self.closed:
            if timeout is not None and timeout <= 0:
                return []
            self._event.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._event.wait()
            except TimeoutError:
                return []
        return self._take()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._feed._remove(self)
            self._pending = []
            self._collapsed = None
            self._event.set()  # a waiter returns []

    def _take(self) -> list[Change]:
        out, self._pending = self._pending, []
        self._weight = 0
        self._collapsed = None
        self._event.clear()
        return out

    def _push(self, change: Change, backlog: int) -> None:
        if self._collapsed is not None:
            self._fold(change)
        else:
            self._pending.append(change)
            self._weight += 1 + len(change.uids)
            if self._weight > backlog:
                self._collapse()
        self._event.set()

    def _collapse(self) -> None:
        old = self._pending
        self._pending = []
        self._weight = 0
        self._collapsed = {}
        for change in old:
            self._fold(change)

    def _fold(self, change: Change) -> None:
        assert self._collapsed is not None
        at = self._collapsed.get(change.mailbox_id)
        if at is None:
            self._collapsed[change.mailbox_id] = len(self._pending)
            self._pending.append(Change(change.mailbox_id, ChangeKind.MAILBOX, (), change.modseq))
            self._weight += 1
        else:
            seen = self._pending[at].modseq
            self._pending[at] = Change(
                change.mailbox_id, ChangeKind.MAILBOX, (), max(seen, change.modseq)
            )


class LocalChangeFeed:
    """Implements ``postkeep.store.api.ChangeFeed`` for the subscribers of this process."""

    def __init__(self, backlog: int = DEFAULT_BACKLOG) -> None:
        if backlog < 1:
            raise ValueError("backlog must be at least 1")
        self.backlog = backlog
        self._everything: set[LocalSubscription] = set()
        # Indexed by mailbox, so publishing costs per interested subscriber, not per
        # subscriber: thousands of IDLE sessions each watch their own mailbox.
        self._by_mailbox: dict[MailboxId, set[LocalSubscription]] = {}
        self._closed = False

    def subscribe(self, mailbox_ids: Sequence[MailboxId] | None = None) -> LocalSubscription:
        sub = LocalSubscription(self, None if mailbox_ids is None else frozenset(mailbox_ids))
        if self._closed:
            sub.closed = True
            return sub
        if sub.mailboxes is None:
            self._everything.add(sub)
        else:
            for mid in sub.mailboxes:
                self._by_mailbox.setdefault(mid, set()).add(sub)
        return sub

    def publish(self, changes: Iterable[Change]) -> None:
        """Deliver committed changes to the subscribers of their mailboxes."""
        for change in changes:
            for sub in self._everything:
                sub._push(change, self.backlog)
            for sub in self._by_mailbox.get(change.mailbox_id, ()):
                sub._push(change, self.backlog)

    def close(self) -> None:
        """The store is closing: every subscription ends, and waiters return []."""
        self._closed = True
        subs = set(self._everything)
        for group in self._by_mailbox.values():
            subs |= group
        for sub in subs:
            sub.close()

    @property
    def subscribers(self) -> int:
        subs = set(self._everything)
        for group in self._by_mailbox.values():
            subs |= group
        return len(subs)

    def _remove(self, sub: LocalSubscription) -> None:
        if sub.mailboxes is None:
            self._everything.discard(sub)
            return
        for mid in sub.mailboxes:
            group = self._by_mailbox.get(mid)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._by_mailbox[mid]
