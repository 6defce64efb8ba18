"""Header block splitting, field detection and the RFC 6409 §8 submission fields."""

from __future__ import annotations

import email.utils
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postkeep.mail.headers import (
    format_date,
    has_field,
    is_hostname,
    make_message_id,
    missing_submission_headers,
    split_header,
)

NOW = datetime(2024, 3, 5, 14, 7, 9, tzinfo=timezone(timedelta(hours=1)))

MESSAGE = (
    b"From: a@example.com\r\n"
    b"Subject: a long one\r\n"
    b" Date: this is a continuation, not a field\r\n"
    b"\r\n"
    b"Date: Tue, 05 Mar 2024 14:07:09 +0100\r\n"
    b"Message-ID: <body@example.com>\r\n"
)


# --- split_header ---------------------------------------------------------------------------


def test_split_at_the_first_empty_line() -> None:
    header, body = split_header(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n")
    assert header == b"A: 1\r\nB: 2\r\n\r\n"
    assert body == b"body\r\n\r\nmore\r\n"


def test_split_without_empty_line_is_all_header() -> None:
    assert split_header(b"A: 1\r\nB: 2\r\n") == (b"A: 1\r\nB: 2\r\n", b"")


def test_split_empty_header_section() -> None:
    assert split_header(b"\r\nbody\r\n") == (b"\r\n", b"body\r\n")


def test_split_empty_body() -> None:
    assert split_header(b"A: 1\r\n\r\n") == (b"A: 1\r\n\r\n", b"")


def test_split_empty_message() -> None:
    assert split_header(b"") == (b"", b"")


def test_split_bare_lf_is_not_an_empty_line() -> None:
    data = b"A: 1\n\nnot a body\r\n"
    assert split_header(data) == (data, b"")


@given(st.binary(max_size=200))
def test_split_is_lossless(data: bytes) -> None:
    header, body = split_header(data)
    assert header + body == data
    if body:
        assert header.endswith(b"\r\n")


# --- has_field ------------------------------------------------------------------------------


def test_has_field_is_case_insensitive() -> None:
    assert has_field(b"message-id: <x@y>\r\n\r\n", "Message-ID")
    assert has_field(b"MESSAGE-ID: <x@y>\r\n\r\n", "message-id")


def test_has_field_ignores_the_body() -> None:
    header, _ = split_header(MESSAGE)
    assert not has_field(header, "Date")
    assert not has_field(header, "Message-ID")
    # Even when given the whole message, scanning stops at the empty line.
    assert not has_field(MESSAGE, "Date")


def test_has_field_ignores_continuation_lines() -> None:
    assert not has_field(b"Subject: x\r\n Date: y\r\n\tMessage-ID: z\r\n\r\n", "Date")
    assert not has_field(b"Subject: x\r\n\tMessage-ID: z\r\n\r\n", "Message-ID")


def test_has_field_sees_a_folded_field() -> None:
    block = b"Subject: x\r\nDate:\r\n Tue, 05 Mar 2024\r\n 14:07:09 +0100\r\n\r\n"
    assert has_field(block, "Date")


def test_has_field_requires_the_whole_name() -> None:
    assert not has_field(b"Dated: x\r\nX-Date: y\r\nResent-Date: z\r\n\r\n", "Date")
    assert not has_field(b"Date-Received: x\r\n\r\n", "Date")


def test_has_field_accepts_obsolete_space_before_colon() -> None:
    assert has_field(b"Date : Tue, 05 Mar 2024 14:07:09 +0100\r\n\r\n", "Date")


def test_has_field_ignores_lines_that_are_not_fields() -> None:
    assert not has_field(b"From someone Tue Mar  5 14:07:09 2024\r\n\r\n", "From")
    assert not has_field(b": no name\r\n\r\n", "Date")


def test_has_field_in_last_line_without_crlf() -> None:
    assert has_field(b"A: 1\r\nDate: x", "Date")


@pytest.mark.parametrize("name", ["", "Da te", "Date:", "D\u00e4te", "Date\r\n"])
def test_has_field_refuses_invalid_names(name: str) -> None:
    with pytest.raises(ValueError):
        has_field(b"Date: x\r\n\r\n", name)


# --- ids and dates --------------------------------------------------------------------------


def test_message_id_shape_and_uniqueness() -> None:
    ids = {make_message_id("mail.example.com") for _ in range(200)}
    assert len(ids) == 200
    for mid in ids:
        assert re.fullmatch(r"<[0-9a-f]{32}@mail\.example\.com>", mid)


@pytest.mark.parametrize("host", ["", "bad host", "x\r\nBcc: y", "a..b", "-a.com", "é.com"])
def test_message_id_refuses_bad_hostnames(host: str) -> None:
    with pytest.raises(ValueError):
        make_message_id(host)


def test_is_hostname() -> None:
    assert is_hostname("mail.example.com")
    assert is_hostname("localhost")
    assert not is_hostname("a" * 64 + ".com")
    assert not is_hostname(("a" * 60 + ".") * 5 + "com")
    assert not is_hostname("mail.example.com\n")


def test_format_date_rfc5322() -> None:
    assert format_date(NOW) == "Tue, 05 Mar 2024 14:07:09 +0100"
    assert format_date(NOW.astimezone(UTC)) == "Tue, 05 Mar 2024 13:07:09 +0000"


def test_format_date_defaults_to_now_and_parses_back() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    parsed = email.utils.parsedate_to_datetime(format_date())
    assert parsed.tzinfo is not None
    assert before - timedelta(seconds=1) <= parsed <= datetime.now(UTC)


def test_format_date_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError):
        format_date(datetime(2024, 3, 5, 14, 7, 9))


def test_format_date_sub_minute_offset_is_written_in_utc() -> None:
    odd = datetime(1900, 1, 1, 12, 0, 0, tzinfo=timezone(timedelta(minutes=19, seconds=32)))
    assert format_date(odd) == "Mon, 01 Jan 1900 11:40:28 +0000"


# --- missing_submission_headers -------------------------------------------------------------


def test_both_fields_added_when_missing() -> None:
    header, _ = split_header(MESSAGE)
    added = missing_submission_headers(header, "mail.example.com", NOW)
    lines = added.split(b"\r\n")
    assert lines[-1] == b""
    assert re.fullmatch(rb"Message-ID: <[0-9a-f]{32}@mail\.example\.com>", lines[0])
    assert lines[1] == b"Date: Tue, 05 Mar 2024 14:07:09 +0100"
    assert len(lines) == 3


def test_nothing_added_when_both_present() -> None:
    block = b"Message-Id: <a@b>\r\nDATE: Tue, 05 Mar 2024 14:07:09 +0100\r\n\r\n"
    assert missing_submission_headers(block, "mail.example.com", NOW) == b""


def test_only_the_missing_field_is_added() -> None:
    only_date = missing_submission_headers(b"Message-ID: <a@b>\r\n\r\n", "mx.example", NOW)
    assert only_date == b"Date: Tue, 05 Mar 2024 14:07:09 +0100\r\n"
    only_id = missing_submission_headers(b"Date: x\r\n\r\n", "mx.example", NOW)
    assert only_id.startswith(b"Message-ID: <") and only_id.endswith(b"@mx.example>\r\n")
    assert only_id.count(b"\r\n") == 1


def test_prepended_fields_are_recognised_afterwards() -> None:
    header, _ = split_header(MESSAGE)
    new = missing_submission_headers(header, "mail.example.com", NOW) + header
    assert has_field(new, "Date") and has_field(new, "Message-ID")
    assert missing_submission_headers(new, "mail.example.com", NOW) == b""
