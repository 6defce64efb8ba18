"""IMAP responses: the value types, their wire encoding, and every fixed text we send.

A response is one of three things (RFC 3501 §7, RFC 9051 §7):

- :class:`StatusResponse` — ``tag OK|NO|BAD [CODE args] text`` or, untagged,
  ``* OK|NO|BAD|PREAUTH|BYE …``;
- :class:`Untagged` — ``* `` followed by data items (``* 3 EXISTS``, ``* 12 FETCH (…)``);
- :class:`Continuation` — ``+ text`` (a command continuation request).

:func:`encode` turns a response into ``list[bytes | BlobSlice]``: bytes to write, and
:class:`BlobSlice` placeholders for message bodies, already framed as ``{n}\\r\\n`` literals,
which the driver streams from the blob store. Python values map to IMAP syntax by type, so
the choice between atom, quoted string and literal is made here, once, safely:

========================  ==============================================================
``None``                  ``NIL``
``int`` (≥ 0)             a number
``str`` / ``bytes``       a string: quoted when every octet is printable US-ASCII
                          (``"`` and ``\\`` escaped, RFC 3501 §4.3), otherwise a literal
``Atom``                  the atom itself (keywords, flags, ``FETCH``); validated
``Raw``                   pre-formatted protocol text (``BODY[1.MIME]``); validated
``MailboxName``           modified UTF-7 (RFC 3501 §5.1.3), then an astring
``BlobSlice``             ``{length}\\r\\n`` and the slice, streamed by the driver
``list`` / ``tuple``      a parenthesised list
========================  ==============================================================

Also here: modified UTF-7 (:func:`encode_mailbox`, :func:`decode_mailbox`), date-time
formatting (:func:`format_datetime`), response codes (:class:`Code`, :class:`CodeName`) and
the fixed texts of the core (the ``TEXT_*`` constants), so that everything the server says
on its own can be reviewed in one file.

Invariants:

- Nothing a caller passes can inject a line: tags, texts, codes, atoms and raw tokens are
  checked at construction for CR, LF, NUL and (for atoms and tags) every atom-special; a
  violation raises ``ValueError`` (a programming error, never a client's).
- A ``str``/``bytes`` value containing CR, LF, NUL, another control character or any
  8-bit octet is always sent as a literal, never quoted: clients never see an unescaped
  quote, a raw line break or a byte they must guess the charset of inside a quoted string.
- Response text is printable US-ASCII (RFC 3501 §9 ``text``) and does not begin with ``[``
  unless it carries a code, so it is never mistaken for a response code.
- ``decode_mailbox(encode_mailbox(s)) == s`` for every string without lone surrogates;
  ``decode_mailbox`` rejects every non-canonical or malformed form with ``ValueError``.
- Encoding never reads a blob: a :class:`BlobSlice` is framed with its declared length and
  passed through untouched.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum
from typing import TypeAlias

__all__ = [
    "MONTHS",
    "Atom",
    "BlobSlice",
    "Code",
    "CodeName",
    "Condition",
    "Continuation",
    "MailboxName",
    "Output",
    "Raw",
    "Response",
    "StatusResponse",
    "Untagged",
    "Value",
    "astring",
    "auth_challenge",
    "bye",
    "capability",
    "capability_code",
    "check_text",
    "continuation",
    "decode_mailbox",
    "encode",
    "encode_mailbox",
    "encode_value",
    "fetch",
    "format_datetime",
    "privacy_required",
    "tagged",
    "untagged",
    "untagged_status",
]


# -- fixed texts (what the core says on its own) ------------------------------------------
TEXT_GREETING = "postkeep ready"
TEXT_CONTINUE_LITERAL = "Ready for literal"
TEXT_TOO_MANY_BAD = "Too many bad commands, closing connection"
TEXT_TOO_MANY_COMMANDS = "Too many commands in one connection, closing"
TEXT_LINE_TOO_LONG = "Command line too long"
TEXT_COMMAND_TOO_LONG = "Command too long: too much data in its lines and literals"
TEXT_BARE_LF = "Line ends with a bare LF: IMAP lines end with CRLF"
TEXT_NO_TAG = "Command line has no valid tag"
TEXT_NO_COMMAND = "Expected a command name after the tag"
TEXT_EMPTY_LINE = "Empty command line"
TEXT_LITERAL_TOO_BIG = "Literal too big"
TEXT_MESSAGE_TOO_BIG = "Message too big for this server"
TEXT_LITERAL_NUMBER = "Literal size is not a valid 32-bit number"
TEXT_ALREADY_AUTHENTICATED = "Already authenticated"
TEXT_NOT_AUTHENTICATED = "Log in first"
TEXT_NOT_SELECTED = "Select a mailbox first (SELECT or EXAMINE)"
TEXT_NOT_IN_SELECTED = "Not valid while a mailbox is selected"
TEXT_TLS_ACTIVE = "TLS is already active"
TEXT_TLS_NOT_OFFERED = "STARTTLS is not available on this port"
TEXT_AUTH_CANCELLED = "Authentication cancelled"  # RFC 3501 §6.2.2: a BAD
TEXT_AUTH_BAD_BASE64 = "Invalid base64 in the authentication response"
TEXT_IDLE_EXPECTED_DONE = "Expected DONE to end IDLE"  # RFC 2177 §3
TEXT_APPEND_TRAILER = "Unexpected data after the APPEND message (MULTIAPPEND is not offered)"
TEXT_UNKNOWN_COMMAND = "Unknown command"


# -- status, codes ------------------------------------------------------------------------
class Condition(Enum):
    """RFC 3501 §7.1 status responses (``resp-cond-state``, ``-bye``, ``-auth``)."""

    OK = "OK"
    NO = "NO"
    BAD = "BAD"
    PREAUTH = "PREAUTH"
    BYE = "BYE"


class CodeName(StrEnum):
    """Response codes we send (RFC 3501 §7.1, RFC 5530, and the extension RFCs)."""

    ALERT = "ALERT"
    BADCHARSET = "BADCHARSET"
    CAPABILITY = "CAPABILITY"
    PARSE = "PARSE"
    PERMANENTFLAGS = "PERMANENTFLAGS"
    READ_ONLY = "READ-ONLY"
    READ_WRITE = "READ-WRITE"
    TRYCREATE = "TRYCREATE"
    UIDNEXT = "UIDNEXT"
    UIDVALIDITY = "UIDVALIDITY"
    UNSEEN = "UNSEEN"
    CLOSED = "CLOSED"  # RFC 7162, QRESYNC
    APPENDUID = "APPENDUID"  # RFC 4315 §3
    COPYUID = "COPYUID"
    UIDNOTSTICKY = "UIDNOTSTICKY"
    HIGHESTMODSEQ = "HIGHESTMODSEQ"  # RFC 7162 §3.1.2.1
    NOMODSEQ = "NOMODSEQ"
    MODIFIED = "MODIFIED"  # RFC 7162 §3.1.3
    USEATTR = "USEATTR"  # RFC 6154 §3
    TOOBIG = "TOOBIG"  # RFC 4469 (APPENDLIMIT, RFC 7889)
    # RFC 5530 §3
    UNAVAILABLE = "UNAVAILABLE"
    AUTHENTICATIONFAILED = "AUTHENTICATIONFAILED"
    AUTHORIZATIONFAILED = "AUTHORIZATIONFAILED"
    EXPIRED = "EXPIRED"
    PRIVACYREQUIRED = "PRIVACYREQUIRED"
    CONTACTADMIN = "CONTACTADMIN"
    NOPERM = "NOPERM"
    INUSE = "INUSE"
    EXPUNGEISSUED = "EXPUNGEISSUED"
    CORRUPTION = "CORRUPTION"
    SERVERBUG = "SERVERBUG"
    CLIENTBUG = "CLIENTBUG"
    CANNOT = "CANNOT"
    LIMIT = "LIMIT"
    OVERQUOTA = "OVERQUOTA"
    ALREADYEXISTS = "ALREADYEXISTS"
    NONEXISTENT = "NONEXISTENT"


# ATOM-CHAR: any CHAR except atom-specials (RFC 3501 §9):
#   "(" / ")" / "{" / SP / CTL / "%" / "*" / DQUOTE / "\" / "]"
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')
ATOM_CHARS = frozenset(c for c in range(0x21, 0x7F) if c not in _ATOM_SPECIALS)
#: ASTRING-CHAR = ATOM-CHAR / resp-specials ("]").
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
#: tag = 1*<any ASTRING-CHAR except "+">.
TAG_CHARS = ASTRING_CHARS - {ord("+")}
_PRINTABLE = frozenset(range(0x20, 0x7F))


def _check_line_safe(text: str, what: str) -> None:
    if any(c in text for c in "\r\n\x00"):
        raise ValueError(f"{what} must not contain CR, LF or NUL")


def _is_atom(text: str, chars: frozenset[int]) -> bool:
    return bool(text) and all(ord(c) in chars for c in text)


def is_valid_tag(tag: str) -> bool:
    return _is_atom(tag, TAG_CHARS)


@dataclass(frozen=True, slots=True)
class Code:
    """A response code: ``[NAME]`` or ``[NAME data]`` (RFC 3501 §7.1)."""

    name: str
    data: str | None = None

    def __post_init__(self) -> None:
        if not _is_atom(self.name, ATOM_CHARS):
            raise ValueError(f"response code name must be an atom: {self.name!r}")
        if self.data is not None:
            _check_line_safe(self.data, "response code data")
            if "]" in self.data or not all(ord(c) in _PRINTABLE for c in self.data):
                raise ValueError("response code data must be printable ASCII without ']'")

    def render(self) -> str:
        return f"[{self.name}]" if self.data is None else f"[{self.name} {self.data}]"


# -- values -------------------------------------------------------------------------------
class Atom(str):
    """An atom sent as-is: a keyword (``FETCH``), a flag (``\\Seen``, ``$Junk``).

    Flags start with ``\\`` (RFC 3501 §9 ``flag-extension``), and ``\\*`` is allowed for
    PERMANENTFLAGS (``flag-perm``); otherwise every character is an ASTRING-CHAR.
    """

    __slots__ = ()

    def __new__(cls, text: str) -> Atom:
        body = text[1:] if text.startswith("\\") else text
        if not (body == "*" and text == "\\*") and not _is_atom(body, ASTRING_CHARS):
            raise ValueError(f"not an atom: {text!r}")
        return super().__new__(cls, text)


class Raw(str):
    """Pre-formatted protocol text, written as-is (e.g. ``BODY[HEADER.FIELDS (FROM)]``).

    Only for text the server composed from validated parts; never for client data.
    """

    __slots__ = ()

    def __new__(cls, text: str) -> Raw:
        _check_line_safe(text, "raw protocol text")
        if not text or not all(ord(c) in _PRINTABLE for c in text):
            raise ValueError("raw protocol text must be non-empty printable ASCII")
        return super().__new__(cls, text)


class MailboxName(str):
    """A mailbox name in Unicode; sent modified-UTF-7 encoded, as an astring."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class BlobSlice:
    """``length`` octets of a stored message from ``offset``; the driver streams them.

    ``ref`` is the store's blob reference (opaque here: the core never reads a blob).
    """

    ref: object
    offset: int
    length: int

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length < 0:
            raise ValueError("blob slice offset and length must be non-negative")


