"""Login throttling with an injected clock: delays, lockouts, expiry, bounded memory."""

from __future__ import annotations

import pytest

from postkeep.auth.throttle import BASE_DELAY, Throttle, Verdict


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def throttle(clock: Clock) -> Throttle:
    return Throttle(clock=clock)


IP = "192.0.2.1"
USER = "alice@example.com"


def fail(t: Throttle, n: int, ip: str = IP, account: str = USER) -> None:
    for _ in range(n):
        t.failure(ip, account)


def test_clean_slate_is_allowed_without_delay(throttle: Throttle) -> None:
    assert throttle.check(IP, USER) == Verdict(allowed=True, delay=0.0)


def test_no_delay_below_the_threshold(throttle: Throttle) -> None:
    fail(throttle, 2)
    assert throttle.check(IP, USER) == Verdict(allowed=True, delay=0.0)


def test_delay_doubles_from_base_to_max(throttle: Throttle) -> None:
    delays = []
    for _ in range(9):
        throttle.failure(IP, USER)
        delays.append(throttle.check(IP, USER).delay)
    assert delays == [0.0, 0.0, BASE_DELAY, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_lockout_after_threshold(throttle: Throttle) -> None:
    fail(throttle, 9)
    assert throttle.check(IP, USER).allowed
    throttle.failure(IP, USER)
    verdict = throttle.check(IP, USER)
    assert verdict.allowed is False
    assert verdict.delay == 5.0  # a refused client is slowed down too


def test_lockout_ends_after_lockout_seconds(throttle: Throttle, clock: Clock) -> None:
    fail(throttle, 10)
    clock.advance(299.0)
    assert not throttle.check(IP, USER).allowed
    clock.advance(1.0)
    assert throttle.check(IP, USER).allowed


def test_one_more_failure_after_a_lockout_locks_again(throttle: Throttle, clock: Clock) -> None:
    fail(throttle, 10)
    clock.advance(300.0)
    assert throttle.check(IP, USER).allowed
    throttle.failure(IP, USER)
    assert not throttle.check(IP, USER).allowed


def test_failures_during_lockout_do_not_extend_it(throttle: Throttle, clock: Clock) -> None:
    fail(throttle, 10)
    clock.advance(200.0)
    fail(throttle, 5)
    clock.advance(100.0)
    assert throttle.check(IP, USER).allowed


def test_records_expire_after_a_quiet_window(throttle: Throttle, clock: Clock) -> None:
    fail(throttle, 5)
    clock.advance(899.0)
    assert throttle.check(IP, USER).delay > 0
    clock.advance(1.0)
    assert throttle.check(IP, USER) == Verdict(allowed=True, delay=0.0)


def test_expiry_of_a_locked_key_waits_for_the_window(throttle: Throttle, clock: Clock) -> None:
    fail(throttle, 10)
    clock.advance(300.0)  # lockout over, but the count is still remembered
    assert throttle.check(IP, USER).delay == 5.0
    clock.advance(600.0)  # a window since the last failure
    assert throttle.check(IP, USER) == Verdict(allowed=True, delay=0.0)


def test_ip_is_throttled_across_accounts(throttle: Throttle) -> None:
    # Password spraying: one IP, many accounts, one guess each.
    for i in range(10):
        throttle.failure(IP, f"user{i}@example.com")
    assert not throttle.check(IP, "someone-new@example.com").allowed
    assert throttle.check("198.51.100.7", "someone-new@example.com").allowed


def test_account_is_throttled_across_ips(throttle: Throttle) -> None:
    # A botnet: many IPs, one account.
    for i in range(10):
        throttle.failure(f"203.0.113.{i}", USER)
    assert not throttle.check("198.51.100.7", USER).allowed
    assert throttle.check("198.51.100.7", "bob@example.com").allowed


def test_account_key_is_case_insensitive(throttle: Throttle) -> None:
    fail(throttle, 10, account="Alice@Example.COM")
    assert not throttle.check("198.51.100.7", "alice@example.com").allowed


def test_unknown_and_known_accounts_are_tracked_identically(clock: Clock) -> None:
    # The throttle has no notion of existence: same calls, same verdicts, same memory.
    a, b = Throttle(clock=clock), Throttle(clock=clock)
    fail(a, 4, account="exists@example.com")
    fail(b, 4, account="no-such-user@example.com")
    assert a.check(IP, "exists@example.com") == b.check(IP, "no-such-user@example.com")
    assert a.tracked() == b.tracked()


def test_ipv6_addresses_of_one_prefix_share_a_budget(throttle: Throttle) -> None:
    for i in range(10):
        throttle.failure(f"2001:db8:1:2::{i + 1:x}", f"u{i}")
    assert not throttle.check("2001:db8:1:2:ffff::1", "fresh").allowed
    assert throttle.check("2001:db8:1:3::1", "fresh").allowed


def test_ipv4_mapped_address_is_the_ipv4_address(throttle: Throttle) -> None:
    for i in range(10):
        throttle.failure("::ffff:192.0.2.1", f"u{i}")
    assert not throttle.check("192.0.2.1", "fresh").allowed


def test_success_clears_the_account(throttle: Throttle) -> None:
    fail(throttle, 5)
    throttle.success(IP, USER)
    assert throttle.check("198.51.100.7", USER) == Verdict(allowed=True, delay=0.0)


def test_success_forgives_the_ip_its_own_typos(throttle: Throttle) -> None:
    fail(throttle, 5)
    throttle.success(IP, USER)
    assert throttle.check(IP, "bob@example.com") == Verdict(allowed=True, delay=0.0)


def test_success_does_not_reset_a_spraying_ip(throttle: Throttle) -> None:
    # An attacker logging in to its own account between guesses keeps its IP count:
    # only the failure on its own account is forgiven.
    for i in range(8):
        throttle.failure(IP, f"victim{i}@example.com")
    throttle.failure(IP, "attacker@example.com")
    throttle.success(IP, "attacker@example.com")
    throttle.failure(IP, "victim8@example.com")
    assert throttle.check(IP, "victim10@example.com").allowed  # 9 counted
    throttle.failure(IP, "victim9@example.com")
    assert not throttle.check(IP, "victim10@example.com").allowed


def test_success_without_prior_failures_changes_nothing(throttle: Throttle) -> None:
    for i in range(10):
        throttle.failure(IP, f"victim{i}@example.com")
    throttle.success(IP, "attacker@example.com")
    assert not throttle.check(IP, "anyone").allowed


def test_check_does_not_allocate(throttle: Throttle) -> None:
    for i in range(1000):
        throttle.check(f"10.0.{i // 256}.{i % 256}", f"user{i}")
    assert throttle.tracked() == (0, 0, 0)


def test_memory_is_bounded_when_cycling_ips_and_accounts(clock: Clock) -> None:
    t = Throttle(clock=clock, max_keys=100)
    for i in range(5000):
        t.failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"user{i}@example.com")
    ips, accounts, pairs = t.tracked()
    assert ips <= 100 and accounts <= 100 and pairs <= 100


