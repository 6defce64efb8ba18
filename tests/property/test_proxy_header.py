"""PROXY header reader (net/proxy.py): round trips under every chunking, garbage only
ever raises ProxyError, and the reader never claims a byte past the header."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from postkeep.net.proxy import (
    MAX_V2_LENGTH,
    V1_MAX,
    HeaderReader,
    ProxyError,
    ProxyHeader,
    encode_v1,
    encode_v2,
)

ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
endpoints = st.one_of(
    st.tuples(st.tuples(v4, ports), st.tuples(v4, ports)),
    st.tuples(st.tuples(v6, ports), st.tuples(v6, ports)),
)
tlv_bytes = st.binary(max_size=64)


def run(stream: bytes, chunks: list[int]) -> tuple[ProxyHeader | None, int]:
    """Feed as the listener does; returns (header, bytes consumed). Raises ProxyError."""
    reader = HeaderReader()
    pos = 0
    sizes = iter(chunks)
    while reader.header is None and pos < len(stream):
        size = max(1, next(sizes, 4096))
        peeked = stream[pos : pos + min(size, reader.wanted())]
        n = reader.consume(peeked)
        assert 0 < n <= len(peeked)
        pos += n
    return reader.header, pos


@given(endpoints, st.binary(max_size=200), st.lists(st.integers(1, 40)))
def test_v1_round_trip_under_any_chunking(ends, rest, chunks):
    src, dst = ends
    raw = encode_v1(src, dst)
    header, used = run(raw + rest, chunks)
    assert used == len(raw)
    assert header == ProxyHeader(1, src, dst)


@given(endpoints, tlv_bytes, st.binary(max_size=200), st.lists(st.integers(1, 40)))
def test_v2_round_trip_under_any_chunking(ends, tlvs, rest, chunks):
    src, dst = ends
    raw = encode_v2(src, dst, tlvs=tlvs)
    header, used = run(raw + rest, chunks)
    assert used == len(raw)
    assert header == ProxyHeader(2, src, dst)


@given(st.sampled_from(["v1", "v2"]), endpoints, st.data())
def test_truncations_never_complete(kind, ends, data):
    raw = encode_v1(*ends) if kind == "v1" else encode_v2(*ends)
    cut = data.draw(st.integers(0, len(raw) - 1))
    header, used = run(raw[:cut], data.draw(st.lists(st.integers(1, 40))))
    assert header is None and used == cut


@given(st.binary(max_size=300), st.lists(st.integers(1, 64)))
def test_garbage_only_raises_proxy_error_and_stays_bounded(stream, chunks):
    try:
        header, used = run(stream, chunks)
    except ProxyError:
        return
    assert used <= max(V1_MAX, 16 + MAX_V2_LENGTH)
    if header is not None:
        if header.version == 1:
            assert stream[:used].endswith(b"\r\n") and used <= V1_MAX
        if header.source is not None:
            ipaddress.ip_address(header.source[0])


@given(st.binary(min_size=1, max_size=120), st.binary(max_size=50))
def test_v1_like_lines_never_overread(body, rest):
    stream = b"PROXY " + body + b"\r\n" + rest
    try:
        header, used = run(stream, [])
    except ProxyError:
        return
    if header is not None:
        assert used == stream.index(b"\n") + 1
