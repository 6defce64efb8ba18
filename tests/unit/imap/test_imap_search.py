"""IMAP SEARCH evaluation (RFC 3501 §6.4.4): a table of real messages × search keys.

Keys are written as a client sends them and parsed by the real grammar, so these tests
also pin the grammar → evaluator contract.
"""

from __future__ import annotations

import base64
from collections import Counter
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from postkeep.imap.grammar import Search as SearchCommand
from postkeep.imap.grammar import (
    SearchAnd,
    SearchFlag,
    SearchHeader,
    SearchKey,
    SearchNot,
    SearchOr,
    SearchText,
    parse_command,
)
from postkeep.imap.search import TEXT_LIMIT, Candidate, evaluate, fold


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def b64(text: str) -> str:
    raw = base64.b64encode(text.encode("utf-8")).decode()
    return "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))


# uid 10: plain ASCII, \Seen.
M10 = crlf(
    "From: Alice Example <alice@example.com>\n"
    "To: Bob <bob@example.net>\n"
    "Subject: Quarterly report\n"
    "Date: Mon, 1 Jan 2024 10:00:00 +0000\n"
    "Message-ID: <m10@example.com>\n"
    "\n"
    "The numbers are UP this quarter.\n"
)

# uid 20: RFC 2047 subject and From, quoted-printable UTF-8 body with a soft line break,
# sent late on 31 Dec 2023 at -0500 (already 1 Jan 2024 in UTC).
M20 = crlf(
    "From: =?ISO-8859-1?Q?Andr=E9_Dupont?= <andre@example.fr>\n"
    "To: bob@example.net\n"
    "Cc: Carol <carol@example.org>\n"
    "Subject: =?UTF-8?B?R3LDvMOfZQ==?= =?UTF-8?Q?_aus_K=C3=B6ln?=\n"
    "Date: Sun, 31 Dec 2023 23:30:00 -0500\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "Un caf=C3=A9 cr=C3=A8me, s'il vous pla=C3=AEt. This line is long enough to be br=\n"
    "oken by a soft line break.\n"
)

# uid 30: multipart/mixed (alternative text + html, then a base64 attachment); a Bcc; no
# Date field.
M30 = crlf(
    "From: dave@example.com\n"
    "To: erin@example.com\n"
    "Bcc: Dave Archive <archive@example.com>\n"
    "Subject: Meeting\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="outer"\n'
    "\n"
    "This is the preamble, not a text part.\n"
    "--outer\n"
    'Content-Type: multipart/alternative; boundary="inner"\n'
    "\n"
    "--inner\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: base64\n"
    "\n" + b64("Secret rendezvous at noon, by the fountain.") + "\n"
    "--inner\n"
    "Content-Type: text/html; charset=utf-8\n"
    "\n"
    "<p>Secret <b>rendezvous</b></p>\n"
    "--inner--\n"
    "--outer\n"
    "Content-Type: application/octet-stream\n"
    "Content-Transfer-Encoding: base64\n"
    'Content-Disposition: attachment; filename="blob.bin"\n'
    "\n" + b64("needle-in-attachment") + "\n"
    "--outer--\n"
)

# uid 45: no Subject, an unparsable Date, a large body.
M45 = crlf(
    "From: frank@example.com\n"
    "To: bob@example.net\n"
    "Date: not a date at all\n"
    "\n" + "hello world\n" + ("padding line of text\n" * 300)
)

# uid 50: an attached message (message/rfc822) and a header field for HEADER "".
M50 = crlf(
    "From: grace@example.com\n"
    "To: bob@example.net\n"
    "Subject: Fwd: something\n"
    "Date: Fri, 2 Feb 2024 08:00:00 +0100\n"
    "X-Spam-Flag: YES\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="b50"\n'
    "\n"
    "--b50\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Gesendet aus der Straße.\n"
    "--b50\n"
    "Content-Type: message/rfc822\n"
    "\n"
    "From: heidi@example.com\n"
    "Subject: Inner secret\n"
    "\n"
    "The inner body.\n"
    "--b50--\n"
)

MESSAGES = {10: M10, 20: M20, 30: M30, 45: M45, 50: M50}


