"""The configuration, as frozen dataclasses. ``load.py`` fills them from TOML.

Each field documents the TOML key it comes from. Defaults are the secure ones.

Invariants:
- A ``Config`` is valid: ``load.py`` refuses (exit 2, naming file and key) anything that
  would give an insecure or impossible setup.
- TLS versions are kept as the names used in the file ("TLSv1", "TLSv1.1", "TLSv1.2",
  "TLSv1.3"); only ``tls/policy.py`` turns them into ``ssl`` objects.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class Service(str, Enum):  # noqa: UP042 (kept: StrEnum changes str(); lead to decide)
    """The listeners postkeep runs. The value is the TOML key under ``[listeners]``."""

    SMTP = "smtp"
    SUBMISSION = "submission"
    SUBMISSIONS = "submissions"
    IMAP = "imap"
    IMAPS = "imaps"
    POP3 = "pop3"
    POP3S = "pop3s"
    HTTP = "http"


class Mode(str, Enum):  # noqa: UP042
    """How a listener starts a connection."""

    IMPLICIT = "implicit"  # TLS from the first byte (465, 993, 995)
    STARTTLS = "starttls"  # plaintext greeting, upgrade offered (25) or required (587, 143, 110)
    PLAIN = "plain"  # no TLS at all (http behind a proxy)


#: Standard port and security mode of each service (DESIGN.md §1).
SERVICE_PORTS: dict[Service, tuple[int, Mode]] = {
    Service.SMTP: (25, Mode.STARTTLS),
    Service.SUBMISSION: (587, Mode.STARTTLS),
    Service.SUBMISSIONS: (465, Mode.IMPLICIT),
    Service.IMAP: (143, Mode.STARTTLS),
    Service.IMAPS: (993, Mode.IMPLICIT),
    Service.POP3: (110, Mode.STARTTLS),
    Service.POP3S: (995, Mode.IMPLICIT),
    Service.HTTP: (8080, Mode.PLAIN),
}

#: Offset that ``postkeep init --dev-ports`` and ``make run`` add to every standard port.
DEV_PORT_OFFSET = 10000

TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # "0.0.0.0", "127.0.0.1", "::" ...
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path  # [tls] cert: PEM certificate chain
    key: Path  # [tls] key: PEM private key
    min_version: str = "TLSv1.2"  # [tls] min_version: submission and access ports
    # [tls] legacy_clients: also TLS 1.0/1.1 on those ports (RFC 8996 deprecates them). The
    # floor there becomes TLS 1.0, or min_version when that is "TLSv1.1"; min_version below
    # TLSv1.2 without it, or "TLSv1.3" with it, is refused (tls.policy.access_floor).
    legacy_clients: bool = False
    # [tls] mx_min_version: port 25 only. MX STARTTLS is opportunistic (RFC 7435): refusing
    # an old sender's TLS 1.0 makes it send in plaintext instead, so the floor is lower.
    mx_min_version: str = "TLSv1"
    reload_interval: float = 30.0  # [tls] reload_interval: seconds between file checks


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    plaintext_access: bool = True  # false: imap (143) and pop3 (110) are not opened at all
    implicit_tls_hint_timeout: float = 5.0  # silence on 465/993/995 before the hint line
    # Milliseconds 587/143/110 wait for a TLS ClientHello before the plaintext greeting
    # (a client set to SSL/TLS on a STARTTLS port); 0: greet at once. Never port 25.
    tls_sniff_ms: int = 200
    # A correct password sent before TLS (and refused) marks the account exposed:
    # "warn" tells its owner in the INBOX; "require_change" also refuses logins until
    # "postkeep user passwd"; "lock" refuses them until "postkeep user unlock" or passwd.
    exposed_password: str = "warn"


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    message_size: int = 52_428_800
    recipients: int = 100
    line_length: int = 4096  # longest command line accepted (RFC 5321 §4.5.3.1.4 is 512)
    errors_per_session: int = 10
    commands_per_session: int = 10_000
    connections_total: int = 1000
    connections_per_ip: int = 100
    idle_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: server timeout 5 minutes
    data_timeout: float = 600.0  # whole DATA/BDAT transfer
    shutdown_grace: float = 10.0  # seconds in-flight sessions get on SIGTERM
    # Seconds a POP3 maildrop lock outlives the session (or node) that stopped refreshing
    # it; a live session refreshes it every quarter of this.
    maildrop_lock: float = 120.0


@dataclass(frozen=True, slots=True)
class StorageConfig:
    backend: str = "sqlite"  # "sqlite" or "postgresql"
    dsn: str = ""
    # PostgreSQL only: the connection pool of each node (every open transaction holds one
    # connection; LISTEN takes one more), and how long to wait for a connection.
    pool_min: int = 1
    pool_max: int = 10
    connect_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class AuthConfig:
    # Throttling of failed logins (auth/throttle.py).
    failures_before_delay: int = 3
    max_delay: float = 5.0
    failures_before_lockout: int = 10
    lockout_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """[dns]: how outbound delivery and the probe resolve names."""

    nameservers: tuple[str, ...] = ()  # "127.0.0.1" or "127.0.0.1:5353"; empty: the system's
    timeout: float = 5.0  # seconds for one query (all retries included)


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    """[outbound]: delivery of mail to other servers (queue/)."""

    mx_port: int = 25  # port of the receiving MX (tests use a high port)
    relay: str = ""  # "host:port" of a smarthost; empty: deliver to each domain's MX
    relay_security: str = "tls"  # "tls" (implicit TLS, 465) or "starttls" (587)
    relay_username: str = ""
    relay_password_file: Path | None = None  # the relay password, read at start (never in TOML)
    require_tls: tuple[str, ...] = ()  # domains whose mail needs TLS with a verified certificate
    ca_file: Path | None = None  # extra CAs to verify peers with (private CAs, tests)
    mta_sts_port: int = 443  # port of https://mta-sts.<domain>/ (tests use a high port)
    retry_initial: float = 300.0  # first retry after a 4xx or connection failure, then doubled
    retry_max: float = 3600.0  # the longest wait between two attempts
    give_up_after: float = 432_000.0  # 5 days, then a bounce (RFC 5321 §4.5.4.1: 4-5 days)
    delay_notice_after: float = 14_400.0  # a "delayed" DSN after 4 hours (RFC 3464)
    concurrency: int = 20  # deliveries at once, in total
    per_domain_concurrency: int = 4  # connections at once to one destination domain
    connect_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Config:
    path: Path  # the file this was loaded from (error messages, relative paths)
    hostname: str
    data_dir: Path
    tls: TlsConfig
    listeners: dict[Service, tuple[Address, ...]] = field(default_factory=dict)
    security: SecurityConfig = SecurityConfig()
    limits: LimitsConfig = LimitsConfig()
    storage: StorageConfig = StorageConfig()
    auth: AuthConfig = AuthConfig()
    dns: DnsConfig = DnsConfig()
    outbound: OutboundConfig = OutboundConfig()
    # [proxy_protocol]: per service, the networks of the load balancers in front of it.
    # A service listed here reads a PROXY v1/v2 header on every address it listens on and
    # refuses connections from anywhere else (net/listener.py, net/proxy.py).
    proxy_protocol: dict[Service, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]] = (
        field(default_factory=dict)
    )
    log_level: str = "info"  # top-level log_level: "trace", "debug", "info", "warning"

    def enabled(self, service: Service) -> tuple[Address, ...]:
        """Addresses a service listens on; empty when it is switched off."""
        if not self.security.plaintext_access and service in (Service.IMAP, Service.POP3):
            return ()
        return self.listeners.get(service, ())
