"""What each port really does: reachability, mode, TLS versions, certificate, credentials.

``probe(host, ports, options)`` checks every port concurrently (at most
``Options.concurrency`` connections open at once) and returns a ``ProbeResult``; ``judge``
turns one port's findings into a verdict with reasons. Rendering is ``report.py``'s job,
mail-program settings are ``settings.py``'s, DNS discovery is ``discovery.py``'s.

Per port, with the expected mode first (implicit TLS on 465/993/995, plaintext with
STARTTLS/STLS elsewhere) and the other one if the expected mode does not work:

1. the main connection: greeting, capabilities before TLS, the upgrade, capabilities
   after TLS, the negotiated version and cipher and the server's certificate;
2. one handshake per TLS version (1.0-1.3) with a version-pinned probe context;
3. two verifying handshakes (system CAs; ``--ca``), for the chain's validity;
4. with ``--active`` only: a fake login before TLS, and STARTTLS with a pipelined NOOP;
5. on 587/143/110 found speaking STARTTLS: one more connection that starts a TLS handshake
   from the first byte, for servers that accept both (postkeep's ``tls_sniff_ms``), so
   a mail program set to SSL/TLS on that port is known to work too.

Invariants:
- Every network step has ``Options.timeout``; every connection is closed in ``finally``.
- No real credential is ever sent (``dialogue.FAKE_USER``); without ``active`` nothing but
  greetings, capability requests, STARTTLS/STLS, EHLO and QUIT-less closes are sent.
- TLS contexts come only from ``TlsPolicy.client_context`` (STYLE.md rule 3).
- Port 25 is judged as opportunistic MX STARTTLS (RFC 7435): old TLS versions there are
  not a weakness, a missing STARTTLS is weak rather than insecure.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from postkeep.config.schema import SERVICE_PORTS, TLS_VERSIONS, Mode, Service
from postkeep.probe.dialogue import (
    DIALOGUES,
    Dialogue,
    DialogueError,
    LoginAttempt,
    Offer,
)
from postkeep.probe.wire import Connection, WireError
from postkeep.tls.certs import CertInfo, FileStamp, fingerprint
from postkeep.tls.policy import EXPIRY_WARNING, TlsContext, TlsPolicy

T = TypeVar("T")

#: The services the probe checks, in report order (DESIGN.md §1; http is not mail).
PROBED: tuple[Service, ...] = (
    Service.SMTP,
    Service.SUBMISSIONS,
    Service.SUBMISSION,
    Service.IMAPS,
    Service.IMAP,
    Service.POP3S,
    Service.POP3,
)
PROTOCOL: dict[Service, str] = {
    Service.SMTP: "smtp",
    Service.SUBMISSION: "smtp",
    Service.SUBMISSIONS: "smtp",
    Service.IMAP: "imap",
    Service.IMAPS: "imap",
    Service.POP3: "pop3",
    Service.POP3S: "pop3",
}
#: The upgrade command's name per protocol, for reasons a person reads.
UPGRADE_WORD = {"smtp": "STARTTLS", "imap": "STARTTLS", "pop3": "STLS"}
OLD_VERSIONS = ("TLSv1", "TLSv1.1")
PRETTY = {"TLSv1": "TLS 1.0", "TLSv1.1": "TLS 1.1", "TLSv1.2": "TLS 1.2", "TLSv1.3": "TLS 1.3"}
#: RSA below this is weak (NIST SP 800-57; OpenSSL security level 2).
MIN_RSA_BITS = 2048
#: How long to wait, after the injection test's handshake, for an unasked-for answer.
INJECTION_WAIT = 1.5
#: STARTTLS ports also tried with a handshake from the first byte (DESIGN.md §1; not port
#: 25, where senders never use implicit TLS).
IMPLICIT_ALSO_TRIED = frozenset({Service.SUBMISSION, Service.IMAP, Service.POP3})
#: Substrings of OpenSSL cipher names that no server should negotiate any more.
WEAK_CIPHER_PARTS = ("RC4", "DES", "NULL", "EXP", "ANON", "ADH", "AECDH", "MD5")


@dataclass(frozen=True, slots=True)
class Options:
    timeout: float = 5.0  # per network step (connect, a reply, a handshake)
    ca: Path | None = None  # extra CAs (PEM) to verify certificates with
    active: bool = False  # fake login before TLS and STARTTLS injection
    concurrency: int = 8  # connections open at once, all ports together


@dataclass(slots=True)
class CertFacts:
    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: str
    not_after: str
    days_left: int
    expired: bool
    key_type: str  # "RSA", "EC", "Ed25519" …
    key_bits: int
    key: str  # "RSA 2048", "EC secp256r1"
    fingerprint: str
    self_signed: bool
    name_matches: bool  # RFC 7817 §3 / RFC 6125 for the probed host
    trusted: bool | None = None  # chain verified against system CAs or --ca; None: untested
    verify_error: str | None = None


@dataclass(slots=True)
class TlsFacts:
    #: TLS version name → "accepted", "refused", "not_testable" (the local OpenSSL cannot
    #: offer it) or "error" (the connection broke before the handshake was tried).
    versions: dict[str, str] = field(default_factory=dict)
    version: str | None = None  # negotiated by the main connection
    cipher: str | None = None
    bits: int | None = None
    certificate: CertFacts | None = None


@dataclass(frozen=True, slots=True)
class Injection:
    vulnerable: bool
    reply: str  # what the server answered inside TLS without being asked ("" if nothing)
    dropped: int  # plaintext bytes after the go-ahead (dropped by us)
    error: str | None = None  # the test could not be completed


@dataclass(slots=True)
class PortReport:
    service: Service
    port: int
    expected_mode: str  # "implicit_tls" or "starttls"
    reachable: bool = False
    mode: str | None = None  # "implicit_tls", "starttls", "plaintext"; None: nothing worked
    greeting: str | None = None
    error: str | None = None
    tls: TlsFacts | None = None
    before_tls: Offer | None = None
    after_tls: Offer | None = None
    plaintext_after_go_ahead: int | None = None  # bytes, on the main connection
    login_attempt: LoginAttempt | None = None
    injection: Injection | None = None
    #: A STARTTLS port (587/143/110) that also completed a handshake from the first byte
    #: and then greeted; None: not tried (another port, or STARTTLS did not work).
    implicit_tls_also: bool | None = None
    verdict: str = "closed"
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def protocol(self) -> str:
        return PROTOCOL[self.service]


@dataclass(slots=True)
class ProbeResult:
    host: str
    started: str
    active: bool
    ports: list[PortReport]
    dns: object | None = None  # discovery.DnsFindings, filled by the caller when asked


def default_ports(offset: int = 0) -> dict[Service, int]:
    return {svc: SERVICE_PORTS[svc][0] + offset for svc in PROBED}


def _contexts() -> TlsPolicy:
    # client_context() uses no server state: a policy without a certificate is enough to
    # ask it for client contexts, and keeps every TLS setting inside tls/policy.py.
    return TlsPolicy.__new__(TlsPolicy)


def _server_hostname(host: str) -> str | None:
    """SNI/verification name: None for IP literals (RFC 6066 §3 forbids them in SNI)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def _canonical(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host.rstrip(".").lower()


class PortProbe:
    def __init__(
        self, host: str, service: Service, port: int, options: Options, sem: asyncio.Semaphore
    ) -> None:
        self.host = host
        self.service = service
        self.port = port
        self.opts = options
        self.sem = sem
        self.policy = _contexts()
        implicit = SERVICE_PORTS[service][1] is Mode.IMPLICIT
        self.report = PortReport(service, port, "implicit_tls" if implicit else "starttls")

    # -- plumbing ---------------------------------------------------------------------
    def _dialogue(self, conn: Connection) -> Dialogue:
        cls = DIALOGUES[PROTOCOL[self.service]]
        return cls(conn, self.opts.timeout)

    def _sni(self, verify: bool) -> str | None:
        # A verifying context needs the name to check, even an IP address (RFC 7817 §3).
        name = _server_hostname(self.host)
        return name if (name or not verify) else _canonical(self.host)

    async def _open(self, ctx: TlsContext | None = None, *, verify: bool = False) -> Connection:
        """TCP, then (with ``ctx``) the implicit-TLS handshake, each with the step timeout."""
        conn = await Connection.open(self.host, self.port, timeout=self.opts.timeout)
        if ctx is not None:
            try:
                await conn.start_tls(ctx, server_hostname=self._sni(verify),
                                     timeout=self.opts.timeout)
            except BaseException:
                conn.close()
                raise
        return conn

    async def _bounded(self, work: Callable[[], Awaitable[T]]) -> T:
        """One connection's work, within the global limit and an overall deadline."""
        async with self.sem:
            return await asyncio.wait_for(work(), self.opts.timeout * 4)

    async def _reach_tls(self, mode: str, ctx: TlsContext, *, verify: bool = False) -> Connection:
        """A connection on which ``ctx``'s handshake completed (implicit or via STARTTLS)."""
        if mode == "implicit_tls":
            return await self._open(ctx, verify=verify)
        conn = await self._open()
        try:
            d = self._dialogue(conn)
            await d.greeting()
            up = await d.starttls()
            if not up.agreed:
                raise DialogueError(f"{UPGRADE_WORD[d.protocol]} refused: {up.reply}")
            await conn.start_tls(ctx, server_hostname=self._sni(verify), timeout=self.opts.timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    # -- the steps --------------------------------------------------------------------
    async def run(self) -> PortReport:
        rep = self.report
        order = ["implicit_tls", "plain"]
        if rep.expected_mode == "starttls":
            order.reverse()
        errors: list[str] = []
        for mode in order:
            try:
                await self._bounded(
                    self._main_implicit if mode == "implicit_tls" else self._main_plain
                )
            except (ConnectionRefusedError, ConnectionResetError) as exc:
                if not rep.reachable:
                    rep.error = f"connection refused ({exc.__class__.__name__})"
                    return judge(rep)
                errors.append(f"{mode}: {_why(exc)}")
            except OSError as exc:
                if not rep.reachable:
                    rep.error = f"cannot connect: {_why(exc)}"
                    return judge(rep)
                errors.append(f"{mode}: {_why(exc)}")
            except (DialogueError, TimeoutError, ssl.SSLError, WireError) as exc:
                errors.append(f"{mode}: {_why(exc)}")
            if rep.mode is not None:
                break
        if rep.mode is None:
            rep.error = "; ".join(errors) or "no mail protocol answered"
            return judge(rep)
        if rep.mode != "plaintext":
            extra: list[Awaitable[None]] = [self._versions(), self._verify()]
            if rep.mode == "starttls" and self.service in IMPLICIT_ALSO_TRIED:
                extra.append(self._implicit_also())
            await asyncio.gather(*extra)
        if self.opts.active:
            work: list[Awaitable[None]] = []
            if rep.before_tls is not None:
                work.append(self._fake_login())
            if rep.mode == "starttls":
                work.append(self._injection())
            await asyncio.gather(*work)
        return judge(rep)

    async def _main_implicit(self) -> None:
        rep = self.report
        ctx = self.policy.client_context("probe", ciphers="DEFAULT")
        conn = await self._open()
        rep.reachable = True
        try:
            try:
                await conn.start_tls(ctx, server_hostname=self._sni(False),
                                     timeout=self.opts.timeout)
            except (ssl.SSLError, OSError, TimeoutError) as exc:
                raise DialogueError(f"no TLS handshake ({_why(exc)})") from None
            d = self._dialogue(conn)
            rep.greeting = await d.greeting()
            self._tls_facts(conn)
            rep.mode = "implicit_tls"
            rep.after_tls = await _maybe(d.offer())
        finally:
            conn.close()

    async def _main_plain(self) -> None:
        rep = self.report
        conn = await self._open()
        rep.reachable = True
        try:
            d = self._dialogue(conn)
            greeting = await d.greeting()
            before = await d.offer()
            rep.greeting, rep.before_tls = greeting, before
            rep.mode = "plaintext"
            if not before.starttls:
                return
            up = await d.starttls()
            if not up.agreed:
                rep.notes.append(f"{UPGRADE_WORD[d.protocol]} offered but refused: {up.reply}")
                return
            rep.plaintext_after_go_ahead = up.dropped
            ctx = self.policy.client_context("probe", ciphers="DEFAULT")
            try:
                await conn.start_tls(ctx, server_hostname=self._sni(False),
                                     timeout=self.opts.timeout)
            except (ssl.SSLError, OSError, TimeoutError) as exc:
                rep.notes.append(
                    f"{UPGRADE_WORD[d.protocol]} offered, but the TLS handshake failed: "
                    f"{_why(exc)}"
                )
                return
            rep.mode = "starttls"
            self._tls_facts(conn)
            rep.after_tls = await _maybe(d.offer())
        finally:
            conn.close()

    async def _implicit_also(self) -> None:
        """Does this STARTTLS port also answer a client set to SSL/TLS (implicit TLS)?"""
        ctx = self.policy.client_context("probe", ciphers="DEFAULT")

        async def attempt() -> None:
            conn = await self._open()
            try:
                if conn.take_buffer():
                    # It greeted in plaintext before our ClientHello: STARTTLS only.
                    raise DialogueError("plaintext greeting before the handshake")
                await conn.start_tls(ctx, server_hostname=self._sni(False),
                                     timeout=self.opts.timeout)
                await self._dialogue(conn).greeting()
            finally:
                conn.close()

        try:
            await self._bounded(attempt)
        except (DialogueError, OSError, TimeoutError, ssl.SSLError, WireError):
            self.report.implicit_tls_also = False
            return
        self.report.implicit_tls_also = True
        self.report.notes.append(
            f"port {self.port} also accepts SSL/TLS from the first byte: a mail program set "
            f"to SSL/TLS or to {UPGRADE_WORD[self.report.protocol]} works here"
        )

    def _tls_facts(self, conn: Connection) -> None:
        obj = conn.ssl_object
        facts = TlsFacts()
        if obj is not None:
            facts.version = obj.version()
            cipher = obj.cipher()
            if cipher:
                facts.cipher, facts.bits = cipher[0], cipher[2]
            der = obj.getpeercert(binary_form=True)
            if der:
                facts.certificate = cert_facts(der, self.host)
        self.report.tls = facts

    async def _versions(self) -> None:
        tls = self.report.tls
        assert tls is not None and self.report.mode is not None
        results = await asyncio.gather(*(self._one_version(v) for v in TLS_VERSIONS))
        tls.versions = dict(zip(TLS_VERSIONS, results, strict=True))

    async def _one_version(self, version: str) -> str:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx = self.policy.client_context(
                    "probe", min_version=version, max_version=version
                )
        except (ValueError, ssl.SSLError):
            return "not_testable"
        mode = self.report.mode
        assert mode is not None

        async def attempt() -> str:
            conn = await self._reach_tls(mode, ctx)
            conn.close()
            return "accepted"

        try:
            return await self._bounded(attempt)
        except ssl.SSLError as exc:
            # Refused before a byte left this machine: this OpenSSL cannot speak it.
            if exc.reason in ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE"):
                return "not_testable"
            return "refused"  # an alert from the server, or a handshake it broke off
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return "refused"
        except (DialogueError, TimeoutError, OSError, WireError):
            return "error"

    async def _verify(self) -> None:
        tls = self.report.tls
        cert = tls.certificate if tls else None
        mode = self.report.mode
        if cert is None or mode is None:
            return
        stores: list[Path | None] = [None]  # the system's CAs
        if self.opts.ca is not None:
            stores.append(self.opts.ca)
        errors: list[str] = []
        for cafile in stores:
            ctx = self.policy.client_context("verify", cafile=cafile)

            async def attempt(ctx: TlsContext = ctx) -> None:
                conn = await self._reach_tls(mode, ctx, verify=True)
                conn.close()

            try:
                await self._bounded(attempt)
            except ssl.SSLCertVerificationError as exc:
                # X509_V_ERR_HOSTNAME_MISMATCH (62): the chain itself was good; the name
                # is judged separately (cert.name_matches).
                if exc.verify_code in (62, 64):
                    cert.trusted, cert.verify_error = True, None
                    return
                errors.append(str(exc.verify_message))
                continue
            except (ssl.SSLError, DialogueError, OSError, TimeoutError, WireError) as exc:
                # e.g. a server without TLS 1.2: the "verify" context will not go lower.
                if cert.trusted is None:
                    cert.verify_error = f"not verified: {_why(exc)}"
                return
            cert.trusted, cert.verify_error = True, None
            return
        cert.trusted = False
        cert.verify_error = "; ".join(dict.fromkeys(errors))

    async def _fake_login(self) -> None:
        async def attempt() -> LoginAttempt:
            conn = await self._open()
            try:
                d = self._dialogue(conn)
                await d.greeting()
                return await d.fake_login()
            finally:
                conn.close()

        try:
            self.report.login_attempt = await self._bounded(attempt)
        except (DialogueError, OSError, TimeoutError, WireError) as exc:
            self.report.login_attempt = LoginAttempt("error", _why(exc))

    async def _injection(self) -> None:
        ctx = self.policy.client_context("probe", ciphers="DEFAULT")

        async def attempt() -> Injection:
            conn = await self._open()
            try:
                d = self._dialogue(conn)
                await d.greeting()
                up = await d.starttls(inject=True)
                if not up.agreed:
                    return Injection(False, "", 0, f"upgrade refused: {up.reply}")
                await conn.start_tls(ctx, server_hostname=self._sni(False),
                                     timeout=self.opts.timeout)
                answer = await d.unsolicited(min(INJECTION_WAIT, self.opts.timeout))
                first = answer.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
                return Injection(bool(answer), first, up.dropped)
            finally:
                conn.close()

        try:
            self.report.injection = await self._bounded(attempt)
        except (DialogueError, OSError, TimeoutError, ssl.SSLError, WireError) as exc:
            self.report.injection = Injection(False, "", 0, _why(exc))


async def _maybe(aw: Awaitable[Offer]) -> Offer | None:
    """The capabilities after TLS are informative: a failure there is not a finding."""
    try:
        return await aw
    except (DialogueError, TimeoutError, OSError):
        return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


def _key(cert: x509.Certificate) -> tuple[str, int, str]:
    public = cert.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        return "RSA", public.key_size, f"RSA {public.key_size}"
    if isinstance(public, ec.EllipticCurvePublicKey):
        return "EC", public.key_size, f"EC {public.curve.name}"
    if isinstance(public, ed25519.Ed25519PublicKey):
        return "Ed25519", 256, "Ed25519"
    if isinstance(public, ed448.Ed448PublicKey):
        return "Ed448", 456, "Ed448"
    if isinstance(public, dsa.DSAPublicKey):
        return "DSA", public.key_size, f"DSA {public.key_size}"
    return "unknown", 0, "unknown"


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        # RFC 6125 §6.4.4: the CN is only a fallback when there is no subjectAltName.
        return tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return (*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))


def cert_facts(der: bytes, host: str, now: dt.datetime | None = None) -> CertFacts:
    """Describe the server's leaf certificate and whether it covers ``host``."""
    cert = x509.load_der_x509_certificate(der)
    now = now or dt.datetime.now(dt.UTC)
    key_type, bits, key = _key(cert)
    names = _names(cert)
    # The one RFC 7817 matching rule lives in tls/certs.py (CertInfo.covers); the probe has
    # no files, so the stamps and paths are placeholders.
    stamp = FileStamp(0, 0, 0)
    info = CertInfo(
        cert_path=Path("-"), key_path=Path("-"), subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(), names=names, serial=cert.serial_number,
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        fingerprint=fingerprint(der), chain_length=1, key_type=key, self_signed=False,
        key_mode=0, cert_stamp=stamp, key_stamp=stamp,
    )
    left = info.expires_in(now)
    return CertFacts(
        subject=info.subject,
        issuer=info.issuer,
        names=names,
        not_before=info.not_before.isoformat(),
        not_after=info.not_after.isoformat(),
        days_left=left.days,
        expired=left <= dt.timedelta(0) or now < info.not_before,
        key_type=key_type,
        key_bits=bits,
        key=key,
        fingerprint=info.fingerprint,
        self_signed=cert.issuer == cert.subject,
        name_matches=info.covers(_canonical(host)),
    )


# -- verdicts ------------------------------------------------------------------------------
def exposure(rep: PortReport) -> list[str]:
    """Ways a password could cross the wire before TLS, from what the server advertised."""
    offer = rep.before_tls
    if offer is None:
        return []
    word = UPGRADE_WORD[rep.protocol]
    out: list[str] = []
    mechs = [m for m in offer.auth if m not in ("EXTERNAL", "ANONYMOUS")]
    where = f"before {word}" if offer.starttls else "without TLS"
    if mechs:
        label = {"smtp": "AUTH", "imap": "AUTH=", "pop3": "SASL"}[rep.protocol]
        out.append(f"{label} {' '.join(mechs)} offered {where}")
    if offer.login_disabled is False:
        # RFC 2595 §3.2 / RFC 9051 §6.2.3: LOGINDISABLED until TLS.
        out.append(f"LOGINDISABLED missing {where}: LOGIN takes a password in clear text")
    if offer.user:
        out.append(f"USER offered {where}: USER/PASS send the password in clear text")
    return out


def _is_weak_cipher(name: str, version: str | None) -> bool:
    upper = name.upper()
    if any(part in upper for part in WEAK_CIPHER_PARTS):
        return True
    # TLS 1.3 suites are all forward-secret; before that, only (EC)DHE key exchange is.
    return version != "TLSv1.3" and not upper.startswith(("ECDHE", "DHE"))


def judge(rep: PortReport) -> PortReport:
    """Set ``verdict`` and ``reasons`` from the findings (rules: README "Probe")."""
    insecure: list[str] = []
    weak: list[str] = []
    mx = rep.service is Service.SMTP
    word = UPGRADE_WORD[rep.protocol]
    if not rep.reachable:
        rep.verdict = "closed"
        return rep
    if rep.mode is None:
        weak.append(f"open, but no usable mail protocol: {rep.error}")
    elif rep.mode == "plaintext":
        if mx:
            # RFC 7435 / RFC 3207: without STARTTLS, mail to this MX travels in clear text,
            # but senders still deliver: weak, not insecure.
            weak.append(f"no {word}: mail from other servers arrives in clear text")
        else:
            insecure.append("no TLS at all: passwords and mail travel in clear text")
    if rep.mode == "starttls" and rep.expected_mode == "implicit_tls":
        weak.append(
            f"port {rep.port} should start with TLS (RFC 8314 §3.3) but speaks plaintext first; "
            "mail programs set to SSL/TLS will fail"
        )
    if rep.mode == "implicit_tls" and rep.expected_mode == "starttls":
        rep.notes.append(f"port {rep.port} uses implicit TLS rather than {word}")
    for line in exposure(rep):
        insecure.append(f"credentials possible in plaintext: {line}")
    if rep.login_attempt and rep.login_attempt.outcome in ("rejected", "accepted"):
        insecure.append(
            f"the server {'accepted' if rep.login_attempt.outcome == 'accepted' else 'checked'}"
            f" a (fake) login before TLS: {rep.login_attempt.reply}"
        )
    if rep.injection and rep.injection.vulnerable:
        insecure.append(
            f"{word} command injection: a command sent before TLS was answered inside TLS "
            f"({rep.injection.reply!r}; CVE-2011-0411 class)"
        )
    if rep.plaintext_after_go_ahead:
        weak.append(
            f"the server sent {rep.plaintext_after_go_ahead} bytes after its {word} go-ahead, "
            "before TLS (dropped)"
        )
    if mx and rep.after_tls and rep.after_tls.auth:
        weak.append(
            "AUTH on port 25: logins belong on submission (465/587, RFC 8314, RFC 6409)"
        )
    tls = rep.tls
    if tls is not None:
        old = [v for v in OLD_VERSIONS if tls.versions.get(v) == "accepted"]
        if old and not mx:
            pretty = " and ".join(PRETTY[v] for v in old)
            weak.append(f"{pretty} accepted (deprecated by RFC 8996)")
        if tls.versions.get("TLSv1.3") == "refused":
            rep.notes.append("TLS 1.3 not offered")
        untestable = [v for v, r in tls.versions.items() if r == "not_testable"]
        if untestable:
            rep.notes.append(
                "not testable with this machine's OpenSSL: "
                + ", ".join(PRETTY[v] for v in untestable)
            )
        if tls.cipher and _is_weak_cipher(tls.cipher, tls.version):
            weak.append(f"weak cipher negotiated: {tls.cipher}")
        cert = tls.certificate
        if cert is not None:
            mta_sts = " (senders using MTA-STS will refuse it)" if mx else ""
            if cert.expired:
                weak.append(f"certificate expired {-cert.days_left} days ago ({cert.not_after})")
            elif cert.days_left * dt.timedelta(days=1) <= EXPIRY_WARNING:
                rep.notes.append(f"certificate expires in {cert.days_left} days")
            if not cert.name_matches:
                weak.append(
                    f"certificate does not cover the host name (names: {', '.join(cert.names)})"
                    + mta_sts
                )
            if cert.trusted is False and cert.verify_error:
                weak.append(f"certificate not trusted: {cert.verify_error}{mta_sts}")
            if cert.self_signed:
                rep.notes.append("self-signed certificate: every mail program must trust it")
            if cert.key_type == "RSA" and cert.key_bits < MIN_RSA_BITS:
                weak.append(f"RSA key of {cert.key_bits} bits (use at least {MIN_RSA_BITS})")
    rep.reasons = insecure + weak
    rep.verdict = "insecure" if insecure else "weak" if weak else "secure"
    return rep


async def probe(
    host: str, ports: Mapping[Service, int], options: Options = Options()
) -> ProbeResult:
    """Probe every port of ``ports`` on ``host``, concurrently. Never raises for the network."""
    sem = asyncio.Semaphore(max(1, options.concurrency))
    started = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    probes = [PortProbe(host, svc, port, options, sem) for svc, port in ports.items()]
    reports = await asyncio.gather(*(p.run() for p in probes))
    order = {svc: i for i, svc in enumerate(PROBED)}
    reports.sort(key=lambda r: order.get(r.service, 99))
    return ProbeResult(host=host, started=started, active=options.active, ports=list(reports))


def overall(result: ProbeResult) -> str:
    """The worst verdict among open ports; "closed" when nothing answered."""
    verdicts = {p.verdict for p in result.ports}
    for worst in ("insecure", "weak", "secure"):
        if worst in verdicts:
            return worst
    return "closed"


def exit_code(result: ProbeResult) -> int:
    """0 when every open port is secure; 1 when any is weak or insecure, or none is open."""
    return 0 if overall(result) == "secure" else 1