class Adjacent(tuple):  # type: ignore[type-arg]
    """Parenthesised lists written side by side with no space between them.

    RFC 3501 §9 writes two constructs this way: the parts of a multipart body
    (``body-type-mpart = 1*body SP media-subtype``) and the addresses of an address list
    (``"(" 1*address ")"``), e.g. ``(("a" NIL "b" "c")("d" NIL "e" "f"))``. Everywhere
    else list items are separated by SP, which strict client parsers insist on too.
    """

    __slots__ = ()


#: What a response can contain. ``str`` is deliberately not an element of ``Sequence``
#: here: lists are ``list``/``tuple`` only.
Value: TypeAlias = "int | str | bytes | BlobSlice | list[Value] | tuple[Value, ...] | None"

#: The core's output: bytes to write and blob slices to stream, in order.
Output: TypeAlias = list[bytes | BlobSlice]


# -- responses ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StatusResponse:
    """``tag|* OK|NO|BAD|PREAUTH|BYE [code] text``. ``tag=None`` is untagged."""

    tag: str | None
    condition: Condition
    text: str
    code: Code | None = None

    def __post_init__(self) -> None:
        if self.tag is not None and not is_valid_tag(self.tag):
            raise ValueError(f"invalid tag {self.tag!r}")
        if self.tag is not None and self.condition not in (
            Condition.OK,
            Condition.NO,
            Condition.BAD,
        ):
            raise ValueError("PREAUTH and BYE are always untagged (RFC 3501 §7.1)")
        check_text(self.text)
        if self.code is None and self.text.startswith("["):
            raise ValueError("text starting with '[' would be read as a response code")

    @property
    def closes(self) -> bool:
        """True for ``* BYE``: the server closes the connection after it (RFC 3501 §7.1.5)."""
        return self.condition is Condition.BYE


