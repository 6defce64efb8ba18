"""A message's MIME structure, analysed once at ingest for IMAP (RFC 3501 §7.4.2, RFC 9051).

``analyze(data)`` walks the stored bytes of a message once and returns an :class:`Analysis`:
the ENVELOPE, the BODY and BODYSTRUCTURE values, and the byte range of every section that
``FETCH BODY[section]`` can name. ``ingest`` stores it (``Analysis.to_json`` — or the two
columns ``envelope_json`` / ``structure_json``), so FETCH never parses MIME again:
:func:`section_range` maps a section to ``(start, end)`` in the stored bytes and
:func:`header_fields` filters a header range for ``HEADER.FIELDS`` / ``.NOT``. SEARCH uses
:func:`decoded_header`, :func:`text_for_search` and :func:`header_date`, which do decode.

Values are nested Python values in IMAP order, ready for ``imap.responses``: ``str`` (a
string), ``int`` (a number), ``None`` (NIL) and ``list`` (a parenthesised list). Choices:

- Media type, subtype, parameter *names*, the transfer encoding and the disposition type are
  upper-cased (ASCII only), as in RFC 3501's examples (``("TEXT" "PLAIN" ("CHARSET"
  "US-ASCII") …)``); parameter *values* are kept as written. Clients compare these
  case-insensitively (RFC 2045 §5.1). RFC 2231 parameters (``FILENAME*0*``) are passed
  through undecoded, as the IMAP client is the one that decodes them.
- ENVELOPE and header strings in BODYSTRUCTURE (id, description, location, the names in
  addresses) are the raw field values, unfolded (RFC 5322 §2.2.3) and trimmed, not
  RFC 2047-decoded: clients decode encoded-words themselves. 8-bit header octets are read
  as UTF-8 (RFC 6532 §3, RFC 6855 §3); octets that are not UTF-8 become U+FFFD.
- An address without a domain gets the host ``"MISSING_DOMAIN"`` and one without a local
  part the mailbox ``"MISSING_MAILBOX"`` (as Dovecot does), because a NIL host means group
  syntax in an ENVELOPE (RFC 3501 §7.4.2). Comments in addresses are dropped.
- Content-Type absent or syntactically invalid (a multipart without a boundary parameter
  included, RFC 2046 §5.1.1) means ``text/plain; charset=us-ascii`` (RFC 2045 §5.2); a
  multipart/digest part without one is ``message/rfc822`` (RFC 2046 §5.1.5). A multipart in
  which no delimiter line is found, or one beyond the depth or part limits, is described
  the same way (text/plain, its body opaque). A ``message/rfc822`` or ``message/global``
  with a transfer encoding other than 7bit/8bit/binary cannot be parsed in place (RFC 2046
  §5.2.1) and is described as ``application/octet-stream`` (after RFC 2045 §6.4).
- ``body MD5`` is always NIL; ``body-fld-lang`` is NIL or a list of tags.
- The line count of a body is the number of LF octets in it, plus one if it is non-empty and
  does not end with LF (the last line of a part ends at the CRLF that belongs to the next
  delimiter, RFC 2046 §5.1.1, and is still a line). Counted on the stored bytes.

Invariants:

- ``analyze`` never raises and always returns an Analysis that round-trips through JSON.
- Every :class:`PartSpan` satisfies ``0 <= start <= body_start <= end <= len(data)`` (and
  ``body_start <= text_start <= end`` for encapsulated messages); section ``n.m`` lies
  inside the body of section ``n``; siblings are in order and do not overlap.
- For every non-multipart section ``n``: its BODYSTRUCTURE size equals
  ``end - start`` of ``section_range(a, n, len(data))``, and its line count (text/*,
  message/*) is the line count of exactly those bytes.
- Bounded work: at most :data:`MAX_DEPTH` levels of nesting and :data:`MAX_PARTS` sections;
  beyond them the rest is opaque. Delimiters and blank lines are found with ``re``/``bytes``
  searches, never a Python loop per line of a body; only header blocks (at most
  :data:`MAX_HEADER_PARSE` octets each) are parsed field by field, and an address field
  yields at most :data:`MAX_ADDRESSES` entries. The nested values are at most
  ``MAX_DEPTH + 5`` lists deep (``imap.responses`` accepts 64).
- The values share no mutable objects with each other or with module state.
- Nothing here does I/O, awaits, or keeps state between calls.
"""

from __future__ import annotations

import binascii
import email.utils
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeAlias

__all__ = [
    "MAX_ADDRESSES",
    "MAX_DEPTH",
    "MAX_HEADER_PARSE",
    "MAX_PARTS",
    "Analysis",
    "PartSpan",
    "Value",
    "analyze",
    "body_of",
    "decoded_header",
    "header_date",
    "header_fields",
    "section_range",
    "text_for_search",
]

#: Nesting levels (multipart or encapsulated message) that are analysed; deeper is opaque.
MAX_DEPTH = 20
#: Sections recorded per message; the parts after this are not listed (treated as epilogue).
MAX_PARTS = 1000
#: Octets of each header block parsed into fields; HEADER ranges still cover all of it.
MAX_HEADER_PARSE = 1 << 20
#: Entries (addresses and group markers) kept per address field of an ENVELOPE.
MAX_ADDRESSES = 2000

