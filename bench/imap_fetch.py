"""IMAP on a large mailbox, and the memory an idle IMAP connection costs.

Starts a real ``postkeep serve`` (imaps only) on a mailbox of N messages (default 5,000;
about a third \\Seen, a few with "needle" in the Subject, each 2-6 KB), then prints one
line per figure:

- SELECT INBOX time;
- ``FETCH 1:* (UID FLAGS RFC822.SIZE ENVELOPE)`` time;
- ``UID SEARCH`` times: ``SUBJECT needle`` (reads every message), ``UNSEEN`` (flags only)
  and ``BODY needle`` (decodes every body);
- the server's RSS per idle connection: VmRSS from /proc/<pid>/status before and after
  opening C implicit-TLS connections (default 1,000) that each LOGIN, SELECT INBOX and IDLE.

Each timing is the median of three runs on one connection, measured at the client (TLS
and the client's parsing included). postkeep runs once per storage backend (``--backends``,
default both): SQLite, and PostgreSQL on a throwaway server the bench starts; each figure is
printed for each backend, followed by its PostgreSQL/SQLite ratio from the same run
(PostgreSQL's time or memory over SQLite's: above 1, PostgreSQL costs more), and the store
commits per message of the load. Peers (Dovecot) are started when one is
installed and wired here; the output says when none was.

    python bench/imap_fetch.py [-n 5000] [-c 1000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from backends import add_backends_option, run_each, use_backend

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
USER, PASSWORD = "bench@example.test", "bench-password-1"
HOST = "mail.example.test"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure of one backend; LABEL is the same for every backend."""

    label: str
    value: float
    unit: str
    note: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"postkeep serve exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(port)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# -- the mailbox ---------------------------------------------------------------------------
WORDS = ("report budget meeting lunch invoice travel status update project review quarterly "
         "draft notes agenda follow-up reminder schedule").split()


def message(i: int, rng: random.Random) -> bytes:
    when = datetime(2023, 1, 1, tzinfo=UTC) + timedelta(minutes=37 * i)
    subject = " ".join(rng.choice(WORDS) for _ in range(4))
    if i % 250 == 0:
        subject += " needle"
    lines = rng.randint(20, 70)
    body_lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(lines)]
    if i % 500 == 7:
        body_lines.insert(3, "a needle in the body")
    return (
        f"Return-Path: <sender{i % 97}@example.org>\r\n"
        f"Received: from mx.example.org (mx.example.org [192.0.2.{i % 250}])\r\n"
        f"\tby {HOST} with ESMTPS id Q{i:08d}; {when:%a, %d %b %Y %H:%M:%S} +0000\r\n"
        f"From: Sender {i % 97} <sender{i % 97}@example.org>\r\n"
        f"To: Bench <{USER}>\r\n"
        f"Cc: team{i % 7}@example.org\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {when:%a, %d %b %Y %H:%M:%S} +0000\r\n"
        f"Message-ID: <bench{i}@example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n" + "\r\n".join(body_lines) + "\r\n"
    ).encode()


async def prefill(config_path: Path, n: int) -> int:
    """N messages into the bench user's INBOX through the store's IMAP APPEND path, on the
    configured backend; returns the store commits it took."""
    from postkeep.config.load import load_config
    from postkeep.ingest import Ingest
    from postkeep.store import make_store

    config = load_config(config_path)
    store = make_store(config)
    await store.open()
    try:
        async with store.read() as tx:
            account = await tx.get_account(USER)
            assert account is not None
            inbox = await tx.mailbox(account.id, "INBOX")
            assert inbox is not None
        ingest = Ingest(store, config.hostname)
        rng = random.Random(1)
        seen = frozenset({"\\Seen"})
        for start in range(0, n, 250):  # concurrent appends share group commits
            batch = [(i, message(i, rng)) for i in range(start, min(n, start + 250))]
            await asyncio.gather(*(
                ingest.append(inbox.id, io.BytesIO(data), len(data),
                              seen if i % 3 == 0 else frozenset())
                for i, data in batch
            ))
    finally:
        await store.close()
    return store.stats.commits


