"""IMAP SEARCH: evaluate a parsed search-key tree over the selected mailbox (RFC 3501 §6.4.4).

``grammar.py`` turns ``SEARCH …`` into a tree of ``Search*`` keys; :func:`search_mailbox`
answers which messages of the selected mailbox match. It reads the mailbox through a
:class:`Source` one bounded chunk at a time: :class:`Candidate` rows (metadata), then, for
the messages metadata leaves open, their header sections, then whole messages, each in
batches the source may serve from one read transaction. :func:`evaluate` is the same
over a list of candidates and a ``load(uid)`` coroutine. The text helpers of
``mail/mime.py`` decode what is loaded.

Evaluation is staged per message, with three-valued logic (Kleene: ``None`` = "needs
more of the message"): first every key that metadata answers (flags, size, dates,
sequence numbers, UIDs, MODSEQ, RECENT); when that leaves the result open and the tree
has header keys (BCC, CC, FROM, SUBJECT, TO, HEADER, SENT*), the header section alone is
loaded and the tree evaluated with it; only what is still open (BODY/TEXT) is loaded
whole, with the analysis stored at ingest so that MIME is not parsed again. So ``SEEN``
never loads anything, ``SUBJECT x`` reads only header sections, and ``UNSEEN SUBJECT x``
or ``OR FLAGGED BODY x`` load only the messages whose flags do not already decide. Inside
an AND, children run cheapest first (metadata, then header fields and SENT*, then
BODY/TEXT), and AND/OR stop at the first deciding child.

Semantics (RFC 3501 §6.4.4, RFC 9051 §6.4.4, RFC 7162 §3.1.5) and our choices:

- Text keys (BCC, CC, FROM, SUBJECT, TO, ``HEADER name value``, BODY, TEXT) are
  case-insensitive substring matches against *decoded* text: RFC 2047 encoded-words in
  header fields (address fields included: their decoded field text is searched),
  base64/quoted-printable and charsets in body parts (``mime.text_for_search``).
  Case-insensitive means Unicode default case folding, ``str.casefold()``, after NFC
  normalisation of both the key and the text (close to RFC 5051 i;unicode-casemap, but
  without NFKD, so ``e`` does not match inside ``é``). A field that occurs several times
  matches if any occurrence does.
- ``HEADER name ""`` matches every message that has the field (RFC 3501 §6.4.4); so does
  ``SUBJECT ""`` etc., which the grammar turns into ``HEADER``. ``BODY ""``/``TEXT ""``
  match every message, without loading it.
- BODY searches the text parts of the body (and the headers of attached messages); TEXT
  the message header and that. At most :data:`TEXT_LIMIT` decoded characters of a message
  are searched (bounded work); text beyond them is not seen.
- BEFORE/ON/SINCE compare the date of the internal date in its own time zone, disregarding
  time; SENTBEFORE/SENTON/SENTSINCE the date of the ``Date:`` field in the zone written
  there (``-0000`` as UTC). A message without a parsable ``Date:`` matches no SENT* key
  (and so every ``NOT SENT…``).
- LARGER n: RFC822.SIZE > n; SMALLER n: RFC822.SIZE < n.
- System flags (``\\Seen``…) compare case-insensitively; keywords exactly, as the store
  keeps them (``store.api.SYSTEM_FLAGS``). NEW is RECENT UNSEEN and OLD NOT RECENT
  (the grammar builds those).
- Sequence sets: ``*`` is the last sequence number. UID sets: ``*`` is the highest UID
  in use, and ``n:*`` with n above it still names the last message (RFC 3501 §6.4.8).
  Numbers that name no message are ignored.
- ``MODSEQ n`` matches mod-sequences ≥ n. Only per-message mod-sequences are kept, so a
  ``"/flags/…" priv|shared|all`` entry uses the message's (RFC 7162 §3.1.5 allows this).
- ``charset``: only UTF-8 and US-ASCII exist here (RFC 3501 §6.4.4; anything else is
  NO [BADCHARSET] from the grammar). The grammar has already decoded the key strings, so
  the charset changes no comparison; an unsupported one raises ``ValueError``.

Invariants:

- A message is loaded only when the metadata keys leave its result open, its header
  section only when the tree has header keys, and the whole message only when the header
  keys leave it open; each at most once per search (``evaluate``'s ``load`` at most once
  per message). A header section is the first :data:`HEADER_PROBE` octets, or up to
  :data:`HEADER_CAP` when they hold no end of the header (:func:`header_complete`): what
  ``mime.decoded_header`` parses of it is the same as of the whole message.
- Memory is bounded by the batch, not the mailbox: :data:`CHUNK` candidates at a time,
  and loaded bytes of at most :data:`LOAD_COUNT` messages and :data:`LOAD_BYTES` octets
  per batch (or one message, if it alone is larger); decoded text lives only while its
  message is evaluated.
- Work is bounded: metadata keys cost O(tree) per message (sequence sets are resolved
  once and looked up by bisection); each text key costs one linear substring search
  (CPython's two-way/adaptive search, never quadratic) over at most :data:`TEXT_LIMIT`
  characters, and each message is decoded at most once per kind of text.
- The result is the UIDs of the matching candidates in candidate (sequence) order.
- Any tree of grammar ``Search*`` keys evaluates without raising; only ``load``'s own
  exceptions (e.g. a ``StorageError`` for a message expunged meanwhile) propagate.
- No I/O here besides the source's (or ``load``'s); the event loop gets a turn after every
  loaded batch, and every :data:`YIELD_EVERY` messages of a long metadata-only search.
"""

