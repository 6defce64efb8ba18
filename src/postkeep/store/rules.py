"""The store's rules that do not depend on the database: one copy for both backends.

``sqlite/ops.py`` and ``postgres/ops.py`` differ in their SQL and in how they keep
concurrent writers apart. What a valid argument is, how names and flags are normalised,
how a row becomes an ``api`` dataclass and which error a refused operation raises are the
same for both, and live here, so the two backends cannot drift apart.

Invariants:
- Nothing here touches a database or imports a driver: these are pure functions of their
  arguments (``now_us`` reads the clock, ``blob_size`` seeks the file it is given).
- Writes refuse malformed arguments with ``ValueError``; lookups call the same functions
  and treat that ``ValueError`` as "nothing found".
- Addresses and domains are lower-cased on the way in. Outbound senders and recipients
  are *not*: a remote local part is case-sensitive (RFC 5321 §2.4).
- Times are stored as integer microseconds since the epoch (``to_us``/``from_us``), and an
  internal date's zone as minutes east of UTC beside it.
- The column lists (``*_COLS``) and the decoders beside them describe the same columns in
  the same order; a query selects a list and decodes with its decoder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, BinaryIO

from postkeep.store.api import (
    DKIM_ALGORITHMS,
    SYSTEM_FLAGS,
    Account,
    BlobRef,
    DkimKey,
    Domain,
    Exposure,
    FlagOp,
    Mailbox,
    MessageRow,
    OutboundRow,
    QueueEntry,
    QueueId,
    QueueRecipient,
    RecipientState,
    StorageError,
    StorageErrorKind,
    Uid,
)

#: Bytes copied per step when a blob is written from a file object.
BLOB_CHUNK = 1 << 20
# RFC 3501 §2.3.1.1: UIDs and UIDVALIDITY are non-zero unsigned 32-bit numbers.
MAX_UID = 0xFFFFFFFF
# RFC 3501 §5.1.1: the hierarchy delimiter postkeep uses.
DELIMITER = "/"
# Longest maildrop lock accepted (seconds): a POP3 session refreshes its lock; a TTL past
# this is a caller's bug and would keep a dead session's lock for ever.
MAX_LOCK_TTL = 7 * 24 * 3600.0

_SYSTEM_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


# ---------------------------------------------------------------- stored times


def to_us(when: datetime) -> int:
    """A tz-aware datetime as integer microseconds since the epoch (exact)."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"naive datetime {when!r}: the store needs a time zone")
    return (when - _EPOCH) // _US


def from_us(us: int, tz_minutes: int = 0) -> datetime:
    """The inverse of ``to_us``, in UTC or in the given offset."""
    utc = _EPOCH + timedelta(microseconds=us)
    if tz_minutes == 0:
        return utc
    return utc.astimezone(timezone(timedelta(minutes=tz_minutes)))


def now_us() -> int:
    return to_us(datetime.now(UTC))


def seconds_us(seconds: float) -> int:
    """A duration in seconds as whole microseconds (leases, lock lifetimes)."""
    return round(seconds * 1_000_000)


