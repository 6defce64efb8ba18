"""ENVELOPE, BODYSTRUCTURE and section ranges computed once at ingest (RFC 3501 §6.4.5, §7.4.2)."""

from __future__ import annotations

import base64
import email
import email.header
import email.message
import email.policy
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import cast

import pytest

from postkeep.imap import responses
from postkeep.mail.mime import (
    MAX_ADDRESSES,
    MAX_DEPTH,
    MAX_PARTS,
    Analysis,
    PartSpan,
    Value,
    analyze,
    body_of,
    decoded_header,
    header_date,
    header_fields,
    section_range,
    text_for_search,
)

US_ASCII = ["CHARSET", "US-ASCII"]
NIL4 = [None, None, None, None]


def crlf(text: str) -> bytes:
    """A message written with LF in the test source, stored with CRLF as SMTP delivers it."""
    return text.replace("\n", "\r\n").encode("utf-8")


def fetch(data: bytes, section: str) -> bytes | None:
    rng = section_range(analyze(data), section, len(data))
    return None if rng is None else data[rng[0] : rng[1]]


def leaves(bs: list[Value], prefix: str = "") -> Iterator[tuple[str, list[Value]]]:
    """(section, body) of every non-multipart body, numbered as RFC 3501 §6.4.5 says."""

    def child(p: str, i: int) -> str:
        return f"{p}.{i}" if p else str(i)

    def multipart(node: list[Value], p: str) -> Iterator[tuple[str, list[Value]]]:
        for i, sub in enumerate(node, 1):
            if not isinstance(sub, list):
                return
            if isinstance(sub[0], list):
                yield from multipart(sub, child(p, i))
            else:
                yield from single(sub, child(p, i))

    def single(node: list[Value], section: str) -> Iterator[tuple[str, list[Value]]]:
        yield section, node
        if node[0] == "MESSAGE" and len(node) > 9 and isinstance(node[8], list):
            yield from message(node[8], section)

    def message(node: list[Value], p: str) -> Iterator[tuple[str, list[Value]]]:
        if isinstance(node[0], list):
            yield from multipart(node, p)
        else:
            yield from single(node, child(p, 1))

    return message(bs, prefix)


def assert_sizes_match(data: bytes) -> None:
    """Every size and line count announced equals what BODY[section] returns."""
    a = analyze(data)
    for section, node in leaves(a.bodystructure):
        got = fetch(data, section)
        assert got is not None, section
        assert node[6] == len(got), section
        if node[0] == "TEXT":
            assert node[7] == lines(got), section
        if node[0] == "MESSAGE" and len(node) > 9:
            assert node[9] == lines(got), section


def imap_encode(value: list[Value]) -> None:
    """The values go on the wire as they are (imap.responses refuses nesting over 64)."""
    responses.encode_value(cast(responses.Value, value))


def lines(chunk: bytes) -> int:
    return chunk.count(b"\n") + (1 if chunk and not chunk.endswith(b"\n") else 0)


# --- known messages: exact ENVELOPE and BODYSTRUCTURE ------------------------------------

SIMPLE = crlf(
    "From: Alice Example <alice@example.com>\n"
    "To: bob@example.org\n"
    "Subject: Hello\n"
    "Date: Mon, 7 Feb 1994 21:52:25 -0800\n"
    "Message-ID: <B27397-0100000@example.com>\n"
    'Content-Type: text/plain; charset="utf-8"\n'
    "\n"
    "Hello Bob,\n"
    "How are you?\n"
)


def test_simple_text_message_envelope_and_bodystructure() -> None:
    a = analyze(SIMPLE)
    alice = [["Alice Example", None, "alice", "example.com"]]
    assert a.envelope == [
        "Mon, 7 Feb 1994 21:52:25 -0800",
        "Hello",
        alice,
        alice,  # RFC 3501 §7.4.2: Sender defaults to From
        alice,  # and so does Reply-To
        [[None, None, "bob", "example.org"]],
        None,
        None,
        None,
        "<B27397-0100000@example.com>",
    ]
    assert a.bodystructure == [
        "TEXT", "PLAIN", ["CHARSET", "utf-8"], None, None, "7BIT", 26, 2, None, None, None, None
    ]  # fmt: skip
    assert a.body == ["TEXT", "PLAIN", ["CHARSET", "utf-8"], None, None, "7BIT", 26, 2]
    assert fetch(SIMPLE, "1") == b"Hello Bob,\r\nHow are you?\r\n"
    assert fetch(SIMPLE, "TEXT") == fetch(SIMPLE, "1")


def test_missing_headers_are_nil_and_content_type_defaults_to_us_ascii_text() -> None:
    data = b"X-Nothing: here\r\n\r\nbody"
    a = analyze(data)
    assert a.envelope == [None] * 10
    # RFC 2045 §5.2: no Content-Type means text/plain; charset=us-ascii.
    assert a.bodystructure == [
        "TEXT",
        "PLAIN",
        US_ASCII,
        None,
        None,
        "7BIT",
        4,
        1,
        None,
        None,
        None,
        None,
    ]


