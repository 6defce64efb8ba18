"""IMAP response encoding: atoms vs quoted vs literals, codes, mUTF-7, dates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from postkeep.imap import responses as r
from postkeep.imap.responses import (
    Atom,
    BlobSlice,
    Code,
    CodeName,
    Condition,
    MailboxName,
    Raw,
    decode_mailbox,
    encode,
    encode_mailbox,
    encode_value,
    format_datetime,
)


def value(v: r.Value) -> bytes:
    parts = encode_value(v)
    assert all(isinstance(p, bytes) for p in parts)
    return b"".join(p for p in parts if isinstance(p, bytes))


# -- values -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("v", "wire"),
    [
        (None, b"NIL"),
        (0, b"0"),
        (4294967295, b"4294967295"),
        ("hello world", b'"hello world"'),
        ("", b'""'),
        ('say "hi" \\ bye', b'"say \\"hi\\" \\\\ bye"'),
        (b"plain", b'"plain"'),
        ("two\r\nlines", b"{10}\r\ntwo\r\nlines"),
        ("nul\x00", b"{4}\r\nnul\x00"),
        ("tab\there", b"{8}\r\ntab\there"),
        ("Grüße", b"{7}\r\nGr\xc3\xbc\xc3\x9fe"),
        (b"\xff\xfe", b"{2}\r\n\xff\xfe"),
        (Atom("\\Seen"), b"\\Seen"),
        (Atom("$Junk"), b"$Junk"),
        (Atom("\\*"), b"\\*"),
        (Raw("BODY[HEADER.FIELDS (FROM)]<0>"), b"BODY[HEADER.FIELDS (FROM)]<0>"),
        ([Atom("\\Seen"), Atom("\\Answered")], b"(\\Seen \\Answered)"),
        ((), b"()"),
        ([1, [None, "x"], []], b'(1 (NIL "x") ())'),
        (MailboxName("INBOX"), b"INBOX"),
        (MailboxName("Entwürfe"), b"Entw&APw-rfe"),
        (MailboxName("Sent Items"), b'"Sent Items"'),
        (MailboxName("a%b"), b'"a%b"'),
        (MailboxName("NIL"), b'"NIL"'),
    ],
)
def test_values_encode_by_type(v: r.Value, wire: bytes) -> None:
    assert value(v) == wire


def test_strings_that_could_inject_lines_always_become_literals() -> None:
    for evil in ("a\rb", "a\nb", 'x" OK [ALERT] y\r\n* BYE', "\x00", "\x1b[31m", "\x7f"):
        assert value(evil).startswith(b"{")


def test_invalid_atoms_and_raw_text_are_refused() -> None:
    for bad in ("", "two words", "a(b", 'q"', "x\r\n", "é", "\\"):
        with pytest.raises(ValueError):
            Atom(bad)
    for bad in ("", "x\r\ny", "é"):
        with pytest.raises(ValueError):
            Raw(bad)
    with pytest.raises(ValueError):
        value(-1)
    with pytest.raises(TypeError):
        value(True)
    with pytest.raises(TypeError):
        value(1.5)  # type: ignore[arg-type]


def test_blob_slices_are_framed_not_read() -> None:
    blob = BlobSlice(object(), 10, 500)
    parts = encode(r.fetch(4, [("UID", 9), ("BODY[]", blob), ("FLAGS", [])]))
    assert parts == [b"* 4 FETCH (UID 9 BODY[] {500}\r\n", blob, b" FLAGS ())\r\n"]
    with pytest.raises(ValueError):
        BlobSlice(object(), -1, 5)


# -- responses ----------------------------------------------------------------------------
def test_status_responses() -> None:
    assert r.encode_bytes(r.tagged("a1", Condition.OK, "LOGIN completed")) == (
        b"a1 OK LOGIN completed\r\n"
    )
    code = Code(CodeName.APPENDUID, "38505 3955")
    assert r.encode_bytes(r.tagged("a2", Condition.OK, "APPEND completed", code)) == (
        b"a2 OK [APPENDUID 38505 3955] APPEND completed\r\n"
    )
    assert r.encode_bytes(r.untagged_status(Condition.OK, "x", Code(CodeName.READ_WRITE))) == (
        b"* OK [READ-WRITE] x\r\n"
    )
    assert r.encode_bytes(r.bye("Server shutting down")) == b"* BYE Server shutting down\r\n"
    assert r.bye("x").closes and not r.tagged("a", Condition.NO, "x").closes
    assert r.encode_bytes(r.capability(["IMAP4rev1", "IDLE"])) == b"* CAPABILITY IMAP4rev1 IDLE\r\n"
    assert r.encode_bytes(r.continuation("idling")) == b"+ idling\r\n"
    assert r.encode_bytes(r.auth_challenge(b"hi")) == b"+ aGk=\r\n"
    assert r.encode_bytes(r.untagged(7, Atom("EXPUNGE"))) == b"* 7 EXPUNGE\r\n"


@pytest.mark.parametrize(
    "build",
    [
        lambda: r.tagged("a", Condition.OK, "two\r\n* lines"),
        lambda: r.tagged("a", Condition.OK, ""),
        lambda: r.tagged("a", Condition.OK, "[ALERT] fake code"),
        lambda: r.tagged("a", Condition.OK, "non-ascii é"),
        lambda: r.tagged("a b", Condition.OK, "tag with space"),
        lambda: r.tagged("+", Condition.OK, "plus tag"),
        lambda: r.tagged("a", Condition.BYE, "tagged BYE"),
        lambda: Code("BAD CODE"),
        lambda: Code(CodeName.ALERT, "close]bracket"),
        lambda: r.untagged(),
        lambda: r.continuation("x\ny"),
    ],
)
def test_nothing_can_inject_a_second_line(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


def test_encode_bytes_refuses_blobs() -> None:
    with pytest.raises(ValueError):
        r.encode_bytes(r.untagged(BlobSlice(1, 0, 1)))


# -- modified UTF-7 (RFC 3501 §5.1.3) ------------------------------------------------------
MUTF7 = [
    ("INBOX", "INBOX"),
    ("☺!", "&Jjo-!"),
    ("Entwürfe", "Entw&APw-rfe"),
    ("A&B", "A&-B"),
    ("&", "&-"),
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
    ("Gelöschte Elemente", "Gel&APY-schte Elemente"),
    ("Корзина", "&BBoEPgRABDcEOAQ9BDA-"),
    ("tab\there", "tab&AAk-here"),
    ("😀", "&2D3eAA-"),
]


@pytest.mark.parametrize(("text", "wire"), MUTF7)
def test_modified_utf7_known_vectors(text: str, wire: str) -> None:
    assert encode_mailbox(text) == wire
    assert decode_mailbox(wire) == text


@pytest.mark.parametrize(
    "wire",
    [
        "&Jjo",  # unterminated
        "&Jjo!-",  # not modified BASE64
        "&Jj/-",  # "/" is "," in modified BASE64
        "&AGE-",  # encodes "a", which must stand for itself
        "&Jjp-",  # non-zero padding bits
        "&AA-",  # not whole UTF-16 units
        "&2D0-",  # lone surrogate
        "&A-",  # impossible BASE64 length
        "caf\xe9",  # 8-bit
        "a\tb",  # control character outside a shift
    ],
)
def test_modified_utf7_rejects_malformed_names(wire: str) -> None:
    with pytest.raises(ValueError):
        decode_mailbox(wire)


def test_modified_utf7_rejects_lone_surrogates_when_encoding() -> None:
    with pytest.raises(ValueError):
        encode_mailbox("\ud800")


# -- dates --------------------------------------------------------------------------------
def test_internaldate_format() -> None:
    tz = timezone(-timedelta(hours=7))
    assert format_datetime(datetime(1996, 7, 7, 2, 44, 25, tzinfo=tz)) == (
        " 7-Jul-1996 02:44:25 -0700"
    )
    ist = timezone(timedelta(hours=5, minutes=30))
    assert format_datetime(datetime(2024, 12, 31, 23, 59, 59, tzinfo=ist)) == (
        "31-Dec-2024 23:59:59 +0530"
    )
    assert value(format_datetime(datetime(2024, 1, 2, tzinfo=UTC))) == (
        b'" 2-Jan-2024 00:00:00 +0000"'
    )
    with pytest.raises(ValueError):
        format_datetime(datetime(2024, 1, 1))