def test_eviction_drops_the_oldest_record_first(clock: Clock) -> None:
    t = Throttle(clock=clock, max_keys=3)
    fail(t, 10, ip="192.0.2.1", account="old")
    for i in range(3):
        clock.advance(1.0)
        t.failure(f"198.51.100.{i}", f"new{i}")
    # The oldest IP and account records are gone; the newest are kept.
    assert t.check("192.0.2.1", "fresh").allowed
    assert t.check("203.0.113.1", "old").allowed
    t2 = Throttle(clock=clock, max_keys=3)
    fail(t2, 10, ip="192.0.2.1", account="kept")
    t2.failure("198.51.100.1", "x")
    assert not t2.check("192.0.2.1", "fresh").allowed


def test_cycling_user_names_cannot_evict_ip_records(clock: Clock) -> None:
    t = Throttle(clock=clock, max_keys=50)
    for i in range(1000):
        t.failure(IP, f"random{i}")
    assert not t.check(IP, "anyone").allowed


def test_custom_parameters(clock: Clock) -> None:
    t = Throttle(
        failures_before_delay=1,
        max_delay=1.0,
        failures_before_lockout=3,
        lockout_seconds=10.0,
        clock=clock,
    )
    t.failure(IP, USER)
    assert t.check(IP, USER).delay == BASE_DELAY
    t.failure(IP, USER)
    assert t.check(IP, USER).delay == 0.5
    t.failure(IP, USER)
    assert not t.check(IP, USER).allowed
    clock.advance(10.0)
    assert t.check(IP, USER) == Verdict(allowed=True, delay=1.0)


def test_huge_failure_counts_do_not_overflow(clock: Clock) -> None:
    t = Throttle(failures_before_lockout=10**9, clock=clock)
    fail(t, 5000)
    assert t.check(IP, USER) == Verdict(allowed=True, delay=5.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failures_before_delay": 0},
        {"failures_before_lockout": 0},
        {"max_delay": -1.0},
        {"lockout_seconds": -1.0},
        {"window": 0.0},
        {"max_keys": 0},
    ],
)
def test_nonsense_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Throttle(**kwargs)  # type: ignore[arg-type]