@dataclass(frozen=True, slots=True)
class Untagged:
    """``* item item …`` (RFC 3501 §7.2–7.4), e.g. ``Untagged((3, Atom("EXISTS")))``."""

    items: tuple[Value, ...]

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError("an untagged response needs at least one item")


@dataclass(frozen=True, slots=True)
class Continuation:
    """``+ text`` (RFC 3501 §7.5). Empty text is allowed: ``+ `` is an empty SASL challenge."""

    text: str = ""

    def __post_init__(self) -> None:
        if self.text:
            check_text(self.text)


Response: TypeAlias = StatusResponse | Untagged | Continuation


def check_text(text: str) -> None:
    """Raise ``ValueError`` unless ``text`` may be a response text (RFC 3501 §9 ``text``)."""
    _check_line_safe(text, "response text")
    if not text:
        raise ValueError("response text must not be empty (RFC 3501 §9 text)")
    if not all(ord(c) in _PRINTABLE for c in text):
        raise ValueError("response text must be printable US-ASCII")


# -- builders -----------------------------------------------------------------------------
def tagged(tag: str, condition: Condition, text: str, code: Code | None = None) -> StatusResponse:
    """``tag OK|NO|BAD [code] text``."""
    return StatusResponse(tag, condition, text, code)


def untagged_status(condition: Condition, text: str, code: Code | None = None) -> StatusResponse:
    """``* OK|NO|BAD|PREAUTH|BYE [code] text``."""
    return StatusResponse(None, condition, text, code)