from __future__ import annotations

import asyncio
import unicodedata
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import IntEnum
from typing import Protocol

from postkeep.imap.grammar import (
    SUPPORTED_CHARSETS,
    DateField,
    DateOp,
    SearchAll,
    SearchAnd,
    SearchBody,
    SearchDate,
    SearchFlag,
    SearchHeader,
    SearchKey,
    SearchModSeq,
    SearchNot,
    SearchOr,
    SearchRecent,
    SearchSeq,
    SearchSize,
    SearchText,
    SearchUid,
)
from postkeep.imap.seqset import SequenceSet
from postkeep.mail.mime import (
    MAX_HEADER_PARSE,
    Analysis,
    decoded_header,
    header_date,
    text_for_search,
)

__all__ = [
    "CHUNK",
    "HEADER_CAP",
    "HEADER_PROBE",
    "LOAD_BYTES",
    "LOAD_COUNT",
    "TEXT_LIMIT",
    "YIELD_EVERY",
    "Candidate",
    "Loaded",
    "Loader",
    "Source",
    "evaluate",
    "fold",
    "header_complete",
    "search_mailbox",
]

#: At most this many decoded characters of a message are searched by BODY/TEXT.
TEXT_LIMIT = 4_000_000
#: A metadata-only search gives the event loop a turn after this many messages.
YIELD_EVERY = 2048
#: Candidates asked of a :class:`Source` at a time.
CHUNK = 1000
#: A batch of loaded messages holds at most this many messages …
LOAD_COUNT = 256
#: … and this many octets (a single larger message is a batch of its own).
LOAD_BYTES = 8 << 20
#: The first read of a header section: enough for nearly every real header.
HEADER_PROBE = 16 << 10
#: The most of a message a header section can need: ``mime`` parses header fields in the
#: first MAX_HEADER_PARSE octets, and the blank line ending them may end 2 octets later.
HEADER_CAP = MAX_HEADER_PARSE + 2

