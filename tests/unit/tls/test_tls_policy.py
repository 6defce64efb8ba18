"""TlsPolicy against real handshakes on loopback sockets.

Clients here are built with ``ssl`` directly and pinned to one version, with SECLEVEL=0,
so that what is refused is refused by the server's policy and not by the client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import shutil
import socket
import ssl
import threading
import time
import warnings
from pathlib import Path

import pytest

from postkeep.config.schema import Service, TlsConfig
from postkeep.tls.certs import CertError
from postkeep.tls.policy import (
    ALPN_PROTOCOLS,
    TlsConfigError,
    TlsPolicy,
    access_floor,
)

ACCESS = [s for s in Service if s is not Service.SMTP]
_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def pinned_client(
    version: str, *, ciphers: str | None = None, alpn: list[str] | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = _VERSIONS[version]
        ctx.maximum_version = _VERSIONS[version]
    ctx.set_ciphers(f"{ciphers or 'ALL'}:@SECLEVEL=0")
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def plain_server(pair, version: str) -> ssl.SSLContext:
    """A server built without the policy: the yardstick of what the library can do."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = _VERSIONS[version]
        ctx.maximum_version = _VERSIONS[version]
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_cert_chain(pair.cert, pair.key)
    return ctx


def install(src, dst) -> None:
    """Replace dst's files with src's like certbot or `cp x.new; mv` does: new inodes."""
    for a, b in ((src.key, dst.key), (src.cert, dst.cert)):
        tmp = b.with_suffix(".new")
        shutil.copyfile(a, tmp)
        tmp.replace(b)


def sha256(der: bytes | None) -> str:
    assert der is not None
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


@pytest.fixture
def policy(pair) -> TlsPolicy:
    return TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key))


@pytest.fixture(scope="session")
def tls10_possible(pair_factory) -> None:
    """Skip (with the reason) only if this OpenSSL cannot do a TLS 1.0 handshake at all,
    even between two contexts at SECLEVEL=0 that the policy did not build."""
    p = pair_factory("a")
    server_ctx = plain_server(p, "TLSv1")
    client_ctx = pinned_client("TLSv1")
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[Exception] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(socket.create_connection(listener.getsockname(), 5)):
            pass
    except (ssl.SSLError, OSError) as exc:
        errors.append(exc)
    t.join(5)
    listener.close()
    if errors:
        pytest.skip(f"local OpenSSL ({ssl.OPENSSL_VERSION}) cannot do TLS 1.0: {errors[0]}")


# -- versions -----------------------------------------------------------------------------


@pytest.mark.parametrize("service", ACCESS, ids=lambda s: s.value)
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1.1"])
def test_access_services_refuse_tls10_and_tls11(
    policy, echo_server, tls10_possible, service, version
):
    server = echo_server(lambda: policy.server_context(service))
    result = server.handshake(pinned_client(version))
    assert not result.ok
    assert isinstance(result.error, ssl.SSLError)


@pytest.mark.parametrize("service", ACCESS, ids=lambda s: s.value)
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_access_services_accept_tls12_and_tls13(policy, echo_server, service, version):
    server = echo_server(lambda: policy.server_context(service))
    result = server.handshake(pinned_client(version))
    assert result.ok, result.error
    assert result.version == version


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"])
def test_port_25_accepts_every_tls_version_for_opportunistic_senders(
    policy, echo_server, tls10_possible, version
):
    # RFC 7435: a sender whose TLS 1.0 we refused would retry in plaintext.
    server = echo_server(lambda: policy.server_context(Service.SMTP))
    result = server.handshake(pinned_client(version))
    assert result.ok, result.error
    assert result.version == version
    assert server.sessions[0].version == version


def test_legacy_clients_allows_tls10_on_imaps_and_warns_once(
    pair, echo_server, tls10_possible, tls_log
):
    policy = TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key, legacy_clients=True))
    assert tls_log.events(logging.WARNING).count("tls.legacy_clients") == 1
    server = echo_server(lambda: policy.server_context(Service.IMAPS))
    for version in ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"):
        result = server.handshake(pinned_client(version))
        assert result.ok, (version, result.error)
        assert result.version == version
    policy.reload()
    assert tls_log.events(logging.WARNING).count("tls.legacy_clients") == 1


