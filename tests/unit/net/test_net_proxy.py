"""PROXY protocol v1/v2 reader (net/proxy.py) and the [proxy_protocol] config section."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path

import pytest

from postkeep.config.load import load_config, render_config
from postkeep.config.schema import Service
from postkeep.errors import ConfigError
from postkeep.net.proxy import (
    MAX_V2_LENGTH,
    V1_MAX,
    V2_SIGNATURE,
    HeaderReader,
    ProxyError,
    ProxyHeader,
    encode_v1,
    encode_v2,
    parse_v1,
    parse_v2,
)

CLIENT = ("203.0.113.7", 51234)
NODE = ("10.0.0.5", 465)
HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # the start of a ClientHello


def read(stream: bytes, chunk: int = 4096) -> tuple[ProxyHeader, bytes]:
    """Drive a HeaderReader as the listener does: peek, consume, receive; return the rest."""
    reader = HeaderReader()
    pos = 0
    while reader.header is None:
        peeked = stream[pos : pos + min(chunk, reader.wanted())]
        if not peeked:
            raise ProxyError("closed")
        n = reader.consume(peeked)
        assert 0 < n <= len(peeked)
        pos += n
    return reader.header, stream[pos:]


# -- v1 -----------------------------------------------------------------------------------


def test_v1_tcp4_gives_the_client_address_and_leaves_the_command():
    header, rest = read(b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 465\r\nEHLO x\r\n")
    assert header == ProxyHeader(1, CLIENT, NODE)
    assert rest == b"EHLO x\r\n"


def test_v1_tcp6():
    line = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 25\r\n"
    assert parse_v1(line) == ProxyHeader(1, ("2001:db8::7", 4000), ("2001:db8::1", 25))


def test_v1_unknown_means_the_connection_s_own_address():
    assert parse_v1(b"PROXY UNKNOWN\r\n").local
    assert parse_v1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").local


def test_v1_longest_lines_are_accepted():
    src = "ffff:" * 7 + "ffff"
    line = f"PROXY TCP6 {src} {src} 65535 65535\r\n".encode()
    header, rest = read(line + HELLO, chunk=7)
    assert header.source == (src, 65535) and rest == HELLO
    # Spec §2.1's worst case, 107 bytes.
    line = f"PROXY UNKNOWN {src} {src} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX
    header, rest = read(line + HELLO, chunk=7)
    assert header.local and rest == HELLO


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 203.0.113.7 10.0.0.5 51234\r\n",  # a port missing
        b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 465 9\r\n",
        b"PROXY TCP4 2001:db8::7 10.0.0.5 1 2\r\n",  # family mismatch
        b"PROXY TCP6 203.0.113.7 10.0.0.5 1 2\r\n",
        b"PROXY TCP4 203.0.113.256 10.0.0.5 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.5 65536 2\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.5 0465 2\r\n",  # leading zero
        b"PROXY TCP4 203.0.113.7 10.0.0.5 -1 2\r\n",
        b"PROXY UDP4 203.0.113.7 10.0.0.5 1 2\r\n",
        b"PROXY TCP4  203.0.113.7 10.0.0.5 1 2\r\n",  # two spaces
        b"PROXY TCP4 203.0.113.7 10.0.0.5 1 2\n",  # bare LF
        b"PROXY TCP4 203.0.113.7 10.0.0.5 1 2\r\r\n",
        b"PROXY TCP4 203.0.113.7\t10.0.0.5 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.5 1 \xff\r\n",
    ],
)
def test_v1_malformed_is_refused(line):
    with pytest.raises(ProxyError):
        read(line + b"EHLO x\r\n")


def test_v1_without_crlf_is_refused_at_107_bytes_without_reading_more():
    reader = HeaderReader()
    data = b"PROXY UNKNOWN " + b"x" * 200
    with pytest.raises(ProxyError, match="107"):
        while True:
            n = reader.consume(data[: reader.wanted()])
            data = data[n:]
    assert reader.wanted() <= V1_MAX


def test_not_a_proxy_header_is_refused_at_the_first_wrong_byte():
    for data in (b"EHLO x\r\n", HELLO, b"PROXX", b"\r\n\r\nX", b"GET / HTTP/1.1\r\n"):
        with pytest.raises(ProxyError, match="no PROXY header"):
            HeaderReader().consume(data)


# -- v2 -----------------------------------------------------------------------------------


def test_v2_tcp4_then_clienthello_is_not_touched():
    header, rest = read(encode_v2(CLIENT, NODE) + HELLO)
    assert header == ProxyHeader(2, CLIENT, NODE)
    assert rest == HELLO


def test_v2_tcp6_and_v4_mapped():
    header, _ = read(encode_v2(("2001:db8::7", 1), ("2001:db8::1", 2)))
    assert header.source == ("2001:db8::7", 1)
    block = (
        ipaddress.IPv6Address("::ffff:203.0.113.7").packed
        + ipaddress.IPv6Address("::1").packed
        + struct.pack("!HH", 5, 6)
    )
    raw = V2_SIGNATURE + bytes([0x21, 0x21]) + struct.pack("!H", len(block)) + block
    assert parse_v2(raw).source == ("203.0.113.7", 5)


def test_v2_tlvs_are_skipped():
    tlvs = bytes([0x01, 0x00, 0x02]) + b"h2" + bytes([0x04, 0x00, 0x03]) + b"\x00\x00\x00"
    header, rest = read(encode_v2(CLIENT, NODE, tlvs=tlvs) + b"EHLO x\r\n", chunk=5)
    assert header.source == CLIENT and rest == b"EHLO x\r\n"


def test_v2_local_means_the_connection_s_own_address():
    header, rest = read(encode_v2(None, None) + HELLO)
    assert header.local and header.version == 2 and rest == HELLO
    # LOCAL ignores whatever address block follows (spec §2.2).
    block = bytes(12)
    raw = V2_SIGNATURE + bytes([0x20, 0x11]) + struct.pack("!H", 12) + block
    assert parse_v2(raw).local


def test_v2_unspec_family_is_local():
    raw = V2_SIGNATURE + bytes([0x21, 0x00]) + struct.pack("!H", 0)
    assert parse_v2(raw).local


@pytest.mark.parametrize(
    ("ver_cmd", "fam", "block", "reason"),
    [
        (0x11, 0x11, bytes(12), "version 1"),
        (0x22, 0x11, bytes(12), "unknown command"),
        (0x21, 0x12, bytes(12), "transport"),  # UDP
        (0x21, 0x11, bytes(11), "needs 12"),
        (0x21, 0x21, bytes(35), "needs 36"),
        (0x21, 0x31, bytes(216), "UNIX"),
        (0x21, 0x41, bytes(12), "family"),
    ],
)
def test_v2_malformed_is_refused(ver_cmd, fam, block, reason):
    raw = V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(block)) + block
    with pytest.raises(ProxyError, match=reason):
        read(raw + HELLO)


def test_v2_length_is_bounded_before_anything_is_buffered():
    raw = V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", MAX_V2_LENGTH + 1)
    reader = HeaderReader()
    with pytest.raises(ProxyError, match="over"):
        reader.consume(raw)


def test_v2_reads_16_bytes_then_exactly_the_announced_length():
    raw = encode_v2(CLIENT, NODE)
    reader = HeaderReader()
    assert reader.wanted() == 16
    assert reader.consume(raw + HELLO) == 16
    assert reader.wanted() == len(raw) - 16
    assert reader.consume(raw[16:] + HELLO) == len(raw) - 16
    assert reader.header is not None and reader.wanted() == 0


def test_truncated_headers_are_incomplete_not_accepted():
    for raw in (encode_v2(CLIENT, NODE), encode_v1(CLIENT, NODE)):
        for cut in range(1, len(raw)):
            reader = HeaderReader()
            data = raw[:cut]
            while data:
                n = reader.consume(data[: reader.wanted()])
                data = data[n:]
            assert reader.header is None, cut


# -- config -------------------------------------------------------------------------------


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "postkeep.toml"
    path.write_text(
        render_config(
            hostname="mail.example.com", data_dir="d", cert="tls/cert.pem", key="tls/key.pem",
            listeners={Service.SUBMISSIONS: "127.0.0.1:465", Service.SMTP: "127.0.0.1:25"},
        )
        + body
    )
    return path


def test_config_proxy_protocol_networks(tmp_path):
    path = _write(
        tmp_path,
        '[proxy_protocol]\nsubmissions = ["10.0.0.0/8", "127.0.0.1"]\nsmtp = ["2001:db8::/32"]\n',
    )
    config = load_config(path, check_tls_files=False)
    assert config.proxy_protocol == {
        Service.SUBMISSIONS: (
            ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")
        ),
        Service.SMTP: (ipaddress.ip_network("2001:db8::/32"),),
    }


def test_config_without_proxy_protocol_is_off_and_rendered_as_a_comment(tmp_path):
    path = _write(tmp_path, "")
    assert load_config(path, check_tls_files=False).proxy_protocol == {}
    assert '# submissions = ["10.0.0.0/8"]' in path.read_text()


def test_render_proxy_protocol_round_trips(tmp_path):
    path = tmp_path / "postkeep.toml"
    path.write_text(
        render_config(
            hostname="mail.example.com", data_dir="d", cert="tls/cert.pem", key="tls/key.pem",
            listeners={Service.IMAPS: "127.0.0.1:993"},
            proxy_protocol={Service.IMAPS: ["192.0.2.0/24"]},
        )
    )
    assert load_config(path, check_tls_files=False).proxy_protocol == {
        Service.IMAPS: (ipaddress.ip_network("192.0.2.0/24"),)
    }


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ('submissions = ["10.0.0.1/8"]', "submissions", "did you mean 10.0.0.0/8"),
        ('submissions = ["mail.example.com"]', "submissions", "not a network"),
        ("submissions = []", "submissions", "refuse every connection"),
        ('submissions = "10.0.0.0/8"', "submissions", "expected a list"),
        ("submissions = [1]", "submissions", "strings"),
        ('http = ["10.0.0.0/8"]', "http", "HTTP proxy"),
        ('smpt = ["10.0.0.0/8"]', "smpt", "did you mean"),
    ],
)
def test_config_proxy_protocol_errors_name_the_key(tmp_path, body, key, message):
    path = _write(tmp_path, f"[proxy_protocol]\n{body}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, check_tls_files=False)
    assert f"[proxy_protocol] {key}" in str(err.value)
    assert message in str(err.value)
