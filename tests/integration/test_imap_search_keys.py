"""UID SEARCH over the wire (imaplib) on messages whose text is not where it looks.

RFC 2047 encoded words, folded fields, a header longer than the first read of a header
section, multipart bodies with an attached message and a binary attachment, 8-bit and
quoted-printable bodies in other charsets, and AND/OR/NOT trees mixing flags, header
keys and body keys. On SQLite, and on PostgreSQL when one can be started.
"""

from __future__ import annotations

import imaplib
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from server_harness import PASSWORDS, Instance
from test_imap import ALICE, HOST

ENCODED = (
    b"From: =?ISO-8859-1?Q?Andr=E9_Dupont?= <andre@example.fr>\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: =?UTF-8?B?R3LDvMOfZQ==?=\r\n =?UTF-8?Q?_aus_K=C3=B6ln?=\r\n"
    b"Date: Tue, 05 Mar 2024 10:00:00 +0100\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"Un caf=E9 cr=E8me, s'il vous pla=EEt, et un croiss=\r\nant.\r\n"
)
FOLDED = (
    b"From: carol@example.test\r\n"
    b"To: first@example.org,\r\n\tsecond@example.org,\r\n third@example.org\r\n"
    b"Cc: team@example.org\r\n"
    b"Subject: a subject that is long enough that it is\r\n folded onto a second line\r\n"
    b"X-Tracking: ticket-4711\r\n"
    b"Date: Wed, 06 Mar 2024 10:00:00 +0000\r\n\r\n"
    b"Nothing special here. Subject: decoy-in-body\r\n"
)
MULTIPART = (
    b"From: dave@example.test\r\n"
    b"Bcc: archive@example.test\r\n"
    b"Subject: Meeting\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
    b"preamble-word\r\n"
    b"--outer\r\n"
    b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
    b"--alt\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    b"VGhlIGFnZW5kYSBpcyBzdHJlbmdlci4=\r\n"  # "The agenda is strenger."
    b"--alt\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    b"<p>html-only-word</p>\r\n"
    b"--alt--\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n\r\n"
    b"Subject: inner topic\r\n\r\n"
    b"inner text\r\n"
    b"--outer\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    b"c2VjcmV0d29yZA==\r\n"  # "secretword": not text, not searched
    b"--outer--\r\n"
)
KOI8 = (
    b"From: ivan@example.test\r\n"
    b"Subject: plain\r\n"
    b"Content-Type: text/plain; charset=koi8-r\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "Привет, мир".encode("koi8-r") + b"\r\n"
)
# The header section is longer than the first read of it (search.HEADER_PROBE).
LONG_HEADER = (
    b"From: eve@example.test\r\n"
    b"Subject: long header\r\n"
    + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 200) for i in range(100))
    + b"X-Late: late-marker\r\n\r\n"
    b"short body\r\n"
)
#: UID -> (message, flags); appended in this order to a fresh INBOX.
MESSAGES: dict[int, tuple[bytes, str]] = {
    1: (ENCODED, "(\\Seen)"),
    2: (FOLDED, "()"),
    3: (MULTIPART, "(\\Flagged)"),
    4: (KOI8, "(\\Seen)"),
    5: (LONG_HEADER, "()"),
}


@pytest.fixture(params=["sqlite", "postgresql"])
def mailbox(
    request: pytest.FixtureRequest,
    make_instance: Callable[..., Instance],
    tls_ctx: ssl.SSLContext,
) -> Iterator[imaplib.IMAP4_SSL]:
    if request.param == "postgresql":
        pg: Any = request.getfixturevalue("pg")
        dsn = pg.new_database()
        server = make_instance(extra=f'\n[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\n')
    else:
        server = make_instance()
    m = imaplib.IMAP4_SSL(HOST, server.ports["imaps"], ssl_context=tls_ctx, timeout=15)
    m.login(ALICE, PASSWORDS[ALICE])
    for data, flags in MESSAGES.values():
        typ, _ = m.append("INBOX", flags, None, data)
        assert typ == "OK"
    typ, _ = m.select("INBOX")
    assert typ == "OK"
    yield m
    m.logout()


def uids(m: imaplib.IMAP4_SSL, criteria: str, utf8: str | None = None) -> list[int]:
    """``UID SEARCH``; ``utf8`` is sent as a UTF-8 literal after ``criteria``."""
    if utf8 is not None:
        m.literal = utf8.encode("utf-8")  # type: ignore[attr-defined]
        typ, data = m.uid("SEARCH", "CHARSET", "UTF-8", criteria)
    else:
        typ, data = m.uid("SEARCH", criteria)
    assert typ == "OK", data
    return [int(x) for x in data[0].split()]