def at(y: int, m: int, d: int, hh: int = 12, zone: timezone = UTC) -> datetime:
    return datetime(y, m, d, hh, 0, tzinfo=zone)


PLUS9 = timezone(timedelta(hours=9))
CANDIDATES = [
    Candidate(1, 10, frozenset({"\\Seen"}), at(2024, 1, 2), len(M10), 5, False),
    Candidate(2, 20, frozenset({"\\Flagged", "$Important"}), at(2024, 1, 3), len(M20), 10, True),
    # 01:00 at +0900 on 5 Jan is 4 Jan in UTC: the internal date's own zone decides.
    Candidate(3, 30, frozenset(), at(2024, 1, 5, 1, PLUS9), len(M30), 15, True),
    Candidate(4, 45, frozenset({"\\Deleted", "\\Answered"}), at(2024, 2, 1), len(M45), 20, False),
    Candidate(5, 50, frozenset({"\\Seen", "\\Draft"}), at(2024, 2, 2), len(M50), 25, False),
]
ALL = [10, 20, 30, 45, 50]


def key(text: str) -> SearchKey:
    cmd = parse_command([b"a SEARCH CHARSET UTF-8 " + text.encode("utf-8")])
    assert isinstance(cmd, SearchCommand)
    return cmd.key


class Loader:
    """``load`` for the tests: serves MESSAGES and counts calls per UID."""

    def __init__(self, messages: dict[int, bytes] = MESSAGES) -> None:
        self.messages = messages
        self.calls: Counter[int] = Counter()

    async def __call__(self, uid: int) -> bytes:
        self.calls[uid] += 1
        return self.messages[uid]


async def search(text: str, candidates: list[Candidate] = CANDIDATES) -> list[int]:
    return await evaluate(key(text), candidates, Loader())


def test_fixture_sizes_are_what_the_size_keys_assume() -> None:
    assert len(M45) > 4000
    assert all(len(m) < 4000 for uid, m in MESSAGES.items() if uid != 45)


