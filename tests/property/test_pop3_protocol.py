"""Property tests for the POP3 core: chunking, arbitrary input, and RETR framing."""

from __future__ import annotations

import base64
import itertools
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postkeep.pop3 import replies
from postkeep.pop3.protocol import (
    NEED_DATA,
    AuthResponse,
    AuthStart,
    Capa,
    ConnectionClosed,
    Dele,
    Event,
    Limits,
    List,
    Noop,
    Pass,
    Pop3Server,
    ProtocolError,
    Quit,
    Retr,
    Rset,
    Stat,
    State,
    Stls,
    Top,
    Uidl,
    User,
)
from postkeep.pop3.replies import Reply

MESSAGE = b"Subject: x\r\n\r\n.one\r\ntwo\r\n..three\r\nfour"
CREDENTIAL_EVENTS = (User, Pass, AuthStart, AuthResponse)


def answer(core: Pop3Server, event: Event, *, accept: bool = True, more: bool = False) -> Reply:
    """A session: the right reply form for every event; ``accept`` False says -ERR."""
    if not accept:
        if isinstance(event, Quit):
            return replies.UPDATE_FAILED
        return replies.err("no")
    match event:
        case Capa():
            return core.capa_reply()
        case Stls():
            return replies.BEGIN_TLS
        case User():
            return replies.USER_OK
        case Pass():
            return replies.LOGGED_IN
        case AuthStart() | AuthResponse() if more:
            return replies.challenge(b"more")
        case AuthStart() | AuthResponse():
            return replies.LOGGED_IN
        case Stat():
            return replies.stat_reply(1, len(MESSAGE))
        case List(msg=None):
            return replies.list_reply([(1, len(MESSAGE))])
        case List(msg=int() as msg):
            return replies.scan_listing(msg, len(MESSAGE))
        case Uidl(msg=None):
            return replies.uidl_reply([(1, "u1")])
        case Uidl(msg=int() as msg):
            return replies.uidl_one(msg, "u1")
        case Retr():
            return replies.retr_reply(MESSAGE)
        case Top(lines=lines):
            return replies.top_reply(MESSAGE, lines)
        case Dele(msg=msg):
            return replies.deleted(msg)
        case Noop() | Rset():
            return replies.NOOP_OK
        case Quit():
            return replies.signing_off()
    raise AssertionError(event)


def run(core: Pop3Server, chunks: list[bytes]) -> tuple[list[object], bytes]:
    """Feed ``chunks`` like the driver; return the events (and error hints) and the output."""
    seen: list[object] = []
    out = bytearray()
    for chunk in chunks:
        core.receive_data(chunk)
        while True:
            try:
                event = core.next_event()
            except ProtocolError as exc:
                seen.append(exc.hint)
                out += core.send(exc.hint)
                continue
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                break
            seen.append(event)
            reply = answer(core, event, more=isinstance(event, AuthStart) and not event.initial)
            out += core.send(reply)
            if isinstance(event, Stls):
                core.start_tls()
    return seen, bytes(out)


