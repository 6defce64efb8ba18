"""Property tests: MIME analysis takes any bytes, and its sizes match the bytes it points at.

(Named ``test_mime_property.py`` rather than ``test_mime.py``: ``tests/`` has no
``__init__.py``, so pytest's default import mode cannot collect two ``test_mime`` modules.)
"""

from __future__ import annotations

import itertools
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from postkeep.imap import responses
from postkeep.mail import mime
from postkeep.mail.mime import (
    Analysis,
    Value,
    body_of,
    decoded_header,
    header_date,
    header_fields,
    section_range,
    text_for_search,
)

# Fragments that steer random input towards the parser's decisions.
_FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b"--b",
    b"--b--",
    b"--b\r\n",
    b"--c\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b'Content-Type: multipart/digest; boundary="c"\n',
    b"Content-Type: message/rfc822\r\n",
    b"Content-Type: message/global\n",
    b"Content-Type: text/plain; charset=utf-8\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Disposition: attachment; filename*0*=x\r\n",
    b"To: a <b@c>, g: d@e;\r\n",
    b"From: ",
    b"Subject: =?utf-8?q?=C3=A9?=\r\n",
    b"Date: Tue, 1 Jan 2030 10:00:00 +0000\r\n",
    b" folded\r\n",
    b"(",
    b")",
    b'"',
    b"\\",
    b"<",
    b">",
    b"@",
    b",",
    b":",
    b";",
    b"=",
    b"\xff",
    b"\xc3\xa9",
    b"\x00",
]
_messy = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.binary(max_size=12)), max_size=40).map(
    b"".join
)


def _check(data: bytes, a: Analysis) -> None:
    n = len(data)
    assert a.parts[""].start == 0 and a.parts[""].end == n
    assert body_of(a.bodystructure) == a.body
    assert Analysis.from_json(a.to_json()) == a
    assert Analysis.from_columns(a.envelope_json(), a.structure_json()) == a
    assert len(a.parts) <= mime.MAX_PARTS + 1
    for name, span in a.parts.items():
        assert 0 <= span.start <= span.body_start <= span.end <= n, name
        if span.is_message_rfc822:
            assert span.text_start is not None
            assert span.body_start <= span.text_start <= span.end, name
        if "." in name:  # a child lies inside its parent's body
            parent = a.parts[name.rsplit(".", 1)[0]]
            assert parent.body_start <= span.start and span.end <= parent.end, name
    # siblings are in order and do not overlap
    by_parent: dict[str, list[mime.PartSpan]] = {}
    for name, span in a.parts.items():
        if name:
            by_parent.setdefault(name.rpartition(".")[0], []).append(span)
    for spans in by_parent.values():
        for left, right in itertools.pairwise(spans):
            assert left.end <= right.start
    for name in a.parts:
        for suffix in ("", ".MIME", ".HEADER", ".TEXT"):
            section = (name + suffix).lstrip(".")
            rng = section_range(a, section, n)
            if rng is not None:
                assert 0 <= rng[0] <= rng[1] <= n, section
    assert _nesting(a.bodystructure) <= mime.MAX_DEPTH + 5
    # they go on the wire as they are (imap.responses refuses nesting over 64)
    responses.encode_value(cast(responses.Value, a.bodystructure))
    responses.encode_value(cast(responses.Value, a.envelope))


def _nesting(value: Value) -> int:
    if not isinstance(value, list):
        return 0
    return 1 + max((_nesting(x) for x in value), default=0)


@settings(max_examples=300, deadline=None)
@given(_messy)
def test_any_bytes_give_a_consistent_analysis(data: bytes) -> None:
    # mime._analyze has no safety net: a parser bug would surface here as an exception.
    a = mime._analyze(data)
    _check(data, a)
    assert mime.analyze(data) == a
    text_for_search(data, headers=True, body=True, limit=500)
    decoded_header(data, "subject")
    header_date(data)
    rng = section_range(a, "HEADER", len(data))
    assert rng is not None
    assert header_fields(data[rng[0] : rng[1]], ["to", "from"], exclude=True).endswith(b"\r\n")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000))
def test_raw_binary_never_breaks_analysis(data: bytes) -> None:
    _check(data, mime._analyze(data))


# --- generated well-formed messages ------------------------------------------------------