TABLE: list[tuple[str, list[int]]] = [
    # -- metadata ------------------------------------------------------------------------
    ("ALL", ALL),
    ("SEEN", [10, 50]),
    ("UNSEEN", [20, 30, 45]),
    ("FLAGGED", [20]),
    ("DELETED", [45]),
    ("UNDELETED", [10, 20, 30, 50]),
    ("ANSWERED DELETED", [45]),
    ("DRAFT", [50]),
    ("UNDRAFT", [10, 20, 30, 45]),
    ("KEYWORD $Important", [20]),
    ("KEYWORD $important", []),  # keywords compare exactly, as the store keeps them
    ("UNKEYWORD $Important", [10, 30, 45, 50]),
    ("RECENT", [20, 30]),
    ("OLD", [10, 45, 50]),
    ("NEW", [20, 30]),  # RECENT UNSEEN
    ("LARGER 4000", [45]),
    ("SMALLER 4000", [10, 20, 30, 50]),
    (f"LARGER {len(M10)}", [30, 45, 50] if len(M20) <= len(M10) else [20, 30, 45, 50]),
    (f"SMALLER {len(M10)}", [uid for uid, m in MESSAGES.items() if len(m) < len(M10)]),
    ("BEFORE 3-Jan-2024", [10]),
    ("ON 3-Jan-2024", [20]),
    ("ON 5-Jan-2024", [30]),  # 5 Jan in its own zone (+0900), 4 Jan in UTC
    ("ON 4-Jan-2024", []),
    ("SINCE 5-Jan-2024", [30, 45, 50]),
    ("SINCE 1-Feb-2024 BEFORE 2-Feb-2024", [45]),
    ("MODSEQ 15", [30, 45, 50]),
    ('MODSEQ "/flags/\\\\draft" all 20', [45, 50]),
    # -- sequence numbers and UIDs ---------------------------------------------------------
    ("1", [10]),
    ("*", [50]),
    ("2:4", [20, 30, 45]),
    ("4:2", [20, 30, 45]),
    ("3:*", [30, 45, 50]),
    ("*:4", [45, 50]),
    ("10:*", [50]),  # 10:* is 5:10 here: the last message
    ("6:9", []),
    ("1,3,5", [10, 30, 50]),
    ("UID 20", [20]),
    ("UID *", [50]),
    ("UID 21:49", [30, 45]),
    ("UID 46:49", []),
    ("UID 100:*", [50]),  # RFC 3501 §6.4.8: names the last message though 50 < 100
    ("UID 1:5", []),
    ("UID 30:*,1", [30, 45, 50]),
    # -- header fields, decoded ------------------------------------------------------------
    ("SUBJECT report", [10]),
    ("SUBJECT REPORT", [10]),
    ('SUBJECT "grüße aus köln"', [20]),  # RFC 2047 words, adjacent ones joined
    ('SUBJECT "GRÜSSE"', [20]),  # casefold: ß is ss
    ('SUBJECT ""', [10, 20, 30, 50]),  # has a Subject field
    ("SUBJECT secret", []),  # the attached message's Subject is not the message's
    ("FROM alice", [10]),
    ("FROM alice@example.com", [10]),
    ('FROM "andré"', [20]),  # ISO-8859-1 encoded-word
    ('FROM "dupont <andre"', [20]),  # the decoded field text, address included
    ("TO bob@example.net", [10, 20, 45, 50]),
    ("CC carol", [20]),
    ("BCC archive", [30]),
    ('HEADER X-Spam-Flag ""', [50]),
    ("HEADER x-spam-flag yes", [50]),
    ("HEADER Message-ID m10@", [10]),
    ('HEADER X-Absent ""', []),
    # -- sent dates ------------------------------------------------------------------------
    ("SENTON 31-Dec-2023", [20]),  # the Date field's own zone, not UTC
    ("SENTON 1-Jan-2024", [10]),
    ("SENTBEFORE 1-Jan-2024", [20]),
    ("SENTSINCE 1-Jan-2024", [10, 50]),
    ("SENTSINCE 1-Jan-1970", [10, 20, 50]),  # no or bad Date: never a SENT* match
    ("NOT SENTSINCE 1-Jan-1970", [30, 45]),
    # -- body and text ---------------------------------------------------------------------
    ("BODY numbers", [10]),
    ("BODY up", [10]),
    ('BODY "café crème"', [20]),  # quoted-printable, UTF-8
    ('BODY "CAFÉ"', [20]),
    ('BODY "broken by a soft"', [20]),  # QP soft line break removed
    ("BODY rendezvous", [30]),  # base64 text/plain, and the text/html part
    ('BODY "by the fountain"', [30]),
    ("BODY needle-in-attachment", []),  # application/octet-stream is not text
    ("BODY preamble", []),
    ('BODY "STRASSE"', [50]),
    ('BODY "inner secret"', [50]),  # the header of an attached message is body text
    ('BODY "inner body"', [50]),
    ("BODY quarterly", []),  # BODY is not the header
    ("TEXT quarterly", [10]),
    ("TEXT rendezvous", [30]),
    ('TEXT "köln"', [20]),
    ("TEXT hello", [45]),
    ('BODY ""', ALL),
    ('TEXT ""', ALL),
    ("TEXT nowhere-to-be-found", []),
    # -- combinations ----------------------------------------------------------------------
    ("SEEN SUBJECT report", [10]),
    ("UNSEEN SUBJECT report", []),
    ("OR SEEN FLAGGED", [10, 20, 50]),
    ("OR FLAGGED BODY numbers", [10, 20]),
    ("NOT SEEN", [20, 30, 45]),
    ("NOT BODY rendezvous", [10, 20, 45, 50]),
    ("NOT NOT SEEN", [10, 50]),
    ("OR (SEEN DRAFT) (FLAGGED RECENT)", [20, 50]),
    ("OR OR DELETED NEW SUBJECT report", [10, 20, 30, 45]),
    ("NOT OR SEEN OR FLAGGED DELETED", [30]),
    ("(SINCE 1-Jan-2024 (TO bob NOT SEEN))", [20, 45]),
    ("OR SUBJECT report OR BODY rendezvous TEXT hello", [10, 30, 45]),
    ("UID 1:30 NOT SUBJECT meeting", [10, 20]),
    ("2:* OR SENTON 31-Dec-2023 BODY STRASSE", [20, 50]),
    ("NOT 1:* ", []),
]


