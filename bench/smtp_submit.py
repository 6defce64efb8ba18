"""Durable SMTP submission throughput: postkeep next to a peer, in the same run.

Submits N messages of 10 KB over port 465 (implicit TLS, AUTH PLAIN) from C concurrent
connections, one message after another on each connection, and prints one line per figure:
messages/s for each server, postkeep's store commits per message, and the ratios.

postkeep runs once per storage backend (``--backends``, default both): SQLite, and
PostgreSQL on a throwaway server the bench starts (fsync and synchronous_commit on, so the
250 comes after a durable COMMIT on both). Ratios: each backend against the peer, and
PostgreSQL against SQLite, all from the same run.

The peer is aiosmtpd with the same TLS and AUTH, whose handler makes each message durable
the common way: write it to its own file and fsync before answering 250.

    python bench/smtp_submit.py [-n 2000] [-c 50] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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

from backends import add_backends_option, run_each, use_backend

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "bench@example.test", "bench-password-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(i: int) -> bytes:
    body = (b"%08d " % i) * 1100  # about 10 KB
    lines = b"\r\n".join(body[j : j + 72] for j in range(0, len(body), 72))
    return (
        b"From: bench@example.test\r\nTo: bench@example.test\r\nSubject: bench %d\r\n"
        b"Message-ID: <%d@bench.example.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
        % (i, i)
    ) + lines + b"\r\n"


async def reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def client(
    port: int, ctx: ssl.SSLContext, queue: asyncio.Queue[int], ready: asyncio.Barrier
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="mail.example.test")
    await reply(reader)
    writer.write(b"EHLO bench.test\r\n")
    await reply(reader)
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    writer.write(f"AUTH PLAIN {token}\r\n".encode())
    assert await reply(reader) == 235
    # Logins (argon2id, deliberately slow) are not what this measures: start together.
    await ready.wait()
    sent = 0
    while True:
        try:
            i = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        writer.write(f"MAIL FROM:<{USER}>\r\nRCPT TO:<{USER}>\r\nDATA\r\n".encode())
        assert await reply(reader) == 250
        assert await reply(reader) == 250
        assert await reply(reader) == 354
        writer.write(message(i) + b".\r\n")
        code = await reply(reader)
        assert code == 250, code
        sent += 1
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()
    return sent


async def drive(port: int, n: int, c: int) -> float:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    ready = asyncio.Barrier(c + 1)
    clients = [asyncio.create_task(client(port, ctx, queue, ready)) for _ in range(c)]
    await ready.wait()
    start = time.perf_counter()
    sent = sum(await asyncio.gather(*clients))
    elapsed = time.perf_counter() - start
    assert sent == n
    return n / elapsed


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(port)


def init(work: Path) -> Path:
    """``postkeep init`` into WORK (a configuration and a self-signed certificate)."""
    subprocess.run([sys.executable, "-m", "postkeep", "init", "--dir", str(work), "--hostname",
                    "mail.example.test", "--domain", "example.test"], check=True,
                   capture_output=True)
    return work / "postkeep.toml"


def run_postkeep(work: Path, n: int, c: int, backend: str = "sqlite",
                 dsn: str = "") -> tuple[float, float]:
    py = sys.executable
    config = init(work)
    use_backend(config, backend, dsn)
    port = free_port()
    text = config.read_text()
    text = re.sub(r'(?m)^(smtp|submission|imap|imaps|pop3|pop3s|http) *= *"[^"]*"', r'\1 = ""',
                  text)
    text = re.sub(r'(?m)^submissions *= *"[^"]*"', f'submissions = "127.0.0.1:{port}"', text)
    text = re.sub(r"(?m)^connections_per_ip *= *\d+", "connections_per_ip = 10000", text)
    if "connections_per_ip" not in text:
        text = text.replace("[limits]", "[limits]\nconnections_per_ip = 10000")
    config.write_text(text)
    subprocess.run([py, "-m", "postkeep", "--config", str(config), "user", "add", USER,
                    "--password-stdin"], input=PASSWORD + "\n", text=True, check=True,
                   capture_output=True)
    log = work / "server.log"
    wrapper = os.environ.get("BENCH_SERVER_WRAPPER", "").split()  # e.g. "py-spy record -o f --"
    proc = subprocess.Popen([*wrapper, py, "-m", "postkeep", "--config", str(config), "serve"],
                            stderr=log.open("wb"))
    try:
        wait_port(port)
        rate = asyncio.run(drive(port, n, c))
    except Exception:
        sys.stderr.write(log.read_text()[-4000:])
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    stopped = [line for line in log.read_text().splitlines() if "event=server.stopped" in line]
    commits = int(re.search(r"commits=(\d+)", stopped[-1]).group(1))  # type: ignore[union-attr]
    return rate, commits / n


def run_aiosmtpd(work: Path, n: int, c: int) -> float | None:
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    init(work)  # for its certificate
    script = work / "peer.py"
    script.write_text(PEER.format(spool=str(work / "spool"), port=port,
                                  cert=str(work / "tls" / "fullchain.pem"),
                                  key=str(work / "tls" / "privkey.pem")))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return asyncio.run(drive(port, n, c))
    finally:
        proc.terminate()
        proc.wait(30)


PEER = '''
import asyncio, os, ssl
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

SPOOL = {spool!r}
os.makedirs(SPOOL, exist_ok=True)

class Durable:
    async def handle_DATA(self, server, session, envelope):
        def write():
            path = os.path.join(SPOOL, os.urandom(8).hex())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, envelope.original_content)
                os.fsync(fd)
            finally:
                os.close(fd)
        await asyncio.to_thread(write)
        return "250 2.0.0 OK"

def auth(server, session, envelope, mechanism, data):
    ok = isinstance(data, LoginPassword) and data.password == b"bench-password-1"
    return AuthResult(success=ok)

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain({cert!r}, {key!r})
c = Controller(Durable(), hostname="127.0.0.1", port={port}, ssl_context=ctx,
               authenticator=auth, server_hostname="mail.example.test",
               # The socket is TLS from the first byte; aiosmtpd only counts STARTTLS
               # as TLS, so its own check is switched off rather than the encryption.
               auth_require_tls=False)
c.start()
import signal, threading
ev = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: ev.set())
ev.wait()
c.stop()
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="messages")
    parser.add_argument("-c", type=int, default=50, help="concurrent connections")
    add_backends_option(parser)
    args = parser.parse_args()
    what = f"submit 465+AUTH {args.n}x10KB c={args.c}:"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours, lines, server = run_each(
            args.backends, work,
            lambda where, backend, dsn: run_postkeep(where, args.n, args.c, backend, dsn),
        )
        (work / "peer").mkdir()
        peer = run_aiosmtpd(work / "peer", args.n, args.c)
    for backend, (rate, commits) in ours.items():
        name = f"postkeep[{backend}]"
        durable = "fsyncs (store commits)" if backend == "sqlite" else "store commits (COMMITs)"
        lines.append(f"{name:<21} {what:<34} {rate:8.1f} msg/s")
        lines.append(f"{name:<21} {durable} per message: {commits:.3f}")
        if backend == "postgresql":
            lines.append(f"{name:<21} server: {server}")
    if peer is None:
        lines.append("aiosmtpd  not installed (pip install aiosmtpd): no peer figure")
    else:
        lines.append(f"{'aiosmtpd':<21} {'submit 465+AUTH, fsync per message:':<34} "
                     f"{peer:8.1f} msg/s")
        for backend, (rate, _) in ours.items():
            lines.append(f"ratio     postkeep[{backend}] / aiosmtpd: {rate / peer:.2f}x")
    if "sqlite" in ours and "postgresql" in ours:
        ratio = ours["postgresql"][0] / ours["sqlite"][0]
        lines.append(f"ratio     postkeep[postgresql] / postkeep[sqlite]: {ratio:.2f}x")
    for line in lines:
        print(line, flush=True)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
