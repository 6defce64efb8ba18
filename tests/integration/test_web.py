"""The ``http`` listener over real HTTP: autoconfig, autodiscover, the Apple profile,
MTA-STS, /metrics, and the /setup page in a real headless Chromium."""

from __future__ import annotations

import imaplib
import os
import plistlib
import re
import shutil
import smtplib
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ALL_SERVICES, HOSTNAME, PASSWORDS, Instance

WITH_HTTP = (*ALL_SERVICES, "http")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
AD_NS = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"
AD_OUTLOOK_NS = (
    "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
)
AD_REQUEST = (
    '<?xml version="1.0" encoding="utf-8"?>\n'
    '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/'
    'requestschema/2006"><Request><EMailAddress>{address}</EMailAddress>'
    "<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/"
    "responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>"
)


# -- helpers -----------------------------------------------------------------------------
def http_port(inst: Instance) -> int:
    assert inst.app is not None and inst.app.web is not None
    port = inst.app.web.port
    assert port is not None
    return port


def fetch(
    inst: Instance,
    path: str,
    *,
    host: str | None = None,
    data: bytes | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    url = f"http://127.0.0.1:{http_port(inst)}{path}"
    headers = {"Host": host} if host else {}
    if data is not None:
        headers["Content-Type"] = "text/xml"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


@pytest.fixture
def web(make_instance: Callable[..., Instance]) -> Instance:
    return make_instance(services=WITH_HTTP)


def mail_ports(inst: Instance) -> dict[str, int]:
    return {s: p for s, p in inst.ports.items() if s != "smtp"}


def servers(root: ET.Element) -> list[tuple[str, str, int, str]]:
    """(element, type, port, socketType) of every server in a clientConfig."""
    provider = root.find("emailProvider")
    assert provider is not None
    out = []
    for el in provider:
        if el.tag in ("incomingServer", "outgoingServer"):
            assert el.findtext("hostname") == HOSTNAME
            assert el.findtext("username") == "%EMAILADDRESS%"
            assert el.findtext("authentication") == "password-cleartext"
            out.append((el.tag, el.get("type", ""), int(el.findtext("port") or 0),
                        el.findtext("socketType") or ""))
    return out


def expected_all(p: dict[str, int]) -> list[tuple[str, str, int, str]]:
    return [
        ("incomingServer", "imap", p["imaps"], "SSL"),
        ("incomingServer", "imap", p["imap"], "STARTTLS"),
        ("incomingServer", "pop3", p["pop3s"], "SSL"),
        ("incomingServer", "pop3", p["pop3"], "STARTTLS"),
        ("outgoingServer", "smtp", p["submissions"], "SSL"),
        ("outgoingServer", "smtp", p["submission"], "STARTTLS"),
    ]


# -- Thunderbird autoconfig ------------------------------------------------------------
def test_autoconfig_lists_exactly_the_open_ports_implicit_tls_first(web: Instance) -> None:
    status, headers, body = fetch(
        web, "/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=alice%40example.test"
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/xml")
    root = ET.fromstring(body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None and provider.get("id") == "example.test"
    assert servers(root) == expected_all(web.ports)


def test_autoconfig_without_emailaddress_is_not_an_error(web: Instance) -> None:
    status, _, body = fetch(web, "/.well-known/autoconfig/mail/config-v1.1.xml")
    assert status == 200
    root = ET.fromstring(body)
    assert root.find("emailProvider").get("id") == "example.test"  # type: ignore[union-attr]
    assert servers(root) == expected_all(web.ports)


def test_autoconfig_under_autoconfig_host_name(web: Instance) -> None:
    status, _, body = fetch(
        web, "/mail/config-v1.1.xml?emailaddress=bob@example.test",
        host="autoconfig.example.test",
    )
    assert status == 200
    assert servers(ET.fromstring(body)) == expected_all(web.ports)


def test_autoconfig_for_a_foreign_address_names_our_domain(web: Instance) -> None:
    _, _, body = fetch(web, "/mail/config-v1.1.xml?emailaddress=x%40elsewhere.test")
    assert ET.fromstring(body).find("emailProvider").get("id") == "example.test"  # type: ignore[union-attr]


def test_autoconfig_leaves_out_143_and_110_without_plaintext_access(
    make_instance: Callable[..., Instance],
) -> None:
    inst = make_instance(services=WITH_HTTP, extra="[security]\nplaintext_access = false\n")
    assert "imap" not in inst.ports and "pop3" not in inst.ports
    _, _, body = fetch(inst, "/.well-known/autoconfig/mail/config-v1.1.xml")
    p = inst.ports
    assert servers(ET.fromstring(body)) == [
        ("incomingServer", "imap", p["imaps"], "SSL"),
        ("incomingServer", "pop3", p["pop3s"], "SSL"),
        ("outgoingServer", "smtp", p["submissions"], "SSL"),
        ("outgoingServer", "smtp", p["submission"], "STARTTLS"),
    ]


def test_autoconfig_lists_only_listeners_that_exist(
    make_instance: Callable[..., Instance],
) -> None:
    inst = make_instance(services=("smtp", "submission", "imaps", "http"))
    _, _, body = fetch(inst, "/.well-known/autoconfig/mail/config-v1.1.xml")
    assert servers(ET.fromstring(body)) == [
        ("incomingServer", "imap", inst.ports["imaps"], "SSL"),
        ("outgoingServer", "smtp", inst.ports["submission"], "STARTTLS"),
    ]


# -- Outlook autodiscover --------------------------------------------------------------
def protocols(body: bytes) -> dict[int, dict[str, str]]:
    root = ET.fromstring(body)
    assert root.tag == f"{AD_NS}Autodiscover"
    account = root.find(f"{AD_OUTLOOK_NS}Response/{AD_OUTLOOK_NS}Account")
    assert account is not None
    assert account.findtext(f"{AD_OUTLOOK_NS}Action") == "settings"
    out = {}
    for proto in account.findall(f"{AD_OUTLOOK_NS}Protocol"):
        fields = {child.tag.removeprefix(AD_OUTLOOK_NS): child.text or "" for child in proto}
        out[int(fields["Port"])] = fields
    return out


def check_outlook_words(found: dict[int, dict[str, str]], p: dict[str, int]) -> None:
    assert set(found) == {p[s] for s in ("imaps", "imap", "pop3s", "pop3", "submissions",
                                         "submission")}
    for service, kind in (("imaps", "IMAP"), ("pop3s", "POP3"), ("submissions", "SMTP")):
        f = found[p[service]]
        assert (f["Type"], f["SSL"], f["Encryption"]) == (kind, "on", "SSL")
    for service, kind in (("imap", "IMAP"), ("pop3", "POP3"), ("submission", "SMTP")):
        f = found[p[service]]
        assert (f["Type"], f["Encryption"]) == (kind, "TLS")
    for f in found.values():
        assert f["Server"] == HOSTNAME and f["SPA"] == "off" and f["AuthRequired"] == "on"


def test_autodiscover_post_answers_outlook_settings(web: Instance) -> None:
    status, headers, body = fetch(
        web, "/autodiscover/autodiscover.xml",
        data=AD_REQUEST.format(address="alice@example.test").encode(),
    )
    assert status == 200 and "xml" in headers["Content-Type"]
    found = protocols(body)
    check_outlook_words(found, web.ports)
    assert {f["LoginName"] for f in found.values()} == {"alice@example.test"}


def test_autodiscover_capitalised_path_under_autodiscover_host(web: Instance) -> None:
    status, _, body = fetch(
        web, "/Autodiscover/Autodiscover.xml", host="autodiscover.example.test",
        data=AD_REQUEST.format(address="bob@example.test").encode(),
    )
    assert status == 200
    check_outlook_words(protocols(body), web.ports)


def test_autodiscover_get_answers_too(web: Instance) -> None:
    status, _, body = fetch(web, "/autodiscover/autodiscover.xml?emailaddress=bob@example.test")
    assert status == 200
    found = protocols(body)
    check_outlook_words(found, web.ports)
    assert found[web.ports["submission"]]["LoginName"] == "bob@example.test"


def test_autodiscover_escapes_and_validates_the_address(web: Instance) -> None:
    status, _, body = fetch(
        web, "/autodiscover/autodiscover.xml",
        data=AD_REQUEST.format(address="&lt;x&gt;@example.test").encode(),
    )
    root = ET.fromstring(body)  # still well-formed
    assert status == 200 and b"<x>" not in body
    assert root.find(f"{AD_NS}Response/{AD_NS}Error/{AD_NS}ErrorCode") is not None


def test_autodiscover_refuses_entities(web: Instance) -> None:
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l "lol"><!ENTITY l2 "&l;&l;&l;&l;">]>'
        b"<Autodiscover><Request><EMailAddress>&l2;</EMailAddress></Request></Autodiscover>"
    )
    status, _, body = fetch(web, "/autodiscover/autodiscover.xml", data=laughs)
    assert status == 400 and b"lol" not in body
    xxe = (
        b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<Autodiscover><Request><EMailAddress>&x;</EMailAddress></Request></Autodiscover>"
    )
    status, _, body = fetch(web, "/autodiscover/autodiscover.xml", data=xxe)
    assert status == 400 and b"root:" not in body


def test_request_bodies_are_bounded(web: Instance) -> None:
    status, _, _ = fetch(web, "/autodiscover/autodiscover.xml", data=b"<a>" + b"x" * 200_000)
    assert status == 413


# -- Apple profile ---------------------------------------------------------------------
def test_mobileconfig_sets_up_imap_993_and_smtp_465_with_ssl(web: Instance) -> None:
    status, headers, body = fetch(
        web, "/apple/postkeep.mobileconfig?emailaddress=alice%40example.test"
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/x-apple-aspen-config")
    assert "attachment" in headers["Content-Disposition"]
    profile = plistlib.loads(body)
    assert profile["PayloadType"] == "Configuration"
    [mail] = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert mail["EmailAccountType"] == "EmailTypeIMAP"
    assert mail["EmailAddress"] == "alice@example.test"
    assert mail["IncomingMailServerHostName"] == mail["OutgoingMailServerHostName"] == HOSTNAME
    assert mail["IncomingMailServerPortNumber"] == web.ports["imaps"]
    assert mail["OutgoingMailServerPortNumber"] == web.ports["submissions"]
    assert mail["IncomingMailServerUseSSL"] is True and mail["OutgoingMailServerUseSSL"] is True
    assert mail["IncomingMailServerAuthentication"] == "EmailAuthPassword"
    assert mail["OutgoingMailServerAuthentication"] == "EmailAuthPassword"
    assert not [k for k in mail if "Password" in k and k.endswith("Password")
                and k != "OutgoingPasswordSameAsIncomingPassword"]
    assert PASSWORDS["alice@example.test"].encode() not in body


def test_mobileconfig_uses_587_when_465_is_closed(make_instance: Callable[..., Instance]) -> None:
    inst = make_instance(services=("smtp", "submission", "imaps", "http"))
    _, _, body = fetch(inst, "/apple/postkeep.mobileconfig?emailaddress=bob@example.test")
    [mail] = plistlib.loads(body)["PayloadContent"]
    assert mail["OutgoingMailServerPortNumber"] == inst.ports["submission"]
    assert mail["OutgoingMailServerUseSSL"] is True  # Apple: STARTTLS on 587


# -- MTA-STS ---------------------------------------------------------------------------
def parse_sts_policy(text: str) -> dict[str, list[str]]:
    """RFC 8461 §3.2: ``key: value`` lines, CRLF or LF; "version" first."""
    fields: dict[str, list[str]] = {}
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    for line in lines:
        key, sep, value = line.partition(":")
        assert sep and key and key == key.strip(), line
        fields.setdefault(key, []).append(value.strip())
    assert lines[0] == "version: STSv1"
    return fields


def test_mta_sts_policy_follows_rfc_8461(web: Instance) -> None:
    for host in (None, "mta-sts.example.test"):
        status, headers, body = fetch(web, "/.well-known/mta-sts.txt", host=host)
        assert status == 200
        assert headers["Content-Type"].split(";")[0] == "text/plain"
        policy = parse_sts_policy(body.decode("ascii"))
        assert policy["version"] == ["STSv1"]
        # trustme's certificate is CA-issued and names the host: enforce.
        assert policy["mode"] == ["enforce"]
        assert policy["mx"] == [HOSTNAME]
        assert 0 < int(policy["max_age"][0]) <= 31_557_600
        assert int(policy["max_age"][0]) == 604_800


def test_mta_sts_unknown_domain_has_no_policy(web: Instance) -> None:
    status, _, _ = fetch(web, "/.well-known/mta-sts.txt", host="mta-sts.elsewhere.test")
    assert status == 404


# -- metrics ---------------------------------------------------------------------------
def scrape(inst: Instance) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], str]:
    status, headers, body = fetch(inst, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values, text


def test_metrics_count_connections_and_logins_over_465(
    web: Instance, tls_ctx: ssl.SSLContext
) -> None:
    conn_key = ("postkeep_connections_total",
                (("service", "submissions"), ("tls_version", "TLSv1.3")))
    ok_key = ("postkeep_logins_total", (("result", "ok"), ("service", "submissions")))
    bad_key = ("postkeep_logins_total", (("result", "failed"), ("service", "submissions")))
    before, _ = scrape(web)
    assert before[ok_key] == 0 and before[bad_key] == 0
    with smtplib.SMTP_SSL("127.0.0.1", web.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.login("alice@example.test", PASSWORDS["alice@example.test"])
    with smtplib.SMTP_SSL("127.0.0.1", web.ports["submissions"], context=tls_ctx,
                          timeout=10) as s, pytest.raises(smtplib.SMTPAuthenticationError):
        s.login("alice@example.test", "wrong password")
    after, text = scrape(web)
    assert after[conn_key] - before.get(conn_key, 0) == 2
    assert after[ok_key] == 1
    assert after[bad_key] >= 1  # smtplib tries each mechanism it knows in turn
    assert after[("postkeep_store_commits_total", ())] >= 1
    assert ("postkeep_outbound_queue_messages", ()) in after
    assert after[("postkeep_tls_certificate_self_signed", ())] == 0
    assert "alice" not in text and "example.test" not in text and "127.0.0.1" not in text


def test_metrics_count_starttls_upgrades(web: Instance, tls_ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", web.ports["submission"], timeout=10) as s:
        s.starttls(context=tls_ctx)
        s.login("bob@example.test", PASSWORDS["bob@example.test"])
    key = ("postkeep_starttls_upgrades_total",
           (("service", "submission"), ("tls_version", "TLSv1.3")))
    ok_key = ("postkeep_logins_total", (("result", "ok"), ("service", "submission")))
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for _ in range(50):  # the upgrade is counted when the server closes the connection
        values, _ = scrape(web)
        if values.get(key):
            break
    assert values.get(key) == 1
    assert values[ok_key] == 1


# -- the setup page, in a real browser --------------------------------------------------
def find_chromium() -> str:
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=600,
                           capture_output=True, check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env,
                           timeout=900, capture_output=True, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed and could not be installed "
                    "(needs root and apt-get); the /setup browser test needs it")
    return path


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "HOME": str(profile)},
    )