@pytest.mark.parametrize(("text", "expected"), TABLE, ids=[t for t, _ in TABLE])
async def test_search_table(text: str, expected: list[int]) -> None:
    assert await search(text.strip()) == expected


async def test_results_follow_candidate_order_not_key_order() -> None:
    assert await search("OR UID 50 UID 10") == [10, 50]
    assert await search("OR BODY STRASSE SUBJECT report") == [10, 50]


async def test_empty_mailbox_matches_nothing_even_with_star() -> None:
    loader = Loader()
    for text in ("ALL", "*", "UID *", "UID 1:*", "SUBJECT x", "NOT SEEN"):
        assert await evaluate(key(text), [], loader) == []
    assert not loader.calls


async def test_star_is_the_last_message_even_when_uids_are_sparse() -> None:
    one = [Candidate(1, 4000, frozenset(), at(2024, 1, 1), 10, 1, False)]
    assert await evaluate(key("UID *"), one, Loader()) == [4000]
    assert await evaluate(key("UID 5000:*"), one, Loader()) == [4000]
    assert await evaluate(key("UID 1:3999"), one, Loader()) == []
    assert await evaluate(key("*"), one, Loader()) == [4000]
    assert await evaluate(key("2:*"), one, Loader()) == [4000]  # 2:* is 1:2 here


# -- loading -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "ALL",
        "SEEN",
        "NOT FLAGGED",
        "OR DELETED NEW",
        "LARGER 100 SMALLER 100000",
        "SINCE 1-Jan-2024 BEFORE 1-Jan-2025",
        "1:* UID 1:* MODSEQ 1",
        'BODY ""',
        'TEXT "" SEEN',
        "NOT (RECENT KEYWORD $Important)",
    ],
)
async def test_metadata_keys_never_load(text: str) -> None:
    loader = Loader()
    await evaluate(key(text), CANDIDATES, loader)
    assert not loader.calls


@pytest.mark.parametrize(
    "text",
    [
        "SUBJECT report",
        "OR SUBJECT report BODY rendezvous",
        "TEXT hello BODY hello FROM frank SENTSINCE 1-Jan-2000 HEADER Date x",
        "NOT OR (TEXT a BODY b) (OR SUBJECT c NOT TO d)",
        "OR SENTON 1-Jan-2024 OR CC carol OR BCC x OR TEXT y BODY z",
    ],
)
async def test_each_message_is_loaded_at_most_once(text: str) -> None:
    loader = Loader()
    await evaluate(key(text), CANDIDATES, loader)
    assert set(loader.calls) <= set(MESSAGES)
    assert max(loader.calls.values()) == 1


async def test_cheaper_keys_decide_before_loading() -> None:
    loader = Loader()
    assert await evaluate(key("SUBJECT report SEEN"), CANDIDATES, loader) == [10]
    assert set(loader.calls) == {10, 50}  # only the \Seen messages are read

    loader = Loader()
    assert await evaluate(key("OR BODY numbers FLAGGED"), CANDIDATES, loader) == [10, 20]
    assert set(loader.calls) == {10, 30, 45, 50}  # the \Flagged one is decided without it

    loader = Loader()
    assert await evaluate(key("UID 45 TEXT hello"), CANDIDATES, loader) == [45]
    assert set(loader.calls) == {45}

    loader = Loader()
    assert await evaluate(key("NOT (DELETED BODY x)"), CANDIDATES, loader) == [10, 20, 30, 50]
    assert set(loader.calls) == {45}


async def test_load_errors_propagate() -> None:
    async def broken(uid: int) -> bytes:
        raise LookupError(uid)

    with pytest.raises(LookupError):
        await evaluate(key("SUBJECT x"), CANDIDATES, broken)