def test_default_policy_does_not_warn_about_legacy_clients(pair, tls_log):
    TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key))
    assert "tls.legacy_clients" not in tls_log.events()


def test_min_version_tls13_refuses_tls12(pair, echo_server):
    policy = TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key, min_version="TLSv1.3"))
    server = echo_server(lambda: policy.server_context(Service.SUBMISSIONS))
    assert not server.handshake(pinned_client("TLSv1.2")).ok
    assert server.handshake(pinned_client("TLSv1.3")).ok
    # port 25 keeps its own, lower floor
    assert policy.versions_for(Service.SMTP)[0] == "TLSv1"


def test_mx_min_version_raises_the_port_25_floor(pair, echo_server, tls10_possible):
    policy = TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key, mx_min_version="TLSv1.2"))
    server = echo_server(lambda: policy.server_context(Service.SMTP))
    assert not server.handshake(pinned_client("TLSv1")).ok
    assert server.handshake(pinned_client("TLSv1.2")).ok


def test_versions_for(pair):
    policy = TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key))
    assert policy.versions_for(Service.IMAPS) == ("TLSv1.2", "TLSv1.3")
    assert policy.versions_for(Service.SMTP) == ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
    legacy = TlsPolicy(
        TlsConfig(cert=pair.cert, key=pair.key, legacy_clients=True, min_version="TLSv1.1")
    )
    assert legacy.versions_for(Service.POP3S) == ("TLSv1.1", "TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"min_version": "TLSv1"}, "min_version"),
        ({"min_version": "TLSv1.1"}, "min_version"),
        ({"min_version": "TLSv1.3", "legacy_clients": True}, "legacy_clients"),
        ({"min_version": "TLSv1.0"}, "min_version"),
        ({"mx_min_version": "SSLv3"}, "mx_min_version"),
    ],
)
def test_policy_refuses_a_config_that_bypassed_the_loader(pair, changes, key):
    config = dataclasses.replace(TlsConfig(cert=pair.cert, key=pair.key), **changes)
    with pytest.raises(TlsConfigError) as info:
        TlsPolicy(config)
    assert info.value.key == key


def test_access_floor_rules(pair):
    base = TlsConfig(cert=pair.cert, key=pair.key)
    assert access_floor(base) == "TLSv1.2"
    assert access_floor(dataclasses.replace(base, min_version="TLSv1.3")) == "TLSv1.3"
    assert access_floor(dataclasses.replace(base, legacy_clients=True)) == "TLSv1"


# -- ciphers and options ------------------------------------------------------------------


@pytest.mark.parametrize("service", [Service.SMTP, Service.IMAPS, Service.SUBMISSION])
def test_rsa_key_exchange_is_refused(policy, echo_server, service):
    # AES128-GCM-SHA256 is AEAD but uses static RSA key exchange: no forward secrecy.
    server = echo_server(lambda: policy.server_context(service))
    result = server.handshake(pinned_client("TLSv1.2", ciphers="AES128-GCM-SHA256"))
    assert not result.ok
    assert isinstance(result.error, ssl.SSLError)


@pytest.mark.parametrize("ciphers", ["AES128-SHA", "AES256-SHA"])
def test_port_25_refuses_rsa_key_exchange_even_on_tls10(
    policy, echo_server, tls10_possible, ciphers
):
    server = echo_server(lambda: policy.server_context(Service.SMTP))
    assert not server.handshake(pinned_client("TLSv1", ciphers=ciphers)).ok
    # …while the same client with an ECDHE suite gets in.
    assert server.handshake(pinned_client("TLSv1", ciphers="ECDHE-RSA-AES128-SHA")).ok


@pytest.mark.parametrize("service", [Service.IMAPS, Service.SMTP])
def test_tls12_negotiates_forward_secret_aead(policy, echo_server, service):
    server = echo_server(lambda: policy.server_context(service))
    # The client lists CBC and RSA-kx suites first; server preference must win.
    client = pinned_client("TLSv1.2", ciphers="AES128-SHA:ECDHE-RSA-AES128-SHA:ALL")
    result = server.handshake(client)
    assert result.ok, result.error
    assert result.cipher is not None
    name = result.cipher[0]
    assert name.startswith("ECDHE-"), name
    assert "GCM" in name or "CHACHA20" in name, name