def internal_date(when: datetime | None) -> tuple[int, int]:
    """(microseconds, zone offset in minutes) of a message's internal date; now, in UTC,
    when none is given (RFC 3501 §2.3.3)."""
    if when is None:
        return now_us(), 0
    at = to_us(when)
    offset = when.utcoffset()
    assert offset is not None  # to_us refused naive datetimes
    return at, int(offset.total_seconds() // 60)


# ---------------------------------------------------------------- names


def domain(name: str) -> str:
    """A domain name as stored: stripped and lower-cased."""
    d = name.strip().lower()
    if not d or "@" in d or any(c.isspace() for c in d):
        raise ValueError(f"not a domain name: {name!r}")
    return d


def address(address: str) -> tuple[str, str]:
    """(lower-cased address, its domain)."""
    a = address.strip().lower()
    local, at, dom = a.rpartition("@")
    if not at or not local or any(c.isspace() for c in a):
        raise ValueError(f"not an address: {address!r}")
    return a, domain(dom)


def alias_source(source: str) -> tuple[str, str]:
    """(lower-cased source, its domain); ``@domain`` is the catch-all."""
    s = source.strip().lower()
    if s.startswith("@"):
        d = domain(s[1:])
        return "@" + d, d
    return address(s)


def mailbox_name(name: str) -> str:
    # RFC 3501 §5.1: the name INBOX is case-insensitive; store one spelling.
    if name.upper() == "INBOX":
        return "INBOX"
    if not name:
        raise ValueError("empty mailbox name")
    return name


def dkim_selector(selector: str, algorithm: str) -> str:
    """The selector as stored (lower-cased), after checking it and the key algorithm."""
    sel = selector.strip().lower()
    if not sel or any(c.isspace() for c in sel):
        raise ValueError(f"not a DKIM selector: {selector!r}")
    if algorithm not in DKIM_ALGORITHMS:
        raise ValueError(f"not a DKIM key algorithm: {algorithm!r}")
    return sel


def unknown_domain(d: str) -> StorageError:
    """Adding something to a domain that is not local. Raise it."""
    return StorageError(
        StorageErrorKind.NOT_FOUND,
        f"domain {d} is not a local domain; add it first (postkeep domain add {d})",
    )


def unknown_alias_domain(d: str) -> StorageError:
    """An alias source outside the local domains. Raise it."""
    return StorageError(
        StorageErrorKind.NOT_FOUND,
        f"domain {d} is not a local domain; an alias source must be in one",
    )


def domain_in_use(d: str, accounts: int, aliases: int) -> StorageError:
    """Deleting a domain that still has accounts or aliases. Raise it.

    Refuse rather than cascade: deleting a domain must never silently delete mailboxes
    full of mail or routing rules.
    """
    return StorageError(
        StorageErrorKind.PERM,
        f"domain {d} still has {accounts} account(s) and {aliases} alias(es); "
        "delete those first (postkeep user del / postkeep alias del), "
        "then delete the domain",
    )


# ---------------------------------------------------------------- mailboxes


def check_uidvalidity(value: int) -> int:
    """``value`` if it can be a UIDVALIDITY (RFC 3501 §2.3.1.1: 32 bits)."""
    if value > MAX_UID:
        raise StorageError(StorageErrorKind.LIMIT, "UIDVALIDITY values are exhausted")
    return value


def check_uid_room(target: Mailbox, count: int) -> None:
    """Refuse ``count`` new messages that would take ``target``'s UIDs past 32 bits."""
    if target.uidnext + count - 1 > MAX_UID:
        raise StorageError(
            StorageErrorKind.LIMIT,
            f"mailbox {target.name!r} has no room for {count} more UIDs",
        )


def rename_target(new_name: str) -> str:
    """The stored name a mailbox is renamed to; INBOX always exists already."""
    target = mailbox_name(new_name)
    if target == "INBOX":
        raise StorageError(StorageErrorKind.EXISTS, "INBOX always exists")
    return target


def check_rename(box: Mailbox, target: str) -> str:
    """Refuse renaming ``box`` (not INBOX) to itself or inside itself; returns the prefix
    of its inferiors' names."""
    if target == box.name:
        raise StorageError(StorageErrorKind.EXISTS, f"mailbox {target!r} already exists")
    prefix = box.name + DELIMITER
    if target.startswith(prefix):
        raise StorageError(StorageErrorKind.PERM, f"cannot move mailbox {box.name!r} inside itself")
    return prefix


def renames(old: str, new: str, family: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    """(id, new name) of a renamed mailbox and its inferiors, given (id, old name)."""
    return [(mid, new + name[len(old) :]) for mid, name in family]


def check_deletable(box: Mailbox) -> None:
    if box.name == "INBOX":
        # RFC 3501 §6.3.4: it is an error to attempt to delete INBOX.
        raise StorageError(StorageErrorKind.PERM, "INBOX cannot be deleted")


# ---------------------------------------------------------------- flags


def flags(given: Iterable[str]) -> frozenset[str]:
    """Flags as stored: system flags in canonical case, ``\\Recent`` dropped.

    RFC 3501 §2.3.2: ``\\Recent`` is per session, computed by sessions, never stored.
    Keywords keep their case and are compared exactly (api.SYSTEM_FLAGS).
    """
    if isinstance(given, str):
        raise ValueError("flags must be a set of flags, not one string")
    out: set[str] = set()
    for f in given:
        if not f or any(c.isspace() for c in f):
            raise ValueError(f"not a flag: {f!r}")
        low = f.lower()
        if low == "\\recent":
            continue
        out.add(_SYSTEM_BY_LOWER.get(low, f))
    return frozenset(out)


def flags_text(normalised: frozenset[str]) -> str:
    """The stored form of already-normalised flags: sorted, space-separated."""
    return " ".join(sorted(normalised))


def check_unchanged_since(unchanged_since: int | None) -> None:
    if unchanged_since is not None and unchanged_since < 0:
        raise ValueError(f"negative UNCHANGEDSINCE {unchanged_since}")


def flag_updates(
    rows: Iterable[Sequence[Any]], op: FlagOp, given: frozenset[str], unchanged_since: int | None
) -> tuple[list[tuple[Uid, frozenset[str]]], list[Uid]]:
    """What a STORE does to messages given as (uid, modseq, stored flags) rows:
    ((uid, new flags) of those it changes, UIDs refused by UNCHANGEDSINCE)."""
    refused: list[Uid] = []
    changed: list[tuple[Uid, frozenset[str]]] = []
    for uid, modseq, text in rows:
        # RFC 7162 §3.1.3: test first, whether or not the STORE would change anything;
        # UNCHANGEDSINCE 0 therefore always fails (every modseq is >= 1).
        if unchanged_since is not None and modseq > unchanged_since:
            refused.append(uid)
            continue
        old = frozenset(text.split())
        match op:
            case FlagOp.SET:
                new = given
            case FlagOp.ADD:
                new = old | given
            case FlagOp.REMOVE:
                new = old - given
        if new != old:  # setting what is already set is not a change: no new modseq
            changed.append((uid, new))
    return changed, refused


# ---------------------------------------------------------------- blobs


def blob_size(data: bytes | BinaryIO, size: int | None) -> int:
    """The number of bytes a blob of ``data`` holds, checked against ``size`` if given.

    A file without a size holds whatever is left from its current position, found by
    seeking (the file stays where it was); a stream that cannot seek must come with its
    size.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        n = memoryview(data).nbytes
        if size is not None and size != n:
            raise ValueError(f"size {size} given for {n} bytes")
        return n
    if size is None:
        here = data.tell()
        total = data.seek(0, 2) - here
        data.seek(here)
    else:
        total = size
    if total < 0:
        raise ValueError(f"negative blob size {total}")
    return total


def file_chunks(data: BinaryIO, total: int) -> Iterator[bytes]:
    """``total`` bytes of ``data`` in pieces of at most ``BLOB_CHUNK``; a file that ends
    early is a ``ValueError``."""
    left = total
    while left:
        chunk = data.read(min(BLOB_CHUNK, left))
        if not chunk:
            raise ValueError(f"the file ended {left} bytes before the {total} bytes expected")
        yield chunk
        left -= len(chunk)


def check_range(offset: int, length: int | None) -> None:
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"bad range: offset {offset}, length {length}")


def blob_ids(refs: Sequence[BlobRef], length: int | None) -> list[int]:
    """The distinct ids of ``refs`` in first-seen order, for ``read_blobs``; a negative
    ``length`` is a ``ValueError``."""
    check_range(0, length)
    return list(dict.fromkeys(ref.id for ref in refs))


def missing_blobs(wanted: Sequence[int], found: Iterable[int]) -> None:
    """NOT_FOUND, naming them, if some ``wanted`` blob ids were not ``found``."""
    have = set(found)
    missing = [i for i in wanted if i not in have]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", …" if len(missing) > 10 else "")
        raise StorageError(StorageErrorKind.NOT_FOUND, f"blobs {shown} do not exist")


def range_end(size: int, offset: int, length: int | None) -> int:
    """Where a read of ``length`` bytes from ``offset`` ends in a blob of ``size`` bytes."""
    return size if length is None else min(size, offset + length)


def check_blob_ref(blob: BlobRef, size: int) -> None:
    """Refuse a reference whose size is not the stored blob's ``size``."""
    if size != blob.size:
        raise ValueError(f"blob {blob.id} has {size} bytes, the reference says {blob.size}")


# ---------------------------------------------------------------- leases and locks


def check_maildrop_lock(holder: str, ttl: float) -> None:
    if not holder:
        raise ValueError("a maildrop lock needs a holder name")
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_LOCK_TTL):
        raise ValueError(f"maildrop lock TTL must be in (0, {MAX_LOCK_TTL}] seconds: {ttl}")


def check_lease(holder: str, lease_seconds: float) -> None:
    if not holder:
        raise ValueError("a queue lease needs a holder name")
    if not (math.isfinite(lease_seconds) and lease_seconds > 0):
        raise ValueError(f"lease must be a positive number of seconds: {lease_seconds}")


def check_holder_prefix(holder_prefix: str) -> None:
    if not holder_prefix:
        raise ValueError("release_leases needs a holder prefix (not every lease)")


def exposure_due(notified_at: int | None, at: int, notify_every: timedelta) -> bool:
    """Whether an exposure seen at ``at`` is to be told again (last told ``notified_at``)."""
    return notified_at is None or at - notified_at >= notify_every // _US


# ---------------------------------------------------------------- outbound queue


def queue_recipients(recipients: Sequence[str]) -> list[str]:
    """The recipients of a new queue entry, as given (their case is kept)."""
    if isinstance(recipients, str):
        raise ValueError("recipients must be a sequence of addresses, not one string")
    rcpts = list(recipients)
    if not rcpts:
        raise ValueError("a queue entry needs at least one recipient")
    return rcpts


# ---------------------------------------------------------------- rows


def decode_domain(r: Sequence[Any]) -> Domain:
    return Domain(r[0], from_us(r[1]))


ACCOUNT_COLS = "id, address, password_hash, created"


def decode_account(r: Sequence[Any]) -> Account:
    return Account(r[0], r[1], r[2], from_us(r[3]))


#: Of ``password_exposures e JOIN accounts a``.
EXPOSURE_COLS = "a.address, e.peer, e.service, e.first_at, e.last_at, e.notified_at"


def decode_exposure(r: Sequence[Any]) -> Exposure:
    return Exposure(
        r[0], r[1], r[2], from_us(r[3]), from_us(r[4]), None if r[5] is None else from_us(r[5])
    )


DKIM_COLS = "domain, selector, algorithm, private_pem, public_txt, created"


def decode_dkim_key(r: Sequence[Any]) -> DkimKey:
    return DkimKey(r[0], r[1], r[2], r[3], r[4], from_us(r[5]))


MAILBOX_COLS = "id, account_id, name, uidvalidity, uidnext, highestmodseq, special_use, subscribed"


def decode_mailbox(r: Sequence[Any]) -> Mailbox:
    return Mailbox(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]))


