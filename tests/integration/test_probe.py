"""``postkeep probe`` against real servers: postkeep in several configurations, aiosmtpd
allowing AUTH before TLS, an IMAP stub open to STARTTLS injection, and openssl s_client."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from server_harness import (
    ALL_SERVICES,
    HOSTNAME,
    Instance,
    free_ports,
    have,
    run_postkeep,
    write_cert,
    write_config,
)

from postkeep.config.schema import Service
from postkeep.probe import Options, probe
from postkeep.probe.checks import exit_code

ACCESS = ("submissions", "submission", "imaps", "imap", "pop3s", "pop3")
VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def local_openssl_offers(version: str) -> bool:
    tls = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1}.get(version)
    if tls is None:
        return True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.minimum_version = ctx.maximum_version = tls
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        return False
    return True


def ports_arg(server: Instance, extra: dict[str, int] | None = None) -> str:
    ports = {s: p for s, p in server.ports.items() if s in ALL_SERVICES}
    ports.update(extra or {})
    return ",".join(f"{s}={p}" for s, p in ports.items())


def run_probe(*args: str) -> tuple[int, dict[str, Any]]:
    proc = run_postkeep("probe", "127.0.0.1", "--json", "--timeout", "5", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def by_service(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["service"]: p for p in data["ports"]}


@pytest.fixture
def custom_instance(tmp_path: Path) -> Iterator[Callable[..., Instance]]:
    started: list[Instance] = []

    def make(cert: tuple[Path, Path], **kwargs: Any) -> Instance:
        directory = tmp_path / f"custom{len(started)}"
        inst = Instance(write_config(directory, *cert, **kwargs)).start()
        started.append(inst)
        return inst

    yield make
    for inst in started:
        inst.stop()


def test_postkeep_all_ports_secure_via_cli(server: Instance, ca_file: Path) -> None:
    code, data = run_probe("--ports", ports_arg(server), "--ca", str(ca_file), "--active")
    ports = by_service(data)
    assert code == 0 and data["verdict"] == "secure" and data["exit_code"] == 0
    assert set(ports) == set(ALL_SERVICES)
    for service, rep in ports.items():
        assert rep["verdict"] == "secure", (service, rep["reasons"])
        versions = rep["tls"]["versions"]
        assert versions["TLSv1.2"] == "accepted" and versions["TLSv1.3"] == "accepted"
        for old in ("TLSv1", "TLSv1.1"):
            if not local_openssl_offers(old):
                assert versions[old] == "not_testable"
            elif service == "smtp":
                assert versions[old] == "accepted"  # RFC 7435: opportunistic MX STARTTLS
            else:
                assert versions[old] == "refused", service
        cert = rep["tls"]["certificate"]
        assert cert["trusted"] is True and cert["name_matches"] is True
        assert cert["expired"] is False and cert["days_left"] > 300
        assert rep["credentials"]["exposed"] == []
    assert {ports[s]["mode"] for s in ("submissions", "imaps", "pop3s")} == {"implicit_tls"}
    assert {ports[s]["mode"] for s in ("smtp", "submission", "imap", "pop3")} == {"starttls"}
    # No credentials before TLS, as advertised and as answered to a fake login.
    assert ports["imap"]["credentials"]["before_tls"]["login_disabled"] is True
    assert ports["imap"]["credentials"]["before_tls"]["auth"] == []
    assert ports["submission"]["credentials"]["before_tls"]["auth"] == []
    assert ports["smtp"]["credentials"]["before_tls"]["auth"] == []
    assert ports["pop3"]["credentials"]["before_tls"]["user"] is False
    assert ports["submission"]["credentials"]["after_tls"]["auth"] != []
    for service in ("submission", "imap", "pop3"):
        assert ports[service]["credentials"]["login_attempt"]["outcome"] == "refused"
    assert ports["smtp"]["credentials"]["login_attempt"]["outcome"] == "unavailable"
    for service in ("smtp", "submission", "imap", "pop3"):
        injection = ports[service]["starttls"]["injection"]
        assert injection["vulnerable"] is False and injection["error"] is None, service
    # What to type into a mail program: implicit TLS first, port 25 never.
    incoming, outgoing = data["settings"]["incoming"], data["settings"]["outgoing"]
    assert (incoming[0]["service"], incoming[0]["security"]) == ("imaps", "SSL/TLS")
    assert (outgoing[0]["service"], outgoing[0]["security"]) == ("submissions", "SSL/TLS")
    assert outgoing[0]["words"]["Thunderbird"] == "SSL/TLS"
    assert [o["service"] for o in outgoing] == ["submissions", "submission"]
    assert outgoing[1]["words"]["K-9 Mail / Thunderbird for Android"] == "STARTTLS"


def test_table_output_and_autoconfig_file(server: Instance, ca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "config-v1.1.xml"
    proc = run_postkeep("probe", "127.0.0.1", "--ports", ports_arg(server), "--ca",
                        str(ca_file), "--autoconfig", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Settings for your mail program" in proc.stdout
    assert "Connection security = SSL/TLS" in proc.stdout
    xml = out.read_text()
    assert xml.index(f"<port>{server.ports['imaps']}</port>") < xml.index(
        f"<port>{server.ports['imap']}</port>")
    assert "<socketType>SSL</socketType>" in xml and "plain" not in xml


def test_usage_errors_exit_2() -> None:
    assert run_postkeep("probe", "127.0.0.1", "--ports", "imaps=notaport").returncode == 2
    assert run_postkeep("probe", "127.0.0.1", "--ports", "ftp=21").returncode == 2
    assert run_postkeep("probe", "127.0.0.1", "--dns", "nowhere").returncode == 2
    assert run_postkeep("probe").returncode == 2


async def test_plaintext_access_off_closes_143_and_110(
    make_instance: Callable[..., Instance], ca_file: Path
) -> None:
    imap_port, pop3_port = free_ports(2)
    server = make_instance(
        ports={"imap": imap_port, "pop3": pop3_port},
        extra="[security]\nplaintext_access = false",
    )
    ports = {Service(s): p for s, p in server.ports.items() if s in ALL_SERVICES}
    ports.update({Service.IMAP: imap_port, Service.POP3: pop3_port})
    result = await probe("127.0.0.1", ports, Options(timeout=5, ca=ca_file))
    verdicts = {r.service.value: r.verdict for r in result.ports}
    assert verdicts["imap"] == verdicts["pop3"] == "closed"
    assert all(v == "secure" for s, v in verdicts.items() if s not in ("imap", "pop3"))
    assert exit_code(result) == 0


def test_legacy_tls_is_weak(make_instance: Callable[..., Instance], ca_file: Path) -> None:
    if not local_openssl_offers("TLSv1"):
        pytest.skip("this OpenSSL cannot offer TLS 1.0")
    server = make_instance(tls_extra='min_version = "TLSv1"\nlegacy_clients = true')
    code, data = run_probe("--ports", ports_arg(server), "--ca", str(ca_file))
    ports = by_service(data)
    assert code == 1 and data["verdict"] == "weak"
    for service in ACCESS:
        assert ports[service]["tls"]["versions"]["TLSv1"] == "accepted"
        assert ports[service]["verdict"] == "weak"
        assert any("TLS 1.0" in r and "RFC 8996" in r for r in ports[service]["reasons"])
    assert ports["smtp"]["verdict"] == "secure"
    assert data["settings"] == {"incoming": [], "outgoing": []}


def test_certificate_for_another_name_is_weak(
    custom_instance: Callable[..., Instance], ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    server = custom_instance(write_cert(ca, tmp_path / "other", "other.example.test"),
                             services=("imaps", "submission"))
    code, data = run_probe("--ports", ports_arg(server), "--ca", str(ca_file))
    assert code == 1
    for rep in data["ports"]:
        cert = rep["tls"]["certificate"]
        assert cert["names"] == ["other.example.test"]
        assert cert["name_matches"] is False and cert["trusted"] is True
        assert rep["verdict"] == "weak"
        assert any("does not cover the host name" in r for r in rep["reasons"])


def test_expired_certificate_is_weak(
    custom_instance: Callable[..., Instance], ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    leaf = ca.issue_cert(HOSTNAME, "127.0.0.1", not_before=now - dt.timedelta(days=30),
                         not_after=now - dt.timedelta(days=2))
    directory = tmp_path / "expired"
    directory.mkdir()
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    leaf.private_key_pem.write_to_path(str(key_path))
    leaf.cert_chain_pems[0].write_to_path(str(cert_path))
    server = custom_instance((cert_path, key_path), services=("imaps",))
    code, data = run_probe("--ports", ports_arg(server), "--ca", str(ca_file))
    (rep,) = data["ports"]
    cert = rep["tls"]["certificate"]
    assert code == 1 and rep["verdict"] == "weak"
    assert cert["expired"] is True and cert["days_left"] < 0
    assert cert["trusted"] is False and "expired" in cert["verify_error"]
    assert any("certificate expired" in r for r in rep["reasons"])


def test_without_the_ca_the_chain_is_not_trusted(server: Instance) -> None:
    code, data = run_probe("--ports", f"imaps={server.ports['imaps']}")
    (rep,) = data["ports"]
    assert code == 1 and rep["tls"]["certificate"]["trusted"] is False
    assert rep["verdict"] == "weak"


# -- a deliberately insecure SMTP server: aiosmtpd with AUTH before TLS ---------------------
def test_aiosmtpd_with_auth_before_tls_is_insecure(ca: trustme.CA) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    leaf = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(server_ctx)

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK"

    def refuse_all(*args: Any) -> AuthResult:
        return AuthResult(success=False, handled=False)

    (port,) = free_ports(1)
    controller = Controller(
        Handler(), hostname="127.0.0.1", port=port, tls_context=server_ctx,
        require_starttls=False, auth_require_tls=False, authenticator=refuse_all,
    )
    controller.start()
    try:
        code, data = run_probe("--ports", f"submission={port}", "--active")
    finally:
        controller.stop()
    (rep,) = data["ports"]
    assert code == 1 and rep["verdict"] == "insecure" and rep["mode"] == "starttls"
    assert "PLAIN" in rep["credentials"]["before_tls"]["auth"]
    assert any("AUTH" in e and "before STARTTLS" in e for e in rep["credentials"]["exposed"])
    assert rep["credentials"]["login_attempt"]["outcome"] == "rejected"
    assert any("checked a (fake) login before TLS" in r for r in rep["reasons"])
    assert data["settings"]["outgoing"] == []


# -- an IMAP server open to STARTTLS command injection (CVE-2011-0411 class) ----------------
async def vulnerable_imap(ctx: ssl.SSLContext) -> asyncio.Server:
    """Answers whatever is in its StreamReader buffer after STARTTLS: the classic bug."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False
        caps = "IMAP4rev1 STARTTLS LOGINDISABLED"
        writer.write(f"* OK [CAPABILITY {caps}] stub ready\r\n".encode())
        try:
            while line := await reader.readline():
                tag, _, command = line.decode().strip().partition(" ")
                verb = command.split(" ")[0].upper()
                if verb == "CAPABILITY":
                    shown = "IMAP4rev1 AUTH=PLAIN" if tls else caps
                    writer.write(f"* CAPABILITY {shown}\r\n{tag} OK done\r\n".encode())
                elif verb == "STARTTLS" and not tls:
                    writer.write(f"{tag} OK Begin TLS\r\n".encode())
                    await writer.drain()
                    await writer.start_tls(ctx)  # the reader keeps its plaintext buffer
                    tls = True
                elif verb == "LOGIN":
                    writer.write(f"{tag} NO [PRIVACYREQUIRED] TLS first\r\n".encode())
                else:
                    writer.write(f"{tag} OK {verb} completed\r\n".encode())
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(session, "127.0.0.1", 0)