@pytest.mark.parametrize("service", list(Service), ids=lambda s: s.value)
def test_server_cipher_lists_are_forward_secret_only(policy, service):
    ctx = policy.server_context(service)
    legacy = policy.versions_for(service)[0] in ("TLSv1", "TLSv1.1")
    for cipher in ctx.get_ciphers():
        if cipher["protocol"] == "TLSv1.3":
            continue  # TLS 1.3 suites are all AEAD with (EC)DHE by design (RFC 8446)
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]
        assert cipher["auth"] != "auth-null", cipher["name"]
        for weak in ("RC4", "DES", "NULL", "EXP", "MD5", "CAMELLIA", "ARIA", "SEED", "IDEA"):
            assert weak not in cipher["name"], cipher["name"]
        if not legacy:
            assert cipher["aead"], cipher["name"]
        elif not cipher["aead"]:
            assert cipher["name"].endswith("-SHA"), cipher["name"]


@pytest.mark.parametrize("service", list(Service), ids=lambda s: s.value)
def test_server_context_options(policy, service):
    ctx = policy.server_context(service)
    for option in (
        ssl.OP_NO_SSLv2,
        ssl.OP_NO_SSLv3,
        ssl.OP_NO_COMPRESSION,
        ssl.OP_NO_RENEGOTIATION,
        ssl.OP_CIPHER_SERVER_PREFERENCE,
        ssl.OP_NO_TICKET,
    ):
        assert ctx.options & option == option, option  # OP_NO_SSLv2 is 0: SSLv2 is gone
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1
    assert ctx.num_tickets == 0
    assert ctx.verify_mode == ssl.CERT_NONE  # no client certificates asked for


def test_no_compression_negotiated(policy, echo_server):
    server = echo_server(lambda: policy.server_context(Service.SMTP))
    result = server.handshake(pinned_client("TLSv1.2"))
    assert result.ok
    assert result.compression is None
    assert server.sessions[0].compression is None


def test_no_session_ticket_resumption(policy, echo_server):
    server = echo_server(lambda: policy.server_context(Service.IMAPS))
    client = pinned_client("TLSv1.3")
    with server.connect(client) as first:
        first.sendall(b"x")
        first.recv(10)
        session = first.session
    assert session is None or not session.has_ticket


# -- ALPN ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "token"),
    [(Service.IMAPS, "imap"), (Service.IMAP, "imap"), (Service.POP3S, "pop3")],
)
def test_alpn_names_the_protocol(policy, echo_server, service, token):
    server = echo_server(lambda: policy.server_context(service))
    result = server.handshake(pinned_client("TLSv1.3", alpn=[token]))
    assert result.ok
    assert result.alpn == token


def test_alpn_token_of_another_protocol_is_not_selected(policy, echo_server):
    # ALPACA: a POP3 client redirected to the IMAP port must not see "pop3" accepted.
    server = echo_server(lambda: policy.server_context(Service.IMAPS))
    result = server.handshake(pinned_client("TLSv1.3", alpn=["pop3"]))
    assert result.alpn != "pop3"


def test_clients_without_alpn_still_connect(policy, echo_server):
    server = echo_server(lambda: policy.server_context(Service.IMAPS))
    result = server.handshake(pinned_client("TLSv1.2"))
    assert result.ok
    assert result.alpn is None


def test_no_alpn_token_is_invented_for_smtp():
    for service in (Service.SMTP, Service.SUBMISSION, Service.SUBMISSIONS):
        assert service not in ALPN_PROTOCOLS


# -- describe -----------------------------------------------------------------------------


def test_describe_names_version_cipher_and_bits(policy, echo_server):
    server = echo_server(lambda: policy.server_context(Service.IMAPS))
    result = server.handshake(pinned_client("TLSv1.3"))
    assert re.fullmatch(r"TLSv1\.3 TLS_[A-Z0-9_]+ \(\d+ bits\)", result.description)


# -- reload -------------------------------------------------------------------------------