#: Of ``messages m``.
MESSAGE_COLS = (
    "m.mailbox_id, m.uid, m.modseq, m.flags, m.internal_date, m.internal_tz, m.size,"
    " m.blob_id, m.envelope, m.bodystructure"
)


def decode_message(r: Sequence[Any]) -> MessageRow:
    return MessageRow(
        mailbox_id=r[0],
        uid=r[1],
        modseq=r[2],
        flags=frozenset(r[3].split()),
        internal_date=from_us(r[4], r[5]),
        size=r[6],
        blob=BlobRef(r[7], r[6]),
        envelope=r[8],
        bodystructure=r[9],
    )


#: Of ``outbound o JOIN blobs b``.
OUTBOUND_COLS = (
    "o.id, o.sender, o.recipients, o.blob_id, b.size, o.created, o.next_attempt,"
    " o.attempts, o.last_error"
)


def decode_outbound(r: Sequence[Any]) -> OutboundRow:
    return OutboundRow(
        id=r[0],
        sender=r[1],
        recipients=tuple(json.loads(r[2])),
        blob=BlobRef(r[3], r[4]),
        created=from_us(r[5]),
        next_attempt=from_us(r[6]),
        attempts=r[7],
        last_error=r[8],
    )


#: Of ``outbound o JOIN blobs b``: the head of a ``QueueEntry``.
ENTRY_COLS = (
    "o.id, o.sender, o.blob_id, b.size, o.created, o.next_attempt, o.attempts,"
    " o.delay_notified, o.lease_holder, o.lease_until"
)
#: Of ``outbound_rcpts``.
RCPT_COLS = "queue_id, address, state, attempts, last_error, last_attempt"


