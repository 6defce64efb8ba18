"""The resolver interface outbound delivery uses, and its dnspython implementation.

Invariants:
- ``mx()`` returns ``[(preference, host)]`` sorted by preference, host names lower-case
  without the trailing dot; ``[]`` when the domain has no MX records; raises ``NullMX``
  for a null MX (RFC 7505 §3) and ``DomainNotFound`` for NXDOMAIN.
- ``addresses()`` returns IPv4 then IPv6 addresses; ``[]`` when the name has none or does
  not exist (a missing MX host is skipped, not a reason to bounce).
- ``txt()`` returns one string per record, its character-strings joined (RFC 7208 §3.3
  style; RFC 8461 §3.1 reads ``_mta-sts`` records that way).
- Anything other than an authoritative answer (timeout, SERVFAIL, no nameserver answering)
  is ``DnsTemporaryError``; the caller defers and retries, never bounces on it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from postkeep.config.schema import DnsConfig


class NullMX(Exception):
    """RFC 7505: the domain says it accepts no mail (``MX 0 .``)."""


class DomainNotFound(Exception):
    """NXDOMAIN: the domain does not exist (a permanent failure for its recipients)."""


class DnsTemporaryError(Exception):
    """The answer could not be obtained now (timeout, SERVFAIL, unreachable servers)."""


class Resolver(Protocol):
    async def mx(self, domain: str) -> list[tuple[int, str]]: ...

    async def addresses(self, host: str) -> list[str]: ...

    async def txt(self, name: str) -> list[str]: ...


def parse_nameserver(spec: str) -> tuple[str, int]:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"`` → (ip, port)."""
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
        port = int(port_text)
    else:
        host, port = spec, 53
    ipaddress.ip_address(host)  # ValueError for a name: nameservers are addresses
    return host, port


class DnsResolver:
    """``Resolver`` over dnspython. Empty ``nameservers``: the system's (/etc/resolv.conf)."""

    def __init__(self, config: DnsConfig) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
        if config.nameservers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port)
                for host, port in map(parse_nameserver, config.nameservers)
            ]
        self._resolver.lifetime = config.timeout  # all retries included
        self._resolver.timeout = min(config.timeout, 2.0)  # one try at one server

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, None for NODATA; DomainNotFound / DnsTemporaryError otherwise."""
        try:
            qname = dns.name.from_text(name)  # absolute: no search list
            return await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise DomainNotFound(name) from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsTemporaryError(f"{rdtype} lookup for {name} failed: {type(exc).__name__}") \
                from None

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        answer = await self._query(domain, "MX")
        if answer is None:
            return []
        records = [
            (int(r.preference), r.exchange.to_text(omit_final_dot=True).lower())
            for r in answer
        ]
        # RFC 7505 §3: "MX 0 ." alone means no mail. Mixed with real MX records (a
        # misconfiguration, §4.3) the null one is just not a host we can use.
        real = [(p, h) for p, h in records if h not in ("", ".")]
        if records and not real:
            raise NullMX(domain)
        return sorted(real)

    async def addresses(self, host: str) -> list[str]:
        async def one(rdtype: str) -> list[str]:
            try:
                answer = await self._query(host, rdtype)
            except DomainNotFound:
                return []
            return [r.to_text() for r in answer] if answer is not None else []

        v4, v6 = await asyncio.gather(one("A"), one("AAAA"), return_exceptions=True)
        # IPv4 first: a host without working IPv6 does not wait for a connect timeout on
        # every delivery; IPv6 addresses are still tried when IPv4 fails (RFC 5321 §5.1).
        found = (v4 if isinstance(v4, list) else []) + (v6 if isinstance(v6, list) else [])
        for result in (v4, v6):
            if isinstance(result, BaseException) and not found:
                raise result  # nothing to try: "no address" would be a guess
        return found

    async def txt(self, name: str) -> list[str]:
        try:
            answer = await self._query(name, "TXT")
        except DomainNotFound:
            return []
        if answer is None:
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
