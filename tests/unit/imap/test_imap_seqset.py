"""IMAP sequence sets: parse, format, resolve ``*`` (RFC 3501 §9)."""

from __future__ import annotations

import pytest

from postkeep.imap.seqset import SequenceSet


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("1", ((1, 1),)),
        ("*", ((None, None),)),
        ("1:*", ((1, None),)),
        ("*:4", ((None, 4),)),
        ("5:2", ((5, 2),)),
        ("2,4:7,9,12:*", ((2, 2), (4, 7), (9, 9), (12, None))),
        ("4294967295", ((4294967295, 4294967295),)),
    ],
)
def test_parse_and_format_round_trip(
    text: str, ranges: tuple[tuple[int | None, int | None], ...]
) -> None:
    s = SequenceSet.parse(text)
    assert s.ranges == ranges
    assert s.format() == text
    assert str(s) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",
        "01",
        "1:",
        ":1",
        "1::2",
        "1:2:3",
        "a",
        "1,,2",
        "1,",
        "-1",
        "4294967296",
        "$",
        " 1",
        "1.5",
    ],
)
def test_invalid_sets_raise_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        SequenceSet.parse(text)


def test_range_limit() -> None:
    text = ",".join(str(i) for i in range(1, 101))
    assert len(SequenceSet.parse(text, max_ranges=100).ranges) == 100
    with pytest.raises(ValueError, match="more than 99 ranges"):
        SequenceSet.parse(text, max_ranges=99)


def test_star_resolution() -> None:
    s = SequenceSet.parse("2,4:7,9,12:*")
    assert s.resolve(20) == [(2, 2), (4, 7), (9, 9), (12, 20)]
    # "12:*" with * = 10 is 10:12, which merges with 9.
    assert s.resolve(10) == [(2, 2), (4, 7), (9, 12)]
    # RFC 3501 §6.4.8: "559:*" includes the last message even when 559 is above it.
    assert SequenceSet.parse("559:*").resolve(100) == [(100, 559)]
    assert SequenceSet.parse("*").resolve(0) == []
    assert SequenceSet.parse("3:*,1").resolve(0) == [(1, 1)]
    assert SequenceSet.parse("5:2,3,1:*").resolve(4) == [(1, 5)]


def test_resolve_merges_and_sorts_without_enumerating() -> None:
    s = SequenceSet.parse("1:4294967295,7")
    assert s.resolve(10) == [(1, 4294967295)]
    assert s.contains(4000000000, 10)
    assert not SequenceSet.parse("1:3,7").contains(5, 10)
    assert list(SequenceSet.parse("3:*,1").iter(5)) == [1, 3, 4, 5]
    assert list(SequenceSet.parse("1:4294967295").iter(3)) == [1, 2, 3]


def test_of_builds_the_compact_set() -> None:
    assert SequenceSet.of([5, 1, 2, 3, 9, 10, 3]).format() == "1:3,5,9:10"
    assert SequenceSet.of([7]).format() == "7"
    with pytest.raises(ValueError):
        SequenceSet.of([])


def test_uses_star() -> None:
    assert SequenceSet.parse("1,3:*").uses_star
    assert not SequenceSet.parse("1,3:5").uses_star
