"""Automatic client setup: what mail programs download to configure an account.

- Thunderbird (and most desktop programs that copied it): the ``clientConfig`` v1.1 XML,
  at ``/.well-known/autoconfig/mail/config-v1.1.xml`` and ``/mail/config-v1.1.xml``.
- Outlook: the POX autodiscover ``Account``/``Protocol`` answer to a POST of the user's
  ``EMailAddress`` to ``/autodiscover/autodiscover.xml``.
- Apple Mail (macOS, iOS, iPadOS): a ``.mobileconfig`` profile with a
  ``com.apple.mail.managed`` payload. It is not signed, so the device shows it as
  "Unverified"; it holds no password (the device asks for it).

All three are built from one list of ``Endpoint``\\s taken from the listeners that are
really open, so a closed port (``plaintext_access = false`` closes 143 and 110) is never
offered. The ports are listed implicit TLS first (RFC 8314 §3.3 and §5.1: prefer
implicit TLS for access and submission).

Invariants:
- Only open ports are described, and each one with the security mode it really has.
- Every endpoint described requires TLS before the password is sent (STARTTLS on 587,
  143 and 110 is required, DESIGN.md §1), so "password-cleartext" means cleartext
  *inside* TLS.
- Documents are built with ``xml.etree.ElementTree`` or ``plistlib``, never by string
  formatting, so client-supplied text (the e-mail address) is always escaped.
- Request XML is parsed without any DTD: a document with a DOCTYPE or an entity
  declaration is refused before any entity could be expanded (no XXE, no billion laughs).
"""

from __future__ import annotations

import hashlib
import plistlib
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any
from xml.parsers import expat

from postkeep.config.schema import Service
from postkeep.hints import Ports
from postkeep.mail.address import AddressError, normalize

#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets, so an address at most 254.
MAX_ADDRESS = 254
#: An autodiscover request is a few hundred bytes; anything much larger is refused.
MAX_AUTODISCOVER_REQUEST = 16 * 1024
MAX_XML_DEPTH = 16

AUTODISCOVER_REQUEST_NS = (
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
)
AUTODISCOVER_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
AUTODISCOVER_OUTLOOK_NS = (
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
)


class Protocol(str, Enum):  # noqa: UP042 (same convention as config.schema)
    IMAP = "imap"
    POP3 = "pop3"
    SMTP = "smtp"


class Security(str, Enum):  # noqa: UP042
    """How a port starts TLS, and what each mail program calls it."""

    SSL = "ssl"  # implicit TLS from the first byte (RFC 8314); "SSL/TLS" in most programs
    STARTTLS = "starttls"  # plaintext greeting, then STARTTLS/STLS (required here)


@dataclass(frozen=True, slots=True)
class Endpoint:
    protocol: Protocol
    port: int
    security: Security

    @property
    def thunderbird(self) -> str:
        """clientConfig ``socketType``: "SSL" is implicit TLS, "STARTTLS" the upgrade."""
        return "SSL" if self.security is Security.SSL else "STARTTLS"


#: Services mail programs connect to, in the order they are offered: for each protocol,
#: implicit TLS first (RFC 8314 §3.3, §5.1). Port 25 is for other servers, not listed.
CLIENT_SERVICES: tuple[tuple[Service, Protocol, Security], ...] = (
    (Service.IMAPS, Protocol.IMAP, Security.SSL),
    (Service.IMAP, Protocol.IMAP, Security.STARTTLS),
    (Service.POP3S, Protocol.POP3, Security.SSL),
    (Service.POP3, Protocol.POP3, Security.STARTTLS),
    (Service.SUBMISSIONS, Protocol.SMTP, Security.SSL),
    (Service.SUBMISSION, Protocol.SMTP, Security.STARTTLS),
)


def endpoints(ports: Ports) -> list[Endpoint]:
    """The client-facing endpoints that are open, in the order to offer them."""
    out: list[Endpoint] = []
    for service, protocol, security in CLIENT_SERVICES:
        port = ports.of(service)
        if port is not None:
            out.append(Endpoint(protocol, port, security))
    return out


def of(eps: Sequence[Endpoint], protocol: Protocol) -> list[Endpoint]:
    return [e for e in eps if e.protocol is protocol]


