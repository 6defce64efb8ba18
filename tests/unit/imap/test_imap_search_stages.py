"""SEARCH over a :class:`search.Source`: what is loaded, in which batches, with which result.

``search_mailbox`` reads metadata, then header sections, then whole messages, and only
what the cheaper stage leaves open. These tests drive it with a recording source over
real messages and compare every answer with ``evaluate`` (one whole message per load).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from postkeep.imap import search
from postkeep.imap.grammar import Search as SearchCommand
from postkeep.imap.grammar import SearchKey, parse_command
from postkeep.imap.search import Candidate, Loaded, evaluate, header_complete, search_mailbox
from postkeep.imap.session import _SearchSource
from postkeep.mail import mime
from postkeep.store.api import BlobRef
from postkeep.store.sqlite import SqliteStore
from postkeep.store.sqlite.tx import SqliteReadTx


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


def key(text: str) -> SearchKey:
    cmd = parse_command([b"a SEARCH CHARSET UTF-8 " + text.encode("utf-8")])
    assert isinstance(cmd, SearchCommand)
    return cmd.key


PLAIN = crlf(
    "From: Alice <alice@example.com>\n"
    "Subject: Quarterly report\n"
    "Date: Mon, 1 Jan 2024 10:00:00 +0000\n"
    "\n"
    "The numbers are up. Subject: not a header\n"
)
ENCODED = crlf(
    "From: =?ISO-8859-1?Q?Andr=E9?= <andre@example.fr>\n"
    "Subject: =?UTF-8?B?R3LDvMOfZQ==?=\n"
    " =?UTF-8?Q?_aus_K=C3=B6ln?=\n"
    "Content-Type: text/plain; charset=iso-8859-1\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "Un caf=E9 cr=E8me\n"
)
MULTIPART = crlf(
    "Subject: Meeting\n"
    'Content-Type: multipart/mixed; boundary="b"\n'
    "\n"
    "--b\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "\n"
    "agenda attached\n"
    "--b\n"
    "Content-Type: message/rfc822\n"
    "\n"
    "Subject: inner topic\n"
    "\n"
    "inner text\n"
    "--b--\n"
)
# The header section runs past HEADER_PROBE: the field after it needs the second read.
LONG_HEADER = (
    b"Subject: long\r\n"
    + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 200) for i in range(100))
    + b"X-Late: late-marker\r\n\r\nbody of the long one\r\n"
)
NO_BLANK_LINE = b"Subject: headers only\r\nX-Tail: tail"

MESSAGES = {1: PLAIN, 2: ENCODED, 3: MULTIPART, 4: LONG_HEADER, 5: NO_BLANK_LINE}
FLAGS = {1: {"\\Seen"}, 2: set(), 3: {"\\Flagged"}, 4: {"\\Seen"}, 5: set()}
WHEN = datetime(2024, 1, 2, tzinfo=UTC)
CANDIDATES = [
    Candidate(uid, uid, frozenset(FLAGS[uid]), WHEN, len(MESSAGES[uid]), uid, False)
    for uid in MESSAGES
]


class Recorder:
    """A ``search.Source`` over MESSAGES that records each call and honours the header
    contract the way the session does (a probe, then up to HEADER_CAP)."""

    def __init__(
        self,
        messages: Mapping[int, bytes] = MESSAGES,
        candidates: Sequence[Candidate] = CANDIDATES,
        *,
        analyses: Mapping[int, mime.Analysis | None] | None = None,
        gone: frozenset[int] = frozenset(),
    ) -> None:
        self.data = messages
        self.rows = {c.uid: c for c in candidates}
        self.analyses = analyses or {}
        self.gone = gone  # expunged after the candidates were read
        self.calls: list[tuple[str, list[int]]] = []

    async def candidates(self, present: Sequence[tuple[int, int]]) -> list[Candidate]:
        self.calls.append(("candidates", [u for _, u in present]))
        return [self.rows[u] for _, u in present if u in self.rows]

    async def headers(self, batch: Sequence[Candidate]) -> Mapping[int, bytes]:
        self.calls.append(("headers", [c.uid for c in batch]))
        out = {}
        for c in batch:
            if c.uid in self.gone:
                continue
            data = self.data[c.uid]
            prefix = data[: search.HEADER_PROBE]
            if not header_complete(prefix, len(data)):
                prefix = data[: search.HEADER_CAP]
            out[c.uid] = prefix
        return out

    async def messages(self, batch: Sequence[Candidate]) -> Mapping[int, Loaded]:
        self.calls.append(("messages", [c.uid for c in batch]))
        return {
            c.uid: Loaded(self.data[c.uid], self.analyses.get(c.uid))
            for c in batch
            if c.uid not in self.gone
        }

    def loaded(self, kind: str) -> list[int]:
        return [u for k, uids in self.calls if k == kind for u in uids]


PRESENT = [(c.seq, c.uid) for c in CANDIDATES]


async def run(text: str, source: Recorder | None = None) -> list[int]:
    found = await search_mailbox(key(text), PRESENT, source or Recorder())
    return [c.uid for c in found]


async def reference(text: str) -> list[int]:
    async def load(uid: int) -> bytes:
        return MESSAGES[uid]

    return await evaluate(key(text), CANDIDATES, load)


QUERIES = [
    "SUBJECT report",
    'SUBJECT "GRÜSSE"',  # RFC 2047 B and Q words, folded between them; ß folds to ss
    'SUBJECT "grüße aus köln"',
    'FROM "andré"',
    "SUBJECT not",  # in the body only
    "TEXT not",
    'BODY "café"',
    'BODY "crème"',
    'BODY "inner topic"',  # the header of an attached message is body text
    "SUBJECT inner",
    "BODY agenda",
    "HEADER X-Late late-marker",
    'HEADER X-Late ""',
    "HEADER X-Tail tail",
    'SUBJECT ""',
    'BODY ""',
    "SENTON 1-Jan-2024",
    "NOT SENTON 1-Jan-2024",
    "SEEN SUBJECT long",
    "UNSEEN SUBJECT long",
    'OR SUBJECT meeting BODY "café"',
    "NOT SUBJECT meeting",
    'NOT (OR FLAGGED BODY "café")',
    "SUBJECT meeting BODY agenda",
    "SUBJECT meeting BODY nothing",
    'OR (SEEN HEADER X-Late late) (UNSEEN TEXT "KÖLN")',
    "LARGER 1000 TEXT body",
    "ALL",
    "UID 2:4 NOT BODY inner",
]


@pytest.mark.parametrize("text", QUERIES)
async def test_same_answer_as_one_whole_message_per_load(text: str) -> None:
    assert await run(text) == await reference(text)


async def test_expected_answers() -> None:
    # Pinned, so that a change to both paths at once is noticed too.
    assert await run('SUBJECT "GRÜSSE"') == [2]
    assert await run('FROM "andré"') == [2]
    assert await run("SUBJECT not") == []
    assert await run("TEXT not") == [1]
    assert await run('BODY "crème"') == [2]
    assert await run('BODY "inner topic"') == [3]
    assert await run("SUBJECT inner") == []
    assert await run("HEADER X-Late late-marker") == [4]
    assert await run("HEADER X-Tail tail") == [5]
    assert await run('OR SUBJECT meeting BODY "café"') == [2, 3]
    assert await run('NOT (OR FLAGGED BODY "café")') == [1, 4, 5]


async def test_header_keys_read_header_sections_only() -> None:
    source = Recorder()
    assert await run("OR SUBJECT report HEADER X-Late late-marker", source) == [1, 4]
    assert source.loaded("headers") == [1, 2, 3, 4, 5]
    assert source.loaded("messages") == []


async def test_body_keys_read_no_separate_header_sections() -> None:
    source = Recorder()
    assert await run("BODY agenda", source) == [3]
    assert source.loaded("headers") == []
    assert source.loaded("messages") == [1, 2, 3, 4, 5]


async def test_whole_messages_only_where_the_header_leaves_it_open() -> None:
    source = Recorder()
    assert await run("SUBJECT meeting BODY agenda", source) == [3]
    assert source.loaded("messages") == [3]
    source = Recorder()
    assert await run('OR SUBJECT meeting BODY "café"', source) == [2, 3]
    assert source.loaded("messages") == [1, 2, 4, 5]


async def test_metadata_first() -> None:
    source = Recorder()
    assert await run("SEEN SUBJECT long", source) == [4]
    assert source.loaded("headers") == [1, 4]
    source = Recorder()
    assert await run("UNSEEN FLAGGED", source) == [3]
    assert [k for k, _ in source.calls] == ["candidates"]


async def test_a_message_expunged_meanwhile_matches_no_text() -> None:
    source = Recorder(gone=frozenset({2, 3}))
    assert await run('OR SUBJECT meeting BODY "café"', source) == []
    assert await run("NOT SUBJECT meeting", Recorder(gone=frozenset({3}))) == [1, 2, 3, 4, 5]


async def test_expunged_before_the_candidates_are_left_out() -> None:
    source = Recorder(candidates=[c for c in CANDIDATES if c.uid != 5])
    assert await run("ALL", source) == [1, 2, 3, 4]
    # "*" is still the session's last message: the view is the client's.
    assert await run("5:*", source) == []


async def test_stored_analysis_is_used_instead_of_parsing_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    analyses = {uid: mime.analyze(data) for uid, data in MESSAGES.items()}

    def refuse(data: bytes) -> mime.Analysis:
        raise AssertionError("analysed again")

    monkeypatch.setattr(mime, "analyze", refuse)
    assert await run('BODY "inner topic"', Recorder(analyses=analyses)) == [3]
    assert await run('TEXT "café"', Recorder(analyses=analyses)) == [2]


async def test_a_stored_analysis_of_other_octets_is_not_trusted() -> None:
    # An analysis whose extent is not the message's own: the message is analysed anew.
    wrong = mime.analyze(PLAIN)
    assert await run('BODY "inner topic"', Recorder(analyses={3: wrong})) == [3]


async def test_batches_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "CHUNK", 7)
    monkeypatch.setattr(search, "LOAD_COUNT", 3)
    monkeypatch.setattr(search, "LOAD_BYTES", 1000)
    sizes = [100, 300, 700, 5000, 50, 50, 50, 50, 400, 400, 400, 10, 10, 10, 10, 10, 10]
    data = {
        i + 1: b"Subject: s%d\r\n\r\n" % (i + 1) + b"x" * max(0, n - 20)
        for i, n in enumerate(sizes)
    }
    cands = [
        Candidate(uid, uid, frozenset(), WHEN, len(body), 1, False) for uid, body in data.items()
    ]
    source = Recorder(data, cands)
    found = await search_mailbox(key("BODY xx"), [(c.seq, c.uid) for c in cands], source)
    assert [c.uid for c in found] == [uid for uid, body in data.items() if b"xx" in body]
    assert [len(u) for k, u in source.calls if k == "candidates"] == [7, 7, 3]
    for kind, uids in source.calls:
        if kind == "messages":
            octets = sum(len(data[u]) for u in uids)
            assert len(uids) <= 3
            assert octets <= 1000 or len(uids) == 1
    assert sorted(source.loaded("messages")) == list(data)


def test_header_complete() -> None:
    assert header_complete(b"Subject: x\r\n\r\nbody", 100)
    assert header_complete(b"Subject: x\n\nbody", 100)
    assert header_complete(b"\r\nbody", 100)  # no header fields at all
    assert header_complete(b"Subject: x", 10)  # the whole message
    assert not header_complete(b"Subject: x\r\n", 100)
    assert not header_complete(b"Subject: x\r\nTo: y\r\n\r", 100)
    assert header_complete(b"x" * search.HEADER_CAP, search.HEADER_CAP + 10)


@pytest.mark.parametrize("data", [PLAIN, ENCODED, MULTIPART, LONG_HEADER[:600] + b"\r\n\r\nb"])
def test_a_complete_prefix_decodes_like_the_whole_message(data: bytes) -> None:
    names = ("subject", "from", "date", "x-late", "x-filler-1", "content-type")
    whole = {n: mime.decoded_header(data, n) for n in names}
    for cut in range(len(data) + 1):
        prefix = data[:cut]
        if header_complete(prefix, len(data)):
            assert {n: mime.decoded_header(prefix, n) for n in names} == whole, cut
            assert mime.header_date(prefix) == mime.header_date(data)


def test_a_header_beyond_the_parse_limit_is_cut_the_same() -> None:
    filler = b"".join(b"X-F: %s\r\n" % (b"f" * 1000) for _ in range(mime.MAX_HEADER_PARSE // 1000))
    data = b"Subject: first\r\n" + filler + b"Subject: beyond\r\n\r\nbody\r\n"
    prefix = data[: search.HEADER_CAP]
    assert header_complete(prefix, len(data))
    assert mime.decoded_header(prefix, "subject") == mime.decoded_header(data, "subject")


async def test_the_store_source_reads_each_stage_of_a_batch_in_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's source over a real store: one ``read_blobs`` per stage (probe, long
    headers, whole messages); a message expunged (and its bytes freed) after its row was
    read is left out, and the rest of its batch is still answered."""
    long_header = crlf("Subject: long\n" + "X-Pad: " + "p" * (search.HEADER_PROBE + 10) + "\n\n")
    bodies = [PLAIN, long_header + b"tail\r\n", MULTIPART]
    store = SqliteStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        async with store.write() as tx:
            await tx.add_domain("example.com")
            account = await tx.add_account("bob@example.com", "argon2id$hash")
            inbox = await tx.mailbox(account.id, "INBOX")
            assert inbox is not None
            uids = [await tx.append(inbox.id, await tx.put_blob(b)) for b in bodies]
        calls: list[tuple[str, int | None]] = []
        many, one = SqliteReadTx.read_blobs, SqliteReadTx.read_blob

        async def read_blobs(
            self: SqliteReadTx, refs: Sequence[BlobRef], length: int | None = None
        ) -> dict[int, bytes]:
            calls.append(("many", length))
            return await many(self, refs, length)

        async def read_blob(
            self: SqliteReadTx, ref: BlobRef, offset: int = 0, length: int | None = None
        ) -> bytes:
            calls.append(("one", length))
            return await one(self, ref, offset, length)

        monkeypatch.setattr(SqliteReadTx, "read_blobs", read_blobs)
        monkeypatch.setattr(SqliteReadTx, "read_blob", read_blob)
        source = _SearchSource(store, inbox.id, set())
        cands = await source.candidates(list(enumerate(uids, 1)))
        heads = await source.headers(cands)
        assert calls == [("many", search.HEADER_PROBE), ("many", search.HEADER_CAP)]
        assert heads == {
            uids[0]: PLAIN,
            uids[1]: bodies[1][: search.HEADER_CAP],
            uids[2]: MULTIPART,
        }
        calls.clear()
        whole = await source.messages(cands)
        assert calls == [("many", None)]
        assert {u: w.data for u, w in whole.items()} == dict(zip(uids, bodies, strict=True))

        async with store.write() as tx:
            await tx.expunge(inbox.id, [uids[1]])
        calls.clear()
        assert await source.headers(cands) == {uids[0]: PLAIN, uids[2]: MULTIPART}
        whole = await source.messages(cands)
        assert {u: w.data for u, w in whole.items()} == {uids[0]: PLAIN, uids[2]: MULTIPART}
        assert ("many", None) in calls and ("one", None) in calls  # batch, then one by one
    finally:
        await store.close()