#: An IMAP value as stored: string, number, NIL or parenthesised list.
Value: TypeAlias = "str | int | list[Value] | None"

_JSON_VERSION = 1
_DEFAULT_PARAMS = ("CHARSET", "US-ASCII")
# RFC 2046 §5.2.1: message/rfc822 allows only 7bit, 8bit or binary; RFC 6532 §3.7 lets
# message/global be encoded, and an encoded one cannot be parsed in place either.
_IDENTITY_ENCODINGS = frozenset({"7BIT", "8BIT", "BINARY"})
_MESSAGE_SUBTYPES = frozenset({"RFC822", "GLOBAL"})  # RFC 9051 §9 media-message

# RFC 5322 §2.2: a field is a name, optional WSP (obs, §4.5), ":", and the value with its
# folded continuation lines (§2.2.3). "\r" stays inside [^\n], so CRLF and LF both work.
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)\n?", re.M)
# RFC 5322 §2.1: the header section ends at the first empty line (LF-only tolerated).
_BLANK_LINE = re.compile(rb"\n\r?\n")
_LINE_BREAK = re.compile(r"\r?\n")
# RFC 2046 §5.1.1: after "--boundary", optional "--" (close), transport padding, CRLF.
_DELIM_TAIL = re.compile(rb"(--)?[ \t]*\r?(?:\n|\Z)")
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True, slots=True)
class PartSpan:
    """Where one section lives in the stored bytes.

    ``start`` is the MIME header of the part (for part 1 of a non-multipart message, the
    message header), ``body_start`` is after its blank line, ``end`` is exclusive and, per
    RFC 2046 §5.1.1, excludes the CRLF before the next delimiter. For an encapsulated
    message (``is_message_rfc822``) the body is that message: its header runs from
    ``body_start`` to ``text_start`` and its text from ``text_start`` to ``end``.
    """

    start: int
    body_start: int
    end: int
    is_message_rfc822: bool = False
    text_start: int | None = None


@dataclass(frozen=True, slots=True)
class Analysis:
    """What IMAP needs of one message, computed at ingest (see the module docstring)."""

    envelope: list[Value]
    body: list[Value]
    bodystructure: list[Value]
    parts: dict[str, PartSpan]

    def to_json(self) -> str:
        """Everything in one compact JSON text (BODY is derived again from BODYSTRUCTURE)."""
        return _dumps({"v": _JSON_VERSION, "e": self.envelope, **self._structure()})

    def envelope_json(self) -> str:
        """The ENVELOPE alone, for a store that keeps it in its own column."""
        return _dumps(self.envelope)

    def structure_json(self) -> str:
        """Everything but the ENVELOPE: BODYSTRUCTURE and the section offsets."""
        return _dumps({"v": _JSON_VERSION, **self._structure()})

    def _structure(self) -> dict[str, object]:
        parts: dict[str, list[int]] = {}
        for name, span in self.parts.items():
            row = [span.start, span.body_start, span.end]
            if span.is_message_rfc822:
                row.append(span.body_start if span.text_start is None else span.text_start)
            parts[name] = row
        return {"s": self.bodystructure, "p": parts}

    @classmethod
    def from_json(cls, text: str) -> Analysis:
        """The inverse of :meth:`to_json`; ``ValueError`` if ``text`` is not one of ours."""
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("not a postkeep MIME analysis")
        return cls._build(obj.get("e"), obj)

    @classmethod
    def from_columns(cls, envelope_json: str, structure_json: str) -> Analysis:
        """The inverse of :meth:`envelope_json` plus :meth:`structure_json`."""
        obj = json.loads(structure_json)
        if not isinstance(obj, dict):
            raise ValueError("not a postkeep MIME analysis")
        return cls._build(json.loads(envelope_json), obj)

    @classmethod
    def _build(cls, envelope: object, obj: dict[str, object]) -> Analysis:
        structure, raw_parts = obj.get("s"), obj.get("p")
        if (
            obj.get("v") != _JSON_VERSION
            or not isinstance(envelope, list)
            or not isinstance(structure, list)
            or not isinstance(raw_parts, dict)
        ):
            raise ValueError("not a postkeep MIME analysis (or another version)")
        parts: dict[str, PartSpan] = {}
        for name, row in raw_parts.items():
            if (
                not isinstance(row, list)
                or len(row) not in (3, 4)
                or not all(type(x) is int for x in row)
            ):
                raise ValueError(f"bad section offsets for {name!r}")
            text_start = row[3] if len(row) == 4 else None
            parts[name] = PartSpan(row[0], row[1], row[2], len(row) == 4, text_start)
        return cls(envelope, body_of(structure), structure, parts)


