"""TLS policy: the one place where ``ssl.SSLContext`` objects are built and configured.

Every listener asks ``TlsPolicy.server_context(service)`` for its context when it accepts a
connection (implicit TLS) or when the client says STARTTLS/STLS; outbound delivery and the
probe ask ``client_context(mode)``. ruff's banned-api rule keeps ``ssl.SSLContext`` and
``ssl.create_default_context`` out of every other module (STYLE.md rule 3).

Version floors:

- Submission and access (submission, submissions, imap, imaps, pop3, pop3s, http): TLS 1.2
  by default, ``min_version = "TLSv1.3"`` allowed. RFC 8996 deprecates TLS 1.0 and 1.1 and
  RFC 8997 applies that to mail; RFC 8314 §4.1 asks for TLS 1.2 or later. Old printers and
  phones are let in only when the operator says ``legacy_clients = true`` (logged as a
  warning at start).
- Port 25 (``Service.SMTP``): ``mx_min_version``, TLS 1.0 by default. Server-to-server
  STARTTLS is opportunistic (RFC 7435 §3, RFC 3207): a sender whose TLS we refuse does not
  give up, it retries in plaintext. Accepting its TLS 1.0 is strictly better than that.

OpenSSL 3 refuses TLS 1.0/1.1 at its default security level (the handshake signs with
SHA-1/MD5+SHA-1), so the contexts whose floor is below TLS 1.2 — and only those — get
``@SECLEVEL=0`` in their cipher string. Their suites stay forward-secret (ECDHE) and the
key/certificate checks that SECLEVEL would do are done by ``certs.load_pair`` instead.

Invariants:
- SSLv2 and SSLv3 are never enabled (``OP_NO_SSLv2``/``OP_NO_SSLv3``; every minimum is
  TLS 1.0 or higher).
- No context for submission/access has a floor below TLS 1.2 unless ``legacy_clients`` is
  true; ``access_floor`` is the only function that decides it and raises otherwise.
- Cipher suites below TLS 1.3 are ECDHE only: no static-RSA key exchange, no RC4, 3DES,
  NULL, export or anonymous suites. Contexts with a TLS 1.2 floor offer only AEAD suites
  (AES-GCM, ChaCha20-Poly1305); CBC (with SHA-1 MAC) exists only in contexts that accept
  TLS 1.0/1.1, where nothing else is possible.
- No TLS compression (CRIME), no renegotiation (RFC 5746 concerns; CVE-2009-3555 class),
  no session tickets (a long-lived ticket key would undo forward secrecy; mail clients
  reconnect rarely enough that a full handshake costs nothing noticeable).
- A reload validates the new pair first (``certs.load_pair``) and then replaces all
  contexts with one assignment; if anything fails, every old context stays. Established
  connections keep the context they were accepted with.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from postkeep.config.schema import TLS_VERSIONS, Service, TlsConfig
from postkeep.tls.certs import CertError, CertInfo, FileStamp, file_stamp, load_pair

log = logging.getLogger("postkeep.tls")

#: The type other modules use in annotations. Only this module may *build* contexts: the
#: ruff ban on ``ssl.SSLContext`` elsewhere enforces that, and this alias keeps type hints
#: possible without lifting it.
TlsContext = ssl.SSLContext

_TLS_VERSION: dict[str, ssl.TLSVersion] = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_HAS_VERSION: dict[str, bool] = {
    "TLSv1": ssl.HAS_TLSv1,
    "TLSv1.1": ssl.HAS_TLSv1_1,
    "TLSv1.2": ssl.HAS_TLSv1_2,
    "TLSv1.3": ssl.HAS_TLSv1_3,
}
_RANK = {name: i for i, name in enumerate(TLS_VERSIONS)}
_MODERN_FLOOR = "TLSv1.2"

#: TLS 1.2 suites where the floor is TLS 1.2: ECDHE + AEAD only (RFC 9325 §4.2). TLS 1.3
#: suites are not set by this string; OpenSSL's TLS 1.3 defaults are all AEAD + (EC)DHE.
MODERN_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:@SECLEVEL=2"
#: Where TLS 1.0/1.1 are accepted: the AEAD suites first (server preference), then the only
#: forward-secret suites those versions have, ECDHE with AES-CBC and a SHA-1 MAC.
LEGACY_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES+SHA1:!aNULL:!eNULL:@SECLEVEL=0"
#: The probe must be able to *find* weak servers, so it offers everything OpenSSL has.
PROBE_CIPHERS = "ALL:@SECLEVEL=0"

#: ALPN protocol IDs (IANA "TLS Application-Layer Protocol Negotiation (ALPN) Protocol
#: IDs": "imap" and "pop3" point to RFC 2595). Naming the protocol in the handshake lets a
#: client that sends ALPN notice when its TLS session was redirected to a different
#: service using the same certificate (the ALPACA attack; RFC 9325 §3.8). No ID is
#: registered for SMTP, so the SMTP services send none rather than invent one.
ALPN_PROTOCOLS: Mapping[Service, tuple[str, ...]] = {
    Service.IMAP: ("imap",),
    Service.IMAPS: ("imap",),
    Service.POP3: ("pop3",),
    Service.POP3S: ("pop3",),
    Service.HTTP: ("http/1.1",),
}

#: OP_SINGLE_DH_USE/OP_SINGLE_ECDH_USE are always on in OpenSSL ≥ 1.1; set for clarity.
SERVER_OPTIONS = (
    ssl.OP_NO_SSLv2
    | ssl.OP_NO_SSLv3
    | ssl.OP_NO_COMPRESSION  # CRIME
    | ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation: DoS, CVE-2009-3555 class
    | ssl.OP_CIPHER_SERVER_PREFERENCE  # AEAD before CBC, whatever the client lists first
    | ssl.OP_SINGLE_DH_USE
    | ssl.OP_SINGLE_ECDH_USE
    | ssl.OP_NO_TICKET  # see the module docstring: no ticket keys to steal
)

CLIENT_MODES = ("opportunistic", "verify", "probe")

#: Warn this long before the certificate expires.
EXPIRY_WARNING = dt.timedelta(days=14)


class TlsConfigError(ValueError):
    """A ``TlsConfig`` the policy will not run with. ``key`` is the ``[tls]`` key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _check_version(key: str, value: str) -> None:
    if value not in _RANK:
        raise TlsConfigError(key, f'"{value}" is not one of {", ".join(TLS_VERSIONS)}')