def valid_address(text: str | None) -> str | None:
    """The address in postkeep's normal form, or None if ``text`` is not one."""
    if not text or len(text) > MAX_ADDRESS:
        return None
    try:
        address = normalize(text.strip())
    except (AddressError, ValueError):
        return None
    if "@" not in address or address.startswith('"'):
        return None  # quoted local parts: legal, but no mail program's account uses one
    return address


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def _xml(root: ET.Element) -> bytes:
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def _sub(parent: ET.Element, tag: str, text: str | int | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = str(text)
    return el


# -- Thunderbird ---------------------------------------------------------------------------
def thunderbird_config(
    *, hostname: str, domain: str, domains: Sequence[str], eps: Sequence[Endpoint]
) -> bytes:
    """clientConfig v1.1 for ``domain`` (``emailProvider id``), served by ``hostname``."""
    root = ET.Element("clientConfig", version="1.1")
    provider = _sub(root, "emailProvider", id=domain)
    for name in [domain, *(d for d in domains if d != domain)]:
        _sub(provider, "domain", name)
    _sub(provider, "displayName", f"{domain} mail")
    _sub(provider, "displayShortName", domain)
    for ep in [*of(eps, Protocol.IMAP), *of(eps, Protocol.POP3), *of(eps, Protocol.SMTP)]:
        tag = "outgoingServer" if ep.protocol is Protocol.SMTP else "incomingServer"
        server = _sub(provider, tag, type=ep.protocol.value)
        _sub(server, "hostname", hostname)
        _sub(server, "port", ep.port)
        _sub(server, "socketType", ep.thunderbird)
        _sub(server, "username", "%EMAILADDRESS%")
        # Cleartext inside TLS: every port listed refuses the password before TLS.
        _sub(server, "authentication", "password-cleartext")
    return _xml(root)


# -- Outlook autodiscover ------------------------------------------------------------------
class AutodiscoverRequestError(ValueError):
    """The request body is not an autodiscover request we accept."""


def parse_autodiscover_request(body: bytes) -> str | None:
    """The ``EMailAddress`` of a POX autodiscover request (as sent), or None if absent.

    A bounded, DTD-free expat parse: DOCTYPE, entity declarations and external entity
    references raise before any expansion, and so do oversized or deeply nested bodies.
    """
    if len(body) > MAX_AUTODISCOVER_REQUEST:
        raise AutodiscoverRequestError("request too large")
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[str] = []
    found: list[str] = []
    text: list[str] = []

    def refuse(*_: Any) -> None:
        raise AutodiscoverRequestError("DTDs and entities are not accepted")

    def refuse_external(*_: Any) -> int:
        raise AutodiscoverRequestError("external entities are not accepted")

    def start(name: str, _attrs: dict[str, str]) -> None:
        local = name.rpartition(" ")[2]
        stack.append(local)
        if len(stack) > MAX_XML_DEPTH:
            raise AutodiscoverRequestError("too deeply nested")
        if local == "EMailAddress":
            text.clear()

    def end(name: str) -> None:
        local = stack.pop()
        if local == "EMailAddress" and not found:
            found.append("".join(text).strip())

    def chars(data: str) -> None:
        if stack and stack[-1] == "EMailAddress":
            text.append(data)
            if sum(map(len, text)) > MAX_ADDRESS * 4:
                raise AutodiscoverRequestError("address too long")

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse_external
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(body, True)
    except expat.ExpatError as exc:
        reason = expat.ErrorString(exc.code)
        raise AutodiscoverRequestError(f"not well-formed XML: {reason}") from None
    return found[0] if found else None


def autodiscover_response(
    *, hostname: str, address: str | None, eps: Sequence[Endpoint], display_name: str
) -> bytes:
    """POX autodiscover "settings" answer, in Outlook's vocabulary.

    ``SSL on`` with ``Encryption SSL`` is implicit TLS; ``Encryption TLS`` is STARTTLS.
    Outlook 2010 and later read ``Encryption`` first and ignore ``SSL`` when both are
    present; ``SSL on`` stays on STARTTLS ports too, because both kinds require
    encryption before the password.
    """
    # A literal "xmlns" attribute (not ElementTree's prefixes): Outlook expects the default
    # namespace on both elements, exactly as in Microsoft's examples.
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_NS)
    response = _sub(root, "Response", xmlns=AUTODISCOVER_OUTLOOK_NS)
    user = _sub(response, "User")
    _sub(user, "DisplayName", display_name)
    account = _sub(response, "Account")
    _sub(account, "AccountType", "email")
    _sub(account, "Action", "settings")
    for ep in [*of(eps, Protocol.IMAP), *of(eps, Protocol.POP3), *of(eps, Protocol.SMTP)]:
        proto = _sub(account, "Protocol")
        _sub(proto, "Type", ep.protocol.value.upper())
        _sub(proto, "Server", hostname)
        _sub(proto, "Port", ep.port)
        _sub(proto, "DomainRequired", "off")
        if address is not None:
            _sub(proto, "LoginName", address)
        _sub(proto, "SPA", "off")
        _sub(proto, "SSL", "on")
        _sub(proto, "Encryption", "SSL" if ep.security is Security.SSL else "TLS")
        _sub(proto, "AuthRequired", "on")
        if ep.protocol is Protocol.SMTP:
            _sub(proto, "UsePOPAuth", "off")
            _sub(proto, "SMTPLast", "off")
    return _xml(root)