def test_sender_and_reply_to_are_kept_when_present_and_default_when_empty() -> None:
    data = crlf("From: a@x.test\nSender: s@x.test\nReply-To:\nTo:\n\nb")
    env = analyze(data).envelope
    assert env[2] == [[None, None, "a", "x.test"]]
    assert env[3] == [[None, None, "s", "x.test"]]
    assert env[4] == env[2]  # present but empty: RFC 3501 says use From
    assert env[5] is None  # an empty To is NIL


ALTERNATIVE = crlf(
    "From: a@example.com\n"
    "Subject: alt\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/alternative; boundary="=_alt"\n'
    "\n"
    "This is a multi-part message in MIME format.\n"
    "--=_alt\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "\n"
    "plain text\n"
    "--=_alt\n"
    "Content-Type: text/html; charset=UTF-8\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "<p>h=C3=A9llo</p>\n"
    "--=_alt--\n"
    "epilogue, not a part\n"
)


def test_multipart_alternative() -> None:
    a = analyze(ALTERNATIVE)
    plain: list[Value] = ["TEXT", "PLAIN", ["CHARSET", "us-ascii"], None, None, "7BIT", 10, 1]
    html: list[Value] = [
        "TEXT",
        "HTML",
        ["CHARSET", "UTF-8"],
        None,
        None,
        "QUOTED-PRINTABLE",
        17,
        1,
    ]
    ext1: list[Value] = [None, None, None, None]
    assert a.bodystructure == [
        plain + ext1,
        html + ext1,
        "ALTERNATIVE",
        ["BOUNDARY", "=_alt"],
        None,
        None,
        None,
    ]
    assert a.body == [plain, html, "ALTERNATIVE"]
    assert fetch(ALTERNATIVE, "1") == b"plain text"  # RFC 2046 §5.1.1: CRLF is the delimiter's
    assert fetch(ALTERNATIVE, "2") == b"<p>h=C3=A9llo</p>"
    assert fetch(ALTERNATIVE, "2.MIME") == (
        b"Content-Type: text/html; charset=UTF-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    assert fetch(ALTERNATIVE, "3") is None
    assert_sizes_match(ALTERNATIVE)


PDF = b"%PDF-1.4 not really\x00\xff" * 10
PDF_B64 = base64.encodebytes(PDF).replace(b"\n", b"\r\n")

MIXED = (
    crlf(
        "From: Bob <bob@example.org>\n"
        "To: alice@example.com\n"
        "Subject: report\n"
        "Content-Type: multipart/mixed;\n"
        ' boundary="XYZ"\n'
        "Content-Language: en, de\n"
        "\n"
        "--XYZ\n"
        "\n"
        "See attachment.\n"
        "--XYZ\n"
        'Content-Type: application/pdf; name="report.pdf"\n'
        "Content-Transfer-Encoding: base64\n"
        'Content-Disposition: attachment; filename="report.pdf"; size=210\n'
        "Content-ID: <pdf@example.org>\n"
        "Content-Description: The report\n"
        "Content-Location: http://example.org/report.pdf\n"
        "\n"
    )
    + PDF_B64
    + b"\r\n--XYZ--\r\n"
)


def test_multipart_mixed_with_base64_attachment() -> None:
    a = analyze(MIXED)
    first, second, *rest = a.bodystructure
    # A part with no header at all is text/plain; charset=us-ascii (RFC 2045 §5.2).
    assert first == ["TEXT", "PLAIN", US_ASCII, None, None, "7BIT", 15, 1, None, None, None, None]
    assert second == [
        "APPLICATION",
        "PDF",
        ["NAME", "report.pdf"],
        "<pdf@example.org>",
        "The report",
        "BASE64",
        len(PDF_B64),
        None,  # body MD5
        ["ATTACHMENT", ["FILENAME", "report.pdf", "SIZE", "210"]],
        None,
        "http://example.org/report.pdf",
    ]
    assert rest == ["MIXED", ["BOUNDARY", "XYZ"], None, ["en", "de"], None]
    assert fetch(MIXED, "2") == PDF_B64
    assert base64.b64decode(fetch(MIXED, "2") or b"") == PDF
    assert fetch(MIXED, "1.MIME") == b"\r\n"
    assert_sizes_match(MIXED)


INNER = crlf(
    "From: Carol <carol@example.net>\n"
    "To: Dave <dave@example.net>\n"
    "Subject: the original\n"
    "Date: Tue, 1 Jan 2030 00:00:00 +0000\n"
    "Message-ID: <orig@example.net>\n"
    "Content-Type: multipart/alternative; boundary=in\n"
    "\n"
    "--in\n"
    "Content-Type: text/plain\n"
    "\n"
    "inner plain\n"
    "--in\n"
    "Content-Type: text/html\n"
    "\n"
    "<b>inner</b>\n"
    "--in--\n"
)

FORWARD = (
    crlf(
        "From: fwd@example.com\n"
        "Subject: Fwd: the original\n"
        "In-Reply-To: <orig@example.net>\n"
        "Content-Type: multipart/mixed; boundary=out\n"
        "\n"
        "--out\n"
        "Content-Type: text/plain\n"
        "\n"
        "see below\n"
        "--out\n"
        "Content-Type: message/rfc822\n"
        "\n"
    )
    + INNER
    + b"\r\n--out--\r\n"
)


def test_nested_message_rfc822() -> None:
    a = analyze(FORWARD)
    assert a.envelope[1] == "Fwd: the original"
    assert a.envelope[8] == "<orig@example.net>"
    msg = a.bodystructure[1]
    assert isinstance(msg, list)
    carol = [["Carol", None, "carol", "example.net"]]
    inner_plain = ["TEXT", "PLAIN", None, None, None, "7BIT", 11, 1, None, None, None, None]
    inner_html = ["TEXT", "HTML", None, None, None, "7BIT", 12, 1, None, None, None, None]
    assert msg == [
        "MESSAGE",
        "RFC822",
        None,
        None,
        None,
        "7BIT",
        len(INNER),
        [
            "Tue, 1 Jan 2030 00:00:00 +0000",
            "the original",
            carol,
            carol,
            carol,
            [["Dave", None, "dave", "example.net"]],
            None,
            None,
            None,
            "<orig@example.net>",
        ],
        [inner_plain, inner_html, "ALTERNATIVE", ["BOUNDARY", "in"], None, None, None],
        lines(INNER),
        None,
        None,
        None,
        None,
    ]
    # BODY drops extension data at every level, including inside the message.
    assert body_of(msg)[8] == [inner_plain[:8], inner_html[:8], "ALTERNATIVE"]
    assert fetch(FORWARD, "2") == INNER
    assert fetch(FORWARD, "2.HEADER") == INNER[: INNER.index(b"\r\n\r\n") + 4]
    assert fetch(FORWARD, "2.TEXT") == INNER[INNER.index(b"\r\n\r\n") + 4 :]
    assert fetch(FORWARD, "2.1") == b"inner plain"
    assert fetch(FORWARD, "2.2.MIME") == b"Content-Type: text/html\r\n\r\n"
    assert fetch(FORWARD, "1.HEADER") is None  # part 1 is not message/rfc822
    assert_sizes_match(FORWARD)


def test_group_addresses_and_unusual_mailboxes() -> None:
    data = crlf(
        "From: =?utf-8?q?J=C3=B6rg?= <joerg@example.com>\n"
        'To: Friends: anne@example.com, "Ben (B)" <ben@example.com>;, carl@example.com\n'
        "Cc: undisclosed-recipients:;\n"
        'Bcc: <@relay.example,@r2.example:route@example.com>, "odd local"@example.com,\n'
        "  nodomain, Name Only <>, x@y (comment, dropped)\n"
        "\n"
    )
    env = analyze(data).envelope
    assert env[2] == [["=?utf-8?q?J=C3=B6rg?=", None, "joerg", "example.com"]]  # kept raw
    assert env[5] == [
        [None, None, "Friends", None],  # RFC 3501 §7.4.2 group start
        [None, None, "anne", "example.com"],
        ["Ben (B)", None, "ben", "example.com"],
        NIL4,  # group end
        [None, None, "carl", "example.com"],
    ]
    assert env[6] == [[None, None, "undisclosed-recipients", None], NIL4]
    assert env[7] == [
        [None, "@relay.example,@r2.example", "route", "example.com"],
        [None, None, '"odd local"', "example.com"],
        [None, None, "nodomain", "MISSING_DOMAIN"],
        ["Name Only", None, "MISSING_MAILBOX", "MISSING_DOMAIN"],
        [None, None, "x", "y"],
    ]


def test_display_name_spacing_and_quoted_pairs() -> None:
    data = crlf('From: John Q. Public <jqp@example.com>, "a \\"b\\" c" <q@example.com>\n\n')
    env = analyze(data).envelope
    assert env[2] == [
        ["John Q. Public", None, "jqp", "example.com"],
        ['a "b" c', None, "q", "example.com"],
    ]


def test_encoded_word_subject_is_kept_raw_but_decoded_for_search() -> None:
    data = crlf("Subject: =?ISO-8859-1?Q?Caf=E9?= =?UTF-8?B?w6lsw6k=?=\n and more\n\nx")
    assert analyze(data).envelope[1] == "=?ISO-8859-1?Q?Caf=E9?= =?UTF-8?B?w6lsw6k=?= and more"
    assert decoded_header(data, "subject") == ["Caféélé and more"]


def test_utf8_headers_are_kept_as_utf8_and_bad_octets_replaced() -> None:
    data = "From: Jörg <jörg@bücher.example>\r\nSubject: naïve ☃\r\n\r\n".encode()
    env = analyze(data).envelope
    assert env[1] == "naïve ☃"  # RFC 6532 §3, RFC 6855 §3: UTF-8 as it is
    assert env[2] == [["Jörg", None, "jörg", "bücher.example"]]
    bad = analyze(b"Subject: caf\xe9\r\n\r\n").envelope
    assert bad[1] == "caf\ufffd"
    assert Analysis.from_json(analyze(data).to_json()).envelope == env


def test_folded_header_values_are_unfolded() -> None:
    data = crlf("Subject: a long\n  subject line\nMessage-ID:\n <id@x>\n\n")
    env = analyze(data).envelope
    assert env[1] == "a long  subject line"  # RFC 5322 §2.2.3: only the CRLF goes
    assert env[9] == "<id@x>"


# --- sections (RFC 3501 §6.4.5) ----------------------------------------------------------


def _part(headers: str, body: bytes) -> bytes:
    return crlf(headers) + b"\r\n" + body


def _multipart(subtype: str, boundary: str, parts: list[bytes], headers: str = "") -> bytes:
    out = crlf(headers + f'Content-Type: multipart/{subtype}; boundary="{boundary}"\n') + b"\r\n"
    for p in parts:
        out += b"--" + boundary.encode() + b"\r\n" + p + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


def rfc3501_example() -> bytes:
    """The message of the RFC 3501 §6.4.5 example, with every part's body naming itself."""

    def text(name: str, subtype: str = "plain") -> bytes:
        return _part(f"Content-Type: text/{subtype}\n", f"body {name}\r\n".encode())

    gif = _part("Content-Type: image/gif\n", b"GIF89a body 4.1")
    octets = _part("Content-Type: application/octet-stream\n", b"octets")
    msg3 = _multipart("mixed", "b3", [text("3.1"), octets], "Subject: three\n")
    alt = _multipart("alternative", "b422", [text("4.2.2.1"), text("4.2.2.2", "richtext")])
    msg42 = _multipart("mixed", "b42", [text("4.2.1"), alt], "Subject: four-two\n")
    part4 = _multipart("mixed", "b4", [gif, _part("Content-Type: message/rfc822\n", msg42)])
    return _multipart(
        "mixed",
        "b0",
        [text("1"), octets, _part("Content-Type: message/rfc822\n", msg3), part4],
        "Subject: top\n",
    )


def test_rfc3501_section_example() -> None:
    data = rfc3501_example()
    a = analyze(data)
    assert list(a.parts) == [
        "", "1", "2", "3", "3.1", "3.2", "4", "4.1", "4.2", "4.2.1", "4.2.2", "4.2.2.1",
        "4.2.2.2",
    ]  # fmt: skip
    assert (
        fetch(data, "HEADER")
        == b'Subject: top\r\nContent-Type: multipart/mixed; boundary="b0"\r\n\r\n'
    )
    assert fetch(data, "1") == b"body 1\r\n"
    assert fetch(data, "2") == b"octets"
    assert fetch(data, "3.HEADER") == (
        b'Subject: three\r\nContent-Type: multipart/mixed; boundary="b3"\r\n\r\n'
    )
    assert (fetch(data, "3.TEXT") or b"").startswith(b"--b3\r\n")
    assert fetch(data, "3.1") == b"body 3.1\r\n"
    assert fetch(data, "3.2") == b"octets"
    assert (fetch(data, "4") or b"").startswith(b"--b4\r\n")
    assert (fetch(data, "4") or b"").endswith(b"--b4--\r\n")
    assert fetch(data, "4.1") == b"GIF89a body 4.1"
    assert fetch(data, "4.1.MIME") == b"Content-Type: image/gif\r\n\r\n"
    assert fetch(data, "4.2.HEADER") == (
        b'Subject: four-two\r\nContent-Type: multipart/mixed; boundary="b42"\r\n\r\n'
    )
    assert fetch(data, "4.2.1") == b"body 4.2.1\r\n"
    assert fetch(data, "4.2.2.1") == b"body 4.2.2.1\r\n"
    assert fetch(data, "4.2.2.2") == b"body 4.2.2.2\r\n"
    assert fetch(data, "4.2.2.2.MIME") == b"Content-Type: text/richtext\r\n\r\n"
    types = [(n[0], n[1]) for _, n in leaves(a.bodystructure)]
    assert types == [
        ("TEXT", "PLAIN"), ("APPLICATION", "OCTET-STREAM"), ("MESSAGE", "RFC822"),
        ("TEXT", "PLAIN"), ("APPLICATION", "OCTET-STREAM"), ("IMAGE", "GIF"),
        ("MESSAGE", "RFC822"), ("TEXT", "PLAIN"), ("TEXT", "PLAIN"), ("TEXT", "RICHTEXT"),
    ]  # fmt: skip
    assert_sizes_match(data)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("", SIMPLE),
        ("HEADER", SIMPLE[: SIMPLE.index(b"\r\n\r\n") + 4]),
        ("TEXT", SIMPLE[SIMPLE.index(b"\r\n\r\n") + 4 :]),
        ("header.fields (SUBJECT)", SIMPLE[: SIMPLE.index(b"\r\n\r\n") + 4]),
        ("1", SIMPLE[SIMPLE.index(b"\r\n\r\n") + 4 :]),
        # RFC 3501 §6.4.5: a non-multipart message has only a part 1, the body; its MIME
        # header is the message header.
        ("1.MIME", SIMPLE[: SIMPLE.index(b"\r\n\r\n") + 4]),
        ("2", None),
        ("1.1", None),
        ("1.HEADER", None),
        ("MIME", None),
        ("0", None),
        ("01", None),
        ("1.BOGUS", None),
        ("1.", None),
    ],
)
def test_section_forms_on_a_single_part_message(section: str, expected: bytes | None) -> None:
    assert fetch(SIMPLE, section) == expected