# -- a small IMAP client -------------------------------------------------------------------
class Imap:
    """Just enough IMAP for the bench: tagged commands, literals, IDLE."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.n = reader, writer, 0

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> Imap:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=HOST, limit=1 << 24)
        client = cls(reader, writer)
        greeting = await reader.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"greeting: {greeting!r}")
        return client

    async def response_line(self) -> bytes:
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        parts = [line]
        while (m := re.search(rb"\{(\d+)\}\r\n\Z", line)) is not None:
            parts.append(await self.reader.readexactly(int(m.group(1))))
            line = await self.reader.readline()
            parts.append(line)
        return b"".join(parts)

    async def command(self, text: str) -> list[bytes]:
        self.n += 1
        tag = f"b{self.n}".encode()
        self.writer.write(tag + b" " + text.encode() + b"\r\n")
        untagged: list[bytes] = []
        while True:
            line = await self.response_line()
            if line.startswith(tag + b" "):
                if not line[len(tag) + 1:].startswith(b"OK"):
                    raise RuntimeError(f"{text.split()[0]}: {line!r}")
                return untagged
            untagged.append(line)

    async def idle(self) -> None:
        self.n += 1
        self.writer.write(b"b%d IDLE\r\n" % self.n)
        while not (await self.response_line()).startswith(b"+"):
            pass

    def close(self) -> None:
        self.writer.transport.abort()


async def timed(fn: Callable[[], Awaitable[T]], runs: int = 3) -> tuple[float, T]:
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        result = await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


async def measure(port: int, pid: int, n: int, c: int, ctx: ssl.SSLContext) -> list[Figure]:
    out: list[Figure] = []
    imap = await Imap.connect(port, ctx)
    await imap.command(f'LOGIN "{USER}" "{PASSWORD}"')

    t, res = await timed(lambda: imap.command("SELECT INBOX"))
    exists = [ln for ln in res if re.match(rb"\* \d+ EXISTS", ln)]
    assert exists and int(exists[0].split()[1]) == n, exists
    out.append(Figure(f"SELECT INBOX ({n} messages):", t * 1000, "ms"))

    t, res = await timed(lambda: imap.command("FETCH 1:* (UID FLAGS RFC822.SIZE ENVELOPE)"))
    assert sum(1 for ln in res if b" FETCH " in ln) == n
    out.append(Figure("FETCH 1:* (UID FLAGS RFC822.SIZE ENVELOPE):", t * 1000, "ms"))

    for query, expect in (("SUBJECT needle", (n + 249) // 250), ("UNSEEN", n - (n + 2) // 3),
                          ("BODY needle", None)):
        t, res = await timed(lambda q=query: imap.command(f"UID SEARCH {q}"))  # type: ignore[misc]
        hits = sum(len(ln.split()) - 2 for ln in res if ln.startswith(b"* SEARCH"))
        assert expect is None or hits == expect, (query, hits, expect)
        out.append(Figure(f"UID SEARCH {query:<16} ({hits:4d} hits):", t * 1000, "ms"))
    await imap.command("LOGOUT")
    imap.close()

    # Idle connections: the RSS they add, per connection.
    await asyncio.sleep(0.5)
    before = rss_kib(pid)
    gate = asyncio.Semaphore(64)
    open_conns: list[Imap] = []

    async def one() -> None:
        async with gate:
            client = await Imap.connect(port, ctx)
            await client.command(f'LOGIN "{USER}" "{PASSWORD}"')
            await client.command("SELECT INBOX")
            await client.idle()
            open_conns.append(client)

    start = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(c)), return_exceptions=True)
    opened = time.perf_counter() - start
    failures = [r for r in results if isinstance(r, BaseException)]
    await asyncio.sleep(1.0)
    after = rss_kib(pid)
    k = len(open_conns)
    if k:
        out.append(Figure(f"RSS per idle IMAPS connection (LOGIN+SELECT+IDLE, {k} open):",
                          (after - before) / k, "KiB",
                          f"  (server {before / 1024:.0f} → {after / 1024:.0f} MiB; "
                          f"opened in {opened:.1f} s)"))
    if failures:
        out.append(Figure(f"idle connections failed of {c}: {failures[0]!r}",
                          len(failures), ""))
    for client in open_conns:
        client.close()
    return out


# -- running postkeep ----------------------------------------------------------------------
def configure(work: Path, port: int, c: int, backend: str = "sqlite", dsn: str = "") -> Path:
    py = sys.executable
    subprocess.run([py, "-m", "postkeep", "init", "--dir", str(work), "--hostname", HOST,
                    "--domain", "example.test"], check=True, capture_output=True)
    config = work / "postkeep.toml"
    text = config.read_text()
    text = re.sub(r'(?m)^(smtp|submission|submissions|imap|pop3|pop3s|http)( *)= *"[^"]*"',
                  r'\1\2= ""', text)
    text = re.sub(r'(?m)^imaps( *)= *"[^"]*"', rf'imaps\1= "127.0.0.1:{port}"', text)
    room = c + 100
    text = re.sub(r"(?m)^connections_per_ip( *)= *[\d_]+", rf"connections_per_ip\1= {room}", text)
    text = re.sub(r"(?m)^connections_total( *)= *[\d_]+", rf"connections_total\1= {room}", text)
    text = re.sub(r'(?m)^log_level( *)= *"[^"]*"', r'log_level\1= "warning"', text)
    config.write_text(text)
    use_backend(config, backend, dsn)
    subprocess.run([py, "-m", "postkeep", "--config", str(config), "user", "add", USER,
                    "--password-stdin"], input=PASSWORD + "\n", text=True, check=True,
                   capture_output=True)
    return config


def run_postkeep(work: Path, n: int, c: int, backend: str = "sqlite",
                 dsn: str = "") -> list[Figure]:
    port = free_port()
    config = configure(work, port, c, backend, dsn)
    start = time.perf_counter()
    commits = asyncio.run(prefill(config, n))
    figures = [Figure(f"load {n} messages (APPEND path, concurrent):",
                      time.perf_counter() - start, "s"),
               Figure("store commits per message of the load:", commits / n, "")]
    log = work / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "postkeep", "--config", str(config), "serve"],
                            stderr=log.open("wb"))
    try:
        wait_port(port, proc)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(work / "tls" / "fullchain.pem"))
        figures += asyncio.run(measure(port, proc.pid, n, c, ctx))
    except Exception:
        sys.stderr.write(log.read_text()[-4000:])
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return figures


def peers() -> list[str]:
    if shutil.which("dovecot") is None:
        return ["dovecot   not installed (Debian: dovecot-imapd): no peer figures this run"]
    return ["dovecot   installed, but this bench does not start it yet: no peer figures"]


def show(name: str, f: Figure) -> str:
    value = f"{f.value:9.3f}" if f.unit == "" else f"{f.value:9.1f} {f.unit}"
    return f"{name:<21} {f.label:<62} {value}{f.note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=5000, help="messages in the mailbox")
    parser.add_argument("-c", type=int, default=1000, help="idle IMAPS connections")
    add_backends_option(parser)
    args = parser.parse_args()
    # Both ends of C TLS connections live on this machine: make room for the descriptors
    # (the server inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.c + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    with tempfile.TemporaryDirectory() as tmp:
        results, lines, server = run_each(
            args.backends, Path(tmp),
            lambda where, backend, dsn: run_postkeep(where, args.n, args.c, backend, dsn),
        )
    for backend, figures in results.items():
        name = f"postkeep[{backend}]"
        lines += [show(name, f) for f in figures]
        if backend == "postgresql":
            lines.append(f"{name:<21} server: {server}")
    if "sqlite" in results and "postgresql" in results:
        sqlite = {f.label: f for f in results["sqlite"]}
        for f in results["postgresql"]:
            base = sqlite.get(f.label)
            if base is not None and f.unit in ("ms", "s", "KiB") and base.value > 0:
                ratio = f.value / base.value
                lines.append(f"{'ratio PG/SQLite':<21} {f.label:<62} {ratio:9.2f}x")
    for line in lines + peers():
        print(line, flush=True)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
