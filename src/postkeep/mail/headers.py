"""Byte-exact helpers for a message's header section (RFC 5322 §2.1, §2.2).

``ingest.py`` uses these to find the header block, to ask whether a field is present and
to add the ``Message-ID:`` and ``Date:`` fields that submitted mail may lack (RFC 6409
§8.2, §8.3). Nothing here parses MIME or rewrites existing bytes: messages are stored
exactly as received, and we only ever *prepend* fields.

Invariants:

- :func:`split_header` is lossless: ``header + body == data`` for every input.
- A field is recognised only at the start of a header line: continuation lines (RFC 5322
  §2.2.3, starting with SP or HTAB) and anything after the empty line that ends the
  header section are never mistaken for a field, so a ``Date:`` line in the body does
  not count.
- Everything generated here is ASCII, CRLF-terminated, and built only from values we
  produce or validate (our hostname, random tokens, a formatted date): no client data.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from datetime import UTC, datetime, timedelta

__all__ = [
    "format_date",
    "has_field",
    "is_hostname",
    "make_message_id",
    "missing_submission_headers",
    "split_header",
]

_CRLF = b"\r\n"

# RFC 5322 §3.6.8: field-name = 1*ftext; ftext = %d33-57 / %d59-126 (printable, no ":").
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")

# Our hostname goes into the id-right of a msg-id (RFC 5322 §3.6.4) as a dot-atom-text;
# we insist on an RFC 5321 Domain, which is stricter.
_DOMAIN = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """Split a message into (header block, body), losslessly.

    The header block runs up to and including the empty line (``CRLF CRLF``) that ends it
    (RFC 5322 §2.1). A message that starts with ``CRLF`` has an empty header section and
    the block is just that ``CRLF``. Without an empty line, all of ``data`` is header.
    """
    if data.startswith(_CRLF):
        return data[:2], data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[: end + 4], data[end + 4 :]


def has_field(header_block: bytes, name: str) -> bool:
    """Whether the header section has a field called ``name`` (case-insensitive).

    Only lines that start a field count: folded continuation lines are part of the field
    above them (RFC 5322 §2.2.3), and scanning stops at the empty line, so a body given by
    mistake is not searched. ``Name :`` (white space before the colon) is recognised too,
    as RFC 5322 §4.5 obs-optional allows and as readers treat it.
    """
    wanted = name.encode("ascii", "strict") if name.isascii() else b""
    if not _FIELD_NAME.fullmatch(wanted):
        raise ValueError("not an RFC 5322 field name")
    wanted = wanted.lower()
    for line in header_block.split(_CRLF):
        if not line:
            break  # RFC 5322 §2.1: the empty line ends the header section
        if line[:1] in (b" ", b"\t"):
            continue  # continuation of the previous field, never a field of its own
        colon = line.find(b":")
        if colon <= 0:
            continue  # not a field line (e.g. an mbox "From " line)
        field_name = line[:colon].rstrip(b" \t")
        if _FIELD_NAME.fullmatch(field_name) and field_name.lower() == wanted:
            return True
    return False


def is_hostname(name: str) -> bool:
    """Whether ``name`` is an RFC 5321 §4.1.2 Domain (LDH labels, ASCII, ≤ 253 octets)."""
    return _DOMAIN.match(name) is not None


def _check_hostname(hostname: str) -> str:
    if not is_hostname(hostname):
        raise ValueError("hostname is not a valid domain name")
    return hostname


def make_message_id(hostname: str) -> str:
    """A new msg-id ``<random@hostname>`` (RFC 5322 §3.6.4).

    128 random bits make it unique without a counter or a clock (RFC 5322 §3.6.4 asks the
    generating host to guarantee uniqueness); hex keeps the id-left a dot-atom-text.
    """
    return f"<{secrets.token_hex(16)}@{_check_hostname(hostname)}>"


def format_date(dt: datetime | None = None) -> str:
    """``dt`` (default: now, in local time) as an RFC 5322 §3.3 date-time.

    E.g. ``Tue, 05 Mar 2024 14:07:09 +0100``. A naive ``datetime`` is refused: its zone is
    unknown, and RFC 5322 §3.3 would make us write ``-0000`` ("no idea"), which is never
    what our own clock means.
    """
    if dt is None:
        dt = datetime.now().astimezone()
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("format_date needs an aware datetime")
    offset = dt.utcoffset()
    if offset is not None and offset % timedelta(minutes=1):
        # RFC 5322 §3.3 zone = ("+" / "-") 4DIGIT: hours and minutes only. Historical
        # local-mean-time offsets have seconds; email.utils would emit "+010030".
        dt = dt.astimezone(UTC)
    return email.utils.format_datetime(dt)


def missing_submission_headers(header_block: bytes, hostname: str, now: datetime) -> bytes:
    """The ``Message-ID:`` and ``Date:`` lines to prepend to submitted mail, if missing.

    RFC 6409 §8.2 (Date) and §8.3 (Message-ID): a submission server MAY add them when the
    client did not. Returns CRLF-terminated lines, or ``b""`` when both are present.
    """
    added: list[str] = []
    if not has_field(header_block, "Message-ID"):
        added.append(f"Message-ID: {make_message_id(hostname)}\r\n")
    if not has_field(header_block, "Date"):
        added.append(f"Date: {format_date(now)}\r\n")
    return "".join(added).encode("ascii")