def test_top_level_message_rfc822_has_part_1_as_the_encapsulated_message() -> None:
    inner = crlf("Subject: inside\n\ninner text\n")
    data = crlf("Subject: outside\nContent-Type: message/rfc822\n\n") + inner
    a = analyze(data)
    assert a.parts["1"].is_message_rfc822
    assert fetch(data, "1") == inner
    assert fetch(data, "1.HEADER") == b"Subject: inside\r\n\r\n"
    assert fetch(data, "1.TEXT") == b"inner text\r\n"
    assert fetch(data, "1.1") == b"inner text\r\n"
    assert a.bodystructure[7] == [None, "inside", *[None] * 8]


def test_lf_only_message() -> None:
    data = (
        b"Subject: lf\nContent-Type: multipart/mixed; boundary=q\n\n"
        b"--q\nContent-Type: text/plain\n\nline one\nline two\n--q\n\nsecond\n--q--\n"
    )
    a = analyze(data)
    assert a.envelope[1] == "lf"
    assert fetch(data, "1") == b"line one\nline two"
    assert fetch(data, "2") == b"second"
    assert fetch(data, "HEADER") == b"Subject: lf\nContent-Type: multipart/mixed; boundary=q\n\n"
    assert_sizes_match(data)


def test_line_count_counts_a_last_line_without_line_break() -> None:
    assert analyze(b"\r\none\r\ntwo").bodystructure[7] == 2
    assert analyze(b"\r\none\r\ntwo\r\n").bodystructure[7] == 2
    assert analyze(b"\r\n").bodystructure[6:8] == [0, 0]