def _dumps(value: object) -> str:
    # Compact, and UTF-8 text kept as is (RFC 6532 headers); no lone surrogates ever get
    # here because header bytes are decoded with errors="replace".
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def body_of(bodystructure: list[Value]) -> list[Value]:
    """BODY from BODYSTRUCTURE: the same values without extension data (RFC 3501 §7.4.2)."""
    if bodystructure and isinstance(bodystructure[0], list):
        out: list[Value] = []
        for item in bodystructure:
            if isinstance(item, list):
                out.append(body_of(item))
            else:
                out.append(item)  # the multipart subtype; extension data follows it
                break
        return out
    kind = bodystructure[0] if bodystructure else None
    if kind == "TEXT":
        return bodystructure[:8]  # body-type-text: basic fields and lines
    inner = bodystructure[8] if len(bodystructure) > 9 else None
    if kind == "MESSAGE" and bodystructure[1] in _MESSAGE_SUBTYPES and isinstance(inner, list):
        return [*bodystructure[:8], body_of(inner), bodystructure[9]]  # body-type-msg
    return bodystructure[:7]  # body-type-basic


# --- analysis ---------------------------------------------------------------------------


def analyze(data: bytes) -> Analysis:
    """Analyse a stored message. Never raises: anything unexpected makes it opaque."""
    try:
        return _analyze(data)
    except Exception:  # defence in depth: ingest must not fail on a parser bug
        return _opaque(data)


def _opaque(data: bytes) -> Analysis:
    n = len(data)
    structure: list[Value] = [*_default_type(), None, None, "7BIT", n, _lines(data, 0, n)]
    structure += [None, None, None, None]
    parts = {"": PartSpan(0, 0, n), "1": PartSpan(0, 0, n)}
    return Analysis([None] * 10, body_of(structure), structure, parts)


class _Ctx:
    __slots__ = ("data", "parts")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.parts: dict[str, PartSpan] = {}

    def room(self, needed: int) -> bool:
        return len(self.parts) + needed <= MAX_PARTS + 1  # +1: the "" entry


def _analyze(data: bytes) -> Analysis:
    ctx = _Ctx(data)
    n = len(data)
    hend = _header_end(data, 0, n)
    ctx.parts[""] = PartSpan(0, hend, n)
    envelope, structure = _message(ctx, 0, hend, n, "", 0)
    return Analysis(envelope, body_of(structure), structure, ctx.parts)


def _child(prefix: str, index: int) -> str:
    return f"{prefix}.{index}" if prefix else str(index)


def _message(
    ctx: _Ctx, start: int, hend: int, end: int, prefix: str, depth: int
) -> tuple[list[Value], list[Value]]:
    """An RFC 5322 message in data[start:end]; sections of its body are numbered under prefix."""
    fields = _fields(ctx.data, start, hend)
    envelope = _envelope(fields)
    ctype = _content_type(fields.get("content-type"), default_digest=False)
    if ctype[0] == "MULTIPART":
        multipart = _multipart(ctx, fields, ctype, hend, end, prefix, depth)
        if multipart is not None:
            return envelope, multipart
        ctype = _default_type()
    # RFC 3501 §6.4.5: a non-multipart message has a part 1, which is its body.
    return envelope, _single(ctx, fields, ctype, start, hend, end, _child(prefix, 1), depth)


def _multipart(
    ctx: _Ctx,
    fields: dict[str, bytes],
    ctype: tuple[str, str, list[Value]],
    body_start: int,
    end: int,
    prefix: str,
    depth: int,
) -> list[Value] | None:
    """The parts of a multipart body, or None when it cannot be described as one."""
    boundary = _param(ctype[2], "BOUNDARY")
    if not boundary or depth >= MAX_DEPTH or not ctx.room(2):
        return None  # RFC 2046 §5.1.1: no boundary, no parts; or over a limit
    try:
        raw_boundary = boundary.encode("utf-8")
    except UnicodeError:
        return None
    spans = _split(ctx.data, body_start, end, raw_boundary, MAX_PARTS + 1 - len(ctx.parts))
    if not spans:
        return None
    # RFC 2046 §5.1.5: in a digest, a part without Content-Type is message/rfc822.
    digest = ctype[1] == "DIGEST"
    out: list[Value] = []
    for index, (pstart, pend) in enumerate(spans, 1):
        if not ctx.room(1):
            break  # MAX_PARTS: the rest is not listed
        section = _child(prefix, index)
        phend = _header_end(ctx.data, pstart, pend)
        pfields = _fields(ctx.data, pstart, phend)
        pctype = _content_type(pfields.get("content-type"), default_digest=digest)
        if pctype[0] == "MULTIPART":
            ctx.parts[section] = PartSpan(pstart, phend, pend)
            nested = _multipart(ctx, pfields, pctype, phend, pend, section, depth + 1)
            if nested is not None:
                out.append(nested)
                continue
            del ctx.parts[section]
            pctype = _default_type()
        out.append(_single(ctx, pfields, pctype, pstart, phend, pend, section, depth + 1))
    out.append(ctype[1])
    # RFC 3501 §7.4.2 body-ext-mpart: parameters, disposition, language, location.
    out += [_params_value(ctype[2]), *_extension_tail(fields)]
    return out


