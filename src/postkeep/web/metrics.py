"""Prometheus metrics, served at ``/metrics`` by the ``http`` listener.

``app.py`` creates one ``Metrics`` with its own ``CollectorRegistry`` (never the global
default registry: two ``App``\\s in one process, as in tests, must not share counters)
and hands the recording methods to the modules that see the events:

======================================  ==========================  =====================
metric                                  recorded by                 labels
======================================  ==========================  =====================
postkeep_connections_total              net/listener (at open)      service, tls_version
postkeep_starttls_upgrades_total        net/listener (at close)     service, tls_version
postkeep_connections_open               ConnectionTracker.total     (none)
postkeep_logins_total                   auth/service                service, result
postkeep_plaintext_logins_refused_total ``plaintext_login_refused``  service
postkeep_first_bytes_total              net/listener (before the    service, outcome
                                        greeting or handshake)
postkeep_messages_accepted_total        ``message_accepted``        service
postkeep_outbound_queue_messages        store, read at each scrape  (none)
postkeep_store_write_transactions_total store.stats                 (none)
postkeep_store_commits_total            store.stats                 (none)
postkeep_tls_certificate_expiry_seconds TlsPolicy.cert_info         (none)
postkeep_http_requests_total            web/server                  endpoint, code
======================================  ==========================  =====================

``tls_version`` is ``"none"`` for a connection that starts in plaintext (25, 587, 143,
110, http); its later STARTTLS shows up in ``postkeep_starttls_upgrades_total``. A client
set to SSL/TLS on 587/143/110 is recognised by its first bytes and counts with its TLS
version, as on 465/993/995.

``postkeep_first_bytes_total`` says what a new connection on 465/993/995 (and on
587/143/110 unless ``[security] tls_sniff_ms = 0``) sent before our greeting or handshake:
``tls`` (a ClientHello), ``silent`` (nothing: it waits for a greeting), ``plaintext``
(a command before the greeting) or ``closed`` (it hung up). ``silent`` or ``plaintext`` on
465/993/995 and ``tls`` on 587/143/110 are mail programs set to the wrong security mode.
``postkeep_plaintext_logins_refused_total`` counts connections (once each) that were
refused a login, or on 587 mail, because TLS had not started.

A login's service is the one given to ``login()``, or else the service of the connection
being served: ``connection_opened`` remembers it in a context variable, which the
connection's task (and everything it awaits) sees, as ``log.bind`` does for log fields.

Invariants:
- No label ever carries an address, a user name, a host name or a peer IP: label values
  come from fixed sets (services, TLS version names, outcomes, route names, status codes),
  so the number of series stays bounded whatever clients send.
- Recording never raises into the caller and never blocks.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from postkeep import __version__
from postkeep.config.schema import Service
from postkeep.store.api import Store
from postkeep.tls.certs import CertInfo

#: The Prometheus text format (0.0.4), which every scraper and ``prometheus_client.parser``
#: read.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: The queue gauge counts at most this many rows per scrape (it reads ``outbound(limit)``).
QUEUE_COUNT_CAP = 10_000
#: Label values for TLS versions we may see; anything else is reported as "other".
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
LOGIN_RESULTS = ("ok", "failed", "throttled")
OUTBOUND_RESULTS = ("delivered", "deferred", "bounced")
FIRST_BYTES = ("tls", "silent", "plaintext", "closed")
UNKNOWN = "unknown"

_service: contextvars.ContextVar[str] = contextvars.ContextVar("postkeep_metrics_service",
                                                               default=UNKNOWN)


def tls_label(version: str | None) -> str:
    if version is None:
        return "none"
    return version if version in TLS_VERSIONS else "other"


def _service_label(service: Service | str | None) -> str:
    if service is None:
        return _service.get()
    value = service.value if isinstance(service, Service) else service
    return value if value in _SERVICE_VALUES else UNKNOWN


_SERVICE_VALUES = frozenset(s.value for s in Service)


class Metrics:
    """Every counter postkeep exports, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._store: Store | None = None
        r = self.registry
        self.connections = Counter(
            "postkeep_connections", "Connections accepted, by service and TLS version at "
            "the start (none: plaintext greeting)", ["service", "tls_version"], registry=r)
        self.starttls = Counter(
            "postkeep_starttls_upgrades", "Connections upgraded with STARTTLS/STLS, by "
            "service and the TLS version negotiated", ["service", "tls_version"], registry=r)
        self.logins = Counter(
            "postkeep_logins", "Login attempts by service and result (ok, failed, throttled)",
            ["service", "result"], registry=r)
        self.plaintext_refused = Counter(
            "postkeep_plaintext_logins_refused", "Connections refused a login (or, on "
            "submission, mail) because TLS had not started (a client set to no "
            "encryption)", ["service"], registry=r)
        self.first_bytes_seen = Counter(
            "postkeep_first_bytes", "What new connections sent before the greeting or "
            "handshake: tls, silent (waited), plaintext or closed",
            ["service", "outcome"], registry=r)
        self.messages = Counter(
            "postkeep_messages_accepted", "Messages accepted (replied 250 / APPENDed), by "
            "service", ["service"], registry=r)
        self.outbound = Counter(
            "postkeep_outbound_recipients", "Outbound delivery attempts per recipient, by "
            "result (delivered; deferred: will be retried; bounced: failed for good, a DSN "
            "goes to the sender)", ["result"], registry=r)
        for result in OUTBOUND_RESULTS:
            self.outbound.labels(result)
        self.http_requests = Counter(
            "postkeep_http_requests", "Requests to the http listener, by endpoint and status",
            ["endpoint", "code"], registry=r)
        self.queue = Gauge(
            "postkeep_outbound_queue_messages",
            f"Messages waiting in the outbound queue (counted up to {QUEUE_COUNT_CAP})",
            registry=r)
        info = Gauge("postkeep_build_info", "postkeep version", ["version"], registry=r)
        info.labels(__version__).set(1)
        for service in Service:
            for result in LOGIN_RESULTS:
                self.logins.labels(service.value, result)
            self.plaintext_refused.labels(service.value)
            self.messages.labels(service.value)
            if service not in (Service.SMTP, Service.HTTP):  # port 25 greets at once
                for outcome in FIRST_BYTES:
                    self.first_bytes_seen.labels(service.value, outcome)

    # -- recording (called by the modules that see the events) ---------------------------
    def connection_opened(self, service: Service, tls_version: str | None) -> None:
        """A connection was accepted (net/listener). Also remembers its service for
        ``login()`` calls made while serving it."""
        _service.set(service.value)
        self.connections.labels(service.value, tls_label(tls_version)).inc()

    def connection_upgraded(self, service: Service, tls_version: str | None) -> None:
        """A connection that started in plaintext ended with TLS (STARTTLS/STLS)."""
        self.starttls.labels(service.value, tls_label(tls_version)).inc()

    def first_bytes(self, service: Service, outcome: str) -> None:
        """What a new connection sent before our greeting or handshake (net/listener):
        "tls", "silent", "plaintext" or "closed"."""
        label = outcome if outcome in FIRST_BYTES else UNKNOWN
        self.first_bytes_seen.labels(service.value, label).inc()

    def login(self, result: str, service: Service | str | None = None) -> None:
        """A login was decided (auth/service): ``result`` is "ok", "failed", "throttled"."""
        label = result if result in LOGIN_RESULTS else UNKNOWN
        self.logins.labels(_service_label(service), label).inc()

    def plaintext_login_refused(self, service: Service | str | None = None) -> None:
        """A client tried to log in before TLS and was refused (530 5.7.0 on 587,
        ``NO [PRIVACYREQUIRED]`` on 143, ``-ERR [AUTH]`` on 110). The drivers call it
        at most once per connection."""
        self.plaintext_refused.labels(_service_label(service)).inc()

    def message_accepted(self, service: Service | str | None = None) -> None:
        """A message was committed and acknowledged (SMTP 250 after DATA/BDAT, IMAP
        APPEND OK)."""
        self.messages.labels(_service_label(service)).inc()

    def outbound_result(self, result: str) -> None:
        """One recipient's delivery attempt ended (queue/scheduler)."""
        self.outbound.labels(result if result in OUTBOUND_RESULTS else UNKNOWN).inc()

    def http_request(self, endpoint: str, code: int) -> None:
        self.http_requests.labels(endpoint, str(code)).inc()

    # -- sources read at scrape time -----------------------------------------------------
    def watch(
        self,
        *,
        store: Store | None = None,
        open_connections: Callable[[], int] | None = None,
        certificate: Callable[[], CertInfo] | None = None,
    ) -> None:
        """Export values owned by other objects, read when ``/metrics`` is scraped."""
        self.registry.register(_Sources(store, open_connections, certificate))
        self._store = store

    async def refresh(self) -> None:
        """Update the gauges that need the store (async), just before a scrape."""
        if self._store is None:
            return
        async with self._store.read() as tx:
            rows = await tx.outbound(QUEUE_COUNT_CAP)
        self.queue.set(len(rows))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Sources(Collector):
    def __init__(
        self,
        store: Store | None,
        open_connections: Callable[[], int] | None,
        certificate: Callable[[], CertInfo] | None,
    ) -> None:
        self._store = store
        self._open = open_connections
        self._cert = certificate

    def collect(self) -> Iterable[Metric]:
        if self._store is not None:
            stats = self._store.stats
            yield CounterMetricFamily(
                "postkeep_store_write_transactions", "Write transactions run by the store",
                value=stats.write_transactions)
            yield CounterMetricFamily(
                "postkeep_store_commits", "Store commits (each is one fsync; group commit "
                "puts several write transactions in one)", value=stats.commits)
            yield CounterMetricFamily(
                "postkeep_store_commit_seconds", "Time spent committing (and fsyncing); "
                "divided by postkeep_store_commits_total it is the mean commit latency",
                value=stats.commit_seconds)
        if self._open is not None:
            yield GaugeMetricFamily(
                "postkeep_connections_open", "Connections open now, all mail services",
                value=self._open())
        if self._cert is not None:
            info = self._cert()
            yield GaugeMetricFamily(
                "postkeep_tls_certificate_expiry_seconds", "Seconds until the served "
                "certificate expires (negative: expired)",
                value=info.not_after.timestamp() - time.time())
            yield GaugeMetricFamily(
                "postkeep_tls_certificate_self_signed", "1 if the served certificate is "
                "self-signed", value=1 if info.self_signed else 0)
