"""SMTP reply rendering (RFC 5321 §4.2, RFC 2034) and the fixed reply texts."""

from __future__ import annotations

import pytest

from postkeep.smtp import replies
from postkeep.smtp.replies import Reply, reply


def test_single_line_reply_renders_code_enhanced_text() -> None:
    assert reply(250, "2.1.0", "Sender OK").render() == b"250 2.1.0 Sender OK\r\n"


def test_multi_line_reply_has_dashes_and_enhanced_code_on_every_line() -> None:
    r = reply(550, "5.7.1", "first", "second", "third")
    assert r.render() == b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n"


def test_reply_without_enhanced_code() -> None:
    assert reply(354, None, "go").render() == b"354 go\r\n"


def test_empty_text_keeps_the_space_after_the_code() -> None:
    assert replies.auth_challenge(b"").render() == b"334 \r\n"  # RFC 4954 §4
    assert reply(250, "2.0.0").render() == b"250 2.0.0\r\n"


@pytest.mark.parametrize("code", [221, 421])
def test_221_and_421_close(code: int) -> None:
    assert reply(code, f"{code // 100}.0.0", "x").closes


@pytest.mark.parametrize("code", [220, 250, 354, 450, 500, 530, 554])
def test_other_codes_do_not_close(code: int) -> None:
    assert not reply(code, None, "x").closes


def test_terminal_replies_close_whatever_their_code() -> None:
    r = reply(500, "5.5.2", "bye now", terminal=True)
    assert r.closes
    assert r.render() == b"500 5.5.2 bye now\r\n"
    assert r != reply(500, "5.5.2", "bye now")


@pytest.mark.parametrize("text", ["a\r\n250 injected", "a\nb", "a\rb", "nul\x00"])
def test_reply_text_cannot_inject_lines(text: str) -> None:
    with pytest.raises(ValueError):
        reply(550, "5.0.0", text)


@pytest.mark.parametrize(
    ("code", "enhanced"), [(250, "5.0.0"), (550, "2.0.0"), (250, "2.0"), (250, "x.y.z"),
                           (334, "3.0.0")]
)
def test_enhanced_code_must_fit_the_reply_code(code: int, enhanced: str) -> None:
    with pytest.raises(ValueError):
        Reply(code, enhanced, ("x",))


@pytest.mark.parametrize("code", [199, 600, 0])
def test_reply_code_range(code: int) -> None:
    with pytest.raises(ValueError):
        reply(code, None, "x")


def test_reply_lines_are_at_most_512_octets() -> None:
    reply(250, "2.0.0", "x" * (512 - len("250 2.0.0 \r\n")))
    with pytest.raises(ValueError):
        reply(250, "2.0.0", "x" * (513 - len("250 2.0.0 \r\n")))


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (replies.READY_FOR_TLS, b"220 2.0.0 Ready to start TLS\r\n"),
        (replies.OK, b"250 2.0.0 OK\r\n"),
        (replies.START_DATA, b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        (replies.BYE, b"221 2.0.0 Bye\r\n"),
        (replies.AUTH_OK, b"235 2.7.0 Authentication successful\r\n"),
        (replies.AUTH_FAILED, b"535 5.7.8 Authentication credentials invalid\r\n"),
        (replies.greeting("mx.example"), b"220 mx.example ESMTP postkeep\r\n"),
        (replies.auth_challenge(b"Username:"), b"334 VXNlcm5hbWU6\r\n"),
        (replies.queued("Q7"), b"250 2.0.0 Ok: queued as Q7\r\n"),
        (replies.chunk_ok(1234), b"250 2.0.0 1234 octets received\r\n"),
        (replies.LINE_TOO_LONG, b"500 5.5.6 Line too long\r\n"),
        (replies.TOO_MANY_RECIPIENTS, b"452 4.5.3 Too many recipients\r\n"),
        (replies.AUTH_REQUIRED, b"530 5.7.0 Authentication required\r\n"),
    ],
)
def test_fixed_replies(value: Reply, wire: bytes) -> None:
    assert value.render() == wire


@pytest.mark.parametrize(
    ("value", "code", "enhanced"),
    [
        (replies.TEMP_ERROR, 421, "4.3.0"),
        (replies.TIMEOUT, 421, "4.4.2"),
        (replies.TOO_BUSY, 421, "4.7.0"),
        (replies.TOO_MANY_ERRORS, 421, "4.7.0"),
        (replies.NO_VALID_RECIPIENTS, 554, "5.5.1"),
        (replies.MESSAGE_TOO_BIG, 552, "5.3.4"),
        (replies.BARE_LINE_ENDING_IN_DATA, 554, "5.5.2"),
        (replies.NON_ASCII_ADDRESS, 553, "5.6.7"),
        (replies.UNKNOWN_PARAMETER, 555, "5.5.4"),
        (replies.UNKNOWN_COMMAND, 500, "5.5.1"),
        (replies.VRFY, 252, "2.5.0"),
    ],
)
def test_reply_codes(value: Reply, code: int, enhanced: str) -> None:
    assert (value.code, value.enhanced) == (code, enhanced)
    assert value.lines[0]  # a sentence, never empty


def test_closing_replies_close() -> None:
    for value in (replies.TEMP_ERROR, replies.TIMEOUT, replies.TOO_BUSY,
                  replies.TOO_MANY_ERRORS, replies.TOO_MANY_COMMANDS,
                  replies.BARE_LINE_ENDING, replies.BAD_BDAT_SIZE, replies.BYE):
        assert value.closes


def test_reply_classes() -> None:
    assert replies.OK.positive and not replies.OK.intermediate
    assert replies.START_DATA.intermediate and not replies.START_DATA.positive
    assert not replies.AUTH_FAILED.positive and not replies.AUTH_FAILED.intermediate