def decode_recipient(r: Sequence[Any]) -> QueueRecipient:
    """A row of ``RCPT_COLS`` as a QueueRecipient."""
    return QueueRecipient(
        address=r[1],
        state=RecipientState(r[2]),
        attempts=r[3],
        last_error=r[4],
        last_attempt=None if r[5] is None else from_us(r[5]),
    )


def assemble_entries(
    ids: Sequence[QueueId],
    heads: Mapping[int, Sequence[Any]],
    rcpts: Mapping[int, list[QueueRecipient]],
    now: int,
) -> list[QueueEntry]:
    """QueueEntries in the order of ``ids`` from ``ENTRY_COLS`` rows and recipients;
    a lease that expired by ``now`` is reported as no lease."""
    out: list[QueueEntry] = []
    for queue_id in ids:
        h = heads.get(queue_id)
        if h is None:
            continue
        leased = h[8] is not None and h[9] is not None and h[9] > now
        out.append(
            QueueEntry(
                id=h[0],
                sender=h[1],
                recipients=tuple(rcpts.get(queue_id, ())),
                blob=BlobRef(h[2], h[3]),
                created=from_us(h[4]),
                next_attempt=from_us(h[5]),
                attempts=h[6],
                delay_notified=bool(h[7]),
                lease_holder=h[8] if leased else None,
                lease_until=from_us(h[9]) if leased else None,
            )
        )
    return out
