"""Real servers on loopback for integration tests (helpers; fixtures are in conftest).

Each ``Instance`` is a full postkeep (``app.App``) with its own data directory, a
certificate from a throwaway CA (``trustme``) and every listener on an ephemeral port of
127.0.0.1. It runs on its own event loop in a thread, so tests use ordinary blocking
clients (smtplib, imaplib, poplib, raw sockets, openssl, curl) exactly as a user would.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trustme

from postkeep.app import App
from postkeep.auth.passwords import hash_password
from postkeep.config.load import load_config
from postkeep.store.api import MessageRow, Store

T = TypeVar("T")

HOSTNAME = "mail.example.test"
DOMAIN = "example.test"
PASSWORDS = {"alice@example.test": "alice-secret-pw", "bob@example.test": "bob-secret-pw"}
ALL_SERVICES = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")

_HASHES: dict[str, str] = {}


def password_hash(address: str) -> str:
    if address not in _HASHES:
        _HASHES[address] = hash_password(PASSWORDS[address])
    return _HASHES[address]


def client_context(ca: trustme.CA, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """What a careful mail program uses: verify the certificate and the name."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def write_cert(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    cert = ca.issue_cert(*(names or (HOSTNAME, "localhost", "127.0.0.1")))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_path), append=True)
    return cert_path, key_path


def free_port() -> int:
    return free_ports(1)[0]


def _ephemeral_floor() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: Ports for test servers come from below the kernel's ephemeral range, so that the local
#: port of some client's outgoing connection (any test, any process) cannot take a port
#: between the moment it was found free and the moment the server binds it; and above the
#: ports ``make run`` uses (10025…10995). They are handed out in turn from a random start,
#: so this process never hands out a port twice before it has gone round the whole range.
_PORT_RANGE = (12000, max(12001, min(_ephemeral_floor(), 65536)))
_next_port = random.randrange(*_PORT_RANGE)


def _take_port() -> int:
    global _next_port
    port = _next_port
    _next_port = _next_port + 1 if _next_port + 1 < _PORT_RANGE[1] else _PORT_RANGE[0]
    return port


def free_ports(n: int, exclude: Collection[int] = ()) -> list[int]:
    """n distinct free ports, none in ``exclude`` (ports already chosen for the same
    server): all held open at once while they are found."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            port = _take_port()
            if port in exclude:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def write_config(
    directory: Path,
    cert: Path,
    key: Path,
    *,
    services: tuple[str, ...] = ALL_SERVICES,
    ports: dict[str, int] | None = None,
    extra: str = "",
    tls_extra: str = "",
) -> Path:
    ports = ports or {}
    fresh = iter(free_ports(len(services), exclude=set(ports.values())))
    listeners = "\n".join(
        f'{s} = "127.0.0.1:{ports.get(s) or next(fresh)}"' for s in services
    )
    if "[dns]" not in extra:
        # Never the machine's own resolver: outbound delivery of test mail to made-up
        # domains must stay queued (a nameserver that never answers means "try later"),
        # not bounce on whatever the sandbox's resolver says about them.
        extra += f'\n[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\ntimeout = 1.0\n'
    text = f"""
hostname = "{HOSTNAME}"
data_dir = "{directory / 'data'}"

[tls]
cert = "{cert}"
key = "{key}"
reload_interval = 0.5
{tls_extra}

[listeners]
{listeners}

{extra}
"""
    path = directory / "postkeep.toml"
    (directory / "data").mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@dataclass
class Instance:
    """A running postkeep on its own loop and thread."""

    config_path: Path
    app: App | None = None
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def start(self) -> Instance:
        ready: Future[None] = Future()
        self.loop = asyncio.new_event_loop()

        def main() -> None:
            assert self.loop is not None
            asyncio.set_event_loop(self.loop)
            try:
                config = load_config(self.config_path)
                self.app = App(config)
                self.loop.run_until_complete(self.app.start())
            except BaseException as exc:
                ready.set_exception(exc)
                return
            ready.set_result(None)
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True, name="postkeep")
        self.thread.start()
        ready.result(timeout=30)
        assert self.app is not None
        for listener in self.app.listeners:
            self.ports.setdefault(listener.service.value, listener.port)
        return self

    def call(self, coro_fn: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        assert self.loop is not None

        async def run() -> T:
            return await coro_fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    @property
    def store(self) -> Store:
        assert self.app is not None
        return self.app.store

    def stop(self) -> None:
        if self.app is None or self.loop is None:
            return
        self.call(self.app.stop, timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        assert self.thread is not None
        self.thread.join(timeout=10)
        self.loop.close()
        self.app = None

    # -- store helpers ----------------------------------------------------------------
    def add_users(self) -> None:
        async def run() -> None:
            async with self.store.write() as tx:
                if not await tx.domain_exists(DOMAIN):
                    await tx.add_domain(DOMAIN)
                for address in PASSWORDS:
                    if await tx.get_account(address) is None:
                        await tx.add_account(address, password_hash(address))

        self.call(run)

    def add_alias(self, source: str, target: str) -> None:
        async def run() -> None:
            async with self.store.write() as tx:
                await tx.add_alias(source, target)

        self.call(run)

    def inbox(self, address: str, mailbox: str = "INBOX") -> list[tuple[MessageRow, bytes]]:
        async def run() -> list[tuple[MessageRow, bytes]]:
            async with self.store.read() as tx:
                account = await tx.get_account(address)
                assert account is not None
                mbox = await tx.mailbox(account.id, mailbox)
                assert mbox is not None
                rows = await tx.messages(mbox.id)
                return [(row, await tx.read_blob(row.blob)) for row in rows]

        return self.call(run)

    def outbound(self) -> list[Any]:
        async def run() -> list[Any]:
            async with self.store.read() as tx:
                rows = await tx.outbound(1000)
                return [(row, await tx.read_blob(row.blob)) for row in rows]

        return self.call(run)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run_postkeep(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postkeep", *args],
        input=stdin, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


