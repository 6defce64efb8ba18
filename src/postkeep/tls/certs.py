"""Certificates: check a certificate/key pair, describe it, and make a self-signed one.

``load_pair`` is what both ``config/load.py`` (at start, to refuse a broken pair with a
message naming the key) and ``tls/policy.py`` (on every reload) call before a pair is ever
given to OpenSSL. ``generate_self_signed`` is what ``postkeep init`` uses when the operator
has no certificate yet.

The self-signed key is RSA 2048, not EC P-256. P-256 is smaller and faster, but the point
of a self-signed certificate here is a first start that works with every client; the
clients that ``legacy_clients`` exists for (old printers, phones, MTAs with old TLS
stacks) are exactly the ones that may know only RSA certificates, and on port 25 a failed
handshake can mean the sender retries in plaintext (RFC 7435). A real deployment replaces
it with a CA-issued certificate (either key type works with ``tls/policy.py``).

Invariants:
- ``load_pair`` returns only for a pair OpenSSL will serve: the certificate file holds a
  PEM chain, leaf first, each certificate issued by the next one; the key is an
  unencrypted RSA (≥ 2048 bits) or EC (P-256/384/521) key whose public half is the leaf's.
- A ``CertInfo`` describes exactly the bytes that were validated: the files are stat()ed
  before and after reading, and a pair that changed while being read is read again.
- A private key file is never readable by anyone but its owner, not even for a moment:
  it is created 0600 under a temporary name, fsynced, then renamed over the target, so a
  watcher (``TlsPolicy.watch``) never sees half a key.
- Nothing here logs, returns or puts key material in an exception message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Smallest RSA key accepted (NIST SP 800-57; OpenSSL security level 2 refuses less).
MIN_RSA_BITS = 2048
#: EC curves that mail clients can verify (RFC 8422 §5.1.1 named curves in wide use).
ALLOWED_CURVES = ("secp256r1", "secp384r1", "secp521r1")

_READ_ATTEMPTS = 3


class CertError(Exception):
    """A certificate or key file that cannot be served, with the reason in plain words.

    ``path`` is the file at fault (the certificate or the key), so that the config loader
    can blame ``[tls] cert`` or ``[tls] key``.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What ``TlsPolicy.watch`` compares to notice a changed file without reading it."""

    mtime_ns: int
    size: int
    inode: int


def file_stamp(path: Path) -> FileStamp:
    """Stamp of ``path``, following symlinks (certbot's ``live/`` files are symlinks to
    ``archive/``; a renewal points them at new files, which changes the inode)."""
    st = os.stat(path)
    return FileStamp(mtime_ns=st.st_mtime_ns, size=st.st_size, inode=st.st_ino)


def fingerprint(der: bytes) -> str:
    """SHA-256 fingerprint as ``openssl x509 -fingerprint -sha256`` prints it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


@dataclass(frozen=True, slots=True)
class CertInfo:
    """A validated certificate/key pair, for logs, the probe, and reload decisions."""

    cert_path: Path
    key_path: Path
    subject: str  # RFC 4514 string of the leaf's subject
    issuer: str
    names: tuple[str, ...]  # subjectAltName dNSNames and IP addresses (the CN if none)
    serial: int
    not_before: dt.datetime  # aware, UTC
    not_after: dt.datetime  # aware, UTC
    fingerprint: str  # SHA-256 of the leaf (DER), "AB:CD:…"
    chain_length: int  # certificates in the file, leaf included
    key_type: str  # "RSA 2048", "EC secp256r1"
    self_signed: bool
    key_mode: int  # permission bits of the key file (0o600 …)
    cert_stamp: FileStamp
    key_stamp: FileStamp

    def covers(self, hostname: str) -> bool:
        """Whether a client checking ``hostname`` accepts this certificate's names.

        RFC 7817 §3 applies RFC 6125 to email: the reference identity is the host name the
        client connected to (the MX host name, or the configured IMAP/SMTP server name). A
        wildcard is honoured only as the whole left-most label and stands for exactly one
        label (RFC 6125 §6.4.3).
        """
        host = hostname.rstrip(".").lower()
        for name in self.names:
            pattern = name.rstrip(".").lower()
            if pattern == host:
                return True
            if pattern.startswith("*.") and "." in host:
                first, rest = host.split(".", 1)
                if first and rest == pattern[2:]:
                    return True
        return False

    def expires_in(self, now: dt.datetime | None = None) -> dt.timedelta:
        return self.not_after - (now or dt.datetime.now(dt.UTC))


def _read_stable(path: Path, what: str) -> tuple[bytes, FileStamp]:
    """Read a file whose stamp did not change while it was read."""
    for _ in range(_READ_ATTEMPTS):
        try:
            before = file_stamp(path)
            data = path.read_bytes()
            after = file_stamp(path)
        except FileNotFoundError:
            raise CertError(f"{what} file {path} does not exist", path) from None
        except IsADirectoryError:
            raise CertError(f"{what} file {path} is a directory", path) from None
        except PermissionError:
            raise CertError(
                f"{what} file {path} is not readable by this user (uid {os.getuid()})", path
            ) from None
        except OSError as exc:
            raise CertError(f"cannot read {what} file {path}: {exc.strerror}", path) from None
        if before == after:
            return data, before
    raise CertError(f"{what} file {path} kept changing while it was read", path)


