"""The composition root: configuration → store → services → listeners; signals; shutdown.

Invariants:
- Everything is built here and passed in; no module keeps global state.
- Listeners are bound before anything is served, so a port conflict fails start-up
  with a clear error instead of half a server.
- SIGTERM: stop accepting, let in-flight transactions finish (bounded by
  ``limits.shutdown_grace``), interrupt idle sessions with a 421/BYE, close the store last.
- SIGHUP reloads the certificate; a broken new pair leaves the old one in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry

from postkeep import __version__, log
from postkeep.auth.exposure import PlaintextLeaks
from postkeep.auth.service import Authenticator
from postkeep.auth.throttle import Throttle
from postkeep.config.schema import SERVICE_PORTS, Config, Mode, Service
from postkeep.dns.resolver import DnsResolver
from postkeep.errors import ConfigError
from postkeep.hints import (
    IMPLICIT_HINTS,
    PREGREET_ERRORS,
    Ports,
    imap_starttls_first,
    pop3_stls_first,
    smtp_starttls_first,
)
from postkeep.imap import server as imap_server
from postkeep.imap.protocol import ImapServer
from postkeep.imap.protocol import Limits as ImapLimits
from postkeep.imap.responses import bye as imap_bye
from postkeep.imap.responses import encode_bytes as imap_encode
from postkeep.imap.selected import RecentClaims
from postkeep.imap.session import ImapSession
from postkeep.ingest import Ingest
from postkeep.net.listener import (
    ConnectionLimits,
    ConnectionTracker,
    ConnInfo,
    Handler,
    Listener,
)
from postkeep.net.stream import Stream
from postkeep.pop3 import replies as pop3_replies
from postkeep.pop3 import server as pop3_server
from postkeep.pop3.protocol import Limits as Pop3Limits
from postkeep.pop3.protocol import Pop3Server
from postkeep.pop3.session import Pop3Session
from postkeep.queue.deliver import Deliverer
from postkeep.queue.scheduler import Scheduler, node_holder_prefix
from postkeep.sasl.mechanisms import Credentials
from postkeep.smtp import replies as smtp_replies
from postkeep.smtp.mx import MxSession
from postkeep.smtp.protocol import Limits as SmtpLimits
from postkeep.smtp.protocol import Role, SmtpServer
from postkeep.smtp.server import serve as serve_smtp
from postkeep.smtp.session import SmtpSession
from postkeep.smtp.submission import SubmissionSession
from postkeep.store import make_store
from postkeep.store.api import Store
from postkeep.tls.policy import TlsContext, TlsPolicy
from postkeep.web.metrics import Metrics
from postkeep.web.server import WebServer

logger = log.get_logger("app")

SMTP_SERVICES = (Service.SMTP, Service.SUBMISSION, Service.SUBMISSIONS)


class App:
    def __init__(self, config: Config, *, store: Store | None = None) -> None:
        self.config = config
        self.store = store if store is not None else make_store(config)
        self.tls = TlsPolicy(config.tls)
        limits = config.auth
        self.throttle = Throttle(
            failures_before_delay=limits.failures_before_delay,
            max_delay=limits.max_delay,
            failures_before_lockout=limits.failures_before_lockout,
            lockout_seconds=limits.lockout_seconds,
        )
        # Its own registry, never prometheus_client's global one (web/metrics.py).
        self.metrics = Metrics(CollectorRegistry())
        self.auth = Authenticator(self.store, self.throttle, on_login=self.metrics.login,
                                  exposed_policy=config.security.exposed_password)
        self.ingest = Ingest(self.store, config.hostname)
        self.leaks = PlaintextLeaks(self.store, self.auth, self.ingest,
                                    hostname=config.hostname, ports=lambda: self.ports)
        self.imap_recent = RecentClaims()  # \Recent is per process (imap/selected.py)
        self.tracker = ConnectionTracker(
            ConnectionLimits(
                total=config.limits.connections_total, per_ip=config.limits.connections_per_ip
            )
        )
        self.listeners: list[Listener] = []
        self.web: WebServer | None = None
        self.ports = Ports({})
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.deliverer: Deliverer | None = None
        self.scheduler: Scheduler | None = None
        self._queue_task: asyncio.Task[None] | None = None

    # -- start ------------------------------------------------------------------------
    async def start(self) -> None:
        relay_password = self._relay_password()  # a config problem fails before binding
        if self.config.tls.legacy_clients:
            logger.warning("tls.legacy_clients_enabled", extra={"versions": "TLSv1 TLSv1.1"})
        for service in Service:
            if service is Service.HTTP:
                continue  # aiohttp, not a Listener: self.web (web/server.py), below
            handler = self._handler_for(service)
            if handler is None:
                continue
            _, mode = SERVICE_PORTS[service]
            # A client set to SSL/TLS on 587/143/110 is recognised (net/listener); port 25
            # greets at once: MX senders wait for the greeting, and SMTP has no
            # implicit-TLS port to match.
            pregreet = PREGREET_ERRORS.get(service, b"")
            sniff = self.config.security.tls_sniff_ms / 1000 if pregreet else 0.0
            for address in self.config.enabled(service):
                listener = Listener(
                    service=service,
                    mode=mode,
                    address=address,
                    handler=handler,
                    tracker=self.tracker,
                    tls=self._context_for(service),
                    hint_timeout=self.config.security.implicit_tls_hint_timeout,
                    sniff=sniff,
                    pregreet_error=pregreet,
                    metrics=self.metrics,
                    proxy_trusted=self.config.proxy_protocol.get(service),
                )
                listener.bind()
                self.listeners.append(listener)
        ports: dict[Service, int] = {}
        for listener in self.listeners:
            ports.setdefault(listener.service, listener.port)
        self.ports = Ports(ports)
        if self.config.enabled(Service.HTTP):
            self.web = WebServer(config=self.config, store=self.store, tls=self.tls,
                                 ports=lambda: self.ports, metrics=self.metrics)
            self.web.bind()
        self.metrics.watch(store=self.store, open_connections=lambda: self.tracker.total,
                           certificate=lambda: self.tls.cert_info)
        for listener in self.listeners:
            hint = IMPLICIT_HINTS.get(listener.service)
            if hint is not None:
                listener.plaintext_hint = hint(self.ports)
        await self.store.open()
        for listener in self.listeners:
            listener.start()
        if self.web is not None:
            await self.web.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self.tls.watch()))
        self._start_queue(relay_password)
        logger.info("server.started", extra={"hostname": self.config.hostname})

    # -- outbound queue ---------------------------------------------------------------
    def _relay_password(self) -> str | None:
        path = self.config.outbound.relay_password_file
        if path is None:
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
            raise ConfigError(self.config.path, "[outbound] relay_password_file",
                              f"cannot read {str(path)!r}: {why}") from None
        password = text.splitlines()[0] if text else ""
        if not password:
            raise ConfigError(self.config.path, "[outbound] relay_password_file",
                              f"{str(path)!r} is empty; put the relay password on its first line")
        return password

    def _start_queue(self, relay_password: str | None) -> None:
        """The outbound scheduler (queue/scheduler.py), after the store is open."""
        self.deliverer = Deliverer(
            config=self.config,
            resolver=DnsResolver(self.config.dns),
            tls=self.tls,
            relay_password=relay_password,
        )
        self.scheduler = Scheduler(
            store=self.store,
            deliverer=self.deliverer,
            ingest=self.ingest,
            hostname=self.config.hostname,
            config=self.config.outbound,
            holder_prefix=node_holder_prefix(self.config.data_dir, self.config.hostname),
            on_result=self.metrics.outbound_result,
        )
        self.ingest.on_enqueue = self.scheduler.wake
        self._queue_task = asyncio.get_running_loop().create_task(self.scheduler.run())

    def _context_for(self, service: Service) -> Callable[[], TlsContext]:
        return lambda: self.tls.server_context(service)

    def _handler_for(self, service: Service) -> Handler | None:
        if service in SMTP_SERVICES:
            return self._serve_smtp
        if service in (Service.POP3, Service.POP3S):
            return self._serve_pop3
        if service in (Service.IMAP, Service.IMAPS):
            return self._serve_imap
        return None

    # -- SMTP -------------------------------------------------------------------------
    async def _serve_smtp(self, stream: Stream, info: ConnInfo) -> None:
        if info.over_limit:
            stream.write(smtp_replies.TOO_BUSY.render())
            await stream.drain()
            return
        lim = self.config.limits
        role = Role.MX if info.service is Service.SMTP else Role.SUBMISSION
        core = SmtpServer(
            role=role,
            limits=SmtpLimits(
                line_length=lim.line_length,
                message_size=lim.message_size,
                recipients=lim.recipients,
                errors=lim.errors_per_session,
                commands=lim.commands_per_session,
            ),
            hostname=self.config.hostname,
            tls_active=stream.tls_active,
            tls_offered=info.mode is Mode.STARTTLS and not info.tls_sniffed,
            require_tls=info.service is Service.SUBMISSION,
            starttls_hint=smtp_starttls_first(self.ports),
        )
        session: SmtpSession
        if role is Role.MX:
            session = MxSession(core=core, info=info, stream=stream, ingest=self.ingest)
        else:
            session = SubmissionSession(
                core=core, info=info, stream=stream, ingest=self.ingest, auth=self.auth
            )
        session.on_accepted = self.metrics.message_accepted
        await serve_smtp(
            stream,
            core,
            session,
            tls_context=self._context_for(info.service),
            idle_timeout=lim.idle_timeout,
            data_timeout=lim.data_timeout,
            on_plaintext_refused=self._plaintext_refused(info),
            on_leaked=self._leaked(info),
        )

    # -- POP3 -------------------------------------------------------------------------
    async def _serve_pop3(self, stream: Stream, info: ConnInfo) -> None:
        if info.over_limit:
            stream.write(pop3_replies.TOO_BUSY.render())
            await stream.drain()
            return
        lim = self.config.limits
        core = Pop3Server(
            limits=Pop3Limits(
                line_length=max(lim.line_length, 255),  # RFC 2449 §4: at least 255
                errors=lim.errors_per_session,
                commands=lim.commands_per_session,
            ),
            tls_active=stream.tls_active,
            tls_offered=info.mode is Mode.STARTTLS and not info.tls_sniffed,
            require_tls=True,  # RFC 8314 §3, DESIGN.md §1: no password before TLS
            implementation=f"postkeep {__version__}",
            starttls_hint=pop3_stls_first(self.ports),
        )
        session = Pop3Session(
            core=core,
            info=info,
            store=self.store,
            auth=self.auth,
            holder=f"{self.config.hostname}/{os.getpid()}/{info.cid}",
            lock_ttl=self.config.limits.maildrop_lock,
            lock_refresh=self.config.limits.maildrop_lock / 4,
        )
        await pop3_server.serve(
            stream,
            core,
            session,
            tls_context=self._context_for(info.service),
            # RFC 1939 §3: at least 10 minutes, even if SMTP's idle_timeout is shorter.
            idle_timeout=max(pop3_server.IDLE_TIMEOUT, lim.idle_timeout),
            greeting=f"{self.config.hostname} POP3 server ready",
            on_plaintext_refused=self._plaintext_refused(info),
            on_leaked=self._leaked(info),
        )

    # -- IMAP -------------------------------------------------------------------------
    async def _serve_imap(self, stream: Stream, info: ConnInfo) -> None:
        if info.over_limit:
            stream.write(imap_encode(imap_bye("Too many connections, please try again later")))
            await stream.drain()
            return
        core = ImapServer(
            # APPENDLIMIT (RFC 7889) is the message size; an IMAP number is 32-bit.
            limits=ImapLimits(max_literal=min(self.config.limits.message_size, 2**32 - 1)),
            tls_active=stream.tls_active,
            tls_offered=info.mode is Mode.STARTTLS and not info.tls_sniffed,
            require_tls=True,  # RFC 8314 §3, DESIGN.md §1: LOGINDISABLED until TLS
            starttls_hint=imap_starttls_first(self.ports),
        )
        session = ImapSession(
            core=core,
            info=info,
            store=self.store,
            ingest=self.ingest,
            auth=self.auth,
            recent=self.imap_recent,
        )
        session.on_accepted = self.metrics.message_accepted
        await imap_server.serve(
            stream,
            core,
            session,
            self.store,
            tls_context=self._context_for(info.service),
            preauth_timeout=self.config.limits.idle_timeout,
            on_plaintext_refused=self._plaintext_refused(info),
            on_leaked=self._leaked(info),
        )

    def _leaked(self, info: ConnInfo) -> Callable[[Credentials], Awaitable[None]]:
        """For a driver: credentials refused before TLS; mark the account if they were
        right (auth/exposure.py)."""

        async def check(creds: Credentials) -> None:
            await self.leaks.check(creds, info.peer_ip, info.service)

        return check

    def _plaintext_refused(self, info: ConnInfo) -> Callable[[], None]:
        """For a driver: a login (or, on 587, mail) was refused because TLS had not
        started. Counted once per connection."""
        done = False

        def record() -> None:
            nonlocal done
            if not done:
                done = True
                logger.info("auth.refused_before_tls")
                self.metrics.plaintext_login_refused(info.service)

        return record

    # -- run and stop -----------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.tls.reload)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await self._stop.wait()
        await self.stop()

    async def stop(self) -> None:
        logger.info("server.stopping")
        for listener in self.listeners:
            await listener.stop_accepting()
        if self.web is not None:
            await self.web.stop()
        for stream in list(self.tracker.streams):
            stream.interrupt_idle()
        pending = set(self.tracker.tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.config.limits.shutdown_grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=2.0)
        if self._queue_task is not None:
            # Interrupted deliveries keep what they recorded; their leases are released,
            # so the next start delivers the rest at once (queue/scheduler.py).
            self._queue_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._queue_task
        if self.deliverer is not None:
            await self.deliverer.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()
        stats = self.store.stats
        logger.info(
            "server.stopped",
            extra={"write_transactions": stats.write_transactions, "commits": stats.commits},
        )


async def serve_forever(config: Config) -> None:
    app = App(config)
    await app.start()
    app.install_signal_handlers()
    await app.run()