def access_floor(tls: TlsConfig) -> str:
    """The lowest TLS version for submission and access services (all but port 25).

    ``legacy_clients = false`` (the default): ``min_version``, which must be TLS 1.2 or
    1.3. ``legacy_clients = true``: TLS 1.0, or ``min_version`` when that names 1.1.
    """
    _check_version("min_version", tls.min_version)
    below_modern = _RANK[tls.min_version] < _RANK[_MODERN_FLOOR]
    if tls.legacy_clients:
        if tls.min_version == "TLSv1.3":
            raise TlsConfigError(
                "legacy_clients",
                'true allows TLS 1.0 and 1.1, but min_version = "TLSv1.3" refuses even '
                "TLS 1.2; set one of them",
            )
        return tls.min_version if below_modern else "TLSv1"
    if below_modern:
        # RFC 8996 §2-3 (and RFC 8997 for mail): TLS 1.0/1.1 MUST NOT be negotiated. The
        # operator may still decide otherwise for old devices, but must say so by name.
        raise TlsConfigError(
            "min_version",
            f'"{tls.min_version}" is below TLSv1.2, which RFC 8996 deprecates; '
            "set legacy_clients = true to accept TLS 1.0/1.1 from old clients",
        )
    return tls.min_version


def floor_for(tls: TlsConfig, service: Service) -> str:
    """The lowest TLS version accepted on ``service``'s listeners."""
    if service is Service.SMTP:
        # RFC 7435: on port 25 any TLS beats the plaintext the sender falls back to.
        _check_version("mx_min_version", tls.mx_min_version)
        return tls.mx_min_version
    return access_floor(tls)