#: RFC 3501 §2.3.2 system flags, by lower-case name → canonical spelling.
_SYSTEM_FLAGS = {
    f.lower(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")
}

Loader = Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Loaded:
    """A whole message as stored, and the MIME analysis stored with it (if any)."""

    data: bytes
    analysis: Analysis | None = None


class Source(Protocol):
    """The selected mailbox, read a bounded batch at a time (see :func:`search_mailbox`).

    A UID missing from an answer names a message expunged meanwhile: it is left out of
    ``candidates`` and matches no text in ``headers`` and ``messages``.
    """

    async def candidates(self, present: Sequence[tuple[int, int]]) -> list[Candidate]:
        """The rows of these ``(seq, uid)`` messages (at most :data:`CHUNK`), in order."""

    async def headers(self, batch: Sequence[Candidate]) -> Mapping[int, bytes]:
        """By UID, each message's first octets up to where :func:`header_complete` holds."""

    async def messages(self, batch: Sequence[Candidate]) -> Mapping[int, Loaded]:
        """By UID, each whole message."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One message of the selected mailbox, as the session knows it without loading it."""

    seq: int
    uid: int
    flags: frozenset[str]
    internal_date: datetime
    size: int  # RFC822.SIZE
    modseq: int
    recent: bool


def header_complete(prefix: bytes, size: int) -> bool:
    """Whether ``prefix``, the first octets of a ``size``-octet message, is all SEARCH needs
    of its header section: the whole message, or an end of the header (a blank line, or
    an empty first line, RFC 5322 §2.1), or :data:`HEADER_CAP` octets.

    Then ``mime.decoded_header``/``header_date`` give the same on ``prefix`` as on the whole
    message: they look for the first blank line and parse fields before it, within the
    first ``MAX_HEADER_PARSE`` octets; the earliest blank line is found the same in any
    prefix that contains it.
    """
    if len(prefix) >= size or len(prefix) >= HEADER_CAP:
        return True
    return prefix.startswith((b"\n", b"\r\n")) or b"\n\n" in prefix or b"\n\r\n" in prefix


def fold(text: str) -> str:
    """The form both sides of a text comparison take: NFC, then Unicode case folding.

    ASCII (most of mail) takes the fast path, where casefold is lower().
    """
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())


# -- the compiled tree ---------------------------------------------------------------------
class _Cost(IntEnum):
    """What a key needs: AND evaluates its children in this order."""

    META = 0  # the candidate row
    HEADER = 1  # the message's header fields
    TEXT = 2  # decoded body text


@dataclass(frozen=True, slots=True)
class _Node:
    cost: _Cost


@dataclass(frozen=True, slots=True)
class _Const(_Node):
    value: bool


@dataclass(frozen=True, slots=True)
class _Flag(_Node):
    canonical: str  # canonical spelling for system flags, as given for keywords
    system: bool
    present: bool


@dataclass(frozen=True, slots=True)
class _Recent(_Node):
    present: bool


@dataclass(frozen=True, slots=True)
class _Date(_Node):
    sent: bool
    op: DateOp
    day: date


@dataclass(frozen=True, slots=True)
class _Size(_Node):
    larger: bool
    size: int


@dataclass(frozen=True, slots=True)
class _Set(_Node):
    """A resolved sequence or UID set: merged, sorted inclusive ranges."""

    by_uid: bool
    starts: tuple[int, ...]
    ends: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _ModSeq(_Node):
    modseq: int


@dataclass(frozen=True, slots=True)
class _Header(_Node):
    name: str  # lower case
    needle: str  # folded; "" = the field is present


@dataclass(frozen=True, slots=True)
class _Text(_Node):
    needle: str  # folded, non-empty
    headers: bool  # TEXT (True) or BODY (False)


@dataclass(frozen=True, slots=True)
class _Not(_Node):
    child: _Node


@dataclass(frozen=True, slots=True)
class _Or(_Node):
    left: _Node
    right: _Node


@dataclass(frozen=True, slots=True)
class _And(_Node):
    children: tuple[_Node, ...]  # cheapest first


_META = _Cost.META
_TRUE = _Const(_META, True)


def _resolve(seqset: SequenceSet, largest: int, *, by_uid: bool) -> _Set:
    # RFC 3501 §6.4.8 / seqset.resolve: "*" is the largest number in use, and ranges are
    # not clipped, so "100:*" with largest 50 is 50:100 and names the last message.
    spans = seqset.resolve(largest)
    return _Set(_META, by_uid, tuple(a for a, _ in spans), tuple(b for _, b in spans))


