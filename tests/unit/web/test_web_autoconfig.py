"""The autoconfig, autodiscover and Apple profile builders, without sockets."""

from __future__ import annotations

import plistlib
import xml.etree.ElementTree as ET

import pytest

from postkeep.config.schema import Service
from postkeep.hints import Ports
from postkeep.web import autoconfig
from postkeep.web.autoconfig import Endpoint, Protocol, Security

HOST = "mail.example.test"
NS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"


def eps(*services: Service) -> list[Endpoint]:
    std = Ports.standard()
    return autoconfig.endpoints(Ports({s: std.ports[s] for s in services}))


ALL = eps(*Service)


def test_endpoints_are_implicit_tls_first_and_never_port_25_or_http() -> None:
    assert [(e.protocol, e.port, e.security) for e in ALL] == [
        (Protocol.IMAP, 993, Security.SSL),
        (Protocol.IMAP, 143, Security.STARTTLS),
        (Protocol.POP3, 995, Security.SSL),
        (Protocol.POP3, 110, Security.STARTTLS),
        (Protocol.SMTP, 465, Security.SSL),
        (Protocol.SMTP, 587, Security.STARTTLS),
    ]


def test_endpoints_use_the_bound_ports_not_the_standard_ones() -> None:
    got = autoconfig.endpoints(Ports({Service.IMAPS: 10993, Service.SUBMISSION: 10587}))
    assert [(e.port, e.thunderbird) for e in got] == [(10993, "SSL"), (10587, "STARTTLS")]


def test_thunderbird_config_is_clientconfig_1_1() -> None:
    body = autoconfig.thunderbird_config(
        hostname=HOST, domain="example.test", domains=["a.test", "example.test"], eps=ALL
    )
    root = ET.fromstring(body)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None and provider.get("id") == "example.test"
    assert [d.text for d in provider.findall("domain")] == ["example.test", "a.test"]
    got = [(s.tag, s.get("type"), s.findtext("port"), s.findtext("socketType"))
           for s in provider if s.tag.endswith("Server")]
    assert got == [
        ("incomingServer", "imap", "993", "SSL"),
        ("incomingServer", "imap", "143", "STARTTLS"),
        ("incomingServer", "pop3", "995", "SSL"),
        ("incomingServer", "pop3", "110", "STARTTLS"),
        ("outgoingServer", "smtp", "465", "SSL"),
        ("outgoingServer", "smtp", "587", "STARTTLS"),
    ]
    for server in provider.findall("incomingServer") + provider.findall("outgoingServer"):
        assert server.findtext("hostname") == HOST
        assert server.findtext("username") == "%EMAILADDRESS%"
        assert server.findtext("authentication") == "password-cleartext"


def test_thunderbird_config_escapes_what_it_is_given() -> None:
    body = autoconfig.thunderbird_config(
        hostname="a<b>&c", domain='d"&<x>', domains=[], eps=ALL[:1]
    )
    root = ET.fromstring(body)
    assert root.find("emailProvider").get("id") == 'd"&<x>'  # type: ignore[union-attr]
    assert root.findtext("emailProvider/incomingServer/hostname") == "a<b>&c"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Alice@Example.TEST", "alice@example.test"),
        (" bob@example.test ", "bob@example.test"),
        ("", None),
        (None, None),
        ("no-at-sign", None),
        ("<x>@example.test", None),
        ("a@b@c", None),
        ("a" * 250 + "@example.test", None),
        ('"quoted local"@example.test', None),
    ],
)
def test_valid_address(text: str | None, expected: str | None) -> None:
    assert autoconfig.valid_address(text) == expected


def request(body: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft'
        '.com/exchange/autodiscover/outlook/requestschema/2006"><Request>'
        f"{body}</Request></Autodiscover>"
    ).encode()


def test_parse_autodiscover_request() -> None:
    body = request("<EMailAddress> alice@example.test </EMailAddress>"
                   "<AcceptableResponseSchema>x</AcceptableResponseSchema>")
    assert autoconfig.parse_autodiscover_request(body) == "alice@example.test"
    assert autoconfig.parse_autodiscover_request(request("")) is None


