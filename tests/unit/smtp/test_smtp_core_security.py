"""The SMTP core's security rules: TLS and AUTH gating per role, STARTTLS injection,
AUTH parsing, SMTP smuggling, line/size/error/command limits."""

from __future__ import annotations

import base64
from unittest import mock

import pytest

from helpers.transcript import HINT, Transcript, make_core
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
    Limits,
    MailFrom,
    Noop,
    ProtocolError,
    Quit,
    RcptTo,
    Role,
    StartTls,
    State,
)


def caps(t: Transcript) -> list[str]:
    t.client(b"EHLO c\r\n")
    out = t.expect_hello("c")
    return [line[4:] for line in out.decode().split("\r\n")[:-1]][1:]


def mail_rcpt(t: Transcript) -> None:
    t.client(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
    t.expect(MailFrom("a@example.org", {}), reply=replies.OK)
    t.expect(RcptTo("b@example.com", {}), reply=replies.OK)


def starttls(t: Transcript, pipelined: bytes = b"") -> bytes:
    t.client(b"STARTTLS\r\n" + pipelined)
    t.expect(StartTls(), reply=replies.READY_FOR_TLS)
    return t.core.start_tls()


def login(t: Transcript) -> None:
    t.client(b"AUTH PLAIN " + base64.b64encode(b"\0user\0pw") + b"\r\n")
    t.expect(AuthStart("PLAIN", b"\0user\0pw"), reply=replies.AUTH_OK)


# -- TLS gating --------------------------------------------------------------------------
def test_submission_plaintext_offers_starttls_and_not_auth(submission: Transcript) -> None:
    offered = caps(submission)
    assert "STARTTLS" in offered
    assert not any(c.startswith("AUTH") for c in offered)


@pytest.mark.parametrize(
    "line",
    [b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.com>", b"DATA", b"AUTH PLAIN",
     b"AUTH LOGIN"],
)
def test_submission_refuses_mail_and_auth_before_starttls(
    submission: Transcript, line: bytes
) -> None:
    caps(submission)
    submission.client(line + b"\r\n")
    hint = submission.expect_refusal(530, "5.7.0")
    assert hint.lines == (HINT,)
    assert hint.render() == f"530 5.7.0 {HINT}\r\n".encode()


def test_submission_refuses_bdat_before_starttls_and_skips_its_chunk(
    submission: Transcript,
) -> None:
    caps(submission)
    submission.client(b"BDAT 17 LAST\r\nMAIL FROM:<x@y>\r\nNOOP\r\n")
    submission.expect_refusal(530, "5.7.0")
    submission.expect(Noop(), reply=replies.OK)


def test_submission_after_starttls_offers_auth_and_not_starttls(submission: Transcript) -> None:
    caps(submission)
    assert starttls(submission) == b""
    assert submission.core.tls_active
    offered = caps(submission)
    assert "STARTTLS" not in offered
    assert offered[-1] == "AUTH PLAIN LOGIN"


def test_submission_requires_auth_before_mail(submissions: Transcript) -> None:
    caps(submissions)
    submissions.client(b"MAIL FROM:<a@example.org>\r\n")
    hint = submissions.expect_refusal(530, "5.7.0")
    assert hint.lines == ("Authentication required",)
    login(submissions)
    assert submissions.core.authenticated
    submissions.client(b"MAIL FROM:<a@example.org>\r\n")
    submissions.expect(MailFrom("a@example.org", {}), reply=replies.OK)


def test_auth_is_not_advertised_after_authentication(submissions: Transcript) -> None:
    caps(submissions)
    login(submissions)
    assert not any(c.startswith("AUTH") for c in caps(submissions))


def test_mx_never_offers_or_accepts_auth() -> None:
    for tls in (False, True):
        t = Transcript(make_core(tls_active=tls, tls_offered=not tls))
        assert not any(c.startswith("AUTH") for c in caps(t))
        t.client(b"AUTH PLAIN AHUAcA==\r\n")
        hint = t.expect_refusal(503, "5.5.1")
        assert "submission" in hint.lines[0]


def test_mx_accepts_mail_in_plaintext(mx: Transcript) -> None:
    caps(mx)
    mail_rcpt(mx)


def test_auth_on_submission_without_tls_when_tls_not_required_is_538() -> None:
    t = Transcript(make_core(role=Role.SUBMISSION, require_tls=False))
    caps(t)
    t.client(b"AUTH PLAIN\r\n")
    t.expect_refusal(538, "5.7.11")


def test_starttls_when_already_active_is_503() -> None:
    t = Transcript(make_core(tls_active=True, tls_offered=True))
    assert "STARTTLS" not in caps(t)
    t.client(b"STARTTLS\r\n")
    t.expect_refusal(503, "5.5.1")


def test_starttls_when_not_offered_is_502() -> None:
    t = Transcript(make_core(tls_offered=False))
    assert "STARTTLS" not in caps(t)
    t.client(b"STARTTLS\r\n")
    t.expect_refusal(502, "5.5.1")


def test_starttls_needs_ehlo_no_arguments_and_no_transaction(mx: Transcript) -> None:
    mx.client(b"STARTTLS\r\n")
    mx.expect_refusal(503, "5.5.1")
    caps(mx)
    mx.client(b"STARTTLS now\r\n")
    mx.expect_refusal(501, "5.5.4")
    mail_rcpt(mx)
    mx.client(b"STARTTLS\r\n")
    mx.expect_refusal(503, "5.5.1")


# -- STARTTLS injection (RFC 3207 §4.2, CVE-2011-0411) ----------------------------------
def test_pipelined_plaintext_after_starttls_is_dropped() -> None:
    t = Transcript(make_core())
    t.client(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    t.expect_hello("c")
    t.expect(StartTls(), reply=replies.READY_FOR_TLS)
    assert t.core.state is State.TLS_PENDING
    assert t.core.start_tls() == b"MAIL FROM:<evil@x>\r\n"
    assert t.core.state is State.GREETED
    assert t.core.tls_active
    assert t.core.buffered == 0
    t.expect_need_data()
    # EHLO was forgotten: MAIL over TLS before a new EHLO is out of sequence.
    t.client(b"MAIL FROM:<a@example.org>\r\n")
    t.expect_refusal(503, "5.5.1")


def test_injected_half_line_is_dropped_too(submission: Transcript) -> None:
    caps(submission)
    dropped = starttls(submission, b"RCPT TO:<x@")
    assert dropped == b"RCPT TO:<x@"
    submission.client(b"EHLO c\r\n")
    submission.expect_hello("c")  # not "RCPT TO:<x@EHLO c"


def test_core_refuses_to_parse_while_tls_is_pending(mx: Transcript) -> None:
    caps(mx)
    mx.client(b"STARTTLS\r\nNOOP\r\n")
    mx.expect(StartTls(), reply=replies.READY_FOR_TLS)
    with pytest.raises(RuntimeError):
        mx.core.next_event()


def test_start_tls_is_only_legal_after_the_220(mx: Transcript) -> None:
    with pytest.raises(RuntimeError):
        mx.core.start_tls()
    caps(mx)
    mx.client(b"STARTTLS\r\nNOOP\r\n")
    mx.expect(StartTls(), reply=replies.reply(454, "4.7.0", "TLS not available now"))
    with pytest.raises(RuntimeError):
        mx.core.start_tls()
    mx.expect(Noop(), reply=replies.OK)  # refused STARTTLS: plaintext goes on
    assert not mx.core.tls_active


def test_starttls_forgets_the_transaction(mx: Transcript) -> None:
    caps(mx)
    starttls(mx)
    caps(mx)
    mx.client(b"RCPT TO:<b@example.com>\r\n")
    mx.expect_refusal(503, "5.5.1")


# -- AUTH (RFC 4954) ---------------------------------------------------------------------
def test_auth_plain_with_initial_response(submissions: Transcript) -> None:
    caps(submissions)
    submissions.client(b"AUTH plain " + base64.b64encode(b"\0user\0pw") + b"\r\n")
    out = submissions.expect(AuthStart("PLAIN", b"\0user\0pw"), reply=replies.AUTH_OK)
    assert out == b"235 2.7.0 Authentication successful\r\n"
    assert submissions.core.authenticated


def test_auth_plain_empty_initial_response(submissions: Transcript) -> None:
    caps(submissions)
    submissions.client(b"AUTH PLAIN =\r\n")
    submissions.expect(AuthStart("PLAIN", b""), reply=replies.AUTH_FAILED)
    assert not submissions.core.authenticated


def test_auth_plain_without_initial_response_uses_a_continuation(
    submissions: Transcript,
) -> None:
    caps(submissions)
    submissions.client(b"AUTH PLAIN\r\n")
    out = submissions.expect(AuthStart("PLAIN", None), reply=replies.auth_challenge(b""))
    assert out == b"334 \r\n"
    submissions.client(base64.b64encode(b"\0u\0p") + b"\r\n")
    submissions.expect(AuthResponse(b"\0u\0p"), reply=replies.AUTH_OK)
    assert submissions.core.authenticated


def test_auth_login_continuations(submissions: Transcript) -> None:
    caps(submissions)
    submissions.client(b"AUTH LOGIN\r\n")
    out = submissions.expect(AuthStart("LOGIN", None), reply=replies.auth_challenge(b"Username:"))
    assert out == b"334 VXNlcm5hbWU6\r\n"
    assert submissions.core.state is State.AUTH
    submissions.client(b"dXNlcg==\r\n")
    submissions.expect(AuthResponse(b"user"), reply=replies.auth_challenge(b"Password:"))
    submissions.client(b"cHc=\r\n")
    submissions.expect(AuthResponse(b"pw"), reply=replies.AUTH_OK)
    assert submissions.core.authenticated
    assert submissions.core.state is State.READY


def test_auth_failure_returns_to_ready_without_authentication(submissions: Transcript) -> None:
    caps(submissions)
    submissions.client(b"AUTH LOGIN\r\ndXNlcg==\r\ncHc=\r\nMAIL FROM:<a@example.org>\r\n")
    submissions.expect(AuthStart("LOGIN", None), reply=replies.auth_challenge(b"Username:"))
    submissions.expect(AuthResponse(b"user"), reply=replies.auth_challenge(b"Password:"))
    submissions.expect(AuthResponse(b"pw"), reply=replies.AUTH_FAILED)
    assert submissions.core.state is State.READY
    assert not submissions.core.authenticated
    submissions.expect_refusal(530, "5.7.0")


def test_auth_cancel_with_star(submissions: Transcript) -> None:
    caps(submissions)
    submissions.client(b"AUTH LOGIN\r\n*\r\nNOOP\r\n")
    submissions.expect(AuthStart("LOGIN", None), reply=replies.auth_challenge(b"Username:"))
    submissions.expect(AuthResponse(None), reply=replies.AUTH_CANCELLED)
    submissions.expect(Noop(), reply=replies.OK)


def test_auth_invalid_base64_continuation_ends_the_exchange(submissions: Transcript) -> None:
    caps(submissions)
    submissions.client(b"AUTH LOGIN\r\nnot base64!\r\nNOOP\r\n")
    submissions.expect(AuthStart("LOGIN", None), reply=replies.auth_challenge(b"Username:"))
    submissions.expect_refusal(501, "5.5.2")
    assert submissions.core.state is State.READY
    submissions.expect(Noop(), reply=replies.OK)


@pytest.mark.parametrize(
    ("line", "code", "enhanced"),
    [
        (b"AUTH PLAIN AHUAcA", 501, "5.5.2"),  # missing padding: not strict base64
        (b"AUTH PLAIN AHU*cA==", 501, "5.5.2"),
        (b"AUTH CRAM-MD5", 504, "5.5.4"),
        (b"AUTH XOAUTH2 abc", 504, "5.5.4"),
        (b"AUTH", 501, "5.5.4"),
        (b"AUTH PLAIN a b", 501, "5.5.4"),
    ],
)
def test_auth_line_refusals(submissions: Transcript, line: bytes, code: int, enhanced: str) -> None:
    caps(submissions)
    submissions.client(line + b"\r\n")
    submissions.expect_refusal(code, enhanced)
    assert submissions.core.state is State.READY


def test_second_auth_is_503(submissions: Transcript) -> None:
    caps(submissions)
    login(submissions)
    submissions.client(b"AUTH PLAIN AHUAcA==\r\n")
    submissions.expect_refusal(503, "5.5.1")


def test_auth_during_a_transaction_is_503(submissions: Transcript) -> None:
    caps(submissions)
    login(submissions)
    mail_rcpt(submissions)
    # AUTH is refused as "already authenticated" or "in a transaction": both 503 5.5.1.
    submissions.client(b"AUTH PLAIN AHUAcA==\r\n")
    submissions.expect_refusal(503, "5.5.1")


def test_auth_after_helo_is_503() -> None:
    t = Transcript(make_core(role=Role.SUBMISSION, tls_active=True, tls_offered=False,
                             require_tls=True))
    t.client(b"HELO c\r\nAUTH PLAIN AHUAcA==\r\n")
    t.expect_hello("c", extended=False)
    t.expect_refusal(503, "5.5.1")


# -- SMTP smuggling ----------------------------------------------------------------------
SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nforged\r\n"
#: (bytes right after "hello", whether the message must be refused). The refused ones
#: hold a bare CR or LF; the others are ordinary content that must arrive byte-exact.
VARIANTS = [
    (b"\n.\n", True), (b"\r.\r", True), (b"\n.\r\n", True), (b"\r\n.\n", True),
    (b"\r\n.\r", True), (b"\r.\r\n", True), (b"\n.\r", True), (b"\r.\n", True),
    (b"\n\n.\n\n", True), (b"\r\n.\n\r\n", True), (b"\r\n.\r\r\n", True),
    (b"\r\n\x00.\r\n", False), (b"\r\n .\r\n", False), (b"\r\n..\r\n", False),
]


@pytest.mark.parametrize(("variant", "refused"), VARIANTS, ids=[repr(v) for v, _ in VARIANTS])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
def test_smuggling_variant_never_ends_the_message(
    mx: Transcript, variant: bytes, refused: bool, split: bool
) -> None:
    caps(mx)
    mail_rcpt(mx)
    mx.client(b"DATA\r\n")
    mx.expect(Data(), reply=replies.START_DATA)
    stream = b"Subject: x\r\n\r\nhello" + variant + SMUGGLED + b"\r\n.\r\nQUIT\r\n"
    items = []
    for piece in ([bytes([b]) for b in stream] if split else [stream]):
        mx.client(piece)
        items += mx.run()
    assert not any(isinstance(i, (MailFrom, RcptTo, Data)) for i in items)
    ends = [i for i in items if isinstance(i, (DataEnd, DataAbort))]
    assert len(ends) == 1
    if refused:
        assert ends[0] == DataAbort(replies.BARE_LINE_ENDING_IN_DATA)
        assert ends[0].reply.code == 554 and ends[0].reply.enhanced == "5.5.2"
    else:
        content = b"".join(i.data for i in items if isinstance(i, DataChunk))
        unstuffed = variant.replace(b"\r\n..", b"\r\n.")
        assert ends[0] == DataEnd()
        assert content == b"Subject: x\r\n\r\nhello" + unstuffed + SMUGGLED + b"\r\n"
    assert items[-2:] == [Quit(), ConnectionClosed()]


def test_proper_terminator_ends_the_message_and_the_rest_are_commands(mx: Transcript) -> None:
    caps(mx)
    mail_rcpt(mx)
    mx.client(b"DATA\r\n")
    mx.expect(Data(), reply=replies.START_DATA)
    mx.client(b"hello\r\n.\r\nNOOP\r\n")
    assert mx.run() == [DataChunk(b"hello\r\n"), DataEnd(), Noop()]


def test_bare_lf_in_content_refuses_the_message_after_the_real_end(mx: Transcript) -> None:
    caps(mx)
    mail_rcpt(mx)
    mx.client(b"DATA\r\n")
    mx.expect(Data(), reply=replies.START_DATA)
    mx.client(b"line one\nline two\r\n.\r\nNOOP\r\n")
    items = mx.run()
    assert items[-2:] == [DataAbort(replies.BARE_LINE_ENDING_IN_DATA), Noop()]
    assert mx.core.state is State.READY
    assert b"554 5.5.2 " in mx.wire


def test_data_abort_must_be_answered_with_its_own_reply(mx: Transcript) -> None:
    caps(mx)
    mail_rcpt(mx)
    mx.client(b"DATA\r\n")
    mx.expect(Data(), reply=replies.START_DATA)
    mx.client(b"a\rb\r\n.\r\n")
    _, end = mx.read_message()
    assert isinstance(end, DataAbort)
    with pytest.raises(RuntimeError):
        mx.core.send(replies.queued("Q1"))
    mx.send(end.reply)


@pytest.mark.parametrize("line", [b"NOOP\n", b"NOOP\rX\r\n", b"EHLO c\nMAIL FROM:<x@y>\r\n",
                                  b"\n", b"NO\rOP\r\n"])
def test_bare_cr_or_lf_in_a_command_closes(mx: Transcript, line: bytes) -> None:
    mx.client(line)
    hint = mx.expect_refusal(500, "5.5.2")
    assert hint.closes
    assert mx.core.state is State.CLOSED
    assert mx.core.next_event() == ConnectionClosed()


def test_cr_at_end_of_buffer_waits_for_its_lf(mx: Transcript) -> None:
    mx.client(b"NOOP\r")
    mx.expect_need_data()
    mx.client(b"\n")
    mx.expect(Noop(), reply=replies.OK)


# -- limits ------------------------------------------------------------------------------
def test_line_of_exactly_the_limit_is_accepted() -> None:
    t = Transcript(make_core(limits=Limits(line_length=512)))
    line = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(line) == 512
    t.client(line)
    t.expect(Noop(), reply=replies.OK)


def test_line_over_the_limit_is_500_and_the_next_line_works() -> None:
    t = Transcript(make_core(limits=Limits(line_length=512)))
    t.client(b"NOOP " + b"x" * (512 - 6) + b"\r\nNOOP\r\n")
    assert t.expect_refusal(500, "5.5.6").lines == ("Line too long",)
    t.expect(Noop(), reply=replies.OK)


def test_partial_line_is_refused_as_soon_as_it_cannot_fit() -> None:
    t = Transcript(make_core(limits=Limits(line_length=512)))
    t.client(b"x" * 510)  # 510 + CRLF would still fit
    t.expect_need_data()
    assert t.core.buffered == 510
    t.client(b"x")  # 511 bytes without CRLF can no longer fit in 512
    t.expect_refusal(500, "5.5.6")
    assert t.core.buffered == 0
    t.client(b"x" * 300 + b"\r\nNOOP\r\n")
    t.expect(Noop(), reply=replies.OK)


def test_endless_line_is_discarded_as_it_arrives_and_refused_once() -> None:
    t = Transcript(make_core(limits=Limits(line_length=512)))
    refusals = 0
    for _ in range(200):
        t.client(b"A" * 5000)
        while True:
            try:
                ev = t.core.next_event()
            except ProtocolError as exc:
                refusals += 1
                t.send(exc.hint)
                continue
            assert ev is NEED_DATA
            break
        assert t.core.buffered < 512
    t.client(b"\r\nNOOP\r\n")
    t.expect(Noop(), reply=replies.OK)
    assert refusals == 1


def test_over_long_auth_line_ends_the_exchange(submissions: Transcript) -> None:
    core = make_core(role=Role.SUBMISSION, tls_active=True, tls_offered=False, require_tls=True,
                     limits=Limits(line_length=512))
    t = Transcript(core)
    caps(t)
    t.client(b"AUTH LOGIN\r\n" + b"A" * 600 + b"\r\nNOOP\r\n")
    t.expect(AuthStart("LOGIN", None), reply=replies.auth_challenge(b"Username:"))
    t.expect_refusal(500, "5.5.6")
    assert t.core.state is State.READY
    t.expect(Noop(), reply=replies.OK)


def test_error_budget_then_421() -> None:
    t = Transcript(make_core(limits=Limits(errors=3)))
    t.client(b"FROB\r\n" * 4 + b"NOOP\r\n")
    for _ in range(3):
        t.expect_refusal(500, "5.5.1")
    hint = t.expect_refusal(421, "4.7.0")
    assert hint.lines == ("Too many errors, closing connection",)
    assert t.core.state is State.CLOSED
    assert t.core.next_event() == ConnectionClosed()


def test_every_kind_of_core_error_counts() -> None:
    t = Transcript(make_core(limits=Limits(errors=2)))
    t.client(b"MAIL FROM:<a@b.example>\r\nEHLO c\r\nMAIL FROM:<bad>\r\nNOOP\r\n")
    t.expect_refusal(503)
    t.expect_hello("c")
    t.expect_refusal(501)
    t.expect(Noop(), reply=replies.OK)
    t.client(b"VRFY\r\n")
    t.expect_refusal(421, "4.7.0")


def test_command_limit_then_421() -> None:
    t = Transcript(make_core(limits=Limits(commands=3)))
    t.client(b"NOOP\r\n" * 4)
    for _ in range(3):
        t.expect(Noop(), reply=replies.OK)
    assert t.expect_refusal(421, "4.7.0").closes


def test_message_of_exactly_the_size_limit_is_accepted() -> None:
    t = Transcript(make_core(limits=Limits(message_size=1000)))
    caps(t)
    mail_rcpt(t)
    t.client(b"DATA\r\n")
    t.expect(Data(), reply=replies.START_DATA)
    body = b"x" * 998 + b"\r\n"
    t.client(body + b".\r\n")
    assert t.read_message() == (body, DataEnd())


def test_message_over_the_size_limit_is_aborted_after_its_end() -> None:
    t = Transcript(make_core(limits=Limits(message_size=1000)))
    caps(t)
    mail_rcpt(t)
    t.client(b"DATA\r\n")
    t.expect(Data(), reply=replies.START_DATA)
    t.client(b"y" * 999 + b"\r\n" + b"z\r\n" * 50_000 + b".\r\nNOOP\r\n")
    items = t.run()
    emitted = sum(len(i.data) for i in items if isinstance(i, DataChunk))
    assert emitted <= 1000
    assert items[-2:] == [DataAbort(replies.MESSAGE_TOO_BIG), Noop()]
    assert replies.MESSAGE_TOO_BIG.render() == (
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    )


def test_skipping_an_oversized_message_finds_only_the_real_terminator() -> None:
    # Regression: the skip must not mistake "abc.\r\n" (split after the dot line's
    # first byte) for the end of the message and parse what follows as commands.
    t = Transcript(make_core(limits=Limits(message_size=1000)))
    caps(t)
    mail_rcpt(t)
    t.client(b"DATA\r\n")
    t.expect(Data(), reply=replies.START_DATA)
    t.client(b"x" * 998 + b"\r\n" + b"y\r\n" * 40_000 + b"abc.\r\nM")
    items = t.run()
    t.client(b"AIL FROM:<evil@x>\r\n.\r\nNOOP\r\n")
    items += t.run()
    assert not any(isinstance(i, MailFrom) for i in items)
    assert items[-2:] == [DataAbort(replies.MESSAGE_TOO_BIG), Noop()]


SWEEP_BODY = (
    b"aaaa\r\n..\r\n\r\nabc.\r\n.x\r\nMAIL FROM:<evil@x>\r\n\r\n..\r\n"
    b"abc.\r\nRCPT TO:<v@example.com>\r\n"
)
SWEEP_CONTENT = (
    b"aaaa\r\n.\r\n\r\nabc.\r\nx\r\nMAIL FROM:<evil@x>\r\n\r\n.\r\n"
    b"abc.\r\nRCPT TO:<v@example.com>\r\n"
)


@pytest.mark.parametrize("size", [3, 20, 1000])
@pytest.mark.parametrize("bare", [b"", b"\n", b"\r"])
def test_every_split_and_window_size_gives_the_same_message(size: int, bare: bytes) -> None:
    """Exhaustive: every single cut point of the stream, with DATA_CHUNK_SIZE shrunk so
    the scanner's window edges fall everywhere."""
    body = SWEEP_BODY[:8] + bare + SWEEP_BODY[8:]
    head = b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    wire = head + body + b".\r\nNOOP\r\n"
    if bare and size >= 6:
        expected = DataAbort(replies.BARE_LINE_ENDING_IN_DATA)
    elif len(SWEEP_CONTENT) > size:
        expected = DataAbort(replies.MESSAGE_TOO_BIG)
    else:
        expected = DataEnd()
    for chunk in (4, 5, 6, 7, 9, 13):
        with mock.patch.object(protocol, "DATA_CHUNK_SIZE", chunk):
            for cut in range(len(head), len(wire)):
                t = Transcript(make_core(limits=Limits(message_size=size)))
                items = []
                for piece in (wire[:cut], wire[cut:]):
                    t.client(piece)
                    items += t.run()
                assert [i for i in items if isinstance(i, (MailFrom, RcptTo))] == [
                    MailFrom("", {}), RcptTo("b@example.com", {})
                ], (chunk, cut)
                assert items[-2:] == [expected, Noop()], (chunk, cut)
                if expected == DataEnd():
                    data = b"".join(i.data for i in items if isinstance(i, DataChunk))
                    assert data == SWEEP_CONTENT, (chunk, cut)


def test_bdat_over_the_size_limit_is_consumed_then_aborted() -> None:
    t = Transcript(make_core(limits=Limits(message_size=10)))
    caps(t)
    mail_rcpt(t)
    t.client(b"BDAT 6\r\nabcdef")
    t.expect(Bdat(6, last=False), reply=replies.OK)
    assert t.read_message() == (b"abcdef", BdatEnd(last=False))
    t.send(replies.chunk_ok(6))
    t.client(b"BDAT 6 LAST\r\n123456NOOP\r\n")
    t.expect(Bdat(6, last=True), reply=replies.OK)
    assert t.read_message() == (b"", DataAbort(replies.MESSAGE_TOO_BIG))
    t.send(replies.MESSAGE_TOO_BIG)
    assert t.core.state is State.READY
    t.expect(Noop(), reply=replies.OK)


def test_mail_size_parameter_over_the_limit_is_552() -> None:
    t = Transcript(make_core(limits=Limits(message_size=1000)))
    caps(t)
    t.client(b"MAIL FROM:<a@example.org> SIZE=1001\r\nMAIL FROM:<a@example.org> SIZE=1000\r\n")
    t.expect_refusal(552, "5.3.4")
    t.expect(MailFrom("a@example.org", {"SIZE": "1000"}), reply=replies.OK)


def test_data_content_is_never_buffered_whole(mx: Transcript) -> None:
    caps(mx)
    mail_rcpt(mx)
    mx.client(b"DATA\r\n")
    mx.expect(Data(), reply=replies.START_DATA)
    total = 0
    for _ in range(40):
        mx.client(b"0123456789abcdef" * 4096 + b"\r\n")  # 64 KiB lines
        while isinstance(ev := mx.core.next_event(), DataChunk):
            assert len(ev.data) <= DATA_CHUNK_SIZE
            total += len(ev.data)
        assert ev is NEED_DATA
        assert mx.core.buffered <= 4
    mx.client(b".\r\n")
    assert mx.read_message()[1] == DataEnd()
    assert total == 40 * (65536 + 2)


def test_limits_below_the_rfc_minimum_are_refused() -> None:
    with pytest.raises(ValueError):
        Limits(line_length=511)
    with pytest.raises(ValueError):
        Limits(errors=0)