class _Compiler:
    __slots__ = ("max_seq", "max_uid")

    def __init__(self, max_seq: int, max_uid: int) -> None:
        self.max_seq = max_seq
        self.max_uid = max_uid

    def compile(self, key: SearchKey) -> _Node:
        match key:
            case SearchAll():
                return _TRUE
            case SearchFlag(flag=flag, present=present):
                canonical = _SYSTEM_FLAGS.get(flag.lower())
                if canonical == "\\Recent":  # a session property, not a stored flag
                    return _Recent(_META, present)
                if canonical is not None:
                    return _Flag(_META, canonical, True, present)
                return _Flag(_META, flag, False, present)
            case SearchRecent(present=present):
                return _Recent(_META, present)
            case SearchDate(field=fld, op=op, date=day):
                sent = fld is DateField.SENT
                return _Date(_Cost.HEADER if sent else _META, sent, op, day)
            case SearchSize(larger=larger, size=size):
                return _Size(_META, larger, size)
            case SearchSeq(seqset=seqset):
                return _resolve(seqset, self.max_seq, by_uid=False)
            case SearchUid(seqset=seqset):
                return _resolve(seqset, self.max_uid, by_uid=True)
            case SearchModSeq(modseq=modseq):
                # RFC 7162 §3.1.5: without per-flag mod-sequences, the entry is the message's.
                return _ModSeq(_META, modseq)
            case SearchHeader(name=name, value=value):
                return _Header(_Cost.HEADER, name.strip().lower(), fold(value))
            case SearchBody(text=text) | SearchText(text=text):
                if not text:
                    return _TRUE  # "" is a substring of every text: no need to load
                return _Text(_Cost.TEXT, fold(text), isinstance(key, SearchText))
            case SearchNot(key=inner):
                child = self.compile(inner)
                if isinstance(child, _Const):
                    return _Const(_META, not child.value)
                return _Not(child.cost, child)
            case SearchOr(left=left, right=right):
                a, b = self.compile(left), self.compile(right)
                if b.cost < a.cost:  # OR is commutative: try the cheaper side first
                    a, b = b, a
                return _Or(max(a.cost, b.cost), a, b)
            case SearchAnd(keys=keys):
                children = sorted((self.compile(k) for k in keys), key=lambda n: n.cost)
                if not children:
                    return _TRUE
                if len(children) == 1:
                    return children[0]
                return _And(children[-1].cost, tuple(children))
        raise TypeError(f"not a search key: {type(key).__name__}")


# -- one message's content -----------------------------------------------------------------
class _Content:
    """A loaded message and the text decoded from it so far (lazily, each kind once).

    ``whole`` False: ``data`` is only the header section (:func:`header_complete`), which
    answers header keys and SENT*; BODY/TEXT stay open. ``analysis`` is the stored MIME
    analysis of a whole ``data``, used when it describes exactly these octets.
    """

    __slots__ = (
        "_body",
        "_full",
        "_headers",
        "_sent",
        "_sent_known",
        "analysis",
        "data",
        "whole",
    )

    def __init__(
        self, data: bytes, *, whole: bool = True, analysis: Analysis | None = None
    ) -> None:
        self.data = data
        self.whole = whole
        root = None if analysis is None else analysis.parts.get("")
        self.analysis = analysis if root is not None and root.end == len(data) else None
        self._headers: dict[str, list[str]] = {}
        self._body: str | None = None
        self._full: str | None = None
        self._sent: date | None = None
        self._sent_known = False

    def header(self, name: str) -> list[str]:
        values = self._headers.get(name)
        if values is None:
            values = [fold(v) for v in decoded_header(self.data, name)]
            self._headers[name] = values
        return values

    def text(self, *, headers: bool) -> str:
        if headers:
            if self._full is None:
                self._full = fold(
                    text_for_search(
                        self.data,
                        headers=True,
                        body=True,
                        limit=TEXT_LIMIT,
                        analysis=self.analysis,
                    )
                )
            return self._full
        if self._body is None:
            self._body = fold(
                text_for_search(
                    self.data, headers=False, body=True, limit=TEXT_LIMIT, analysis=self.analysis
                )
            )
        return self._body

    def sent(self) -> date | None:
        if not self._sent_known:
            when = header_date(self.data)
            # RFC 3501 §6.4.4: the date only, in the zone the Date: field was written in.
            self._sent = None if when is None else when.date()
            self._sent_known = True
        return self._sent


def _compare_day(day: date, op: DateOp, key_day: date) -> bool:
    match op:
        case DateOp.BEFORE:
            return day < key_day
        case DateOp.ON:
            return day == key_day
        case DateOp.SINCE:
            return day >= key_day
    raise AssertionError(op)  # pragma: no cover - DateOp is closed


