"""DNS discovery for a mail domain: MX, RFC 6186/8314 SRV records, MTA-STS, autoconfig.

Runs only when DNS answers: with ``--dns IP:PORT`` the probe asks that server (tests run
one on loopback), otherwise the system's resolvers. Every query has the probe's timeout;
a resolver that does not answer at all is reported once (``error``), not per record.

Invariants:
- Nothing here changes what the port checks found; DNS findings are reported beside them.
- The autoconfig URL is fetched over verified HTTPS only (``client_context("verify")``),
  with a short timeout, and only its status line is read.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver

from postkeep.tls.policy import TlsPolicy

#: RFC 6186 §3 and RFC 8314 §5.1, implicit TLS first.
SRV_NAMES = (
    "_submissions._tcp",
    "_submission._tcp",
    "_imaps._tcp",
    "_imap._tcp",
    "_pop3s._tcp",
    "_pop3._tcp",
)
AUTOCONFIG_PATH = "/mail/config-v1.1.xml"
#: The autoconfig fetch is a hint, not a check: it gets at most this long.
AUTOCONFIG_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True, order=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str


@dataclass(slots=True)
class DnsFindings:
    domain: str
    nameserver: str  # "system" or "IP:PORT"
    mx: list[tuple[int, str]] = field(default_factory=list)  # (preference, host)
    srv: dict[str, list[Srv]] = field(default_factory=dict)
    mta_sts: str | None = None  # the "v=STSv1; id=…" TXT record
    autoconfig_url: str = ""
    autoconfig: str = "not checked"  # "HTTP 200", "does not resolve", "timed out", …
    error: str | None = None  # DNS did not answer at all


def _resolver(nameserver: str | None, timeout: float) -> dns.asyncresolver.Resolver:
    if nameserver is None:
        res = dns.asyncresolver.Resolver()
    else:
        res = dns.asyncresolver.Resolver(configure=False)
        host, _, port = nameserver.rpartition(":")
        res.nameservers = [host.strip("[]")]
        res.port = int(port)
    res.lifetime = timeout
    res.timeout = timeout
    return res


async def _query(res: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[object]:
    try:
        answer = await res.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return list(answer)


async def _autoconfig(
    res: dns.asyncresolver.Resolver, host: str, ca: Path | None
) -> str:
    try:
        addrs = await _query(res, host, "A") or await _query(res, host, "AAAA")
    except dns.exception.DNSException:
        return "does not resolve"
    if not addrs:
        return "does not resolve"
    address = str(addrs[0])
    policy = TlsPolicy.__new__(TlsPolicy)  # client contexts need no server state
    ctx = policy.client_context("verify", cafile=ca)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address, 443, ssl=ctx, server_hostname=host),
            AUTOCONFIG_TIMEOUT,
        )
    except TimeoutError:
        return "timed out"
    except ssl.SSLCertVerificationError as exc:
        return f"certificate not valid: {exc.verify_message}"
    except (OSError, ssl.SSLError) as exc:
        return f"no HTTPS: {exc.strerror or exc}"
    try:
        writer.write(
            f"GET {AUTOCONFIG_PATH} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            "User-Agent: postkeep-probe\r\n\r\n".encode()
        )
        line = await asyncio.wait_for(reader.readline(), AUTOCONFIG_TIMEOUT)
    except (TimeoutError, OSError):
        return "timed out"
    finally:
        writer.close()
    parts = line.decode("latin-1").split()
    return f"HTTP {parts[1]}" if len(parts) >= 2 else "no HTTP answer"


async def discover(
    domain: str, *, nameserver: str | None, timeout: float, ca: Path | None = None
) -> DnsFindings:
    found = DnsFindings(domain=domain, nameserver=nameserver or "system")
    found.autoconfig_url = f"https://autoconfig.{domain}{AUTOCONFIG_PATH}"
    try:
        res = _resolver(nameserver, timeout)
        mx = await _query(res, domain, "MX")
    except (dns.exception.DNSException, ValueError, OSError) as exc:
        found.error = f"DNS did not answer: {exc.__class__.__name__}"
        return found
    found.mx = sorted((int(r.preference), str(r.exchange).rstrip(".")) for r in mx)  # type: ignore[attr-defined]

    async def srv(label: str) -> tuple[str, list[Srv]]:
        try:
            rows = await _query(res, f"{label}.{domain}", "SRV")
        except dns.exception.DNSException:
            return label, []
        return label, sorted(
            Srv(int(r.priority), int(r.weight), int(r.port), str(r.target).rstrip("."))  # type: ignore[attr-defined]
            for r in rows
        )

    async def sts() -> str | None:
        try:
            rows = await _query(res, f"_mta-sts.{domain}", "TXT")
        except dns.exception.DNSException:
            return None
        for r in rows:
            text = b"".join(r.strings).decode("ascii", "replace")  # type: ignore[attr-defined]
            if text.startswith("v=STSv1"):  # RFC 8461 §3.1
                return text
        return None

    srv_rows = await asyncio.gather(*(srv(label) for label in SRV_NAMES))
    found.srv = dict(srv_rows)
    found.mta_sts, found.autoconfig = await asyncio.gather(
        sts(), _autoconfig(res, f"autoconfig.{domain}", ca)
    )
    return found
