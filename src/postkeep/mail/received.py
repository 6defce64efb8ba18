"""The ``Received:`` trace field that ingest prepends to every message (RFC 5321 §4.4).

What it looks like (RFC 5322 §2.1.1: folded before 78 columns, one clause per line where
it fits; continuation lines start with a tab)::

    Received: from client.example (host.example [IPv6:2001:db8::1])
    \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))
    \tby mail.example.com with ESMTPSA id Q1234
    \tfor <bob@example.com> tls TLS_AES_256_GCM_SHA384;
    \tTue, 05 Mar 2024 14:07:09 +0100

- ``from``: the HELO/EHLO name as the client gave it when it is a syntactically valid
  domain or address literal, then the truth in the TCP-info comment: the reverse-DNS name
  (or ``unknown``) and the peer's address literal (RFC 5321 §4.4: "the name of the source
  host as presented in the EHLO command" and "the IP address of the source"). A HELO name
  that is not valid is replaced by the address literal and recorded, made safe, in a
  ``(helo=...)`` comment.
- the TLS comment records the protocol version and cipher (the RFC 8314 §4.3 guidance to
  record the TLS cipher in trace fields); when the cipher has an IANA name (``TLS_...``,
  which is what TLS 1.3 reports) it is also given as the registered ``tls`` clause.
- ``with``: the IANA "Mail Transmission Types" keyword: ESMTP / ESMTPS / ESMTPA / ESMTPSA
  (RFC 3848), UTF8SMTP... when SMTPUTF8 was used (RFC 6531 §3.7.3), LMTP... likewise.
- Authentication is recorded only by the ``A`` in that keyword. The user name is *not*
  written: the header travels with the message to every recipient, and which account sent
  it is between the user and us (privacy; the log has it). No SASL data, ever.
- ``for``: the recipient, when the caller gives one (it should only for a single-recipient
  transaction: listing one of several would disclose Bcc recipients).

Invariants:

- The result is one header field: it ends with CRLF, and every other CRLF in it is
  followed by a tab (a fold). No input can add a line, a field or a second CRLF.
- Client- or DNS-controlled values (HELO name, reverse-DNS name, recipient) are
  sanitised: no CR, LF, NUL or other control character survives; text placed in a comment
  contains no ``(``, ``)`` or ``\\`` (so it cannot close the comment and forge clauses);
  non-ASCII appears only in the recipient of a UTF8SMTP/UTF8LMTP transaction (RFC 6532).
- Values we produce (our hostname, the queue id, the peer address, the protocol) are
  validated and refused with ``ValueError`` when wrong: that is a bug, not an attack.
- Lines are at most 78 characters unless a single value (a 255-character HELO name, a
  256-character path) is longer; every value is capped, so no line exceeds RFC 5322's
  998-character limit.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from postkeep.mail.headers import format_date, is_hostname

__all__ = ["TlsInfo", "received_header", "with_keyword"]

#: RFC 5322 §2.1.1: lines SHOULD be no more than 78 characters, excluding the CRLF.
MAX_LINE = 78

_FOLD = "\r\n\t"  # RFC 5322 §2.2.3: CRLF then WSP; a tab is the customary one

# Caps on what we copy from outside, so no single token can approach 998 octets.
_MAX_HELO = 255  # RFC 5321 §4.5.3.1.2: a domain is at most 255 octets
_MAX_PATH = 256  # RFC 5321 §4.5.3.1.3: a path is at most 256 octets
_MAX_TLS_TEXT = 200

# RFC 5322 §3.2.3 atext, for the queue id (RFC 5321 §4.4: ID = CFWS "ID" FWS Atom / msg-id).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,64}\Z")

# RFC 8314 §4.3 tls clause: a cipher-suite name as registered by IANA ("TLS_" ...).
_IANA_CIPHER = re.compile(r"TLS_[A-Z0-9_]{1,80}\Z")

# The "with" bases we know, and whether S (TLS) and A (AUTH) variants are registered.
# RFC 3848 §2: ESMTPA, ESMTPS, ESMTPSA, LMTPA, LMTPS, LMTPSA. RFC 6531 §3.7.3: the same
# with a UTF8 prefix. Plain "SMTP" (a HELO session) has no S or A variants: RFC 3207 and
# RFC 4954 both need EHLO, so only implicit TLS can give HELO + TLS, and the TLS comment
# records that.
_WITH_BASES = {"SMTP": False, "ESMTP": True, "LMTP": True, "UTF8SMTP": True, "UTF8LMTP": True}


class _SslLike(Protocol):
    """What :meth:`TlsInfo.from_ssl` needs from an ``ssl.SSLObject``/``SSLSocket``."""

    def version(self) -> str | None: ...

    def cipher(self) -> tuple[str, str, int] | None: ...


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """The negotiated TLS parameters of the session, for the trace field."""

    version: str  # "TLSv1.3", from SSLObject.version()
    cipher: str  # "TLS_AES_256_GCM_SHA384", from SSLObject.cipher()[0]
    bits: int | None = None  # secret bits, SSLObject.cipher()[2]
    alg_bits: int | None = None  # the algorithm's bits, when known (else = bits)

    @classmethod
    def from_ssl(cls, ssl_object: _SslLike) -> TlsInfo | None:
        """From a live ``ssl.SSLObject``; ``None`` before the handshake has completed."""
        version, cipher = ssl_object.version(), ssl_object.cipher()
        if version is None or cipher is None:
            return None
        return cls(version=version, cipher=cipher[0], bits=cipher[2])

    def describe(self) -> str:
        """``TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)``."""
        text = f"{self.version} with cipher {self.cipher}"
        if self.bits is not None:
            alg = self.alg_bits if self.alg_bits is not None else self.bits
            text += f" ({self.bits}/{alg} bits)"
        return text


# Every registered keyword, mapped to its base, so a caller may pass either form.
_REGISTERED = {
    base + s + a: base
    for base, variants in _WITH_BASES.items()
    for s in (("", "S") if variants else ("",))
    for a in (("", "A") if variants else ("",))
}


def _base(protocol: str) -> str:
    base = _REGISTERED.get(protocol.upper())
    if base is None:
        raise ValueError("unknown protocol for the Received 'with' clause")
    return base


def with_keyword(protocol: str, *, tls: bool, authenticated: bool) -> str:
    """The registered ``with`` keyword (RFC 3848, RFC 6531 §3.7.3) for a session.

    ``protocol`` is the base: ``SMTP`` (HELO), ``ESMTP`` (EHLO), ``UTF8SMTP`` (EHLO and a
    MAIL FROM with SMTPUTF8), ``LMTP`` or ``UTF8LMTP``, case-insensitive. A complete
    keyword (``ESMTPSA``) is accepted too, but its S and A are recomputed from ``tls`` and
    ``authenticated``: the flags are the facts, so the two can never disagree.
    """
    base = _base(protocol)
    if not _WITH_BASES[base]:
        return base
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def _is_control(c: str) -> bool:
    return ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F


def _comment_text(text: str, limit: int) -> str:
    """Outside text for inside a comment: printable ASCII without ( ) \\ or spaces."""
    cut = text[:limit]
    safe = "".join(c if "!" <= c <= "~" and c not in "()\\" else "?" for c in cut)
    return safe + ("..." if len(text) > limit else "")


def _address_literal(ip: str) -> str:
    """RFC 5321 §4.1.3 address literal for the peer: ``[192.0.2.1]``, ``[IPv6:...]``."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # a zone id is local noise
    except ValueError:
        raise ValueError("peer_ip is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; say what it is.
            return f"[{addr.ipv4_mapped}]"
        return f"[IPv6:{addr.compressed}]"
    return f"[{addr}]"


def _helo_domain(helo: str) -> str | None:
    """The HELO name, if it is a valid Domain or address literal (RFC 5321 §4.1.1.1)."""
    name = helo[:-1] if helo.endswith(".") else helo
    if is_hostname(name):
        return name
    if helo.startswith("[") and helo.endswith("]"):
        inner = helo[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            return None
    return None


def _recipient(recipient: str, *, utf8: bool) -> str | None:
    """The recipient path, made safe for the ``for`` clause; ``None`` if nothing is left."""
    text = recipient.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    text = text[:_MAX_PATH]
    out = []
    for c in text:
        if _is_control(c) or c in "<>" or (not c.isascii() and (not utf8 or not c.isprintable())):
            # Controls (CR, LF, NUL, C1) could break the header; <> the path; non-ASCII is
            # legal only in a UTF8SMTP message (RFC 6532), and never an invisible or
            # line-separating character (U+2028 renders as a newline in some readers).
            out.append("?")
        else:
            out.append(c)
    safe = "".join(out)
    return f"<{safe}>" if safe.strip() else None


def _tls_words(tls: TlsInfo | str) -> list[str]:
    """The words of the TLS comment, inner parentheses only where they balance."""
    text = tls.describe() if isinstance(tls, TlsInfo) else tls
    text = "".join(
        "?" if _is_control(c) or c == "\\" or not c.isascii() else c for c in text[:_MAX_TLS_TEXT]
    )
    depth = 0
    for c in text:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            break
    if depth != 0:
        # Unbalanced parentheses would end our comment early: neutralise them all.
        text = text.replace("(", "?").replace(")", "?")
    return text.split()


def _iana_cipher(tls: TlsInfo | str | None) -> str | None:
    """The IANA-registered cipher-suite name of the session, if we know one."""
    if isinstance(tls, TlsInfo):
        candidates = [tls.cipher]
    elif tls is not None:
        # A description such as "TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)".
        candidates = tls[:_MAX_TLS_TEXT].split()
    else:
        return None
    names = [c for c in candidates if _IANA_CIPHER.match(c)]
    return names[0] if len(names) == 1 else None


def _comment(words: list[str]) -> list[str]:
    """Tokens of a comment ``(w1 w2 ...)``; folding may happen between the words."""
    if not words:
        return []
    tokens = list(words)
    tokens[0] = "(" + tokens[0]
    tokens[-1] += ")"
    return tokens


def _fold(name: str, groups: list[list[str]]) -> str:
    """``name: ...`` folded at MAX_LINE, ending with CRLF (RFC 5322 §2.2.3).

    Each group (a clause: "from ... (...)", the TLS comment, "by ... with ... id ...") is
    kept on one line when it fits, which puts the fold points where Postfix and readers
    expect them; a group longer than a line is folded between its words.
    """
    lines: list[list[str]] = [[]]  # the words of each output line

    def fits(extra: list[str]) -> bool:
        lead = len(name) + 2 if len(lines) == 1 else 1  # "Received: " or the fold's tab
        return lead + len(" ".join(lines[-1] + extra)) <= MAX_LINE

    for group in groups:
        if lines[-1] and not fits(group):
            lines.append([])
        for word in group:
            # Only a line that already has a word is ended: a folded line must not be all
            # white space (RFC 5322 §3.2.2), so an over-long word gets a line of its own.
            if lines[-1] and not fits([word]):
                lines.append([])
            lines[-1].append(word)
    first, *rest = (" ".join(words) for words in lines)
    return f"{name}: {first}" + "".join(f"{_FOLD}{line}" for line in rest) + "\r\n"


def received_header(
    *,
    helo: str,
    peer_ip: str,
    peer_host: str | None,
    by_host: str,
    protocol: str,
    tls: TlsInfo | str | None,
    authenticated: bool,
    queue_id: str,
    recipient: str | None,
    when: datetime,
) -> bytes:
    """The complete ``Received:`` field, folded and CRLF-terminated.

    ``helo``: the EHLO/HELO argument as sent (client-controlled). ``peer_ip``: the peer's
    address as the socket (or PROXY header) gave it. ``peer_host``: its verified
    reverse-DNS name, or ``None``. ``by_host``: our hostname. ``protocol``: the ``with``
    base, see :func:`with_keyword`. ``tls``: the session's :class:`TlsInfo` (or a
    description such as ``"TLSv1.3"``), ``None`` without TLS. ``recipient``: the single
    recipient, or ``None``. ``when``: an aware datetime.

    Raises ``ValueError`` when one of *our* values is wrong (``peer_ip``, ``by_host``,
    ``protocol``, ``queue_id``, a naive ``when``); client values are sanitised instead.
    """
    base = _base(protocol)
    keyword = with_keyword(base, tls=tls is not None, authenticated=authenticated)
    literal = _address_literal(peer_ip)
    if not is_hostname(by_host):
        raise ValueError("by_host is not a valid domain name")
    if not _ATOM.match(queue_id):
        raise ValueError("queue_id is not an RFC 5322 atom")
    date = format_date(when)

    # RFC 5321 §4.4: From-domain = "FROM" FWS Extended-Domain, where Extended-Domain is
    # the EHLO name followed by "(" TCP-info ")" with the name and address we saw.
    claimed = _helo_domain(helo)
    host = peer_host[:-1] if peer_host and peer_host.endswith(".") else peer_host
    # A PTR record can hold any octets; only a well-formed name is written.
    host_text = host if host and is_hostname(host) else "unknown"
    origin = [f"from {claimed or literal}", *_comment([host_text, literal])]
    if claimed is None:
        origin += _comment([f"helo={_comment_text(helo, _MAX_HELO)}"])
    groups = [origin]
    if tls is not None:
        groups.append(_comment(["using", *_tls_words(tls)]))
    # RFC 5321 §4.4: By-domain, then Opt-info = [Via] [With] [ID] [For]
    # [Additional-Registered-Clauses], then ";" date-time.
    groups.append([f"by {by_host}", f"with {keyword}", f"id {queue_id}"])
    tail: list[str] = []
    if recipient is not None:
        path = _recipient(recipient, utf8=base.startswith("UTF8"))
        if path is not None:
            tail.append(f"for {path}")
    cipher = _iana_cipher(tls)
    if cipher is not None:
        # RFC 8314 §4.3: the registered "tls" clause carries the IANA cipher-suite name.
        tail.append(f"tls {cipher}")
    if tail:
        groups.append(tail)
    groups[-1][-1] += ";"
    groups.append([date])
    return _fold("Received", groups).encode("utf-8")