def _has_flag(flags: frozenset[str], node: _Flag) -> bool:
    if node.canonical in flags:
        return True
    if not node.system:
        return False  # keywords compare exactly (store.api.SYSTEM_FLAGS)
    low = node.canonical.lower()  # RFC 3501 §2.3.2: system flags in any case
    return any(f[:1] == "\\" and f.lower() == low for f in flags)


def _match(node: _Node, c: Candidate, content: _Content | None) -> bool | None:
    """``node`` on ``c``; ``None`` when it needs the content and ``content`` is None."""
    match node:
        case _Const(value=value):
            return value
        case _Flag():
            return _has_flag(c.flags, node) == node.present
        case _Recent(present=present):
            return c.recent == present
        case _Size(larger=larger, size=size):
            return c.size > size if larger else c.size < size
        case _Set(by_uid=by_uid, starts=starts, ends=ends):
            n = c.uid if by_uid else c.seq
            i = bisect_right(starts, n) - 1
            return i >= 0 and n <= ends[i]
        case _ModSeq(modseq=modseq):
            return c.modseq >= modseq
        case _Date(sent=False, op=op, day=day):
            # RFC 3501 §6.4.4: "disregarding time and timezone" — the internal date's own.
            return _compare_day(c.internal_date.date(), op, day)
        case _Date(op=op, day=day):
            if content is None:
                return None
            sent = content.sent()
            return sent is not None and _compare_day(sent, op, day)
        case _Header(name=name, needle=needle):
            if content is None:
                return None
            values = content.header(name)
            if not needle:
                return bool(values)  # RFC 3501 §6.4.4: HEADER name "" = has the field
            return any(needle in v for v in values)
        case _Text(needle=needle, headers=headers):
            if content is None or not content.whole:
                return None
            return needle in content.text(headers=headers)
        case _Not(child=child):
            r = _match(child, c, content)
            return None if r is None else not r
        case _Or(left=left, right=right):
            a = _match(left, c, content)
            if a is True:
                return True
            b = _match(right, c, content)
            if b is True:
                return True
            return None if a is None or b is None else False
        case _And(children=children):
            result: bool | None = True
            for child in children:
                r = _match(child, c, content)
                if r is False:
                    return False
                if r is None:
                    result = None
            return result
    raise TypeError(f"unknown node {type(node).__name__}")  # pragma: no cover


# -- staged evaluation ---------------------------------------------------------------------
HeaderLoad = Callable[[Sequence[Candidate]], Awaitable[Mapping[int, bytes]]]
MessageLoad = Callable[[Sequence[Candidate]], Awaitable[Mapping[int, Loaded]]]


def _has_header_key(node: _Node) -> bool:
    match node:
        case _Header() | _Date(sent=True):
            return True
        case _Not(child=child):
            return _has_header_key(child)
        case _Or(left=left, right=right):
            return _has_header_key(left) or _has_header_key(right)
        case _And(children=children):
            return any(_has_header_key(child) for child in children)
    return False


def _batches(cands: Sequence[Candidate], cap: int | None = None) -> list[list[Candidate]]:
    """``cands`` cut into runs of at most LOAD_COUNT messages and LOAD_BYTES octets, each
    message counted as its size, or ``cap`` if smaller (a larger one is a batch alone)."""
    out: list[list[Candidate]] = []
    batch: list[Candidate] = []
    octets = 0
    for c in cands:
        weight = c.size if cap is None else min(c.size, cap)
        if batch and (len(batch) >= LOAD_COUNT or octets + weight > LOAD_BYTES):
            out.append(batch)
            batch, octets = [], 0
        batch.append(c)
        octets += weight
    if batch:
        out.append(batch)
    return out


