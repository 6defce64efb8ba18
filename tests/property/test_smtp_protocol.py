"""Properties of the SMTP server core (hypothesis).

- The events do not depend on how the input is split into reads.
- Arbitrary bytes let only ProtocolError escape, and the core never holds more unread
  input than a line, nor emits a DataChunk larger than DATA_CHUNK_SIZE.
- Dot-stuffing round-trips byte-exactly; a bare CR or LF anywhere refuses the message
  and nothing inside the message is ever parsed as a command.
"""

from __future__ import annotations

from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from postkeep.smtp import protocol, replies
from postkeep.smtp.protocol import (
    DATA_CHUNK_SIZE,
    NEED_DATA,
    AuthResponse,
    AuthStart,
    Bdat,
    BdatEnd,
    ConnectionClosed,
    Data,
    DataAbort,
    DataChunk,
    DataEnd,
    Event,
    Hello,
    Limits,
    MailFrom,
    ProtocolError,
    Quit,
    RcptTo,
    Role,
    SmtpServer,
    StartTls,
)
from postkeep.smtp.replies import Reply

LINE_LENGTH = 512


def make_core(
    role: Role = Role.MX, *, tls_active: bool = False, message_size: int = 20_000
) -> SmtpServer:
    return SmtpServer(
        role=role,
        limits=Limits(line_length=LINE_LENGTH, message_size=message_size, recipients=5,
                      errors=50, commands=500),
        hostname="mx.test",
        tls_active=tls_active,
        tls_offered=not tls_active,
        require_tls=False,
    )


def answer(core: SmtpServer, event: Event) -> Reply:
    match event:
        case Hello():
            return core.hello_reply()
        case StartTls():
            return replies.reply(454, "4.7.0", "TLS not available now")
        case AuthStart() | AuthResponse():
            return replies.auth_challenge(b"")
        case Data():
            return replies.START_DATA
        case DataEnd():
            return replies.queued("Q")
        case BdatEnd(last=last):
            return replies.queued("Q") if last else replies.chunk_ok(0)
        case DataAbort(reply=refusal):
            return refusal
        case Quit():
            return replies.BYE
    return replies.OK


Item = Event | Reply


def drain(core: SmtpServer, log: list[Item]) -> None:
    """Run until NEED_DATA, answering everything; merge consecutive DataChunks."""
    while True:
        try:
            ev = core.next_event()
        except ProtocolError as exc:
            log.append(exc.hint)
            core.send(exc.hint)
            continue
        if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
            if isinstance(ev, ConnectionClosed) and not (log and log[-1] == ev):
                log.append(ev)
            return
        if isinstance(ev, DataChunk):
            assert 0 < len(ev.data) <= DATA_CHUNK_SIZE
            if log and isinstance(log[-1], DataChunk):
                log[-1] = DataChunk(log[-1].data + ev.data)
            else:
                log.append(ev)
            continue
        log.append(ev)
        core.send(answer(core, ev))


def feed(pieces: list[bytes], core: SmtpServer | None = None) -> list[Item]:
    core = core or make_core()
    core.greet()
    log: list[Item] = []
    for piece in pieces:
        if not piece:
            continue  # b"" would mean EOF
        core.receive_data(piece)
        drain(core, log)
        assert core.buffered < LINE_LENGTH
    return log


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]


# -- valid transcripts -------------------------------------------------------------------
_content_line = st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
) | st.sampled_from([b".", b"..", b".x", b"", b" .", b"MAIL FROM:<evil@x>"])


@st.composite
def transactions(draw: st.DrawFn) -> bytes:
    out = [b"EHLO client.test\r\n"]
    for _ in range(draw(st.integers(1, 3))):
        out.append(b"MAIL FROM:<a@example.org>\r\n")
        for i in range(draw(st.integers(1, 3))):
            out.append(b"RCPT TO:<r%d@example.com>\r\n" % i)
        lines = draw(st.lists(_content_line, max_size=12))
        if draw(st.booleans()):
            body = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
            out.append(b"DATA\r\n" + body + b".\r\n")
        else:
            blob = draw(st.binary(max_size=300))
            cut = draw(st.integers(0, len(blob)))
            out.append(b"BDAT %d\r\n" % cut + blob[:cut])
            out.append(b"BDAT %d LAST\r\n" % (len(blob) - cut) + blob[cut:])
        out.append(draw(st.sampled_from([b"", b"NOOP\r\n", b"RSET\r\n", b"VRFY x\r\n"])))
    out.append(b"QUIT\r\n")
    return b"".join(out)


