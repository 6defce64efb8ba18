"""FETCH of every item, byte-exact against the bytes that were delivered.

The test message is built from named pieces, so the expected bytes of every section
(``BODY[1.1]``, ``BODY[2.HEADER]``, ``BODY[3.MIME]``, partials…) are known by
construction, independently of the server's MIME code. Structure:

    multipart/mixed
      1   multipart/alternative
      1.1   text/plain (quoted-printable)
      1.2   text/html
      2   message/rfc822
      2.1   (its body: text/plain)
      3   application/octet-stream (base64, attachment)
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator

import pytest
from imapclient import IMAPClient
from server_harness import Instance
from test_imap import ALICE, BOB, HOST, Wire, client_993, code_of, wire_993

CRLF = b"\r\n"

TOP_HEADER = (
    b'From: "Alice Example" <alice@example.test>\r\n'
    b"To: Bob <bob@example.test>, carol@example.test\r\n"
    b"Cc: =?UTF-8?Q?J=C3=B6rg?= <joerg@example.test>\r\n"
    b"Subject: Quarterly report\r\n"
    b"Date: Tue, 05 Mar 2024 10:00:00 +0100\r\n"
    b"Message-ID: <report-1@example.test>\r\n"
    b"In-Reply-To: <earlier@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"\r\n"
)
P11_MIME = (
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
)
P11_BODY = b"Plain body =C3=A9\r\nsecond line"
P12_MIME = b"Content-Type: text/html; charset=utf-8\r\n\r\n"
P12_BODY = b"<p>HTML body</p>"
P1_MIME = b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
P1_BODY = (
    b"--alt\r\n" + P11_MIME + P11_BODY + b"\r\n--alt\r\n" + P12_MIME + P12_BODY + b"\r\n--alt--"
)
INNER_HEADER = b"From: inner@example.test\r\nSubject: inner message\r\n\r\n"
INNER_TEXT = b"Inner body line"
P2_MIME = b"Content-Type: message/rfc822\r\n\r\n"
P2_BODY = INNER_HEADER + INNER_TEXT
P3_MIME = (
    b'Content-Type: application/octet-stream; name="data.bin"\r\n'
    b'Content-Disposition: attachment; filename="data.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
)
P3_BODY = b"AAECAwQFBgc="
TOP_TEXT = (
    b"This is a preamble.\r\n"
    b"--outer\r\n" + P1_MIME + P1_BODY + b"\r\n"
    b"--outer\r\n" + P2_MIME + P2_BODY + b"\r\n"
    b"--outer\r\n" + P3_MIME + P3_BODY + b"\r\n"
    b"--outer--\r\nepilogue\r\n"
)
MESSAGE = TOP_HEADER + TOP_TEXT


@pytest.fixture
def w(server: Instance, tls_ctx: ssl.SSLContext) -> Iterator[Wire]:
    wire = wire_993(server, tls_ctx)
    wire.send(f"ap APPEND INBOX {{{len(MESSAGE)}+}}\r\n".encode() + MESSAGE + CRLF)
    assert wire.until("ap")[-1].startswith(b"ap OK [APPENDUID ")
    assert wire.cmd("s", "SELECT INBOX")[-1].startswith(b"s OK")
    yield wire
    wire.close()


@pytest.fixture
def c(server: Instance, tls_ctx: ssl.SSLContext) -> Iterator[IMAPClient]:
    client = client_993(server, tls_ctx)
    client.append("INBOX", MESSAGE)
    client.select_folder("INBOX")
    yield client
    client.logout()


def fetch_one(c: IMAPClient, item: str) -> bytes:
    """The value of one body item of message 1 (imapclient names it like the server)."""
    [(_, data)] = c.fetch("1", [item]).items()
    key = item.replace(".PEEK", "").encode()
    if b"<" in key:
        key = key[: key.index(b".", key.index(b"<"))] + b">"
    value = data[key]
    assert isinstance(value, bytes), (item, value)
    return value


SECTIONS = {
    "BODY.PEEK[]": MESSAGE,
    "BODY.PEEK[HEADER]": TOP_HEADER,
    "BODY.PEEK[TEXT]": TOP_TEXT,
    "BODY.PEEK[1]": P1_BODY,
    "BODY.PEEK[1.MIME]": P1_MIME,
    "BODY.PEEK[1.1]": P11_BODY,
    "BODY.PEEK[1.1.MIME]": P11_MIME,
    "BODY.PEEK[1.2]": P12_BODY,
    "BODY.PEEK[1.2.MIME]": P12_MIME,
    "BODY.PEEK[2]": P2_BODY,
    "BODY.PEEK[2.MIME]": P2_MIME,
    "BODY.PEEK[2.HEADER]": INNER_HEADER,
    "BODY.PEEK[2.TEXT]": INNER_TEXT,
    "BODY.PEEK[2.1]": INNER_TEXT,
    "BODY.PEEK[3]": P3_BODY,
    "BODY.PEEK[3.MIME]": P3_MIME,
    "BODY.PEEK[]<0.10>": MESSAGE[:10],
    "BODY.PEEK[TEXT]<5.20>": TOP_TEXT[5:25],
    "BODY.PEEK[1.1]<6.1000>": P11_BODY[6:],
    "BODY.PEEK[3]<100000.5>": b"",
}


@pytest.mark.parametrize("item", SECTIONS)
def test_body_sections_are_byte_exact(c: IMAPClient, item: str) -> None:
    assert fetch_one(c, item) == SECTIONS[item]


def test_rfc822_items(c: IMAPClient) -> None:
    [(_, data)] = c.fetch("1", ["RFC822.HEADER", "RFC822.SIZE", "FLAGS"]).items()
    assert data[b"RFC822.HEADER"] == TOP_HEADER and data[b"RFC822.SIZE"] == len(MESSAGE)
    assert data[b"FLAGS"] == ()  # RFC822.HEADER is a PEEK
    [(_, data)] = c.fetch("1", ["RFC822.TEXT"]).items()
    assert data[b"RFC822.TEXT"] == TOP_TEXT and b"\\Seen" in data[b"FLAGS"]
    [(_, data)] = c.fetch("1", ["RFC822"]).items()
    assert data[b"RFC822"] == MESSAGE


def test_header_fields_and_not(w: Wire) -> None:
    [line, _] = w.cmd("a", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT from X-None)])")
    expected = b'From: "Alice Example" <alice@example.test>\r\nSubject: Quarterly report\r\n\r\n'
    assert line == (  # the field names echoed as the client spelled them
        b"* 1 FETCH (BODY[HEADER.FIELDS (SUBJECT from X-None)] {%d}\r\n" % len(expected)
        + expected + b")\r\n"
    )
    [line, _] = w.cmd("b", "FETCH 1 (BODY.PEEK[HEADER.FIELDS.NOT (Content-Type MIME-Version Cc "
                           "To Date Message-ID In-Reply-To)])")
    assert line.endswith(expected + b")\r\n")
    [line, _] = w.cmd("c", "FETCH 1 (BODY.PEEK[2.HEADER.FIELDS (SUBJECT)]<0.8>)")
    # Printable data may go as a quoted string (RFC 3501 §4.3); a client reads both.
    assert line == b'* 1 FETCH (BODY[2.HEADER.FIELDS (SUBJECT)]<0> "Subject:")\r\n'


def test_envelope_from_stored_analysis(c: IMAPClient) -> None:
    [(_, data)] = c.fetch("1", ["ENVELOPE"]).items()
    env = data[b"ENVELOPE"]
    assert env.subject == b"Quarterly report"
    assert env.message_id == b"<report-1@example.test>"
    assert env.in_reply_to == b"<earlier@example.test>"
    [sender] = env.from_
    assert (sender.name, sender.mailbox) == (b"Alice Example", b"alice")
    assert sender.host == b"example.test"
    assert [(a.mailbox, a.host) for a in env.to] == [
        (b"bob", b"example.test"),
        (b"carol", b"example.test"),
    ]
    assert env.cc[0].name == b"=?UTF-8?Q?J=C3=B6rg?="  # raw: the client decodes RFC 2047
    assert env.sender == env.from_ and env.reply_to == env.from_  # RFC 3501 §7.4.2 defaults
    assert env.date is not None


def test_envelope_address_lists_are_adjacent(w: Wire) -> None:
    [line, _] = w.cmd("a", "FETCH 1 (ENVELOPE)")
    # RFC 3501 §9 env-to = "(" 1*address ")": no space between the two addresses.
    assert b'(("Bob" NIL "bob" "example.test")(NIL NIL "carol" "example.test"))' in line


def test_bodystructure_and_body(w: Wire) -> None:
    [line, _] = w.cmd("a", "FETCH 1 (BODYSTRUCTURE)")
    assert line.startswith(b'* 1 FETCH (BODYSTRUCTURE ((("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL '
                           b'NIL "QUOTED-PRINTABLE" %d 2 ' % len(P11_BODY))
    assert b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" %d 1' % len(P12_BODY) in line
    assert b'"ALTERNATIVE" ("BOUNDARY" "alt")' in line
    assert b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" %d (' % len(P2_BODY) in line
    assert b'"inner message"' in line  # the encapsulated ENVELOPE
    assert b'("APPLICATION" "OCTET-STREAM" ("NAME" "data.bin") NIL NIL "BASE64" %d ' % len(
        P3_BODY
    ) in line
    assert b'("ATTACHMENT" ("FILENAME" "data.bin"))' in line
    assert b'"MIXED" ("BOUNDARY" "outer")' in line
    # RFC 3501 §9 body-type-mpart = 1*body SP media-subtype: parts stand side by side.
    assert b')("TEXT" "HTML"' in line and b')("MESSAGE" "RFC822"' in line
    [line, _] = w.cmd("b", "FETCH 1 (BODY)")
    assert line.startswith(b'* 1 FETCH (BODY ((("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL '
                           b'"QUOTED-PRINTABLE" %d 2)' % len(P11_BODY))
    assert b"BOUNDARY" not in line  # BODY has no extension data


def test_fast_all_full_macros_and_uid_modseq(w: Wire) -> None:
    [line, _] = w.cmd("a", "FETCH 1 FAST")
    assert line.startswith(b"* 1 FETCH (FLAGS () INTERNALDATE \"")
    assert line.endswith(b" RFC822.SIZE %d)\r\n" % len(MESSAGE))
    [line, _] = w.cmd("b", "FETCH 1 ALL")
    assert b" ENVELOPE (" in line
    [line, _] = w.cmd("c", "FETCH 1 FULL")
    assert b" BODY ((" in line
    [line, _] = w.cmd("d", "UID FETCH 1 (MODSEQ)")
    assert line.startswith(b"* 1 FETCH (UID 1 MODSEQ (")


def test_non_peek_sets_seen_and_reports_flags(w: Wire) -> None:
    [line, _] = w.cmd("a", "FETCH 1 (BODY.PEEK[1.2])")
    assert b"FLAGS" not in line
    assert w.cmd("b", "FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS ())\r\n"
    [line, _] = w.cmd("c", "FETCH 1 (BODY[1.2])")
    assert line == (
        b"* 1 FETCH (BODY[1.2] {%d}\r\n" % len(P12_BODY) + P12_BODY + b" FLAGS (\\Seen))\r\n"
    )
    assert w.cmd("d", "FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS (\\Seen))\r\n"


def test_missing_section_is_nil(w: Wire) -> None:
    [line, _] = w.cmd("a", "FETCH 1 (BODY.PEEK[9.1] BODY.PEEK[1.1.HEADER])")
    assert line == b"* 1 FETCH (BODY[9.1] NIL BODY[1.1.HEADER] NIL)\r\n"


def test_large_message_streams_byte_exact(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    big = (
        b"From: a@example.test\r\nSubject: big\r\n\r\n"
        + b"".join(b"line %07d " % i + b"x" * 60 + b"\r\n" for i in range(50_000))
    )
    c = client_993(server, tls_ctx)
    c.append("INBOX", big)
    c.select_folder("INBOX")
    assert fetch_one(c, "BODY.PEEK[]") == big
    assert fetch_one(c, "BODY.PEEK[]<3000000.100>") == big[3000000:3000100]
    c.logout()


def test_smtp_delivered_message_fetched_byte_exact(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    with smtplib.SMTP(HOST, server.ports["smtp"], timeout=10) as s:
        s.sendmail("carol@remote.test", [BOB], MESSAGE)
    [(row, stored)] = server.inbox(BOB)
    assert stored.endswith(MESSAGE)  # SMTP prepends Received:, nothing else
    c = client_993(server, tls_ctx, user=BOB)
    c.select_folder("INBOX")
    assert fetch_one(c, "BODY.PEEK[]") == stored
    assert fetch_one(c, "BODY.PEEK[TEXT]") == TOP_TEXT
    assert fetch_one(c, "BODY.PEEK[1.1]") == P11_BODY
    assert fetch_one(c, "BODY.PEEK[2.TEXT]") == INNER_TEXT
    assert c.search("ALL") == [row.uid]  # imapclient speaks UID SEARCH / UID FETCH
    [(_, data)] = c.fetch([row.uid], ["RFC822.SIZE"]).items()
    assert data[b"RFC822.SIZE"] == len(stored) == row.size
    c.logout()


def test_fetch_after_appenduid(w: Wire) -> None:
    data = b"Subject: two\r\n\r\nsecond\r\n"
    w.send(f"ap APPEND INBOX {{{len(data)}+}}\r\n".encode() + data + CRLF)
    lines = w.until("ap")
    uid = int(code_of(lines[-1], b"APPENDUID").split()[1])
    assert b"* 2 EXISTS\r\n" in lines
    [line, _] = w.cmd("f", f"UID FETCH {uid} (BODY.PEEK[TEXT])")
    assert line == f"* 2 FETCH (UID {uid} BODY[TEXT] {{8}}\r\n".encode() + b"second\r\n)\r\n"
    assert ALICE  # the owner of the mailbox
