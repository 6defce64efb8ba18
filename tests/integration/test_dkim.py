"""DKIM end to end: ``postkeep domain add`` makes the keys, ``postkeep domain dns`` publishes
them, a real postkeep signs what alice submits on 465, delivers it to an aiosmtpd receiver
(outbound_fixtures.py), and dkimpy verifies the delivered bytes against the published
records.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim as dkimpy
import pytest
import trustme
from outbound_fixtures import Remote
from server_harness import (
    DOMAIN,
    HOSTNAME,
    PASSWORDS,
    Instance,
    free_port,
    run_postkeep,
    wait_for,
    write_cert,
    write_config,
)

from postkeep.cli.accounts import mta_sts_id
from postkeep.config.load import load_config
from postkeep.mail import dkim
from postkeep.store import make_store
from postkeep.store.api import DkimKey
from postkeep.web import mta_sts

ALICE = "alice@example.test"
MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Friend <friend@remote.test>, Bob <bob@example.test>\r\n"
    b"Subject: signed, I hope\r\n"
    b"\r\n"
    b"Hello over there.\r\n"
    b".a line that starts with a dot\r\n"
)


@pytest.fixture
def remote(ca: trustme.CA, ca_file: Path, tmp_path: Path) -> Iterator[Remote]:
    with Remote(ca, ca_file, tmp_path / "remote") as r:
        yield r


def outbound_extra(remote: Remote) -> str:
    return (
        f'[outbound]\nmx_port = {remote.port}\nca_file = "{remote.ca_file}"\n'
        "retry_initial = 0.2\nretry_max = 0.5\nconnect_timeout = 5.0\n"
        f'[dns]\nnameservers = ["{remote.dns.nameserver}"]\ntimeout = 3.0\n'
    )


def queue_only() -> str:
    """A nameserver that never answers: remote mail stays queued ("try later")."""
    return f'[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\ntimeout = 1.0\n'


def submit(inst: Instance, tls_ctx: ssl.SSLContext, rcpts: list[str], message: bytes) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", inst.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.login(ALICE, PASSWORDS[ALICE])
        s.sendmail(ALICE, rcpts, message)


def zone(text: str) -> list[tuple[str, str, str]]:
    """(name, type, data) of each record line; TXT data unquoted and joined."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(";"):
            continue
        name, ttl, cls, rtype, data = line.split(None, 4)
        assert cls == "IN" and int(ttl) > 0, line
        if rtype == "TXT":
            data = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', data))
        out.append((name, rtype, data))
    return out


