"""The ``postkeep`` command line, run as a real process."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from server_harness import free_ports, run_postkeep

from postkeep.config.load import load_config
from postkeep.config.schema import DEV_PORT_OFFSET, SERVICE_PORTS, Service


def init(tmp_path: Path, *extra: str) -> Path:
    result = run_postkeep("init", "--dir", str(tmp_path), "--hostname", "mail.example.test",
                          "--domain", "Example.TEST", *extra)
    assert result.returncode == 0, result.stderr
    return tmp_path / "postkeep.toml"


def test_init_writes_config_certificate_and_store(tmp_path: Path) -> None:
    config_path = init(tmp_path, "--dev-ports")
    config = load_config(config_path)
    assert config.hostname == "mail.example.test"
    assert config.tls.cert.exists() and config.tls.key.exists()
    assert oct(config.tls.key.stat().st_mode & 0o777) == "0o600"
    for service, (port, _) in SERVICE_PORTS.items():
        if service is Service.HTTP:
            continue
        [address] = config.listeners[service]
        assert address.port == DEV_PORT_OFFSET + port
        assert address.host == "127.0.0.1"
    listed = run_postkeep("--config", str(config_path), "domain", "list")
    assert listed.stdout.split() == ["example.test"]
    # The domain can sign outgoing mail from the start: its DKIM records are printable.
    records = run_postkeep("--config", str(config_path), "domain", "dns", "example.test")
    assert records.returncode == 0, records.stderr
    assert "._domainkey.example.test." in records.stdout
    assert "k=ed25519" in records.stdout and "k=rsa" in records.stdout
    again = run_postkeep("init", "--dir", str(tmp_path), "--hostname", "x", "--domain", "y")
    assert again.returncode == 1 and "exists" in again.stderr


def test_accounts_lifecycle(tmp_path: Path) -> None:
    cfg = str(init(tmp_path))
    added = run_postkeep("user", "add", "Carol@example.test", "--password-stdin", "--config", cfg,
                         stdin="carol-pw-123\n")
    assert added.returncode == 0, added.stderr
    assert "carol-pw-123" not in added.stdout + added.stderr
    gen = run_postkeep("--config", cfg, "user", "add", "dave@example.test", "--generate-password")
    assert gen.returncode == 0
    assert "password for dave@example.test: " in gen.stdout
    users = run_postkeep("--config", cfg, "user", "list")
    assert users.stdout.split() == ["carol@example.test", "dave@example.test"]
    dup = run_postkeep("--config", cfg, "user", "add", "carol@example.test", "--password-stdin",
                       stdin="x\n")
    assert dup.returncode == 1
    nodomain = run_postkeep("--config", cfg, "user", "add", "x@nowhere.test", "--password-stdin",
                            stdin="x\n")
    assert nodomain.returncode == 1
    assert run_postkeep("--config", cfg, "alias", "add", "info@example.test",
                        "carol@example.test").returncode == 0
    assert run_postkeep("--config", cfg, "alias", "add", "@example.test",
                        "dave@example.test").returncode == 0
    aliases = run_postkeep("--config", cfg, "alias", "list").stdout
    assert "info@example.test -> carol@example.test" in aliases
    assert "@example.test -> dave@example.test" in aliases
    assert run_postkeep("--config", cfg, "alias", "del", "info@example.test",
                        "carol@example.test").returncode == 0
    busy = run_postkeep("--config", cfg, "domain", "del", "example.test")
    assert busy.returncode == 1
    assert run_postkeep("--config", cfg, "user", "del", "dave@example.test").returncode == 0
    assert run_postkeep("--config", cfg, "user", "list").stdout.split() == ["carol@example.test"]
    passwd = run_postkeep("--config", cfg, "user", "passwd", "carol@example.test",
                          "--password-stdin", stdin="new-pw-456\n")
    assert passwd.returncode == 0


def test_password_is_never_taken_from_argv(tmp_path: Path) -> None:
    cfg = str(init(tmp_path))
    result = run_postkeep("--config", cfg, "user", "add", "e@example.test", "secret")
    assert result.returncode == 2


def test_configuration_error_names_file_and_key(tmp_path: Path) -> None:
    cfg = init(tmp_path)
    text = cfg.read_text().replace('min_version = "TLSv1.2"', 'min_version = "TLSv1"')
    assert text != cfg.read_text()
    cfg.write_text(text)
    result = run_postkeep("--config", str(cfg), "user", "list")
    assert result.returncode == 2
    assert "postkeep.toml" in result.stderr and "min_version" in result.stderr
    cfg.write_text(cfg.read_text() + "\nbogus_key = 1\n")
    result = run_postkeep("--config", str(cfg), "serve")
    assert result.returncode == 2 and "bogus_key" in result.stderr


def test_serve_runs_what_init_wrote_on_all_seven_ports(tmp_path: Path) -> None:
    # The same steps as `make run`, on ports picked for the test instead of 10000+N.
    cfg = init(tmp_path)
    services = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s", "http")
    ports = dict(zip(services, free_ports(len(services)), strict=True))
    lines = []
    for line in cfg.read_text().splitlines():
        key = line.split("=")[0].strip()
        if key in ports and "=" in line and line.lstrip()[0] != "#":
            line = f'{key} = "127.0.0.1:{ports[key]}"'
        lines.append(line)
    cfg.write_text("\n".join(lines) + "\n")
    assert run_postkeep("--config", str(cfg), "user", "add", "demo@example.test",
                        "--password-stdin", stdin="demo-pw\n").returncode == 0
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "postkeep", "serve", "--config", str(cfg)],
                            stderr=log)
    # What each port says first: a plaintext greeting, or (implicit TLS) a TLS handshake.
    plain = {"smtp": b"220 ", "submission": b"220 ", "imap": b"* OK ", "pop3": b"+OK"}
    implicit = {"submissions": b"220 ", "imaps": b"* OK ", "pop3s": b"+OK"}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", ports["smtp"]), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        for service, greeting in {**plain, **implicit}.items():
            sock = socket.create_connection(("127.0.0.1", ports[service]), timeout=10)
            if service in implicit:
                sock = ctx.wrap_socket(sock)
            with sock:
                assert sock.recv(100).startswith(greeting), service
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        log.close()