def split(data: bytes, cuts: set[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


PLAIN = base64.b64encode(b"\0alice\0pw")
TRANSCRIPT = (
    b"CAPA\r\nAUTH PLAIN\r\n"
    + PLAIN
    + b"\r\n"  # challenge, then the response
    + b"STAT\r\nLIST\r\nlist 1\nUIDL\r\nUIDL 1\r\nRETR 1\r\nTOP 1 0\r\nTOP 1 2\r\n"
    + b"XYZZY\r\nRETR 0\r\nDELE 1\r\nNOOP\r\nRSET\r\nUSER x\r\n"
    + b"N" * 1100
    + b"\r\n"
    + b"QUIT\r\n"
)


def fresh(**kwargs: bool) -> Pop3Server:
    return Pop3Server(
        limits=Limits(line_length=1024),
        tls_active=kwargs.get("tls_active", True),
        tls_offered=kwargs.get("tls_offered", False),
        require_tls=kwargs.get("require_tls", True),
    )


BASELINE = run(fresh(), [TRANSCRIPT])


def test_the_transcript_reaches_every_state() -> None:
    seen, out = BASELINE
    assert out.endswith(b"+OK postkeep POP3 server signing off\r\n")
    assert replies.LINE_TOO_LONG in seen and replies.UNKNOWN_COMMAND in seen
    assert any(isinstance(e, AuthResponse) for e in seen)
    assert Top(1, 2) in seen


@settings(max_examples=150, deadline=None)
@given(st.sets(st.integers(min_value=1, max_value=len(TRANSCRIPT) - 1), max_size=40))
def test_every_chunking_gives_the_same_events_and_bytes(cuts: set[int]) -> None:
    assert run(fresh(), split(TRANSCRIPT, cuts)) == BASELINE


PLAINTEXT = b"CAPA\r\nUSER early\r\nSTLS\r\n"
OVER_TLS = b"CAPA\r\nUSER alice\r\nPASS pw\r\nSTAT\r\nQUIT\r\n"


@settings(max_examples=100, deadline=None)
@given(
    st.sets(st.integers(min_value=1, max_value=len(PLAINTEXT) - 1), max_size=10),
    st.sets(st.integers(min_value=1, max_value=len(OVER_TLS) - 1), max_size=10),
)
def test_every_chunking_around_stls_gives_the_same_events(
    plain_cuts: set[int], tls_cuts: set[int]
) -> None:
    def session(plain: list[bytes], tls: list[bytes]) -> tuple[list[object], bytes]:
        core = fresh(tls_active=False, tls_offered=True)
        a = run(core, plain)
        assert core.tls_active and core.state is State.AUTHORIZATION
        b = run(core, tls)
        return a[0] + b[0], a[1] + b[1]

    assert session(split(PLAINTEXT, plain_cuts), split(OVER_TLS, tls_cuts)) == session(
        [PLAINTEXT], [OVER_TLS]
    )


# -- arbitrary input ----------------------------------------------------------------------
_LINES = [
    b"CAPA\r\n",
    b"STLS\r\n",
    b"STLS\r\nUSER evil\r\n",
    b"USER alice\r\n",
    b"PASS pw\r\n",
    b"USER alice\r\nPASS pw\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN\r\n" + PLAIN + b"\r\n",
    b"AUTH PLAIN " + PLAIN + b"\r\n",
    b"AUTH PLAIN =\r\n",
    b"*\r\n",
    PLAIN + b"\r\n",
    b"STAT\r\n",
    b"LIST\r\n",
    b"LIST 1\r\n",
    b"RETR 1\r\n",
    b"TOP 1 1\r\n",
    b"UIDL\r\n",
    b"UIDL 1\r\n",
    b"DELE 1\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".\r\n",
]
_valid = st.sampled_from(_LINES)
_chunks = st.lists(
    # Mostly commands, so that every state is reached, with noise mixed in: raw bytes
    # (which run on into the next chunk), noisy lines, and over-long AUTH lines.
    st.one_of(
        _valid,
        _valid,
        _valid,
        st.lists(_valid, min_size=2, max_size=6).map(b"".join),  # pipelined
        st.binary(max_size=300),
        st.binary(max_size=80).map(lambda b: b + b"\r\n"),
        st.integers(min_value=900, max_value=9000).map(lambda n: b"AUTH PLAIN " + b"A" * n),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=_chunks,
    end=st.sampled_from([b"", b"QUIT\r\n", b"QUIT\r\nNOOP\r\n", b"STAT"]),
    tls_active=st.booleans(),
    tls_offered=st.booleans(),
    require_tls=st.booleans(),
    data=st.data(),
)
def test_arbitrary_bytes_give_events_or_protocol_errors_and_a_bounded_buffer(
    chunks: list[bytes],
    end: bytes,
    tls_active: bool,
    tls_offered: bool,
    require_tls: bool,
    data: st.DataObject,
) -> None:
    limits = Limits(line_length=512, auth_line_length=4096, errors=20, commands=80)
    core = Pop3Server(
        limits=limits, tls_active=tls_active, tls_offered=tls_offered, require_tls=require_tls
    )
    logged_in_by_us = False
    for chunk in [*chunks, end, b""]:
        core.receive_data(chunk)
        while True:
            try:
                event = core.next_event()
            except ProtocolError as exc:
                assert not exc.hint.ok and exc.hint.lines is None
                wire = core.send(exc.hint)
                assert wire.startswith(b"-ERR ") and wire.endswith(b"\r\n")
                if exc.hint.closes:
                    assert core.state is State.CLOSED
                    return
                continue
            if event is NEED_DATA:
                # Less than one line limit is ever left waiting for its line end; only
                # AUTH lines and SASL responses get the longer one (RFC 5034 §4).
                assert core.buffered < limits.auth_line_length
                if core.state is State.TRANSACTION:
                    assert core.buffered < limits.line_length
                break
            if isinstance(event, ConnectionClosed):
                assert core.state is State.CLOSED
                return
            # The core's gate: no credentials reach the session before TLS when required.
            if isinstance(event, CREDENTIAL_EVENTS):
                assert core.tls_active or not require_tls
            accept = data.draw(st.integers(0, 3)) > 0  # mostly yes, to get further
            more = isinstance(event, AuthStart | AuthResponse) and data.draw(st.booleans())
            reply = answer(core, event, accept=accept, more=more)
            before = core.state
            core.send(reply)
            if core.state is State.TRANSACTION and before is not State.TRANSACTION:
                assert isinstance(event, Pass | AuthStart | AuthResponse) and accept
                logged_in_by_us = True
            if isinstance(event, Stls) and accept:
                assert tls_offered and not core.tls_active
                core.start_tls()
                assert core.buffered == 0
            if reply.closes:
                assert core.state is State.CLOSED
                return
    if core.state is State.TRANSACTION:
        assert logged_in_by_us


# -- RETR framing ---------------------------------------------------------------------------
def unstuff(wire: bytes) -> bytes:
    """A strict client: read the multi-line body after the status line, CRLF lines only."""
    first, sep, rest = wire.partition(b"\r\n")
    assert sep and first.startswith(b"+OK")
    out = bytearray()
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        assert sep, "body not terminated"
        if line == b".":
            assert rest == b"", "data after the terminator"
            return bytes(out)
        if line.startswith(b"."):
            line = line[1:]
        out += line + b"\r\n"


def lenient_lines(wire: bytes) -> list[bytes]:
    """A lenient client: lines split on LF alone, a trailing CR dropped."""
    return [line.removesuffix(b"\r") for line in wire.split(b"\n")]


_message_parts = st.lists(
    st.one_of(
        st.sampled_from([b".", b"..", b"\r\n", b"\r\n.", b"\n", b"\r", b"\n.\r\n", b"\x00"]),
        st.binary(max_size=20),
    ),
    max_size=40,
).map(b"".join)
_crlf_messages = st.lists(
    st.one_of(st.sampled_from([b"", b".", b"..", b". ", b".\x00"]), st.binary(max_size=20)).map(
        lambda line: line.replace(b"\r", b"").replace(b"\n", b"")
    ),
    max_size=30,
).map(lambda lines: b"\r\n".join(lines))


@settings(max_examples=300, deadline=None)
@given(st.one_of(_message_parts, st.binary(max_size=300)))
def test_retr_round_trips(message: bytes) -> None:
    wire = replies.retr_reply(message).render()
    expected = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuff(wire) == expected
    # A client splitting on LF alone finds the terminator at the end and nowhere else.
    lines = lenient_lines(wire)
    assert lines[-2:] == [b".", b""]
    assert b"." not in lines[1:-2]


@settings(max_examples=200, deadline=None)
@given(_crlf_messages)
def test_retr_of_a_crlf_message_is_byte_exact(message: bytes) -> None:
    wire = replies.retr_reply(message).render()
    tail = b"" if message == b"" or message.endswith(b"\r\n") else b"\r\n"
    assert unstuff(wire) == message + tail


@settings(max_examples=200, deadline=None)
@given(_crlf_messages, st.integers(min_value=0, max_value=40))
def test_top_is_a_prefix_of_retr(message: bytes, lines: int) -> None:
    full = unstuff(replies.retr_reply(message).render())
    top = unstuff(replies.top_reply(message, lines).render())
    assert full.startswith(top)
    if lines >= full.count(b"\r\n"):
        assert top == full
