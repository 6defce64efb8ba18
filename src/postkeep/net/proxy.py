"""PROXY protocol v1 and v2: the client's address, as told by a load balancer in front.

A sans-IO reader of the header HAProxy (``send-proxy``, ``send-proxy-v2``) and cloud TCP
load balancers put before the client's first byte. The listener peeks at the socket,
asks ``HeaderReader.consume`` how many of the peeked bytes belong to the header, and
receives exactly that many: the ClientHello or the client's first command that follows is
never read here.

Specification: "The PROXY protocol", versions 1 and 2 (haproxy.org, proxy-protocol.txt).

Invariants:
- ``consume`` never claims a byte past the header: v1 ends at its CRLF, v2 at 16 bytes
  plus the announced length.
- The header is length-bounded: v1 at 107 bytes (spec §2.1), v2 at ``MAX_V2_LENGTH``.
- Anything malformed raises ``ProxyError`` with a reason fit for a log line; the reader
  is then dead and the connection must be closed.
- ``ProxyHeader.source`` is ``None`` for v2 LOCAL and v1 UNKNOWN (health checks): the
  connection's own address is the one to use.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

#: Spec §2.2: the 12-byte v2 signature.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
V1_PREFIX = b"PROXY "
#: Spec §2.1: "a receiver may read up to 107 bytes", the longest TCP6 line with CRLF.
V1_MAX = 107
#: Spec §2.2 allows 65535 bytes of addresses and TLVs; no load balancer sends more than a
#: few hundred, so a longer header is refused rather than buffered.
MAX_V2_LENGTH = 4096

_V2_CMD_LOCAL = 0x0
_V2_CMD_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
_INET_BLOCK = 12  # 4 + 4 + 2 + 2
_INET6_BLOCK = 36  # 16 + 16 + 2 + 2


class ProxyError(ValueError):
    """A missing or malformed PROXY header; ``str()`` is the reason for the log."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    source: tuple[str, int] | None  # the client; None: use the connection's own address
    destination: tuple[str, int] | None  # the address the client connected to

    @property
    def local(self) -> bool:
        return self.source is None


