"""Fixtures for TLS tests: certificate pairs and a real loopback TLS echo server.

The server asks for its context per connection (like ``net/listener`` will), so a reload
between two connections is visible to the second one only.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from postkeep.tls.certs import generate_self_signed
from postkeep.tls.policy import describe

TIMEOUT = 5.0


@dataclass
class Pair:
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def pair_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Pair]:
    """Generated pairs, cached by name, so each RSA key is made once per session."""
    made: dict[str, Pair] = {}

    def make(name: str = "a") -> Pair:
        if name not in made:
            d = tmp_path_factory.mktemp(f"pair-{name}")
            made[name] = Pair(d / "cert.pem", d / "key.pem")
            generate_self_signed(f"{name}.mail.test", made[name].cert, made[name].key)
        return made[name]

    return make


@pytest.fixture
def pair(tmp_path: Path, pair_factory: Callable[[str], Pair]) -> Pair:
    """A private copy of pair "a" in tmp_path (tests may overwrite it)."""
    src = pair_factory("a")
    dst = Pair(tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem")
    dst.cert.parent.mkdir()
    shutil.copy2(src.cert, dst.cert)
    shutil.copy2(src.key, dst.key)
    dst.key.chmod(0o600)
    return dst


@dataclass
class ServerSide:
    version: str | None = None
    cipher: tuple[str, str, int] | None = None
    compression: str | None = None
    alpn: str | None = None
    error: Exception | None = None


@dataclass
class EchoServer:
    """Threaded TLS echo server on 127.0.0.1; one thread per connection."""

    get_context: Callable[[], ssl.SSLContext]
    sock: socket.socket = field(init=False)
    sessions: list[ServerSide] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self.threads.append(t)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            side = ServerSide()
            self.sessions.append(side)
            ctx = self.get_context()  # per connection, at accept time
            t = threading.Thread(target=self._serve, args=(conn, ctx, side), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket, ctx: ssl.SSLContext, side: ServerSide) -> None:
        conn.settimeout(TIMEOUT)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                side.version = tls.version()
                side.cipher = tls.cipher()
                side.compression = tls.compression()
                side.alpn = tls.selected_alpn_protocol()
                while data := tls.recv(4096):
                    tls.sendall(data)
        except (ssl.SSLError, OSError) as exc:
            side.error = exc
        finally:
            conn.close()

    def connect(self, client: ssl.SSLContext, server_hostname: str | None = None) -> ssl.SSLSocket:
        raw = socket.create_connection(self.address, timeout=TIMEOUT)
        try:
            return client.wrap_socket(raw, server_hostname=server_hostname)
        except BaseException:
            raw.close()
            raise

    def handshake(self, client: ssl.SSLContext) -> Result:
        """One connection: handshake, one echo round trip, close."""
        try:
            tls = self.connect(client)
        except (ssl.SSLError, OSError) as exc:
            return Result(error=exc)
        with tls:
            tls.sendall(b"ping\r\n")
            echoed = tls.recv(100)
            der = tls.getpeercert(binary_form=True)
            return Result(
                version=tls.version(),
                cipher=tls.cipher(),
                compression=tls.compression(),
                alpn=tls.selected_alpn_protocol(),
                peer_der=der,
                echoed=echoed,
                description=describe(tls),
            )

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
        self.sock.close()
        for t in self.threads:
            t.join(TIMEOUT)


@dataclass
class Result:
    version: str | None = None
    cipher: tuple[str, str, int] | None = None
    compression: str | None = None
    alpn: str | None = None
    peer_der: bytes | None = None
    echoed: bytes = b""
    error: Exception | None = None
    description: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.echoed == b"ping\r\n"


@pytest.fixture
def echo_server() -> Iterator[Callable[[Callable[[], ssl.SSLContext]], EchoServer]]:
    servers: list[EchoServer] = []

    def start(get_context: Callable[[], ssl.SSLContext]) -> EchoServer:
        server = EchoServer(get_context)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, level: int | None = None) -> list[str]:
        return [r.getMessage() for r in self.records if level is None or r.levelno == level]


@pytest.fixture
def tls_log() -> Iterator[Records]:
    """Records of the ``postkeep.tls`` logger, whatever the root logger's setup is."""
    logger = logging.getLogger("postkeep.tls")
    handler = Records()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    with contextlib.ExitStack() as stack:
        stack.callback(logger.removeHandler, handler)
        stack.callback(logger.setLevel, old_level)
        yield handler
