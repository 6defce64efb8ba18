"""The IMAP command grammar: every command parses into the expected dataclass."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from postkeep.imap.grammar import (
    Append,
    AppendHead,
    Authenticate,
    BodySection,
    Capability,
    Check,
    Close,
    Command,
    Copy,
    Create,
    DateField,
    DateOp,
    Delete,
    Enable,
    Examine,
    Expunge,
    Fetch,
    FetchAtt,
    Id,
    Idle,
    List,
    Login,
    Logout,
    Lsub,
    Move,
    Namespace,
    Noop,
    ParseError,
    Rename,
    Search,
    SearchAll,
    SearchAnd,
    SearchBody,
    SearchDate,
    SearchFlag,
    SearchHeader,
    SearchModSeq,
    SearchNot,
    SearchOr,
    SearchRecent,
    SearchSeq,
    SearchSize,
    SearchText,
    SearchUid,
    Section,
    SectionText,
    Select,
    StartTls,
    Status,
    StatusItem,
    Store,
    StoreMode,
    Subscribe,
    Unselect,
    Unsubscribe,
    parse_append_head,
    parse_command,
    peek_command,
)
from postkeep.imap.responses import CodeName, Condition
from postkeep.imap.seqset import SequenceSet

S = SequenceSet.parse
F = FetchAtt


def parse(line: bytes, *literals: bytes, **kw: int) -> Command:
    """``line`` uses ``{}`` where each literal goes: b'a LOGIN {} {}'."""
    fragments = line.split(b"{}")
    assert len(fragments) == len(literals) + 1
    return parse_command(fragments, list(literals), **kw)


def bad(line: bytes, *literals: bytes, **kw: int) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse(line, *literals, **kw)
    return info.value


# -- every command ------------------------------------------------------------------------
CASES: list[tuple[bytes, Command]] = [
    (b"a CAPABILITY", Capability("a")),
    (b"a noop", Noop("a")),
    (b"a LOGOUT", Logout("a")),
    (b"a STARTTLS", StartTls("a")),
    (b"a AUTHENTICATE PLAIN", Authenticate("a", "PLAIN")),
    (b"a AUTHENTICATE plain AGJvYgBwdw==", Authenticate("a", "PLAIN", b"\x00bob\x00pw")),
    (b"a AUTHENTICATE PLAIN =", Authenticate("a", "PLAIN", b"")),
    (b"a LOGIN bob secret", Login("a", "bob", "secret")),
    (b'a LOGIN "bob smith" "p\\"w\\\\"', Login("a", "bob smith", 'p"w\\')),
    (b"a SELECT inbox", Select("a", "INBOX")),
    (b"a SELECT Archive (CONDSTORE)", Select("a", "Archive", condstore=True)),
    (b'a EXAMINE "Entw&APw-rfe"', Examine("a", "Entwürfe")),
    (b"a CREATE Work", Create("a", "Work")),
    (b"a CREATE Sent (USE (\\Sent))", Create("a", "Sent", ("\\Sent",))),
    (b"a CREATE Bin (USE (\\trash \\Junk))", Create("a", "Bin", ("\\Trash", "\\Junk"))),
    (b"a DELETE Work", Delete("a", "Work")),
    (b"a RENAME Work Play", Rename("a", "Work", "Play")),
    (b"a SUBSCRIBE Work", Subscribe("a", "Work")),
    (b"a UNSUBSCRIBE Work", Unsubscribe("a", "Work")),
    (b'a LIST "" *', List("a", "", ("*",))),
    (b'a LIST "" "%"', List("a", "", ("%",))),
    (b"a LIST Work/ &Jjo-%", List("a", "Work/", ("☺%",))),
    (
        b'a LIST (SUBSCRIBED RECURSIVEMATCH) "" ("INBOX" Work*) RETURN (CHILDREN)',
        List(
            "a",
            "",
            ("INBOX", "Work*"),
            frozenset({"SUBSCRIBED", "RECURSIVEMATCH"}),
            frozenset({"CHILDREN"}),
            (),
            True,
        ),
    ),
    (
        b'a LIST "" % RETURN (SPECIAL-USE STATUS (MESSAGES UNSEEN))',
        List(
            "a",
            "",
            ("%",),
            frozenset(),
            frozenset({"SPECIAL-USE", "STATUS"}),
            (StatusItem.MESSAGES, StatusItem.UNSEEN),
            True,
        ),
    ),
    (
        b'a LIST (SPECIAL-USE) "" *',
        List("a", "", ("*",), frozenset({"SPECIAL-USE"}), extended=True),
    ),
    (b'a LSUB "" *', Lsub("a", "", "*")),
    (
        b"a STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ SIZE)",
        Status("a", "INBOX", tuple(StatusItem)),
    ),
    (b"a CHECK", Check("a")),
    (b"a CLOSE", Close("a")),
    (b"a UNSELECT", Unselect("a")),
    (b"a EXPUNGE", Expunge("a")),
    (b"a UID EXPUNGE 3:5,7", Expunge("a", S("3:5,7"))),
    (b"a IDLE", Idle("a")),
    (b"a NAMESPACE", Namespace("a")),
    (b"a ID NIL", Id("a", None)),
    (
        b'a ID ("name" "Thunderbird" "version" NIL)',
        Id("a", (("name", "Thunderbird"), ("version", None))),
    ),
    (b"a ID ()", Id("a", ())),
    (b"a ENABLE CONDSTORE utf8=accept", Enable("a", ("CONDSTORE", "UTF8=ACCEPT"))),
    (b"a COPY 1:3 Trash", Copy("a", False, S("1:3"), "Trash")),
    (b"a UID COPY 4,9:* Trash", Copy("a", True, S("4,9:*"), "Trash")),
    (b"a MOVE 2 Archive", Move("a", False, S("2"), "Archive")),
    (b"a UID MOVE 100:200 Archive", Move("a", True, S("100:200"), "Archive")),
    (
        b"a STORE 1 +FLAGS (\\seen $Junk)",
        Store("a", False, S("1"), StoreMode.ADD, False, ("\\Seen", "$Junk")),
    ),
    (
        b"a UID STORE 1:* -FLAGS.SILENT \\Deleted \\Flagged",
        Store("a", True, S("1:*"), StoreMode.REMOVE, True, ("\\Deleted", "\\Flagged")),
    ),
    (b"a STORE 5 FLAGS ()", Store("a", False, S("5"), StoreMode.REPLACE, False, ())),
    (
        b"a STORE 5 (UNCHANGEDSINCE 320162338) FLAGS.SILENT (\\Answered)",
        Store("a", False, S("5"), StoreMode.REPLACE, True, ("\\Answered",), 320162338),
    ),
    (
        b"a FETCH 1 ALL",
        Fetch("a", False, S("1"), (F.FLAGS, F.INTERNALDATE, F.RFC822_SIZE, F.ENVELOPE)),
    ),
    (b"a FETCH 1 fast", Fetch("a", False, S("1"), (F.FLAGS, F.INTERNALDATE, F.RFC822_SIZE))),
    (
        b"a FETCH 1 FULL",
        Fetch("a", False, S("1"), (F.FLAGS, F.INTERNALDATE, F.RFC822_SIZE, F.ENVELOPE, F.BODY)),
    ),
    (b"a FETCH 2:4 FLAGS", Fetch("a", False, S("2:4"), (F.FLAGS,))),
    (
        b"a FETCH * (UID INTERNALDATE RFC822.SIZE RFC822 RFC822.HEADER RFC822.TEXT ENVELOPE"
        b" BODY BODYSTRUCTURE MODSEQ)",
        Fetch(
            "a",
            False,
            S("*"),
            (
                F.UID,
                F.INTERNALDATE,
                F.RFC822_SIZE,
                F.RFC822,
                F.RFC822_HEADER,
                F.RFC822_TEXT,
                F.ENVELOPE,
                F.BODY,
                F.BODYSTRUCTURE,
                F.MODSEQ,
            ),
        ),
    ),
    (b"a UID FETCH 1:* FLAGS", Fetch("a", True, S("1:*"), (F.UID, F.FLAGS))),
    (
        b"a FETCH 1 (FLAGS) (CHANGEDSINCE 12345)",
        Fetch("a", False, S("1"), (F.FLAGS, F.MODSEQ), changed_since=12345),
    ),
    (b"a FETCH 1 BODY[]", Fetch("a", False, S("1"), (BodySection(Section()),))),
    (
        b"a FETCH 1 BODY.PEEK[1.2.3]<0.1024>",
        Fetch("a", False, S("1"), (BodySection(Section((1, 2, 3)), True, (0, 1024)),)),
    ),
    (
        b"a FETCH 1 (BODY[HEADER] BODY[TEXT] BODY[2.MIME] BODY[2.HEADER] BODY[3.TEXT])",
        Fetch(
            "a",
            False,
            S("1"),
            (
                BodySection(Section((), SectionText.HEADER)),
                BodySection(Section((), SectionText.TEXT)),
                BodySection(Section((2,), SectionText.MIME)),
                BodySection(Section((2,), SectionText.HEADER)),
                BodySection(Section((3,), SectionText.TEXT)),
            ),
        ),
    ),
    (
        b'a FETCH 1 (BODY.PEEK[HEADER.FIELDS (From To "X-Odd")]'
        b" BODY[1.HEADER.FIELDS.NOT (Received)])",
        Fetch(
            "a",
            False,
            S("1"),
            (
                BodySection(Section((), SectionText.HEADER_FIELDS, ("From", "To", "X-Odd")), True),
                BodySection(Section((1,), SectionText.HEADER_FIELDS_NOT, ("Received",))),
            ),
        ),
    ),
]


@pytest.mark.parametrize(("line", "expected"), CASES, ids=[c[0][:40].decode() for c in CASES])
def test_every_command_parses_into_its_dataclass(line: bytes, expected: Command) -> None:
    assert parse(line) == expected


def test_uid_commands_have_uid_names_for_the_state_table() -> None:
    assert parse(b"a UID FETCH 1 FLAGS").name == "UID FETCH"
    assert parse(b"a FETCH 1 FLAGS").name == "FETCH"
    assert parse(b"a UID EXPUNGE 1").name == "UID EXPUNGE"
    assert parse(b"a EXAMINE x").name == "EXAMINE"
    assert isinstance(parse(b"a EXAMINE x"), Select)  # Examine is a read-only Select
    assert parse(b"a EXAMINE x").readonly and not parse(b"a SELECT x").readonly  # type: ignore[attr-defined]


def test_literals_fill_any_string_position() -> None:
    assert parse(b"a LOGIN {} {}", b"bob", b"p w\r\n") == Login("a", "bob", "p w\r\n")
    assert parse(b"a SELECT {}", b"Entw&APw-rfe") == Select("a", "Entwürfe")
    assert parse(b"a SEARCH CHARSET UTF-8 SUBJECT {}", "grüße".encode()) == Search(
        "a", False, "UTF-8", SearchHeader("Subject", "grüße")
    )


def test_login_password_is_not_in_repr() -> None:
    cmd = parse(b"a LOGIN bob hunter2")
    assert "hunter2" not in repr(cmd)
    auth = parse(b"a AUTHENTICATE PLAIN AGJvYgBodW50ZXIy")
    assert "hunter2" not in repr(auth) and "AGJv" not in repr(auth)


def test_quoted_strings_accept_utf8_per_rfc9051() -> None:
    assert parse('a LOGIN "jörg" "pässword"'.encode()) == Login("a", "jörg", "pässword")
    assert "UTF-8" in bad(b'a LOGIN "\xff" x').reason


# -- APPEND -------------------------------------------------------------------------------
def test_append_head_before_the_message_literal() -> None:
    head = parse_append_head([b'a APPEND Sent (\\Seen \\Draft) " 7-Jul-1996 02:44:25 -0700" '])
    tz = timezone(-timedelta(hours=7))
    assert head == AppendHead(
        "a", "Sent", ("\\Seen", "\\Draft"), datetime(1996, 7, 7, 2, 44, 25, tzinfo=tz)
    )
    assert parse_append_head([b"a APPEND INBOX "]) == AppendHead("a", "INBOX", (), None)
    assert parse_append_head([b'a APPEND INBOX "17-Jul-1996 02:44:25 +0000" ']) is not None


def test_append_mailbox_literal_is_told_apart_from_the_message_literal() -> None:
    assert parse_append_head([b"a APPEND "]) is None  # the pending literal is the mailbox
    assert parse_append_head([b"a APPEND ", b" (\\Seen) "], [b"Drafts"]) == AppendHead(
        "a", "Drafts", ("\\Seen",), None
    )


@pytest.mark.parametrize(
    ("fragment", "reason"),
    [
        (b"a APPEND INBOX (\\Recent) ", "\\Recent cannot be set"),
        (b'a APPEND INBOX "32-Jan-2020 00:00:00 +0000" ', "out of range"),
        (b'a APPEND INBOX "1-Foo-2020 00:00:00 +0000" ', "Invalid date-time"),
        (b"a APPEND INBOX (\\Seen", "')' to end the flag list"),
        (b"a APPEND INBOX junk ", "Unexpected"),
    ],
)
def test_append_head_errors_name_the_problem(fragment: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_append_head([fragment])
    assert reason in info.value.reason
    assert info.value.tag == "a"


def test_append_without_a_literal_is_bad() -> None:
    assert "literal" in bad(b"a APPEND INBOX (\\Seen)").reason
    assert isinstance(Append, type)


# -- SEARCH -------------------------------------------------------------------------------
SEARCHES: list[tuple[bytes, object]] = [
    (b"ALL", SearchAll()),
    (b"ANSWERED", SearchFlag("\\Answered", True)),
    (b"UNANSWERED", SearchFlag("\\Answered", False)),
    (b"DELETED", SearchFlag("\\Deleted", True)),
    (b"UNDELETED", SearchFlag("\\Deleted", False)),
    (b"DRAFT", SearchFlag("\\Draft", True)),
    (b"UNDRAFT", SearchFlag("\\Draft", False)),
    (b"FLAGGED", SearchFlag("\\Flagged", True)),
    (b"UNFLAGGED", SearchFlag("\\Flagged", False)),
    (b"SEEN", SearchFlag("\\Seen", True)),
    (b"UNSEEN", SearchFlag("\\Seen", False)),
    (b"KEYWORD $Junk", SearchFlag("$Junk", True)),
    (b"UNKEYWORD $Junk", SearchFlag("$Junk", False)),
    (b"NEW", SearchAnd((SearchRecent(True), SearchFlag("\\Seen", False)))),
    (b"OLD", SearchRecent(False)),
    (b"RECENT", SearchRecent(True)),
    (b"BCC x", SearchHeader("Bcc", "x")),
    (b"CC x", SearchHeader("Cc", "x")),
    (b'FROM "bob smith"', SearchHeader("From", "bob smith")),
    (b"SUBJECT hi", SearchHeader("Subject", "hi")),
    (b"TO x", SearchHeader("To", "x")),
    (b"HEADER X-Spam yes", SearchHeader("X-Spam", "yes")),
    (b'HEADER Message-ID ""', SearchHeader("Message-ID", "")),
    (b"BODY word", SearchBody("word")),
    (b"TEXT word", SearchText("word")),
    (b"BEFORE 1-Feb-2024", SearchDate(DateField.INTERNAL, DateOp.BEFORE, date(2024, 2, 1))),
    (b'ON "29-feb-2024"', SearchDate(DateField.INTERNAL, DateOp.ON, date(2024, 2, 29))),
    (b"SINCE 01-Jan-2000", SearchDate(DateField.INTERNAL, DateOp.SINCE, date(2000, 1, 1))),
    (b"SENTBEFORE 1-Feb-2024", SearchDate(DateField.SENT, DateOp.BEFORE, date(2024, 2, 1))),
    (b"SENTON 1-Feb-2024", SearchDate(DateField.SENT, DateOp.ON, date(2024, 2, 1))),
    (b"SENTSINCE 1-Feb-2024", SearchDate(DateField.SENT, DateOp.SINCE, date(2024, 2, 1))),
    (b"LARGER 1000", SearchSize(True, 1000)),
    (b"SMALLER 10", SearchSize(False, 10)),
    (b"NOT SEEN", SearchNot(SearchFlag("\\Seen", True))),
    (
        b"OR SEEN FLAGGED",
        SearchOr(SearchFlag("\\Seen", True), SearchFlag("\\Flagged", True)),
    ),
    (b"UID 1:100", SearchUid(S("1:100"))),
    (b"1:5,7", SearchSeq(S("1:5,7"))),
    (b"*", SearchSeq(S("*"))),
    (
        b"(SEEN FLAGGED)",
        SearchAnd((SearchFlag("\\Seen", True), SearchFlag("\\Flagged", True))),
    ),
    (b"MODSEQ 620162338", SearchModSeq(620162338)),
    (b'MODSEQ "/flags/\\\\draft" all 620162338', SearchModSeq(620162338, "/flags/\\draft", "all")),
    (
        b"OR (FROM a TO b) NOT (1:3 UNSEEN)",
        SearchOr(
            SearchAnd((SearchHeader("From", "a"), SearchHeader("To", "b"))),
            SearchNot(SearchAnd((SearchSeq(S("1:3")), SearchFlag("\\Seen", False)))),
        ),
    ),
]


@pytest.mark.parametrize(("keys", "tree"), SEARCHES, ids=[s[0].decode() for s in SEARCHES])
def test_search_keys_parse_into_a_tree(keys: bytes, tree: object) -> None:
    assert parse(b"a SEARCH " + keys) == Search("a", False, None, tree)  # type: ignore[arg-type]


def test_several_search_keys_are_anded() -> None:
    cmd = parse(b"a UID SEARCH CHARSET us-ascii UNSEEN SINCE 1-Jan-2024")
    assert cmd == Search(
        "a",
        True,
        "US-ASCII",
        SearchAnd(
            (
                SearchFlag("\\Seen", False),
                SearchDate(DateField.INTERNAL, DateOp.SINCE, date(2024, 1, 1)),
            )
        ),
    )


def test_esearch_return_options() -> None:
    cmd = parse(b"a SEARCH RETURN (MIN MAX COUNT) ALL")
    assert isinstance(cmd, Search) and cmd.returns == frozenset({"MIN", "MAX", "COUNT"})
    cmd = parse(b"a UID SEARCH RETURN () CHARSET UTF-8 ALL")
    assert isinstance(cmd, Search) and cmd.returns == frozenset({"ALL"})  # RFC 4731 §3.1
    assert "SAVE" in bad(b"a SEARCH RETURN (SAVE) ALL").reason
    assert "Unknown SEARCH return option" in bad(b"a SEARCH RETURN (PARTIAL) ALL").reason


def test_unknown_charset_is_no_badcharset() -> None:
    err = bad(b"a SEARCH CHARSET KOI8-R SUBJECT x")
    assert err.condition is Condition.NO
    assert err.code is not None and err.code.name == CodeName.BADCHARSET
    assert err.code.data == "(UTF-8 US-ASCII)"


def test_us_ascii_charset_refuses_8bit_strings() -> None:
    assert "US-ASCII" in bad(b"a SEARCH CHARSET US-ASCII SUBJECT {}", "é".encode()).reason


def test_search_nesting_is_limited() -> None:
    deep = b"(" * 40 + b"SEEN" + b")" * 40
    assert "nested too deeply" in bad(b"a SEARCH " + deep).reason
    nots = b"NOT " * 40 + b"SEEN"
    assert "nested too deeply" in bad(b"a SEARCH " + nots).reason
    ok = b"(" * 31 + b"SEEN" + b")" * 31
    assert isinstance(parse(b"a SEARCH " + ok), Search)
    assert "nested too deeply" in bad(b"a SEARCH " + ok, max_depth=10).reason


def test_pathological_nesting_does_not_recurse_unboundedly() -> None:
    err = bad(b"a SEARCH " + b"OR " * 100_000 + b"ALL ALL")
    assert "nested too deeply" in err.reason


# -- errors -------------------------------------------------------------------------------
ERRORS: list[tuple[bytes, str]] = [
    (b"a FROB", "Unknown command FROB"),
    (b"a UID FROB 1", "Unknown command UID FROB"),
    (b"a CAPABILITY now", "after CAPABILITY"),
    (b"a LOGIN bob", "Expected a space after the user name"),
    (b"a LOGIN bob pw extra", "Unexpected"),
    (b'a LOGIN "bob pw', "quoted string"),
    (b"a SELECT", "Expected a space after SELECT"),
    (b"a SELECT x (QRESYNC)", "Unknown SELECT parameter QRESYNC"),
    (b'a SELECT "caf\xc3\xa9"', "modified UTF-7"),
    (b"a SELECT &Jjo", "Mailbox name is not valid modified UTF-7 (RFC 3501 section 5.1.3)"),
    (b"a CREATE x (FOO)", "Unknown CREATE parameter FOO"),
    (b"a CREATE x (USE (Sent))", "special-use attribute"),
    (b'a LIST (RECURSIVEMATCH) "" *', "RECURSIVEMATCH needs"),
    (b'a LIST (BOGUS) "" *', "Unknown LIST selection option BOGUS"),
    (b'a LIST "" * RETURN (BOGUS)', "Unknown LIST return option BOGUS"),
    (b'a LIST "" * RETURN (CHILDREN CHILDREN)', "given twice"),
    (b"a STATUS INBOX (MESSAGES BOGUS)", "Unknown STATUS item BOGUS"),
    (b"a STATUS INBOX ()", "at least one item"),
    (b"a FETCH 1 (FLAGS BOGUS)", "Unknown FETCH item BOGUS"),
    (b"a FETCH 1 ()", "Expected a FETCH item"),
    (b"a FETCH 0 FLAGS", "Invalid sequence set"),
    (b"a FETCH 1:4294967296 FLAGS", "Invalid sequence set"),
    (b"a FETCH 1 BODY.PEEK", "BODY.PEEK needs a section"),
    (b"a FETCH 1 BODY[MIME]", "MIME needs a part number"),
    (b"a FETCH 1 BODY[0]", "must not be zero"),
    (b"a FETCH 1 BODY[1.]", "Unknown body section"),
    (b"a FETCH 1 BODY[HEADER.FIELDS ()]", "header field name"),
    (b"a FETCH 1 BODY[HEADER.FIELDS (a:b)]", "Invalid header field name"),
    (b"a FETCH 1 BODY[]<0.0>", "must not be zero"),
    (b"a FETCH 1 BODY[]<5>", "'.' in the partial range"),
    (b"a FETCH 1 FLAGS (VANISHED)", "Unknown FETCH modifier VANISHED"),
    (b"a FETCH 1 FLAGS (CHANGEDSINCE 0)", "must not be zero"),
    (b"a FETCH 1 FLAGS (CHANGEDSINCE 99999999999999999999)", "too large"),
    (b"a STORE 1 FLAG (\\Seen)", "Expected FLAGS, +FLAGS or -FLAGS"),
    (b"a STORE 1 +FLAGS (\\Recent)", "\\Recent cannot be set"),
    (b"a STORE 1 (FOO 1) FLAGS ()", "Unknown STORE modifier FOO"),
    (b"a SEARCH", "Expected a space after SEARCH"),
    (b"a SEARCH BOGUS", "Unknown search key BOGUS"),
    (b"a SEARCH BEFORE 31-Feb-2024", "no such day"),
    (b"a SEARCH BEFORE yesterday", "Invalid date"),
    (b"a SEARCH (SEEN", "')' to end the search key list"),
    (b"a SEARCH OR SEEN", "Expected a space after the first OR key"),
    (b"a SEARCH $", "SEARCHRES"),
    (b'a SEARCH MODSEQ "/other" all 5', "entry name"),
    (b"a AUTHENTICATE PLAIN !!!", "Invalid base64"),
    (b"a AUTHENTICATE PLAIN AGJvYg=", "Invalid base64"),
    (b"a ENABLE", "Expected a space after ENABLE"),
    (b'a ID ("k")', "Expected a space after an ID field name"),
    (b'a ID ("' + b"k" * 31 + b'" NIL)', "too long"),
    (b"a UID EXPUNGE", "Expected a space after UID EXPUNGE"),
    (b"a COPY 1", "Expected a space after the sequence set"),
]


@pytest.mark.parametrize(
    ("line", "reason"), ERRORS, ids=[e[0][:40].decode("latin-1") for e in ERRORS]
)
def test_parse_errors_name_what_was_wrong(line: bytes, reason: str) -> None:
    err = bad(line)
    assert reason in err.reason
    assert err.tag == "a"
    assert err.condition is Condition.BAD
    assert all(0x20 <= ord(c) < 0x7F for c in err.reason)


def test_error_reasons_never_echo_raw_client_bytes() -> None:
    err = bad(b"a FETCH 1 (FLAGS X\x01\x7f\xff]])")
    assert all(0x20 <= ord(c) < 0x7F for c in err.reason)


def test_control_characters_in_a_mailbox_literal_are_bad_not_a_crash() -> None:
    err = bad(b"a APPEND {}", b"\x00\x00\x00")
    assert err.reason == "Mailbox name is not valid modified UTF-7 (RFC 3501 section 5.1.3)"


def test_id_pair_limit() -> None:
    pairs = b" ".join(b'"k%d" "v"' % i for i in range(31))
    assert "more than 30" in bad(b"a ID (" + pairs + b")").reason


def test_sequence_set_range_limit() -> None:
    many = b",".join(b"%d" % i for i in range(1, 202))
    assert "ranges" in bad(b"a FETCH " + many + b" FLAGS", max_ranges=200).reason
    assert isinstance(parse(b"a FETCH " + many + b" FLAGS", max_ranges=201), Fetch)


def test_body_part_depth_is_limited() -> None:
    deep = b".".join(b"1" for _ in range(40))
    assert "too deeply" in bad(b"a FETCH 1 BODY[" + deep + b"]").reason


# -- peeking at the head --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        (b"a1 FETCH 1 FLAGS", ("a1", "FETCH")),
        (b"a1 uid fetch 1 FLAGS", ("a1", "UID FETCH")),
        (b"a1 LOGIN ", ("a1", "LOGIN")),
        (b"a1", ("a1", None)),
        (b"a1 ", ("a1", None)),
        (b"", (None, None)),
        (b" NOOP", (None, None)),
        (b"+ NOOP", (None, None)),
        (b"a\x80 NOOP", (None, None)),
        (b"a{1} NOOP", (None, None)),
        (b"a]b NOOP", ("a]b", "NOOP")),
    ],
)
def test_peek_command_reads_tag_and_name(
    fragment: bytes, expected: tuple[str | None, str | None]
) -> None:
    assert peek_command(fragment) == expected


def test_response_names_of_body_sections() -> None:
    cmd = parse(b'a FETCH 1 (BODY.PEEK[1.2.HEADER.FIELDS (From "X(y)")]<10.20> BODY[])')
    assert isinstance(cmd, Fetch)
    names = [i.response_name() for i in cmd.items if isinstance(i, BodySection)]
    assert names == ['BODY[1.2.HEADER.FIELDS (From "X(y)")]<10>', "BODY[]"]