# --- broken and unusual MIME -------------------------------------------------------------


def test_multipart_without_boundary_is_text_plain() -> None:
    data = crlf("Content-Type: multipart/mixed\n\n--x\n\nhello\n--x--\n")
    a = analyze(data)
    assert a.bodystructure[:3] == ["TEXT", "PLAIN", US_ASCII]  # RFC 2045 §5.2
    assert fetch(data, "1") == data[data.index(b"\r\n\r\n") + 4 :]


def test_multipart_whose_delimiter_never_appears_is_text_plain() -> None:
    data = crlf("Content-Type: multipart/mixed; boundary=nope\n\njust text\n")
    assert analyze(data).bodystructure[:8] == [
        "TEXT", "PLAIN", US_ASCII, None, None, "7BIT", 11, 1
    ]  # fmt: skip


def test_missing_close_delimiter_ends_the_last_part_at_the_end() -> None:
    data = crlf("Content-Type: multipart/mixed; boundary=b\n\n--b\n\none\n--b\n\ntwo\n")
    assert fetch(data, "1") == b"one"
    assert fetch(data, "2") == b"two\r\n"
    assert_sizes_match(data)


def test_preamble_epilogue_and_empty_parts() -> None:
    data = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\npreamble\n--b\n--b\n\n\n--b--\nepilogue\n"
    )
    a = analyze(data)
    assert fetch(data, "1") == b""  # nothing between two delimiter lines
    assert fetch(data, "2") == b""  # a blank line only: no header, empty body
    assert fetch(data, "3") is None
    assert len(a.parts) == 3
    assert_sizes_match(data)