class HeaderReader:
    """Reads one PROXY header, v1 or v2, from bytes peeked off a socket.

    ``wanted()`` is how many bytes to peek at most; ``consume(peeked)`` keeps the prefix of
    ``peeked`` that is header and returns its length (the caller then receives exactly that
    many bytes); ``header`` is set once the header is complete.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ProxyHeader | None = None

    @property
    def done(self) -> bool:
        return self.header is not None

    def wanted(self) -> int:
        if self.done:
            return 0
        if self._version() == 2 and len(self._buf) >= V2_FIXED:
            return V2_FIXED + _v2_length(bytes(self._buf)) - len(self._buf)
        if self._version() == 2:
            return V2_FIXED - len(self._buf)
        return V1_MAX - len(self._buf)

    def consume(self, peeked: bytes) -> int:
        """Keep the header part of ``peeked``; return how many bytes that is."""
        if self.done:
            return 0
        data = peeked[: self.wanted()]
        if not data:
            return 0
        start = len(self._buf)
        if self._version() == 1 or (not self._buf and data[:1] == b"P"):
            end = data.find(b"\n")
            take = data if end < 0 else data[: end + 1]
            self._buf += take
            self._check_prefix()
            if end >= 0:
                self.header = parse_v1(bytes(self._buf))
            elif len(self._buf) >= V1_MAX:
                raise ProxyError(f"v1 header longer than {V1_MAX} bytes without CRLF")
            return len(self._buf) - start
        self._buf += data
        self._check_prefix()
        if len(self._buf) >= V2_FIXED:
            total = V2_FIXED + _v2_length(bytes(self._buf))
            if len(self._buf) == total:
                self.header = parse_v2(bytes(self._buf))
        return len(self._buf) - start

    def _version(self) -> int:
        return 1 if self._buf[:1] == b"P" else 2

    def _check_prefix(self) -> None:
        buf = bytes(self._buf)
        if buf[:1] == b"P":
            n = min(len(buf), len(V1_PREFIX))
            if buf[:n] != V1_PREFIX[:n]:
                raise ProxyError("no PROXY header (bytes do not start with 'PROXY ')")
            return
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise ProxyError("no PROXY header (neither the v1 text nor the v2 signature)")
        if len(buf) >= V2_FIXED:
            _v2_check_fixed(buf)


def _v2_length(buf: bytes) -> int:
    (length,) = struct.unpack_from("!H", buf, 14)
    return int(length)


def _v2_check_fixed(buf: bytes) -> None:
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"v2 header with version {ver_cmd >> 4}, expected 2")
    if ver_cmd & 0x0F not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
        raise ProxyError(f"v2 header with unknown command {ver_cmd & 0x0F}")
    if _v2_length(buf) > MAX_V2_LENGTH:
        raise ProxyError(f"v2 header announces {_v2_length(buf)} bytes, over {MAX_V2_LENGTH}")


def parse_v2(data: bytes) -> ProxyHeader:
    """A complete v2 header (exactly 16 + length bytes)."""
    if len(data) < V2_FIXED or data[:12] != V2_SIGNATURE:
        raise ProxyError("no PROXY v2 signature")
    _v2_check_fixed(data)
    length = _v2_length(data)
    if len(data) != V2_FIXED + length:
        raise ProxyError(f"v2 header of {len(data)} bytes, announced {V2_FIXED + length}")
    if data[12] & 0x0F == _V2_CMD_LOCAL:
        # Spec §2.2: LOCAL (health checks) — ignore the address block, use the real one.
        return ProxyHeader(2, None, None)
    family, transport = data[13] >> 4, data[13] & 0x0F
    block = data[V2_FIXED:]
    if family == _AF_UNSPEC:
        # Spec §2.2: UNSPEC — accept, and use the connection's own addresses.
        return ProxyHeader(2, None, None)
    if transport != _STREAM:
        raise ProxyError(f"v2 header for transport {transport}; only TCP (STREAM) is served")
    # TLVs after the address block (spec §2.2.7) are skipped: nothing in them is used.
    if family == _AF_INET:
        if length < _INET_BLOCK:
            raise ProxyError(f"v2 TCP4 address block of {length} bytes, needs {_INET_BLOCK}")
        src4 = ipaddress.IPv4Address(block[0:4])
        dst4 = ipaddress.IPv4Address(block[4:8])
        sport, dport = struct.unpack_from("!HH", block, 8)
        return ProxyHeader(2, (str(src4), sport), (str(dst4), dport))
    if family == _AF_INET6:
        if length < _INET6_BLOCK:
            raise ProxyError(f"v2 TCP6 address block of {length} bytes, needs {_INET6_BLOCK}")
        src6 = ipaddress.IPv6Address(block[0:16])
        dst6 = ipaddress.IPv6Address(block[16:32])
        sport, dport = struct.unpack_from("!HH", block, 32)
        return ProxyHeader(2, (_unmap(src6), sport), (_unmap(dst6), dport))
    if family == _AF_UNIX:
        raise ProxyError("v2 header with a UNIX socket address; no client IP to use")
    raise ProxyError(f"v2 header with unknown address family {family}")


def _unmap(ip: ipaddress.IPv6Address) -> str:
    """An IPv4-mapped IPv6 address (``::ffff:203.0.113.7``) is an IPv4 client."""
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


def parse_v1(line: bytes) -> ProxyHeader:
    """A complete v1 line, CRLF included (spec §2.1)."""
    if len(line) > V1_MAX:
        raise ProxyError(f"v1 header longer than {V1_MAX} bytes")
    if not line.startswith(V1_PREFIX):
        raise ProxyError("no PROXY header (bytes do not start with 'PROXY ')")
    if not line.endswith(b"\r\n") or line.count(b"\n") != 1 or line.count(b"\r") != 1:
        raise ProxyError("v1 header does not end with CRLF")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not ASCII") from None
    if not text.isprintable():
        raise ProxyError("v1 header has control characters")
    parts = text.split(" ")
    if parts[1:2] == ["UNKNOWN"]:
        # Spec §2.1: UNKNOWN — the rest of the line is ignored; use the real addresses.
        return ProxyHeader(1, None, None)
    if len(parts) != 6:
        raise ProxyError("v1 header needs 'PROXY TCP4|TCP6 src dst sport dport'")
    _, proto, src, dst, sport, dport = parts
    kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
    if proto == "TCP4":
        kind = ipaddress.IPv4Address
    elif proto == "TCP6":
        kind = ipaddress.IPv6Address
    else:
        raise ProxyError(f"v1 header with protocol {proto!r}; expected TCP4, TCP6 or UNKNOWN")
    try:
        src_ip, dst_ip = kind(src), kind(dst)
    except ValueError:
        raise ProxyError(f"v1 header with an address that is not {proto}") from None
    return ProxyHeader(1, (str(src_ip), _v1_port(sport)), (str(dst_ip), _v1_port(dport)))


def _v1_port(text: str) -> int:
    # Spec §2.1: decimal 0..65535, no leading zeroes.
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or (text[0] == "0" and text != "0"):
        raise ProxyError("v1 header with a port that is not a decimal number")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"v1 header with port {port} out of range")
    return port


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 line (for tests and tools); ``None`` source: ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    ip = ipaddress.ip_address(source[0])
    proto = "TCP4" if ip.version == 4 else "TCP6"
    return (
        f"PROXY {proto} {ip} {ipaddress.ip_address(destination[0])} "
        f"{source[1]} {destination[1]}\r\n"
    ).encode("ascii")


def encode_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header (for tests and tools); ``None`` source: the LOCAL command."""
    if source is None or destination is None:
        fixed = bytes([0x20 | _V2_CMD_LOCAL, _AF_UNSPEC])
        return V2_SIGNATURE + fixed + struct.pack("!H", len(tlvs)) + tlvs
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = _AF_INET if src.version == 4 else _AF_INET6
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return (
        V2_SIGNATURE
        + bytes([0x20 | _V2_CMD_PROXY, family << 4 | _STREAM])
        + struct.pack("!H", len(block))
        + block
    )
