"""POP3 RETR throughput over port 995 (implicit TLS): postkeep alone, no peer.

Starts a real ``postkeep serve`` subprocess, delivers N messages of 10 KB to one user over
SMTP (port 25, several connections; each message durable before its 250), then, over
one POP3 connection on 995 (TLS, USER/PASS), retrieves every message:

- sequentially, one RETR after the other's last byte, as most mail programs do;
- pipelined (RFC 2449 PIPELINING): every RETR sent in one write, replies read as they come.

Each received message is checked against its expected size. One line per figure:
messages/s and MB/s of message data for each mode. No peer: Dovecot, the obvious one, is
not installable quickly here and the harness starts nothing it cannot install from PyPI.

    python bench/pop3_retr.py [-n 1000] [-c 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "bench@example.test", "bench-password-1"
HOST = "mail.example.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(i: int) -> bytes:
    body = (b"%08d " % i) * 1100  # about 10 KB
    lines = b"\r\n".join(body[j : j + 72] for j in range(0, len(body), 72))
    return (
        b"From: sender@remote.test\r\nTo: bench@example.test\r\nSubject: bench %d\r\n"
        b"Message-ID: <%d@remote.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
        % (i, i)
    ) + lines + b"\r\n"


# -- loading over SMTP (port 25) ---------------------------------------------------------
async def smtp_reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def smtp_client(port: int, queue: asyncio.Queue[int]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await smtp_reply(reader) == 220
    writer.write(b"EHLO bench.test\r\n")
    assert await smtp_reply(reader) == 250
    sent = 0
    while True:
        try:
            i = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        writer.write(f"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<{USER}>\r\nDATA\r\n".encode())
        assert await smtp_reply(reader) == 250
        assert await smtp_reply(reader) == 250
        assert await smtp_reply(reader) == 354
        writer.write(message(i) + b".\r\n")
        assert await smtp_reply(reader) == 250
        sent += 1
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()
    return sent


async def load(port: int, n: int, c: int) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    sent = sum(await asyncio.gather(*(smtp_client(port, queue) for _ in range(c))))
    assert sent == n


# -- retrieving over POP3 (port 995) -----------------------------------------------------
class Pop3:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def line(self) -> bytes:
        line = await self.reader.readuntil(b"\r\n")
        return line[:-2]

    async def ok(self) -> bytes:
        line = await self.line()
        if not line.startswith(b"+OK"):
            raise RuntimeError(line.decode(errors="replace"))
        return line

    async def body(self) -> int:
        """Read a multi-line body up to its terminator; returns its un-stuffed size."""
        size = 0
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b".\r\n":
                return size
            size += len(line) - (1 if line.startswith(b"..") else 0)


async def connect(port: int) -> Pop3:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=HOST, limit=1 << 20
    )
    pop = Pop3(reader, writer)
    await pop.ok()
    writer.write(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    await pop.ok()
    await pop.ok()
    return pop


async def sizes(pop: Pop3) -> list[int]:
    pop.writer.write(b"LIST\r\n")
    await pop.ok()
    out = []
    while (line := await pop.line()) != b".":
        out.append(int(line.split()[1]))
    return out


async def quit_(pop: Pop3) -> None:
    pop.writer.write(b"QUIT\r\n")
    await pop.ok()
    pop.writer.close()


async def retr_sequential(port: int) -> tuple[int, int, float]:
    pop = await connect(port)
    expected = await sizes(pop)
    start = time.perf_counter()
    total = 0
    for i, size in enumerate(expected, 1):
        pop.writer.write(b"RETR %d\r\n" % i)
        await pop.ok()
        got = await pop.body()
        assert got == size, (i, got, size)
        total += got
    elapsed = time.perf_counter() - start
    await quit_(pop)
    return len(expected), total, elapsed


async def retr_pipelined(port: int) -> tuple[int, int, float]:
    pop = await connect(port)
    expected = await sizes(pop)
    start = time.perf_counter()
    pop.writer.write(b"".join(b"RETR %d\r\n" % i for i in range(1, len(expected) + 1)))
    total = 0
    for i, size in enumerate(expected, 1):
        await pop.ok()
        got = await pop.body()
        assert got == size, (i, got, size)
        total += got
    elapsed = time.perf_counter() - start
    await quit_(pop)
    return len(expected), total, elapsed


# -- the server --------------------------------------------------------------------------
def wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(port)


def configure(work: Path) -> tuple[Path, int, int]:
    py = sys.executable
    subprocess.run([py, "-m", "postkeep", "init", "--dir", str(work), "--hostname", HOST,
                    "--domain", "example.test"], check=True, capture_output=True)
    config = work / "postkeep.toml"
    smtp, pop3s = free_port(), free_port()
    text = config.read_text()
    # The rendered file has comments after the values: replace only the quoted value.
    text = re.sub(r'(?m)^(submission|submissions|imap|imaps|pop3|http) *= *"[^"]*"', r'\1 = ""',
                  text)
    text = re.sub(r'(?m)^smtp *= *"[^"]*"', f'smtp = "127.0.0.1:{smtp}"', text)
    text = re.sub(r'(?m)^pop3s *= *"[^"]*"', f'pop3s = "127.0.0.1:{pop3s}"', text)
    config.write_text(text)
    subprocess.run([py, "-m", "postkeep", "--config", str(config), "user", "add", USER,
                    "--password-stdin"], input=PASSWORD + "\n", text=True, check=True,
                   capture_output=True)
    return config, smtp, pop3s


def run(work: Path, n: int, c: int) -> list[str]:
    config, smtp, pop3s = configure(work)
    log = work / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "postkeep", "--config", str(config), "serve"],
                            stderr=log.open("wb"))
    try:
        wait_port(smtp)
        wait_port(pop3s)
        start = time.perf_counter()
        asyncio.run(load(smtp, n, c))
        loaded = time.perf_counter() - start
        count, octets, seq = asyncio.run(retr_sequential(pop3s))
        assert count == n, (count, n)
        _, _, pipe = asyncio.run(retr_pipelined(pop3s))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    size = octets / count / 1000
    return [
        f"postkeep  load   SMTP 25 {n}x{size:.1f}KB c={c}:        {n / loaded:8.1f} msg/s",
        f"postkeep  RETR   995 sequential {n}x{size:.1f}KB:      {n / seq:8.1f} msg/s"
        f"  {octets / seq / 1e6:6.1f} MB/s",
        f"postkeep  RETR   995 pipelined  {n}x{size:.1f}KB:      {n / pipe:8.1f} msg/s"
        f"  {octets / pipe / 1e6:6.1f} MB/s",
        "peer      none in this run (Dovecot is not set up by this harness): no ratio",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="messages")
    parser.add_argument("-c", type=int, default=20, help="SMTP connections for loading")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for line in run(Path(tmp), args.n, args.c):
            print(line)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
