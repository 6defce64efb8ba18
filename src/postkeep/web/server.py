"""The ``http`` listener: an aiohttp application on the configured ``[listeners] http``
addresses, in plain HTTP (``Mode.PLAIN``: DESIGN.md §1 puts it behind a reverse proxy,
which terminates HTTPS for ``autoconfig.<domain>``, ``autodiscover.<domain>`` and
``mta-sts.<domain>``).

Endpoints (all GET also answer HEAD):

=============================================  ===========================================
``/.well-known/autoconfig/mail/config-v1.1.xml``  Thunderbird clientConfig v1.1
``/mail/config-v1.1.xml``                      the same, as asked at ``autoconfig.<domain>``
``/autodiscover/autodiscover.xml`` (POST, GET)  Outlook POX autodiscover, any letter case
``/apple/postkeep.mobileconfig``               Apple Mail configuration profile
``/.well-known/mta-sts.txt``                   MTA-STS policy (RFC 8461 §3.2)
``/setup``                                     the settings page for people
``/metrics``                                   Prometheus text format
``/``                                          redirects to ``/setup``
=============================================  ===========================================

The domain a request is about is, in order: the domain of ``emailaddress`` (query, or
the autodiscover body) if we serve it; ``?domain=`` on ``/setup``; the domain in the
``Host`` header (``autoconfig.D``, ``autodiscover.D``, ``mta-sts.D`` or ``D``) if we
serve it; otherwise the first domain served (alphabetically).

Invariants:
- Read-only: no handler writes to the store or changes any state but the metrics.
- Bounded: request bodies (``MAX_BODY``), header lines, header count, handler time
  (``HANDLER_TIMEOUT``) and keep-alive time all have limits.
- Ports described to clients are the bound listeners' (``App.ports``), read per request.
- Exception text never reaches a client; a crash is logged and answered with a bare 500.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from postkeep import log
from postkeep.config.schema import Address, Config, Service
from postkeep.hints import Ports
from postkeep.store.api import Store
from postkeep.tls.policy import TlsPolicy
from postkeep.web import autoconfig, mta_sts, setup_page
from postkeep.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from postkeep.web.metrics import Metrics

logger = log.get_logger("web")

#: The largest request body accepted (an autodiscover request is well under 1 KiB).
MAX_BODY = 64 * 1024
#: The longest a handler may take (they read the store, nothing else).
HANDLER_TIMEOUT = 10.0
KEEPALIVE_TIMEOUT = 15.0
MAX_HEADER_LINE = 8190
MAX_HEADERS = 64
#: Host-name labels under which clients look for these endpoints.
HOST_PREFIXES = ("autoconfig.", "autodiscover.", "mta-sts.")

XML = "application/xml"
AUTODISCOVER_XML = "text/xml"  # what Exchange answers, and what Outlook expects
MOBILECONFIG = "application/x-apple-aspen-config"

#: A page with no script and nothing from elsewhere: inline CSS only.
SETUP_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebServer:
    """Binds the ``http`` addresses (``bind``), then serves them (``start``/``stop``)."""

    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        tls: TlsPolicy,
        ports: Callable[[], Ports],
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._store = store
        self._tls = tls
        self._ports = ports
        self._metrics = metrics
        self._sockets: list[socket.socket] = []
        self._runner: web.AppRunner | None = None

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def addresses(self) -> tuple[Address, ...]:
        return self._config.enabled(Service.HTTP)

    @property
    def port(self) -> int | None:
        """The first bound port (the configured one, or the kernel's choice for 0)."""
        return int(self._sockets[0].getsockname()[1]) if self._sockets else None

    def bind(self) -> None:
        """Bind every address now, so a port conflict fails start-up (app.py invariant)."""
        for address in self.addresses:
            self._sockets.append(_bind(address))

    async def start(self) -> None:
        if not self._sockets:
            self.bind()
        self._runner = web.AppRunner(
            self.application(),
            access_log=None,  # one "web.request" line per request, from the middleware
            handle_signals=False,
            shutdown_timeout=2.0,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_LINE,
            max_headers=MAX_HEADERS,
        )
        await self._runner.setup()
        for sock in self._sockets:
            await web.SockSite(self._runner, sock).start()
            host, port = sock.getsockname()[:2]
            logger.info(
                "listener.started",
                extra={"service": Service.HTTP.value, "mode": "plain",
                       "address": f"{host}:{port}"},
            )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        r = app.router
        r.add_get("/", self.root, name="root")
        r.add_get("/.well-known/autoconfig/mail/config-v1.1.xml", self.autoconfig,
                  name="autoconfig")
        r.add_get("/mail/config-v1.1.xml", self.autoconfig, name="autoconfig-host")
        # Outlook asks /autodiscover/autodiscover.xml and /Autodiscover/Autodiscover.xml;
        # paths are case-sensitive in aiohttp, so match both segments case-insensitively.
        ad = "/{_ad:(?i:autodiscover)}/{_adx:(?i:autodiscover\\.xml)}"
        r.add_post(ad, self.autodiscover, name="autodiscover")
        r.add_get(ad, self.autodiscover, name="autodiscover-get")
        r.add_get("/apple/postkeep.mobileconfig", self.mobileconfig, name="mobileconfig")
        r.add_get("/.well-known/mta-sts.txt", self.mta_sts, name="mta-sts")
        r.add_get("/setup", self.setup, name="setup")
        r.add_get("/metrics", self.metrics, name="metrics")
        return app

    # -- cross-cutting --------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "other"
        try:
            async with asyncio.timeout(HANDLER_TIMEOUT):
                response = await handler(request)
        except web.HTTPException as exc:  # 404, 405, 413, redirects: aiohttp renders them
            self._done(request, route, exc)
            raise
        except TimeoutError:
            logger.error("web.timeout", extra={"endpoint": route})
            response = web.Response(status=503, text="Service unavailable\n")
        except Exception:
            logger.exception("web.crashed", extra={"endpoint": route})
            response = web.Response(status=500, text="Internal server error\n")
        self._done(request, route, response)
        return response

    def _done(self, request: web.Request, route: str, response: web.StreamResponse) -> None:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        self._metrics.http_request(route, response.status)
        # The query string is left out: it may hold an address.
        logger.info(
            "web.request",
            extra={"method": request.method, "endpoint": route, "status": response.status,
                   "peer": request.remote or ""},
        )

    async def _domains(self) -> list[str]:
        async with self._store.read() as tx:
            return sorted(d.name for d in await tx.list_domains())

    def _domain(
        self, request: web.Request, domains: Sequence[str], address: str | None
    ) -> str:
        if address is not None and autoconfig.domain_of(address) in domains:
            return autoconfig.domain_of(address)
        hosted = host_domain(request.host, domains)
        if hosted is not None:
            return hosted
        if domains:
            return domains[0]
        # No domain added yet: the host name's parent is the best guess there is.
        return self._config.hostname.partition(".")[2] or self._config.hostname

    def _endpoints(self) -> list[autoconfig.Endpoint]:
        return autoconfig.endpoints(self._ports())

    # -- handlers -----------------------------------------------------------------------
    async def root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/setup")

    async def autoconfig(self, request: web.Request) -> web.StreamResponse:
        # ``emailaddress`` is optional (Thunderbird sends it; a hand-typed URL may not).
        address = autoconfig.valid_address(request.query.get("emailaddress"))
        domains = await self._domains()
        domain = self._domain(request, domains, address)
        body = autoconfig.thunderbird_config(
            hostname=self._config.hostname, domain=domain, domains=domains,
            eps=self._endpoints(),
        )
        return web.Response(body=body, content_type=XML, charset="utf-8",
                            headers={"Cache-Control": "public, max-age=3600"})

    async def autodiscover(self, request: web.Request) -> web.StreamResponse:
        headers = {"Cache-Control": "private, no-store"}
        raw: str | None
        if request.method == "POST":
            try:
                raw = autoconfig.parse_autodiscover_request(await request.read())
            except autoconfig.AutodiscoverRequestError as exc:
                logger.info("web.autodiscover.bad_request", extra={"reason": str(exc)})
                return web.Response(
                    status=400, body=autoconfig.autodiscover_error(600, "Invalid Request"),
                    content_type=AUTODISCOVER_XML, charset="utf-8", headers=headers)
            if raw is None:
                return web.Response(
                    body=autoconfig.autodiscover_error(600, "Invalid Request"),
                    content_type=AUTODISCOVER_XML, charset="utf-8", headers=headers)
        else:
            raw = request.query.get("emailaddress") or request.query.get("email")
        address = autoconfig.valid_address(raw)
        if raw and address is None:
            return web.Response(
                body=autoconfig.autodiscover_error(602, "Cannot find the email address"),
                content_type=AUTODISCOVER_XML, charset="utf-8", headers=headers)
        body = autoconfig.autodiscover_response(
            hostname=self._config.hostname, address=address, eps=self._endpoints(),
            display_name=address or self._domain(request, await self._domains(), None),
        )
        return web.Response(body=body, content_type=AUTODISCOVER_XML, charset="utf-8",
                            headers=headers)

    async def mobileconfig(self, request: web.Request) -> web.StreamResponse:
        raw = request.query.get("emailaddress")
        address = autoconfig.valid_address(raw)
        if raw and address is None:
            raise web.HTTPBadRequest(text="That is not an email address.\n")
        domain = self._domain(request, await self._domains(), address)
        body = autoconfig.apple_mobileconfig(
            hostname=self._config.hostname, domain=domain, address=address,
            eps=self._endpoints(),
        )
        if body is None:
            raise web.HTTPNotFound(text="No IMAP/POP3 and SMTP submission port is open.\n")
        filename = f"{domain}.mobileconfig"
        return web.Response(
            body=body, content_type=MOBILECONFIG,
            headers={"Cache-Control": "private, no-store",
                     "Content-Disposition": f'attachment; filename="{filename}"'},
        )

    async def mta_sts(self, request: web.Request) -> web.StreamResponse:
        host = normalize_host(request.host)
        if host.startswith("mta-sts.") and host_domain(host, await self._domains()) is None:
            raise web.HTTPNotFound(text="No MTA-STS policy for this domain.\n")
        hostname = self._config.hostname
        text = mta_sts.policy_text(
            mode=mta_sts.policy_mode(self._tls.cert_info, hostname), mx=hostname)
        # RFC 8461 §3.3: media type "text/plain"; senders cache by max_age, not by HTTP.
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"Cache-Control": "public, max-age=3600"})

    async def setup(self, request: web.Request) -> web.StreamResponse:
        domains = await self._domains()
        asked = request.query.get("domain", "").strip().lower().rstrip(".")
        if asked and asked not in domains:
            raise web.HTTPNotFound(
                text="This server does not handle mail for that domain.\n")
        domain = asked or self._domain(request, domains, None)
        cert = self._tls.cert_info
        page = setup_page.render(
            hostname=self._config.hostname, domain=domain, eps=self._endpoints(),
            other_domains=[d for d in domains if d != domain],
            self_signed_fingerprint=cert.fingerprint if cert.self_signed else None,
            # net/listener.py: with sniffing, 587/143/110 also take a first-byte handshake.
            implicit_also=self._config.security.tls_sniff_ms > 0,
        )
        return web.Response(text=page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache", **SETUP_HEADERS})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        await self._metrics.refresh()
        return web.Response(body=self._metrics.render(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE,
                                     "Cache-Control": "no-store"})


def normalize_host(host: str | None) -> str:
    """The ``Host`` header's name: lower case, without port or trailing dot."""
    if not host:
        return ""
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0].rstrip(".") if ":" in host else host.rstrip(".")


def host_domain(host: str | None, domains: Sequence[str]) -> str | None:
    """The served domain a ``Host`` header names: ``D``, or ``autoconfig.D`` and the like."""
    name = normalize_host(host)
    if name in domains:
        return name
    for prefix in HOST_PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in domains:
            return name[len(prefix):]
    return None


def _bind(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as net/listener
        sock.bind((address.host, address.port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