def _versions_from(floor: str) -> tuple[str, ...]:
    return tuple(v for v in TLS_VERSIONS if _RANK[v] >= _RANK[floor] and _HAS_VERSION[v])


def _set_versions(ctx: ssl.SSLContext, minimum: ssl.TLSVersion, maximum: ssl.TLSVersion) -> None:
    # CPython ≥ 3.10 emits DeprecationWarning for TLSv1/TLSv1_1 here. Using them on port 25
    # and for legacy_clients is a deliberate, documented decision (RFC 7435), not an
    # accident to be warned about on every reload.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = minimum
        ctx.maximum_version = maximum


def describe(tls: ssl.SSLObject | ssl.SSLSocket) -> str:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)"`` for logs and Received headers."""
    cipher = tls.cipher()
    if cipher is None:
        return "none"
    name, protocol, bits = cipher
    return f"{tls.version() or protocol} {name} ({bits} bits)"


@dataclass(frozen=True, slots=True)
class _Loaded:
    """One consistent generation: the pair that was validated and the contexts serving it."""

    info: CertInfo
    contexts: Mapping[Service, ssl.SSLContext]


_Stamps = tuple[FileStamp | None, FileStamp | None]


class TlsPolicy:
    """Server contexts per service (with reload) and client contexts per mode.

    Construction validates the configuration (``TlsConfigError``) and the pair
    (``CertError``); both are fatal at start. After that, ``reload()`` never raises for a
    bad pair: it logs and keeps serving the old one.
    """

    describe = staticmethod(describe)

    def __init__(self, config: TlsConfig, *, hostname: str | None = None) -> None:
        self._config = config
        self._hostname = hostname
        self._floors: dict[Service, str] = {svc: floor_for(config, svc) for svc in Service}
        self._lock = threading.Lock()
        self._failed: _Stamps | None = None
        info, contexts = self._build()
        self._state = _Loaded(info, contexts)
        if _RANK[self._floors[Service.SUBMISSION]] < _RANK[_MODERN_FLOOR]:
            log.warning(
                "tls.legacy_clients",
                extra={
                    "versions": ",".join(self.versions_for(Service.SUBMISSION)),
                    "why": "legacy_clients = true; RFC 8996 deprecates TLS 1.0/1.1",
                },
            )
        log.info("tls.cert.loaded", extra=_info_fields(info))
        self._check_health(info)

    # -- server side ------------------------------------------------------------------

    def server_context(self, service: Service) -> ssl.SSLContext:
        """The context for a connection accepted now on ``service``.

        Call it per connection (at accept or at STARTTLS), never cache it: after a reload
        the next call returns the context with the new certificate.
        """
        return self._state.contexts[service]

    @property
    def cert_info(self) -> CertInfo:
        """The pair being served now."""
        return self._state.info

    def versions_for(self, service: Service) -> tuple[str, ...]:
        """TLS versions accepted on ``service``, oldest first (within what OpenSSL has)."""
        return _versions_from(self._floors[service])

    def _server_context(self, service: Service) -> ssl.SSLContext:
        floor = self._floors[service]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _set_versions(ctx, _TLS_VERSION[floor], ssl.TLSVersion.MAXIMUM_SUPPORTED)
        ctx.options |= SERVER_OPTIONS
        # TLS 1.3 tickets are separate from OP_NO_TICKET; none are issued either.
        ctx.num_tickets = 0
        legacy = _RANK[floor] < _RANK[_MODERN_FLOOR]
        ctx.set_ciphers(LEGACY_CIPHERS if legacy else MODERN_CIPHERS)
        ctx.load_cert_chain(self._config.cert, self._config.key)
        alpn = ALPN_PROTOCOLS.get(service)
        if alpn:
            # A client that sends no ALPN, or none we know, still connects (RFC 7301 §3.2
            # allows us to ignore it); ALPACA protection is for clients that do send it.
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    def _stamps(self) -> _Stamps:
        out: list[FileStamp | None] = []
        for path in (self._config.cert, self._config.key):
            try:
                out.append(file_stamp(path))
            except OSError:
                out.append(None)
        return out[0], out[1]

    def _build(self) -> tuple[CertInfo, dict[Service, ssl.SSLContext]]:
        """Validate the pair, then build every context from it, or raise ``CertError``."""
        for _ in range(3):
            info = load_pair(self._config.cert, self._config.key)
            try:
                contexts = {svc: self._server_context(svc) for svc in Service}
            except ssl.SSLError as exc:
                raise CertError(
                    f"OpenSSL refused the certificate/key pair: {exc.reason or exc}",
                    self._config.cert,
                ) from None
            except OSError as exc:
                raise CertError(
                    f"cannot read the certificate/key pair: {exc.strerror or exc}",
                    self._config.cert,
                ) from None
            # OpenSSL read the files again: if they changed since load_pair, what it loaded
            # is not what was validated and described; read again.
            if self._stamps() == (info.cert_stamp, info.key_stamp):
                return info, contexts
        raise CertError("the certificate files kept changing while they were loaded")

    def reload(self) -> bool:
        """Re-read the pair; serve it to new connections if it is valid. True on success.

        A broken pair (missing, unparsable, mismatched) is refused: ERROR
        ``tls.reload.failed`` with the reason, and the old contexts stay in place.
        """
        with self._lock:
            try:
                info, contexts = self._build()
            except CertError as exc:
                self._failed = self._stamps()
                log.error(
                    "tls.reload.failed",
                    extra={
                        "reason": str(exc),
                        "cert": str(self._config.cert),
                        "key_file": str(self._config.key),
                        "serving": self._state.info.fingerprint,
                    },
                )
                return False
            old = self._state.info
            self._state = _Loaded(info, contexts)  # one assignment: the swap is atomic
            self._failed = None
        log.info(
            "tls.reload.ok",
            extra={**_info_fields(info), "changed": old.fingerprint != info.fingerprint},
        )
        self._check_health(info)
        return True

    async def watch(self) -> None:
        """Reload when the files change, checking every ``reload_interval`` seconds.

        Compares (mtime_ns, size, inode) of both files with the pair being served, so a
        certificate renewed by certbot (which repoints symlinks) or copied into place is
        served to new connections without a restart. A change must hold still for a short
        settle time first, because renewals replace the two files one after the other. A
        pair that failed is not retried (nor logged again) until the files change again.
        Runs until cancelled.
        """
        interval = self._config.reload_interval
        settle = min(1.0, interval / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                seen = self._stamps()
                info = self._state.info
                if seen == (info.cert_stamp, info.key_stamp) or seen == self._failed:
                    continue
                await asyncio.sleep(settle)
                if self._stamps() != seen:
                    continue  # still being written; look again next time
                self.reload()
            except Exception:
                # The watcher must outlive any surprise; the old contexts keep serving.
                log.exception("tls.watch.error")

    def _check_health(self, info: CertInfo) -> None:
        left = info.expires_in()
        if left <= dt.timedelta(0):
            log.error("tls.cert.expired", extra={"not_after": info.not_after.isoformat()})
        elif left <= EXPIRY_WARNING:
            log.warning(
                "tls.cert.expiring",
                extra={"not_after": info.not_after.isoformat(), "days_left": left.days},
            )
        if self._hostname and not info.covers(self._hostname):
            # RFC 7817 §3 (via RFC 6125): clients check the name they connected to against
            # the certificate's subjectAltName; this one will fail that check.
            log.warning(
                "tls.cert.name_mismatch",
                extra={"hostname": self._hostname, "names": ",".join(info.names)},
            )
        if info.key_mode & 0o007:
            log.warning(
                "tls.key.permissions",
                extra={"key_file": str(info.key_path), "mode": oct(info.key_mode)},
            )

    # -- client side ------------------------------------------------------------------

    def client_context(
        self,
        mode: str,
        *,
        cafile: Path | None = None,
        min_version: str | None = None,
        max_version: str | None = None,
        ciphers: str | None = None,
        alpn: Sequence[str] = (),
    ) -> ssl.SSLContext:
        """A context for outbound connections.

        - ``"opportunistic"``: MX delivery without MTA-STS/DANE (RFC 7435, RFC 3207 §4.1).
          No certificate check (an unauthenticated MX has nothing to check against), TLS
          1.0 or later, forward-secret suites only. Refusing a receiver's old TLS would
          mean delivering in plaintext, so the floor is as low as the server side's.
        - ``"verify"``: certificate and host name checked (RFC 7817 §3; MTA-STS
          RFC 8461 §4.2), TLS 1.2 or later, the system CAs plus those of ``cafile``.
        - ``"probe"``: no verification, every version and suite the local OpenSSL has
          (``@SECLEVEL=0``), so ``postkeep probe`` can *test* what a server accepts; pin a
          version with ``min_version``/``max_version`` and suites with ``ciphers``.

        ``min_version`` may raise the floor of any mode but lower it only for the probe.
        """
        if mode not in CLIENT_MODES:
            raise ValueError(f"unknown client mode {mode!r}; one of {', '.join(CLIENT_MODES)}")
        for name in (min_version, max_version):
            if name is not None and name not in _RANK:
                raise ValueError(f"unknown TLS version {name!r}")
        if ciphers is not None and mode != "probe":
            raise ValueError("cipher pins are for the probe only")

        if mode == "verify":
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
            if cafile is not None:
                # create_default_context trusts only ``cafile`` when given one; it adds
                # private CAs here, it does not replace the public ones.
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            floor = _MODERN_FLOOR
            suites = MODERN_CIPHERS
        else:
            if cafile is not None:
                raise ValueError(f"cafile is meaningless in {mode!r} mode (nothing is verified)")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            floor = "TLSv1"
            suites = LEGACY_CIPHERS if mode == "opportunistic" else PROBE_CIPHERS
        if min_version is not None:
            if mode != "probe" and _RANK[min_version] < _RANK[floor]:
                raise ValueError(f"{mode!r} mode does not go below {floor}")
            floor = min_version
        minimum = (
            ssl.TLSVersion.MINIMUM_SUPPORTED
            if mode == "probe" and min_version is None
            else _TLS_VERSION[floor]
        )
        maximum = _TLS_VERSION[max_version] if max_version else ssl.TLSVersion.MAXIMUM_SUPPORTED
        _set_versions(ctx, minimum, maximum)
        ctx.options |= ssl.OP_NO_SSLv2 | ssl.OP_NO_SSLv3 | ssl.OP_NO_COMPRESSION
        if ciphers is not None:
            # Pinned suites still need SECLEVEL=0 for the probe to reach TLS 1.0/1.1.
            suites = ciphers if "@SECLEVEL" in ciphers else f"{ciphers}:@SECLEVEL=0"
        ctx.set_ciphers(suites)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx


def _info_fields(info: CertInfo) -> dict[str, object]:
    return {
        "names": ",".join(info.names),
        "fingerprint": info.fingerprint,
        "serial": format(info.serial, "x"),
        "not_after": info.not_after.isoformat(),
        "key_type": info.key_type,
        "chain": info.chain_length,
        "self_signed": info.self_signed,
    }