# -- details -------------------------------------------------------------------------------
async def test_system_flags_compare_case_insensitively_on_both_sides() -> None:
    odd = [Candidate(1, 7, frozenset({"\\SEEN", "\\flagged"}), at(2024, 1, 1), 1, 1, False)]
    assert await evaluate(SearchFlag("\\Seen", True), odd, Loader()) == [7]
    assert await evaluate(SearchFlag("\\FLAGGED", True), odd, Loader()) == [7]
    assert await evaluate(SearchFlag("\\Draft", True), odd, Loader()) == []
    assert await evaluate(SearchFlag("\\seen", False), odd, Loader()) == []


async def test_recent_as_a_flag_is_the_session_property() -> None:
    assert await evaluate(SearchFlag("\\Recent", True), CANDIDATES, Loader()) == [20, 30]


async def test_charset_us_ascii_is_accepted_and_others_are_refused() -> None:
    got = await evaluate(key("SUBJECT report"), CANDIDATES, Loader(), charset="us-ascii")
    assert got == [10]
    with pytest.raises(ValueError, match="charset"):
        await evaluate(key("ALL"), CANDIDATES, Loader(), charset="ISO-8859-1")


async def test_key_trees_built_by_hand() -> None:
    tree = SearchOr(
        SearchAnd((SearchHeader("subject", "REPORT"), SearchNot(SearchFlag("\\Deleted", True)))),
        SearchText("Inner Secret"),
    )
    assert await evaluate(tree, CANDIDATES, Loader()) == [10, 50]
    assert await evaluate(SearchAnd(()), CANDIDATES, Loader()) == ALL


async def test_internal_date_without_zone_uses_its_own_date() -> None:
    naive = [Candidate(1, 1, frozenset(), datetime(2024, 3, 1, 23, 59), 1, 1, False)]
    assert await evaluate(key("ON 1-Mar-2024"), naive, Loader()) == [1]


def test_fold_is_unicode_case_folding_after_nfc() -> None:
    assert fold("Straße") == "strasse"
    assert fold("ABC") == "abc"
    assert fold("Cafe\u0301") == fold("Café")  # decomposed and composed forms agree
    assert "e" not in fold("é")  # no diacritic stripping


async def test_header_spanning_encoded_words_in_other_charsets() -> None:
    data = crlf(
        "Subject: =?iso-2022-jp?B?GyRCRnxLXDhsGyhC?= and =?KOI8-R?B?8NLJ18XU?=\n"
        "From: x@example.com\n\nbody\n"
    )
    one = [Candidate(1, 1, frozenset(), at(2024, 1, 1), len(data), 1, False)]
    loader = Loader({1: data})
    assert await evaluate(key('SUBJECT "日本語"'), one, loader) == [1]
    assert await evaluate(key('SUBJECT "привет"'), one, loader) == [1]


async def test_large_body_search_is_linear_and_bounded() -> None:
    # A pathological haystack for naive substring search: "aaa…a" and a needle "a…ab".
    body = "a" * 2_000_000
    data = crlf("Subject: big\n\n") + body.encode() + b"\r\n"
    one = [Candidate(1, 1, frozenset(), at(2024, 1, 1), len(data), 1, False)]
    needle = "a" * 5000 + "b"
    loader = Loader({1: data})
    tree = SearchOr(SearchText(needle), SearchText(needle[:-1] + "c"))
    assert await evaluate(tree, one, loader) == []
    assert await evaluate(SearchText("a" * 5000), one, loader) == [1]
    assert TEXT_LIMIT >= 1_000_000


async def test_text_beyond_the_limit_is_not_searched(monkeypatch: pytest.MonkeyPatch) -> None:
    import postkeep.imap.search as search_module

    monkeypatch.setattr(search_module, "TEXT_LIMIT", 100)
    data = crlf("Subject: s\n\n" + "x" * 500 + " tail-marker\n")
    one = [Candidate(1, 1, frozenset(), at(2024, 1, 1), len(data), 1, False)]
    assert await evaluate(key("BODY tail-marker"), one, Loader({1: data})) == []
    assert await evaluate(key("BODY xxx"), one, Loader({1: data})) == [1]


async def test_dates_compare_as_dates() -> None:
    assert date(2024, 1, 2) == CANDIDATES[0].internal_date.date()
    assert await search("ON 2-Jan-2024") == [10]
    assert await search("BEFORE 2-Jan-2024") == []
    assert await search("SINCE 2-Jan-2024") == ALL
