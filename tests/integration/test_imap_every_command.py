"""Every IMAP4rev1 command and every extension we advertise, over real TLS (993).

imapclient where its parsing helps, a raw ``Wire`` where the exact response matters.
APPENDUID and COPYUID are checked against what a later FETCH returns.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from imapclient import IMAPClient
from server_harness import Instance
from test_imap import ALICE, Wire, client_993, code_of, message, wire_993


@pytest.fixture
def w(server: Instance, tls_ctx: ssl.SSLContext) -> Iterator[Wire]:
    wire = wire_993(server, tls_ctx)
    yield wire
    wire.close()


@pytest.fixture
def c(server: Instance, tls_ctx: ssl.SSLContext) -> Iterator[IMAPClient]:
    client = client_993(server, tls_ctx)
    yield client
    try:
        client.logout()
    except Exception:
        pass


def append(w: Wire, mailbox: str, data: bytes, flags: str = "") -> tuple[int, int]:
    """APPEND with a synchronising literal; returns (uidvalidity, uid) from APPENDUID."""
    flag_part = f"({flags}) " if flags else ""
    w.send(f"ap APPEND {mailbox} {flag_part}{{{len(data)}}}\r\n".encode())
    assert w.response().startswith(b"+ ")
    w.send(data + b"\r\n")
    reply = w.until("ap")[-1]
    assert reply.startswith(b"ap OK [APPENDUID "), reply
    validity, uid = code_of(reply, b"APPENDUID").split()
    return int(validity), int(uid)


# -- any state ----------------------------------------------------------------------------
def test_capability_lists_every_extension(w: Wire) -> None:
    caps = set(w.cmd("a", "CAPABILITY")[0].split()[2:])
    for cap in (
        b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"IDLE", b"UIDPLUS", b"MOVE", b"UNSELECT",
        b"NAMESPACE", b"ID", b"ENABLE", b"SPECIAL-USE", b"CREATE-SPECIAL-USE", b"CHILDREN",
        b"LIST-EXTENDED", b"LIST-STATUS", b"ESEARCH", b"CONDSTORE", b"APPENDLIMIT=52428800",
    ):
        assert cap in caps, cap
    assert b"IMAP4rev2" not in caps and b"STARTTLS" not in caps


def test_noop_id_namespace_enable(w: Wire) -> None:
    assert w.cmd("a", "NOOP") == [b"a OK NOOP completed\r\n"]
    lines = w.cmd("b", 'ID ("name" "test-client" "version" "1")')
    assert lines[0] == b'* ID ("name" "postkeep")\r\n' and lines[1].startswith(b"b OK")
    assert w.cmd("c", "ID NIL")[0] == b'* ID ("name" "postkeep")\r\n'
    lines = w.cmd("d", "NAMESPACE")
    assert lines[0] == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
    lines = w.cmd("e", "ENABLE CONDSTORE X-UNKNOWN")
    assert lines == [b"* ENABLED CONDSTORE\r\n", b"e OK ENABLE completed\r\n"]


# -- mailboxes ----------------------------------------------------------------------------
def test_default_mailboxes_with_special_use_and_children(c: IMAPClient) -> None:
    folders = {name: flags for flags, _, name in c.list_folders()}
    assert set(folders) == {"INBOX", "Sent", "Drafts", "Trash", "Junk"}
    assert b"\\Sent" in folders["Sent"] and b"\\Trash" in folders["Trash"]
    assert all(b"\\HasNoChildren" in f for f in folders.values())
    assert c.find_special_folder(b"\\Drafts") == "Drafts"


def test_list_delimiter_query(w: Wire) -> None:
    assert w.cmd("a", 'LIST "" ""')[0] == b'* LIST (\\Noselect) "/" ""\r\n'


def test_create_delete_rename_with_hierarchy(c: IMAPClient) -> None:
    c.create_folder("Projects/2024/Q1")  # parents are created too (RFC 3501 §6.3.3)
    names = {name: flags for flags, _, name in c.list_folders()}
    assert b"\\HasChildren" in names["Projects"] and b"\\HasChildren" in names["Projects/2024"]
    assert b"\\HasNoChildren" in names["Projects/2024/Q1"]
    assert [n for _, _, n in c.list_folders("Projects/", "%")] == ["Projects/2024"]
    assert [n for _, _, n in c.list_folders("", "Projects/*")] == [
        "Projects/2024", "Projects/2024/Q1"
    ]
    c.rename_folder("Projects", "Archive/Old")  # children move along
    names = {name for _, _, name in c.list_folders()}
    assert {"Archive", "Archive/Old", "Archive/Old/2024", "Archive/Old/2024/Q1"} <= names
    assert not any(n.startswith("Projects") for n in names)
    c.delete_folder("Archive/Old/2024/Q1")
    assert "Archive/Old/2024/Q1" not in {name for _, _, name in c.list_folders()}
    with pytest.raises(IMAPClient.Error, match="NONEXISTENT"):
        c.delete_folder("No/Such")


def test_create_refusals(w: Wire) -> None:
    assert w.cmd("a", "CREATE INBOX")[-1].startswith(b"a NO [ALREADYEXISTS]")
    assert w.cmd("b", "CREATE Sent")[-1].startswith(b"b NO [ALREADYEXISTS]")
    assert w.cmd("c", 'CREATE "a*b"')[-1].startswith(b"c NO [CANNOT]")
    assert w.cmd("d", 'CREATE "a//b"')[-1].startswith(b"d NO [CANNOT]")
    assert w.cmd("e", "DELETE INBOX")[-1].startswith(b"e NO [CANNOT]")
    assert w.cmd("f", "RENAME Nope Other")[-1].startswith(b"f NO [NONEXISTENT]")
    assert w.cmd("g", "RENAME Sent Drafts")[-1].startswith(b"g NO [ALREADYEXISTS]")
    assert w.cmd("h", "CREATE trailing/")[-1].startswith(b"h OK")  # RFC 3501: "trailing"
    assert b'"/" trailing\r\n' in w.cmd("i", 'LIST "" trailing')[0]


def test_create_special_use(w: Wire) -> None:
    assert w.cmd("a", "CREATE Archive (USE (\\Archive))")[-1].startswith(b"a OK")
    lines = w.cmd("b", 'LIST (SPECIAL-USE) "" "*"')
    names = [line for line in lines if line.startswith(b"* LIST")]
    assert b'* LIST (\\HasNoChildren \\Archive) "/" Archive\r\n' in names
    assert all(b"\\HasNoChildren \\" in line for line in names)  # only special-use ones
    assert not any(b" INBOX" in line for line in names)
    # RFC 6154 §3: refused with USEATTR, and not created.
    assert w.cmd("c", "CREATE AllMail (USE (\\All))")[-1].startswith(b"c NO [USEATTR]")
    assert w.cmd("d", 'LIST "" AllMail') == [b"d OK LIST completed\r\n"]


def test_international_mailbox_names_in_modified_utf7(c: IMAPClient) -> None:
    c.create_folder("Entwürfe/Grüße")
    assert "Entwürfe/Grüße" in {name for _, _, name in c.list_folders()}
    c.select_folder("Entwürfe/Grüße")
    c.close_folder()


def test_subscribe_unsubscribe_lsub_and_list_subscribed(w: Wire) -> None:
    # The default mailboxes of a new account come subscribed.
    lsub = w.cmd("a", 'LSUB "" "*"')
    assert b'* LSUB () "/" INBOX\r\n' in lsub and b'* LSUB () "/" Sent\r\n' in lsub
    assert w.cmd("b", "CREATE Lists/Python")[-1].startswith(b"b OK")  # CREATE: not subscribed
    assert w.cmd("c", 'LSUB "" "Lists*"') == [b"c OK LSUB completed\r\n"]
    assert w.cmd("d", "SUBSCRIBE Lists/Python")[-1].startswith(b"d OK")
    assert w.cmd("e", 'LSUB "" "Lists*"')[:-1] == [b'* LSUB () "/" Lists/Python\r\n']
    lsub = w.cmd("f", 'LSUB "" "%"')  # the parent is not subscribed: \Noselect
    assert b'* LSUB (\\Noselect) "/" Lists\r\n' in lsub
    lines = w.cmd("g", 'LIST (SUBSCRIBED) "" "L*"')
    assert lines[:-1] == [b'* LIST (\\Subscribed \\HasNoChildren) "/" Lists/Python\r\n']
    # RFC 5258 §3.5: RECURSIVEMATCH shows the parent with CHILDINFO.
    lines = w.cmd("h", 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
    assert b'* LIST (\\HasChildren) "/" Lists ("CHILDINFO" ("SUBSCRIBED"))\r\n' in lines
    lines = w.cmd("i", 'LIST "" "*" RETURN (SUBSCRIBED)')
    assert b'* LIST (\\Subscribed \\HasNoChildren) "/" INBOX\r\n' in lines
    assert b'* LIST (\\HasChildren) "/" Lists\r\n' in lines
    assert w.cmd("j", "UNSUBSCRIBE Lists/Python")[-1].startswith(b"j OK")
    assert w.cmd("k", "UNSUBSCRIBE Sent")[-1].startswith(b"k OK")
    lsub = w.cmd("l", 'LSUB "" "*"')
    assert b"Lists/Python" not in b"".join(lsub) and b" Sent\r\n" not in b"".join(lsub)
    assert w.cmd("m", "SUBSCRIBE Nope")[-1].startswith(b"m NO [NONEXISTENT]")


def test_list_extended_multiple_patterns_and_nonexistent_parent(w: Wire) -> None:
    assert w.cmd("a", "CREATE Top/Child")[-1].startswith(b"a OK")
    assert w.cmd("b", "DELETE Top")[-1].startswith(b"b OK")  # the child stays
    lines = w.cmd("c", 'LIST "" (Top Sent)')  # extended syntax: \NonExistent
    assert b'* LIST (\\NonExistent \\HasChildren) "/" Top\r\n' in lines
    assert b'* LIST (\\HasNoChildren \\Sent) "/" Sent\r\n' in lines
    lines = w.cmd("d", 'LIST "" Top')  # basic syntax: \Noselect
    assert lines[0] == b'* LIST (\\Noselect \\HasChildren) "/" Top\r\n'
    assert w.cmd("e", "SELECT Top")[-1].startswith(b"e NO [NONEXISTENT]")


def test_list_status(w: Wire) -> None:
    append(w, "INBOX", message("one"))
    append(w, "INBOX", message("two"), "\\Seen")
    lines = w.cmd("a", 'LIST "" "INBOX" RETURN (STATUS (MESSAGES UNSEEN UIDNEXT))')
    assert lines[0] == b'* LIST (\\HasNoChildren) "/" INBOX\r\n'
    assert lines[1] == b"* STATUS INBOX (MESSAGES 2 UNSEEN 1 UIDNEXT 3)\r\n"  # RFC 5819


def test_status(w: Wire) -> None:
    validity, _ = append(w, "Drafts", message("draft"), "\\Draft")
    append(w, "Drafts", message("draft 2"), "\\Seen")
    lines = w.cmd(
        "a", "STATUS Drafts (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ)"
    )
    assert lines[0].startswith(
        f"* STATUS Drafts (MESSAGES 2 RECENT 0 UIDNEXT 3 UIDVALIDITY {validity} UNSEEN 1 "
        "HIGHESTMODSEQ ".encode()
    )
    assert w.cmd("b", "STATUS Nope (MESSAGES)")[-1].startswith(b"b NO [NONEXISTENT]")


# -- APPEND -------------------------------------------------------------------------------
def test_append_uid_matches_fetch_and_keeps_flags_and_date(w: Wire) -> None:
    data = message("appended", "body line\r\n")
    w.send(
        f'a APPEND INBOX (\\Flagged $Work) "14-Jul-2023 09:30:00 +0200" {{{len(data)}}}\r\n'
        .encode()
    )
    assert w.response() == b"+ Ready for literal\r\n"
    w.send(data + b"\r\n")
    reply = w.response()
    validity, uid = code_of(reply, b"APPENDUID").split()
    select = w.cmd("s", "SELECT INBOX")
    assert f"* OK [UIDVALIDITY {validity.decode()}]".encode() in b"".join(select)
    lines = w.cmd("f", f"UID FETCH {uid.decode()} (FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])")
    assert lines[0] == (
        f'* 1 FETCH (UID {uid.decode()} FLAGS (\\Flagged $Work) '
        f'INTERNALDATE "14-Jul-2023 09:30:00 +0200" RFC822.SIZE {len(data)} '
        f"BODY[] {{{len(data)}}}\r\n"
    ).encode() + data + b")\r\n"


def test_append_literal_plus_and_trycreate(w: Wire) -> None:
    data = message("plus")
    w.send(f"a APPEND INBOX {{{len(data)}+}}\r\n".encode() + data + b"\r\n")
    assert w.response().startswith(b"a OK [APPENDUID ")  # no "+" round trip (RFC 7888)
    w.send(b"b APPEND Nowhere {5}\r\n")
    assert w.response().startswith(b"b NO [TRYCREATE] ")  # before the message is sent
    assert w.cmd("c", "NOOP")[-1].startswith(b"c OK")


def test_append_to_selected_mailbox_reports_exists(w: Wire) -> None:
    w.cmd("s", "SELECT INBOX")
    data = message("to selected")
    w.send(f"a APPEND INBOX {{{len(data)}+}}\r\n".encode() + data + b"\r\n")
    lines = w.until("a")
    assert b"* 1 EXISTS\r\n" in lines and lines[-1].startswith(b"a OK [APPENDUID ")


# -- SELECT / EXAMINE / CLOSE / UNSELECT --------------------------------------------------
def test_select_responses(w: Wire) -> None:
    validity, _ = append(w, "INBOX", message("a"), "\\Seen $Custom")
    append(w, "INBOX", message("b"))
    lines = w.cmd("s", "SELECT INBOX")
    text = b"".join(lines)
    assert lines[0] == b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Custom)\r\n"
    assert (
        b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Custom \\*)]"
        in text
    )
    assert b"* 2 EXISTS\r\n" in lines and b"* 0 RECENT\r\n" in lines
    assert b"* OK [UNSEEN 2] " in text
    assert f"* OK [UIDVALIDITY {validity}] ".encode() in text
    assert b"* OK [UIDNEXT 3] " in text and b"* OK [HIGHESTMODSEQ " in text
    assert lines[-1] == b"s OK [READ-WRITE] SELECT completed\r\n"


def test_examine_is_read_only(w: Wire) -> None:
    append(w, "INBOX", message("x"))
    lines = w.cmd("e", "EXAMINE INBOX")
    assert b"* OK [PERMANENTFLAGS ()] " in b"".join(lines)
    assert lines[-1].startswith(b"e OK [READ-ONLY]")
    assert w.cmd("a", "STORE 1 +FLAGS (\\Seen)")[-1].startswith(b"a NO ")
    assert w.cmd("b", "EXPUNGE")[-1].startswith(b"b NO ")
    w.cmd("f", "FETCH 1 BODY[TEXT]")  # no PEEK, but EXAMINE sets no \Seen
    assert w.cmd("g", "FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS ())\r\n"


def test_select_missing_mailbox_leaves_nothing_selected(w: Wire) -> None:
    w.cmd("s", "SELECT INBOX")
    assert w.cmd("a", "SELECT Nope")[-1].startswith(b"a NO [NONEXISTENT]")
    assert w.cmd("b", "FETCH 1 FLAGS")[-1].startswith(b"b BAD ")  # RFC 3501 §6.3.1


def test_reselect_sends_closed(w: Wire) -> None:
    w.cmd("s", "SELECT INBOX")
    lines = w.cmd("t", "SELECT Sent")
    assert lines[0].startswith(b"* OK [CLOSED] ")


def test_close_expunges_silently_unselect_does_not(w: Wire) -> None:
    for i in range(3):
        append(w, "INBOX", message(f"m{i}"), "\\Deleted" if i == 1 else "")
    w.cmd("s", "SELECT INBOX")
    assert w.cmd("u", "UNSELECT") == [b"u OK UNSELECT completed\r\n"]
    assert w.cmd("n", "STATUS INBOX (MESSAGES)")[0] == b"* STATUS INBOX (MESSAGES 3)\r\n"
    w.cmd("s", "SELECT INBOX")
    assert w.cmd("c", "CLOSE") == [b"c OK CLOSE completed\r\n"]  # no EXPUNGE responses
    assert w.cmd("m", "STATUS INBOX (MESSAGES)")[0] == b"* STATUS INBOX (MESSAGES 2)\r\n"


def test_check(w: Wire) -> None:
    w.cmd("s", "SELECT INBOX")
    assert w.cmd("a", "CHECK") == [b"a OK CHECK completed\r\n"]


def test_delete_of_own_selected_mailbox_is_in_use(w: Wire) -> None:
    w.cmd("a", "CREATE Temp")
    w.cmd("s", "SELECT Temp")
    assert w.cmd("b", "DELETE Temp")[-1].startswith(b"b NO [INUSE]")
    w.cmd("u", "UNSELECT")
    assert w.cmd("c", "DELETE Temp")[-1].startswith(b"c OK")


# -- STORE / EXPUNGE ----------------------------------------------------------------------
def test_store_variants(w: Wire) -> None:
    for i in range(3):
        append(w, "INBOX", message(f"s{i}"))
    w.cmd("s", "SELECT INBOX")
    assert w.cmd("a", "STORE 1:2 +FLAGS (\\Flagged $Todo)")[:-1] == [
        b"* 1 FETCH (FLAGS (\\Flagged $Todo))\r\n",
        b"* 2 FETCH (FLAGS (\\Flagged $Todo))\r\n",
    ]
    assert w.cmd("b", "STORE 2 -FLAGS (\\Flagged)")[0] == b"* 2 FETCH (FLAGS ($Todo))\r\n"
    assert w.cmd("c", "STORE 3 FLAGS.SILENT (\\Answered)") == [b"c OK STORE completed\r\n"]
    assert w.cmd("d", "UID STORE 3 +FLAGS \\Seen")[0] == (
        b"* 3 FETCH (UID 3 FLAGS (\\Answered \\Seen))\r\n"
    )
    assert w.cmd("e", "FETCH 1:* FLAGS")[:-1] == [
        b"* 1 FETCH (FLAGS (\\Flagged $Todo))\r\n",
        b"* 2 FETCH (FLAGS ($Todo))\r\n",
        b"* 3 FETCH (FLAGS (\\Answered \\Seen))\r\n",
    ]
    assert w.cmd("f", "STORE 1 +FLAGS (\\Recent)")[-1].startswith(b"f BAD ")


def test_expunge_and_uid_expunge(w: Wire) -> None:
    for i in range(5):
        append(w, "INBOX", message(f"e{i}"), "\\Deleted" if i in (1, 2, 4) else "")
    w.cmd("s", "SELECT INBOX")
    # UIDPLUS: only UID 2 of the \Deleted ones, and not the undeleted UID 1.
    assert w.cmd("a", "UID EXPUNGE 1:2") == [b"* 2 EXPUNGE\r\n", b"a OK UID EXPUNGE completed\r\n"]
    # Now UIDs 1 3 4 5 are 1..4; \Deleted are UIDs 3 (seq 2) and 5 (seq 4).
    assert w.cmd("b", "EXPUNGE") == [
        b"* 2 EXPUNGE\r\n",
        b"* 3 EXPUNGE\r\n",
        b"b OK EXPUNGE completed\r\n",
    ]
    assert w.cmd("c", "UID SEARCH ALL")[0] == b"* SEARCH 1 4\r\n"


# -- COPY / MOVE --------------------------------------------------------------------------
def test_copy_with_copyuid_checked_by_fetch(w: Wire) -> None:
    for i in range(3):
        append(w, "INBOX", message(f"c{i}"), "\\Flagged" if i == 0 else "")
    w.cmd("x", "CREATE Archive")
    append(w, "Archive", message("already there"))
    w.cmd("s", "SELECT INBOX")
    reply = w.cmd("a", "COPY 1,3 Archive")[-1]
    validity, src, dst = code_of(reply, b"COPYUID").split()
    assert (src, dst) == (b"1,3", b"2:3")
    assert w.cmd("n", "COPY 1 Nowhere")[-1].startswith(b"n NO [TRYCREATE]")
    lines = w.cmd("e", "EXAMINE Archive")
    assert f"[UIDVALIDITY {validity.decode()}]".encode() in b"".join(lines)
    fetched = w.cmd("f", "UID FETCH 2:3 (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"UID 2 FLAGS (\\Flagged)" in fetched[0] and b"Subject: c0" in fetched[0]
    assert b"UID 3 FLAGS ()" in fetched[1] and b"Subject: c2" in fetched[1]


def test_move_sends_copyuid_then_expunge(w: Wire) -> None:
    for i in range(3):
        append(w, "INBOX", message(f"v{i}"))
    w.cmd("s", "SELECT INBOX")
    lines = w.cmd("a", "MOVE 2 Trash")
    assert lines[0].startswith(b"* OK [COPYUID ") and code_of(lines[0], b"COPYUID").split()[1:] == [
        b"2", b"1"
    ]
    assert lines[1:] == [b"* 2 EXPUNGE\r\n", b"a OK MOVE completed\r\n"]
    lines = w.cmd("b", "UID MOVE 3 Trash")
    assert code_of(lines[0], b"COPYUID").split()[1:] == [b"3", b"2"]
    assert lines[1] == b"* 2 EXPUNGE\r\n"
    w.cmd("t", "SELECT Trash")
    subjects = w.cmd("f", "UID FETCH 1:* BODY.PEEK[HEADER.FIELDS (SUBJECT)]")
    assert b"Subject: v1" in subjects[0] and b"Subject: v2" in subjects[1]


def test_move_from_examine_is_refused(w: Wire) -> None:
    append(w, "INBOX", message("ro"))
    w.cmd("e", "EXAMINE INBOX")
    assert w.cmd("a", "MOVE 1 Trash")[-1].startswith(b"a NO ")
    assert w.cmd("b", "COPY 1 Trash")[-1].startswith(b"b OK [COPYUID ")


# -- SEARCH -------------------------------------------------------------------------------
def test_search_keys(w: Wire) -> None:
    append(w, "INBOX", message("Invoice March", "Pay 100 EUR\r\n"), "\\Seen")
    append(w, "INBOX", message("Lunch", "Grüße aus Köln\r\n"), "\\Flagged")
    append(w, "INBOX", message("Invoice April", "Pay 200 EUR\r\n"))
    w.cmd("s", "SELECT INBOX")

    def search(criteria: str) -> bytes:
        lines = w.cmd("q", criteria)
        assert lines[-1].startswith(b"q OK"), lines
        return lines[0]

    assert search("SEARCH ALL") == b"* SEARCH 1 2 3\r\n"
    assert search("SEARCH SUBJECT invoice") == b"* SEARCH 1 3\r\n"
    assert search("SEARCH OR SEEN FLAGGED") == b"* SEARCH 1 2\r\n"
    assert search("SEARCH NOT SEEN") == b"* SEARCH 2 3\r\n"
    assert search("SEARCH 2:*") == b"* SEARCH 2 3\r\n"
    assert search("SEARCH BODY 200") == b"* SEARCH 3\r\n"
    assert search("UID SEARCH UID 2:* UNFLAGGED") == b"* SEARCH 3\r\n"
    assert search("SEARCH LARGER 1 SMALLER 100000") == b"* SEARCH 1 2 3\r\n"
    assert search("SEARCH SUBJECT nothing-like-this") == b"* SEARCH\r\n"


def test_search_charset_utf8_literal(w: Wire) -> None:
    append(w, "INBOX", message("Lunch", "Grüße aus Köln\r\n"))
    append(w, "INBOX", message("Other"))
    w.cmd("s", "SELECT INBOX")
    needle = "köln".encode()
    w.send(f"q SEARCH CHARSET UTF-8 BODY {{{len(needle)}}}\r\n".encode())
    assert w.response().startswith(b"+ ")
    w.send(needle + b"\r\n")
    assert w.until("q") == [b"* SEARCH 1\r\n", b"q OK SEARCH completed\r\n"]


def test_esearch_return_options(w: Wire) -> None:
    for i in range(5):
        append(w, "INBOX", message(f"r{i}"), "\\Seen" if i != 2 else "")
    w.cmd("s", "SELECT INBOX")
    lines = w.cmd("a", "SEARCH RETURN (MIN MAX COUNT ALL) SEEN")
    assert lines[0] == b'* ESEARCH (TAG "a") MIN 1 MAX 5 ALL 1:2,4:5 COUNT 4\r\n'
    lines = w.cmd("b", "UID SEARCH RETURN () UNSEEN")
    assert lines[0] == b'* ESEARCH (TAG "b") UID ALL 3\r\n'
    lines = w.cmd("c", "SEARCH RETURN (COUNT MIN) SUBJECT nothing")
    assert lines[0] == b'* ESEARCH (TAG "c") COUNT 0\r\n'


def test_imapclient_search_and_sort_free_commands(c: IMAPClient) -> None:
    c.append("INBOX", message("hello world"))
    c.append("INBOX", message("other"))
    c.select_folder("INBOX")
    assert c.search(["SUBJECT", "hello"]) == [1]
    assert c.search(["NOT", "SUBJECT", "hello"]) == [2]
    since = (datetime.now(UTC) - timedelta(days=1)).date()
    assert c.search(["SINCE", since]) == [1, 2]


# -- CONDSTORE (RFC 7162) -----------------------------------------------------------------
def test_condstore_modseq_fetch_changedsince_unchangedsince(w: Wire) -> None:
    for i in range(3):
        append(w, "INBOX", message(f"cs{i}"))
    lines = w.cmd("s", "SELECT INBOX (CONDSTORE)")
    highest = int(code_of(b"".join(lines), b"HIGHESTMODSEQ"))
    fetched = w.cmd("a", "FETCH 1:3 (MODSEQ)")
    modseqs = [int(line.split(b"MODSEQ (")[1].split(b")")[0]) for line in fetched[:-1]]
    assert max(modseqs) == highest
    lines = w.cmd("b", "STORE 2 +FLAGS (\\Flagged)")
    assert lines[0].startswith(b"* 2 FETCH (FLAGS (\\Flagged) MODSEQ (")
    new = int(lines[0].split(b"MODSEQ (")[1].split(b")")[0])
    assert new > highest
    assert w.cmd("c", f"FETCH 1:* (FLAGS) (CHANGEDSINCE {highest})")[:-1] == [
        f"* 2 FETCH (FLAGS (\\Flagged) MODSEQ ({new}))\r\n".encode()
    ]
    lines = w.cmd("d", f"STORE 1:2 (UNCHANGEDSINCE {highest}) +FLAGS (\\Seen)")
    assert lines[-1].startswith(b"d OK [MODIFIED 2] ")  # 2 changed after `highest`
    assert lines[0].startswith(b"* 1 FETCH (FLAGS (\\Seen) MODSEQ (")
    lines = w.cmd("e", f"SEARCH MODSEQ {new}")
    assert lines[0].startswith(b"* SEARCH 1 2 (MODSEQ ")


def test_status_highestmodseq_rises(w: Wire) -> None:
    def highest() -> int:
        line = w.cmd("h", "STATUS INBOX (HIGHESTMODSEQ)")[0]
        return int(line.split(b"HIGHESTMODSEQ ")[1].split(b")")[0])

    first = highest()
    append(w, "INBOX", message("m"))
    assert highest() > first


def test_internaldate_timezone_roundtrip(c: IMAPClient) -> None:
    when = datetime(2022, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5)))
    c.append("INBOX", message("tz"), msg_time=when)
    c.select_folder("INBOX")
    c.normalise_times = False  # keep the zone the server sent
    [(_, data)] = c.fetch("1", ["INTERNALDATE"]).items()
    got = data[b"INTERNALDATE"]
    assert got == when and got.utcoffset() == timedelta(hours=-5)


def test_logged_in_user_sees_only_own_mailboxes(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    a = client_993(server, tls_ctx)
    a.create_folder("AliceOnly")
    b = client_993(server, tls_ctx, user="bob@example.test")
    assert "AliceOnly" not in {name for _, _, name in b.list_folders()}
    with pytest.raises(IMAPClient.Error):
        b.select_folder("AliceOnly")
    assert ALICE  # the default user of the helpers
    a.logout()
    b.logout()
