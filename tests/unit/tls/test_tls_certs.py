"""certs.py: the self-signed generator and the pair validator."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postkeep.tls.certs import (
    CertError,
    file_stamp,
    fingerprint,
    generate_self_signed,
    load_pair,
)


def test_self_signed_pair_is_what_clients_check(pair):
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.mail.test"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_self_signed_validity_and_extra_names(tmp_path: Path):
    generate_self_signed(
        "Mail.Example.com",
        tmp_path / "c.pem",
        tmp_path / "k.pem",
        days=30,
        extra_names=["mx.example.com", "192.0.2.7", "mail.example.com"],
    )
    info = load_pair(tmp_path / "c.pem", tmp_path / "k.pem")
    assert info.names == ("mail.example.com", "mx.example.com", "192.0.2.7")
    assert info.self_signed
    assert info.key_type == "RSA 2048"
    now = dt.datetime.now(dt.UTC)
    assert info.not_before < now
    assert dt.timedelta(days=29) < info.not_after - now <= dt.timedelta(days=30)


def test_self_signed_refuses_unicode_host_names(tmp_path: Path):
    with pytest.raises(ValueError, match="xn--"):
        generate_self_signed("bücher.example", tmp_path / "c.pem", tmp_path / "k.pem")


def test_key_file_is_0600_and_written_atomically(tmp_path: Path):
    old_umask = os.umask(0)  # even with a permissive umask
    try:
        generate_self_signed("m.test", tmp_path / "tls" / "c.pem", tmp_path / "tls" / "k.pem")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "tls" / "k.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls" / "c.pem").stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["c.pem", "k.pem"]


def test_regenerating_replaces_files_with_new_inodes(tmp_path: Path):
    c, k = tmp_path / "c.pem", tmp_path / "k.pem"
    generate_self_signed("m.test", c, k)
    before = (file_stamp(c), file_stamp(k))
    generate_self_signed("m.test", c, k)
    after = (file_stamp(c), file_stamp(k))
    assert before[0].inode != after[0].inode and before[1].inode != after[1].inode


def test_load_pair_describes_the_pair(pair):
    info = load_pair(pair.cert, pair.key)
    der = x509.load_pem_x509_certificate(pair.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert info.fingerprint == fingerprint(der)
    assert info.fingerprint.replace(":", "").lower() == hashlib.sha256(der).hexdigest()
    assert info.names == ("a.mail.test",)
    assert info.chain_length == 1
    assert info.key_mode == 0o600
    assert info.cert_stamp == file_stamp(pair.cert)
    assert info.key_stamp.size == pair.key.stat().st_size
    assert "CN=a.mail.test" in info.subject


def test_load_pair_accepts_a_ca_issued_chain(tmp_path: Path):
    ca = trustme.CA()
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("mail.example.com", "*.example.org")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    info = load_pair(cert, key)
    assert info.chain_length == 2
    assert not info.self_signed
    assert info.key_type == "EC secp256r1"
    assert info.covers("mail.example.com")
    assert info.covers("imap.example.org")


def test_load_pair_refuses_a_chain_in_the_wrong_order(tmp_path: Path):
    ca = trustme.CA()
    leaf = ca.create_child_ca().issue_cert("mail.example.com")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in reversed(leaf.cert_chain_pems)))
    key.write_bytes(leaf.private_key_pem.bytes())
    with pytest.raises(CertError, match="server certificate first") as info:
        load_pair(cert, key)
    assert info.value.path == cert


def _self_signed_with(key, tmp_path: Path) -> tuple[Path, Path]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    c, k = tmp_path / "c.pem", tmp_path / "k.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return c, k


def test_load_pair_refuses_weak_rsa_keys(tmp_path: Path):
    c, k = _self_signed_with(rsa.generate_private_key(65537, 1024), tmp_path)
    with pytest.raises(CertError, match="1024 bits is too weak") as info:
        load_pair(c, k)
    assert info.value.path == k


def test_load_pair_refuses_unusual_curves(tmp_path: Path):
    c, k = _self_signed_with(ec.generate_private_key(ec.SECP256K1()), tmp_path)
    with pytest.raises(CertError, match="secp256k1"):
        load_pair(c, k)


def test_load_pair_refuses_a_key_of_another_certificate(pair, pair_factory):
    with pytest.raises(CertError, match="does not match") as info:
        load_pair(pair.cert, pair_factory("b").key)
    assert info.value.path == pair_factory("b").key


def test_load_pair_refuses_an_encrypted_key(pair):
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CertError, match="encrypted"):
        load_pair(pair.cert, pair.key)


@pytest.mark.parametrize(
    ("target", "content", "message"),
    [
        ("cert", b"", "contains no PEM certificate"),
        ("cert", b"hello\n", "contains no PEM certificate"),
        ("cert", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid"),
        ("key", b"", "does not contain a PEM private key"),
        ("key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "PEM private"),
    ],
)
def test_load_pair_refuses_unparsable_files(pair, target, content, message):
    path = pair.cert if target == "cert" else pair.key
    path.write_bytes(content)
    with pytest.raises(CertError, match=message) as info:
        load_pair(pair.cert, pair.key)
    assert info.value.path == path


def test_load_pair_refuses_missing_and_unreadable_files(pair, tmp_path: Path):
    with pytest.raises(CertError, match="does not exist") as info:
        load_pair(tmp_path / "nope.pem", pair.key)
    assert info.value.path == tmp_path / "nope.pem"
    with pytest.raises(CertError, match="is a directory"):
        load_pair(pair.cert, tmp_path)
    if os.geteuid() != 0:  # root reads anything
        pair.key.chmod(0)
        with pytest.raises(CertError, match="not readable"):
            load_pair(pair.cert, pair.key)


def test_load_pair_refuses_a_private_key_in_the_certificate_file(pair):
    pair.cert.write_bytes(pair.cert.read_bytes() + pair.key.read_bytes())
    with pytest.raises(CertError, match="also contains a private key"):
        load_pair(pair.cert, pair.key)


def test_load_pair_accepts_one_combined_file_named_as_both(pair, tmp_path: Path):
    combined = tmp_path / "combined.pem"
    combined.write_bytes(pair.cert.read_bytes() + pair.key.read_bytes())
    assert load_pair(combined, combined).names == ("a.mail.test",)


@pytest.mark.parametrize(
    ("names", "host", "covered"),
    [
        (("mail.example.com",), "mail.example.com", True),
        (("mail.example.com",), "MAIL.example.com.", True),
        (("mail.example.com",), "example.com", False),
        (("*.example.com",), "mail.example.com", True),
        (("*.example.com",), "example.com", False),
        (("*.example.com",), "a.b.example.com", False),  # one label only (RFC 6125 §6.4.3)
        (("*.example.com",), ".example.com", False),
    ],
)
def test_covers_follows_rfc6125(pair, names, host, covered):
    import dataclasses

    info = dataclasses.replace(load_pair(pair.cert, pair.key), names=names)
    assert info.covers(host) is covered
