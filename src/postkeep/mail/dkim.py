"""DKIM signing of outgoing mail (RFC 6376), with an Ed25519 and an RSA key per domain.

Every local domain gets two keys when it is added (``postkeep domain add``):

- Ed25519 (RFC 8463), selector ``pk-ed-<yyyymm>``: small, fast, the future;
- RSA-2048 (RFC 8301 §3.2: at least 1024 bits, 2048 recommended), selector
  ``pk-rsa-<yyyymm>``: what every verifier understands today.

``<yyyymm>`` is the month the key was made, so a new key (rotation) gets a new selector and
both can be published side by side while the old signatures age out. A message is signed
with both keys (RFC 8463 §1 recommends dual signing until Ed25519 is understood
everywhere): a verifier that knows Ed25519 checks that signature, one that does not
ignores it (RFC 6376 §6.1: unknown algorithms are not a failure) and checks the RSA one.

What is signed (RFC 6376 §5.4):

- canonicalization ``relaxed/relaxed`` (§3.4.2, §3.4.4): survives the re-folding and
  trailing-space changes that relays make;
- the header fields readers see and rely on: From, To, Cc, Subject, Date, Message-ID,
  Reply-To, Sender, In-Reply-To, References, the MIME fields and the List-* fields, every
  occurrence present. Those that RFC 5322 §3.6 allows only once are signed one extra
  time ("oversigned", RFC 6376 §8.15), so nobody can add a second From or Subject that
  a mail program would show instead of the signed one;
- the whole body: no ``l=`` (§8.2: a length limit lets anyone append content).

Keys are stored as PKCS#8 PEM (``private_pem``) in the store, so every node signs with the
same keys. ``dns_txt`` gives the ``v=DKIM1; k=…; p=…`` text to publish at
``<selector>._domainkey.<domain>``: for Ed25519 ``p=`` is the raw 32-byte public key
(RFC 8463 §4.2), for RSA the DER SubjectPublicKeyInfo (RFC 6376 §3.6.1).

Invariants:
- ``sign`` never changes the message: it returns header lines to prepend, CRLF-terminated.
- Only From/To/…-type fields are signed; trace fields (Received, Return-Path) never are
  (RFC 6376 §5.4.1: they change in transit).
- With several keys of one algorithm, the newest signs.
"""

from __future__ import annotations

import base64
import email.utils
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ED25519 = "ed25519"
RSA = "rsa"
#: The order signatures are prepended in, and their RFC 6376/8463 ``a=`` values.
ALGORITHMS: dict[str, bytes] = {ED25519: b"ed25519-sha256", RSA: b"rsa-sha256"}
SELECTOR_PREFIX = {ED25519: "pk-ed-", RSA: "pk-rsa-"}
RSA_BITS = 2048

#: Header fields signed when present, each occurrence (RFC 6376 §5.4.1 list, trimmed to
#: what a reader sees or a threading program uses).
SIGNED_FIELDS: tuple[str, ...] = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type",
    "content-transfer-encoding",
)
#: Also signed: every List-* field (RFC 2369, RFC 2919), when present.
SIGNED_PREFIXES: tuple[str, ...] = ("list-",)
#: RFC 5322 §3.6 (and RFC 2045 for the MIME fields): at most one each. Signed once more
#: than present (RFC 6376 §8.15), so an added second instance breaks the signature.
SINGLETONS: frozenset[str] = frozenset(
    ("from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
     "in-reply-to", "references", "mime-version", "content-type",
     "content-transfer-encoding")
)


class DkimError(Exception):
    """A key that cannot be used, or a message that cannot be signed (no From)."""


