"""Nothing acknowledged is ever lost: SIGKILL the server while clients submit."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import trustme
from server_harness import PASSWORDS, Instance, client_context, write_cert, write_config


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} never opened")


def start_server(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "postkeep", "--config", str(config), "serve"],
        stdout=subprocess.DEVNULL, stderr=log.open("ab"),
    )


def test_sigkill_during_submission_loses_no_acknowledged_message(
    ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_cert(ca, tmp_path / "tls")
    config = write_config(tmp_path, cert, key, services=("submissions", "smtp"))
    # Accounts first, through the CLI like an operator.
    inst = Instance(config).start()
    inst.add_users()
    inst.stop()
    ports = {
        line.split("=")[0].strip(): int(line.rsplit(":", 1)[1].strip('"'))
        for line in config.read_text().splitlines()
        if line.startswith(("submissions ", "smtp "))
    }
    proc = start_server(config, tmp_path / "server.log")
    acknowledged: dict[int, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    ctx: ssl.SSLContext = client_context(ca)

    def client(worker: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                with smtplib.SMTP_SSL("127.0.0.1", ports["submissions"], context=ctx,
                                      timeout=10) as s:
                    s.login("alice@example.test", PASSWORDS["alice@example.test"])
                    while not stop.is_set():
                        ident = worker * 100_000 + n
                        n += 1
                        body = (
                            b"From: alice@example.test\r\nSubject: m%d\r\n"
                            b"Message-ID: <m%d@example.test>\r\nDate: Mon, 1 Jan 2024 00:00:00"
                            b" +0000\r\n\r\n" % (ident, ident)
                            + os.urandom(3000).hex().encode() + b"\r\n"
                        )
                        s.sendmail("alice@example.test", ["bob@example.test"], body)
                        with lock:
                            acknowledged[ident] = body  # only after the 250
            except (OSError, smtplib.SMTPException):
                if proc.poll() is not None:
                    return
                time.sleep(0.05)

    try:
        wait_port(ports["submissions"])
        threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= 40, (tmp_path / "server.log").read_text()[-3000:]

    inst = Instance(config).start()
    try:
        stored = {}
        for _, data in inst.inbox("bob@example.test"):
            subject = data.split(b"\r\nSubject: m", 1)[1].split(b"\r\n", 1)[0]
            stored[int(subject)] = data
        missing = set(acknowledged) - set(stored)
        assert not missing, f"{len(missing)} acknowledged messages lost"
        for ident, body in acknowledged.items():
            assert stored[ident].endswith(body), ident  # byte-exact after our trace header
    finally:
        inst.stop()


def test_sigterm_shuts_down_gracefully(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_cert(ca, tmp_path / "tls")
    config = write_config(tmp_path, cert, key, services=("smtp",))
    port = int(config.read_text().split('smtp = "127.0.0.1:')[1].split('"')[0])
    proc = start_server(config, tmp_path / "server.log")
    try:
        wait_port(port)
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert idle.recv(1000).startswith(b"220")
        proc.send_signal(signal.SIGTERM)
        # The idle session is told why it is closed, then the process exits cleanly.
        assert idle.recv(1000).startswith(b"421")
        assert proc.wait(20) == 0
        idle.close()
    finally:
        if proc.poll() is None:
            proc.kill()