def test_delimiter_needs_the_whole_line() -> None:
    # "--abc-1" is not a delimiter for "abc" (RFC 2046 §5.1.1: only padding may follow),
    # so an inner boundary that extends the outer one still nests.
    inner = _multipart("alternative", "abc-1", [_part("", b"in 1"), _part("", b"in 2")])
    data = _multipart("mixed", "abc", [inner, _part("", b"--abcdef is text")])
    assert fetch(data, "1.1") == b"in 1"
    assert fetch(data, "1.2") == b"in 2"
    assert fetch(data, "2") == b"--abcdef is text"


def test_transport_padding_after_delimiter_is_allowed() -> None:
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b  \r\n\r\none\r\n--b--\t\r\n"
    assert fetch(data, "1") == b"one"


def test_no_header_body_separator_means_all_header() -> None:
    data = b"Subject: only a header\r\nFrom: a@b"
    a = analyze(data)
    assert a.envelope[1] == "only a header"
    assert a.envelope[2] == [[None, None, "a", "b"]]
    assert fetch(data, "HEADER") == data
    assert fetch(data, "TEXT") == b""
    assert a.bodystructure[6] == 0


def test_multipart_digest_parts_default_to_message_rfc822() -> None:
    data = _multipart(
        "digest",
        "d",
        [_part("", crlf("Subject: one\n\nfirst\n")), _part("Content-Type: text/plain\n", b"t")],
    )
    a = analyze(data)
    first, second = a.bodystructure[0], a.bodystructure[1]
    assert isinstance(first, list) and isinstance(second, list)
    assert first[:2] == ["MESSAGE", "RFC822"]  # RFC 2046 §5.1.5
    assert first[7] == [None, "one", *[None] * 8]
    assert second[:2] == ["TEXT", "PLAIN"]
    assert fetch(data, "1.TEXT") == b"first\r\n"


