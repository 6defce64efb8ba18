"""The selected mailbox as one IMAP session sees it: sequence numbers, pending changes, \\Recent.

A client names messages by sequence number (1..n) and by UID. The store knows only UIDs,
and other sessions, SMTP delivery and POP3 change the mailbox at any moment; but the
numbers this client holds may change only when the server says so, and only at the
moments RFC 3501 §7.4.1 allows. :class:`SelectedMailbox` is that contract in one object:

- ``uids`` is the client's view: ``uids[seq - 1]`` is the UID of message ``seq``. It grows
  only through :meth:`SelectedMailbox.observe` (reported as ``* n EXISTS``) and shrinks
  only through :meth:`SelectedMailbox.take_expunges` (reported as ``* n EXPUNGE``).
- A message expunged in the store but not yet reported stays in the view, *pending*
  (:attr:`SelectedMailbox.gone`): its sequence number keeps naming it, FETCH and STORE
  of it fail with ``NO [EXPUNGEISSUED]``, until a command that may report expunges
  (not FETCH, STORE or SEARCH, RFC 3501 §7.4.1) flushes them.
- :meth:`SelectedMailbox.observe` compares a store snapshot (every UID, the rows whose
  mod-sequence rose since the last one, the mailbox's HIGHESTMODSEQ) with the view and
  returns a :class:`Report` of what to tell the client. Flag changes this session already
  reported itself (the FLAGS of its own STORE or of a FETCH that set ``\\Seen``) are
  recorded with :meth:`SelectedMailbox.told` and are not repeated.

\\Recent (RFC 3501 §2.3.2): "the first session to be notified about a message" sees it as
recent. :class:`RecentClaims` keeps, per mailbox and in this process, the highest UID
some session has claimed; a read-write session (SELECT) that learns of higher UIDs claims
them, an EXAMINE or STATUS only peeks. The first time this process meets a mailbox, the
messages already in it are not recent (nothing says who saw them before a restart).
Several nodes sharing one PostgreSQL store would each hand out \\Recent once: an
approximation RFC 9051 made moot by removing \\Recent altogether.

Invariants:

- ``uids`` is strictly ascending (UIDs only grow, RFC 3501 §2.3.1.1), so a UID's sequence
  number is found by bisection, and a new message always goes at the end.
- Every UID in ``gone`` is in ``uids``; a UID leaves ``uids`` only through
  ``take_expunges``, which returns the sequence numbers to report, in an order in which
  each is right at the moment the client reads it (ascending, each already adjusted for
  the ones before it, as in RFC 3501 §6.4.3's example).
- ``observe`` never shrinks ``uids`` and never reports a flag change of a message the
  client has not been told exists (new UIDs are announced by EXISTS, never by FETCH).
- No I/O: this module only computes; the session reads the store and writes responses.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from postkeep.imap.seqset import SequenceSet
from postkeep.store.api import Mailbox, MailboxId, MessageRow, Uid

__all__ = ["FlagUpdate", "RecentClaims", "Report", "Resolved", "SelectedMailbox"]


class RecentClaims:
    """Which messages are \\Recent, shared by every IMAP session of this process."""

    def __init__(self) -> None:
        # (mailbox id, UIDVALIDITY) -> highest UID claimed. Keyed by UIDVALIDITY too, so a
        # deleted and recreated mailbox that reuses an id starts afresh.
        self._high: dict[tuple[MailboxId, int], Uid] = {}

    def _first_contact(self, key: tuple[MailboxId, int], uids: Sequence[Uid]) -> bool:
        if key in self._high:
            return False
        self._high[key] = max(uids, default=0)
        return True

    def claim(self, mailbox_id: MailboxId, uidvalidity: int, uids: Sequence[Uid]) -> set[Uid]:
        """The UIDs among ``uids`` that are recent for the caller, who now owns them."""
        key = (mailbox_id, uidvalidity)
        if self._first_contact(key, uids):
            return set()
        high = self._high[key]
        mine = {u for u in uids if u > high}
        if mine:
            self._high[key] = max(mine)
        return mine

    def peek(self, mailbox_id: MailboxId, uidvalidity: int, uids: Sequence[Uid]) -> set[Uid]:
        """The UIDs among ``uids`` nobody has claimed yet (EXAMINE, STATUS RECENT)."""
        key = (mailbox_id, uidvalidity)
        if self._first_contact(key, uids):
            return set()
        high = self._high[key]
        return {u for u in uids if u > high}


@dataclass(frozen=True, slots=True)
class FlagUpdate:
    """An unsolicited ``* seq FETCH (FLAGS …)`` to send. The sequence number is looked up
    when it is sent (:meth:`SelectedMailbox.seq_of`), after any EXPUNGE sent before it."""

    uid: Uid
    flags: frozenset[str]
    modseq: int


@dataclass(slots=True)
class Report:
    """What a sync found (RFC 3501 §7.3–7.4): whether the view grew (send EXISTS and
    RECENT) and which flag changes to send as FETCH."""

    grew: bool = False
    flags: list[FlagUpdate] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Resolved:
    """A sequence set met the view: ``pairs`` of (seq, uid) that exist in the store as far
    as this session knows; ``gone`` counts the named messages pending expunge."""

    pairs: list[tuple[int, Uid]]
    gone: int


class SelectedMailbox:
    """One session's view of its selected mailbox (see the module docstring)."""

    def __init__(
        self,
        mailbox: Mailbox,
        uids: Sequence[Uid],
        *,
        readonly: bool,
        claims: RecentClaims,
    ) -> None:
        self.mailbox_id = mailbox.id
        self.name = mailbox.name
        self.uidvalidity = mailbox.uidvalidity
        self.readonly = readonly
        self.uids: list[Uid] = sorted(uids)
        self.gone: set[Uid] = set()
        self.modseq = mailbox.highestmodseq  # HIGHESTMODSEQ of the last snapshot seen
        self._claims = claims
        self._told: dict[Uid, int] = {}
        self.recent: set[Uid] = self._recent_of(self.uids)

    # -- numbers ---------------------------------------------------------------------
    @property
    def exists(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: Uid) -> int | None:
        i = bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def resolve(self, seqset: SequenceSet, *, uid: bool) -> Resolved:
        """The messages a set names, in ascending order. Raises ``ValueError`` for a
        sequence number beyond the view (a client bug: RFC 3501 §7.4.1 keeps a compliant
        client from ever naming one). UIDs that name nothing are ignored (RFC 3501
        §6.4.8), and ``*`` is the last message in the view."""
        pairs: list[tuple[int, Uid]] = []
        gone = 0
        n = len(self.uids)
        if uid:
            largest = self.uids[-1] if self.uids else 0
            for a, b in seqset.resolve(largest):
                lo, hi = bisect_left(self.uids, a), bisect_right(self.uids, b)
                for i in range(lo, hi):
                    u = self.uids[i]
                    if u in self.gone:
                        gone += 1
                    else:
                        pairs.append((i + 1, u))
            return Resolved(pairs, gone)
        spans = seqset.resolve(n)
        if spans and spans[-1][1] > n and not _star_only_overflow(seqset, n):
            raise ValueError(f"no message {spans[-1][1]}: the mailbox has {n}")
        for a, b in spans:
            for seq in range(a, min(b, n) + 1):
                u = self.uids[seq - 1]
                if u in self.gone:
                    gone += 1
                else:
                    pairs.append((seq, u))
        return Resolved(pairs, gone)

    # -- flags and recent ------------------------------------------------------------
    def told(self, uid: Uid, modseq: int) -> None:
        """This session has sent the client the flags ``uid`` has at ``modseq``."""
        self._told[uid] = modseq

    def _recent_of(self, uids: Sequence[Uid]) -> set[Uid]:
        if self.readonly:  # RFC 3501 §6.3.2: EXAMINE does not take \Recent away
            return self._claims.peek(self.mailbox_id, self.uidvalidity, uids)
        return self._claims.claim(self.mailbox_id, self.uidvalidity, uids)

    # -- changes ---------------------------------------------------------------------
    def observe(
        self,
        current: Sequence[Uid],
        changed: Iterable[MessageRow],
        highestmodseq: int,
    ) -> Report:
        """Take a store snapshot: every UID now in the mailbox (ascending), the rows whose
        mod-sequence is above :attr:`modseq`, and the mailbox's HIGHESTMODSEQ.

        Messages that left the store become pending (``gone``); new ones join the view
        and are reported as EXISTS; flag changes not already told are reported as FETCH.
        """
        report = Report()
        present = set(current)
        for u in self.uids:
            if u not in present:
                self.gone.add(u)
        last = self.uids[-1] if self.uids else 0
        new = list(current[bisect_right(current, last) :])
        if new:
            self.uids.extend(new)
            self.recent |= self._recent_of(new)
            report.grew = True
        fresh = set(new)
        for row in changed:
            if row.uid in fresh or row.uid in self.gone:
                continue  # new ones are told by EXISTS; gone ones will be EXPUNGEd
            if self._told.get(row.uid) == row.modseq:
                continue  # we reported exactly this change ourselves
            if self.seq_of(row.uid) is not None:
                report.flags.append(FlagUpdate(row.uid, row.flags, row.modseq))
        self._told.clear()  # everything up to this snapshot is settled
        self.modseq = max(self.modseq, highestmodseq)
        return report

    def expunged_by_us(self, uids: Iterable[Uid]) -> None:
        """Our own EXPUNGE or MOVE removed these: report them with the next flush."""
        for u in uids:
            if self.seq_of(u) is not None:
                self.gone.add(u)

    def take_expunges(self) -> list[int]:
        """Remove every pending expunge from the view; the sequence numbers to send.

        Ascending, each adjusted for the ones sent before it: the k-th (from 0) of the
        removed messages, at index i in the old view, is reported as ``i + 1 - k``.
        """
        if not self.gone:
            return []
        indexes = sorted(bisect_left(self.uids, u) for u in self.gone)
        seqs = [i + 1 - k for k, i in enumerate(indexes)]
        gone = self.gone
        self.uids = [u for u in self.uids if u not in gone]
        self.recent -= gone
        for u in gone:
            self._told.pop(u, None)
        self.gone = set()
        return seqs


def _star_only_overflow(seqset: SequenceSet, n: int) -> bool:
    """Whether every number above ``n`` comes from a range ending in ``*``.

    ``5:*`` in a mailbox of 3 means ``3:5`` (RFC 3501 §6.4.8 wording, applied to sequence
    numbers too): it names message 3, not a missing message 5.
    """
    for first, last in seqset.ranges:
        if first is None or last is None:
            continue
        if max(first, last) > n:
            return False
    return True