def bye(text: str, code: Code | None = None) -> StatusResponse:
    """``* BYE text``: the connection closes after it."""
    return StatusResponse(None, Condition.BYE, text, code)


def untagged(*items: Value) -> Untagged:
    """``* item item …``."""
    return Untagged(tuple(items))


def continuation(text: str = "") -> Continuation:
    return Continuation(text)


def auth_challenge(data: bytes) -> Continuation:
    """RFC 3501 §6.2.2: ``+ <base64>``; an empty challenge is ``+ ``."""
    return Continuation(base64.b64encode(data).decode("ascii"))


def privacy_required(tag: str, hint: str) -> StatusResponse:
    """``tag NO [PRIVACYREQUIRED] <hint>``: credentials refused before TLS (RFC 5530 §3)."""
    return StatusResponse(tag, Condition.NO, hint, Code(CodeName.PRIVACYREQUIRED))


def capability_code(caps: Iterable[str]) -> Code:
    """``[CAPABILITY IMAP4rev1 …]`` for a greeting or a login OK (RFC 3501 §7.1)."""
    return Code(CodeName.CAPABILITY, " ".join(caps))


def capability(caps: Iterable[str]) -> Untagged:
    """``* CAPABILITY IMAP4rev1 …`` (RFC 3501 §7.2.1)."""
    return Untagged((Atom("CAPABILITY"), *(Atom(c) for c in caps)))


