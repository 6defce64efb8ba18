"""Property tests for the IMAP core and grammar.

- Any bytes, in any chunks, give commands, rejections or a budget ``ProtocolError``;
  never another exception, and the core's buffers stay inside its limits.
- Every chunking of a valid transcript gives the same events.
- Sequence sets and modified UTF-7 round-trip; response strings never break a line.
"""

from __future__ import annotations

import random
import re
from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postkeep.imap import responses as r
from postkeep.imap.grammar import (
    Append,
    Authenticate,
    Command,
    Event,
    Idle,
    Logout,
    ParseError,
    StartTls,
    parse_append_head,
    parse_command,
)
from postkeep.imap.protocol import (
    NEED_DATA,
    AppendAborted,
    AppendChunk,
    AppendEnd,
    AuthAborted,
    AuthResponse,
    ConnectionClosed,
    ContinueLiteral,
    IdleDone,
    ImapServer,
    Limits,
    LiteralPending,
    ProtocolError,
    Rejected,
)
from postkeep.imap.responses import BlobSlice, Condition, decode_mailbox, encode_mailbox
from postkeep.imap.seqset import MAX_NUMBER, SequenceSet

SMALL = Limits(
    max_line=200,
    max_literal=300,
    max_small_literal=100,
    max_command=400,
    max_depth=8,
    max_seqset_ranges=20,
    max_bad_commands=1000,
    max_commands=1000,
    append_chunk=64,
)
BOUND = max(SMALL.max_line + 2, SMALL.max_small_literal) + SMALL.max_command

# Byte soup biased towards IMAP's framing and keywords.
TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"a1 ",
    b"b2 ",
    b"* ",
    b"+ ",
    b"(",
    b")",
    b"[",
    b"]",
    b'"',
    b"\\",
    b"{3}\r\n",
    b"{5+}\r\n",
    b"{0}\r\n",
    b"{150}\r\n",
    b"{999999999}\r\n",
    b"{400+}\r\n",
    b"{4294967296}\r\n",
    b"LOGIN ",
    b"AUTHENTICATE PLAIN ",
    b"AGJvYgBwdw==",
    b"SELECT INBOX",
    b"EXAMINE &Jjo-",
    b"APPEND INBOX ",
    b"(\\Seen) ",
    b"IDLE",
    b"DONE",
    b"STARTTLS",
    b"LOGOUT",
    b"FETCH 1:* (FLAGS BODY.PEEK[1.HEADER.FIELDS (A B)]<0.9>)",
    b"UID ",
    b"SEARCH ",
    b"NOT ",
    b"OR ",
    b"CHARSET UTF-8 ",
    b"RETURN (MIN) ",
    b"STORE 1 +FLAGS ",
    b'LIST (SUBSCRIBED) "" (* %) RETURN (STATUS (MESSAGES))',
    b"1:*,3",
    b"NIL",
    b"\x00",
    b"\xff",
    "ü".encode(),
    b"ENABLE CONDSTORE",
    b'ID ("a" NIL)',
    b"CREATE x (USE (\\Sent))",
]
soup = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=12)), max_size=60).map(
    b"".join
)

# Whole commands, valid and not, so that literals, APPEND, IDLE and SASL are reached.
COMMANDS = [
    b"a NOOP",
    b"a CAPABILITY",
    b"a LOGIN bob pw",
    b"a AUTHENTICATE PLAIN",
    b"a STARTTLS",
    b"a AUTHENTICATE PLAIN AGJvYgBwdw==",
    b"a SELECT INBOX",
    b"a EXAMINE Sent",
    b"a IDLE",
    b"a FETCH 1:* (FLAGS UID)",
    b"a UID SEARCH OR SEEN NOT (1:3 FROM x)",
    b"a CLOSE",
    b"a STORE 1 -FLAGS (\\Seen)",
    b'a LIST "" *',
    b"a STATUS INBOX (MESSAGES)",
    b"a LOGOUT",
    b"a ENABLE CONDSTORE",
    b"a UNSELECT",
    b"a UID EXPUNGE 1",
    b"a MOVE 1 Trash",
    b"a FROB",
]
LITERAL_HEADS = [
    b"a LOGIN ",
    b"a LOGIN bob ",
    b"a APPEND INBOX ",
    b"a APPEND ",
    b"a SELECT ",
    b"a SEARCH SUBJECT ",
    b"a APPEND INBOX (\\Seen) ",
    b'a ID ("x" ',
]
SIDE_LINES = [b"DONE", b"done", b"*", b"AGJvYgBwdw==", b"!!", b""]


@st.composite
def literal_command(draw: st.DrawFn) -> bytes:
    head = draw(st.sampled_from(LITERAL_HEADS))
    size = draw(st.sampled_from([0, 3, 50, 99, 101, 299, 301, 999999999]))
    plus = draw(st.sampled_from([b"", b"+"]))
    body_len = size if size < 1000 else draw(st.integers(0, 20))
    body = draw(st.binary(min_size=body_len, max_size=body_len))
    tail = draw(st.sampled_from([b"", b" x", b" NIL)", b" {2}", b" {2+}\r\nzz"]))
    return head + b"{%d%s}\r\n" % (size, plus) + body + tail + b"\r\n"