def autodiscover_error(code: int, message: str) -> bytes:
    """POX autodiscover error (600 "Invalid Request", 602 "Cannot find the address")."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_NS)
    response = _sub(root, "Response")
    error = _sub(response, "Error", Time="00:00:00", Id="0")
    _sub(error, "ErrorCode", code)
    _sub(error, "Message", message)
    _sub(error, "DebugData", "")
    return _xml(root)


# -- Apple configuration profile -----------------------------------------------------------
def _reverse_dns(hostname: str) -> str:
    return ".".join(reversed(hostname.strip(".").split(".")))


def _stable_uuid(*parts: str) -> str:
    """The same profile for the same account gets the same UUIDs, so that installing it
    again replaces the old one instead of adding a second account."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, "/".join(parts))).upper()


def apple_mobileconfig(
    *, hostname: str, domain: str, address: str | None, eps: Sequence[Endpoint]
) -> bytes | None:
    """A ``.mobileconfig`` (unsigned) for one IMAP (or POP3) account with SMTP submission.

    Apple has one switch, "Use SSL" (shown as "Use TLS/SSL"), for both kinds of TLS: on
    465/993/995 the device starts TLS at once, on 587/143/110 it issues STARTTLS. So
    UseSSL is true everywhere. Implicit TLS is chosen when open (RFC 8314). Without an
    address, the device asks for one at installation. None if no port is open to describe.
    """
    incoming = of(eps, Protocol.IMAP) or of(eps, Protocol.POP3)
    outgoing = of(eps, Protocol.SMTP)
    if not incoming or not outgoing:
        return None
    inc, out = incoming[0], outgoing[0]
    who = address or domain
    key = hashlib.sha256(who.encode()).hexdigest()[:16]
    ident = f"{_reverse_dns(hostname)}.postkeep.{key}"
    account: dict[str, Any] = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.mail",
        "PayloadUUID": _stable_uuid(hostname, who, "mail"),
        "PayloadDisplayName": f"{who} mail",
        "EmailAccountDescription": who,
        "EmailAccountType": "EmailTypeIMAP" if inc.protocol is Protocol.IMAP else "EmailTypePOP",
        "IncomingMailServerHostName": hostname,
        "IncomingMailServerPortNumber": inc.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": hostname,
        "OutgoingMailServerPortNumber": out.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    if address is not None:
        account["EmailAddress"] = address
        account["IncomingMailServerUsername"] = address
        account["OutgoingMailServerUsername"] = address
    profile: dict[str, Any] = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": ident,
        "PayloadUUID": _stable_uuid(hostname, who, "profile"),
        "PayloadDisplayName": f"Mail: {who}",
        "PayloadDescription": (
            f"Sets up the mail account {who} on {hostname}: incoming port {inc.port}, "
            f"outgoing port {out.port}, encrypted (TLS). Your password is asked for "
            "at installation; it is not in this profile."
        ),
        "PayloadOrganization": domain,
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [account],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)