def test_encoded_message_rfc822_is_an_opaque_octet_stream() -> None:
    inner = base64.encodebytes(b"Subject: x\r\n\r\nhello\r\n")
    data = _multipart(
        "mixed",
        "b",
        [_part("Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n", inner)],
    )
    a = analyze(data)
    assert a.bodystructure[0] == [
        "APPLICATION", "OCTET-STREAM", None, None, None, "BASE64", len(inner), None, None, None,
        None,
    ]  # fmt: skip
    assert not a.parts["1"].is_message_rfc822
    assert fetch(data, "1.HEADER") is None


def test_message_global_is_an_encapsulated_message() -> None:
    data = _multipart(
        "mixed", "b", [_part("Content-Type: message/global\n", crlf("Subject: ü\n\nx"))]
    )
    node = analyze(data).bodystructure[0]
    assert isinstance(node, list)
    assert node[:2] == ["MESSAGE", "GLOBAL"]  # RFC 9051 §9 media-message
    assert node[7] == [None, "ü", *[None] * 8]


def test_content_type_parameters_comments_quotes_and_rfc2231() -> None:
    data = crlf(
        'Content-Type: Text/Plain (a comment) ; Charset="ISO-8859-1" ;\n'
        "  format=flowed; charset=ignored-duplicate;\n"
        "  title*0*=us-ascii'en'This%20is; title*1=\" more\"; junk\n"
        "Content-Transfer-Encoding: Quoted-Printable (why not)\n"
        "Content-Disposition: INLINE\n"
        "\nx"
    )
    node = analyze(data).bodystructure
    assert node[:3] == [
        "TEXT",
        "PLAIN",
        # Names upper-cased, values as written; RFC 2231 pieces passed through (documented).
        ["CHARSET", "ISO-8859-1", "FORMAT", "flowed", "TITLE*0*", "us-ascii'en'This%20is",
         "TITLE*1", " more"],
    ]  # fmt: skip
    assert node[5] == "QUOTED-PRINTABLE"
    assert node[9] == ["INLINE", None]


def test_invalid_content_type_falls_back_to_text_plain() -> None:
    for value in ("", "garbage", "/plain", "text/", ";charset=x"):
        data = f"Content-Type: {value}\r\n\r\nx".encode()
        assert analyze(data).bodystructure[:3] == ["TEXT", "PLAIN", US_ASCII], value


def test_depth_limit_makes_the_rest_opaque_and_keeps_values_encodable() -> None:
    depth = MAX_DEPTH + 10
    data = (
        b"".join(
            b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
            for i in range(depth)
        )
        + b"\r\nleaf\r\n"
    )
    a = analyze(data)
    deepest = max(a.parts, key=lambda s: s.count("."))
    assert deepest.count(".") == MAX_DEPTH - 1
    assert a.parts[deepest].end == len(data)

    def nesting(v: Value) -> int:
        return 1 + max((nesting(x) for x in v), default=0) if isinstance(v, list) else 0

    assert nesting(a.bodystructure) <= MAX_DEPTH + 5
    imap_encode(a.bodystructure)  # imap.responses refuses more than 64 levels
    imap_encode(a.envelope)


def test_nested_messages_beyond_the_depth_limit_are_text() -> None:
    data = b"Content-Type: message/rfc822\r\n\r\n" * (MAX_DEPTH + 5) + b"Subject: deep\r\n\r\nx"
    a = analyze(data)
    assert max(len(s.split(".")) for s in a.parts) <= MAX_DEPTH + 1
    assert_sizes_match(data)
    imap_encode(a.bodystructure)


def test_part_count_limit() -> None:
    parts = [_part("", b"p%d" % i) for i in range(MAX_PARTS + 50)]
    data = _multipart("mixed", "b", parts)
    a = analyze(data)
    assert len(a.parts) == MAX_PARTS + 1  # "" plus MAX_PARTS sections
    assert fetch(data, str(MAX_PARTS)) == b"p%d" % (MAX_PARTS - 1)
    assert fetch(data, str(MAX_PARTS + 1)) is None