chunk = st.one_of(
    soup,
    st.sampled_from(COMMANDS).map(lambda c: c + b"\r\n"),
    st.sampled_from(SIDE_LINES).map(lambda c: c + b"\r\n"),
    literal_command(),
)
session = st.lists(chunk, max_size=12).map(b"".join)


class Driver:
    """A session that answers every event, sometimes refusing (decided by ``rng``)."""

    def __init__(self, core: ImapServer, rng: random.Random) -> None:
        self.core = core
        self.rng = rng
        self.events: list[object] = []
        self.closed = False

    def send(self, item: r.Response | ContinueLiteral) -> None:
        for part in self.core.send(item):
            assert isinstance(part, bytes | BlobSlice)

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        self.core.receive_data(data)
        self.run()

    def run(self) -> None:
        while not self.closed:
            try:
                event = self.core.next_event()
            except ProtocolError as exc:
                assert exc.hint.closes
                self.send(exc.hint)
                self.closed = True
                return
            if event is NEED_DATA:
                assert self.core.buffered <= BOUND
                return
            assert isinstance(event, Event)
            self.record(event)
            if isinstance(event, ConnectionClosed):
                self.closed = True
                return
            self.answer(event)

    def record(self, event: Event) -> None:
        # Merge AppendChunks: their boundaries depend on how the bytes arrived.
        if isinstance(event, AppendChunk):
            assert 0 < len(event.data) <= SMALL.append_chunk
            if self.events and isinstance(self.events[-1], bytearray):
                self.events[-1] += event.data
                return
            self.events.append(bytearray(event.data))
            return
        self.events.append(event)

    def refuse(self) -> bool:
        return self.rng.random() < 0.2

    def answer(self, event: Event) -> None:
        core = self.core
        match event:
            case LiteralPending(tag=tag) | Append(tag=tag):
                if self.refuse():
                    self.send(r.tagged(tag, Condition.NO, "refused"))
                else:
                    self.send(ContinueLiteral())
            case AppendChunk():
                pass
            case (
                Rejected(response=resp) | AppendAborted(response=resp) | AuthAborted(response=resp)
            ):
                self.send(resp)
            case IdleDone(tag=tag, response=resp):
                self.send(resp or r.tagged(tag, Condition.OK, "done"))
            case AppendEnd(tag=tag) | AuthResponse(tag=tag):
                self.send(r.tagged(tag, Condition.OK, "done"))
            case Idle() | Authenticate() if not self.refuse():
                self.send(r.continuation("go"))
            case StartTls(tag=tag):
                self.send(r.tagged(tag, Condition.OK, "Begin TLS"))
                core.start_tls()
            case Logout(tag=tag):
                self.send(r.bye("bye"))
                self.send(r.tagged(tag, Condition.OK, "done"))
            case Command(tag=tag):
                cond = Condition.NO if self.refuse() else Condition.OK
                self.send(r.tagged(tag, cond, "done"))
            case _:
                raise AssertionError(f"unexpected {event!r}")


PRELUDES = [b"", b"p LOGIN u p\r\n", b"p LOGIN u p\r\nq SELECT INBOX\r\n"]


class _NeverRefuse(random.Random):
    def random(self) -> float:
        return 1.0


def new_core(*, tls: bool) -> ImapServer:
    return ImapServer(
        limits=SMALL,
        tls_active=tls,
        tls_offered=not tls,
        require_tls=True,
        starttls_hint="Use STARTTLS first",
    )


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in pairwise(bounds)]


# -- the core never fails on garbage ----------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=session,
    points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
    tls=st.sampled_from([True, True, False]),
    prelude=st.sampled_from(PRELUDES),
    seed=st.integers(0, 2**16),
)
def test_any_bytes_give_events_or_bad_never_a_crash(
    data: bytes, points: list[int], tls: bool, prelude: bytes, seed: int
) -> None:
    driver = Driver(new_core(tls=tls), _NeverRefuse())
    driver.feed(prelude)  # reach the state without refusals, then let the session vary
    driver.rng = random.Random(seed)
    for piece in cut(data, points):
        driver.feed(piece)
    driver.feed(b"")
    assert driver.closed


# -- chunking does not matter -------------------------------------------------------------
MSG = b"From: a@b\r\nSubject: x\r\n\r\nc9 LOGOUT\r\n" + b"m" * 150 + b"\r\n"
TRANSCRIPT = (
    b"a1 CAPABILITY\r\n"
    b"a2 LOGIN {3}\r\nbob {2+}\r\npw\r\n"
    b'a3 SELECT "INBOX" (CONDSTORE)\r\n'
    b"a4 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]<0.100>) (CHANGEDSINCE 9)\r\n"
    b"a5 SEARCH RETURN (MIN COUNT) CHARSET UTF-8 OR FROM {5}\r\nj\xc3\xb6rg UNSEEN\r\n"
    b"a6 APPEND INBOX (\\Seen) {%d}\r\n%s\r\n"
    b"a7 APPEND Drafts {%d+}\r\n%s\r\n"
    b"a8 IDLE\r\nDONE\r\n"
    b"a9 STORE 1:3 +FLAGS.SILENT (\\Deleted)\r\n"
    b"b0 FETCH 1 (BOGUS)\r\n"
    b"b1 UID EXPUNGE 1:3\r\n"
    b"b2 NOOP " + b"x" * 300 + b"\r\n"
    b'b3 LIST "" (INBOX &Jjo-*) RETURN (SPECIAL-USE STATUS (UNSEEN))\r\n'
    b"b4 LOGOUT\r\n"
) % (len(MSG), MSG, len(MSG), MSG)


