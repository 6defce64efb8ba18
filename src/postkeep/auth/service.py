"""Login verification shared by SMTP submission, IMAP and POP3.

Invariants:
- The answer never reveals whether an account exists: unknown accounts are verified
  against a dummy hash, and throttling counts them like real ones.
- Passwords are compared only by argon2 (constant time), in a worker thread.
- No password or SASL payload is logged; only the user name and the outcome.
- An account whose password was sent before TLS (``auth/exposure.py``) is refused under
  the ``require_change`` and ``lock`` policies only *after* the password was verified, so
  the distinct answer (MUST_CHANGE, LOCKED) is given only to someone who knows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from postkeep import log
from postkeep.auth.passwords import verify_or_dummy
from postkeep.auth.throttle import Throttle
from postkeep.store.api import Store

logger = log.get_logger("auth")


class Outcome(Enum):
    OK = "ok"
    FAILED = "failed"
    THROTTLED = "throttled"  # too many failures: refused without checking the password
    #: Correct, but the password was sent before TLS and policy is "require_change":
    #: refused until ``postkeep user passwd`` sets a new one.
    MUST_CHANGE = "must_change"
    #: Correct, but the password was sent before TLS and policy is "lock": refused until
    #: ``postkeep user unlock`` (or ``passwd``).
    LOCKED = "locked"


@dataclass(frozen=True, slots=True)
class LoginResult:
    outcome: Outcome
    address: str | None = None  # the account, when OK


#: Told each login's outcome and service (None: the connection's); ``web.metrics`` counts.
LoginObserver = Callable[[str, str | None], None]

#: ``[security] exposed_password`` (config/schema.py).
EXPOSED_POLICIES = ("warn", "require_change", "lock")


class Authenticator:
    def __init__(
        self,
        store: Store,
        throttle: Throttle,
        *,
        on_login: LoginObserver | None = None,
        exposed_policy: str = "warn",
    ) -> None:
        if exposed_policy not in EXPOSED_POLICIES:
            raise ValueError(f"exposed_policy must be one of {EXPOSED_POLICIES}")
        self._store = store
        self._throttle = throttle
        self._on_login = on_login
        self.exposed_policy = exposed_policy

    async def verify_plaintext(self, username: str, password: str, peer_ip: str) -> str | None:
        """Check credentials that were sent before TLS and already refused: the account's
        address if the password is right, else None. The same throttle and constant-time
        verification as ``login`` (a wrong guess counts as a failure, so this is no
        unthrottled oracle), but a right one forgives nothing and logs nothing: the
        caller records the exposure."""
        user = username.strip().lower()
        verdict = self._throttle.check(peer_ip, user)
        if not verdict.allowed:
            return None
        if verdict.delay > 0:
            await asyncio.sleep(verdict.delay)
        async with self._store.read() as tx:
            account = await tx.get_account(user)
        ok = await verify_or_dummy(account.password_hash if account else None, password)
        if ok and account is not None:
            return account.address
        self._throttle.failure(peer_ip, user)
        return None

    async def login(
        self, username: str, password: str, peer_ip: str, service: str | None = None
    ) -> LoginResult:
        result = await self._login(username, password, peer_ip)
        if self._on_login is not None:
            self._on_login(result.outcome.value, service)
        return result

    async def _login(self, username: str, password: str, peer_ip: str) -> LoginResult:
        user = username.strip().lower()
        verdict = self._throttle.check(peer_ip, user)
        if not verdict.allowed:
            logger.info("auth.throttled", extra={"user": user})
            return LoginResult(Outcome.THROTTLED)
        if verdict.delay > 0:
            await asyncio.sleep(verdict.delay)
        async with self._store.read() as tx:
            account = await tx.get_account(user)
            exposed = (
                account is not None
                and self.exposed_policy != "warn"
                and bool(await tx.exposures(account.address))
            )
        ok = await verify_or_dummy(account.password_hash if account else None, password)
        if ok and account is not None:
            self._throttle.success(peer_ip, user)
            if exposed:
                outcome = Outcome.LOCKED if self.exposed_policy == "lock" else Outcome.MUST_CHANGE
                logger.info("auth.login.exposed", extra={"user": user, "policy": outcome.value})
                return LoginResult(outcome, account.address)
            logger.info("auth.login.ok", extra={"user": user})
            return LoginResult(Outcome.OK, account.address)
        self._throttle.failure(peer_ip, user)
        logger.info("auth.login.failed", extra={"user": user})
        return LoginResult(Outcome.FAILED)
