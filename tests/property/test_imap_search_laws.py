"""Property tests for IMAP SEARCH evaluation (``imap/search.py``).

- Random key trees over random mailboxes (random message bytes included) never raise and
  return UIDs of candidates, in candidate order.
- Boolean laws: NOT k and k partition the mailbox; OR is union, AND intersection,
  De Morgan holds, and AND/OR are commutative.
- ``load`` is awaited at most once per message, and never for metadata-only keys.
"""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from datetime import UTC, date, datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postkeep.imap.grammar import (
    DateField,
    DateOp,
    SearchAll,
    SearchAnd,
    SearchBody,
    SearchDate,
    SearchFlag,
    SearchHeader,
    SearchKey,
    SearchModSeq,
    SearchNot,
    SearchOr,
    SearchRecent,
    SearchSeq,
    SearchSize,
    SearchText,
    SearchUid,
)
from postkeep.imap.search import Candidate, evaluate
from postkeep.imap.seqset import SequenceSet

WORDS = ["alpha", "Beta", "GRÜSSE", "straße", "café", "x", "", "=?utf-8?q?caf=C3=A9?=", "ø"]
FLAGS = ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "$Junk", "work"]
HEADERS = ["Subject", "From", "To", "Cc", "Bcc", "Date", "X-Tag"]
ZONES = [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=9, minutes=30))]

dates = st.dates(min_value=date(2000, 1, 1), max_value=date(2030, 12, 31))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))  # anything at all may be stored
    fields = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(HEADERS))
        if name == "Date" and draw(st.booleans()):
            when = draw(st.datetimes(min_value=datetime(2000, 1, 1)))
            value = when.strftime("%a, %d %b %Y %H:%M:%S ") + draw(
                st.sampled_from(["+0000", "-0500", "+1400", "-0000"])
            )
        else:
            value = " ".join(draw(st.lists(st.sampled_from(WORDS), max_size=4)))
        fields.append(f"{name}: {value}")
    cte = draw(st.sampled_from(["", "base64", "quoted-printable", "8bit"]))
    if cte:
        fields.append(f"Content-Transfer-Encoding: {cte}")
    body = " ".join(draw(st.lists(st.sampled_from(WORDS), max_size=8)))
    if cte == "base64":
        body = base64.b64encode(body.encode()).decode()
    return ("\r\n".join(fields) + "\r\n\r\n" + body + "\r\n").encode("utf-8")


@st.composite
def mailboxes(draw: st.DrawFn) -> tuple[list[Candidate], dict[int, bytes]]:
    n = draw(st.integers(0, 12))
    gaps = draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
    out: list[Candidate] = []
    data: dict[int, bytes] = {}
    uid = 0
    for seq, gap in enumerate(gaps, 1):
        uid += gap
        day = draw(dates)
        when = datetime(
            day.year,
            day.month,
            day.day,
            draw(st.integers(0, 23)),
            tzinfo=draw(st.sampled_from(ZONES)),
        )
        msg = draw(messages())
        data[uid] = msg
        out.append(
            Candidate(
                seq=seq,
                uid=uid,
                flags=frozenset(draw(st.lists(st.sampled_from(FLAGS), max_size=4))),
                internal_date=when,
                size=len(msg),
                modseq=draw(st.integers(1, 100)),
                recent=draw(st.booleans()),
            )
        )
    return out, data


numbers = st.one_of(st.none(), st.integers(1, 700))
seqsets = st.lists(st.tuples(numbers, numbers), min_size=1, max_size=4).map(
    lambda rs: SequenceSet(tuple(rs))
)