def replay(chunks: list[bytes]) -> list[object]:
    driver = Driver(new_core(tls=True), random.Random(0))
    driver.rng = _NeverRefuse()
    for chunk in chunks:
        driver.feed(chunk)
    driver.feed(b"")
    return driver.events


REFERENCE = replay([TRANSCRIPT])


def test_reference_transcript_is_what_we_think() -> None:
    kinds = [type(e).__name__ for e in REFERENCE]
    assert kinds == [
        "Capability",
        "LiteralPending",
        "Login",
        "Select",
        "Fetch",
        "LiteralPending",
        "Search",
        "Append",
        "bytearray",
        "AppendEnd",
        "Append",
        "bytearray",
        "AppendEnd",
        "Idle",
        "IdleDone",
        "Store",
        "Rejected",
        "Expunge",
        "Rejected",
        "List",
        "Logout",
        "ConnectionClosed",
    ]
    assert REFERENCE[8] == MSG and REFERENCE[11] == MSG


@settings(max_examples=100, deadline=None)
@given(points=st.lists(st.integers(min_value=0, max_value=len(TRANSCRIPT)), max_size=40))
def test_every_chunking_gives_the_same_events(points: list[int]) -> None:
    assert replay(cut(TRANSCRIPT, points)) == REFERENCE


def test_byte_by_byte_gives_the_same_events() -> None:
    assert replay([TRANSCRIPT[i : i + 1] for i in range(len(TRANSCRIPT))]) == REFERENCE


# -- the grammar alone ----------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    fragments=st.lists(
        soup.map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), min_size=1, max_size=4
    ),
    literal=st.binary(max_size=20),
)
def test_grammar_raises_only_parse_error(fragments: list[bytes], literal: bytes) -> None:
    literals = [literal] * (len(fragments) - 1)
    for frags in (fragments, [b"a " + fragments[0], *fragments[1:]]):
        try:
            parse_command(frags, literals, max_depth=8, max_ranges=20)
        except ParseError as exc:
            assert exc.reason and all(0x20 <= ord(c) < 0x7F for c in exc.reason)
        try:
            parse_append_head(frags, literals, max_depth=8)
        except ParseError:
            pass


# -- round trips ----------------------------------------------------------------------------
numbers = st.one_of(st.none(), st.integers(min_value=1, max_value=MAX_NUMBER))
seqsets = st.lists(st.tuples(numbers, numbers), min_size=1, max_size=20).map(
    lambda rs: SequenceSet(tuple(rs))
)


@given(seqsets)
def test_seqset_format_parse_round_trip(s: SequenceSet) -> None:
    assert SequenceSet.parse(s.format()) == s


@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(1, 40)), st.one_of(st.none(), st.integers(1, 40))
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 30),
)
def test_seqset_resolve_matches_the_naive_reading(
    ranges: list[tuple[int | None, int | None]], largest: int
) -> None:
    s = SequenceSet(tuple(ranges))
    naive: set[int] = set()
    for a, b in ranges:
        if (a is None or b is None) and largest == 0:
            continue
        lo, hi = sorted((largest if a is None else a, largest if b is None else b))
        naive.update(range(lo, hi + 1))
    resolved = s.resolve(largest)
    got = {n for lo, hi in resolved for n in range(lo, hi + 1)}
    assert got == naive
    assert all(b1 + 1 < a2 for (_, b1), (a2, _) in pairwise(resolved))
    if naive:
        assert SequenceSet.of(naive).resolve(largest) == resolved


@given(st.text(max_size=40))
def test_modified_utf7_round_trip(name: str) -> None:
    wire = encode_mailbox(name)
    assert all(0x20 <= ord(c) < 0x7F for c in wire)
    assert decode_mailbox(wire) == name


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30))
def test_modified_utf7_decode_only_raises_value_error(wire: str) -> None:
    try:
        decode_mailbox(wire)
    except ValueError:
        pass


@given(st.one_of(st.text(max_size=30), st.binary(max_size=30)))
def test_strings_encode_as_a_safe_quoted_string_or_an_exact_literal(v: str | bytes) -> None:
    raw = v.encode("utf-8") if isinstance(v, str) else v
    [out] = r.encode_value(v)
    assert isinstance(out, bytes)
    if out.startswith(b'"'):
        assert b"\r" not in out and b"\n" not in out and out.isascii()
        body = re.sub(rb"\\(.)", rb"\1", out[1:-1])
        assert body == raw
    else:
        head, _, body = out.partition(b"\r\n")
        assert head == b"{%d}" % len(raw) and body == raw