def _single(
    ctx: _Ctx,
    fields: dict[str, bytes],
    ctype: tuple[str, str, list[Value]],
    start: int,
    body_start: int,
    end: int,
    section: str,
    depth: int,
) -> list[Value]:
    """A non-multipart body (body-type-basic, -text or -msg) and its extension data."""
    data = ctx.data
    encoding = _encoding(fields.get("content-transfer-encoding"))
    mtype, subtype, params = ctype
    is_message = mtype == "MESSAGE" and subtype in _MESSAGE_SUBTYPES
    if is_message and encoding not in _IDENTITY_ENCODINGS:
        # RFC 2046 §5.2.1 / RFC 2045 §6.4: not parseable in place, so an opaque octet stream.
        mtype, subtype, params, is_message = "APPLICATION", "OCTET-STREAM", [], False
    size = end - body_start
    basic: list[Value] = [
        mtype,
        subtype,
        _params_value(params),
        _field_text(fields.get("content-id")),
        _field_text(fields.get("content-description")),
        encoding,
        size,
    ]
    if is_message and depth < MAX_DEPTH and ctx.room(2):
        inner_hend = _header_end(data, body_start, end)
        ctx.parts[section] = PartSpan(start, body_start, end, True, inner_hend)
        envelope, inner = _message(ctx, body_start, inner_hend, end, section, depth + 1)
        basic += [envelope, inner, _lines(data, body_start, end)]
    else:
        if is_message:  # too deep or too many parts: describe it as opaque text
            basic[0:3] = _default_type()
        ctx.parts[section] = PartSpan(start, body_start, end)
        if basic[0] == "TEXT":
            basic.append(_lines(data, body_start, end))
    # RFC 3501 §7.4.2 body-ext-1part: MD5, disposition, language, location.
    return [*basic, None, *_extension_tail(fields)]


def _extension_tail(fields: dict[str, bytes]) -> list[Value]:
    return [
        _disposition(fields.get("content-disposition")),
        _language(fields.get("content-language")),
        _field_text(fields.get("content-location")),
    ]


def _split(data: bytes, start: int, end: int, boundary: bytes, limit: int) -> list[tuple[int, int]]:
    """The body parts of a multipart body in data[start:end] (RFC 2046 §5.1.1).

    A delimiter is ``--boundary`` at the start of a line, optionally ``--`` (close), then
    only transport padding up to the end of the line. The CRLF (or LF) before a delimiter
    belongs to it. The preamble and epilogue are not parts; a missing close delimiter ends
    the last part at ``end``. At most ``limit`` parts; the rest is ignored.
    """
    dash = b"--" + boundary
    pattern = re.compile(rb"\n" + re.escape(dash) + rb"(--)?[ \t]*\r?(?:\n|\Z)")
    spans: list[tuple[int, int]] = []
    part_start = -1  # -1: not inside a part (preamble, or after the close delimiter)
    pos = start
    if data.startswith(dash, start, end):  # the first delimiter may open the body
        m = _DELIM_TAIL.match(data, start + len(dash), end)
        if m is not None:
            if m.group(1):
                return []
            part_start = m.end()
            pos = m.end() - 1 if data[m.end() - 1 : m.end()] == b"\n" else m.end()
    while len(spans) < limit:
        m = pattern.search(data, pos, end)
        if m is None:
            break
        if part_start >= 0:
            part_end = m.start()
            if part_end > part_start and data[part_end - 1] == 0x0D:
                part_end -= 1  # RFC 2046 §5.1.1: the CRLF belongs to the delimiter
            spans.append((part_start, max(part_end, part_start)))
        if m.group(1):
            return spans
        part_start = m.end()
        # The delimiter's own line break may also precede the next delimiter (empty part).
        pos = m.end() - 1 if data[m.end() - 1] == 0x0A else m.end()
    if part_start >= 0 and len(spans) < limit:
        spans.append((part_start, end))  # no close delimiter: the last part runs to the end
    return spans


def _header_end(data: bytes, start: int, end: int) -> int:
    """Where the body starts: after the first empty line, or ``end`` if there is none."""
    if data.startswith(b"\r\n", start, end):
        return start + 2  # RFC 2046 §5.1: a part may have no header fields at all
    if data.startswith(b"\n", start, end):
        return start + 1
    m = _BLANK_LINE.search(data, start, end)
    return end if m is None else m.end()


def _lines(data: bytes, start: int, end: int) -> int:
    if end <= start:
        return 0
    count = data.count(b"\n", start, end)
    return count if data[end - 1] == 0x0A else count + 1


# --- header fields ----------------------------------------------------------------------


def _iter_fields(data: bytes, start: int, end: int) -> Iterator[re.Match[bytes]]:
    return _FIELD.finditer(data, start, min(end, start + MAX_HEADER_PARSE))


def _fields(data: bytes, start: int, end: int) -> dict[str, bytes]:
    """The first occurrence of each field in a header block, by lower-case name."""
    out: dict[str, bytes] = {}
    for m in _iter_fields(data, start, end):
        name = m.group(1).decode("ascii").lower()
        if name not in out:
            out[name] = m.group(2)
    return out


def _unfold(raw: bytes) -> str:
    # RFC 5322 §2.2.3: unfolding removes the CRLF before WSP; RFC 6532 §3: UTF-8 allowed.
    text = raw.decode("utf-8", "replace")
    return _LINE_BREAK.sub("", text).strip(" \t\r")