meta_leaves: st.SearchStrategy[SearchKey] = st.one_of(
    st.just(SearchAll()),
    st.builds(SearchFlag, st.sampled_from([*FLAGS, "\\SEEN", "\\recent", "$junk"]), st.booleans()),
    st.builds(SearchRecent, st.booleans()),
    st.builds(SearchDate, st.just(DateField.INTERNAL), st.sampled_from(list(DateOp)), dates),
    st.builds(SearchSize, st.booleans(), st.integers(0, 400)),
    st.builds(SearchSeq, seqsets),
    st.builds(SearchUid, seqsets),
    st.builds(SearchModSeq, st.integers(0, 120)),
)
content_leaves: st.SearchStrategy[SearchKey] = st.one_of(
    st.builds(SearchDate, st.just(DateField.SENT), st.sampled_from(list(DateOp)), dates),
    st.builds(SearchHeader, st.sampled_from(HEADERS), st.sampled_from(WORDS)),
    st.builds(SearchBody, st.sampled_from(WORDS)),
    st.builds(SearchText, st.sampled_from(WORDS)),
)


def trees(leaves: st.SearchStrategy[SearchKey]) -> st.SearchStrategy[SearchKey]:
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.builds(SearchNot, kids),
            st.builds(SearchOr, kids, kids),
            st.lists(kids, max_size=4).map(lambda ks: SearchAnd(tuple(ks))),
        ),
        max_leaves=12,
    )


keys = trees(st.one_of(meta_leaves, content_leaves))
meta_keys = trees(meta_leaves)


class Loader:
    def __init__(self, data: dict[int, bytes]) -> None:
        self.data = data
        self.calls: Counter[int] = Counter()

    async def __call__(self, uid: int) -> bytes:
        self.calls[uid] += 1
        return self.data[uid]


def run(key: SearchKey, box: tuple[list[Candidate], dict[int, bytes]]) -> tuple[list[int], Loader]:
    candidates, data = box
    loader = Loader(data)
    return asyncio.run(evaluate(key, candidates, loader)), loader


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(keys, mailboxes())
def test_any_tree_evaluates_to_candidate_uids_in_order(
    key: SearchKey, box: tuple[list[Candidate], dict[int, bytes]]
) -> None:
    got, loader = run(key, box)
    uids = [c.uid for c in box[0]]
    assert got == [u for u in uids if u in set(got)]  # a subsequence of the mailbox
    assert all(n == 1 for n in loader.calls.values())  # loaded at most once each


@SETTINGS
@given(meta_keys, mailboxes())
def test_metadata_trees_never_load(
    key: SearchKey, box: tuple[list[Candidate], dict[int, bytes]]
) -> None:
    _, loader = run(key, box)
    assert not loader.calls


@SETTINGS
@given(keys, mailboxes())
def test_not_k_and_k_partition_the_mailbox(
    key: SearchKey, box: tuple[list[Candidate], dict[int, bytes]]
) -> None:
    yes, _ = run(key, box)
    no, _ = run(SearchNot(key), box)
    assert set(yes).isdisjoint(no)
    assert sorted(yes + no) == [c.uid for c in box[0]]
    assert run(SearchNot(SearchNot(key)), box)[0] == yes


@SETTINGS
@given(keys, keys, mailboxes())
def test_or_is_union_and_is_intersection(
    a: SearchKey, b: SearchKey, box: tuple[list[Candidate], dict[int, bytes]]
) -> None:
    ra, rb = set(run(a, box)[0]), set(run(b, box)[0])
    assert set(run(SearchOr(a, b), box)[0]) == ra | rb
    assert run(SearchOr(a, b), box)[0] == run(SearchOr(b, a), box)[0]
    assert set(run(SearchAnd((a, b)), box)[0]) == ra & rb
    assert run(SearchAnd((a, b)), box)[0] == run(SearchAnd((b, a)), box)[0]
    # De Morgan
    assert (
        run(SearchNot(SearchOr(a, b)), box)[0]
        == run(SearchAnd((SearchNot(a), SearchNot(b))), box)[0]
    )
    assert set(run(SearchOr(a, SearchAll()), box)[0]) == {c.uid for c in box[0]}