def test_setup_page_in_headless_chromium(web: Instance, tmp_path: Path) -> None:
    binary = find_chromium()
    url = f"http://127.0.0.1:{http_port(web)}/setup?domain=example.test"
    dom = chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert "<script" not in text.lower()
    assert 'name="viewport"' in text
    assert HOSTNAME in text and "example.test" in text
    assert "SSL/TLS" in text and "STARTTLS" in text and "Use TLS/SSL" in text
    for service in ("imaps", "imap", "pop3s", "pop3", "submissions", "submission"):
        assert f">{web.ports[service]}<" in text, service
    assert f">{web.ports['smtp']}<" not in text  # port 25 is for servers, not programs

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "setup-page-phone.png"
    shot.unlink(missing_ok=True)
    result = chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}",
                      "--window-size=412,915", "--hide-scrollbars", url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_setup_page_without_plaintext_access_shows_no_143_or_110(
    make_instance: Callable[..., Instance],
) -> None:
    inst = make_instance(services=WITH_HTTP, extra="[security]\nplaintext_access = false\n")
    status, headers, body = fetch(inst, "/setup", host="example.test")
    assert status == 200 and "script-src" not in headers["Content-Security-Policy"]
    page = body.decode()
    assert f">{inst.ports['imaps']}<" in page and f">{inst.ports['submission']}<" in page
    assert "STARTTLS" in page  # 587 stays