def fetch(seq: int, attrs: Sequence[tuple[str, Value]]) -> Untagged:
    """``* seq FETCH (NAME value …)`` (RFC 3501 §7.4.2).

    Names are raw (``BODY[HEADER.FIELDS (FROM)]<0>``, from ``BodySection.response_name``);
    values are encoded by type, so a body is a :class:`BlobSlice` or ``bytes``.
    """
    items: list[Value] = []
    for name, value in attrs:
        items.append(Raw(name))
        items.append(value)
    return Untagged((seq, Atom("FETCH"), items))


def astring(text: str) -> Value:
    """An astring value: an atom when safe, otherwise a quoted string or literal.

    ``NIL`` is quoted so that no client reads it as the nil value.
    """
    if _is_atom(text, ASTRING_CHARS) and text.upper() != "NIL":
        return Atom(text)
    return text


# -- encoding -----------------------------------------------------------------------------
class _Writer:
    __slots__ = ("buf", "out")

    def __init__(self) -> None:
        self.out: Output = []
        self.buf = bytearray()

    def blob(self, blob: BlobSlice) -> None:
        self.buf += b"{%d}\r\n" % blob.length
        self.out.append(bytes(self.buf))
        self.buf.clear()
        self.out.append(blob)

    def done(self) -> Output:
        if self.buf:
            self.out.append(bytes(self.buf))
        return self.out


def _quotable(data: bytes) -> bool:
    return all(c in _PRINTABLE for c in data)


def _write_string(w: _Writer, data: bytes) -> None:
    if _quotable(data):
        # RFC 3501 §4.3, §9 quoted-specials: escape DQUOTE and backslash.
        w.buf += b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    else:
        # RFC 3501 §4.3: anything with CR, LF, NUL, control or 8-bit octets is a literal.
        w.buf += b"{%d}\r\n" % len(data)
        w.buf += data


def _write(w: _Writer, value: Value, depth: int = 0) -> None:
    if depth > 64:
        raise ValueError("response nesting too deep")
    if value is None:
        w.buf += b"NIL"
    elif isinstance(value, bool):
        raise TypeError("bool is not an IMAP value")
    elif isinstance(value, int):
        if value < 0:
            raise ValueError("IMAP numbers are unsigned")
        w.buf += b"%d" % value
    elif isinstance(value, Atom | Raw):
        w.buf += value.encode("ascii")
    elif isinstance(value, MailboxName):
        _write(w, astring(encode_mailbox(value)), depth)
    elif isinstance(value, str):
        _write_string(w, value.encode("utf-8"))
    elif isinstance(value, bytes):
        _write_string(w, value)
    elif isinstance(value, BlobSlice):
        w.blob(value)
    elif isinstance(value, Adjacent):
        for item in value:
            _write(w, item, depth + 1)
    elif isinstance(value, list | tuple):
        w.buf += b"("
        for i, item in enumerate(value):
            if i:
                w.buf += b" "
            _write(w, item, depth + 1)
        w.buf += b")"
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as an IMAP value")


def encode_value(value: Value) -> Output:
    """One value in IMAP syntax (no CRLF)."""
    w = _Writer()
    _write(w, value)
    return w.done()


def encode(response: Response) -> Output:
    """The wire form of a response, CRLF-terminated."""
    w = _Writer()
    match response:
        case StatusResponse(tag=tag, condition=cond, text=text, code=code):
            w.buf += (tag or "*").encode("ascii") + b" " + cond.value.encode("ascii") + b" "
            if code is not None:
                w.buf += code.render().encode("ascii") + b" "
            w.buf += text.encode("ascii")
        case Untagged(items=items):
            w.buf += b"*"
            for item in items:
                w.buf += b" "
                _write(w, item)
        case Continuation(text=text):
            w.buf += b"+ " + text.encode("ascii")
    w.buf += b"\r\n"
    return w.done()