_LINE = st.text(alphabet="abcXYZ 019.,:;=_é", max_size=12)
_LEAF_TYPES = [
    None,
    "text/plain; charset=utf-8",
    "text/html",
    "application/octet-stream",
    "image/png",
]
_leaf = st.tuples(
    st.just("leaf"), st.sampled_from(_LEAF_TYPES), st.lists(_LINE, max_size=4), st.booleans()
)
_tree = st.recursive(
    _leaf,
    lambda kids: st.one_of(
        st.tuples(
            st.just("multi"),
            st.sampled_from(["mixed", "alternative", "related"]),
            st.lists(kids, min_size=1, max_size=4),
            st.booleans(),  # with a preamble and an epilogue
        ),
        st.tuples(st.just("msg"), kids),
    ),
    max_leaves=12,
)


class _Renderer:
    def __init__(self, eol: bytes) -> None:
        self.eol = eol
        self.expected: dict[str, bytes] = {}
        self.boundaries = 0

    @staticmethod
    def child(prefix: str, index: int) -> str:
        return f"{prefix}.{index}" if prefix else str(index)

    def message(self, node: Any, prefix: str) -> bytes:
        section = prefix if node[0] == "multi" else self.child(prefix, 1)
        headers, body = self.entity(node, section)
        return self.eol.join([b"Subject: generated", *headers, b""]) + self.eol + body

    def entity(self, node: Any, section: str) -> tuple[list[bytes], bytes]:
        eol = self.eol
        if node[0] == "leaf":
            _, ctype, lines, final_eol = node
            body = eol.join(line.encode() for line in lines) + (eol if final_eol else b"")
            self.expected[section] = body
            return ([b"Content-Type: " + ctype.encode()] if ctype else []), body
        if node[0] == "msg":
            body = self.message(node[1], section)
            self.expected[section] = body
            return [b"Content-Type: message/rfc822"], body
        _, subtype, children, frame = node
        self.boundaries += 1
        boundary = b"=_b%d" % self.boundaries
        out = b"preamble" + eol if frame else b""
        for i, kid in enumerate(children, 1):
            headers, body = self.entity(kid, self.child(section, i))
            out += b"--" + boundary + eol + b"".join(h + eol for h in headers) + eol + body + eol
        out += b"--" + boundary + b"--" + eol + (b"epilogue" + eol if frame else b"")
        header = b'Content-Type: multipart/%s; boundary="%s"' % (subtype.encode(), boundary)
        return [header], out


def _leaves(bs: list[Value], prefix: str = "") -> list[tuple[str, list[Value]]]:
    out: list[tuple[str, list[Value]]] = []

    def multipart(node: list[Value], p: str) -> None:
        for i, sub in enumerate(node, 1):
            if not isinstance(sub, list):
                return
            if isinstance(sub[0], list):
                multipart(sub, _Renderer.child(p, i))
            else:
                single(sub, _Renderer.child(p, i))

    def single(node: list[Value], section: str) -> None:
        out.append((section, node))
        if node[0] == "MESSAGE" and isinstance(node[8], list):
            message(node[8], section)

    def message(node: list[Value], p: str) -> None:
        if isinstance(node[0], list):
            multipart(node, p)
        else:
            single(node, _Renderer.child(p, 1))

    message(bs, prefix)
    return out


@settings(max_examples=150, deadline=None)
@given(_tree, st.sampled_from([b"\r\n", b"\n"]))
def test_generated_multiparts_sizes_equal_section_lengths(tree: Any, eol: bytes) -> None:
    r = _Renderer(eol)
    data = r.message(tree, "")
    a = mime._analyze(data)
    _check(data, a)
    n = len(data)
    # Every generated body is exactly what BODY[section] returns ...
    for section, body in r.expected.items():
        rng = section_range(a, section, n)
        assert rng is not None, section
        assert data[rng[0] : rng[1]] == body, section
    # ... and every announced size and line count is that of BODY[section].
    leaves = _leaves(a.bodystructure)
    assert {s for s, _ in leaves} == set(r.expected)
    for section, node in leaves:
        rng = section_range(a, section, n)
        assert rng is not None
        chunk = data[rng[0] : rng[1]]
        assert node[6] == len(chunk), section
        line_count = chunk.count(b"\n") + (1 if chunk and not chunk.endswith(b"\n") else 0)
        if node[0] == "TEXT":
            assert node[7] == line_count, section
        if node[0] == "MESSAGE":
            assert node[9] == line_count, section
            # the encapsulated message's header and text split its bytes in two
            head = section_range(a, section + ".HEADER", n)
            text = section_range(a, section + ".TEXT", n)
            assert head is not None and text is not None
            assert head[0] == rng[0] and head[1] == text[0] and text[1] == rng[1]