class SigningKey(Protocol):
    """What ``sign`` needs of a key; ``store.api.DkimKey`` is one."""

    @property
    def selector(self) -> str: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def private_pem(self) -> str: ...


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly generated key, ready for ``WriteTx.add_dkim_key``."""

    selector: str
    algorithm: str
    private_pem: str
    public_txt: str


def selector_for(algorithm: str, when: datetime | None = None) -> str:
    """``pk-ed-202611`` / ``pk-rsa-202611``: a DNS label (RFC 6376 §3.1), unique per month."""
    when = when or datetime.now(UTC)
    return f"{SELECTOR_PREFIX[algorithm]}{when:%Y%m}"


def generate(algorithm: str, when: datetime | None = None) -> NewKey:
    """A new private key of ``algorithm`` (``"ed25519"`` or ``"rsa"``)."""
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == ED25519:
        key = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == RSA:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    else:
        raise DkimError(f"unknown DKIM key algorithm {algorithm!r}")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return NewKey(selector_for(algorithm, when), algorithm, pem, _public_txt(algorithm, pem))


def generate_pair(when: datetime | None = None) -> tuple[NewKey, NewKey]:
    """The two keys every domain gets: Ed25519 and RSA-2048."""
    return generate(ED25519, when), generate(RSA, when)


def dns_txt(key: SigningKey) -> str:
    """The TXT record text for ``<selector>._domainkey.<domain>``."""
    return _public_txt(key.algorithm, key.private_pem)


def record_name(selector: str, domain: str) -> str:
    """RFC 6376 §3.6.2.1: where the public key is published."""
    return f"{selector}._domainkey.{domain.rstrip('.').lower()}"


@functools.lru_cache(maxsize=64)
def _public_txt(algorithm: str, private_pem: str) -> str:
    key = _load(private_pem)
    if algorithm == ED25519 and isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    elif algorithm == RSA and isinstance(key, rsa.RSAPrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        raise DkimError(f"the key is not an {algorithm} key")
    # RFC 6376 §3.6.1: v=DKIM1 first; k= the key type; p= base64 of the public key.
    return f"v=DKIM1; k={algorithm}; p={base64.b64encode(raw).decode('ascii')}"


@functools.lru_cache(maxsize=64)
def _dkimpy_key(algorithm: str, private_pem: str) -> bytes:
    """The private key in the form dkimpy signs with (cached: parsing RSA is slow)."""
    key = _load(private_pem)
    if algorithm == ED25519 and isinstance(key, ed25519.Ed25519PrivateKey):
        # dkimpy (PyNaCl) takes the 32-byte seed, base64-encoded.
        return base64.b64encode(key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()))
    if algorithm == RSA and isinstance(key, rsa.RSAPrivateKey):
        # dkimpy parses PKCS#1 RSAPrivateKey PEM.
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption())
    raise DkimError(f"the key is not an {algorithm} key")


def _load(private_pem: str) -> object:
    try:
        return serialization.load_pem_private_key(private_pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise DkimError("the DKIM private key cannot be read") from exc


def signing_keys(keys: Iterable[SigningKey]) -> list[SigningKey]:
    """The newest key of each algorithm, Ed25519 first.

    Selectors embed the month, so the greatest selector of an algorithm is its newest key.
    """
    newest: dict[str, SigningKey] = {}
    for key in keys:
        if key.algorithm in ALGORITHMS and (
            key.algorithm not in newest or key.selector > newest[key.algorithm].selector
        ):
            newest[key.algorithm] = key
    return [newest[a] for a in ALGORITHMS if a in newest]


def _fields(header_block: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field of the header section, in order."""
    fields: list[tuple[str, str]] = []
    for line in header_block.split(b"\r\n"):
        if not line:
            break  # RFC 5322 §2.1: the empty line ends the header section
        text = line.decode("latin-1")  # names are ASCII; values are only searched for "@"
        if line[:1] in (b" ", b"\t"):
            if fields:  # RFC 5322 §2.2.3: a folded continuation of the field above
                fields[-1] = (fields[-1][0], fields[-1][1] + text)
            continue
        name, colon, value = text.partition(":")
        if colon:
            fields.append((name.strip().lower(), value))
    return fields


def header_names(message: bytes) -> list[str]:
    """The field names of the header section, in order, lower-case."""
    return [name for name, _ in _fields(message)]


def fields_to_sign(names: Sequence[str]) -> list[str]:
    """The ``h=`` list: each signed field once per occurrence, singletons once more."""
    present = [
        n for n in names
        if n.isascii() and (n in SIGNED_FIELDS or n.startswith(SIGNED_PREFIXES))
    ]
    extra = [n for n in dict.fromkeys(present) if n in SINGLETONS]
    return present + extra


def from_domain(header_block: bytes) -> str | None:
    """The domain of the From address: the one DMARC aligns with (RFC 7489 §3.1).

    None when there is no From field, more than one, or it holds other than one address.
    """
    values = [value for name, value in _fields(header_block) if name == "from"]
    if len(values) != 1:
        return None
    addresses = [a for _, a in email.utils.getaddresses([values[0]]) if "@" in a]
    if len(addresses) != 1:
        return None
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    return domain or None


def sign(message: bytes, domain: str, keys: Sequence[SigningKey]) -> bytes:
    """DKIM-Signature fields for ``message`` as ``d=domain``, to prepend to it.

    One signature per algorithm (the newest key of each), Ed25519 first. ``message`` is the
    whole message with CRLF line ends, exactly as it will be sent. Returns b"" when there
    is no usable key. Raises ``DkimError`` when the message has no From field or a key
    cannot be used.
    """
    chosen = signing_keys(keys)
    if not chosen:
        return b""
    include = fields_to_sign(header_names(message))
    if "from" not in include:
        raise DkimError("a message without a From field cannot be signed (RFC 6376 §5.4)")
    try:
        d = domain.rstrip(".").lower().encode("ascii")
    except UnicodeEncodeError as exc:  # RFC 6376 §3.5: d= holds A-labels
        raise DkimError(f"the signing domain {domain!r} is not in A-label form") from exc
    out: list[bytes] = []
    for key in chosen:
        signer = dkim.DKIM(message, linesep=b"\r\n")
        try:
            field = signer.sign(
                key.selector.encode("ascii"), d, _dkimpy_key(key.algorithm, key.private_pem),
                signature_algorithm=ALGORITHMS[key.algorithm],
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[h.encode("ascii") for h in include],
                length=False,
            )
        except dkim.DKIMException as exc:
            raise DkimError(f"DKIM signing with {key.selector} failed: {exc}") from exc
        out.append(field if field.endswith(b"\r\n") else field + b"\r\n")
    return b"".join(out)