def dns_of(records: list[tuple[str, str, str]]) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering from the printed zone, as a resolver would."""
    txt = {name.lower(): data.encode() for name, rtype, data in records if rtype == "TXT"}

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        return txt.get(text.lower().rstrip(".") + ".")

    return dnsfunc


def signatures(message: bytes) -> int:
    return len(re.findall(rb"^DKIM-Signature:", message, re.M | re.I))


def each_verifies(message: bytes, dnsfunc: Callable[..., bytes | None]) -> list[bool]:
    results = []
    for i in range(signatures(message)):
        try:
            results.append(bool(dkimpy.DKIM(message).verify(idx=i, dnsfunc=dnsfunc)))
        except dkimpy.DKIMException:
            results.append(False)
    return results


def stored_keys(config_path: Path, domain: str) -> list[DkimKey]:
    async def run() -> list[DkimKey]:
        store = make_store(load_config(config_path))
        await store.open()
        try:
            async with store.read() as tx:
                return await tx.dkim_keys(domain)
        finally:
            await store.close()

    return asyncio.run(run())


def test_delivered_mail_verifies_against_the_published_keys(
    make_instance: Callable[..., Instance], remote: Remote, tls_ctx: ssl.SSLContext,
) -> None:
    mx = remote.add_mx("remote.test", "mx.remote.test", "127.0.0.2")
    server = make_instance(extra=outbound_extra(remote))
    cfg = str(server.config_path)
    # example.test exists (the harness made it, as postkeep init does) without keys:
    # domain add gives it its keys.
    added = run_postkeep("--config", cfg, "domain", "add", DOMAIN)
    assert added.returncode == 0, added.stderr
    printed = run_postkeep("--config", cfg, "domain", "dns", DOMAIN)
    assert printed.returncode == 0, printed.stderr
    published = zone(printed.stdout)
    dnsfunc = dns_of(published)

    submit(server, tls_ctx, ["friend@remote.test", "bob@example.test"], MESSAGE)
    assert wait_for(lambda: len(mx.messages) == 1, timeout=20)
    delivered = mx.messages[0].data
    assert signatures(delivered) == 2
    fields = re.findall(rb"^DKIM-Signature:.*?(?=^\S)", delivered, re.M | re.S)
    assert [re.findall(rb"\ba=([\w-]+);", f) for f in fields] == [
        [b"ed25519-sha256"], [b"rsa-sha256"]]
    assert all(re.search(rb"\bd=example\.test;", f) for f in fields)
    assert each_verifies(delivered, dnsfunc) == [True, True]
    assert dkimpy.verify(delivered, dnsfunc=dnsfunc)

    tampered = delivered.replace(b"Hello over there.", b"Hello over here.")
    assert each_verifies(tampered, dnsfunc) == [False, False]
    assert not dkimpy.verify(tampered, dnsfunc=dnsfunc)
    resubjected = delivered.replace(b"Subject: signed, I hope", b"Subject: pay this invoice")
    assert each_verifies(resubjected, dnsfunc) == [False, False]

    # One blob: bob's local copy is the same signed message.
    [(_, local_copy)] = server.inbox("bob@example.test")
    assert each_verifies(local_copy, dnsfunc) == [True, True]


def test_mail_that_stays_here_is_not_signed(
    make_instance: Callable[..., Instance], tls_ctx: ssl.SSLContext,
) -> None:
    server = make_instance()
    assert run_postkeep("--config", str(server.config_path), "domain", "add",
                        DOMAIN).returncode == 0
    submit(server, tls_ctx, ["bob@example.test"], MESSAGE)
    [(_, data)] = server.inbox("bob@example.test")
    assert signatures(data) == 0


def test_mail_from_a_domain_without_keys_is_sent_unsigned(
    make_instance: Callable[..., Instance], tls_ctx: ssl.SSLContext,
) -> None:
    server = make_instance(extra=queue_only())  # example.test, without keys
    submit(server, tls_ctx, ["friend@remote.test"], MESSAGE)
    [(_, data)] = server.outbound()
    assert signatures(data) == 0 and b"Hello over there." in data


def test_queued_blob_is_signed_once_for_many_remote_recipients(
    make_instance: Callable[..., Instance], tls_ctx: ssl.SSLContext,
) -> None:
    server = make_instance(extra=queue_only())
    assert run_postkeep("--config", str(server.config_path), "domain", "add",
                        DOMAIN).returncode == 0
    dnsfunc = dns_of(zone(run_postkeep("--config", str(server.config_path), "domain", "dns",
                                       DOMAIN).stdout))
    submit(server, tls_ctx, ["a@remote.test", "b@elsewhere.test"], MESSAGE)
    [(_, data)] = server.outbound()
    assert signatures(data) == 2
    assert each_verifies(data, dnsfunc) == [True, True]


# -- the command line ------------------------------------------------------------------
@pytest.fixture
def config_path(ca: trustme.CA, tmp_path: Path) -> Path:
    """submissions, imaps, pop3s and http on; submission, imap and pop3 off."""
    cert, key = write_cert(ca, tmp_path / "tls")
    return write_config(tmp_path, cert, key,
                        services=("smtp", "submissions", "imaps", "pop3s", "http"))


def test_domain_add_creates_two_keys_and_dns_prints_every_record(
    config_path: Path, tmp_path: Path,
) -> None:
    cfg = str(config_path)
    added = run_postkeep("--config", cfg, "domain", "add", "Other.TEST")
    assert added.returncode == 0, added.stderr
    keys = stored_keys(config_path, "other.test")
    assert sorted(k.algorithm for k in keys) == ["ed25519", "rsa"]
    assert all(re.fullmatch(r"pk-(ed|rsa)-\d{6}", k.selector) for k in keys)
    for k in keys:
        assert k.selector in added.stdout
    again = run_postkeep("--config", cfg, "domain", "add", "other.test")
    assert again.returncode == 1 and "exists" in again.stderr
    assert len(stored_keys(config_path, "other.test")) == 2

    result = run_postkeep("domain", "dns", "other.test", "--config", cfg)
    assert result.returncode == 0, result.stderr
    records = zone(result.stdout)
    got: dict[tuple[str, str], list[str]] = {}
    for name, rtype, data in records:
        got.setdefault((name, rtype), []).append(data)
    host = HOSTNAME + "."
    assert got[("other.test.", "MX")] == [f"10 {host}"]
    assert got[("other.test.", "TXT")] == ["v=spf1 mx -all"]
    assert got[("_dmarc.other.test.", "TXT")] == [
        "v=DMARC1; p=quarantine; rua=mailto:dmarc-reports@other.test"]
    assert got[("_smtp._tls.other.test.", "TXT")] == [
        "v=TLSRPTv1; rua=mailto:tls-reports@other.test"]
    # The trustme certificate is CA-issued and names the host: the policy is "enforce".
    policy = mta_sts.policy_text(mode="enforce", mx=HOSTNAME)
    assert got[("_mta-sts.other.test.", "TXT")] == [f"v=STSv1; id={mta_sts_id(policy)}"]
    for k in keys:
        assert got[(f"{k.selector}._domainkey.other.test.", "TXT")] == [k.public_txt]

    config = load_config(config_path)
    ports = {s.value: a[0].port for s, a in config.listeners.items()}
    assert got[("_submissions._tcp.other.test.", "SRV")] == [
        f"0 0 {ports['submissions']} {host}"]
    assert got[("_imaps._tcp.other.test.", "SRV")] == [f"0 0 {ports['imaps']} {host}"]
    assert got[("_pop3s._tcp.other.test.", "SRV")] == [f"20 0 {ports['pop3s']} {host}"]
    for off in ("_submission", "_imap", "_pop3"):
        assert got[(f"{off}._tcp.other.test.", "SRV")] == ["0 0 0 ."], off
    assert len(records) == 13  # MX, SPF, DMARC, 2 DKIM, MTA-STS, TLS-RPT, 6 SRV
    # The report addresses do not exist yet: the comments say how to make them.
    assert "postkeep alias add dmarc-reports@other.test" in result.stdout
    assert "postkeep alias add tls-reports@other.test" in result.stdout


def test_domain_dns_refuses_an_unknown_domain(config_path: Path) -> None:
    result = run_postkeep("--config", str(config_path), "domain", "dns", "nowhere.test")
    assert result.returncode == 1 and "nowhere.test" in result.stderr
    bad = run_postkeep("--config", str(config_path), "domain", "dns", "not a domain")
    assert bad.returncode == 2


def test_the_published_key_verifies_what_the_stored_key_signs(config_path: Path) -> None:
    cfg = str(config_path)
    assert run_postkeep("--config", cfg, "domain", "add", "other.test").returncode == 0
    dnsfunc = dns_of(zone(run_postkeep("--config", cfg, "domain", "dns", "other.test").stdout))
    message = b"From: x@other.test\r\nTo: y@remote.test\r\nSubject: s\r\n\r\nbody\r\n"
    signed = dkim.sign(message, "other.test", stored_keys(config_path, "other.test")) + message
    assert each_verifies(signed, dnsfunc) == [True, True]
