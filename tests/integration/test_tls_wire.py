"""TLS versions per port and certificate reload, against the running server."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from server_harness import Instance, client_context, wait_for, write_cert

OLD = [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1]
NEW = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]

# How to get from a plaintext greeting to a TLS handshake on each STARTTLS port.
STARTTLS_DIALOGUE: dict[str, list[bytes]] = {
    "smtp": [b"EHLO client.test\r\n", b"STARTTLS\r\n"],
    "submission": [b"EHLO client.test\r\n", b"STARTTLS\r\n"],
    "imap": [b"a STARTTLS\r\n"],
    "pop3": [b"STLS\r\n"],
}
IMPLICIT = ("submissions", "imaps", "pop3s")


def local_openssl_offers(version: ssl.TLSVersion) -> bool:
    """Whether this machine's OpenSSL can still speak ``version`` as a client."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.minimum_version = ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        return False
    return True


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        last = data.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
        if data.endswith(b"\r\n") and (last[3:4] != b"-" or not last[:3].isdigit()):
            return data


def handshake(server: Instance, service: str, ctx: ssl.SSLContext) -> str:
    """Connect, upgrade if needed, and return the negotiated version (raises on refusal)."""
    sock = socket.create_connection(("127.0.0.1", server.ports[service]), timeout=10)
    try:
        if service in STARTTLS_DIALOGUE:
            read_reply(sock)
            for line in STARTTLS_DIALOGUE[service]:
                sock.sendall(line)
                read_reply(sock)
        tls = ctx.wrap_socket(sock, server_hostname="mail.example.test")
        version = tls.version()
        tls.close()
        assert version is not None
        return version
    finally:
        sock.close()


def access_services(server: Instance) -> list[str]:
    return [s for s in ("submission", "submissions", "imap", "imaps", "pop3", "pop3s")
            if s in server.ports]


@pytest.mark.parametrize("version", OLD, ids=lambda v: v.name)
def test_old_tls_refused_on_submission_and_access_ports(
    server: Instance, ca: trustme.CA, version: ssl.TLSVersion
) -> None:
    if not local_openssl_offers(version):
        pytest.skip(f"the local OpenSSL cannot offer {version.name} as a client")
    for service in access_services(server):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(server, service, client_context(ca, version))


@pytest.mark.parametrize("version", NEW, ids=lambda v: v.name)
def test_modern_tls_accepted_on_every_port(
    server: Instance, ca: trustme.CA, version: ssl.TLSVersion
) -> None:
    for service in ["smtp", *access_services(server)]:
        assert handshake(server, service, client_context(ca, version)) == {
            ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]


@pytest.mark.parametrize("version", OLD, ids=lambda v: v.name)
def test_port_25_accepts_old_tls(server: Instance, ca: trustme.CA, version: ssl.TLSVersion) -> None:
    if not local_openssl_offers(version):
        pytest.skip(f"the local OpenSSL cannot offer {version.name} as a client")
    expected = {ssl.TLSVersion.TLSv1: "TLSv1", ssl.TLSVersion.TLSv1_1: "TLSv1.1"}[version]
    assert handshake(server, "smtp", client_context(ca, version)) == expected


def test_legacy_clients_opt_in_allows_tls10_on_access_ports(
    make_instance: Callable[..., Instance], ca: trustme.CA
) -> None:
    if not local_openssl_offers(ssl.TLSVersion.TLSv1):
        pytest.skip("the local OpenSSL cannot offer TLSv1 as a client")
    inst = make_instance(tls_extra='min_version = "TLSv1"\nlegacy_clients = true')
    assert handshake(inst, "submissions", client_context(ca, ssl.TLSVersion.TLSv1)) == "TLSv1"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_agrees(server: Instance, ca_file: Path) -> None:
    def s_client(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-brief", "-CAfile", str(ca_file),
             "-verify_return_error", "-servername", "mail.example.test", *args],
            input="", capture_output=True, text=True, timeout=20,
        )

    ok = s_client("-connect", f"127.0.0.1:{server.ports['submissions']}", "-tls1_2")
    assert "Protocol version: TLSv1.2" in ok.stdout + ok.stderr
    starttls = s_client("-connect", f"127.0.0.1:{server.ports['submission']}",
                        "-starttls", "smtp", "-tls1_3")
    assert "Protocol version: TLSv1.3" in starttls.stdout + starttls.stderr
    old = s_client("-connect", f"127.0.0.1:{server.ports['submissions']}", "-tls1_1",
                   "-cipher", "DEFAULT:@SECLEVEL=0")
    assert old.returncode != 0
    assert "Protocol version: TLSv1.1" not in old.stdout + old.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_submits_over_465(server: Instance, ca_file: Path, tmp_path: Path) -> None:
    mail = tmp_path / "mail.txt"
    mail.write_bytes(b"From: alice@example.test\r\nSubject: via curl\r\n\r\ncurl body\r\n")
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--cacert", str(ca_file),
         "--resolve", f"mail.example.test:{server.ports['submissions']}:127.0.0.1",
         f"smtps://mail.example.test:{server.ports['submissions']}",
         "--user", "alice@example.test:alice-secret-pw",
         "--mail-from", "alice@example.test", "--mail-rcpt", "bob@example.test",
         "--upload-file", str(mail)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    [(_, data)] = server.inbox("bob@example.test")
    assert data.endswith(b"curl body\r\n")


def peer_cert_serial(server: Instance, ca: trustme.CA) -> int:
    ctx = client_context(ca)
    with socket.create_connection(("127.0.0.1", server.ports["submissions"]), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="mail.example.test") as tls:
            der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_replaced_certificate_is_served_without_restart(
    server: Instance, ca: trustme.CA
) -> None:
    before = peer_cert_serial(server, ca)
    # Keep one connection open across the reload: it must keep working.
    held = smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"],
                            context=client_context(ca), timeout=10)
    cert_dir = server.config_path.parent / "tls"
    fresh = cert_dir.parent / "fresh"
    new_cert, new_key = write_cert(ca, fresh)
    # What certbot does: new files moved into place.
    shutil.copy(new_key, cert_dir / "privkey.pem.new")
    shutil.copy(new_cert, cert_dir / "fullchain.pem.new")
    (cert_dir / "privkey.pem.new").replace(cert_dir / "privkey.pem")
    (cert_dir / "fullchain.pem.new").replace(cert_dir / "fullchain.pem")
    assert wait_for(lambda: peer_cert_serial(server, ca) != before, timeout=10)
    assert held.noop()[0] == 250
    held.quit()


def test_broken_certificate_is_refused_and_old_one_kept(
    server: Instance, ca: trustme.CA
) -> None:
    before = peer_cert_serial(server, ca)
    cert_dir = server.config_path.parent / "tls"
    (cert_dir / "fullchain.pem").write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
    assert server.app is not None
    assert server.call(lambda: _reload(server)) is False
    assert peer_cert_serial(server, ca) == before


async def _reload(server: Instance) -> bool:
    assert server.app is not None
    return server.app.tls.reload()
