"""Login throttling: repeated failures are slowed down, then refused for a while.

The auth service asks :meth:`Throttle.check` *before* verifying a password, sleeps the
returned ``delay``, refuses when ``allowed`` is false, and reports the outcome with
:meth:`Throttle.failure` or :meth:`Throttle.success`. Everything here is pure bookkeeping
with an injected clock: nothing sleeps, nothing does I/O.

Failures are counted under three keys, each in its own bounded table:

- the client IP (an IPv6 client by its /64, which one subscriber usually gets whole, so
  cycling through the addresses of one prefix does not reset anything);
- the account name, lower-cased, whether or not the account exists;
- the (IP, account) pair, used only so that :meth:`Throttle.success` can forgive the IP
  exactly the failures made on the account that just logged in.

A key's delay doubles from :data:`BASE_DELAY` once it has ``failures_before_delay``
failures, up to ``max_delay``. At ``failures_before_lockout`` failures it is locked for
``lockout_seconds``. A record is forgotten once it has seen no failure for ``window``
seconds and is not locked. After a lockout ends the count is kept until then, so the next
failure locks the key again at once: a patient attacker gets one guess per lockout period.

Invariants:

- No sleeping and no I/O; time comes only from the injected ``clock``.
- :meth:`Throttle.check` never creates a record, so probing costs no memory; only
  :meth:`Throttle.failure` does.
- Each table holds at most ``max_keys`` records; the least recently failed one is evicted
  first. Memory is bounded however many IPs or user names an attacker cycles through, and
  cycling user names cannot evict IP records (separate tables).
- The account key is the lower-cased name as given; existence of the account plays no
  part, so the throttle's behaviour reveals nothing about which accounts exist (the caller
  must report failures for unknown accounts too).
- A success never forgives failures made on other accounts from the same IP, so logging
  in to one's own account does not reset a password-spraying IP.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BASE_DELAY", "Throttle", "Verdict"]

#: The first delay, in seconds, once a key reaches ``failures_before_delay``.
BASE_DELAY = 0.25


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a login attempt: sleep ``delay`` seconds, then go on if ``allowed``.

    A refused attempt also carries a delay (``max_delay``), so a client hammering a locked
    key is slowed down too; the caller sleeps it before answering "no".
    """

    allowed: bool
    delay: float


@dataclass(slots=True)
class _Record:
    failures: int
    last: float  # clock time of the latest failure
    locked_until: float  # clock time; 0.0 when never locked


class _Table:
    """One bounded LRU map of key -> _Record."""

    __slots__ = ("_max", "_records")

    def __init__(self, max_keys: int) -> None:
        self._records: OrderedDict[str | tuple[str, str], _Record] = OrderedDict()
        self._max = max_keys

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str | tuple[str, str], now: float, window: float) -> _Record | None:
        rec = self._records.get(key)
        if rec is not None and now - rec.last >= window and now >= rec.locked_until:
            # Quiet for a whole window and not locked: forget it.
            del self._records[key]
            return None
        return rec

    def touch(self, key: str | tuple[str, str], now: float, window: float) -> _Record:
        rec = self.get(key, now, window)
        if rec is None:
            while len(self._records) >= self._max:
                # Oldest failure first: under a flood of new keys, the stale ones go.
                self._records.popitem(last=False)
            rec = self._records[key] = _Record(failures=0, last=now, locked_until=0.0)
        else:
            self._records.move_to_end(key)
        return rec

    def pop(self, key: str | tuple[str, str]) -> _Record | None:
        return self._records.pop(key, None)


def _ip_key(ip: str) -> str:
    """Normalise an address: IPv4-mapped IPv6 to IPv4, other IPv6 to its /64."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop a zone id (fe80::1%eth0)
    except ValueError:
        return ip  # not an address (a test, a unix socket): use it as given
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        # RFC 6177: an end site is normally given a /48 to /64, so one attacker controls
        # at least a whole /64. Counting per address would let it cycle 2^64 of them.
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def _account_key(account: str) -> str:
    # Lower-cased so "Alice@Example.com" and "alice@example.com" share one budget.
    return account.lower()


class Throttle:
    """Failure counting per IP and per account, with growing delays and lockouts."""

    def __init__(
        self,
        *,
        failures_before_delay: int = 3,
        max_delay: float = 5.0,
        failures_before_lockout: int = 10,
        lockout_seconds: float = 300.0,
        window: float = 900.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``window``: seconds without a failure after which a key is forgotten.
        ``max_keys``: records kept per table (IP, account, pair); about 100 bytes each.
        """
        if failures_before_delay < 1 or failures_before_lockout < 1:
            raise ValueError("failure thresholds must be at least 1")
        if max_delay < 0 or lockout_seconds < 0 or window <= 0:
            raise ValueError("delays and durations must not be negative")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._before_delay = failures_before_delay
        self._max_delay = max_delay
        self._before_lockout = failures_before_lockout
        self._lockout = lockout_seconds
        # The window must outlast a lockout, or a record could be forgotten (and its count
        # reset) the moment its lockout ends.
        self._window = max(window, lockout_seconds)
        self._clock = clock
        self._ips = _Table(max_keys)
        self._accounts = _Table(max_keys)
        self._pairs = _Table(max_keys)

    def check(self, ip: str, account: str) -> Verdict:
        """Before verifying a password: how long to wait, and whether to try at all."""
        now = self._clock()
        worst = 0
        for rec in (
            self._ips.get(_ip_key(ip), now, self._window),
            self._accounts.get(_account_key(account), now, self._window),
        ):
            if rec is None:
                continue
            if now < rec.locked_until:
                return Verdict(allowed=False, delay=self._max_delay)
            worst = max(worst, rec.failures)
        return Verdict(allowed=True, delay=self._delay_for(worst))

    def failure(self, ip: str, account: str) -> None:
        """The password was wrong, or the account does not exist (count it the same)."""
        now = self._clock()
        ip_key, account_key = _ip_key(ip), _account_key(account)
        for table, key in (
            (self._ips, ip_key),
            (self._accounts, account_key),
        ):
            rec = table.touch(key, now, self._window)
            rec.failures += 1
            rec.last = now
            if rec.failures >= self._before_lockout and now >= rec.locked_until:
                rec.locked_until = now + self._lockout
        pair = self._pairs.touch((ip_key, account_key), now, self._window)
        pair.failures += 1
        pair.last = now

    def success(self, ip: str, account: str) -> None:
        """The password was right: clear the account, and forgive the IP its failures on it."""
        ip_key, account_key = _ip_key(ip), _account_key(account)
        self._accounts.pop(account_key)
        pair = self._pairs.pop((ip_key, account_key))
        if pair is None:
            return
        rec = self._ips.get(ip_key, self._clock(), self._window)
        if rec is not None:
            # Only the failures made on this account (the user's own typos) are forgiven;
            # failures on other accounts from this IP still count. A lock stays as it is.
            rec.failures = max(0, rec.failures - pair.failures)

    def tracked(self) -> tuple[int, int, int]:
        """Record counts (IPs, accounts, pairs), for metrics and tests."""
        return len(self._ips), len(self._accounts), len(self._pairs)

    def _delay_for(self, failures: int) -> float:
        if failures < self._before_delay:
            return 0.0
        # Doubling from BASE_DELAY: 0.25, 0.5, 1, 2, 4, then capped at max_delay. The
        # exponent is capped too, so huge counts cannot overflow the float.
        exponent = min(failures - self._before_delay, 32)
        return min(self._max_delay, BASE_DELAY * 2.0**exponent)
