"""The SMTP server core driven with bytes: greeting, EHLO, transactions (DATA and BDAT),
pipelining, sequence rules, parameters, and the event/reply contract."""

from __future__ import annotations

import pytest

from helpers.transcript import Transcript, make_core
from postkeep.smtp import replies
from postkeep.smtp.protocol import (
    NEED_DATA,
    AuthStart,
    Bdat,
    BdatEnd,
    ConnectionClosed,
    Data,
    DataAbort,
    DataChunk,
    DataEnd,
    Hello,
    Help,
    Limits,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    State,
    Vrfy,
)

MX_CAPS = [
    "mx.test",
    "PIPELINING",
    "SIZE 52428800",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "SMTPUTF8",
    "CHUNKING",
    "STARTTLS",
]


def ehlo(t: Transcript, name: str = "client.test") -> None:
    t.client(f"EHLO {name}\r\n".encode())
    t.expect_hello(name)


def envelope(t: Transcript, sender: str = "a@example.org", rcpt: str = "b@example.com") -> None:
    t.client(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\n".encode())
    t.expect(MailFrom(sender, {}), reply=replies.OK)
    t.expect(RcptTo(rcpt, {}), reply=replies.OK)


def send_data(t: Transcript, body: bytes) -> tuple[bytes, object]:
    t.client(b"DATA\r\n")
    t.expect(Data(), reply=replies.START_DATA)
    t.client(body)
    return t.read_message()


# -- greeting and EHLO -------------------------------------------------------------------
def test_greeting_is_220_with_hostname_and_moves_to_greeted() -> None:
    core = make_core()
    assert core.state is State.INITIAL
    assert core.greet() == b"220 mx.test ESMTP postkeep\r\n"
    assert core.state is State.GREETED
    with pytest.raises(RuntimeError):
        core.greet()


def test_next_event_before_greeting_is_a_programming_error() -> None:
    core = make_core()
    core.receive_data(b"EHLO x\r\n")
    with pytest.raises(RuntimeError):
        core.next_event()


def test_too_busy_can_replace_the_greeting_and_closes() -> None:
    core = make_core()
    assert core.send(replies.TOO_BUSY).startswith(b"421 4.7.0 ")
    assert core.state is State.CLOSED


def test_ehlo_lists_capabilities_in_order_without_enhanced_codes(mx: Transcript) -> None:
    mx.client(b"EHLO client.test\r\n")
    out = mx.expect_hello("client.test")
    lines = out.decode().split("\r\n")[:-1]
    assert [line[4:] for line in lines] == MX_CAPS
    assert all(line.startswith("250-") for line in lines[:-1])
    assert lines[-1].startswith("250 ")
    assert mx.core.state is State.READY


def test_helo_reply_is_one_line_without_capabilities(mx: Transcript) -> None:
    mx.client(b"HELO client.test\r\n")
    out = mx.expect_hello("client.test", extended=False)
    assert out == b"250 mx.test\r\n"


def test_hello_reply_text_follows_the_hostname(mx: Transcript) -> None:
    mx.client(b"EHLO c\r\n")
    mx.core.next_event()
    assert mx.core.hello_reply("Hello c").lines[0] == "mx.test Hello c"


def test_size_capability_is_the_configured_limit() -> None:
    t = Transcript(make_core(limits=Limits(message_size=1234)))
    t.client(b"EHLO c\r\n")
    t.core.next_event()
    assert "SIZE 1234" in t.core.hello_reply().lines


def test_ehlo_without_a_name_is_501(mx: Transcript) -> None:
    mx.client(b"EHLO\r\nEHLO \r\n")
    mx.expect_refusal(501, "5.5.4")
    mx.expect_refusal(501, "5.5.4")


def test_commands_are_case_insensitive(mx: Transcript) -> None:
    mx.client(b"ehlo c\r\nmail from:<a@b.example>\r\n")
    mx.expect_hello("c")
    mx.expect(MailFrom("a@b.example", {}), reply=replies.OK)


def test_refused_hello_keeps_the_state(mx: Transcript) -> None:
    mx.client(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    mx.expect(Hello("c", extended=True), reply=replies.reply(550, "5.7.1", "go away"))
    assert mx.core.state is State.GREETED
    mx.expect_refusal(503, "5.5.1")


# -- a whole DATA transaction ------------------------------------------------------------
def test_data_transaction_events_and_wire(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    content, end = send_data(mx, b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert content == b"Subject: hi\r\n\r\nbody\r\n"
    assert end == DataEnd()
    assert mx.send(replies.queued("Q42")) == b"250 2.0.0 Ok: queued as Q42\r\n"
    assert mx.core.state is State.READY
    mx.client(b"QUIT\r\n")
    assert mx.expect(Quit(), reply=replies.BYE) == b"221 2.0.0 Bye\r\n"
    assert mx.core.state is State.CLOSED


def test_empty_message_has_no_chunks(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    content, end = send_data(mx, b".\r\n")
    assert (content, end) == (b"", DataEnd())


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b"..\r\n.\r\n", b".\r\n"),  # a line that is a single dot
        (b"...\r\n.\r\n", b"..\r\n"),
        (b"..hidden\r\n.\r\n", b".hidden\r\n"),
        (b"a\r\n..b\r\n.c\r\n.\r\n", b"a\r\n.b\r\nc\r\n"),  # unneeded stuffing removed
        (b". \r\n.\r\n", b" \r\n"),
        (b"x.\r\n.\r\n", b"x.\r\n"),  # a dot elsewhere is content
        (b"a\r\n\r\n\r\n.\r\n", b"a\r\n\r\n\r\n"),
        (b"no dot here.\r\n..\r\n.\r\n", b"no dot here.\r\n.\r\n"),
    ],
)
def test_dot_unstuffing_is_byte_exact(mx: Transcript, wire: bytes, content: bytes) -> None:
    ehlo(mx)
    envelope(mx)
    assert send_data(mx, wire) == (content, DataEnd())


def test_data_ends_only_at_crlf_dot_crlf_even_split_byte_by_byte(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(b"DATA\r\n")
    mx.expect(Data(), reply=replies.START_DATA)
    content = bytearray()
    end = None
    for byte in b"line\r\n..x\r\n.\r\n":
        mx.client(bytes([byte]))
        while (ev := mx.core.next_event()) is not NEED_DATA:
            if isinstance(ev, DataChunk):
                content += ev.data
            else:
                end = ev
                break
    assert bytes(content) == b"line\r\n.x\r\n"
    assert end == DataEnd()


def test_large_message_is_streamed_in_bounded_chunks(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    body = b"".join(b"line %06d of a big message\r\n" % i for i in range(12000))
    mx.client(b"DATA\r\n")
    mx.expect(Data(), reply=replies.START_DATA)
    mx.client(body + b".\r\n")
    chunks = []
    while isinstance(ev := mx.core.next_event(), DataChunk):
        chunks.append(ev.data)
    assert ev == DataEnd()
    assert all(len(c) <= 64 * 1024 for c in chunks)
    assert len(chunks) > 1
    assert b"".join(chunks) == body


def test_data_refused_by_session_keeps_the_envelope(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(b"DATA\r\nRSET\r\n")
    mx.expect(Data(), reply=replies.reply(451, "4.3.0", "later"))
    assert mx.core.state is State.RCPT
    mx.expect(Rset(), reply=replies.OK)
    assert mx.core.state is State.READY


def test_final_data_reply_ends_the_transaction_even_when_negative(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    assert send_data(mx, b"x\r\n.\r\n")[1] == DataEnd()
    mx.send(replies.reply(451, "4.3.0", "Temporary storage failure"))
    assert mx.core.state is State.READY
    mx.client(b"RCPT TO:<b@example.com>\r\n")
    mx.expect_refusal(503, "5.5.1")


# -- BDAT (RFC 3030) ---------------------------------------------------------------------
def test_bdat_single_last_chunk(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(b"BDAT 10 LAST\r\nhello\r\n.\r\nQUIT\r\n")
    assert mx.expect(Bdat(10, last=True), reply=replies.OK) == b""  # no wire reply yet
    content, end = mx.read_message()
    assert content == b"hello\r\n.\r\n"  # raw: no dot-unstuffing, no terminator
    assert end == BdatEnd(last=True)
    assert mx.send(replies.queued("Q1")) == b"250 2.0.0 Ok: queued as Q1\r\n"
    mx.expect(Quit(), reply=replies.BYE)


def test_bdat_several_chunks_then_zero_last(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(b"BDAT 3\r\nabcBDAT 2\r\ndeBDAT 0 last\r\n")
    mx.expect(Bdat(3, last=False), reply=replies.OK)
    assert mx.read_message() == (b"abc", BdatEnd(last=False))
    assert mx.send(replies.chunk_ok(3)) == b"250 2.0.0 3 octets received\r\n"
    assert mx.core.state is State.CHUNKING
    mx.expect(Bdat(2, last=False), reply=replies.OK)
    assert mx.read_message() == (b"de", BdatEnd(last=False))
    mx.send(replies.chunk_ok(5))
    mx.expect(Bdat(0, last=True), reply=replies.OK)
    assert mx.read_message() == (b"", BdatEnd(last=True))
    mx.send(replies.queued("Q2"))
    assert mx.core.state is State.READY


def test_bdat_chunk_bytes_are_never_commands(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    payload = b"MAIL FROM:<evil@x>\r\n"
    mx.client(b"BDAT %d LAST\r\n" % len(payload) + payload)
    mx.expect(Bdat(len(payload), last=True), reply=replies.OK)
    assert mx.read_message() == (payload, BdatEnd(last=True))


def test_data_after_bdat_is_503(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(b"BDAT 1\r\nxDATA\r\n")
    mx.expect(Bdat(1, last=False), reply=replies.OK)
    mx.read_message()
    mx.send(replies.chunk_ok(1))
    mx.expect_refusal(503, "5.5.1")


def test_rcpt_after_bdat_is_503(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(b"BDAT 1\r\nxRCPT TO:<c@example.com>\r\n")
    mx.expect(Bdat(1, last=False), reply=replies.OK)
    mx.read_message()
    mx.send(replies.chunk_ok(1))
    mx.expect_refusal(503, "5.5.1")


def test_bdat_after_helo_is_503_and_its_chunk_is_skipped(mx: Transcript) -> None:
    mx.client(b"HELO c\r\n")
    mx.expect_hello("c", extended=False)
    envelope(mx)
    mx.client(b"BDAT 20 LAST\r\nMAIL FROM:<evil@x>\r\nNOOP\r\n")
    mx.expect_refusal(503, "5.5.1")
    mx.expect(Noop(), reply=replies.OK)  # the 20 chunk bytes were consumed unread


def test_bdat_without_recipients_skips_the_chunk(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b"BDAT 6 LAST\r\nRSET\r\nNOOP\r\n")
    mx.expect_refusal(503, "5.5.1")
    mx.expect(Noop(), reply=replies.OK)


def test_bdat_refused_by_session_skips_chunk_and_ends_transaction(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(b"BDAT 6\r\nRSET\r\nBDAT 4 LAST\r\nabcdNOOP\r\n")
    refusal = replies.reply(452, "4.2.2", "Mailbox full")
    assert mx.expect(Bdat(6, last=False), reply=refusal) == refusal.render()
    assert mx.core.state is State.READY
    mx.expect_refusal(503, "5.5.1")  # the pipelined BDAT: no transaction any more
    mx.expect(Noop(), reply=replies.OK)


@pytest.mark.parametrize("line", [b"BDAT\r\n", b"BDAT x\r\n", b"BDAT -1\r\n", b"BDAT 1 NOW\r\n",
                                  b"BDAT 123456789012345678901\r\n"])
def test_bdat_with_unusable_size_closes(mx: Transcript, line: bytes) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(line)
    hint = mx.expect_refusal(501, "5.5.4")
    assert hint.closes
    assert mx.core.state is State.CLOSED


# -- pipelining (RFC 2920) ---------------------------------------------------------------
def test_pipelined_envelope_is_parsed_in_order_and_replies_follow_in_order(
    mx: Transcript,
) -> None:
    ehlo(mx)
    mx.client(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
        b"RCPT TO:<c@example.com>\r\nDATA\r\n"
    )
    mark = len(mx.wire)
    items = mx.run()
    assert items == [
        MailFrom("a@example.org", {}),
        RcptTo("b@example.com", {}),
        RcptTo("c@example.com", {}),
        Data(),
    ]
    assert bytes(mx.wire[mark:]) == (
        replies.OK.render() * 3 + replies.START_DATA.render()
    )


def test_whole_session_in_one_packet(mx: Transcript) -> None:
    mx.client(
        b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
        b"hi\r\n.\r\nQUIT\r\n"
    )
    items = mx.run()
    assert items == [
        Hello("c", extended=True), MailFrom("", {}), RcptTo("b@example.com", {}), Data(),
        DataChunk(b"hi\r\n"), DataEnd(), Quit(), ConnectionClosed(),
    ]


def test_next_event_while_a_reply_is_owed_is_a_programming_error(mx: Transcript) -> None:
    mx.client(b"EHLO c\r\nNOOP\r\n")
    mx.core.next_event()
    with pytest.raises(RuntimeError):
        mx.core.next_event()


def test_a_reply_that_does_not_fit_the_event_is_refused(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b"MAIL FROM:<a@b.example>\r\n")
    mx.core.next_event()
    with pytest.raises(RuntimeError):
        mx.core.send(replies.START_DATA)
    with pytest.raises(RuntimeError):
        mx.core.send(replies.BYE)


def test_send_without_an_owed_reply_is_refused(mx: Transcript) -> None:
    with pytest.raises(RuntimeError):
        mx.core.send(replies.OK)


def test_a_421_may_be_sent_at_any_time_and_closes(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b"NOOP\r\n")
    mx.core.next_event()
    assert mx.core.send(replies.TEMP_ERROR).startswith(b"421 4.3.0")
    assert mx.core.state is State.CLOSED
    assert mx.core.next_event() == ConnectionClosed()


# -- sequence ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("setup", "line", "code", "enhanced"),
    [
        ("", b"MAIL FROM:<a@b.example>", 503, "5.5.1"),  # before EHLO
        ("ehlo", b"RCPT TO:<a@b.example>", 503, "5.5.1"),  # before MAIL
        ("ehlo", b"DATA", 503, "5.5.1"),
        ("mail", b"DATA", 554, "5.5.1"),  # no valid recipients
        ("mail", b"BDAT 0 LAST", 554, "5.5.1"),
        ("mail", b"MAIL FROM:<a@b.example>", 503, "5.5.1"),  # nested
        ("ehlo", b"EXPN staff", 502, "5.5.1"),
        ("ehlo", b"FROB", 500, "5.5.1"),
        ("ehlo", b"", 500, "5.5.1"),
        ("rcpt", b"DATA now", 501, "5.5.4"),
        ("ehlo", b"QUIT now", 501, "5.5.4"),
        ("ehlo", b"RSET x", 501, "5.5.4"),
        ("ehlo", b"VRFY", 501, "5.5.4"),
    ],
)
def test_sequence_and_syntax_refusals(
    mx: Transcript, setup: str, line: bytes, code: int, enhanced: str
) -> None:
    if setup:
        ehlo(mx)
    if setup == "mail":
        mx.client(b"MAIL FROM:<a@example.org>\r\n")
        mx.expect(MailFrom("a@example.org", {}), reply=replies.OK)
    if setup == "rcpt":
        envelope(mx)
    mx.client(line + b"\r\n")
    mx.expect_refusal(code, enhanced)


def test_rcpt_moves_the_transaction_only_on_a_2xx_reply(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<nobody@example.com>\r\nDATA\r\n")
    mx.expect(MailFrom("a@example.org", {}), reply=replies.OK)
    mx.expect(RcptTo("nobody@example.com", {}), reply=replies.reply(550, "5.1.1", "No such user"))
    assert mx.core.state is State.MAIL
    mx.expect_refusal(554, "5.5.1")


def test_refused_mail_leaves_no_transaction(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
    mx.expect(MailFrom("a@example.org", {}), reply=replies.reply(550, "5.7.1", "no"))
    mx.expect_refusal(503, "5.5.1")


def test_rset_and_ehlo_reset_the_transaction(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(b"RSET\r\nDATA\r\n")
    mx.expect(Rset(), reply=replies.OK)
    assert mx.core.state is State.READY
    mx.expect_refusal(503, "5.5.1")
    envelope(mx)
    ehlo(mx)
    assert mx.core.state is State.READY
    mx.client(b"DATA\r\n")
    mx.expect_refusal(503, "5.5.1")


def test_rset_before_ehlo_does_not_count_as_ehlo(mx: Transcript) -> None:
    mx.client(b"RSET\r\nMAIL FROM:<a@b.example>\r\n")
    mx.expect(Rset(), reply=replies.OK)
    assert mx.core.state is State.GREETED
    mx.expect_refusal(503, "5.5.1")


def test_too_many_recipients_is_452_and_not_an_error() -> None:
    t = Transcript(make_core(limits=Limits(recipients=2, errors=1)))
    ehlo(t)
    t.client(b"MAIL FROM:<a@example.org>\r\n")
    t.expect(MailFrom("a@example.org", {}), reply=replies.OK)
    for name in ("b", "c"):
        t.client(f"RCPT TO:<{name}@example.com>\r\n".encode())
        t.expect(RcptTo(f"{name}@example.com", {}), reply=replies.OK)
    for _ in range(3):  # far past the error budget of 1: still only 452s
        t.client(b"RCPT TO:<d@example.com>\r\n")
        assert t.expect_refusal(452, "4.5.3").lines == ("Too many recipients",)
    assert send_data(t, b"x\r\n.\r\n") == (b"x\r\n", DataEnd())


def test_refused_recipients_do_not_count_towards_the_limit() -> None:
    t = Transcript(make_core(limits=Limits(recipients=1)))
    ehlo(t)
    t.client(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.com>\r\nRCPT TO:<y@example.com>\r\n")
    t.expect(MailFrom("a@example.org", {}), reply=replies.OK)
    t.expect(RcptTo("x@example.com", {}), reply=replies.reply(550, "5.1.1", "No such user"))
    t.expect(RcptTo("y@example.com", {}), reply=replies.OK)


# -- MAIL/RCPT arguments -----------------------------------------------------------------
def test_mail_parameters_are_upper_cased_and_passed_on(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b"MAIL FROM:<a@example.org> size=100 body=8bitmime\r\n")
    mx.expect(MailFrom("a@example.org", {"SIZE": "100", "BODY": "8BITMIME"}), reply=replies.OK)


def test_null_reverse_path_is_accepted_for_mail_only(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b"MAIL FROM:<>\r\nRCPT TO:<>\r\n")
    mx.expect(MailFrom("", {}), reply=replies.OK)
    mx.expect_refusal(501, "5.1.3")


def test_space_after_colon_is_tolerated(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b"MAIL FROM: <a@example.org>\r\n")
    mx.expect(MailFrom("a@example.org", {}), reply=replies.OK)


def test_addresses_are_canonical_in_events(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b'MAIL FROM:<@relay.example:"john"@Example.ORG>\r\n'
              b"RCPT TO:<B@[IPv6:2001:DB8::1]>\r\n")
    mx.expect(MailFrom("john@example.org", {}), reply=replies.OK)
    mx.expect(RcptTo("B@[IPv6:2001:db8::1]", {}), reply=replies.OK)


def test_quoted_local_part_with_spaces_and_brackets(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b'MAIL FROM:<"a b>c"@example.org> SIZE=1\r\n')
    mx.expect(MailFrom('"a b>c"@example.org', {"SIZE": "1"}), reply=replies.OK)


def test_postmaster_without_domain_goes_to_this_host(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n")
    mx.expect(MailFrom("", {}), reply=replies.OK)
    mx.expect(RcptTo("postmaster@mx.test", {}), reply=replies.OK)


@pytest.mark.parametrize(
    ("line", "code", "enhanced"),
    [
        (b"MAIL FROM:a@example.org", 501, "5.1.7"),  # no brackets
        (b"MAIL FROM:<a@@example.org>", 501, "5.1.7"),
        (b"MAIL FROM:<a@example.org", 501, "5.1.7"),
        (b"MAIL FROM:<a@example.org>x", 501, "5.1.7"),
        (b"MAIL TO:<a@example.org>", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> SIZE=12x", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> SIZE", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> SIZE=99999999999", 552, "5.3.4"),
        (b"MAIL FROM:<a@example.org> BODY=BINARYMIME", 555, "5.5.4"),
        (b"MAIL FROM:<a@example.org> BODY=9BIT", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> SMTPUTF8=yes", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> RET=HDRS", 555, "5.5.4"),  # DSN not offered
        (b"MAIL FROM:<a@example.org> AUTH=<>", 555, "5.5.4"),  # AUTH= only on submission
        (b"MAIL FROM:<a@example.org> SIZE=1 SIZE=2", 501, "5.5.4"),
        (b"MAIL FROM:<a@example.org> =x", 501, "5.5.4"),
        (b"MAIL FROM:<j\xc3\xb6rg@example.org>", 553, "5.6.7"),  # UTF-8, no SMTPUTF8
        (b"MAIL FROM:<j\xf6rg@example.org> SMTPUTF8", 553, "5.6.7"),  # not UTF-8 at all
        (b"MAIL FROM:<a@b\xc3\xbccher.example>", 553, "5.6.7"),
    ],
)
def test_mail_argument_refusals(mx: Transcript, line: bytes, code: int, enhanced: str) -> None:
    ehlo(mx)
    mx.client(line + b"\r\n")
    mx.expect_refusal(code, enhanced)
    assert mx.core.state is State.READY


@pytest.mark.parametrize(
    ("line", "code", "enhanced"),
    [
        (b"RCPT TO:<b@example.com> NOTIFY=NEVER", 555, "5.5.4"),
        (b"RCPT TO:b@example.com", 501, "5.1.3"),
        (b"RCPT TO:<b@-example.com>", 501, "5.1.3"),
        (b"RCPT TO:<b@[999.1.1.1]>", 501, "5.1.3"),
        (b"RCPT TO:<\xc3\xa9@example.com>", 553, "5.6.7"),
        (b"RCPT FROM:<b@example.com>", 501, "5.5.4"),
    ],
)
def test_rcpt_argument_refusals(mx: Transcript, line: bytes, code: int, enhanced: str) -> None:
    ehlo(mx)
    mx.client(b"MAIL FROM:<a@example.org>\r\n")
    mx.expect(MailFrom("a@example.org", {}), reply=replies.OK)
    mx.client(line + b"\r\n")
    mx.expect_refusal(code, enhanced)
    assert mx.core.state is State.MAIL


def test_smtputf8_transaction_accepts_utf8_addresses(mx: Transcript) -> None:
    ehlo(mx)
    mx.client("MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\nRCPT TO:<ñ@例え.jp>\r\n".encode())
    mx.expect(MailFrom("jörg@xn--bcher-kva.example", {"SMTPUTF8": None}), reply=replies.OK)
    mx.expect(RcptTo("ñ@xn--r8jz45g.jp", {}), reply=replies.OK)


def test_smtputf8_does_not_outlive_its_transaction(mx: Transcript) -> None:
    ehlo(mx)
    mx.client(b"MAIL FROM:<a@example.org> SMTPUTF8\r\nRSET\r\nMAIL FROM:<a@example.org>\r\n")
    mx.expect(MailFrom("a@example.org", {"SMTPUTF8": None}), reply=replies.OK)
    mx.expect(Rset(), reply=replies.OK)
    mx.expect(MailFrom("a@example.org", {}), reply=replies.OK)
    mx.client("RCPT TO:<ñ@example.com>\r\n".encode())
    mx.expect_refusal(553, "5.6.7")


def test_submission_accepts_the_auth_mail_parameter(submissions: Transcript) -> None:
    t = submissions
    ehlo(t)
    t.client(b"AUTH PLAIN AHUAcA==\r\nMAIL FROM:<u@example.org> AUTH=<>\r\n")
    t.expect(AuthStart("PLAIN", b"\0u\0p"), reply=replies.AUTH_OK)
    t.expect(MailFrom("u@example.org", {"AUTH": "<>"}), reply=replies.OK)


# -- other commands ----------------------------------------------------------------------
def test_vrfy_is_an_event_and_the_reply_never_confirms_a_user(mx: Transcript) -> None:
    mx.client(b"VRFY root\r\n")
    assert mx.expect(Vrfy("root"), reply=replies.VRFY).startswith(b"252 2.5.0 ")


def test_noop_and_help_work_before_ehlo_and_keep_the_state(mx: Transcript) -> None:
    mx.client(b"NOOP hello\r\nHELP\r\n")
    mx.expect(Noop(), reply=replies.OK)
    mx.expect(Help(), reply=replies.HELP)
    assert mx.core.state is State.GREETED


def test_http_request_on_smtp_port_closes(mx: Transcript) -> None:
    mx.client(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    hint = mx.expect_refusal(421, "4.7.0")
    assert hint.closes
    assert mx.core.next_event() == ConnectionClosed()


def test_quit_closes_and_later_input_is_ignored(mx: Transcript) -> None:
    mx.client(b"QUIT\r\nMAIL FROM:<a@b.example>\r\n")
    mx.expect(Quit(), reply=replies.BYE)
    assert mx.core.state is State.CLOSED
    mx.client(b"EHLO again\r\n")
    assert mx.core.next_event() == ConnectionClosed()
    assert mx.core.buffered == 0 or mx.core.state is State.CLOSED


# -- end of input ------------------------------------------------------------------------
def test_eof_yields_connection_closed(mx: Transcript) -> None:
    mx.client(b"")
    assert mx.core.next_event() == ConnectionClosed()
    assert mx.core.state is State.CLOSED


def test_buffered_commands_are_handled_before_eof(mx: Transcript) -> None:
    mx.client(b"EHLO c\r\nNOOP\r\nNOO")
    mx.client(b"")
    assert mx.run() == [Hello("c", extended=True), Noop(), ConnectionClosed()]


def test_eof_inside_data_abandons_the_message(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(b"DATA\r\n")
    mx.expect(Data(), reply=replies.START_DATA)
    mx.client(b"partial message\r\n")
    mx.client(b"")
    items = mx.run()
    assert items == [DataChunk(b"partial message\r\n"), ConnectionClosed()]
    assert not any(isinstance(i, (DataEnd, DataAbort)) for i in items)


def test_eof_inside_bdat_abandons_the_message(mx: Transcript) -> None:
    ehlo(mx)
    envelope(mx)
    mx.client(b"BDAT 100 LAST\r\nonly some")
    mx.client(b"")
    assert mx.run() == [Bdat(100, last=True), DataChunk(b"only some"), ConnectionClosed()]