def _field_text(raw: bytes | None) -> str | None:
    return None if raw is None else _unfold(raw)


def _upper(text: str) -> str:
    return text.translate(_ASCII_UPPER)


# --- ENVELOPE (RFC 3501 §7.4.2) ---------------------------------------------------------


def _envelope(fields: dict[str, bytes]) -> list[Value]:
    sender_from = _addresses(fields.get("from"))
    sender = _addresses(fields.get("sender"))
    reply_to = _addresses(fields.get("reply-to"))
    return [
        _field_text(fields.get("date")),
        _field_text(fields.get("subject")),
        sender_from,
        # RFC 3501 §7.4.2: an absent or empty Sender or Reply-To is set to From.
        sender if sender is not None else _copy(sender_from),
        reply_to if reply_to is not None else _copy(sender_from),
        _addresses(fields.get("to")),
        _addresses(fields.get("cc")),
        _addresses(fields.get("bcc")),
        _field_text(fields.get("in-reply-to")),
        _field_text(fields.get("message-id")),
    ]


def _copy(value: list[Value] | None) -> list[Value] | None:
    return None if value is None else [_copy(v) if isinstance(v, list) else v for v in value]


# RFC 5322 §3.2-3.4 lexical tokens, tolerant: unterminated quotes and literals run to the end.
_ADDR_TOKEN = re.compile(
    r"""
      (?P<ws>[ \t\r\n]+)
    | (?P<qs>"(?:[^"\\]|\\.)*(?:"|\\?\Z))
    | (?P<dl>\[(?:[^\]\\]|\\.)*(?:\]|\\?\Z))
    | (?P<cm>\()
    | (?P<sp>[<>@,;:.])
    | (?P<atom>[^ \t\r\n"\[()<>@,;:.]+)
    | (?P<other>.)
    """,
    re.X | re.S,
)
_COMMENT_STOP = re.compile(r"[()\\]")
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)


# A token: (kind, text, spaced). kind is "qs", "dl", "atom" or the special itself ("<",
# ">", "@", ",", ";", ":", "."); spaced says white space or a comment came before it.
_Tok: TypeAlias = tuple[str, str, bool]


def _skip_comment(text: str, i: int) -> int:
    """The index after the comment opening at text[i] (RFC 5322 §3.2.2: comments nest)."""
    depth = 0
    while True:
        m = _COMMENT_STOP.search(text, i)
        if m is None:
            return len(text)
        c, i = m.group(), m.end()
        if c == "\\":
            i += 1  # quoted-pair
        elif c == "(":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return i


def _tokens(text: str) -> Iterator[_Tok]:
    spaced = False
    pos = 0
    while pos < len(text):
        for m in _ADDR_TOKEN.finditer(text, pos):
            kind = m.lastgroup or "other"
            if kind == "cm":
                pos = _skip_comment(text, m.start())
                spaced = True
                break  # resume scanning after the comment
            if kind == "ws":
                spaced = True
                continue
            if kind == "sp":
                kind = m.group()
            elif kind == "other":
                kind = "atom"
            yield kind, m.group(), spaced
            spaced = False
        else:
            return


def _phrase(toks: Sequence[_Tok]) -> str | None:
    words: list[str] = []
    for kind, text, spaced in toks:
        if kind == "qs":
            text = _QUOTED_PAIR.sub(r"\1", text[1:-1] if text.endswith('"') else text[1:])
        if words and spaced:
            words.append(" ")
        words.append(text)
    return "".join(words) or None


def _index(toks: Sequence[_Tok], kind: str, start: int = 0) -> int:
    for i in range(start, len(toks)):
        if toks[i][0] == kind:
            return i
    return -1


def _mailbox(toks: list[_Tok]) -> list[Value] | None:
    """One RFC 5322 §3.4 mailbox as (name adl mailbox host)."""
    name: str | None = None
    addr = toks
    opening = _index(toks, "<")
    if opening >= 0:
        name = _phrase(toks[:opening])
        closing = _index(toks, ">", opening)
        addr = toks[opening + 1 : closing if closing >= 0 else len(toks)]
    adl: str | None = None
    if addr and addr[0][0] == "@":
        # RFC 5322 §4.4 obs-route: "@a,@b:" before the addr-spec, kept as the source route.
        colon = _index(addr, ":")
        if colon >= 0:
            adl = "".join(t[1] for t in addr[:colon]) or None
            addr = addr[colon + 1 :]
    at = next((i for i in range(len(addr) - 1, -1, -1) if addr[i][0] == "@"), -1)
    local_toks, domain_toks = (addr[:at], addr[at + 1 :]) if at >= 0 else (addr, [])
    local = "".join(t[1] for t in local_toks)
    domain = "".join(t[1] for t in domain_toks)
    if name is None and adl is None and not local and not domain:
        return None
    return [name, adl, local or "MISSING_MAILBOX", domain or "MISSING_DOMAIN"]


