"""MTA-STS (RFC 8461): discover, fetch, parse and cache a domain's SMTP TLS policy.

``MtaSts.policy(domain)`` follows RFC 8461 §5.1: read the ``_mta-sts.<domain>`` TXT record
(``v=STSv1; id=…``); if the cached policy was fetched under the same id and has not expired,
use it; otherwise fetch ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` over HTTPS with
a verified certificate (§3.3), parse it (§3.2) and cache it for ``max_age`` seconds. Only
``queue/deliver.py`` decides what a policy means for a delivery.

The HTTPS host is resolved through our ``Resolver`` (an aiohttp resolver adapter), so the
same DNS answers, and the same ``[dns]`` nameservers, govern the MX lookup and the policy.

Invariants:
- A policy is fetched only over HTTPS with a verified certificate for
  ``mta-sts.<domain>`` (system CAs plus ``[outbound] ca_file``), never following a
  redirect (§3.3), reading at most ``MAX_POLICY_BYTES``, within ``FETCH_TIMEOUT``; the
  media type must be ``text/plain`` (§3.2).
- A fetch or parse failure never removes a valid cached policy (§5.1: an attacker who
  blocks the fetch must not downgrade a known policy) and without one means "no policy"
  (§5: deliver as though the domain had not implemented MTA-STS).
- Cached policies expire after ``max_age`` (capped at one year, §3.2); a new TXT ``id``
  causes a refetch (§3.1).
- ``mx`` patterns match per §4.1: exact names, or ``*.`` matching exactly one leftmost label.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from postkeep import log
from postkeep.dns.resolver import DnsTemporaryError, Resolver
from postkeep.tls.policy import TlsContext

logger = log.get_logger("queue")

#: RFC 8461 §3.3 suggests senders bound the policy size; 64 KiB is generous.
MAX_POLICY_BYTES = 64 * 1024
#: RFC 8461 §3.3: "a timeout of 60 seconds or less" is reasonable; shorter keeps the queue
#: moving.
FETCH_TIMEOUT = 30.0
#: RFC 8461 §3.2: max_age is at most 31557600 (about one year).
MAX_AGE_LIMIT = 31_557_600
MODES = ("enforce", "testing", "none")

_ID = re.compile(r"[A-Za-z0-9]{1,32}")  # RFC 8461 §3.1: sts-id = 1*32(ALPHA / DIGIT)


class PolicyError(Exception):
    """The policy could not be fetched or is not a valid STSv1 policy."""


@dataclass(frozen=True, slots=True)
class StsPolicy:
    domain: str
    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]  # patterns, lower-case, no trailing dot
    max_age: int
    policy_id: str = ""  # the TXT id it was fetched under

    def matches(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: ``mail.example.com`` matches itself; ``*.example.com`` matches
    ``mail.example.com`` but neither ``example.com`` nor ``a.mail.example.com``."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return pattern == host


def parse_txt(records: list[str]) -> str | None:
    """The ``id`` of the one valid ``v=STSv1`` record, or None (RFC 8461 §3.1: none, or
    more than one, means the domain has no policy)."""
    found = [r for r in records if r.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        return None
    ident = fields.get("id", "")
    return ident if _ID.fullmatch(ident) else None


def parse_policy(text: str, domain: str, policy_id: str = "") -> StsPolicy:
    """RFC 8461 §3.2: ``key: value`` lines (CRLF or LF); unknown keys are ignored."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError("a policy line without ':'")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyError(f"unknown mode {mode[:20]!r}")
    age_text = fields.get("max_age", "")
    if not age_text.isdigit() or len(age_text) > 10:
        raise PolicyError("max_age is not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")  # §3.2: mx is required unless mode is none
    return StsPolicy(domain, mode, tuple(mx), min(int(age_text), MAX_AGE_LIMIT), policy_id)


class _ResolverAdapter(AbstractResolver):
    """Lets aiohttp resolve ``mta-sts.<domain>`` through our ``Resolver``."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await self._resolver.addresses(host)
        except DnsTemporaryError as exc:
            raise OSError(str(exc)) from None
        if not addresses:
            raise OSError(f"{host} has no address")
        return [
            ResolveResult(
                hostname=host, host=a, port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0, flags=socket.AI_NUMERICHOST,
            )
            for a in addresses
        ]

    async def close(self) -> None:
        pass


@dataclass(slots=True)
class _Cached:
    policy: StsPolicy
    expires: float


class MtaSts:
    """Policy discovery and a per-domain in-memory cache (RFC 8461 §5.1)."""

    def __init__(
        self,
        *,
        resolver: Resolver,
        tls_context: Callable[[], TlsContext],
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._tls_context = tls_context
        self._port = port
        self._timeout = timeout
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._session: aiohttp.ClientSession | None = None

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy to apply to ``domain`` now (mode "none" included), or None."""
        domain = domain.lower().rstrip(".")
        cached = self._cache.get(domain)
        valid = cached.policy if cached is not None and cached.expires > self._clock() else None
        try:
            records = await self._resolver.txt(f"_mta-sts.{domain}")
        except DnsTemporaryError:
            return valid  # §5.1: keep using what we know
        policy_id = parse_txt(records)
        if policy_id is None:
            return valid  # §5.1: no record: a cached policy still applies until it expires
        if valid is not None and valid.policy_id == policy_id:
            return valid
        try:
            fetched = await self._fetch(domain, policy_id)
        except PolicyError as exc:
            logger.info(
                "queue.mta_sts.fetch_failed",
                extra={"domain": domain, "error": str(exc), "cached": valid is not None},
            )
            return valid
        self._cache[domain] = _Cached(fetched, self._clock() + fetched.max_age)
        logger.info(
            "queue.mta_sts.policy",
            extra={"domain": domain, "mode": fetched.mode, "id": policy_id,
                   "max_age": fetched.max_age},
        )
        return fetched

    async def _fetch(self, domain: str, policy_id: str) -> StsPolicy:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=_ResolverAdapter(self._resolver), ssl=self._tls_context(),
                use_dns_cache=False,
            )
            self._session = aiohttp.ClientSession(connector=connector)
        host = f"mta-sts.{domain}"
        port = "" if self._port == 443 else f":{self._port}"
        url = f"https://{host}{port}/.well-known/mta-sts.txt"
        try:
            async with self._session.get(
                url, allow_redirects=False,  # §3.3: redirects MUST NOT be followed
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response:
                if response.status != 200:
                    raise PolicyError(f"HTTP status {response.status}")
                if response.content_type != "text/plain":
                    raise PolicyError("media type is not text/plain")
                body = bytearray()
                async for chunk in response.content.iter_chunked(16384):
                    body += chunk
                    if len(body) > MAX_POLICY_BYTES:
                        raise PolicyError(f"policy larger than {MAX_POLICY_BYTES} bytes")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise PolicyError(f"fetch failed: {type(exc).__name__}") from None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError("policy is not UTF-8") from None
        return parse_policy(text, domain, policy_id)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