@pytest.mark.parametrize(
    "body",
    [
        b'<!DOCTYPE a [<!ENTITY l "lol">]><a><EMailAddress>&l;</EMailAddress></a>',
        b'<!DOCTYPE a SYSTEM "http://example.invalid/x.dtd"><a/>',
        b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>',
        b'<!DOCTYPE a [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><a/>',
        b"<a><b></a>",
        b"not xml",
        b"<a>" * 40 + b"</a>" * 40,
        b"<a>" + b" " * 20_000 + b"</a>",
        b"<a><EMailAddress>" + b"x" * 5000 + b"</EMailAddress></a>",
        "<a>\ufeff".encode("utf-16"),
    ],
)
def test_parse_autodiscover_request_refuses(body: bytes) -> None:
    with pytest.raises(autoconfig.AutodiscoverRequestError):
        autoconfig.parse_autodiscover_request(body)


def test_parse_autodiscover_request_refuses_a_doctype_hidden_in_utf16() -> None:
    body = '<?xml version="1.0" encoding="utf-16"?><!DOCTYPE a [<!ENTITY l "x">]><a/>'
    with pytest.raises(autoconfig.AutodiscoverRequestError):
        autoconfig.parse_autodiscover_request(body.encode("utf-16"))


def test_autodiscover_response_in_outlook_words() -> None:
    body = autoconfig.autodiscover_response(
        hostname=HOST, address="alice@example.test", eps=ALL, display_name="alice"
    )
    root = ET.fromstring(body)
    assert root.tag.endswith("}Autodiscover")
    protos = root.findall(f"{NS}Response/{NS}Account/{NS}Protocol")
    got = [(p.findtext(f"{NS}Type"), p.findtext(f"{NS}Port"), p.findtext(f"{NS}SSL"),
            p.findtext(f"{NS}Encryption"), p.findtext(f"{NS}LoginName")) for p in protos]
    a = "alice@example.test"
    assert got == [
        ("IMAP", "993", "on", "SSL", a),
        ("IMAP", "143", "on", "TLS", a),
        ("POP3", "995", "on", "SSL", a),
        ("POP3", "110", "on", "TLS", a),
        ("SMTP", "465", "on", "SSL", a),
        ("SMTP", "587", "on", "TLS", a),
    ]
    assert b'xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"' \
        in body  # a default namespace, not ns0: prefixes


def test_autodiscover_response_without_address_has_no_login_name() -> None:
    body = autoconfig.autodiscover_response(
        hostname=HOST, address=None, eps=ALL, display_name="example.test"
    )
    assert b"LoginName" not in body


def test_autodiscover_error_is_well_formed() -> None:
    root = ET.fromstring(autoconfig.autodiscover_error(600, "Invalid Request"))
    ns = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"
    assert root.findtext(f"{ns}Response/{ns}Error/{ns}ErrorCode") == "600"


def test_apple_profile_prefers_993_and_465() -> None:
    body = autoconfig.apple_mobileconfig(
        hostname=HOST, domain="example.test", address="alice@example.test", eps=ALL
    )
    assert body is not None
    profile = plistlib.loads(body)
    [mail] = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert (mail["IncomingMailServerPortNumber"], mail["OutgoingMailServerPortNumber"]) == \
        (993, 465)
    assert mail["IncomingMailServerUseSSL"] is mail["OutgoingMailServerUseSSL"] is True
    assert mail["IncomingMailServerUsername"] == "alice@example.test"
    assert "IncomingPassword" not in mail and "OutgoingPassword" not in mail


def test_apple_profile_falls_back_to_587_and_pop3() -> None:
    body = autoconfig.apple_mobileconfig(
        hostname=HOST, domain="example.test", address=None,
        eps=eps(Service.POP3S, Service.SUBMISSION),
    )
    assert body is not None
    [mail] = plistlib.loads(body)["PayloadContent"]
    assert mail["EmailAccountType"] == "EmailTypePOP"
    assert (mail["IncomingMailServerPortNumber"], mail["OutgoingMailServerPortNumber"]) == \
        (995, 587)
    assert mail["OutgoingMailServerUseSSL"] is True  # STARTTLS: Apple's switch covers both
    assert "EmailAddress" not in mail  # the device asks


def test_apple_profile_is_stable_per_account_and_none_without_ports() -> None:
    def make(address: str) -> bytes | None:
        return autoconfig.apple_mobileconfig(
            hostname=HOST, domain="example.test", address=address, eps=ALL
        )

    assert make("alice@example.test") == make("alice@example.test")
    assert make("alice@example.test") != make("bob@example.test")
    assert autoconfig.apple_mobileconfig(
        hostname=HOST, domain="example.test", address=None, eps=eps(Service.IMAPS)
    ) is None