def _addresses(raw: bytes | None) -> list[Value] | None:
    """An address-list field as RFC 3501 §7.4.2 address structures; None if there are none.

    Group syntax (RFC 5322 §3.4) becomes ``(NIL NIL "name" NIL)`` … ``(NIL NIL NIL NIL)``.
    At most :data:`MAX_ADDRESSES` entries; the rest of the field is left out.
    """
    if raw is None:
        return None
    out: list[Value] = []
    buf: list[_Tok] = []
    in_angle = in_group = False

    def flush() -> None:
        if buf:
            box = _mailbox(buf)
            if box is not None:
                out.append(box)
            buf.clear()

    for tok in _tokens(_unfold(raw)):
        kind = tok[0]
        if len(out) >= MAX_ADDRESSES:
            break
        if kind == "<":
            in_angle = True
            buf.append(tok)
        elif kind == ">":
            in_angle = False
            buf.append(tok)
        elif in_angle or kind not in ",:;":
            buf.append(tok)  # inside <>, a route's "," and ":" belong to the address
        elif kind == ",":
            flush()
        elif kind == ":" and not in_group:
            out.append([None, None, _phrase(buf) or "", None])  # group start
            buf.clear()
            in_group = True
        elif kind == ";" and in_group:
            flush()
            out.append([None, None, None, None])  # group end
            in_group = False
        # else: stray group punctuation, ignored
    if len(out) < MAX_ADDRESSES:
        flush()
    if in_group:
        out.append([None, None, None, None])  # an unterminated group still ends
    return out or None


# --- MIME header fields (RFC 2045 §5, RFC 2183) -----------------------------------------

# RFC 2045 §5.1: token = 1*<any CHAR except SPACE, CTLs, or tspecials>; quoted strings and
# comments as in RFC 822.
_MIME_TOKEN = re.compile(
    r"""
      (?P<ws>[ \t\r\n]+)
    | (?P<qs>"(?:[^"\\]|\\.)*(?:"|\\?\Z))
    | (?P<cm>\()
    | (?P<sp>[()<>@,;:\\/\[\]?=])
    | (?P<tok>[^ \t\r\n()<>@,;:\\"/\[\]?=]+)
    """,
    re.X | re.S,
)


def _mime_tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        m = _MIME_TOKEN.match(text, i)
        if m is None:  # a lone unmatched character: skip it
            i += 1
            continue
        kind = m.lastgroup or "sp"
        if kind == "cm":
            i = _skip_comment(text, i)
            continue
        i = m.end()
        if kind == "qs":
            inner = m.group()[1:]
            inner = inner[:-1] if inner.endswith('"') else inner
            out.append(("value", _QUOTED_PAIR.sub(r"\1", inner)))
        elif kind != "ws":
            out.append((kind, m.group()))
    return out


def _parse_params(toks: list[tuple[str, str]]) -> list[Value]:
    """``; attribute=value`` pairs (RFC 2045 §5.1), names upper-cased, first one wins.

    RFC 2231 forms (``name*``, ``name*0*``) are kept as they are. A malformed parameter is
    skipped up to the next ``;``.
    """
    out: list[Value] = []
    seen: set[str] = set()
    i = 0
    while i < len(toks):
        if toks[i] != ("sp", ";"):
            i += 1
            continue
        i += 1
        if i + 1 < len(toks) and toks[i][0] == "tok" and toks[i + 1] == ("sp", "="):
            name = _upper(toks[i][1])
            i += 2
            value = ""
            if i < len(toks) and toks[i][0] in ("tok", "value"):
                value = toks[i][1]
                i += 1
            if name not in seen:
                seen.add(name)
                out += [name, value]
    return out


def _content_type(raw: bytes | None, *, default_digest: bool) -> tuple[str, str, list[Value]]:
    """(TYPE, SUBTYPE, params) with the RFC 2045 §5.2 / RFC 2046 §5.1.5 defaults."""
    toks = _mime_tokens(_unfold(raw)) if raw is not None else []
    if len(toks) >= 3 and toks[0][0] == "tok" and toks[1] == ("sp", "/") and toks[2][0] == "tok":
        # Lenient: junk after type/subtype is skipped up to the next ";" parameter.
        return _upper(toks[0][1]), _upper(toks[2][1]), _parse_params(toks[3:])
    if default_digest and raw is None:
        return "MESSAGE", "RFC822", []
    return _default_type()


def _default_type() -> tuple[str, str, list[Value]]:
    # RFC 2045 §5.2: absent or syntactically invalid means text/plain; charset=us-ascii.
    return "TEXT", "PLAIN", list(_DEFAULT_PARAMS)


def _params_value(params: list[Value]) -> list[Value] | None:
    return list(params) if params else None


def _param(params: list[Value], name: str) -> str | None:
    for i in range(0, len(params) - 1, 2):
        value = params[i + 1]
        if params[i] == name and isinstance(value, str):
            return value
    return None


def _encoding(raw: bytes | None) -> str:
    # RFC 2045 §6.1: the mechanism is a token, case-insensitive; "7bit" when absent.
    toks = _mime_tokens(_unfold(raw)) if raw is not None else []
    if toks and toks[0][0] in ("tok", "value") and toks[0][1]:
        return _upper(toks[0][1])
    return "7BIT"


