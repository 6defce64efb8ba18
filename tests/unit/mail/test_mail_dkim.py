"""DKIM keys, signatures and the DNS records of ``postkeep domain dns``, without sockets."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postkeep.cli.accounts import (
    Record,
    dns_hints,
    dns_records,
    mta_sts_id,
    render_zone,
    txt_data,
)
from postkeep.config.schema import (
    Address,
    Config,
    OutboundConfig,
    SecurityConfig,
    Service,
    TlsConfig,
)
from postkeep.mail import dkim
from postkeep.web import mta_sts

DOMAIN = "example.test"
MESSAGE = (
    b"Received: from x by y; Sun, 29 Nov 2026 15:00:00 +0000\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: hello\r\n"
    b"Date: Sun, 29 Nov 2026 15:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"List-Id: <team.example.test>\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello Bob,  \r\n"
    b"\r\n"
    b"see you.\r\n"
)


@pytest.fixture(scope="module")
def keys() -> tuple[dkim.NewKey, dkim.NewKey]:
    return dkim.generate_pair(datetime(2026, 11, 29, tzinfo=UTC))


def dns_for(*ks: dkim.SigningKey, domain: str = DOMAIN) -> object:
    published = {f"{dkim.record_name(k.selector, domain)}.": dkim.dns_txt(k).encode()
                 for k in ks}

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        return published.get(text.rstrip(".") + ".")

    return dnsfunc


def tags(field: bytes) -> dict[str, str]:
    value = field.split(b":", 1)[1].decode()
    value = re.sub(r"\s+", "", value)
    return dict(t.split("=", 1) for t in value.split(";") if t)


def signature_fields(signed: bytes) -> list[bytes]:
    out = []
    for m in re.finditer(rb"^DKIM-Signature:.*?\r\n(?![ \t])", signed, re.M | re.S):
        out.append(m.group(0))
    return out


def verify_each(signed: bytes, dnsfunc: object) -> list[bool]:
    results = []
    for i in range(len(signature_fields(signed))):
        try:
            results.append(bool(dkimpy.DKIM(signed).verify(idx=i, dnsfunc=dnsfunc)))
        except dkimpy.DKIMException:
            results.append(False)
    return results


# -- keys ------------------------------------------------------------------------------
def test_selectors_name_the_algorithm_and_the_month(keys: tuple[dkim.NewKey, dkim.NewKey]) -> None:
    ed, rsa_key = keys
    assert (ed.selector, ed.algorithm) == ("pk-ed-202611", "ed25519")
    assert (rsa_key.selector, rsa_key.algorithm) == ("pk-rsa-202611", "rsa")
    assert dkim.record_name(ed.selector, "Example.TEST.") == "pk-ed-202611._domainkey.example.test"


def test_ed25519_public_key_is_the_raw_32_bytes(keys: tuple[dkim.NewKey, dkim.NewKey]) -> None:
    ed, _ = keys
    assert ed.private_pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert ed.public_txt == dkim.dns_txt(ed)
    assert ed.public_txt.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(ed.public_txt.split("p=")[1])) == 32  # RFC 8463 §4.2


def test_rsa_key_is_2048_bits_published_as_spki(keys: tuple[dkim.NewKey, dkim.NewKey]) -> None:
    _, rsa_key = keys
    assert rsa_key.private_pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert rsa_key.public_txt.startswith("v=DKIM1; k=rsa; p=")
    der = base64.b64decode(rsa_key.public_txt.split("p=")[1])
    public = serialization.load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048


def test_unknown_algorithm_and_unreadable_key_are_refused() -> None:
    with pytest.raises(dkim.DkimError):
        dkim.generate("dsa")
    pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    broken = dkim.NewKey("s", "rsa", pem, "")
    with pytest.raises(dkim.DkimError):
        dkim.dns_txt(broken)


def test_a_key_of_the_other_algorithm_is_refused(keys: tuple[dkim.NewKey, dkim.NewKey]) -> None:
    ed, _ = keys
    wrong = dkim.NewKey(ed.selector, "rsa", ed.private_pem, "")
    with pytest.raises(dkim.DkimError):
        dkim.dns_txt(wrong)


def test_the_newest_key_of_each_algorithm_signs(keys: tuple[dkim.NewKey, dkim.NewKey]) -> None:
    ed, rsa_key = keys
    newer = dkim.NewKey("pk-ed-202701", "ed25519", ed.private_pem, "")
    chosen = dkim.signing_keys([rsa_key, ed, newer])
    assert [k.selector for k in chosen] == ["pk-ed-202701", "pk-rsa-202611"]


# -- signatures ------------------------------------------------------------------------
def test_both_signatures_verify_against_the_published_keys(
    keys: tuple[dkim.NewKey, dkim.NewKey],
) -> None:
    header = dkim.sign(MESSAGE, DOMAIN, list(keys))
    signed = header + MESSAGE
    fields = signature_fields(signed)
    assert len(fields) == 2 and header == b"".join(fields)
    assert [tags(f)["a"] for f in fields] == ["ed25519-sha256", "rsa-sha256"]  # RFC 8463 §1
    assert [tags(f)["s"] for f in fields] == ["pk-ed-202611", "pk-rsa-202611"]
    assert verify_each(signed, dns_for(*keys)) == [True, True]
    assert dkimpy.verify(signed, dnsfunc=dns_for(*keys))


def test_signature_tags_relaxed_no_length_sensible_headers(
    keys: tuple[dkim.NewKey, dkim.NewKey],
) -> None:
    ed, _ = keys
    t = tags(dkim.sign(MESSAGE, DOMAIN, [ed]))
    assert t["c"] == "relaxed/relaxed" and t["d"] == DOMAIN
    assert "l" not in t  # RFC 6376 §8.2: the whole body is signed
    signed = t["h"].split(":")
    assert signed.count("from") == 2  # oversigned: a second From cannot be added
    assert signed.count("subject") == 2 and signed.count("to") == 2
    assert "list-id" in signed and signed.count("list-id") == 1
    assert "received" not in signed and "x-mailer" not in signed


def test_relaxed_canonicalization_survives_refolding(
    keys: tuple[dkim.NewKey, dkim.NewKey],
) -> None:
    signed = dkim.sign(MESSAGE, DOMAIN, list(keys)) + MESSAGE
    refolded = signed.replace(b"Subject: hello\r\n", b"Subject:   hello \r\n").replace(
        b"Hello Bob,  \r\n", b"Hello   Bob,\r\n")
    assert verify_each(refolded, dns_for(*keys)) == [True, True]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: m.replace(b"see you.", b"see you!"),
        lambda m: m.replace(b"Subject: hello", b"Subject: HELLO"),
        lambda m: m + b"appended\r\n",
        lambda m: m.replace(b"From: Alice", b"From: Mallory <m@evil.test>\r\nFrom: Alice"),
        lambda m: m.replace(b"X-Mailer", b"Subject: pay now\r\nX-Mailer"),
    ],
    ids=["body", "subject", "appended-body", "second-from", "second-subject"],
)
def test_a_tampered_message_fails(keys: tuple[dkim.NewKey, dkim.NewKey], tamper: object) -> None:
    signed = dkim.sign(MESSAGE, DOMAIN, list(keys)) + MESSAGE
    assert callable(tamper)
    assert verify_each(tamper(signed), dns_for(*keys)) == [False, False]


def test_unsigned_fields_may_change(keys: tuple[dkim.NewKey, dkim.NewKey]) -> None:
    signed = dkim.sign(MESSAGE, DOMAIN, list(keys)) + MESSAGE
    relayed = b"Received: from relay by mx; Sun, 29 Nov 2026 15:01:00 +0000\r\n" + signed
    assert verify_each(relayed.replace(b"X-Mailer: test", b"X-Mailer: other"),
                       dns_for(*keys)) == [True, True]


def test_no_keys_no_signature_and_no_from_is_refused(
    keys: tuple[dkim.NewKey, dkim.NewKey],
) -> None:
    assert dkim.sign(MESSAGE, DOMAIN, []) == b""
    with pytest.raises(dkim.DkimError):
        dkim.sign(b"To: bob@remote.test\r\n\r\nbody\r\n", DOMAIN, list(keys))


def test_from_domain_is_the_single_from_address() -> None:
    assert dkim.from_domain(MESSAGE) == "example.test"
    assert dkim.from_domain(b'From: "Doe, J" <J@Sub.Example.TEST>\r\n\r\n') == "sub.example.test"
    assert dkim.from_domain(b"From:\r\n a@b.test\r\n\r\n") == "b.test"  # folded
    assert dkim.from_domain(b"To: a@b.test\r\n\r\nFrom: x@y.test\r\n") is None
    assert dkim.from_domain(b"From: a@b.test\r\nFrom: c@d.test\r\n\r\n") is None
    assert dkim.from_domain(b"From: a@b.test, c@d.test\r\n\r\n") is None


def test_fields_to_sign_counts_occurrences_and_oversigns_singletons() -> None:
    names = ["received", "from", "to", "references", "list-unsubscribe", "list-post",
             "content-type", "x-spam"]
    assert dkim.fields_to_sign(names) == [
        "from", "to", "references", "list-unsubscribe", "list-post", "content-type",
        "from", "to", "references", "content-type",
    ]


# -- postkeep domain dns: the records ---------------------------------------------------
def config(*services: Service, plaintext_access: bool = True, relay: str = "") -> Config:
    port = {s: 10000 + p for s, p in
            {Service.SMTP: 25, Service.SUBMISSION: 587, Service.SUBMISSIONS: 465,
             Service.IMAP: 143, Service.IMAPS: 993, Service.POP3: 110, Service.POP3S: 995,
             Service.HTTP: 80}.items()}
    return Config(
        path=Path("/etc/postkeep/postkeep.toml"), hostname="mail.example.test",
        data_dir=Path("/var/lib/postkeep"),
        tls=TlsConfig(cert=Path("/nonexistent/cert.pem"), key=Path("/nonexistent/key.pem")),
        listeners={s: (Address("0.0.0.0", port[s]),) for s in services},
        security=SecurityConfig(plaintext_access=plaintext_access),
        outbound=OutboundConfig(relay=relay),
    )


def by_name(records: list[Record]) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for r in records:
        out.setdefault((r.name, r.rtype), []).append(r.data)
    return out


def unquote(data: str) -> str:
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', data))


def test_records_for_a_full_configuration(keys: tuple[dkim.NewKey, dkim.NewKey]) -> None:
    cfg = config(*Service)
    policy = mta_sts.policy_text(mode="enforce", mx=cfg.hostname)
    got = by_name(dns_records(cfg, DOMAIN, list(keys), mta_sts_policy=policy))
    assert got[("example.test.", "MX")] == ["10 mail.example.test."]
    assert [unquote(v) for v in got[("example.test.", "TXT")]] == ["v=spf1 mx -all"]
    assert unquote(got[("_dmarc.example.test.", "TXT")][0]) == (
        "v=DMARC1; p=quarantine; rua=mailto:dmarc-reports@example.test")
    assert unquote(got[("_smtp._tls.example.test.", "TXT")][0]) == (
        "v=TLSRPTv1; rua=mailto:tls-reports@example.test")
    assert unquote(got[("_mta-sts.example.test.", "TXT")][0]) == (
        f"v=STSv1; id={mta_sts_id(policy)}")
    ed, rsa_key = keys
    assert unquote(got[("pk-ed-202611._domainkey.example.test.", "TXT")][0]) == ed.public_txt
    rsa_data = got[("pk-rsa-202611._domainkey.example.test.", "TXT")][0]
    assert rsa_data.count('"') == 4  # RFC 1035: two character-strings of at most 255
    assert unquote(rsa_data) == rsa_key.public_txt
    assert got[("_submissions._tcp.example.test.", "SRV")] == ["0 0 10465 mail.example.test."]
    assert got[("_submission._tcp.example.test.", "SRV")] == ["10 0 10587 mail.example.test."]
    assert got[("_imaps._tcp.example.test.", "SRV")] == ["0 0 10993 mail.example.test."]
    assert got[("_imap._tcp.example.test.", "SRV")] == ["10 0 10143 mail.example.test."]
    assert got[("_pop3s._tcp.example.test.", "SRV")] == ["20 0 10995 mail.example.test."]
    assert got[("_pop3._tcp.example.test.", "SRV")] == ["30 0 10110 mail.example.test."]


def test_switched_off_services_are_published_as_dot() -> None:
    cfg = config(Service.SMTP, Service.SUBMISSIONS, Service.IMAP, Service.IMAPS, Service.POP3,
                 plaintext_access=False)
    got = by_name(dns_records(cfg, DOMAIN, [], mta_sts_policy=None))
    assert got[("_submissions._tcp.example.test.", "SRV")] == ["0 0 10465 mail.example.test."]
    assert got[("_imaps._tcp.example.test.", "SRV")] == ["0 0 10993 mail.example.test."]
    for label in ("_submission", "_imap", "_pop3", "_pop3s"):  # imap/pop3: plaintext_access
        assert got[(f"{label}._tcp.example.test.", "SRV")] == ["0 0 0 ."], label
    assert ("_mta-sts.example.test.", "TXT") not in got  # nothing serves a policy
    assert not any("_domainkey" in name for name, _ in got)


def test_mta_sts_id_is_stable_and_changes_with_the_policy() -> None:
    testing = mta_sts.policy_text(mode="testing", mx="mail.example.test")
    enforce = mta_sts.policy_text(mode="enforce", mx="mail.example.test")
    assert mta_sts_id(testing) == mta_sts_id(testing)
    assert mta_sts_id(testing) != mta_sts_id(enforce)
    assert re.fullmatch(r"[a-zA-Z0-9]{1,32}", mta_sts_id(testing))  # RFC 8461 §3.1


def test_txt_data_splits_and_quotes() -> None:
    assert txt_data("v=spf1 mx -all") == '"v=spf1 mx -all"'
    assert txt_data('a"b\\c') == '"a\\"b\\\\c"'
    long = "x" * 600
    assert txt_data(long) == " ".join(['"' + "x" * 255 + '"'] * 2 + ['"' + "x" * 90 + '"'])


def test_zone_text_has_one_parsable_line_per_record_and_hints_as_comments(
    keys: tuple[dkim.NewKey, dkim.NewKey],
) -> None:
    cfg = config(*Service, relay="smtp.relay.test:465")
    records = dns_records(cfg, DOMAIN, list(keys), mta_sts_policy="x")
    hints = dns_hints(cfg, DOMAIN, missing_reports=["dmarc-reports@example.test"])
    text = render_zone(DOMAIN, records, hints)
    lines = [line for line in text.splitlines() if line and not line.startswith(";")]
    assert len(lines) == len(records)
    for line, record in zip(lines, records, strict=True):
        name, ttl, cls, rtype, data = line.split(None, 4)
        assert (name, cls, rtype, data) == (record.name, "IN", record.rtype, record.data)
        assert int(ttl) > 0
    assert "; autoconfig.example.test., autodiscover.example.test." in text
    assert "smtp.relay.test:465" in text
    assert "postkeep alias add dmarc-reports@example.test" in text