def test_setup_page_for_unknown_domain_is_404(web: Instance) -> None:
    assert fetch(web, "/setup?domain=elsewhere.test")[0] == 404
    assert fetch(web, "/")[0] == 200  # redirected to /setup


def test_setup_page_says_ssl_tls_also_works_on_starttls_ports_with_sniffing(
    web: Instance, make_instance: Callable[..., Instance],
) -> None:
    page = fetch(web, "/setup", host="example.test")[2].decode()
    rows = dict(re.findall(r'<td class="port">(\d+)</td><td>(.*?)</td>', page))
    for service in ("submission", "imap", "pop3"):  # default tls_sniff_ms = 200
        assert "SSL/TLS also works on this port" in rows[str(web.ports[service])], service
    for service in ("submissions", "imaps", "pop3s"):
        assert "also works" not in rows[str(web.ports[service])], service
    assert "recommended" in rows[str(web.ports["imaps"])]
    off = make_instance(services=WITH_HTTP, extra="[security]\ntls_sniff_ms = 0\n")
    assert "also works" not in fetch(off, "/setup", host="example.test")[2].decode()


def test_metrics_count_accepted_messages_and_outbound_results(
    web: Instance, tls_ctx: ssl.SSLContext
) -> None:
    accepted = ("postkeep_messages_accepted_total", (("service", "submissions"),))
    appended = ("postkeep_messages_accepted_total", (("service", "imaps"),))
    deferred = ("postkeep_outbound_recipients_total", (("result", "deferred"),))
    before, _ = scrape(web)
    with smtplib.SMTP_SSL("127.0.0.1", web.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.login("alice@example.test", PASSWORDS["alice@example.test"])
        s.sendmail("alice@example.test", ["bob@example.test"], b"Subject: a\r\n\r\nx\r\n")
        # The harness's nameserver never answers: the remote recipient is deferred.
        s.sendmail("alice@example.test", ["friend@remote.test"], b"Subject: b\r\n\r\ny\r\n")
    with imaplib.IMAP4_SSL("127.0.0.1", web.ports["imaps"], ssl_context=tls_ctx) as c:
        c.login("bob@example.test", PASSWORDS["bob@example.test"])
        c.append("INBOX", None, None, b"Subject: c\r\n\r\nz\r\n")
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for _ in range(100):  # the delivery attempt ends after the DNS timeout (1 s)
        after, _ = scrape(web)
        if after[deferred] > before[deferred]:
            break
        time.sleep(0.1)
    assert after[accepted] - before[accepted] == 2
    assert after[appended] - before[appended] == 1
    assert after[deferred] - before[deferred] == 1
    commit_key = ("postkeep_store_commits_total", ())
    spent_key = ("postkeep_store_commit_seconds_total", ())
    commits = after[commit_key] - before[commit_key]
    spent = after[spent_key] - before[spent_key]
    assert commits >= 2 and 0 < spent < 10 * commits  # a latency was measured per commit