def _disposition(raw: bytes | None) -> list[Value] | None:
    # RFC 2183 §2: disposition-type *(";" disposition-parm); RFC 3501 body-fld-dsp.
    if raw is None:
        return None
    toks = _mime_tokens(_unfold(raw))
    if not toks or toks[0][0] != "tok":
        return None
    return [_upper(toks[0][1]), _params_value(_parse_params(toks[1:]))]


def _language(raw: bytes | None) -> list[Value] | None:
    # RFC 3282 §2: Content-Language = 1#Language-tag; RFC 3501 body-fld-lang.
    if raw is None:
        return None
    tags: list[Value] = [text for kind, text in _mime_tokens(_unfold(raw)) if kind == "tok"]
    return tags or None


# --- FETCH: sections and header fields (RFC 3501 §6.4.5) --------------------------------

_SECTION_TEXTS = frozenset({"HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"})


def section_range(analysis: Analysis, section: str, data_len: int) -> tuple[int, int] | None:
    """The byte range of ``BODY[section]`` in the stored bytes, or None if there is no such part.

    ``section`` is the section-spec without brackets: ``""``, ``HEADER``, ``TEXT``, ``1``,
    ``1.2``, ``1.MIME``, ``2.HEADER``, ``2.1.TEXT``, ``HEADER.FIELDS`` (the HEADER range, to
    be filtered with :func:`header_fields`; a field list after a space is ignored).
    Case-insensitive. HEADER and TEXT after a part number need an encapsulated message;
    MIME needs a part number (RFC 3501 §6.4.5).
    """
    spec = _upper(section.split(" ", 1)[0].split("(", 1)[0])
    labels = spec.split(".") if spec else []
    if "" in labels:
        return None  # "1.", ".TEXT", "1..2"
    numbers: list[str] = []
    while labels and labels[0].isdigit() and labels[0].isascii():
        if labels[0].startswith("0"):
            return None  # nz-number (RFC 3501 §9)
        numbers.append(labels.pop(0))
    text = ".".join(labels)
    if text and text not in _SECTION_TEXTS:
        return None
    whole = analysis.parts.get("")
    hend = min(whole.body_start if whole is not None else data_len, data_len)
    if not numbers:
        if text == "":
            return 0, data_len
        if text == "TEXT":
            return hend, data_len
        if text.startswith("HEADER"):
            return 0, hend
        return None  # MIME must follow a part number
    span = analysis.parts.get(".".join(numbers))
    if span is None:
        return None
    if text == "":
        rng = span.body_start, span.end
    elif text == "MIME":
        rng = span.start, span.body_start
    elif not span.is_message_rfc822 or span.text_start is None:
        return None  # HEADER/TEXT of a part that is not message/rfc822
    elif text == "TEXT":
        rng = span.text_start, span.end
    else:
        rng = span.body_start, span.text_start
    start, end = (min(max(x, 0), data_len) for x in rng)
    return start, max(start, end)