def test_encoded_words_are_decoded_and_case_folded(mailbox: imaplib.IMAP4_SSL) -> None:
    # B and Q words folded onto two lines, the white space between them dropped; ß ~ ss.
    assert uids(mailbox, "SUBJECT", "GRÜSSE AUS KÖLN") == [1]
    assert uids(mailbox, "SUBJECT", "grüße aus") == [1]
    assert uids(mailbox, "FROM", "andré dupont") == [1]
    assert uids(mailbox, "SUBJECT R3LDvMOfZQ") == []  # not the raw encoded text
    assert uids(mailbox, "FROM andre@example.fr") == [1]


def test_folded_fields_are_unfolded(mailbox: imaplib.IMAP4_SSL) -> None:
    assert uids(mailbox, 'SUBJECT "it is folded onto"') == [2]
    assert uids(mailbox, "TO second@example.org") == [2]
    assert uids(mailbox, "TO third@example.org") == [2]
    assert uids(mailbox, "CC team@") == [2]
    assert uids(mailbox, "HEADER X-Tracking TICKET-4711") == [2]
    assert uids(mailbox, "SUBJECT decoy-in-body") == []
    assert uids(mailbox, "TEXT decoy-in-body") == [2]
    assert uids(mailbox, "BODY decoy-in-body") == [2]


def test_a_field_beyond_the_first_read_of_a_long_header(mailbox: imaplib.IMAP4_SSL) -> None:
    assert uids(mailbox, "HEADER X-Late late-marker") == [5]
    assert uids(mailbox, 'HEADER X-Late ""') == [5]
    assert uids(mailbox, "HEADER X-Filler-99 fff") == [5]
    assert uids(mailbox, "BODY late-marker") == []
    assert uids(mailbox, "TEXT late-marker") == [5]


def test_multipart_bodies(mailbox: imaplib.IMAP4_SSL) -> None:
    assert uids(mailbox, "BODY strenger") == [3]  # base64 text/plain
    assert uids(mailbox, "BODY html-only-word") == [3]  # text/html is text too
    assert uids(mailbox, 'BODY "inner topic"') == [3]  # the attached message's header
    assert uids(mailbox, "SUBJECT inner") == []  # not the message's own Subject
    assert uids(mailbox, "BODY secretword") == []  # an attachment is not text
    assert uids(mailbox, "BODY preamble-word") == []  # nor is the preamble
    assert uids(mailbox, "BCC archive@example.test") == [3]


def test_bodies_in_other_charsets(mailbox: imaplib.IMAP4_SSL) -> None:
    assert uids(mailbox, "BODY", "ПРИВЕТ") == [4]  # KOI8-R, 8bit
    assert uids(mailbox, "TEXT", "мир") == [4]
    assert uids(mailbox, "BODY", "café crème") == [1]  # ISO-8859-1, quoted-printable
    assert uids(mailbox, "BODY croissant") == [1]  # across a soft line break
    assert uids(mailbox, "BODY", "cafe") == []  # no accent folding


def test_and_or_not(mailbox: imaplib.IMAP4_SSL) -> None:
    assert uids(mailbox, "SEEN BODY", "привет") == [4]
    assert uids(mailbox, "UNSEEN BODY", "привет") == []
    assert uids(mailbox, "OR SUBJECT meeting BODY", "привет") == [3, 4]
    assert uids(mailbox, "OR FLAGGED HEADER X-Late late-marker") == [3, 5]
    assert uids(mailbox, "NOT SUBJECT", "köln") == [2, 3, 4, 5]
    assert uids(mailbox, "NOT (OR SEEN BODY strenger)") == [2, 5]
    assert uids(mailbox, "SUBJECT meeting NOT BODY secretword") == [3]
    assert uids(mailbox, "SUBJECT meeting NOT BODY strenger") == []
    assert uids(mailbox, "OR (SEEN SUBJECT plain) (UNSEEN TO second)") == [2, 4]
    assert uids(mailbox, "UID 2:* NOT FROM", "andré") == [2, 3, 4, 5]
    assert uids(mailbox, "SENTON 5-Mar-2024 OR BODY croissant TEXT nothing") == [1]
    assert uids(mailbox, "NOT SENTON 5-Mar-2024 NOT SENTON 6-Mar-2024") == [3, 4, 5]
    assert uids(mailbox, 'OR OR SUBJECT long TO first BODY "inner topic"') == [2, 3, 5]