@settings(max_examples=200, deadline=None)
@given(transactions(), st.lists(st.integers(min_value=0), max_size=30))
def test_events_do_not_depend_on_how_input_is_split(wire: bytes, cuts: list[int]) -> None:
    whole = feed([wire])
    assert feed(split(wire, cuts)) == whole
    assert feed([bytes([b]) for b in wire[:2000]] + [wire[2000:]]) == whole
    assert not any(isinstance(i, Reply) for i in whole)  # a valid transcript: no refusals
    assert whole[-2:] == [Quit(), ConnectionClosed()]


@settings(max_examples=200, deadline=None)
@given(st.lists(_content_line, max_size=30), st.lists(st.integers(min_value=0), max_size=20))
def test_dot_stuffing_round_trips_byte_exactly(lines: list[bytes], cuts: list[int]) -> None:
    body = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    wire = (b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
            + body + b".\r\nNOOP\r\n")
    log = feed(split(wire, cuts))
    content = b"".join(i.data for i in log if isinstance(i, DataChunk))
    assert content == b"".join(ln + b"\r\n" for ln in lines)
    assert DataEnd() in log


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_content_line, min_size=1, max_size=10),
    st.sampled_from([b"\r", b"\n"]),
    st.integers(min_value=0),
    st.lists(st.integers(min_value=0), max_size=10),
)
def test_bare_cr_or_lf_anywhere_refuses_and_never_becomes_a_command(
    lines: list[bytes], bare: bytes, where: int, cuts: list[int]
) -> None:
    body = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    # Put the bare byte where it is not next to its partner (that would make a CRLF).
    at = where % (len(body) + 1)
    while (bare == b"\r" and body[at : at + 1] == b"\n") or (
        bare == b"\n" and body[at - 1 : at] == b"\r" and at > 0
    ):
        at = (at + 1) % (len(body) + 1)
    body = body[:at] + bare + body[at:]
    wire = (b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
            + body + b".\r\nNOOP\r\n")
    log = feed(split(wire, cuts))
    ends = [i for i in log if isinstance(i, (DataEnd, DataAbort))]
    # The terminator might have been broken by the insertion ("." CR bare-LF ...): then
    # the message never ends; either way it is never accepted.
    assert DataEnd() not in ends
    if ends:
        assert ends == [DataAbort(replies.BARE_LINE_ENDING_IN_DATA)]
    assert [i for i in log if isinstance(i, (MailFrom, RcptTo))] == [
        MailFrom("", {}), RcptTo("b@example.com", {})
    ]


# -- arbitrary bytes ---------------------------------------------------------------------
PREFIXES = [
    b"",
    b"EHLO c\r\n",
    b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n",
    b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nBDAT 100000\r\n",
    b"EHLO c\r\nAUTH LOGIN\r\n",
]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(PREFIXES),
    st.sampled_from([Role.MX, Role.SUBMISSION]),
    st.booleans(),
    st.lists(st.binary(max_size=2000), max_size=8),
)
def test_arbitrary_bytes_only_raise_protocol_error_and_stay_bounded(
    prefix: bytes, role: Role, tls: bool, reads: list[bytes]
) -> None:
    core = make_core(role, tls_active=tls)
    log = feed([prefix, *reads], core)  # feed() checks the buffer bound after every read
    core.receive_data(b"")
    drain(core, log)
    assert log[-1] == ConnectionClosed()


_alphabet = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"\r\n.\r\n", b"MAIL FROM:<a@b.example>", b"RCPT TO:<c@d>",
     b"DATA", b"BDAT 3", b"BDAT 2 LAST", b" ", b"EHLO x", b"RSET", b"x" * 600, b"\x00",
     b"AUTH PLAIN", b"*", b"STARTTLS", b"\xff"]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_alphabet, max_size=60), st.lists(st.integers(min_value=0), max_size=15))
def test_command_soup_only_raises_protocol_error(tokens: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(tokens)
    for role in (Role.MX, Role.SUBMISSION):
        whole = feed([wire], make_core(role, tls_active=True))
        assert feed(split(wire, cuts), make_core(role, tls_active=True)) == whole


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.integers(min_value=0, max_value=100))
def test_bdat_chunks_are_raw_and_exact(blob: bytes, cut_seed: int) -> None:
    wire = (b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\n"
            + b"BDAT %d LAST\r\n" % len(blob) + blob + b"NOOP\r\n")
    log = feed(split(wire, [cut_seed * 37, cut_seed * 101]))
    assert Bdat(len(blob), True) in log
    assert DataChunk(blob) in log
    assert log[-1] != ConnectionClosed()