def test_address_count_limit() -> None:
    data = b"To: " + b"a@b, " * (MAX_ADDRESSES + 10) + b"\r\n\r\n"
    to = analyze(data).envelope[5]
    assert isinstance(to, list) and len(to) == MAX_ADDRESSES


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n",
        b"\n\n\n",
        b":",
        b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b--",
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b",
        b"Content-Type: message/rfc822\r\n\r\n",
        b'To: "unterminated <a@b>, (open comment\r\n\r\n',
        b"Subject: =?utf-8?B?####?= =?x-bogus?Q?=FF?=\r\n\r\n",
        b"\xff\xfe\x00\r\n\r\n\x00",
    ],
)
def test_degenerate_inputs_give_a_consistent_analysis(data: bytes) -> None:
    a = analyze(data)
    assert Analysis.from_json(a.to_json()) == a
    assert a.parts[""] == PartSpan(0, a.parts[""].body_start, len(data))
    assert_sizes_match(data)
    imap_encode(a.bodystructure)


# --- JSON --------------------------------------------------------------------------------


def test_json_round_trip_and_columns() -> None:
    for data in (SIMPLE, ALTERNATIVE, MIXED, FORWARD, rfc3501_example()):
        a = analyze(data)
        assert Analysis.from_json(a.to_json()) == a
        assert Analysis.from_columns(a.envelope_json(), a.structure_json()) == a
        compact = json.dumps(json.loads(a.to_json()), separators=(",", ":"), ensure_ascii=False)
        assert a.to_json() == compact


def test_from_json_refuses_other_data() -> None:
    for text in ("[]", "{}", '{"v":2,"e":[],"s":[],"p":{}}', '{"v":1,"e":[],"s":[],"p":{"":[1]}}'):
        with pytest.raises(ValueError):
            Analysis.from_json(text)


# --- HEADER.FIELDS -----------------------------------------------------------------------

BLOCK = crlf(
    "Received: from a\n by b\n\tfor c\n"
    "Subject: one\n"
    "X-Folded: first\n second\n"
    "subject : obsolete form\n"
    "Not a field line\n"
    "To: t@x\n"
    "\n"
)


def test_header_fields_selects_whole_folded_fields_in_order() -> None:
    assert header_fields(BLOCK, ["SUBJECT", "x-folded"], exclude=False) == crlf(
        "Subject: one\nX-Folded: first\n second\nsubject : obsolete form\n\n"
    )


def test_header_fields_not_excludes() -> None:
    assert header_fields(BLOCK, ["subject", "X-FOLDED"], exclude=True) == crlf(
        "Received: from a\n by b\n\tfor c\nTo: t@x\n\n"
    )


def test_header_fields_without_match_is_the_blank_line() -> None:
    assert header_fields(BLOCK, ["Cc"], exclude=False) == b"\r\n"
    assert header_fields(b"", ["Cc"], exclude=True) == b"\r\n"


def test_header_fields_terminates_an_unterminated_last_field() -> None:
    assert header_fields(b"Subject: x", ["subject"], exclude=False) == b"Subject: x\r\n\r\n"


def test_header_fields_stops_at_the_blank_line() -> None:
    block = b"A: 1\r\n\r\nSubject: body\r\n"
    assert header_fields(block, ["subject"], exclude=False) == b"\r\n"


def test_header_fields_agrees_with_the_email_package() -> None:
    data = MIXED
    block = fetch(data, "HEADER") or b""
    got = header_fields(block, ["to", "subject"], exclude=False)
    parsed = email.message_from_bytes(got + b"body", policy=email.policy.compat32)
    original = email.message_from_bytes(data, policy=email.policy.compat32)
    assert parsed.items() == [(k, v) for k, v in original.items() if k.lower() in ("to", "subject")]


# --- SEARCH ------------------------------------------------------------------------------


def test_decoded_header_matches_the_email_package() -> None:
    values = [
        "=?utf-8?q?J=C3=B6rg_M=C3=BCller?= <j@x>",
        "=?utf-8?b?w6k=?= =?utf-8?b?w6k=?=",
        "plain =?iso-8859-1?q?caf=E9?= text",
        "=?koi8-r?b?8NLJ18XU?=",
    ]
    data = "".join(f"Subject: {v}\r\n" for v in values).encode() + b"\r\n"
    got = decoded_header(data, "SUBJECT")
    expected = [str(email.header.make_header(email.header.decode_header(v))) for v in values]
    assert got == expected
    assert got[0] == "Jörg Müller <j@x>"
    assert got[3] == "Привет"


def test_decoded_header_joins_a_character_split_across_words() -> None:
    # "é" is C3 A9 in UTF-8; each half is in its own encoded-word (RFC 2047 §5 forbids it,
    # senders do it anyway).
    data = b"Subject: =?utf-8?q?caf=C3?= =?utf-8?q?=A9?=\r\n\r\n"
    assert decoded_header(data, "subject") == ["café"]


def test_decoded_header_utf8_raw_and_broken_words() -> None:
    data = "Subject: déjà vu\r\nX: =?bogus-charset?q?ok?= =?utf-8?b?!!!?=\r\n\r\n".encode()
    assert decoded_header(data, "subject") == ["déjà vu"]
    assert decoded_header(data, "x") == ["ok"]
    assert decoded_header(data, "missing") == []