def encode_bytes(response: Response) -> bytes:
    """:func:`encode` for responses without blob slices (raises if there is one)."""
    parts = encode(response)
    if any(isinstance(p, BlobSlice) for p in parts):
        raise ValueError("response contains a blob slice; use encode()")
    return b"".join(p for p in parts if isinstance(p, bytes))


# -- modified UTF-7 (RFC 3501 §5.1.3) ---------------------------------------------------
_MB64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


def _b64_modified(chars: str) -> str:
    raw = chars.encode("utf-16-be")  # lone surrogates raise UnicodeEncodeError (ValueError)
    return base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")


def encode_mailbox(name: str) -> str:
    """Unicode mailbox name → modified UTF-7 (RFC 3501 §5.1.3).

    Printable US-ASCII except ``&`` stands for itself; ``&`` is ``&-``; every other run of
    characters is ``&`` + modified BASE64 of its UTF-16BE form + ``-``.
    """
    out: list[str] = []
    run: list[str] = []
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            if run:
                out.append("&" + _b64_modified("".join(run)) + "-")
                run.clear()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    if run:
        out.append("&" + _b64_modified("".join(run)) + "-")
    return "".join(out)


def decode_mailbox(text: str) -> str:
    """Modified UTF-7 → Unicode. Raises ``ValueError`` on anything malformed.

    Strict (RFC 3501 §5.1.3): only printable US-ASCII on the wire; a shifted run must be
    terminated by ``-``, use the modified alphabet, have zero padding bits, decode to
    whole UTF-16 code units without lone surrogates, and must not encode a character that
    has to be represented as itself (printable US-ASCII).
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if not 0x20 <= ord(ch) <= 0x7E:
            raise ValueError("mailbox name has a character that is not printable US-ASCII")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise ValueError("unterminated '&' sequence in mailbox name")
        chunk = text[i + 1 : end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        if not set(chunk) <= _MB64 or len(chunk) % 4 == 1:
            raise ValueError("invalid modified BASE64 in mailbox name")
        padded = chunk.replace(",", "/") + "=" * (-len(chunk) % 4)
        try:
            raw = base64.b64decode(padded, validate=True)
        except binascii.Error as exc:
            raise ValueError("invalid modified BASE64 in mailbox name") from exc
        if len(raw) % 2:
            raise ValueError("modified BASE64 in mailbox name is not whole UTF-16 units")
        try:
            decoded = raw.decode("utf-16-be")
        except UnicodeDecodeError as exc:
            raise ValueError("mailbox name has invalid UTF-16 in a '&' sequence") from exc
        if _b64_modified(decoded) != chunk:  # non-zero padding bits: not canonical
            raise ValueError("non-canonical modified BASE64 in mailbox name")
        if any(0x20 <= ord(c) <= 0x7E for c in decoded):
            raise ValueError("printable ASCII must not be BASE64-encoded in a mailbox name")
        out.append(decoded)
    return "".join(out)


# -- dates --------------------------------------------------------------------------------
#: RFC 3501 §9 date-month, in order.
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_datetime(when: datetime) -> str:
    """RFC 3501 §9 ``date-time`` contents: ``" 7-Jul-1996 02:44:25 -0700"`` (no quotes).

    Send it as a ``str`` value: it is printable, so it is quoted. ``when`` must be aware.
    """
    offset = when.utcoffset()
    if offset is None:
        raise ValueError("INTERNALDATE needs a timezone-aware datetime")
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hh, mm = divmod(abs(minutes), 60)
    return (
        f"{when.day:2d}-{MONTHS[when.month - 1]}-{when.year:04d} "
        f"{when.hour:02d}:{when.minute:02d}:{when.second:02d} {sign}{hh:02d}{mm:02d}"
    )
