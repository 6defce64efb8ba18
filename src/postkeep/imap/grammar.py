"""IMAP command grammar: one command's bytes → one typed, frozen command dataclass.

The core (``protocol.py``) splits the byte stream into commands and reads literals; this
module parses what it assembled. A command arrives as ``fragments`` — its lines, without
CRLF and without a trailing literal marker ``{n}``/``{n+}`` — and ``literals``, the octets
of each literal, which sit between consecutive fragments (``len(fragments) ==
len(literals) + 1``). So ``a LOGIN {3}\\r\\nbob "pw"\\r\\n`` is fragments
``[b"a LOGIN ", b' "pw"']`` and literals ``[b"bob"]``.

The grammar is RFC 3501 §9 with the extensions we offer: LITERAL+ (RFC 7888), SASL-IR
(RFC 4959), IDLE (RFC 2177), UIDPLUS (RFC 4315), MOVE (RFC 6851), UNSELECT (RFC 3691),
NAMESPACE (RFC 2342), ID (RFC 2971), ENABLE (RFC 5161), SPECIAL-USE and CREATE-SPECIAL-USE
(RFC 6154), LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819), ESEARCH (RFC 4731), CONDSTORE
(RFC 7162), plus STATUS SIZE (RFC 8438) and RFC 9051's UTF-8 in quoted strings.

Bytes stop here: every field of a command is ``str``, ``int`` or a typed value. Mailbox
names are decoded from modified UTF-7 (RFC 3501 §5.1.3) and ``INBOX`` is normalised to
upper case (RFC 3501 §5.1). System flags get their canonical spelling (``\\seen`` →
``\\Seen``); keywords keep the client's.

Invariants:

- Any input makes :func:`parse_command` return a :class:`Command` or raise
  :class:`ParseError`; no other exception escapes (tests/property/test_imap_grammar.py).
- A :class:`ParseError` reason is a sentence naming what was wrong; it quotes client data
  only through :func:`_show`, which keeps at most a few printable ASCII characters, so the
  reason is always safe to send back in a BAD.
- Parenthesised lists, search-key nesting (``(``, ``NOT``, ``OR``) and body part numbers
  are bounded by ``max_depth``; sequence sets by ``max_ranges`` ranges. Recursion depth is
  therefore bounded whatever the input.
- The password of :class:`Login` and the SASL data of :class:`Authenticate` are never in
  a ``repr``.
- Commands are frozen, slotted dataclasses; their ``name`` is the key of the core's state
  table (``"UID FETCH"`` for the UID form).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from enum import Enum
from typing import ClassVar

from postkeep.imap.responses import (
    ASTRING_CHARS,
    ATOM_CHARS,
    MONTHS,
    TAG_CHARS,
    Code,
    CodeName,
    Condition,
    astring,
    decode_mailbox,
    encode_value,
)
from postkeep.imap.seqset import SequenceSet

__all__ = [
    "MAX_MODSEQ",
    "SUPPORTED_CHARSETS",
    "Append",
    "AppendHead",
    "Authenticate",
    "BodySection",
    "Capability",
    "Check",
    "Close",
    "Command",
    "Copy",
    "Create",
    "DateField",
    "DateOp",
    "Delete",
    "Enable",
    "Event",
    "Examine",
    "Expunge",
    "Fetch",
    "FetchAtt",
    "FetchItem",
    "Id",
    "Idle",
    "List",
    "Login",
    "Logout",
    "Lsub",
    "Move",
    "Namespace",
    "Noop",
    "ParseError",
    "Rename",
    "Search",
    "SearchAll",
    "SearchAnd",
    "SearchBody",
    "SearchDate",
    "SearchFlag",
    "SearchHeader",
    "SearchKey",
    "SearchModSeq",
    "SearchNot",
    "SearchOr",
    "SearchRecent",
    "SearchSeq",
    "SearchSize",
    "SearchText",
    "SearchUid",
    "Section",
    "SectionText",
    "Select",
    "StartTls",
    "Status",
    "StatusItem",
    "Store",
    "StoreMode",
    "Subscribe",
    "Unselect",
    "Unsubscribe",
    "parse_append_head",
    "parse_command",
    "peek_command",
]

#: RFC 7162 §7: mod-sequence-value is 1*DIGIT up to 2^63-1.
MAX_MODSEQ = 9223372036854775807
#: RFC 3501 §4.2 number: unsigned 32-bit.
MAX_NUMBER = 4294967295
#: RFC 3501 §6.4.4: charsets SEARCH accepts; anything else is NO [BADCHARSET (…)].
SUPPORTED_CHARSETS = ("UTF-8", "US-ASCII")
#: RFC 2971 §3.3: at most 30 field-value pairs, fields ≤ 30 octets, values ≤ 1024.
ID_MAX_PAIRS = 30
ID_MAX_FIELD = 30
ID_MAX_VALUE = 1024
#: RFC 6154 §2 special-use attributes (CREATE … (USE (…)) may name only these).
SPECIAL_USE_ATTRS = frozenset(
    {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"}
)
#: RFC 3501 §2.3.2 system flags, canonical spelling by upper-case name (no backslash).
SYSTEM_FLAGS = {
    f[1:].upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
}

DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_RANGES = 10_000


# -- events and commands -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Event:
    """Base of everything ``ImapServer.next_event()`` returns."""


@dataclass(frozen=True, slots=True)
class Command(Event):
    """A complete client command. ``name`` keys the core's state table."""

    NAME: ClassVar[str] = ""
    tag: str

    @property
    def name(self) -> str:
        return self.NAME


@dataclass(frozen=True, slots=True)
class _UidCommand(Command):
    uid: bool

    @property
    def name(self) -> str:
        return f"UID {self.NAME}" if self.uid else self.NAME


# any state (RFC 3501 §6.1)
@dataclass(frozen=True, slots=True)
class Capability(Command):
    NAME: ClassVar[str] = "CAPABILITY"


@dataclass(frozen=True, slots=True)
class Noop(Command):
    NAME: ClassVar[str] = "NOOP"


@dataclass(frozen=True, slots=True)
class Logout(Command):
    NAME: ClassVar[str] = "LOGOUT"


@dataclass(frozen=True, slots=True)
class Id(Command):
    """RFC 2971: ``params`` is ``None`` for ``ID NIL``."""

    NAME: ClassVar[str] = "ID"
    params: tuple[tuple[str, str | None], ...] | None


# not authenticated (RFC 3501 §6.2)
@dataclass(frozen=True, slots=True)
class StartTls(Command):
    NAME: ClassVar[str] = "STARTTLS"


@dataclass(frozen=True, slots=True)
class Authenticate(Command):
    """``AUTHENTICATE mech [initial-response]``; ``b""`` for SASL-IR ``=`` (RFC 4959 §3)."""

    NAME: ClassVar[str] = "AUTHENTICATE"
    mechanism: str
    initial_response: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Login(Command):
    NAME: ClassVar[str] = "LOGIN"
    user: str
    password: str = field(repr=False)