class _Evaluator:
    """Decides one chunk of candidates after another, loading only what stays open."""

    __slots__ = ("_headers", "_messages", "_node", "_since_yield")

    def __init__(self, node: _Node, headers: HeaderLoad | None, messages: MessageLoad) -> None:
        self._node = node
        # The header stage pays only when header keys can decide before BODY/TEXT.
        self._headers = headers if _has_header_key(node) else None
        self._messages = messages
        self._since_yield = 0

    async def chunk(self, cands: Sequence[Candidate]) -> list[Candidate]:
        """The matching candidates of ``cands``, in order."""
        node = self._node
        if isinstance(node, _Const):
            return list(cands) if node.value else []
        decided: dict[int, bool] = {}
        open_: list[Candidate] = []
        for c in cands:
            result = _match(node, c, None)
            if result is None:
                open_.append(c)
            else:
                decided[c.uid] = result
        if not open_:
            self._since_yield += len(cands)
            if self._since_yield >= YIELD_EVERY:
                self._since_yield = 0
                await asyncio.sleep(0)
        if open_ and self._headers is not None:
            still: list[Candidate] = []
            for batch in _batches(open_, HEADER_CAP):
                heads = await self._headers(batch)
                for c in batch:
                    result = _match(node, c, _Content(heads.get(c.uid, b""), whole=False))
                    if result is None:
                        still.append(c)
                    else:
                        decided[c.uid] = result
                await self._turn()
            open_ = still
        for batch in _batches(open_):
            whole = await self._messages(batch)
            for c in batch:
                loaded = whole.get(c.uid)
                content = (
                    _Content(b"")
                    if loaded is None
                    else _Content(loaded.data, analysis=loaded.analysis)
                )
                decided[c.uid] = _match(node, c, content) is True
            await self._turn()
        return [c for c in cands if decided[c.uid]]

    async def _turn(self) -> None:
        # The loads may all have been answered without a real wait (cached, or a fast
        # thread): give other sessions a turn after each batch of decoding anyway.
        self._since_yield = 0
        await asyncio.sleep(0)


def _compile(key: SearchKey, max_seq: int, max_uid: int, charset: str) -> _Node:
    if charset.upper() not in SUPPORTED_CHARSETS:
        raise ValueError(f"unsupported SEARCH charset {charset!r}")
    return _Compiler(max_seq, max_uid).compile(key)


# -- entry points --------------------------------------------------------------------------
async def search_mailbox(
    key: SearchKey,
    present: Sequence[tuple[int, int]],
    source: Source,
    *,
    charset: str = "UTF-8",
) -> list[Candidate]:
    """The candidates of ``present`` that ``key`` matches, in sequence order.

    ``present`` is the selected mailbox as the client knows it, ``(seq, uid)`` in sequence
    order (so that ``*`` means its last message); ``source`` is asked for
    :data:`CHUNK` of them at a time, then for the header sections and whole messages of
    those the cheaper keys leave open (see the module docstring).
    """
    if not present:
        _compile(key, 0, 0, charset)  # an unsupported charset is refused all the same
        return []
    max_seq = max(seq for seq, _ in present)
    max_uid = max(uid for _, uid in present)
    node = _compile(key, max_seq, max_uid, charset)
    if isinstance(node, _Const) and not node.value:
        return []
    evaluator = _Evaluator(node, source.headers, source.messages)
    out: list[Candidate] = []
    for start in range(0, len(present), CHUNK):
        cands = await source.candidates(present[start : start + CHUNK])
        out.extend(await evaluator.chunk(cands))
    return out


async def evaluate(
    key: SearchKey,
    candidates: Sequence[Candidate],
    load: Loader,
    *,
    charset: str = "UTF-8",
) -> list[int]:
    """The UIDs of the ``candidates`` that ``key`` matches, in candidate order.

    ``candidates`` is the whole selected mailbox in sequence order (so that ``*`` means
    the last message); ``load(uid)`` returns a message's stored bytes and is awaited only
    for messages whose metadata leaves the result open, at most once each.
    """
    if not candidates:
        _compile(key, 0, 0, charset)
        return []
    max_seq = max(c.seq for c in candidates)
    max_uid = max(c.uid for c in candidates)
    node = _compile(key, max_seq, max_uid, charset)

    async def messages(batch: Sequence[Candidate]) -> Mapping[int, Loaded]:
        return {c.uid: Loaded(await load(c.uid)) for c in batch}

    # One load per message: no separate header stage.
    evaluator = _Evaluator(node, None, messages)
    out: list[int] = []
    for start in range(0, len(candidates), CHUNK):
        matched = await evaluator.chunk(candidates[start : start + CHUNK])
        out.extend(c.uid for c in matched)
    return out