def header_fields(header_block: bytes, names: Sequence[str], *, exclude: bool) -> bytes:
    """``HEADER.FIELDS (names)`` or, with ``exclude``, ``HEADER.FIELDS.NOT`` (RFC 3501 §6.4.5).

    Each selected field is returned whole (with its folded continuation lines) as written,
    in the original order, then the empty line: ``b"\\r\\n"`` alone if nothing matches.
    Names compare ASCII case-insensitively; lines that are not fields are never returned.
    """
    wanted = {_upper(n).encode("utf-8") for n in names}
    end = _header_end(header_block, 0, len(header_block))
    out: list[bytes] = []
    for m in _FIELD.finditer(header_block, 0, end):
        if (m.group(1).upper() in wanted) != exclude:
            field = m.group()
            out.append(field if field.endswith(b"\n") else field + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


# --- SEARCH: decoded text (RFC 3501 §6.4.4) ---------------------------------------------

# RFC 2047 §2: encoded-word = "=?" charset "?" encoding "?" encoded-text "?="; RFC 2231 §5
# allows "*language" after the charset.
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
_QP_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def _b64decode(data: bytes) -> bytes:
    """Lenient base64: junk ignored, a dangling group dropped or padded."""
    clean = _NOT_BASE64.sub(b"", data)
    rest = len(clean) % 4
    if rest == 1:
        clean = clean[:-1]
    elif rest:
        clean += b"=" * (4 - rest)
    try:
        return binascii.a2b_base64(clean)
    except binascii.Error:
        return b""


def _charset_decode(data: bytes, charset: str) -> str:
    name = charset.strip().strip('"').lower()
    # US-ASCII and unknown labels: UTF-8 is a superset and the likeliest truth (RFC 6532).
    if name in ("", "us-ascii", "ascii", "unknown-8bit", "x-unknown"):
        name = "utf-8"
    try:
        return data.decode(name, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        return data.decode("utf-8", "replace")


def _decode_words(text: str) -> str:
    """RFC 2047 decoding; white space between adjacent encoded-words is dropped (§6.2)."""
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    pos = 0
    for m in _ENCODED_WORD.finditer(text):
        gap = text[pos : m.start()]
        charset, kind, payload = m.group(1), m.group(2).upper(), m.group(3)
        raw = payload.encode("ascii", "replace")
        if kind == "Q":  # RFC 2047 §4.2: "_" is a space, "=XX" an octet
            decoded = _QP_ESCAPE.sub(
                lambda x: bytes([int(x.group(1), 16)]), raw.replace(b"_", b" ")
            )
        else:
            decoded = _b64decode(raw)
        adjacent = bool(pending_charset) and not gap.strip(" \t\r\n")
        if adjacent and charset.lower() == pending_charset:
            pending += decoded  # one character may span two words
        else:
            if pending_charset:
                out.append(_charset_decode(bytes(pending), pending_charset))
            if not adjacent:
                out.append(gap)
            pending, pending_charset = bytearray(decoded), charset.lower()
        pos = m.end()
    if pending_charset:
        out.append(_charset_decode(bytes(pending), pending_charset))
    out.append(text[pos:])
    return "".join(out)


def decoded_header(data: bytes, name: str) -> list[str]:
    """Every ``name`` field of the message header, unfolded and decoded, for SEARCH.

    RFC 2047 encoded-words are decoded and 8-bit octets read as UTF-8 (RFC 6532 §3).
    """
    wanted = name.strip().lower().encode("utf-8", "replace")
    hend = _header_end(data, 0, len(data))
    return [
        _decode_words(_unfold(m.group(2)))
        for m in _iter_fields(data, 0, hend)
        if m.group(1).lower() == wanted
    ]


def header_date(data: bytes) -> datetime | None:
    """The ``Date:`` field (RFC 5322 §3.3) as an aware datetime, for SENTBEFORE/ON/SINCE.

    ``-0000`` (unknown zone) is taken as UTC; an unparseable date is None. RFC 3501 §6.4.4
    compares dates only, disregarding time and zone, so callers use ``.date()``.
    """
    values = decoded_header(data, "date")
    if not values:
        return None
    try:
        when = email.utils.parsedate_to_datetime(values[0])
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _header_text(data: bytes, start: int, end: int) -> str:
    lines = []
    for m in _iter_fields(data, start, end):
        name = m.group(1).decode("ascii")
        lines.append(f"{name}: {_decode_words(_unfold(m.group(2)))}\n")
    return "".join(lines)


def _decode_body(data: bytes, encoding: Value, charset: str, budget: int) -> str:
    # Enough encoded octets for ``budget`` characters, whatever the encoding.
    raw = data[: budget * 12 + 16]
    if encoding == "BASE64":  # RFC 2045 §6.8
        raw = _b64decode(raw)
    elif encoding == "QUOTED-PRINTABLE":  # RFC 2045 §6.7, soft line breaks included
        raw = binascii.a2b_qp(raw)
    return _charset_decode(raw, charset)[:budget]


def text_for_search(
    data: bytes,
    *,
    headers: bool,
    body: bool,
    limit: int = 1_000_000,
    analysis: Analysis | None = None,
) -> str:
    """Decoded text for SEARCH TEXT/BODY (RFC 3501 §6.4.4), at most ``limit`` characters.

    With ``headers``: the message header fields, RFC 2047-decoded, one ``Name: value`` line
    each. With ``body``: every text/* part, transfer-decoded (base64, quoted-printable) and
    charset-decoded with replacement characters, and the header of every encapsulated
    message. Parts are separated by a newline. Matching (case-insensitive) is the caller's.
    Pass the stored ``analysis`` of ``data`` to skip analysing it again.
    """
    if analysis is None:
        analysis = analyze(data)
    chunks: list[str] = []
    budget = [max(limit, 0)]

    def emit(text: str) -> None:
        if budget[0] > 0 and text:
            text = text[: budget[0]]
            chunks.append(text)
            budget[0] -= len(text)

    def single(node: list[Value], section: str) -> None:
        span = analysis.parts.get(section)
        if span is None or budget[0] <= 0:
            return
        inner = node[8] if len(node) > 9 else None
        if span.is_message_rfc822 and span.text_start is not None and isinstance(inner, list):
            emit(_header_text(data, span.body_start, span.text_start))
            message(inner, section)
        elif node[0] == "TEXT":
            charset = _param(node[2] if isinstance(node[2], list) else [], "CHARSET") or ""
            piece = data[span.body_start : span.end]
            emit(_decode_body(piece, node[5], charset, budget[0]) + "\n")

    def multipart(node: list[Value], prefix: str) -> None:
        for index, child in enumerate(node, 1):
            if not isinstance(child, list):
                break  # the subtype: the parts are the leading lists
            section = _child(prefix, index)
            if child and isinstance(child[0], list):
                multipart(child, section)
            else:
                single(child, section)

    def message(node: list[Value], prefix: str) -> None:
        if node and isinstance(node[0], list):
            multipart(node, prefix)
        else:
            single(node, _child(prefix, 1))

    if headers:
        emit(_header_text(data, 0, analysis.parts[""].body_start))
    if body:
        message(analysis.bodystructure, "")
    return "".join(chunks)
