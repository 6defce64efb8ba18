"""Outbound delivery of one message: find the receiving host, secure the connection as the
destination's policy demands, run one SMTP transaction, report per recipient.

The scheduler calls ``Deliverer.deliver(sender, recipients, message)`` and turns the
``AttemptReport`` into retries, bounces and delay notices; this module never retries later
by itself and never raises for network trouble.

Direct MX mode (no ``[outbound] relay``):

1. MTA-STS (RFC 8461, ``mta_sts.py``) and ``require_tls`` decide the requirement: verified
   TLS or not, and (enforce) which MX names are acceptable.
2. MX lookup (RFC 5321 §5.1): preference order, equal preferences shuffled; no MX → the
   domain itself (implicit MX); ``MX 0 .`` → permanent failure (RFC 7505); NXDOMAIN →
   permanent failure; our own name in the list drops it and everything less preferred.
3. Per host and address: connect to ``mx_port``; a refused connection, a 4xx/5xx greeting
   or EHLO, or a TLS failure where TLS is required moves on to the next address/host.
4. TLS: STARTTLS whenever offered (RFC 3207, RFC 7435). We first try a context that
   verifies the chain and the MX name (RFC 7817 §3, RFC 8461 §4.2) so the report can say
   ``verified``; if that handshake fails and nothing requires verification, we reconnect
   with the opportunistic context (no checks); if that fails too, once more in plaintext.
   Where verified TLS is required, there is no second try and never plaintext.
5. The transaction: MAIL, RCPT…, DATA — pipelined when offered (RFC 2920) — and the
   content; RCPT replies become per-recipient results, the DATA-phase reply applies to
   every accepted recipient.

Relay mode (``relay = "host:port"``): every message goes to the smarthost, over implicit
TLS (``relay_security = "tls"``, RFC 8314) or STARTTLS (``"starttls"``), in both cases with
a certificate verified for the relay's name; AUTH PLAIN (or LOGIN) only after that. A
relay that refuses our credentials gives a *deferral*, not a bounce: the operator fixes
``relay_username``/``relay_password_file`` and the queue delivers, instead of every message
of the outage bouncing.

Connections are reused: after a message the connection waits ``Timeouts.idle`` seconds
for the next one to the same host, which starts with RSET (RFC 5321 §4.1.1.5); a
connection is reused only for deliveries whose TLS requirement it meets.

Invariants:
- ``deliver()`` never raises for network, DNS or protocol trouble: every recipient gets a
  ``RecipientResult``. ``permanent`` is true only for a 5xx reply or a definite answer
  that the destination cannot take mail (null MX, NXDOMAIN, no MX and no address, a mail
  loop, an SMTPUTF8 or SIZE refusal announced by the server).
- Where TLS is required (MTA-STS enforce, ``require_tls``, relay) mail and credentials go
  only over TLS whose certificate verified for the host name we meant to reach; otherwise
  the attempt is a deferral (code 0). Never plaintext, never a host outside the policy.
- AUTH is sent only to a relay, only after verified TLS; the password is never logged.
- Bytes a server sends after its 220 to STARTTLS are dropped and logged, never parsed.
- Every wait has a bound: connect (``connect_timeout``), TLS handshake, and each reply
  (RFC 5321 §4.5.3.2); replies are bounded in size by the client core.
- Logs carry host, address, TLS, verification and reply codes: never message content or
  a password.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

from postkeep import log
from postkeep.config.schema import Config
from postkeep.dns.resolver import DnsTemporaryError, DomainNotFound, NullMX, Resolver
from postkeep.net.stream import Stream
from postkeep.queue.mta_sts import MtaSts, StsPolicy
from postkeep.smtp.client import (
    NEED_DATA,
    ConnectionClosed,
    ProtocolError,
    Response,
    SmtpClient,
    State,
    has_bare_line_endings,
    reply_text,
)
from postkeep.smtp.replies import Reply
from postkeep.tls.policy import TlsContext, TlsPolicy, describe

logger = log.get_logger("queue")

#: Connection attempts per delivery, over all hosts and addresses (Postfix's default
#: smtp_mx_address_limit is 5; a few more cover dual-stack hosts).
MAX_CONNECTIONS = 10
#: Messages over one connection before it is closed and a new one opened.
MAX_MESSAGES_PER_CONNECTION = 100
#: How long a host whose certificate did not verify is not asked to verify again
#: (saves a second connection per message in opportunistic mode).
UNVERIFIABLE_MEMORY = 3600.0
#: Content is written in blocks; each block has its own timeout (RFC 5321 §4.5.3.2.5).
DATA_BLOCK = 64 * 1024


@dataclass(frozen=True, slots=True)
class RecipientResult:
    recipient: str
    code: int  # the remote reply code for this recipient, 0 if none (connection/TLS/policy)
    text: str  # remote text with its enhanced code, or our reason
    permanent: bool  # 5xx, null MX, NXDOMAIN, ...; False for 4xx, failures, deferrals

    @property
    def delivered(self) -> bool:
        """2xx at the end of data: the receiver took responsibility (RFC 5321 §6.1)."""
        return 200 <= self.code < 300


@dataclass(frozen=True, slots=True)
class AttemptReport:
    results: tuple[RecipientResult, ...]
    host: str | None  # the MX or relay host that answered
    tls: str | None  # describe() of the TLS session; None if plaintext or no session
    verified: bool  # certificate chain and host name verified


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds for each wait. Reply timeouts are RFC 5321 §4.5.3.2's minimums."""

    greeting: float = 300.0  # §4.5.3.2.1: initial 220
    command: float = 300.0  # EHLO, STARTTLS, AUTH, RSET (not listed; as MAIL)
    mail: float = 300.0  # §4.5.3.2.2
    rcpt: float = 300.0  # §4.5.3.2.3
    data_init: float = 120.0  # §4.5.3.2.4: the 354
    data_block: float = 180.0  # §4.5.3.2.5: each block of content written
    data_end: float = 600.0  # §4.5.3.2.6: the reply after the final dot
    tls_handshake: float = 60.0
    quit: float = 5.0  # the 221 is a courtesy; do not wait long
    idle: float = 5.0  # an unused connection stays open this long for the next message