def test_reload_serves_new_certificate_to_new_connections_only(
    pair, pair_factory, echo_server, tls_log
):
    policy = TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key))
    old_fp = policy.cert_info.fingerprint
    server = echo_server(lambda: policy.server_context(Service.IMAPS))
    client = pinned_client("TLSv1.3")

    established = server.connect(client)
    assert sha256(established.getpeercert(binary_form=True)) == old_fp

    install(pair_factory("b"), pair)
    assert policy.reload() is True
    assert "tls.reload.ok" in tls_log.events(logging.INFO)
    new_fp = policy.cert_info.fingerprint
    assert new_fp != old_fp

    fresh = server.handshake(client)
    assert fresh.ok
    assert sha256(fresh.peer_der) == new_fp
    # the connection made before the reload keeps working, with its certificate
    with established:
        established.sendall(b"still here\r\n")
        assert established.recv(100) == b"still here\r\n"
        assert sha256(established.getpeercert(binary_form=True)) == old_fp


@pytest.mark.parametrize("breakage", ["garbage_cert", "missing_key", "mismatched_key", "empty"])
def test_reload_refuses_a_broken_pair_and_keeps_the_old_one(
    pair, pair_factory, echo_server, tls_log, breakage
):
    policy = TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key))
    old_fp = policy.cert_info.fingerprint
    if breakage == "garbage_cert":
        pair.cert.write_text(
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
        )
    elif breakage == "missing_key":
        pair.key.unlink()
    elif breakage == "mismatched_key":
        shutil.copyfile(pair_factory("b").key, pair.key)
    else:
        pair.cert.write_bytes(b"")

    assert policy.reload() is False
    failures = [r for r in tls_log.records if r.getMessage() == "tls.reload.failed"]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR
    assert failures[0].reason  # type: ignore[attr-defined]
    assert policy.cert_info.fingerprint == old_fp

    server = echo_server(lambda: policy.server_context(Service.SUBMISSIONS))
    result = server.handshake(pinned_client("TLSv1.3"))
    assert result.ok
    assert sha256(result.peer_der) == old_fp


def test_startup_with_a_broken_pair_fails(pair, pair_factory):
    shutil.copyfile(pair_factory("b").key, pair.key)
    with pytest.raises(CertError, match="does not match"):
        TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key))


async def test_watch_reloads_when_the_files_change(pair, pair_factory, tls_log):
    policy = TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key, reload_interval=0.05))
    old_fp = policy.cert_info.fingerprint
    task = asyncio.create_task(policy.watch())
    try:
        await asyncio.sleep(0.15)
        assert policy.cert_info.fingerprint == old_fp  # nothing changed: nothing reloaded
        assert "tls.reload.ok" not in tls_log.events()
        install(pair_factory("b"), pair)
        deadline = time.monotonic() + 3
        while policy.cert_info.fingerprint == old_fp and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert policy.cert_info.fingerprint != old_fp
        assert policy.cert_info.names == ("b.mail.test",)
        assert tls_log.events(logging.INFO).count("tls.reload.ok") == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watch_logs_a_broken_pair_once_and_recovers(pair, pair_factory, tls_log):
    policy = TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key, reload_interval=0.05))
    old_fp = policy.cert_info.fingerprint
    task = asyncio.create_task(policy.watch())
    try:
        tmp = pair.key.with_suffix(".new")
        shutil.copyfile(pair_factory("b").key, tmp)  # a key that is not the cert's
        tmp.replace(pair.key)
        await asyncio.sleep(0.5)
        assert tls_log.events(logging.ERROR).count("tls.reload.failed") == 1
        assert policy.cert_info.fingerprint == old_fp
        tmp = pair.cert.with_suffix(".new")
        shutil.copyfile(pair_factory("b").cert, tmp)  # now the pair is whole again
        tmp.replace(pair.cert)
        deadline = time.monotonic() + 3
        while policy.cert_info.fingerprint == old_fp and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert policy.cert_info.names == ("b.mail.test",)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- health warnings ----------------------------------------------------------------------


def test_warns_when_the_certificate_does_not_cover_the_hostname(pair, tls_log):
    TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key), hostname="mx.other.test")
    assert "tls.cert.name_mismatch" in tls_log.events(logging.WARNING)


def test_no_name_warning_when_the_certificate_covers_the_hostname(pair, tls_log):
    TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key), hostname="a.mail.test")
    assert "tls.cert.name_mismatch" not in tls_log.events()