# -- differential: DATA against a byte-by-byte reference model ---------------------------
def reference_data(stream: bytes) -> tuple[bytes | None, int]:
    """RFC 5321 §4.1.1.4/§4.5.2 the slow, obvious way: (content, or None when a bare CR or
    LF refuses the message; index just after CRLF.CRLF). ``stream`` must hold an end."""
    content, before_bare, end = reference_data_full(stream)
    return (None if before_bare is not None else content), end


def reference_data_full(stream: bytes) -> tuple[bytes, int | None, int]:
    """(content without the bare bytes, length of the content before the first bare CR
    or LF or None, index just after CRLF.CRLF)."""
    content = bytearray()
    before_bare: int | None = None
    at_start = True
    i = 0
    while True:
        if at_start:
            if stream.startswith(b".\r\n", i):
                return bytes(content), before_bare, i + 3
            if stream[i : i + 1] == b".":
                i += 1  # RFC 5321 §4.5.2
            at_start = False
            continue
        byte = stream[i]
        if stream.startswith(b"\r\n", i):
            content += b"\r\n"
            i += 2
            at_start = True
        elif byte in (0x0D, 0x0A):
            if before_bare is None:
                before_bare = len(content)
            i += 1
        else:
            content.append(byte)
            i += 1


_data_alphabet = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"..", b"x", b"yz", b"\r\n.\r\n", b"\r\n.", b".\r\n",
     b"\r\n..", b"\x00"]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_data_alphabet, max_size=80), st.lists(st.integers(min_value=0), max_size=12))
def test_data_matches_the_reference_model(tokens: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(tokens) + b"\r\n.\r\n"
    expected, end = reference_data(stream)
    head = b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    log = feed(split(head + stream + b"NOOP\r\n", cuts))
    first_end = next(i for i, item in enumerate(log) if isinstance(item, (DataEnd, DataAbort)))
    if expected is None:
        assert log[first_end] == DataAbort(replies.BARE_LINE_ENDING_IN_DATA)
    else:
        assert log[first_end] == DataEnd()
        content = b"".join(i.data for i in log[:first_end] if isinstance(i, DataChunk))
        assert content == expected
    # What follows the end is parsed exactly as a fresh session would parse it.
    after = feed([b"EHLO c\r\n", stream[end:] + b"NOOP\r\n"])
    assert log[first_end + 1 :] == after[1:]


def near_boundaries(tokens: list[bytes], picks: list[tuple[int, int]], base: int) -> list[int]:
    """Cut positions at token boundaries (plus or minus a byte or two), shifted by base."""
    bounds = [0]
    for tok in tokens:
        bounds.append(bounds[-1] + len(tok))
    return [max(0, base + bounds[i % len(bounds)] + delta) for i, delta in picks]


_picks = st.lists(st.tuples(st.integers(0, 200), st.integers(-2, 2)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_data_alphabet, max_size=60),
    _picks,
    st.integers(min_value=4, max_value=40),
    st.integers(min_value=1, max_value=120),
)
def test_data_window_edges_and_size_limit_match_the_reference(
    tokens: list[bytes], picks: list[tuple[int, int]], chunk: int, size: int
) -> None:
    """DATA_CHUNK_SIZE shrunk to a few bytes puts every window edge of the scanner within
    reach; a small size limit exercises the oversized-message skip."""
    stream = b"".join(tokens) + b"\r\n.\r\n"
    head = b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    cuts = near_boundaries(tokens, picks, len(head))
    content, before_bare, end = reference_data_full(stream)
    # The first problem in stream order decides the refusal.
    if before_bare is not None and before_bare <= size:
        expected: Event = DataAbort(replies.BARE_LINE_ENDING_IN_DATA)
    elif len(content) > size or (before_bare is not None and before_bare > size):
        expected = DataAbort(replies.MESSAGE_TOO_BIG)
    else:
        expected = DataEnd()
    with mock.patch.object(protocol, "DATA_CHUNK_SIZE", chunk):
        log = feed(split(head + stream + b"NOOP\r\n", cuts), make_core(message_size=size))
        after = feed([b"EHLO c\r\n", stream[end:] + b"NOOP\r\n"])
    first_end = next(i for i, item in enumerate(log) if isinstance(item, (DataEnd, DataAbort)))
    assert log[first_end] == expected
    chunks = [i.data for i in log[:first_end] if isinstance(i, DataChunk)]
    if expected == DataEnd():
        assert b"".join(chunks) == content
    assert sum(map(len, chunks)) <= size
    assert log[first_end + 1 :] == after[1:]