def _parse_chain(path: Path, data: bytes, *, combined: bool) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertError(f"certificate file {path} contains no PEM certificate", path)
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertError(f"certificate file {path} is not a valid PEM chain: {exc}", path) from None
    if b"PRIVATE KEY-----" in data and not combined:
        # Not fatal for OpenSSL, but certificate files are usually world-readable. A file
        # named as both [tls] cert and [tls] key is a deliberate combined file: allowed.
        raise CertError(
            f"certificate file {path} also contains a private key; keep the key only in the "
            "[tls] key file",
            path,
        )
    for i in range(len(chain) - 1):
        if chain[i].issuer != chain[i + 1].subject:
            # Clients build the path from what we send, in order (RFC 8446 §4.4.2, RFC 5246
            # §7.4.2): the leaf first, then each issuer.
            raise CertError(
                f"certificate file {path}: certificate {i + 2} did not issue certificate "
                f"{i + 1}; put the server certificate first, then its intermediates "
                "(certbot: fullchain.pem)",
                path,
            )
    return chain


def _parse_key(path: Path, data: bytes) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertError(
            f"key file {path} is encrypted; postkeep needs an unencrypted key "
            "(protect it with file permissions, 0600)",
            path,
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"key file {path} does not contain a PEM private key", path) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise CertError(
                f"key file {path}: RSA key of {key.key_size} bits is too weak; "
                f"use at least {MIN_RSA_BITS}",
                path,
            )
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise CertError(
                f"key file {path}: EC curve {key.curve.name} is not one mail clients support "
                f"(use {', '.join(ALLOWED_CURVES)})",
                path,
            )
        return key
    raise CertError(f"key file {path}: only RSA and EC keys are supported by mail clients", path)


def _key_type(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    return f"EC {key.curve.name}"


def _spki(key: object) -> bytes:
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        # RFC 6125 §6.4.4: the CN is only a fallback when there is no subjectAltName.
        return tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (*dns, *ips)


def load_pair(cert: Path, key: Path) -> CertInfo:
    """Validate a certificate chain file and its key file; describe the pair.

    Raises ``CertError`` (with ``path`` set to the file at fault) when a file is missing,
    unreadable, not PEM, out of order, or when the key is not the certificate's.
    """
    for _ in range(_READ_ATTEMPTS):
        cert_data, cert_stamp = _read_stable(cert, "certificate")
        key_data, key_stamp = _read_stable(key, "key")
        # A renewal replaces both files one after the other: if the certificate changed
        # while we read the key, read the pair again rather than judge a mixed pair.
        try:
            stable = file_stamp(cert) == cert_stamp
        except OSError:
            stable = False  # replaced right now: the next attempt reports or reads it
        if stable:
            break
    else:
        raise CertError(f"certificate file {cert} kept changing while it was read", cert)
    chain = _parse_chain(cert, cert_data, combined=cert == key)
    private_key = _parse_key(key, key_data)
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(private_key.public_key()):
        raise CertError(
            f"key file {key} does not match the certificate in {cert} "
            "(the key belongs to another certificate)",
            key,
        )
    key_mode = stat.S_IMODE(os.stat(key).st_mode)
    return CertInfo(
        cert_path=cert,
        key_path=key,
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        names=_names(leaf),
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        fingerprint=fingerprint(leaf.public_bytes(serialization.Encoding.DER)),
        chain_length=len(chain),
        key_type=_key_type(private_key),
        self_signed=leaf.issuer == leaf.subject,
        key_mode=key_mode,
        cert_stamp=cert_stamp,
        key_stamp=key_stamp,
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole.

    ``mkstemp`` creates the file 0600, so a key is never readable by others, even before
    the chmod; the rename is atomic within a directory (POSIX rename(2)).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable: a crash must not leave the old name pointing nowhere.
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or not name.isascii():
        # RFC 5280 §4.2.1.6 / RFC 7817 §3: dNSName holds A-labels (IDNA), never U-labels.
        raise ValueError(f"{name!r} is not an ASCII host name; use its IDNA (xn--) form")
    return x509.DNSName(name.lower())


def generate_self_signed(
    hostname: str,
    cert_path: Path,
    key_path: Path,
    *,
    days: int = 825,
    extra_names: Sequence[str] = (),
) -> None:
    """Write a new RSA 2048 key (0600) and a self-signed certificate for ``hostname``.

    The names go into subjectAltName (``hostname`` first, then ``extra_names``; an IP
    address becomes an iPAddress entry), which is what clients check (RFC 7817 §3, RFC 6125
    §6.4.4). The key is written before the certificate, each atomically.
    """
    if days <= 0:
        raise ValueError("days must be positive")
    names: list[str] = []
    for name in (hostname, *extra_names):
        if name.lower() not in names:
            names.append(name.lower())
    general_names = [_general_name(n) for n in names]

    key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    # The CN is informational (clients match the SAN); X.520 caps it at 64 characters.
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "postkeep self-signed")]
    if len(hostname) <= 64:
        attrs.insert(0, x509.NameAttribute(NameOID.COMMON_NAME, hostname.lower()))
    subject = x509.Name(attrs)
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        # An hour of slack for clients whose clock is a little behind ours.
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(key_path, key_pem, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