def test_warns_when_the_certificate_expires_soon(tmp_path, tls_log):
    from postkeep.tls.certs import generate_self_signed

    generate_self_signed("soon.test", tmp_path / "c.pem", tmp_path / "k.pem", days=3)
    TlsPolicy(TlsConfig(cert=tmp_path / "c.pem", key=tmp_path / "k.pem"))
    assert "tls.cert.expiring" in tls_log.events(logging.WARNING)


def test_warns_about_a_world_readable_key(pair, tls_log):
    pair.key.chmod(0o644)
    TlsPolicy(TlsConfig(cert=pair.cert, key=pair.key))
    assert "tls.key.permissions" in tls_log.events(logging.WARNING)


# -- client contexts ----------------------------------------------------------------------


def test_verify_mode_checks_the_certificate_and_the_name(policy, pair, echo_server):
    server = echo_server(lambda: policy.server_context(Service.IMAPS))
    ctx = policy.client_context("verify", cafile=pair.cert)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with server.connect(ctx, server_hostname="a.mail.test") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLCertVerificationError):
        server.connect(ctx, server_hostname="b.mail.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        server.connect(policy.client_context("verify", cafile=None), "a.mail.test")


def test_verify_mode_cafile_adds_to_the_system_cas(policy, pair):
    system = ssl.create_default_context().cert_store_stats()["x509"]
    ctx = policy.client_context("verify", cafile=pair.cert)
    assert ctx.cert_store_stats()["x509"] == system + 1  # the file's, and every system CA


def test_verify_mode_refuses_tls11_servers(policy, pair, echo_server, tls10_possible):
    server = echo_server(lambda: plain_server(pair, "TLSv1.1"))
    ctx = policy.client_context("verify", cafile=pair.cert)
    with pytest.raises(ssl.SSLError):
        server.connect(ctx, server_hostname="a.mail.test")


def test_opportunistic_mode_reaches_a_tls10_only_server(pair, policy, echo_server, tls10_possible):
    server = echo_server(lambda: plain_server(pair, "TLSv1"))
    result = server.handshake(policy.client_context("opportunistic"))
    assert result.ok, result.error
    assert result.version == "TLSv1"
    assert result.cipher is not None and result.cipher[0].startswith("ECDHE-")


def test_opportunistic_mode_refuses_rsa_key_exchange(pair, policy, echo_server):
    def server_ctx() -> ssl.SSLContext:
        ctx = plain_server(pair, "TLSv1.2")
        ctx.set_ciphers("AES128-GCM-SHA256:@SECLEVEL=0")
        return ctx

    server = echo_server(server_ctx)
    assert not server.handshake(policy.client_context("opportunistic")).ok


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"])
def test_probe_mode_can_pin_each_version(policy, echo_server, tls10_possible, version):
    server = echo_server(lambda: policy.server_context(Service.SMTP))
    ctx = policy.client_context("probe", min_version=version, max_version=version)
    result = server.handshake(ctx)
    assert result.ok, result.error
    assert result.version == version


def test_probe_mode_detects_the_access_floor(policy, echo_server, tls10_possible):
    server = echo_server(lambda: policy.server_context(Service.POP3S))
    accepted = [
        v
        for v in ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
        if server.handshake(policy.client_context("probe", min_version=v, max_version=v)).ok
    ]
    assert accepted == ["TLSv1.2", "TLSv1.3"]


def test_probe_mode_can_pin_ciphers(policy, echo_server):
    server = echo_server(lambda: policy.server_context(Service.IMAPS))
    ctx = policy.client_context("probe", max_version="TLSv1.2", ciphers="AES128-GCM-SHA256")
    assert not server.handshake(ctx).ok


def test_client_context_argument_checks(policy, tmp_path: Path):
    with pytest.raises(ValueError, match="unknown client mode"):
        policy.client_context("insecure")
    with pytest.raises(ValueError, match="does not go below"):
        policy.client_context("verify", min_version="TLSv1")
    with pytest.raises(ValueError, match="probe only"):
        policy.client_context("opportunistic", ciphers="ALL")
    with pytest.raises(ValueError, match="meaningless"):
        policy.client_context("probe", cafile=tmp_path / "ca.pem")
    ctx = policy.client_context("verify", min_version="TLSv1.3")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
