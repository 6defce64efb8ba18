"""Verdict rules, mail-program settings and the JSON schema, from findings (no sockets)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from postkeep.config.schema import Service
from postkeep.probe.checks import (
    CertFacts,
    Injection,
    PortReport,
    ProbeResult,
    TlsFacts,
    exit_code,
    judge,
)
from postkeep.probe.dialogue import LoginAttempt, Offer
from postkeep.probe.report import to_dict
from postkeep.probe.settings import autoconfig_xml, recommend

MODERN = {"TLSv1": "refused", "TLSv1.1": "refused", "TLSv1.2": "accepted", "TLSv1.3": "accepted"}
ALL = dict.fromkeys(MODERN, "accepted")


def cert(**kw: object) -> CertFacts:
    base: dict[str, object] = dict(
        subject="CN=mail", issuer="CN=ca", names=("mail.example.test",), not_before="",
        not_after="", days_left=90, expired=False, key_type="EC", key_bits=256,
        key="EC secp256r1", fingerprint="AA", self_signed=False, name_matches=True,
        trusted=True,
    )
    base.update(kw)
    return CertFacts(**base)  # type: ignore[arg-type]


def port(service: Service, mode: str, *, versions: dict[str, str] = MODERN,
         before: Offer | None = None, **kw: object) -> PortReport:
    expected = "implicit_tls" if service.value.endswith("s") else "starttls"
    rep = PortReport(service, 1000, expected, reachable=True, mode=mode)
    if mode != "plaintext":
        rep.tls = TlsFacts(versions=dict(versions), version="TLSv1.3",
                           cipher="TLS_AES_128_GCM_SHA256", bits=128,
                           certificate=kw.pop("certificate", cert()))  # type: ignore[arg-type]
    rep.before_tls = before
    for k, v in kw.items():
        setattr(rep, k, v)
    return judge(rep)


SAFE_SMTP = Offer(starttls=True, auth=())


def test_modern_ports_are_secure() -> None:
    assert port(Service.IMAPS, "implicit_tls").verdict == "secure"
    imap = port(Service.IMAP, "starttls",
                before=Offer(starttls=True, auth=(), login_disabled=True))
    assert imap.verdict == "secure", imap.reasons


def test_old_tls_is_weak_on_access_ports_but_not_on_port_25() -> None:
    sub = port(Service.SUBMISSIONS, "implicit_tls", versions=ALL)
    assert sub.verdict == "weak" and "TLS 1.0 and TLS 1.1 accepted" in sub.reasons[0]
    assert port(Service.SMTP, "starttls", versions=ALL, before=SAFE_SMTP).verdict == "secure"


def test_port_25_without_starttls_is_weak_submission_without_tls_insecure() -> None:
    mx = port(Service.SMTP, "plaintext", before=Offer(starttls=False, auth=()))
    assert mx.verdict == "weak"
    sub = port(Service.SUBMISSION, "plaintext", before=Offer(starttls=False, auth=()))
    assert sub.verdict == "insecure"


def test_credentials_before_tls_are_insecure() -> None:
    smtp = port(Service.SUBMISSION, "starttls", before=Offer(starttls=True, auth=("PLAIN",)))
    assert smtp.verdict == "insecure"
    assert "AUTH PLAIN offered before STARTTLS" in smtp.reasons[0]
    imap = port(Service.IMAP, "starttls",
                before=Offer(starttls=True, auth=(), login_disabled=False))
    assert imap.verdict == "insecure" and "LOGINDISABLED missing" in imap.reasons[0]
    pop = port(Service.POP3, "starttls", before=Offer(starttls=True, auth=(), user=True))
    assert pop.verdict == "insecure" and "USER offered before STLS" in pop.reasons[0]
    mx = port(Service.SMTP, "starttls", before=Offer(starttls=True, auth=("LOGIN",)))
    assert mx.verdict == "insecure"


def test_auth_on_port_25_after_tls_is_weak() -> None:
    mx = port(Service.SMTP, "starttls", before=SAFE_SMTP, after_tls=Offer(True, ("PLAIN",)))
    assert mx.verdict == "weak" and "AUTH on port 25" in mx.reasons[0]


def test_active_findings() -> None:
    checked = port(Service.SUBMISSION, "starttls", before=SAFE_SMTP,
                   login_attempt=LoginAttempt("rejected", "535 5.7.8 no"))
    assert checked.verdict == "insecure"
    refused = port(Service.SUBMISSION, "starttls", before=SAFE_SMTP,
                   login_attempt=LoginAttempt("refused", "530 5.7.0 STARTTLS first"))
    assert refused.verdict == "secure"
    injected = port(Service.IMAP, "starttls",
                    before=Offer(starttls=True, auth=(), login_disabled=True),
                    injection=Injection(True, "x OK NOOP completed", 0))
    assert injected.verdict == "insecure" and "injection" in injected.reasons[0]


def test_certificate_problems_are_weak() -> None:
    for problem in (dict(name_matches=False), dict(expired=True, days_left=-3),
                    dict(trusted=False, verify_error="self-signed certificate"),
                    dict(key_type="RSA", key_bits=1024)):
        rep = port(Service.IMAPS, "implicit_tls", certificate=cert(**problem))
        assert rep.verdict == "weak", problem


def test_closed_port() -> None:
    rep = judge(PortReport(Service.POP3, 110, "starttls"))
    assert rep.verdict == "closed"


def result_of(*reports: PortReport) -> ProbeResult:
    return ProbeResult(host="mail.example.test", started="", active=False, ports=list(reports))


def test_settings_prefer_implicit_tls_and_only_secure_ports() -> None:
    res = result_of(
        port(Service.SUBMISSIONS, "implicit_tls", versions=ALL),  # weak: not recommended
        port(Service.SUBMISSION, "starttls", before=SAFE_SMTP),
        port(Service.IMAP, "starttls", before=Offer(True, (), login_disabled=True)),
        port(Service.IMAPS, "implicit_tls"),
        port(Service.POP3S, "implicit_tls"),
    )
    choices = recommend(res)
    best = choices["incoming"][0]
    assert (best.port, best.protocol, best.security) == (1000, "IMAP", "SSL/TLS")
    assert [s.service for s in choices["incoming"]] == [Service.IMAPS, Service.POP3S,
                                                        Service.IMAP]
    assert [s.service for s in choices["outgoing"]] == [Service.SUBMISSION]
    assert choices["outgoing"][0].word("Thunderbird") == "STARTTLS"
    assert choices["incoming"][0].word("Outlook") == "SSL/TLS"
    assert exit_code(res) == 1

    xml = ET.fromstring(autoconfig_xml(res, "example.test"))
    incoming = xml.findall("./emailProvider/incomingServer")
    assert [(s.findtext("port"), s.findtext("socketType")) for s in incoming] == [
        ("1000", "SSL"), ("1000", "SSL"), ("1000", "STARTTLS")]
    (outgoing,) = xml.findall("./emailProvider/outgoingServer")
    assert outgoing.findtext("socketType") == "STARTTLS"


def test_json_has_every_documented_key() -> None:
    res = result_of(port(Service.IMAPS, "implicit_tls"), judge(PortReport(Service.POP3, 1, "s")))
    data = json.loads(json.dumps(to_dict(res)))
    assert data["schema"] == "postkeep-probe/1" and data["exit_code"] == 0
    assert set(data) == {"schema", "host", "started", "active", "verdict", "exit_code",
                         "ports", "settings", "dns"}
    imaps = data["ports"][0]
    assert set(imaps) == {"service", "port", "expected_mode", "reachable", "mode", "greeting",
                          "error", "tls", "credentials", "starttls", "implicit_tls_also",
                          "verdict", "reasons", "notes"}
    assert imaps["implicit_tls_also"] is None
    assert imaps["tls"]["versions"] == MODERN
    assert set(imaps["tls"]["certificate"]) >= {"names", "days_left", "key_type", "key_bits",
                                                "name_matches", "trusted", "verify_error"}
    assert set(imaps["credentials"]) == {"before_tls", "after_tls", "exposed", "login_attempt"}
    assert set(imaps["starttls"]) == {"offered", "plaintext_after_go_ahead", "injection"}
    assert data["settings"]["incoming"][0]["words"]["Apple Mail"] == "on"
    assert data["ports"][1]["verdict"] == "closed"