# authenticated (RFC 3501 §6.3)
@dataclass(frozen=True, slots=True)
class Select(Command):
    """SELECT (RFC 3501 §6.3.1); ``condstore`` for the ``(CONDSTORE)`` parameter.

    :class:`Examine` subclasses it, so ``case Select()`` matches both; ``readonly`` tells
    them apart."""

    NAME: ClassVar[str] = "SELECT"
    mailbox: str
    condstore: bool = False

    @property
    def readonly(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class Examine(Select):
    """EXAMINE (RFC 3501 §6.3.2): SELECT, read-only."""

    NAME: ClassVar[str] = "EXAMINE"

    @property
    def readonly(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Create(Command):
    """``special_use``: the ``(USE (…))`` attributes (RFC 6154 §3), canonical spelling."""

    NAME: ClassVar[str] = "CREATE"
    mailbox: str
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delete(Command):
    NAME: ClassVar[str] = "DELETE"
    mailbox: str


@dataclass(frozen=True, slots=True)
class Rename(Command):
    NAME: ClassVar[str] = "RENAME"
    mailbox: str
    new_name: str


@dataclass(frozen=True, slots=True)
class Subscribe(Command):
    NAME: ClassVar[str] = "SUBSCRIBE"
    mailbox: str


@dataclass(frozen=True, slots=True)
class Unsubscribe(Command):
    NAME: ClassVar[str] = "UNSUBSCRIBE"
    mailbox: str


class StatusItem(Enum):
    """RFC 3501 §6.3.10 status-att, plus HIGHESTMODSEQ (RFC 7162) and SIZE (RFC 8438)."""

    MESSAGES = "MESSAGES"
    RECENT = "RECENT"
    UIDNEXT = "UIDNEXT"
    UIDVALIDITY = "UIDVALIDITY"
    UNSEEN = "UNSEEN"
    HIGHESTMODSEQ = "HIGHESTMODSEQ"
    SIZE = "SIZE"


@dataclass(frozen=True, slots=True)
class List(Command):
    """LIST, basic (RFC 3501 §6.3.8) or extended (RFC 5258 §3).

    ``select``: selection options (``SUBSCRIBED``, ``REMOTE``, ``RECURSIVEMATCH``,
    ``SPECIAL-USE``). ``returns``: return options (``SUBSCRIBED``, ``CHILDREN``,
    ``SPECIAL-USE``, ``STATUS``); with ``STATUS``, ``status_items`` lists what to return
    (RFC 5819). ``extended`` is true when the client used any LIST-EXTENDED syntax, which
    changes what the response must contain (RFC 5258 §3.5, CHILDINFO).
    """

    NAME: ClassVar[str] = "LIST"
    reference: str
    patterns: tuple[str, ...]
    select: frozenset[str] = frozenset()
    returns: frozenset[str] = frozenset()
    status_items: tuple[StatusItem, ...] = ()
    extended: bool = False


@dataclass(frozen=True, slots=True)
class Lsub(Command):
    NAME: ClassVar[str] = "LSUB"
    reference: str
    pattern: str


@dataclass(frozen=True, slots=True)
class Status(Command):
    NAME: ClassVar[str] = "STATUS"
    mailbox: str
    items: tuple[StatusItem, ...]


@dataclass(frozen=True, slots=True)
class AppendHead:
    """What precedes APPEND's message literal: where, flags, date (RFC 3501 §6.3.11)."""

    tag: str
    mailbox: str
    flags: tuple[str, ...]
    internal_date: datetime | None


@dataclass(frozen=True, slots=True)
class Append(Command):
    """APPEND, before its message (RFC 3501 §6.3.11). The message itself follows as
    ``AppendChunk`` events and ``AppendEnd`` (see ``protocol.py``).

    ``synchronizing`` is false for a LITERAL+ ``{n+}`` literal: the client sends the bytes
    without waiting, so refusing it costs reading and discarding ``size`` octets.
    """

    NAME: ClassVar[str] = "APPEND"
    mailbox: str
    flags: tuple[str, ...]
    internal_date: datetime | None
    size: int
    synchronizing: bool


@dataclass(frozen=True, slots=True)
class Namespace(Command):
    NAME: ClassVar[str] = "NAMESPACE"


@dataclass(frozen=True, slots=True)
class Enable(Command):
    """RFC 5161: capability names, upper-cased."""

    NAME: ClassVar[str] = "ENABLE"
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Idle(Command):
    NAME: ClassVar[str] = "IDLE"


# selected (RFC 3501 §6.4)
@dataclass(frozen=True, slots=True)
class Check(Command):
    NAME: ClassVar[str] = "CHECK"


@dataclass(frozen=True, slots=True)
class Close(Command):
    NAME: ClassVar[str] = "CLOSE"


@dataclass(frozen=True, slots=True)
class Unselect(Command):
    NAME: ClassVar[str] = "UNSELECT"


@dataclass(frozen=True, slots=True)
class Expunge(Command):
    """EXPUNGE, or UID EXPUNGE with ``uids`` (RFC 4315 §2.1)."""

    NAME: ClassVar[str] = "EXPUNGE"
    uids: SequenceSet | None = None

    @property
    def name(self) -> str:
        return "EXPUNGE" if self.uids is None else "UID EXPUNGE"


# -- search keys (RFC 3501 §6.4.4) --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SearchKey:
    """Base of the search-key tree; ``search.py`` evaluates it."""


@dataclass(frozen=True, slots=True)
class SearchAll(SearchKey):
    pass


@dataclass(frozen=True, slots=True)
class SearchFlag(SearchKey):
    """ANSWERED/DELETED/DRAFT/FLAGGED/SEEN, KEYWORD, and their UN- forms (``present``)."""

    flag: str
    present: bool


@dataclass(frozen=True, slots=True)
class SearchRecent(SearchKey):
    """RECENT (``present``) / OLD. NEW is ``SearchAnd((RECENT, UNSEEN))``."""

    present: bool


class DateField(Enum):
    INTERNAL = "internal"  # BEFORE/ON/SINCE: the internal date, ignoring time and zone
    SENT = "sent"  # SENTBEFORE/SENTON/SENTSINCE: the Date: header


class DateOp(Enum):
    BEFORE = "before"
    ON = "on"
    SINCE = "since"


@dataclass(frozen=True, slots=True)
class SearchDate(SearchKey):
    field: DateField
    op: DateOp
    date: date


@dataclass(frozen=True, slots=True)
class SearchHeader(SearchKey):
    """HEADER name value; BCC/CC/FROM/SUBJECT/TO become this with the header's name."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class SearchBody(SearchKey):
    text: str


@dataclass(frozen=True, slots=True)
class SearchText(SearchKey):
    text: str


@dataclass(frozen=True, slots=True)
class SearchSize(SearchKey):
    """LARGER n (``larger``) or SMALLER n, in octets of RFC822.SIZE."""

    larger: bool
    size: int


@dataclass(frozen=True, slots=True)
class SearchSeq(SearchKey):
    seqset: SequenceSet


@dataclass(frozen=True, slots=True)
class SearchUid(SearchKey):
    seqset: SequenceSet


@dataclass(frozen=True, slots=True)
class SearchModSeq(SearchKey):
    """RFC 7162 §3.1.5: MODSEQ ["/flags/<flag>" priv|shared|all] n."""

    modseq: int
    entry: str | None = None
    entry_type: str | None = None


@dataclass(frozen=True, slots=True)
class SearchNot(SearchKey):
    key: SearchKey


@dataclass(frozen=True, slots=True)
class SearchOr(SearchKey):
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True, slots=True)
class SearchAnd(SearchKey):
    keys: tuple[SearchKey, ...]


@dataclass(frozen=True, slots=True)
class Search(_UidCommand):
    """SEARCH / UID SEARCH. ``returns`` is ``None`` for a plain SEARCH (answer ``* SEARCH``)
    and the ESEARCH return options otherwise (answer ``* ESEARCH``, RFC 4731 §3.1); an
    empty ``RETURN ()`` means ``ALL``.
    """

    NAME: ClassVar[str] = "SEARCH"
    charset: str | None
    key: SearchKey
    returns: frozenset[str] | None = None


# -- fetch (RFC 3501 §6.4.5) --------------------------------------------------------------
class FetchAtt(Enum):
    ENVELOPE = "ENVELOPE"
    FLAGS = "FLAGS"
    INTERNALDATE = "INTERNALDATE"
    RFC822 = "RFC822"
    RFC822_HEADER = "RFC822.HEADER"
    RFC822_SIZE = "RFC822.SIZE"
    RFC822_TEXT = "RFC822.TEXT"
    BODY = "BODY"  # the non-extensible BODYSTRUCTURE
    BODYSTRUCTURE = "BODYSTRUCTURE"
    UID = "UID"
    MODSEQ = "MODSEQ"  # RFC 7162 §3.1.4.1


class SectionText(Enum):
    HEADER = "HEADER"
    HEADER_FIELDS = "HEADER.FIELDS"
    HEADER_FIELDS_NOT = "HEADER.FIELDS.NOT"
    TEXT = "TEXT"
    MIME = "MIME"


@dataclass(frozen=True, slots=True)
class Section:
    """``section-spec``: a part path (``(1, 2)`` for ``1.2``; empty = the message) and
    an optional text specifier; ``fields`` for HEADER.FIELDS[.NOT]."""

    part: tuple[int, ...] = ()
    text: SectionText | None = None
    fields: tuple[str, ...] = ()

    def format(self) -> str:
        out = ".".join(str(n) for n in self.part)
        if self.text is not None:
            out += ("." if out else "") + self.text.value
        if self.fields:
            names = []
            for name in self.fields:
                encoded = encode_value(astring(name))
                names.append(b"".join(p for p in encoded if isinstance(p, bytes)).decode())
            out += " (" + " ".join(names) + ")"
        return out


@dataclass(frozen=True, slots=True)
class BodySection:
    """``BODY[section]<partial>`` or ``BODY.PEEK[…]``; ``partial`` is (origin, length)."""

    section: Section
    peek: bool = False
    partial: tuple[int, int] | None = None

    def response_name(self) -> str:
        """The name in the FETCH response: never ``.PEEK``, and only the partial's origin
        (RFC 3501 §7.4.2 ``BODY[<section>]<<origin octet>>``)."""
        name = f"BODY[{self.section.format()}]"
        if self.partial is not None:
            name += f"<{self.partial[0]}>"
        return name


FetchItem = FetchAtt | BodySection

#: RFC 3501 §6.4.5 macros.
FETCH_MACROS: dict[str, tuple[FetchAtt, ...]] = {
    "ALL": (FetchAtt.FLAGS, FetchAtt.INTERNALDATE, FetchAtt.RFC822_SIZE, FetchAtt.ENVELOPE),
    "FAST": (FetchAtt.FLAGS, FetchAtt.INTERNALDATE, FetchAtt.RFC822_SIZE),
    "FULL": (
        FetchAtt.FLAGS,
        FetchAtt.INTERNALDATE,
        FetchAtt.RFC822_SIZE,
        FetchAtt.ENVELOPE,
        FetchAtt.BODY,
    ),
}


@dataclass(frozen=True, slots=True)
class Fetch(_UidCommand):
    """FETCH / UID FETCH. ``items`` is deduplicated, macros expanded; UID FETCH always
    includes ``UID`` (RFC 3501 §6.4.8) and CHANGEDSINCE always includes ``MODSEQ``
    (RFC 7162 §3.1.4.1), so the session returns exactly ``items``."""

    NAME: ClassVar[str] = "FETCH"
    seqset: SequenceSet
    items: tuple[FetchItem, ...]
    changed_since: int | None = None


class StoreMode(Enum):
    REPLACE = "FLAGS"
    ADD = "+FLAGS"
    REMOVE = "-FLAGS"


@dataclass(frozen=True, slots=True)
class Store(_UidCommand):
    """STORE / UID STORE (RFC 3501 §6.4.6), with UNCHANGEDSINCE (RFC 7162 §3.1.3)."""

    NAME: ClassVar[str] = "STORE"
    seqset: SequenceSet
    mode: StoreMode
    silent: bool
    flags: tuple[str, ...]
    unchanged_since: int | None = None


@dataclass(frozen=True, slots=True)
class Copy(_UidCommand):
    NAME: ClassVar[str] = "COPY"
    seqset: SequenceSet
    mailbox: str


@dataclass(frozen=True, slots=True)
class Move(_UidCommand):
    """MOVE / UID MOVE (RFC 6851 §3.1)."""

    NAME: ClassVar[str] = "MOVE"
    seqset: SequenceSet
    mailbox: str


# -- errors -------------------------------------------------------------------------------
class ParseError(Exception):
    """The command is malformed. ``reason`` is safe to send; ``condition`` is BAD except
    where an RFC says NO (SEARCH CHARSET: NO [BADCHARSET], RFC 3501 §6.4.4)."""

    def __init__(
        self, reason: str, *, condition: Condition = Condition.BAD, code: Code | None = None
    ) -> None:
        # Belt and braces: a reason goes on the wire, so it is printable ASCII, always.
        reason = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in reason) or "Syntax error"
        super().__init__(reason)
        self.reason = reason
        self.condition = condition
        self.code = code
        self.tag: str | None = None


def _show(data: bytes | str, limit: int = 24) -> str:
    """Client data made safe to quote in a reason: printable ASCII, bounded."""
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    clean = "".join(c if 0x20 <= ord(c) <= 0x7E and c not in "[]" else "?" for c in text)
    return clean[:limit] + ("..." if len(clean) > limit else "")


# -- character classes --------------------------------------------------------------------
_LIST_CHARS = ATOM_CHARS | frozenset(b"%*]")  # RFC 3501 §9 list-char
_DIGITS = frozenset(b"0123456789")
_SEQ_CHARS = _DIGITS | frozenset(b"*:,$")
_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_FETCH_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.")
_SECTION_WORD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.")
_STORE_OP_CHARS = _SECTION_WORD_CHARS | frozenset(b"+-")
_DATE_CHARS = frozenset(b"0123456789-ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# RFC 5322 §3.6.8 ftext: printable US-ASCII except ":".
_FTEXT = frozenset(c for c in range(33, 127) if c != ord(":"))
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_DATE_TEXT = re.compile(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})")
# RFC 3501 §9 date-time; a day without its leading space ("1-Jan-…") is accepted too.
_DATE_TIME = re.compile(
    r"( ?\d|\d{2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})"
)
_MONTH_NUMBER = {m.upper(): i + 1 for i, m in enumerate(MONTHS)}


# -- the parser ---------------------------------------------------------------------------
class _Parser:
    """A cursor over fragments and literals with the RFC 3501 §9 terminals."""

    __slots__ = ("depth", "frags", "i", "lits", "max_depth", "max_ranges", "pending", "pos")

    def __init__(
        self,
        fragments: Sequence[bytes],
        literals: Sequence[bytes],
        *,
        max_depth: int,
        max_ranges: int,
        pending: bool = False,
    ) -> None:
        if len(fragments) != len(literals) + 1:
            raise ValueError("a command has one more fragment than literals")
        self.frags = fragments
        self.lits = literals
        self.i = 0
        self.pos = 0
        self.depth = 0
        self.max_depth = max_depth
        self.max_ranges = max_ranges
        self.pending = pending  # the last fragment is followed by a literal not yet read

    # -- position -------------------------------------------------------------------
    def peek(self) -> int:
        frag = self.frags[self.i]
        return frag[self.pos] if self.pos < len(frag) else -1

    def at_literal(self) -> bool:
        return self.pos == len(self.frags[self.i]) and self.i < len(self.lits)

    def at_end(self) -> bool:
        """No more input in this command (a pending literal may still follow)."""
        return self.pos == len(self.frags[self.i]) and self.i == len(self.frags) - 1

    def at_pending(self) -> bool:
        return self.pending and self.at_end()

    def take_literal(self) -> bytes:
        data = self.lits[self.i]
        self.i += 1
        self.pos = 0
        return data

    def take_while(self, chars: frozenset[int]) -> bytes:
        frag = self.frags[self.i]
        start = end = self.pos
        n = len(frag)
        while end < n and frag[end] in chars:
            end += 1
        self.pos = end
        return frag[start:end]

    def peek_word(self, chars: frozenset[int] = ATOM_CHARS) -> str:
        frag = self.frags[self.i]
        end = self.pos
        while end < len(frag) and frag[end] in chars:
            end += 1
        return frag[self.pos : end].decode("ascii").upper()

    def try_keyword(self, word: str) -> bool:
        """Consume the atom ``word`` (case-insensitive) if it is next, as a whole atom."""
        if self.peek_word() == word:
            self.pos += len(word)
            return True
        return False

    def describe_next(self) -> str:
        if self.at_literal():
            return "a literal"
        if self.at_end():
            return "the end of the command"
        frag = self.frags[self.i]
        return repr(_show(frag[self.pos : self.pos + 12], 12))

    def fail(self, expected: str) -> ParseError:
        return ParseError(f"Expected {expected}, found {self.describe_next()}")

    def expect(self, char: str, expected: str) -> None:
        if self.peek() != ord(char):
            raise self.fail(expected)
        self.pos += 1

    def sp(self, after: str) -> None:
        if self.peek() != 0x20:
            raise self.fail(f"a space after {after}")
        self.pos += 1

    def end(self, what: str) -> None:
        if not self.at_end():
            raise ParseError(f"Unexpected {self.describe_next()} after {what}")

    def enter(self, what: str) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise ParseError(f"{what} nested too deeply (limit {self.max_depth})")

    def leave(self) -> None:
        self.depth -= 1

    # -- terminals ------------------------------------------------------------------
    def tag(self) -> str:
        raw = self.take_while(TAG_CHARS)
        if not raw or self.peek() not in (0x20, -1):
            raise ParseError("Command line has no valid tag")
        return raw.decode("ascii")

    def atom(self, expected: str) -> str:
        raw = self.take_while(ATOM_CHARS)
        if not raw:
            raise self.fail(expected)
        return raw.decode("ascii")

    def quoted(self) -> bytes:
        frag = self.frags[self.i]
        m = _QUOTED.match(frag, self.pos)
        if m is None:
            raise ParseError("Unterminated or invalid quoted string")
        self.pos = m.end()
        return re.sub(rb"\\([\"\\])", rb"\1", m.group(1))

    def string(self, expected: str) -> bytes:
        """RFC 3501 §9 string: quoted or literal."""
        if self.at_literal():
            return self.take_literal()
        if self.peek() == ord('"'):
            return self.quoted()
        raise self.fail(expected)

    def astring(self, expected: str) -> bytes:
        if self.at_literal() or self.peek() == ord('"'):
            return self.string(expected)
        raw = self.take_while(ASTRING_CHARS)
        if not raw:
            raise self.fail(expected)
        return raw

    def nstring(self, expected: str) -> bytes | None:
        if self.try_keyword("NIL"):
            return None
        return self.string(expected)

    def number(self, what: str, *, maximum: int = MAX_NUMBER, nonzero: bool = False) -> int:
        raw = self.take_while(_DIGITS)
        if not raw:
            raise self.fail(what)
        if len(raw) > len(str(maximum)) or int(raw) > maximum:
            raise ParseError(f"{_noun(what)} is too large")
        value = int(raw)
        if nonzero and value == 0:
            raise ParseError(f"{_noun(what)} must not be zero")
        return value

    def text(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError(f"{_noun(what)} is not valid UTF-8") from None

    def mailbox(self, what: str = "a mailbox name") -> str:
        name = _decode_name(self.astring(what), what)
        # RFC 3501 §5.1: INBOX is case-insensitive.
        return "INBOX" if name.upper() == "INBOX" else name

    def list_mailbox(self) -> str:
        if self.at_literal() or self.peek() == ord('"'):
            raw = self.string("a mailbox pattern")
        else:
            raw = self.take_while(_LIST_CHARS)
            if not raw:
                raise self.fail("a mailbox pattern")
        return _decode_name(raw, "mailbox pattern")

    def seqset(self) -> SequenceSet:
        raw = self.take_while(_SEQ_CHARS)
        if not raw:
            raise self.fail("a sequence set")
        try:
            return SequenceSet.parse(raw.decode("ascii"), max_ranges=self.max_ranges)
        except ValueError as exc:
            raise ParseError(f"Invalid sequence set: {exc}") from None

    def flag(self, *, allow_recent: bool = False) -> str:
        if self.peek() == ord("\\"):
            self.pos += 1
            name = self.atom("a flag name after '\\'")
            canonical = SYSTEM_FLAGS.get(name.upper())
            if canonical is not None:
                return canonical
            if name.upper() == "RECENT":
                if not allow_recent:
                    # RFC 3501 §2.3.2: \Recent cannot be altered by the client.
                    raise ParseError("\\Recent cannot be set by a client")
                return "\\Recent"
            return "\\" + name
        return self.atom("a flag")

    def flag_list(self) -> tuple[str, ...]:
        self.expect("(", "'(' to start the flag list")
        flags: list[str] = []
        if self.peek() != ord(")"):
            flags.append(self.flag())
            while self.peek() == 0x20:
                self.pos += 1
                flags.append(self.flag())
        self.expect(")", "')' to end the flag list")
        return tuple(dict.fromkeys(flags))

    def search_date(self) -> date:
        if self.peek() == ord('"'):
            raw = self.quoted()
        else:
            raw = self.take_while(_DATE_CHARS)
        text = raw.decode("ascii", "replace")
        m = _DATE_TEXT.fullmatch(text)
        month = _MONTH_NUMBER.get(m.group(2).upper()) if m else None
        if m is None or month is None:
            raise ParseError(f"Invalid date {_show(text)!r}: expected e.g. 1-Feb-2024")
        try:
            return date(int(m.group(3)), month, int(m.group(1)))
        except ValueError:
            raise ParseError(f"Invalid date {_show(text)!r}: no such day") from None

    def date_time(self) -> datetime:
        raw = self.quoted()
        text = raw.decode("ascii", "replace")
        m = _DATE_TIME.fullmatch(text)
        month = _MONTH_NUMBER.get(m.group(2).upper()) if m else None
        if m is None or month is None:
            raise ParseError(
                f'Invalid date-time {_show(text)!r}: expected e.g. "17-Jul-1996 02:44:25 -0700"'
            )
        day, _, year, hh, mi, ss, sign, zh, zm = m.groups()
        try:
            if int(zm) > 59:
                raise ValueError("zone minutes")
            offset = timedelta(hours=int(zh), minutes=int(zm))
            tz = timezone(-offset if sign == "-" else offset)
            return datetime(int(year), month, int(day), int(hh), int(mi), int(ss), tzinfo=tz)
        except ValueError:
            raise ParseError(f"Invalid date-time {_show(text)!r}: out of range") from None

    def paren_atoms(self, what: str) -> list[str]:
        """``"(" [atom *(SP atom)] ")"``, upper-cased."""
        self.expect("(", f"'(' to start the {what}")
        words: list[str] = []
        if self.peek() != ord(")"):
            words.append(self.atom(f"a {what} item").upper())
            while self.peek() == 0x20:
                self.pos += 1
                words.append(self.atom(f"a {what} item").upper())
        self.expect(")", f"')' to end the {what}")
        return words


def _noun(what: str) -> str:
    """ "a mailbox name" → "Mailbox name", for the start of a sentence."""
    for article in ("a ", "an ", "the "):
        if what.startswith(article):
            what = what[len(article) :]
    return what[:1].upper() + what[1:]


def _decode_name(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError(f"{_noun(what)} has 8-bit characters: send it in modified UTF-7") from None
    try:
        return decode_mailbox(text)
    except ValueError:
        raise ParseError(
            f"{_noun(what)} is not valid modified UTF-7 (RFC 3501 section 5.1.3)"
        ) from None


# -- command parsers ----------------------------------------------------------------------
_Parse = Callable[[_Parser, str], Command]


def _no_args(cls: type[Command]) -> _Parse:
    def parse(p: _Parser, tag: str) -> Command:
        p.end(cls.NAME)
        return cls(tag)

    return parse


def _p_id(p: _Parser, tag: str) -> Command:
    p.sp("ID")
    if p.try_keyword("NIL"):
        return Id(tag, None)
    p.expect("(", "'(' or NIL after ID")
    pairs: list[tuple[str, str | None]] = []
    while p.peek() != ord(")"):
        if pairs:
            p.sp("an ID value")
        name = p.string("an ID field name")
        p.sp("an ID field name")
        value = p.nstring("an ID value or NIL")
        if len(pairs) >= ID_MAX_PAIRS:
            raise ParseError(f"ID has more than {ID_MAX_PAIRS} field-value pairs")
        if len(name) > ID_MAX_FIELD or (value is not None and len(value) > ID_MAX_VALUE):
            raise ParseError("ID field name or value too long (RFC 2971 section 3.3)")
        pairs.append(
            (p.text(name, "ID field"), None if value is None else p.text(value, "ID value"))
        )
    p.pos += 1
    p.end("the ID parameter list")
    return Id(tag, tuple(pairs))


def _p_authenticate(p: _Parser, tag: str) -> Command:
    p.sp("AUTHENTICATE")
    mechanism = p.atom("a SASL mechanism name").upper()
    initial: bytes | None = None
    if not p.at_end():
        p.sp("the mechanism name")
        raw = p.take_while(_B64_CHARS)
        if raw == b"=":
            initial = b""  # RFC 4959 §3: "=" is an empty initial response
        else:
            try:
                initial = base64.b64decode(raw, validate=True) if raw else None
            except (binascii.Error, ValueError):
                initial = None
            if initial is None:
                raise ParseError("Invalid base64 in the initial response")
    p.end("the initial response")
    return Authenticate(tag, mechanism, initial)


def _p_login(p: _Parser, tag: str) -> Command:
    p.sp("LOGIN")
    user = p.text(p.astring("a user name"), "user name")
    p.sp("the user name")
    password = p.text(p.astring("a password"), "password")
    p.end("the password")
    return Login(tag, user, password)


def _p_select(readonly: bool) -> _Parse:
    def parse(p: _Parser, tag: str) -> Command:
        name = "EXAMINE" if readonly else "SELECT"
        p.sp(name)
        mailbox = p.mailbox()
        condstore = False
        if not p.at_end():
            p.sp("the mailbox name")
            # RFC 4466 §2.1 select-params; only CONDSTORE (RFC 7162 §3.1.8) is offered.
            for param in p.paren_atoms(f"{name} parameter list"):
                if param != "CONDSTORE":
                    raise ParseError(f"Unknown {name} parameter {_show(param)}")
                condstore = True
        p.end(f"the {name} parameters")
        cls = Examine if readonly else Select
        return cls(tag, mailbox, condstore)

    return parse


def _p_create(p: _Parser, tag: str) -> Command:
    p.sp("CREATE")
    mailbox = p.mailbox()
    uses: list[str] = []
    if not p.at_end():
        p.sp("the mailbox name")
        # RFC 4466 §2.2 create-params; RFC 6154 §3 USE (…).
        p.expect("(", "'(' to start the CREATE parameters")
        while True:
            param = p.atom("a CREATE parameter").upper()
            if param != "USE":
                raise ParseError(f"Unknown CREATE parameter {_show(param)}")
            p.sp("USE")
            p.expect("(", "'(' after USE")
            if p.peek() != ord(")"):
                uses.append(_use_attr(p))
                while p.peek() == 0x20:
                    p.pos += 1
                    uses.append(_use_attr(p))
            p.expect(")", "')' to end the USE list")
            if p.peek() != 0x20:
                break
            p.pos += 1
        p.expect(")", "')' to end the CREATE parameters")
    p.end("the CREATE parameters")
    canonical = {a.upper(): a for a in SPECIAL_USE_ATTRS}
    return Create(tag, mailbox, tuple(dict.fromkeys(canonical.get(u.upper(), u) for u in uses)))


def _use_attr(p: _Parser) -> str:
    # RFC 6154 §6 use-attr = "\\All" / … / use-attr-ext ("\\" atom)
    if p.peek() != ord("\\"):
        raise p.fail("a special-use attribute such as \\Sent")
    return p.flag(allow_recent=True)


def _one_mailbox(cls: type[Delete] | type[Subscribe] | type[Unsubscribe]) -> _Parse:
    def parse(p: _Parser, tag: str) -> Command:
        p.sp(cls.NAME)
        mailbox = p.mailbox()
        p.end("the mailbox name")
        return cls(tag, mailbox)

    return parse


def _p_rename(p: _Parser, tag: str) -> Command:
    p.sp("RENAME")
    old = p.mailbox()
    p.sp("the mailbox name")
    new = p.mailbox("the new mailbox name")
    p.end("the new mailbox name")
    return Rename(tag, old, new)


_LIST_SELECT = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
#: RFC 5258 §3.1: RECURSIVEMATCH needs one of these base options.
_LIST_SELECT_BASE = frozenset({"SUBSCRIBED", "SPECIAL-USE"})
_LIST_RETURN = frozenset({"SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS"})


def _status_items(p: _Parser) -> tuple[StatusItem, ...]:
    items: list[StatusItem] = []
    for word in p.paren_atoms("status item list"):
        try:
            items.append(StatusItem(word))
        except ValueError:
            raise ParseError(f"Unknown STATUS item {_show(word)}") from None
    if not items:
        raise ParseError("STATUS needs at least one item")
    return tuple(dict.fromkeys(items))


def _p_list(p: _Parser, tag: str) -> Command:
    p.sp("LIST")
    extended = False
    select: set[str] = set()
    if p.peek() == ord("("):
        # RFC 5258 §3.1 list-select-opts.
        extended = True
        for opt in p.paren_atoms("LIST selection options"):
            if opt not in _LIST_SELECT:
                raise ParseError(f"Unknown LIST selection option {_show(opt)}")
            select.add(opt)
        if "RECURSIVEMATCH" in select and not select & _LIST_SELECT_BASE:
            raise ParseError(
                "RECURSIVEMATCH needs SUBSCRIBED or SPECIAL-USE (RFC 5258 section 3.1)"
            )
        p.sp("the selection options")
    reference = _decode_name(p.astring("a reference name"), "reference name")
    p.sp("the reference name")
    patterns: list[str] = []
    if p.peek() == ord("("):
        # RFC 5258 §3 patterns = "(" list-mailbox *(SP list-mailbox) ")"
        extended = True
        p.pos += 1
        patterns.append(p.list_mailbox())
        while p.peek() == 0x20:
            p.pos += 1
            patterns.append(p.list_mailbox())
        p.expect(")", "')' to end the pattern list")
    else:
        patterns.append(p.list_mailbox())
    returns: set[str] = set()
    status_items: tuple[StatusItem, ...] = ()
    if not p.at_end():
        p.sp("the mailbox pattern")
        if not p.try_keyword("RETURN"):
            raise p.fail("RETURN")
        extended = True
        p.sp("RETURN")
        p.expect("(", "'(' after RETURN")
        while p.peek() != ord(")"):
            if returns:
                p.sp("a return option")
            opt = p.atom("a LIST return option").upper()
            if opt not in _LIST_RETURN:
                raise ParseError(f"Unknown LIST return option {_show(opt)}")
            if opt in returns:
                raise ParseError(f"LIST return option {opt} given twice")
            returns.add(opt)
            if opt == "STATUS":  # RFC 5819 §2
                p.sp("STATUS")
                status_items = _status_items(p)
        p.pos += 1
    p.end("the LIST arguments")
    return List(
        tag,
        reference,
        tuple(patterns),
        frozenset(select),
        frozenset(returns),
        status_items,
        extended,
    )


def _p_lsub(p: _Parser, tag: str) -> Command:
    p.sp("LSUB")
    reference = _decode_name(p.astring("a reference name"), "reference name")
    p.sp("the reference name")
    pattern = p.list_mailbox()
    p.end("the mailbox pattern")
    return Lsub(tag, reference, pattern)


def _p_status(p: _Parser, tag: str) -> Command:
    p.sp("STATUS")
    mailbox = p.mailbox()
    p.sp("the mailbox name")
    items = _status_items(p)
    p.end("the status items")
    return Status(tag, mailbox, items)


_APPEND_NEEDS_LITERAL = "APPEND needs the message as a literal, e.g. {310}"


def _append_head(p: _Parser, tag: str) -> AppendHead | None:
    def sp(after: str) -> None:
        if p.at_end() and not p.pending:
            raise ParseError(_APPEND_NEEDS_LITERAL)
        p.sp(after)

    p.sp("APPEND")
    if p.at_pending():
        return None  # the pending literal is the mailbox name itself
    mailbox = p.mailbox()
    sp("the mailbox name")
    flags: tuple[str, ...] = ()
    when: datetime | None = None
    if p.peek() == ord("("):
        flags = p.flag_list()
        sp("the flag list")
    if p.peek() == ord('"'):
        when = p.date_time()
        sp("the date-time")
    return AppendHead(tag, mailbox, flags, when)


def _p_append(p: _Parser, tag: str) -> Command:
    # Reached only when APPEND's line ended without a literal: the message is missing.
    _append_head(p, tag)
    if p.at_end():
        raise ParseError(_APPEND_NEEDS_LITERAL)
    raise ParseError(f"Unexpected {p.describe_next()} where the message literal belongs")


def _p_enable(p: _Parser, tag: str) -> Command:
    caps: list[str] = []
    while not p.at_end() or not caps:
        p.sp("ENABLE" if not caps else "a capability name")
        caps.append(p.atom("a capability name").upper())
    return Enable(tag, tuple(dict.fromkeys(caps)))


def _p_expunge(p: _Parser, tag: str) -> Command:
    p.end("EXPUNGE")
    return Expunge(tag)


def _p_uid_expunge(p: _Parser, tag: str) -> Command:
    p.sp("UID EXPUNGE")
    uids = p.seqset()
    p.end("the UID set")
    return Expunge(tag, uids)


# -- SEARCH -------------------------------------------------------------------------------
_FLAG_KEYS: dict[str, tuple[str, bool]] = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = {"BCC": "Bcc", "CC": "Cc", "FROM": "From", "SUBJECT": "Subject", "TO": "To"}
_DATE_KEYS = {
    "BEFORE": (DateField.INTERNAL, DateOp.BEFORE),
    "ON": (DateField.INTERNAL, DateOp.ON),
    "SINCE": (DateField.INTERNAL, DateOp.SINCE),
    "SENTBEFORE": (DateField.SENT, DateOp.BEFORE),
    "SENTON": (DateField.SENT, DateOp.ON),
    "SENTSINCE": (DateField.SENT, DateOp.SINCE),
}
#: RFC 4731 §3.1 return options we offer (SAVE is RFC 5182 SEARCHRES: not offered).
_ESEARCH_RETURN = frozenset({"MIN", "MAX", "ALL", "COUNT"})
_MODSEQ_ENTRY = re.compile(rb"/flags/\\?[!#-'+-Z^-~]+")  # RFC 7162 entry-flag-name


class _SearchParser:
    __slots__ = ("charset", "p")

    def __init__(self, p: _Parser, charset: str | None) -> None:
        self.p = p
        self.charset = charset

    def string(self, what: str) -> str:
        raw = self.p.astring(what)
        if self.charset == "US-ASCII" and not raw.isascii():
            raise ParseError(f"{_noun(what)} is not US-ASCII, as CHARSET said")
        return self.p.text(raw, what)

    def key(self) -> SearchKey:
        p = self.p
        c = p.peek()
        if c == ord("("):
            p.enter("Search keys")
            p.pos += 1
            keys = [self.key()]
            while p.peek() == 0x20:
                p.pos += 1
                keys.append(self.key())
            p.expect(")", "')' to end the search key list")
            p.leave()
            return keys[0] if len(keys) == 1 else SearchAnd(tuple(keys))
        if c in _SEQ_CHARS:
            return SearchSeq(p.seqset())
        word = p.atom("a search key").upper()
        if word in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[word]
            return SearchFlag(flag, present)
        if word in _HEADER_KEYS:
            p.sp(word)
            return SearchHeader(_HEADER_KEYS[word], self.string(f"a string after {word}"))
        if word in _DATE_KEYS:
            p.sp(word)
            fld, op = _DATE_KEYS[word]
            return SearchDate(fld, op, p.search_date())
        match word:
            case "ALL":
                return SearchAll()
            case "NEW":  # RFC 3501 §6.4.4: RECENT UNSEEN
                return SearchAnd((SearchRecent(True), SearchFlag("\\Seen", False)))
            case "OLD":
                return SearchRecent(False)
            case "RECENT":
                return SearchRecent(True)
            case "BODY" | "TEXT":
                p.sp(word)
                text = self.string(f"a string after {word}")
                return SearchBody(text) if word == "BODY" else SearchText(text)
            case "HEADER":
                p.sp(word)
                name = p.text(p.astring("a header field name"), "header field name")
                if not name or not all(ord(ch) in _FTEXT for ch in name):
                    raise ParseError("Invalid header field name in HEADER")
                p.sp("the header field name")
                return SearchHeader(name, self.string("a string after the header name"))
            case "KEYWORD" | "UNKEYWORD":
                p.sp(word)
                keyword = p.atom("a keyword")
                return SearchFlag(keyword, word == "KEYWORD")
            case "LARGER" | "SMALLER":
                p.sp(word)
                size = p.number("a size in octets", maximum=MAX_MODSEQ)
                return SearchSize(word == "LARGER", size)
            case "NOT":
                p.sp(word)
                p.enter("Search keys")
                inner = self.key()
                p.leave()
                return SearchNot(inner)
            case "OR":
                p.sp(word)
                p.enter("Search keys")
                left = self.key()
                p.sp("the first OR key")
                right = self.key()
                p.leave()
                return SearchOr(left, right)
            case "UID":
                p.sp(word)
                return SearchUid(p.seqset())
            case "MODSEQ":
                return self.modseq()
        raise ParseError(f"Unknown search key {_show(word)}")

    def modseq(self) -> SearchKey:
        # RFC 7162 §3.1.5: "MODSEQ" [SP entry-name SP entry-type-req] SP mod-sequence-valzer
        p = self.p
        p.sp("MODSEQ")
        entry: str | None = None
        entry_type: str | None = None
        if p.peek() == ord('"'):
            raw = p.quoted()
            if not _MODSEQ_ENTRY.fullmatch(raw):
                raise ParseError('MODSEQ entry name must be "/flags/<flag>"')
            entry = raw.decode("ascii")
            p.sp("the MODSEQ entry name")
            entry_type = p.atom("priv, shared or all").lower()
            if entry_type not in ("priv", "shared", "all"):
                raise ParseError("MODSEQ entry type must be priv, shared or all")
            p.sp("the MODSEQ entry type")
        value = p.number("a mod-sequence value", maximum=MAX_MODSEQ)
        return SearchModSeq(value, entry, entry_type)


def _p_search(uid: bool) -> _Parse:
    def parse(p: _Parser, tag: str) -> Command:
        p.sp("SEARCH")
        returns: frozenset[str] | None = None
        if p.try_keyword("RETURN"):  # RFC 4731 §3.1
            p.sp("RETURN")
            opts = p.paren_atoms("RETURN option list")
            for opt in opts:
                if opt == "SAVE":
                    raise ParseError("RETURN (SAVE) is not supported (no SEARCHRES)")
                if opt not in _ESEARCH_RETURN:
                    raise ParseError(f"Unknown SEARCH return option {_show(opt)}")
            returns = frozenset(opts) or frozenset({"ALL"})  # RFC 4731 §3.1: () = ALL
            p.sp("the RETURN options")
        charset: str | None = None
        if p.try_keyword("CHARSET"):
            p.sp("CHARSET")
            charset = p.text(p.astring("a charset name"), "charset").upper()
            if charset not in SUPPORTED_CHARSETS:
                # RFC 3501 §6.4.4: NO [BADCHARSET (supported charsets)].
                raise ParseError(
                    "Unsupported charset: use UTF-8 or US-ASCII",
                    condition=Condition.NO,
                    code=Code(CodeName.BADCHARSET, f"({' '.join(SUPPORTED_CHARSETS)})"),
                )
            p.sp("the charset")
        sp = _SearchParser(p, charset)
        keys = [sp.key()]
        while not p.at_end():
            p.sp("a search key")
            keys.append(sp.key())
        key = keys[0] if len(keys) == 1 else SearchAnd(tuple(keys))
        return Search(tag, uid, charset, key, returns)

    return parse


# -- FETCH --------------------------------------------------------------------------------
_SIMPLE_FETCH = {a.value: a for a in FetchAtt}


def _section(p: _Parser) -> Section:
    p.expect("[", "'[' to start a body section")
    part: list[int] = []
    needs_text = False
    while p.peek() in _DIGITS:
        part.append(p.number("a body part number", nonzero=True))
        if len(part) > p.max_depth:
            raise ParseError(f"Body part number nested too deeply (limit {p.max_depth})")
        if p.peek() != ord("."):
            break
        p.pos += 1
        if p.peek() not in _DIGITS:
            needs_text = True
            break
    text: SectionText | None = None
    fields: tuple[str, ...] = ()
    if needs_text or (not part and p.peek() != ord("]")):
        word = p.take_while(_SECTION_WORD_CHARS).decode("ascii").upper()
        try:
            text = SectionText(word)
        except ValueError:
            raise ParseError(f"Unknown body section {_show(word) or 'text'}") from None
        if text is SectionText.MIME and not part:
            raise ParseError("MIME needs a part number, e.g. BODY[1.MIME] (RFC 3501 section 6.4.5)")
        if text in (SectionText.HEADER_FIELDS, SectionText.HEADER_FIELDS_NOT):
            p.sp(word)
            p.expect("(", "'(' to start the header field list")
            names: list[str] = []
            while True:
                name = p.text(p.astring("a header field name"), "header field name")
                if not name or not all(ord(ch) in _FTEXT for ch in name):
                    raise ParseError("Invalid header field name in the section")
                names.append(name)
                if p.peek() != 0x20:
                    break
                p.pos += 1
            p.expect(")", "')' to end the header field list")
            fields = tuple(dict.fromkeys(names))
    p.expect("]", "']' to end the body section")
    return Section(tuple(part), text, fields)


def _fetch_att(p: _Parser) -> FetchItem:
    word = p.take_while(_FETCH_NAME_CHARS).decode("ascii").upper()
    if not word:
        raise p.fail("a FETCH item")
    if word in ("BODY", "BODY.PEEK") and p.peek() == ord("["):
        section = _section(p)
        partial: tuple[int, int] | None = None
        if p.peek() == ord("<"):
            p.pos += 1
            origin = p.number("the partial origin")
            p.expect(".", "'.' in the partial range <origin.length>")
            length = p.number("the partial length", nonzero=True)
            p.expect(">", "'>' to end the partial range")
            partial = (origin, length)
        return BodySection(section, word == "BODY.PEEK", partial)
    if word == "BODY.PEEK":
        raise ParseError("BODY.PEEK needs a section, e.g. BODY.PEEK[]")
    att = _SIMPLE_FETCH.get(word)
    if att is None:
        raise ParseError(f"Unknown FETCH item {_show(word + p.peek_word())}")
    return att


def _p_fetch(uid: bool) -> _Parse:
    def parse(p: _Parser, tag: str) -> Command:
        p.sp("FETCH")
        seqset = p.seqset()
        p.sp("the sequence set")
        items: list[FetchItem] = []
        macro = p.peek_word()
        if macro in FETCH_MACROS:
            p.pos += len(macro)
            items.extend(FETCH_MACROS[macro])
        elif p.peek() == ord("("):
            p.enter("Lists")
            p.pos += 1
            items.append(_fetch_att(p))
            while p.peek() == 0x20:
                p.pos += 1
                items.append(_fetch_att(p))
            p.expect(")", "')' to end the FETCH item list")
            p.leave()
        else:
            items.append(_fetch_att(p))
        changed_since: int | None = None
        if not p.at_end():
            p.sp("the FETCH items")
            # RFC 4466 §2.4 fetch-modifiers; RFC 7162 §3.1.4 CHANGEDSINCE.
            p.expect("(", "'(' to start the FETCH modifiers")
            while True:
                mod = p.atom("a FETCH modifier").upper()
                if mod != "CHANGEDSINCE":
                    raise ParseError(f"Unknown FETCH modifier {_show(mod)}")
                p.sp("CHANGEDSINCE")
                changed_since = p.number("a mod-sequence value", maximum=MAX_MODSEQ, nonzero=True)
                if p.peek() != 0x20:
                    break
                p.pos += 1
            p.expect(")", "')' to end the FETCH modifiers")
            items.append(FetchAtt.MODSEQ)
        p.end("the FETCH arguments")
        if uid:
            items.insert(0, FetchAtt.UID)
        return Fetch(tag, uid, seqset, tuple(dict.fromkeys(items)), changed_since)

    return parse


# -- STORE, COPY, MOVE --------------------------------------------------------------------
_STORE_OPS = {
    "FLAGS": (StoreMode.REPLACE, False),
    "FLAGS.SILENT": (StoreMode.REPLACE, True),
    "+FLAGS": (StoreMode.ADD, False),
    "+FLAGS.SILENT": (StoreMode.ADD, True),
    "-FLAGS": (StoreMode.REMOVE, False),
    "-FLAGS.SILENT": (StoreMode.REMOVE, True),
}


def _p_store(uid: bool) -> _Parse:
    def parse(p: _Parser, tag: str) -> Command:
        p.sp("STORE")
        seqset = p.seqset()
        p.sp("the sequence set")
        unchanged_since: int | None = None
        if p.peek() == ord("("):
            # RFC 4466 §2.5 store-modifiers; RFC 7162 §3.1.3 UNCHANGEDSINCE.
            p.pos += 1
            mod = p.atom("a STORE modifier").upper()
            if mod != "UNCHANGEDSINCE":
                raise ParseError(f"Unknown STORE modifier {_show(mod)}")
            p.sp("UNCHANGEDSINCE")
            unchanged_since = p.number("a mod-sequence value", maximum=MAX_MODSEQ)
            p.expect(")", "')' to end the STORE modifiers")
            p.sp("the STORE modifiers")
        op = p.take_while(_STORE_OP_CHARS).decode("ascii").upper()
        if op not in _STORE_OPS:
            raise ParseError(f"Expected FLAGS, +FLAGS or -FLAGS, found {_show(op)!r}")
        mode, silent = _STORE_OPS[op]
        p.sp(op)
        if p.peek() == ord("("):
            flags = p.flag_list()
        else:
            found = [p.flag()]
            while p.peek() == 0x20:
                p.pos += 1
                found.append(p.flag())
            flags = tuple(dict.fromkeys(found))
        p.end("the flags")
        return Store(tag, uid, seqset, mode, silent, flags, unchanged_since)

    return parse


def _p_copy(uid: bool, cls: type[Copy] | type[Move]) -> _Parse:
    def parse(p: _Parser, tag: str) -> Command:
        p.sp(cls.NAME)
        seqset = p.seqset()
        p.sp("the sequence set")
        mailbox = p.mailbox("a destination mailbox name")
        p.end("the mailbox name")
        return cls(tag, uid, seqset, mailbox)

    return parse


_COMMANDS: dict[str, _Parse] = {
    "CAPABILITY": _no_args(Capability),
    "NOOP": _no_args(Noop),
    "LOGOUT": _no_args(Logout),
    "ID": _p_id,
    "STARTTLS": _no_args(StartTls),
    "AUTHENTICATE": _p_authenticate,
    "LOGIN": _p_login,
    "SELECT": _p_select(readonly=False),
    "EXAMINE": _p_select(readonly=True),
    "CREATE": _p_create,
    "DELETE": _one_mailbox(Delete),
    "RENAME": _p_rename,
    "SUBSCRIBE": _one_mailbox(Subscribe),
    "UNSUBSCRIBE": _one_mailbox(Unsubscribe),
    "LIST": _p_list,
    "LSUB": _p_lsub,
    "STATUS": _p_status,
    "APPEND": _p_append,
    "NAMESPACE": _no_args(Namespace),
    "ENABLE": _p_enable,
    "IDLE": _no_args(Idle),
    "CHECK": _no_args(Check),
    "CLOSE": _no_args(Close),
    "UNSELECT": _no_args(Unselect),
    "EXPUNGE": _p_expunge,
    "SEARCH": _p_search(uid=False),
    "FETCH": _p_fetch(uid=False),
    "STORE": _p_store(uid=False),
    "COPY": _p_copy(False, Copy),
    "MOVE": _p_copy(False, Move),
    "UID SEARCH": _p_search(uid=True),
    "UID FETCH": _p_fetch(uid=True),
    "UID STORE": _p_store(uid=True),
    "UID COPY": _p_copy(True, Copy),
    "UID MOVE": _p_copy(True, Move),
    "UID EXPUNGE": _p_uid_expunge,
}

#: Every command name the grammar knows (the core's state table must cover exactly these).
COMMAND_NAMES = frozenset(_COMMANDS)


def _name(p: _Parser) -> str:
    name = p.atom("a command name").upper()
    if name == "UID":
        p.sp("UID")
        name = "UID " + p.atom("a command after UID").upper()
    return name


def peek_command(fragment: bytes) -> tuple[str | None, str | None]:
    """The tag and command name of a command's first line, as far as they can be read.

    ``(None, None)``: no valid tag (answer ``* BAD``). ``(tag, None)``: no command name.
    Names are upper-cased, ``"UID FETCH"`` for UID commands, and may be unknown.
    """
    p = _Parser([fragment], [], max_depth=1, max_ranges=1)
    try:
        tag = p.tag()
    except ParseError:
        return None, None
    try:
        p.sp("the tag")
        return tag, _name(p)
    except ParseError:
        return tag, None


def parse_command(
    fragments: Sequence[bytes],
    literals: Sequence[bytes] = (),
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_ranges: int = DEFAULT_MAX_RANGES,
) -> Command:
    """Parse one complete command. Raises :class:`ParseError` (with ``tag`` when known)."""
    p = _Parser(fragments, literals, max_depth=max_depth, max_ranges=max_ranges)
    tag: str | None = None
    try:
        tag = p.tag()
        p.sp("the tag")
        name = _name(p)
        parser = _COMMANDS.get(name)
        if parser is None:
            raise ParseError(f"Unknown command {_show(name)}")
        return parser(p, tag)
    except ParseError as exc:
        exc.tag = tag
        raise


def parse_append_head(
    fragments: Sequence[bytes],
    literals: Sequence[bytes] = (),
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> AppendHead | None:
    """Parse an APPEND up to a pending literal that ends its last fragment.

    Returns the head when that literal is the message (the mailbox has been read), or
    ``None`` when it is the mailbox name. Raises :class:`ParseError` when the text before
    the literal is not a valid APPEND head.
    """
    p = _Parser(fragments, literals, max_depth=max_depth, max_ranges=1, pending=True)
    tag: str | None = None
    try:
        tag = p.tag()
        p.sp("the tag")
        if _name(p) != "APPEND":
            raise ParseError("not an APPEND command")
        head = _append_head(p, tag)
        if head is not None and not p.at_pending():
            raise ParseError(f"Unexpected {p.describe_next()} before the message literal")
        return head
    except ParseError as exc:
        exc.tag = tag
        raise