SEARCHABLE = _multipart(
    "mixed",
    "s",
    [
        _part(
            "Content-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: quoted-printable\n",
            b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln, a soft=\r\nbreak",
        ),
        _part(
            "Content-Type: text/html; charset=iso-8859-1\nContent-Transfer-Encoding: base64\n",
            base64.encodebytes("<p>Ça va très bien</p>".encode("latin-1")),
        ),
        _part("Content-Type: text/plain; charset=x-no-such-charset\n", "unknown ☃".encode()),
        _part("Content-Type: text/plain; charset=windows-1252\n", b"\x93quoted\x94"),
        _part(
            "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n",
            base64.encodebytes(b"secret attachment words"),
        ),
        _part(
            "Content-Type: message/rfc822\n", crlf("Subject: =?utf-8?q?inn=C3=A9r?=\n\ninside\n")
        ),
    ],
    "Subject: =?utf-8?q?t=C3=B6p?=\n",
)


def test_text_for_search_decodes_transfer_encodings_and_charsets() -> None:
    text = text_for_search(SEARCHABLE, headers=False, body=True)
    assert "Grüße aus Köln, a softbreak" in text
    assert "<p>Ça va très bien</p>" in text
    assert "unknown ☃" in text  # unknown charset: read as UTF-8
    assert "\u201cquoted\u201d" in text
    assert "secret attachment" not in text  # not text/*
    assert "Subject: innér" in text  # the encapsulated message's header is body text
    assert "inside" in text
    assert "töp" not in text


def test_text_for_search_uses_a_stored_analysis() -> None:
    stored = Analysis.from_json(analyze(SEARCHABLE).to_json())
    assert text_for_search(SEARCHABLE, headers=True, body=True, analysis=stored) == (
        text_for_search(SEARCHABLE, headers=True, body=True)
    )


def test_text_for_search_headers_only_and_limit() -> None:
    text = text_for_search(SEARCHABLE, headers=True, body=False)
    assert "Subject: töp" in text
    assert "Grüße" not in text
    assert len(text_for_search(SEARCHABLE, headers=True, body=True, limit=10)) == 10
    assert text_for_search(SEARCHABLE, headers=True, body=True, limit=0) == ""


def test_text_for_search_agrees_with_the_email_package() -> None:
    msg = email.message_from_bytes(SEARCHABLE, policy=email.policy.default)
    text = text_for_search(SEARCHABLE, headers=False, body=True)
    for part in msg.walk():
        if (
            part.get_content_maintype() == "text"
            and part.get_content_charset() != "x-no-such-charset"
        ):
            assert isinstance(part, email.message.EmailMessage)
            assert part.get_content().replace("\r\n", "\n").strip() in text.replace("\r\n", "\n")


# --- Date --------------------------------------------------------------------------------


def test_header_date() -> None:
    assert header_date(SIMPLE) == datetime(
        1994, 2, 7, 21, 52, 25, tzinfo=timezone(timedelta(hours=-8))
    )
    unknown_zone = header_date(b"Date: Tue, 1 Jan 2030 10:00:00 -0000\r\n\r\n")
    assert unknown_zone == datetime(2030, 1, 1, 10, tzinfo=UTC)
    assert header_date(b"Date: not a date\r\n\r\n") is None
    assert header_date(b"Subject: no date\r\n\r\n") is None
    assert header_date(b"Date: Tue, 1 Jan 99999 10:00:00 +0000\r\n\r\n") is None


# --- cross-check with the email package --------------------------------------------------


@pytest.mark.parametrize("data", [ALTERNATIVE, MIXED, FORWARD, rfc3501_example()])
def test_structure_agrees_with_the_email_package(data: bytes) -> None:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    theirs: list[tuple[str, bytes]] = []

    def walk(part: email.message.Message) -> None:
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            for sub in part.get_payload():
                assert isinstance(sub, email.message.Message)
                walk(sub)
        elif part.get_content_type() == "message/rfc822":
            theirs.append(("message/rfc822", b""))
            for sub in part.get_payload():
                assert isinstance(sub, email.message.Message)
                walk(sub)
        else:
            payload = part.get_payload()
            assert isinstance(payload, str)
            theirs.append((part.get_content_type(), payload.encode("utf-8", "surrogateescape")))

    walk(msg)
    ours = []
    for section, node in leaves(analyze(data).bodystructure):
        mtype = f"{node[0]}/{node[1]}".lower()
        ours.append((mtype, b"" if mtype == "message/rfc822" else fetch(data, section)))
    assert ours == theirs


def test_values_share_no_mutable_objects() -> None:
    a = analyze(SIMPLE)
    from_, sender = a.envelope[2], a.envelope[3]
    assert isinstance(from_, list) and isinstance(sender, list)
    assert from_ == sender and from_ is not sender and from_[0] is not sender[0]
    b = analyze(b"\r\nx")
    params = b.bodystructure[2]
    assert isinstance(params, list)
    params.append("MUTATED")
    assert analyze(b"\r\nx").bodystructure[2] == US_ASCII