async def test_active_probe_reports_starttls_injection(ca: trustme.CA, ca_file: Path) -> None:
    leaf = ca.issue_cert("127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    stub = await vulnerable_imap(ctx)
    port = stub.sockets[0].getsockname()[1]
    try:
        passive = await probe("127.0.0.1", {Service.IMAP: port}, Options(timeout=3, ca=ca_file))
        result = await probe("127.0.0.1", {Service.IMAP: port},
                             Options(timeout=3, ca=ca_file, active=True))
    finally:
        stub.close()
    assert passive.ports[0].verdict == "secure", passive.ports[0].reasons
    (rep,) = result.ports
    assert rep.injection is not None and rep.injection.vulnerable
    assert rep.injection.reply == "x OK NOOP completed"
    assert rep.verdict == "insecure"
    assert any("injection" in r for r in rep.reasons)


# -- DNS discovery against a loopback DNS server ------------------------------------------
ZONE = """
example.test. 60 IN MX 10 mail.example.test.
_submissions._tcp.example.test. 60 IN SRV 0 1 465 mail.example.test.
_submission._tcp.example.test. 60 IN SRV 10 1 587 mail.example.test.
_imaps._tcp.example.test. 60 IN SRV 0 1 993 mail.example.test.
_mta-sts.example.test. 60 IN TXT "v=STSv1; id=20250101"
"""


def test_dns_discovery(server: Instance, ca_file: Path) -> None:
    from dnslib.server import DNSServer
    from dnslib.zoneresolver import ZoneResolver

    (port,) = free_ports(1)
    dns = DNSServer(ZoneResolver(ZONE), port=port, address="127.0.0.1")
    dns.start_thread()
    try:
        code, data = run_probe("--ports", f"imaps={server.ports['imaps']}", "--ca",
                               str(ca_file), "--dns", f"127.0.0.1:{port}",
                               "--domain", "example.test")
    finally:
        dns.stop()
    found = data["dns"]
    assert code == 0 and found["error"] is None
    assert found["mx"] == [{"preference": 10, "host": "mail.example.test"}]
    assert found["srv"]["_submissions._tcp"] == [
        {"priority": 0, "weight": 1, "port": 465, "target": "mail.example.test"}]
    assert found["srv"]["_pop3._tcp"] == []
    assert found["mta_sts"] == "v=STSv1; id=20250101"
    assert found["autoconfig"]["result"] == "does not resolve"


# -- agreement with openssl s_client ------------------------------------------------------
S_CLIENT_FLAG = {"TLSv1": "-tls1", "TLSv1.1": "-tls1_1", "TLSv1.2": "-tls1_2",
                 "TLSv1.3": "-tls1_3"}
S_CLIENT_STARTTLS = {"smtp": "smtp", "submission": "smtp", "imap": "imap", "pop3": "pop3"}


def s_client_accepts(port: int, service: str, version: str) -> bool:
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", S_CLIENT_FLAG[version]]
    if version != "TLSv1.3":
        cmd += ["-cipher", "DEFAULT:@SECLEVEL=0"]
    if service in S_CLIENT_STARTTLS:
        cmd += ["-starttls", S_CLIENT_STARTTLS[service]]
    proc = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and "Cipher is (NONE)" not in proc.stdout


@pytest.mark.skipif(not have("openssl"), reason="openssl is not installed")
def test_versions_agree_with_openssl_s_client(
    make_instance: Callable[..., Instance], ca_file: Path
) -> None:
    server = make_instance()
    _, data = run_probe("--ports", ports_arg(server), "--ca", str(ca_file))
    compared = 0
    for rep in data["ports"]:
        for version, outcome in rep["tls"]["versions"].items():
            if outcome == "not_testable":
                continue
            expected = s_client_accepts(rep["port"], rep["service"], version)
            assert (outcome == "accepted") == expected, (rep["service"], version, outcome)
            compared += 1
    assert compared >= 14


def test_starttls_ports_that_also_take_implicit_tls_are_reported(
    server: Instance, ca_file: Path
) -> None:
    # Default [security] tls_sniff_ms = 200: 587/143/110 answer a first-byte ClientHello.
    code, data = run_probe("--ports", ports_arg(server), "--ca", str(ca_file))
    ports = by_service(data)
    assert code == 0
    for service in ("submission", "imap", "pop3"):
        assert ports[service]["mode"] == "starttls"
        assert ports[service]["implicit_tls_also"] is True, service
        assert any("SSL/TLS or to" in n for n in ports[service]["notes"]), service
    for service in ("smtp", "submissions", "imaps", "pop3s"):
        assert ports[service]["implicit_tls_also"] is None, service
    settings = {s["service"]: s for d in data["settings"].values() for s in d}
    assert settings["imap"]["security"] == "STARTTLS" and settings["imap"]["implicit_tls_also"]
    assert settings["imaps"]["implicit_tls_also"] is False
    # Implicit-TLS ports stay the recommendation (RFC 8314 §3.3).
    assert data["settings"]["incoming"][0]["service"] == "imaps"
    table = run_postkeep("probe", "127.0.0.1", "--ports", ports_arg(server), "--ca",
                         str(ca_file)).stdout
    assert "either works there" in table


def test_starttls_ports_without_sniffing_do_not_take_implicit_tls(
    make_instance: Callable[..., Instance], ca_file: Path
) -> None:
    server = make_instance(
        services=("submission", "imap", "pop3"), extra="[security]\ntls_sniff_ms = 0\n"
    )
    _, data = run_probe("--ports", ports_arg(server), "--ca", str(ca_file))
    ports = by_service(data)
    for service in ("submission", "imap", "pop3"):
        assert ports[service]["mode"] == "starttls"
        assert ports[service]["implicit_tls_also"] is False, service
        assert ports[service]["verdict"] == "secure", ports[service]["reasons"]
    assert all(not s["implicit_tls_also"] for d in data["settings"].values() for s in d)
