"""SMTP envelope address syntax: paths and mailboxes (RFC 5321 §4.1.2, RFC 6531 §3.3).

``parse_path("<user@Example.COM>", allow_null=False, utf8=False)`` returns the mailbox in
canonical form, ``"user@example.com"``; ``AddressError`` says why it is not an address, and
its ``kind`` tells a syntax error (501 5.1.3 / 5.1.7) from a non-ASCII address without
SMTPUTF8 (553 5.6.7).

Canonical form, decided here once for all of postkeep:

- The domain is lower-case and in **A-label** form (RFC 5890 §2.3.2.1): a U-label is
  NFC-normalised, lower-cased and Punycode-encoded (RFC 3492) as ``xn--…``, so
  ``bücher.example`` and ``xn--bcher-kva.example`` are the same domain everywhere
  (recipient lookup, aliases, the queue). The stdlib has no IDNA2008 table (RFC 5892) and
  its ``idna`` codec is IDNA2003 (it maps ``ß`` to ``ss``), so we use the plain Punycode
  codec and approximate the table: a U-label may hold ASCII letters, digits and hyphens
  and non-ASCII letters, marks and digits (Unicode categories L*, M*, N*), must not start
  with a mark, and must not have ``--`` in positions 3-4 (RFC 5891 §4.2.3.1-2). An
  ``xn--`` label that is not valid Punycode for a non-ASCII label is refused.
- Address literals are canonical too: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``
  (compressed). General address literals other than IPv6 are refused (no other tag is
  registered, RFC 5321 §4.1.3).
- The local part keeps its case (RFC 5321 §2.4: only the receiving host may decide that
  case does not matter; ``normalize()`` is where postkeep decides it). A quoted local part
  whose content is a valid dot-string is returned unquoted (``"john"@x`` is ``john@x``,
  RFC 5321 §4.1.2); otherwise it is re-quoted with only ``"`` and ``\\`` escaped.
- A source route (``<@a,@b:user@d>``) is checked and dropped (RFC 5321 §4.1.1.3, §C).

Invariants:
- Non-ASCII is accepted only when the caller says SMTPUTF8 was given (RFC 6531 §3.4);
  the text has then been decoded from strict UTF-8 by the caller. C0/C1 controls, line
  and paragraph separators and lone surrogates are never accepted.
- The null reverse-path ``<>`` is accepted only with ``allow_null`` (MAIL, RFC 5321
  §4.1.1.2) and is returned as ``""``.
- A path is at most 256 octets, a domain 255, a label 63 (RFC 5321 §4.5.3.1.2-3).
- ``parse_path`` and ``split_address`` return canonical text: parsing their output again
  gives the same output.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from enum import Enum, auto

#: RFC 5321 §4.5.3.1.3: reverse-path/forward-path, including "<", ">" and the route.
MAX_PATH = 256
#: RFC 5321 §4.5.3.1.2 and RFC 1035 §2.3.4.
MAX_DOMAIN = 255
MAX_LABEL = 63

# RFC 5322 §3.2.3 atext (RFC 5321 §4.1.2 Atom = 1*atext).
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
# RFC 5321 §4.1.2: Let-dig [Ldh-str].
_ASCII_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
# RFC 5321 §4.1.3: IPv4-address-literal = Snum 3("." Snum), Snum = 1*3DIGIT.
_IPV4 = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})")
# RFC 5321 §4.1.3: General-address-literal = Standardized-tag ":" 1*dcontent.
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
# Never inside an address, SMTPUTF8 or not.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


class AddressErrorKind(Enum):
    SYNTAX = auto()  # 501 5.1.3 (recipient) / 501 5.1.7 (sender)
    NON_ASCII = auto()  # 553 5.6.7 (RFC 6531 §3.5): UTF-8 without SMTPUTF8


class AddressError(ValueError):
    """The text is not an acceptable address; ``str(exc)`` is a sentence for a person."""

    def __init__(self, message: str, kind: AddressErrorKind = AddressErrorKind.SYNTAX) -> None:
        super().__init__(message)
        self.kind = kind


def parse_path(
    text: str, *, allow_null: bool, utf8: bool, postmaster_domain: str | None = None
) -> str:
    """Parse an RFC 5321 Reverse-path/Forward-path (with the angle brackets).

    Returns the canonical mailbox without brackets, or ``""`` for ``<>`` when
    ``allow_null``. With ``postmaster_domain``, the bare ``<Postmaster>`` of RCPT
    (RFC 5321 §4.1.1.3, §4.5.1) is accepted and returned as ``postmaster@<that domain>``.
    """
    _check_characters(text, utf8)
    if len(text.encode("utf-8")) > MAX_PATH:
        raise AddressError(f"Address longer than {MAX_PATH} octets")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("Address must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return ""  # RFC 5321 §4.1.1.2: the null reverse-path
        raise AddressError("Empty address <> is only allowed as a sender")
    if postmaster_domain is not None and inner.lower() == "postmaster":
        return f"postmaster@{_canonical_postmaster_domain(postmaster_domain)}"
    if inner.startswith("@"):
        # RFC 5321 §4.1.1.3 / Appendix C: A-d-l ":" Mailbox; servers SHOULD ignore the
        # route. At-domain = "@" Domain has no ":", so the first ":" ends the route.
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("Source route without ':'")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("Bad source route")
            _domain(hop[1:], utf8=utf8)
    return _mailbox(inner, utf8=utf8)


def parse_mailbox(text: str, *, utf8: bool) -> str:
    """Parse an RFC 5321 Mailbox (``local@domain``, no brackets) into canonical form."""
    _check_characters(text, utf8)
    if len(text.encode("utf-8")) > MAX_PATH - 2:
        raise AddressError(f"Address longer than {MAX_PATH} octets")
    return _mailbox(text, utf8=utf8)


def split_address(addr: str) -> tuple[str, str]:
    """``(local part, domain)`` of a mailbox; the domain in canonical form (A-label).

    The local part is returned as it appears in the canonical address (quoted if it needs
    quotes). UTF-8 is accepted: envelope addresses of SMTPUTF8 transactions are stored too.
    Raises ``AddressError`` for anything that is not ``local@domain``.
    """
    canonical = parse_mailbox(addr, utf8=True)
    local, _, domain = canonical.rpartition("@")
    return local, domain


def normalize(addr: str) -> str:
    """The form postkeep compares and stores: canonical, local part and domain lower-case.

    ``""`` (the null sender) stays ``""``.
    """
    if addr == "":
        return ""
    local, domain = split_address(addr)
    return f"{local.lower()}@{domain}"


def normalize_domain(domain: str, *, utf8: bool = True) -> str:
    """A domain (no literal) as lower-case A-labels; raises ``AddressError``."""
    _check_characters(domain, utf8)
    return _domain(domain, utf8=utf8)


def quote_local_part(local: str) -> str:
    """The canonical (minimally quoted) form of a raw local part (RFC 5321 §4.1.2)."""
    if _is_dot_string(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


# -- internals ---------------------------------------------------------------------------
def _check_characters(text: str, utf8: bool) -> None:
    if not text.isascii():
        if not utf8:
            # RFC 6531 §3.5: non-ASCII only in an SMTPUTF8 transaction.
            raise AddressError(
                "Non-ASCII address without SMTPUTF8", AddressErrorKind.NON_ASCII
            )
        for ch in text:
            if ord(ch) > 0x7F and unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
                raise AddressError("Control or separator character in address")
    for ch in text:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise AddressError("Control character in address")


def _is_dot_string(local: str) -> bool:
    # RFC 5321 §4.1.2: Dot-string = Atom *("." Atom); RFC 6531 §3.3 adds UTF8-non-ascii
    # to atext (the caller has already decided whether non-ASCII is allowed).
    if local == "":
        return False
    for atom in local.split("."):
        if atom == "" or not all(ch in _ATEXT or ord(ch) > 0x7F for ch in atom):
            return False
    return True


def _mailbox(text: str, *, utf8: bool) -> str:
    # RFC 5321 §4.1.2: Mailbox = Local-part "@" ( Domain / address-literal ).
    if text.startswith('"'):
        local, rest = _quoted_local(text, utf8=utf8)
    else:
        at = text.find("@")
        if at < 0:
            raise AddressError("Address must be user@domain")
        local, rest = text[:at], text[at:]
        if not _is_dot_string(local):
            raise AddressError("Bad local part")
    if not rest.startswith("@") or len(rest) < 2:
        raise AddressError("Address must be user@domain")
    where = rest[1:]
    domain = _address_literal(where) if where.startswith("[") else _domain(where, utf8=utf8)
    return f"{local}@{domain}"


def _quoted_local(text: str, *, utf8: bool) -> tuple[str, str]:
    """RFC 5321 §4.1.2 Quoted-string; returns (canonical local part, rest from "@")."""
    out: list[str] = []
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            # quoted-pairSMTP = %d92 %d32-126
            if i + 1 >= len(text) or not 32 <= ord(text[i + 1]) <= 126:
                raise AddressError("Bad quoted pair in local part")
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return quote_local_part("".join(out)), text[i + 1 :]
        # qtextSMTP = %d32-33 / %d35-91 / %d93-126, plus UTF8-non-ascii (RFC 6531 §3.3)
        if not (32 <= ord(ch) <= 126 or (utf8 and ord(ch) > 0x7F)):
            raise AddressError("Bad character in quoted local part")
        out.append(ch)
        i += 1
    raise AddressError("Unterminated quoted local part")


def _address_literal(text: str) -> str:
    # RFC 5321 §4.1.3: "[" ( IPv4 / IPv6 / General-address-literal ) "]"
    if len(text) < 3 or not text.endswith("]"):
        raise AddressError("Bad address literal")
    inner = text[1:-1]
    m = _IPV4.fullmatch(inner)
    if m:
        octets = [int(g) for g in m.groups()]
        if any(o > 255 for o in octets):
            raise AddressError("Bad IPv4 address literal")
        return "[" + ".".join(str(o) for o in octets) + "]"
    if inner[:5].lower() == "ipv6:":
        try:
            ip6 = ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise AddressError("Bad IPv6 address literal") from None
        if ip6.scope_id is not None:
            raise AddressError("Bad IPv6 address literal")
        return f"[IPv6:{ip6.compressed}]"
    if _GENERAL_LITERAL.fullmatch(inner):
        raise AddressError("Unsupported address literal (only IPv4 and IPv6)")
    raise AddressError("Bad address literal")


def _domain(text: str, *, utf8: bool) -> str:
    # RFC 5321 §4.1.2: Domain = sub-domain *("." sub-domain); RFC 6531 §3.3 adds U-label.
    if text == "":
        raise AddressError("Empty domain")
    labels = [_label(label, utf8=utf8) for label in text.split(".")]
    domain = ".".join(labels)
    if len(domain) > MAX_DOMAIN:
        raise AddressError(f"Domain longer than {MAX_DOMAIN} octets")
    return domain


def _label(label: str, *, utf8: bool) -> str:
    if label == "":
        raise AddressError("Empty label in domain")
    if label.isascii():
        if not _ASCII_LABEL.fullmatch(label):
            raise AddressError("Bad domain name")
        label = label.lower()
        if label.startswith("xn--"):
            _check_a_label(label)
    else:
        if not utf8:
            raise AddressError("Non-ASCII domain without SMTPUTF8", AddressErrorKind.NON_ASCII)
        label = _u_label_to_a_label(label)
    if len(label) > MAX_LABEL:
        raise AddressError(f"Domain label longer than {MAX_LABEL} octets")
    return label


def _u_label_to_a_label(label: str) -> str:
    label = unicodedata.normalize("NFC", label.lower())
    if label[0] == "-" or label[-1] == "-" or label[2:4] == "--":
        raise AddressError("Bad internationalized domain label")  # RFC 5891 §4.2.3.1
    if unicodedata.category(label[0]).startswith("M"):
        raise AddressError("Bad internationalized domain label")  # RFC 5891 §4.2.3.2
    for ch in label:
        if ch.isascii():
            if not (ch.isalnum() or ch == "-"):
                raise AddressError("Bad internationalized domain label")
        elif unicodedata.category(ch)[0] not in "LMN":
            raise AddressError("Character not allowed in a domain name")
    return "xn--" + label.encode("punycode").decode("ascii")


def _check_a_label(label: str) -> None:
    """An ``xn--`` label must be the Punycode of a non-ASCII label (RFC 5890 §2.3.2.1)."""
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except (UnicodeError, ValueError):
        raise AddressError("Bad A-label in domain") from None
    if decoded.isascii() or decoded == "":
        raise AddressError("Bad A-label in domain")
    try:
        again = _u_label_to_a_label(decoded)
    except AddressError:
        raise AddressError("Bad A-label in domain") from None
    if again != label:
        raise AddressError("A-label is not in canonical form")


def _canonical_postmaster_domain(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except AddressError:
        return domain.lower()