@dataclass(frozen=True, slots=True)
class _Requirement:
    verified_tls: bool  # TLS with a certificate verified for the host name
    sts: StsPolicy | None  # MTA-STS policy in enforce or testing mode
    reason: str  # why TLS is required, for texts and logs

    @property
    def enforce(self) -> bool:
        return self.sts is not None and self.sts.mode == "enforce"


_OPPORTUNISTIC = _Requirement(False, None, "")


class _Failed(Exception):
    """A host could not be used (before any transaction); try the next one."""

    def __init__(self, reason: str, *, tls: bool = False, final: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tls = tls  # a TLS failure: in opportunistic mode, try the next TLS level
        self.final = final  # retrying another address would not help (relay only)


class _StartTlsRefused(_Failed):
    """A 4xx/5xx to STARTTLS: the session goes on in plaintext (RFC 3207 §4)."""


class _Lost(Exception):
    """The connection broke (EOF, timeout, unframable reply, 421) during a command."""

    def __init__(self, reason: str, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class _Connection:
    """A ``Stream`` and a client core to one host, with the facts the report needs."""

    def __init__(
        self, stream: Stream, core: SmtpClient, *, host: str, address: str, port: int,
    ) -> None:
        self.stream = stream
        self.core = core
        self.host = host
        self.address = address
        self.port = port
        self.tls: str | None = None
        self.verified = False
        self.messages = 0
        self.broken = False
        self.idle_handle: asyncio.TimerHandle | None = None
        obj = stream.ssl_object
        if obj is not None:  # implicit TLS
            self.tls = describe(obj)

    @property
    def peer(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"

    async def send(self, data: bytes, timeout: float) -> None:
        try:
            for start in range(0, len(data), DATA_BLOCK):
                self.stream.write(data[start : start + DATA_BLOCK])
                await asyncio.wait_for(self.stream.drain(), timeout)
        except (TimeoutError, OSError) as exc:
            self.broken = True
            raise _Lost(f"sending to {self.peer} failed: {type(exc).__name__}") from None

    async def response(self, timeout: float) -> Response:
        while True:
            try:
                event = self.core.next_event()
            except ProtocolError as exc:
                self.broken = True
                raise _Lost(f"{self.peer} sent an invalid reply ({exc})") from None
            if event is NEED_DATA:
                try:
                    data = await self.stream.read(timeout)
                except TimeoutError:
                    self.broken = True
                    raise _Lost(f"no reply from {self.peer} within {timeout:g} s") from None
                except OSError as exc:
                    self.broken = True
                    raise _Lost(f"reading from {self.peer} failed: {exc}") from None
                self.core.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                self.broken = True
                raise _Lost(f"{self.peer} closed the connection")
            assert isinstance(event, Response)
            if self.core.state is State.CLOSED:
                self.broken = True  # 421 (RFC 5321 §3.8): the caller still sees the reply
            return event

    async def command(self, data: bytes, timeout: float) -> Response:
        await self.send(data, timeout)
        return await self.response(timeout)

    async def upgrade(self, ctx: TlsContext, server_hostname: str, timeout: float) -> int:
        """The client half of STYLE.md's four STARTTLS steps; returns bytes dropped.

        The 220 has been read. 1. stop reading; 2. drop whatever the core and the stream
        hold: the server sent it after its 220 and before TLS (response injection); 3. the
        handshake. Bytes still in the kernel go to the TLS layer and fail it, safely.
        """
        self.stream.pause_reading()
        dropped = self.core.start_tls() + self.stream.take_buffer()
        if dropped:
            logger.warning(
                "queue.starttls.plaintext_dropped",
                extra={"host": self.host, "address": self.address, "bytes": len(dropped)},
            )
        try:
            await self.stream.start_tls_client(ctx, server_hostname, timeout)
        except BaseException:
            self.broken = True  # asyncio closed the transport; no QUIT is possible
            raise
        obj = self.stream.ssl_object
        self.tls = describe(obj) if obj is not None else "TLS"
        return len(dropped)

    async def quit(self, timeout: float) -> None:
        """RFC 5321 §4.1.1.10: QUIT when the connection is still sound, then close."""
        if not self.broken and self.core.state is not State.CLOSED and not self.core.pending:
            try:
                await self.command(self.core.quit(), timeout)
            except (_Lost, RuntimeError):
                pass
        self.close()

    def close(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.broken = True
        self.stream.close()


def _result(recipient: str, reply: Reply) -> RecipientResult:
    return RecipientResult(recipient, reply.code, reply_text(reply), reply.code >= 500)


def _all(
    recipients: Sequence[str], text: str, *, permanent: bool, host: str | None = None,
) -> AttemptReport:
    results = tuple(RecipientResult(r, 0, text, permanent) for r in recipients)
    return AttemptReport(results, host, None, False)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_relay(relay: str) -> tuple[str, int]:
    """``"smtp.example.com:587"`` or ``"[2001:db8::1]:465"`` → (host, port)."""
    if relay.startswith("["):
        host, _, rest = relay[1:].partition("]")
        port_text = rest[1:]
    else:
        host, _, port_text = relay.rpartition(":")
    if not host or not port_text.isdigit():
        raise ValueError(f"relay must be host:port, not {relay!r}")
    return host.lower(), int(port_text)


class Deliverer:
    """Delivers messages to other servers; one per process, shared by the scheduler."""

    def __init__(
        self,
        *,
        config: Config,
        resolver: Resolver,
        tls: TlsPolicy,
        relay_password: str | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        self._config = config
        self._out = config.outbound
        self._resolver = resolver
        self._tls = tls
        self._relay_password = relay_password
        self._timeouts = timeouts or Timeouts()
        self._relay = parse_relay(self._out.relay) if self._out.relay else None
        self._require_tls = frozenset(d.lower().rstrip(".") for d in self._out.require_tls)
        self._verify_ctx: TlsContext | None = None
        self._opportunistic_ctx: TlsContext | None = None
        self._unverifiable: dict[str, float] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sts = MtaSts(
            resolver=resolver, tls_context=self._verifying_context, port=self._out.mta_sts_port,
        )

    # -- TLS contexts ----------------------------------------------------------------------
    def _verifying_context(self) -> TlsContext:
        """Chain and name checked (RFC 7817 §3), against the system CAs plus ``ca_file``."""
        if self._verify_ctx is None:
            self._verify_ctx = self._tls.client_context("verify", cafile=self._out.ca_file)
        return self._verify_ctx

    def _context(self, level: str) -> TlsContext:
        if level == "verify":
            return self._verifying_context()
        if self._opportunistic_ctx is None:
            self._opportunistic_ctx = self._tls.client_context("opportunistic")
        return self._opportunistic_ctx

    # -- the entry point -----------------------------------------------------------------
    async def deliver(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> AttemptReport:
        """One attempt for ``recipients``: one destination domain in MX mode, any domains
        in relay mode. Never raises for network problems (see the module docstring)."""
        recipients = list(recipients)
        if not recipients:
            return AttemptReport((), None, None, False)
        domains = {r.rpartition("@")[2].lower() for r in recipients}
        if self._relay is None and len(domains) != 1:
            raise ValueError("in MX mode, deliver() takes recipients of one domain")
        if has_bare_line_endings(message):
            logger.info("queue.delivery.line_endings_normalised", extra={"bytes": len(message)})
        try:
            if self._relay is not None:
                return await self._deliver_relay(sender, recipients, message, *self._relay)
            return await self._deliver_mx(sender, recipients, message, domains.pop())
        except Exception:
            # A bug must not lose the message: it stays queued and is retried.
            logger.exception("queue.delivery.crashed")
            return _all(recipients, "4.3.0 internal error during delivery (see the log)",
                        permanent=False)

    async def close(self) -> None:
        """Close idle connections (with QUIT) and the MTA-STS HTTP session."""
        conns = [c for pool in self._idle.values() for c in pool]
        self._idle.clear()
        for conn in conns:
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
        await asyncio.gather(*(c.quit(self._timeouts.quit) for c in conns),
                             *self._closing, return_exceptions=True)
        for conn in conns:
            await conn.stream.wait_closed(self._timeouts.quit)
        await self._sts.close()

    # -- direct MX -----------------------------------------------------------------------
    async def _requirement(self, domain: str) -> _Requirement:
        policy = await self._sts.policy(domain)
        if policy is not None and policy.mode == "enforce":
            return _Requirement(True, policy, f"the MTA-STS policy of {domain} (mode enforce)")
        if domain in self._require_tls:
            return _Requirement(True, None, f"require_tls for {domain}")
        if policy is not None and policy.mode == "testing":
            return _Requirement(False, policy, f"the MTA-STS policy of {domain} (mode testing)")
        return _OPPORTUNISTIC

    async def _mx_hosts(self, domain: str) -> list[str]:
        """RFC 5321 §5.1: the hosts to try, best first. Raises NullMX, DomainNotFound,
        DnsTemporaryError, or _Failed(final=True) for a definite "no mail here"."""
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]  # RFC 5321 §4.1.3 address literal: no MX lookup
            return [literal[5:] if literal.lower().startswith("ipv6:") else literal]
        records = await self._resolver.mx(domain)
        if not records:
            # §5.1: no MX records: the domain itself is the implicit MX, if it has an address.
            if not await self._resolver.addresses(domain):
                raise _Failed(f"5.1.2 {domain} has no MX and no address records", final=True)
            return [domain]
        by_pref: dict[int, list[str]] = {}
        for pref, host in records:
            by_pref.setdefault(pref, []).append(host)
        hosts: list[str] = []
        own = self._config.hostname.lower().rstrip(".")
        for pref in sorted(by_pref):
            group = by_pref[pref]
            if own in group:
                # §5.1: we are an MX: discard our record and every less preferred one.
                if not hosts:
                    raise _Failed(f"5.4.6 mail for {domain} loops back to this server",
                                  final=True)
                break
            random.shuffle(group)  # §5.1: spread the load over equal preferences
            hosts.extend(group)
        return hosts

    async def _deliver_mx(
        self, sender: str, recipients: list[str], message: bytes, domain: str
    ) -> AttemptReport:
        req = await self._requirement(domain)
        try:
            hosts = await self._mx_hosts(domain)
        except NullMX:
            return _all(recipients, f"5.1.10 {domain} accepts no mail (null MX, RFC 7505)",
                        permanent=True)
        except DomainNotFound:
            return _all(recipients, f"5.1.2 domain {domain} does not exist", permanent=True)
        except DnsTemporaryError as exc:
            return self._deferred(domain, recipients, f"4.4.3 DNS: {exc}")
        except _Failed as exc:
            return _all(recipients, exc.reason, permanent=True)
        if req.sts is not None:
            matching = [h for h in hosts if req.sts.matches(h)]
            if req.enforce:
                if not matching:
                    return self._deferred(
                        domain, recipients,
                        f"4.7.5 no MX host of {domain} ({', '.join(hosts)}) matches "
                        f"{req.reason} (mx: {', '.join(req.sts.mx)}); not delivering to "
                        "an unlisted host",
                    )
                hosts = matching  # RFC 8461 §4.1: only listed hosts
            elif len(matching) < len(hosts):
                logger.info("queue.mta_sts.testing_mismatch",
                            extra={"domain": domain, "unlisted": ",".join(
                                h for h in hosts if h not in matching)})
        failures: list[str] = []
        budget = MAX_CONNECTIONS
        port = self._out.mx_port
        for host in hosts:
            conn = await self._checkout(("mx", host, port), req.verified_tls)
            if conn is None:
                try:
                    addresses = [host] if _is_ip(host) else await self._resolver.addresses(host)
                except DnsTemporaryError as exc:
                    failures.append(str(exc))
                    continue
                if not addresses:
                    failures.append(f"MX host {host} has no address")
                for address in addresses:
                    if budget <= 0:
                        break
                    budget -= 1
                    try:
                        conn = await self._connect_mx(host, address, port, req)
                        break
                    except _Failed as exc:
                        logger.info("queue.delivery.host_failed",
                                    extra={"domain": domain, "host": host, "address": address,
                                           "reason": exc.reason})
                        failures.append(exc.reason)
            if conn is not None:
                return await self._run(conn, domain, req, sender, recipients, message)
        text = "; ".join(failures[-3:]) or "no MX host could be tried"
        if req.verified_tls:
            text = f"{req.reason} requires TLS with a verified certificate: {text}"
        return self._deferred(domain, recipients, f"4.4.1 {text}")

    async def _connect_mx(
        self, host: str, address: str, port: int, req: _Requirement
    ) -> _Connection:
        """A greeted connection, EHLO done, TLS as required. Raises _Failed."""
        if req.verified_tls:
            levels = ["verify"]
        else:
            known_bad = self._unverifiable.get(host, 0.0) > time.monotonic()
            levels = ([] if known_bad else ["verify"]) + ["opportunistic", "plain"]
        last: _Failed | None = None
        for level in levels:
            conn = await self._open(host, address, port)
            try:
                await self._hello(conn)
                if not conn.core.supports("STARTTLS"):
                    if req.verified_tls:
                        raise _Failed(f"{conn.peer} does not offer STARTTLS")
                    return conn  # nothing to negotiate: plaintext (RFC 3207 §4)
                if level == "plain":
                    return conn  # the one plaintext retry after a failed handshake
                try:
                    await self._starttls(conn, level, host)
                except _StartTlsRefused as exc:
                    if req.verified_tls:
                        raise
                    # RFC 3207 §4: after a refusal the session continues in plaintext;
                    # reconnecting would only be refused again.
                    logger.info("queue.delivery.starttls_refused",
                                extra={"host": host, "address": address, "reason": exc.reason})
                    return conn
                return conn
            except _Failed as exc:
                await conn.quit(self._timeouts.quit)
                if req.verified_tls or not exc.tls:
                    raise
                last = exc
                logger.info("queue.delivery.tls_fallback",
                            extra={"host": host, "address": address, "level": level,
                                   "reason": exc.reason})
        assert last is not None
        raise last

    async def _starttls(self, conn: _Connection, level: str, server_hostname: str) -> None:
        t = self._timeouts
        try:
            r = await conn.command(conn.core.starttls(), t.command)
        except _Lost as exc:
            raise _Failed(exc.reason) from None
        if r.reply.code != 220:
            if conn.core.state is State.CLOSED:
                raise _Failed(f"{conn.peer} closed the connection at STARTTLS: "
                              f"{r.reply.code} {reply_text(r.reply)}")
            raise _StartTlsRefused(
                f"{conn.peer} refused STARTTLS: {r.reply.code} {reply_text(r.reply)}")
        try:
            await conn.upgrade(self._context(level), server_hostname, t.tls_handshake)
        except ssl.SSLCertVerificationError as exc:
            self._verify_failed(level, server_hostname)
            raise _Failed(
                f"certificate of {conn.peer} did not verify for {server_hostname}: "
                f"{exc.verify_message}", tls=True,
            ) from None
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self._verify_failed(level, server_hostname)
            raise _Failed(f"TLS handshake with {conn.peer} failed: {type(exc).__name__}",
                          tls=True) from None
        conn.verified = level == "verify"
        try:
            await self._ehlo(conn)  # RFC 3207 §4.2: everything learnt before is forgotten
        except _Failed as exc:
            # With TLS 1.3 a server that rejects the handshake (a client certificate it
            # wanted, say) says so only after our side finished: count it as TLS failing.
            raise _Failed(exc.reason, tls=True) from None

    def _verify_failed(self, level: str, host: str) -> None:
        """Remember for a while that ``host`` cannot do verified TLS (a TLS 1.2 floor and
        a valid certificate): opportunistic deliveries then skip the verifying attempt."""
        if level != "verify":
            return
        now = time.monotonic()
        if len(self._unverifiable) > 10_000:
            self._unverifiable = {h: t for h, t in self._unverifiable.items() if t > now}
        self._unverifiable[host] = now + UNVERIFIABLE_MEMORY

    # -- relay ---------------------------------------------------------------------------
    async def _deliver_relay(
        self, sender: str, recipients: list[str], message: bytes, host: str, port: int,
    ) -> AttemptReport:
        req = _Requirement(True, None, f"relay {host}:{port}")
        conn = await self._checkout(("relay", host, port), True)
        label = f"relay {host}:{port}"
        failures: list[str] = []
        if conn is None:
            try:
                addresses = [host] if _is_ip(host) else await self._resolver.addresses(host)
            except DnsTemporaryError as exc:
                return self._deferred(label, recipients, f"4.4.3 DNS: {exc}")
            if not addresses:
                return self._deferred(label, recipients, f"4.4.1 relay host {host} has no address")
            for address in addresses[:MAX_CONNECTIONS]:
                try:
                    conn = await self._connect_relay(host, address, port)
                    break
                except _Failed as exc:
                    logger.info("queue.delivery.relay_failed",
                                extra={"host": host, "address": address, "reason": exc.reason})
                    failures.append(exc.reason)
                    if exc.final:
                        break
        if conn is None:
            return self._deferred(label, recipients, "4.4.1 " + "; ".join(failures[-3:]))
        return await self._run(conn, label, req, sender, recipients, message)

    async def _connect_relay(self, host: str, address: str, port: int) -> _Connection:
        implicit = self._out.relay_security == "tls"
        conn = await self._open(host, address, port, implicit=implicit)
        try:
            if implicit:
                conn.verified = True  # the handshake verified chain and name, or failed
            await self._hello(conn)
            if not implicit:
                if not conn.core.supports("STARTTLS"):
                    raise _Failed(
                        f"relay {conn.peer} does not offer STARTTLS, which relay_security = "
                        '"starttls" requires: not sending credentials or mail in plaintext',
                        final=True,
                    )
                await self._starttls(conn, "verify", host)
            if self._out.relay_username:
                await self._authenticate(conn)
        except _Failed:
            await conn.quit(self._timeouts.quit)
            raise
        return conn

    async def _authenticate(self, conn: _Connection) -> None:
        """RFC 4954 AUTH over verified TLS; a refusal is a deferral (module docstring)."""
        user, password = self._out.relay_username, self._relay_password
        if password is None:
            raise _Failed("relay_username is set but no relay password was given "
                          "(relay_password_file)", final=True)
        core, t = conn.core, self._timeouts
        assert conn.verified and core.tls_active
        mechanisms = core.auth_mechanisms
        try:
            if "PLAIN" in mechanisms:
                r = await conn.command(core.auth_plain(user, password), t.command)
            elif "LOGIN" in mechanisms:
                r = await conn.command(core.auth_login(user, password), t.command)
                for _ in range(3):
                    if r.reply.code != 334:
                        break
                    r = await conn.command(core.auth_continue(), t.command)
            else:
                raise _Failed(f"relay {conn.peer} offers no AUTH mechanism we speak "
                              f"(PLAIN, LOGIN); it offers: {' '.join(sorted(mechanisms))}",
                              final=True)
        except _Lost as exc:
            raise _Failed(exc.reason) from None
        if r.reply.code != 235:
            raise _Failed(
                f"relay {conn.peer} refused authentication as {user}: {r.reply.code} "
                f"{reply_text(r.reply)} (check relay_username and relay_password_file; "
                "the message stays queued)", final=True,
            )
        logger.info("queue.relay.authenticated", extra={"host": conn.host, "user": user})

    # -- connections ---------------------------------------------------------------------
    async def _open(
        self, host: str, address: str, port: int, *, implicit: bool = False
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        ctx = self._verifying_context() if implicit else None
        where = f"{host}[{address}]:{port}"
        try:
            _, stream = await asyncio.wait_for(
                loop.create_connection(
                    Stream, address, port, ssl=ctx,
                    server_hostname=host if ctx is not None else None,
                    ssl_handshake_timeout=self._timeouts.tls_handshake if ctx else None,
                ),
                self._out.connect_timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise _Failed(f"certificate of {where} did not verify for {host}: "
                          f"{exc.verify_message}", tls=True) from None
        except ssl.SSLError as exc:
            raise _Failed(f"TLS handshake with {where} failed: {exc.reason or exc}",
                          tls=True) from None
        except TimeoutError:
            raise _Failed(f"cannot connect to {where}: timed out") from None
        except OSError as exc:
            raise _Failed(f"cannot connect to {where}: {exc.strerror or exc}") from None
        core = SmtpClient(hostname=self._config.hostname, tls_active=ctx is not None)
        return _Connection(stream, core, host=host, address=address, port=port)

    async def _hello(self, conn: _Connection) -> None:
        """The 220 greeting (RFC 5321 §3.1), then EHLO. Raises _Failed."""
        try:
            r = await conn.response(self._timeouts.greeting)
        except _Lost as exc:
            raise _Failed(exc.reason) from None
        if r.reply.code != 220:
            # §3.1: a 554 greeting (or a 4xx) refuses the session, not our recipients.
            raise _Failed(f"{conn.peer} greeted with {r.reply.code} {reply_text(r.reply)}")
        await self._ehlo(conn)

    async def _ehlo(self, conn: _Connection) -> None:
        t = self._timeouts
        try:
            r = await conn.command(conn.core.ehlo(), t.command)
            if not r.reply.positive and conn.core.state is not State.CLOSED:
                r = await conn.command(conn.core.helo(), t.command)  # RFC 5321 §3.2
        except _Lost as exc:
            raise _Failed(exc.reason) from None
        if not r.reply.positive:
            raise _Failed(f"{conn.peer} refused EHLO/HELO: {r.reply.code} {reply_text(r.reply)}")

    async def _checkout(self, key: tuple[str, str, int], verified: bool) -> _Connection | None:
        """An idle connection to the host that meets the requirement, after a good RSET."""
        pool = self._idle.get(key, [])
        for conn in list(pool):
            if verified and not conn.verified:
                continue
            pool.remove(conn)
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            try:
                # RFC 5321 §4.1.1.5: a clean slate for the next transaction.
                r = await conn.command(conn.core.rset(), self._timeouts.command)
                if r.reply.positive:
                    return conn
            except _Lost:
                pass
            conn.close()
        return None

    def _checkin(self, conn: _Connection, key: tuple[str, str, int]) -> None:
        if (conn.broken or conn.core.state is State.CLOSED
                or conn.messages >= MAX_MESSAGES_PER_CONNECTION):
            self._spawn_quit(conn)
            return
        self._idle.setdefault(key, []).append(conn)
        loop = asyncio.get_running_loop()
        conn.idle_handle = loop.call_later(self._timeouts.idle, self._expire, conn, key)

    def _expire(self, conn: _Connection, key: tuple[str, str, int]) -> None:
        conn.idle_handle = None
        pool = self._idle.get(key, [])
        if conn in pool:
            pool.remove(conn)
            self._spawn_quit(conn)

    def _spawn_quit(self, conn: _Connection) -> None:
        task = asyncio.get_running_loop().create_task(conn.quit(self._timeouts.quit))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- the transaction -----------------------------------------------------------------
    async def _run(
        self, conn: _Connection, domain: str, req: _Requirement, sender: str,
        recipients: list[str], message: bytes,
    ) -> AttemptReport:
        if req.sts is not None and not req.enforce and not conn.verified:
            # RFC 8461 §5: testing mode delivers anyway; the failure is only reported.
            logger.info("queue.mta_sts.testing_failure",
                        extra={"domain": domain, "host": conn.host, "tls": conn.tls or "none"})
        reused = conn.messages > 0
        results = await self._transaction(conn, sender, recipients, message)
        conn.messages += 1
        report = AttemptReport(tuple(results), conn.host, conn.tls, conn.verified)
        logger.info(
            "queue.delivery.attempt",
            extra={"domain": domain, "host": conn.host, "address": conn.address,
                   "port": conn.port, "tls": conn.tls or "none", "verified": conn.verified,
                   "reused": reused, "codes": ",".join(str(r.code) for r in results)},
        )
        key = ("relay" if self._relay is not None else "mx", conn.host, conn.port)
        self._checkin(conn, key)
        return report

    async def _transaction(
        self, conn: _Connection, sender: str, recipients: list[str], message: bytes,
    ) -> list[RecipientResult]:
        core, t = conn.core, self._timeouts
        n = len(recipients)
        utf8 = not sender.isascii() or not all(r.isascii() for r in recipients)
        if utf8 and not core.supports("SMTPUTF8"):
            # RFC 6531 §3.2: without SMTPUTF8 there is no way to send these addresses.
            return [RecipientResult(r, 0, f"5.6.7 {conn.host} does not support SMTPUTF8, "
                                    "needed for a non-ASCII address (RFC 6531)", True)
                    for r in recipients]
        limit = core.size_limit
        if limit is not None and len(message) > limit:
            # RFC 1870 §6.2: the server said it will refuse; do not send the bytes.
            return [RecipientResult(r, 0, f"5.3.4 message of {len(message)} bytes is larger "
                                    f"than {conn.host} accepts ({limit}, RFC 1870)", True)
                    for r in recipients]
        final: list[RecipientResult | None] = [None] * n
        accepted: list[int] = []
        sent_dot = False
        try:
            mail = core.mail(sender, size=len(message), eight_bit=not message.isascii(),
                             smtputf8=utf8)
            if core.pipelining:
                # RFC 2920 §3.1: MAIL, every RCPT and DATA in one group; replies in order.
                batch = [mail, *(core.rcpt(r, smtputf8=utf8) for r in recipients), core.data()]
                await conn.send(b"".join(batch), t.mail)
                mail_r = await conn.response(t.mail)
                if not mail_r.reply.positive:
                    final = [_result(r, mail_r.reply) for r in recipients]
                    self._if_closed(conn, mail_r)
                for i in range(n):
                    r = await conn.response(t.rcpt)
                    if final[i] is None:
                        if r.reply.positive:
                            accepted.append(i)
                        else:
                            final[i] = _result(recipients[i], r.reply)
                    self._if_closed(conn, r)
                data_r = await conn.response(t.data_init)
            else:
                mail_r = await conn.command(mail, t.mail)
                if not mail_r.reply.positive:
                    final = [_result(r, mail_r.reply) for r in recipients]
                    self._if_closed(conn, mail_r)
                    return [f for f in final if f is not None]
                for i, rcpt in enumerate(recipients):
                    r = await conn.command(core.rcpt(rcpt, smtputf8=utf8), t.rcpt)
                    if r.reply.positive:
                        accepted.append(i)
                    else:
                        final[i] = _result(rcpt, r.reply)
                    self._if_closed(conn, r)
                if not accepted:
                    return [f for f in final if f is not None]  # RSET comes before reuse
                data_r = await conn.command(core.data(), t.data_init)
            self._if_closed(conn, data_r)
            if data_r.reply.code == 354:
                if not accepted:
                    # RFC 2920 §3.1: DATA accepted with no valid recipient (a server bug):
                    # end the empty message at once.
                    await conn.send(core.content(b""), t.data_block)
                    await conn.response(t.data_end)
                else:
                    await conn.send(core.content(message), t.data_block)
                    sent_dot = True
                    end = await conn.response(t.data_end)
                    for i in accepted:
                        final[i] = _result(recipients[i], end.reply)
            else:
                for i in accepted:
                    final[i] = _result(recipients[i], data_r.reply)
        except _Lost as exc:
            if exc.reply is not None:
                reply = exc.reply  # a 421: every open recipient gets it, as a 4xx
                fill = RecipientResult("", reply.code, reply_text(reply), reply.code >= 500)
            elif sent_dot:
                fill = RecipientResult("", 0, f"4.4.2 {exc.reason} after the end of the "
                                       "message was sent; it may have been delivered "
                                       "already (RFC 1047)", False)
            else:
                fill = RecipientResult("", 0, f"4.4.2 {exc.reason}", False)
            for i in range(n):
                if final[i] is None:
                    final[i] = RecipientResult(recipients[i], fill.code, fill.text,
                                               fill.permanent)
        return [f if f is not None else RecipientResult(recipients[i], 0,
                                                         "4.3.0 no reply", False)
                for i, f in enumerate(final)]

    @staticmethod
    def _if_closed(conn: _Connection, response: Response) -> None:
        """After a 421 (RFC 5321 §3.8) nothing more will come: stop the transaction."""
        if conn.core.state is State.CLOSED:
            raise _Lost(f"{conn.peer} closed the connection", response.reply)

    def _deferred(self, where: str, recipients: Sequence[str], text: str) -> AttemptReport:
        logger.info("queue.delivery.deferred", extra={"domain": where, "reason": text})
        return _all(recipients, text, permanent=False)
