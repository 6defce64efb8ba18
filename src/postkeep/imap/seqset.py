"""IMAP sequence sets (RFC 3501 §9 ``sequence-set``; RFC 9051 §9): parse, format, resolve.

A sequence set names messages by sequence number or by UID: ``1,3:5,9:*``. ``*`` is "the
largest number in use" and is only known when the set meets a mailbox, so a parsed
:class:`SequenceSet` keeps ``*`` symbolic (as ``None``) and :meth:`SequenceSet.resolve`
turns it into concrete, sorted, merged ranges for one mailbox snapshot.

Invariants:

- Every number in a parsed set is an ``nz-number``: 1 ≤ n ≤ 2³²−1 (RFC 3501 §9, §2.3.1.1).
- A parsed set has at least one and at most ``max_ranges`` ranges; anything else raises
  :class:`ValueError` with a sentence naming what was wrong (the core's BAD text).
- ``SequenceSet.parse(s.format()) == s`` for every set, and ``format()`` emits exactly the
  RFC syntax, so a set can be echoed to a client (COPYUID, ESEARCH ALL).
- ``resolve()`` never materialises the members of a range: its cost is in the number of
  ranges, not in their width, so ``1:4294967295`` is as cheap as ``1``.
- ``a:b`` means the same as ``b:a`` (RFC 3501 §9 ``seq-range``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["MAX_NUMBER", "STAR", "SequenceSet"]

#: RFC 3501 §9 ``nz-number``: a non-zero unsigned 32-bit integer.
MAX_NUMBER = 4294967295

#: ``*`` inside a range: "the largest number in use" (RFC 3501 §9 ``seq-number``).
STAR: None = None

#: Default bound on the number of comma-separated elements; the core passes its own limit.
DEFAULT_MAX_RANGES = 10_000

_DIGITS = frozenset("0123456789")


def _number(text: str) -> int | None:
    if text == "*":
        return STAR
    # RFC 3501 §9: nz-number = digit-nz *DIGIT (no leading zero, no sign, no spaces).
    if not text or text[0] == "0" or not set(text) <= _DIGITS or len(text) > 10:
        raise ValueError(f"invalid number {text[:12]!r} in sequence set")
    value = int(text)
    if value > MAX_NUMBER:
        raise ValueError("number in sequence set is larger than 4294967295")
    return value


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """A parsed sequence set. Each range is ``(first, last)``; ``None`` stands for ``*``.

    A single number ``n`` is the range ``(n, n)``; ``*`` alone is ``(None, None)``. The
    ranges keep the client's order and direction so that :meth:`format` round-trips.
    """

    ranges: tuple[tuple[int | None, int | None], ...]

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ValueError("empty sequence set")
        for first, last in self.ranges:
            for n in (first, last):
                if n is not None and not 1 <= n <= MAX_NUMBER:
                    raise ValueError("sequence numbers are between 1 and 4294967295")

    # -- construction ----------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, *, max_ranges: int = DEFAULT_MAX_RANGES) -> SequenceSet:
        """Parse ``sequence-set`` text. Raises ``ValueError`` with a client-safe sentence."""
        if not text:
            raise ValueError("empty sequence set")
        # Cheap pre-check before splitting: bounds the work done on a hostile set.
        if text.count(",") >= max_ranges:
            raise ValueError(f"sequence set has more than {max_ranges} ranges")
        if text.startswith("$"):
            # RFC 5182 SEARCHRES is not offered, so "$" is never a valid set here.
            raise ValueError("'$' (SEARCHRES) is not supported")
        ranges: list[tuple[int | None, int | None]] = []
        for element in text.split(","):
            first, sep, last = element.partition(":")
            if sep:
                if ":" in last:
                    raise ValueError("a range in a sequence set has exactly one ':'")
                ranges.append((_number(first), _number(last)))
            else:
                n = _number(first)
                ranges.append((n, n))
        return cls(tuple(ranges))

    @classmethod
    def of(cls, numbers: Iterable[int]) -> SequenceSet:
        """The most compact set naming exactly ``numbers`` (e.g. for COPYUID, ESEARCH).

        Raises ``ValueError`` when ``numbers`` is empty (an empty set has no syntax).
        """
        ranges: list[tuple[int | None, int | None]] = []
        start = prev = -1
        for n in sorted(set(numbers)):
            if n == prev + 1 and start != -1:
                prev = n
                continue
            if start != -1:
                ranges.append((start, prev))
            start = prev = n
        if start != -1:
            ranges.append((start, prev))
        return cls(tuple(ranges))

    # -- output ----------------------------------------------------------------------
    def format(self) -> str:
        """The RFC 3501 §9 text, e.g. ``1:3,7,9:*``."""
        out = []
        for first, last in self.ranges:
            a = "*" if first is None else str(first)
            if first == last:
                out.append(a)
            else:
                out.append(f"{a}:{'*' if last is None else last}")
        return ",".join(out)

    def __str__(self) -> str:
        return self.format()

    # -- meeting a mailbox -----------------------------------------------------------
    @property
    def uses_star(self) -> bool:
        return any(first is None or last is None for first, last in self.ranges)

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Concrete inclusive ranges, sorted and merged, with ``*`` = ``largest``.

        ``largest`` is the highest sequence number (or UID) in use; 0 for an empty mailbox,
        where ``*`` names nothing. Ranges are not clipped to ``largest``: RFC 3501 §6.4.8
        says ``559:*`` includes the last message even when 559 is above it, so
        ``5:*`` with ``largest=3`` resolves to ``(3, 5)``; the caller intersects with the
        numbers that exist.
        """
        spans: list[tuple[int, int]] = []
        for first, last in self.ranges:
            if (first is None or last is None) and largest < 1:
                continue  # an empty mailbox: "*" and "n:*" name no existing message
            a = largest if first is None else first
            b = largest if last is None else last
            spans.append((min(a, b), max(a, b)))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 1:
                if b > merged[-1][1]:
                    merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return merged

    def contains(self, n: int, largest: int) -> bool:
        """Whether ``n`` is in the set once ``*`` is ``largest``."""
        return any(a <= n <= b for a, b in self.resolve(largest))

    def iter(self, largest: int) -> Iterator[int]:
        """The members in ascending order, ``*`` = ``largest``, capped at ``largest``.

        Meant for sequence numbers, where nothing above ``largest`` exists; for UIDs,
        intersect :meth:`resolve` with the UIDs in use instead.
        """
        for a, b in self.resolve(largest):
            yield from range(a, min(b, largest) + 1)
