"""What to type into a mail program, from what the probe found — and the autoconfig file.

Only ports judged *secure* are ever recommended. Implicit TLS comes first (RFC 8314 §3.3:
"SSL/TLS" on 993/465/995), STARTTLS second (a STARTTLS port that also accepts SSL/TLS is
still listed as STARTTLS, marked ``implicit_also``: either setting works there); IMAP
before POP3 (it keeps mail on the server, which is what people with more than one device
expect).

The security setting has a different name, and sometimes a different word, in each
program; ``CLIENT_WORDS`` is the one table of them.

Invariants:
- A recommendation names a port that answered and was judged secure, nothing else.
- ``autoconfig_xml`` lists the same ports, implicit TLS first, in Thunderbird's
  ``config-v1.1.xml`` format (socketType ``SSL`` or ``STARTTLS``, never ``plain``).
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree import ElementTree as ET

from postkeep.config.schema import Service
from postkeep.probe.checks import PortReport, ProbeResult

#: Preference order, best first.
INCOMING = (Service.IMAPS, Service.IMAP, Service.POP3S, Service.POP3)
OUTGOING = (Service.SUBMISSIONS, Service.SUBMISSION)

#: program → (the setting's label, the word for implicit TLS, the word for STARTTLS).
CLIENT_WORDS: dict[str, tuple[str, str, str]] = {
    "Thunderbird": ("Connection security", "SSL/TLS", "STARTTLS"),
    "Outlook": ("Encryption method", "SSL/TLS", "STARTTLS"),
    # Apple Mail has one checkbox; with it on, the port decides implicit TLS or STARTTLS.
    "Apple Mail": ("Use TLS/SSL", "on", "on"),
    "K-9 Mail / Thunderbird for Android": ("Security", "SSL/TLS", "STARTTLS"),
}


@dataclass(frozen=True, slots=True)
class ServerSetting:
    direction: str  # "incoming" or "outgoing"
    protocol: str  # "IMAP", "POP3", "SMTP"
    service: Service
    server: str
    port: int
    security: str  # "SSL/TLS" (implicit TLS) or "STARTTLS"
    #: A STARTTLS port that also accepts SSL/TLS from the first byte: either setting works.
    implicit_also: bool = False

    def word(self, program: str) -> str:
        _, implicit, starttls = CLIENT_WORDS[program]
        return implicit if self.security == "SSL/TLS" else starttls


def _setting(direction: str, rep: PortReport, host: str) -> ServerSetting:
    return ServerSetting(
        direction=direction,
        protocol=rep.protocol.upper(),
        service=rep.service,
        server=host,
        port=rep.port,
        security="SSL/TLS" if rep.mode == "implicit_tls" else "STARTTLS",
        implicit_also=rep.implicit_tls_also is True,
    )


def recommend(result: ProbeResult) -> dict[str, list[ServerSetting]]:
    """Secure choices per direction, best first (the first is the recommendation)."""
    secure = {r.service: r for r in result.ports if r.verdict == "secure"}
    out: dict[str, list[ServerSetting]] = {"incoming": [], "outgoing": []}
    for direction, order in (("incoming", INCOMING), ("outgoing", OUTGOING)):
        ranked = [secure[s] for s in order if s in secure]
        # RFC 8314 §3.3: implicit TLS before STARTTLS, whichever port it was found on.
        ranked.sort(key=lambda r: r.mode != "implicit_tls")
        out[direction] = [_setting(direction, r, result.host) for r in ranked]
    return out


def autoconfig_xml(result: ProbeResult, domain: str | None = None) -> str:
    """Thunderbird's ``config-v1.1.xml`` listing the secure ports, implicit TLS first."""
    domain = domain or result.host
    choices = recommend(result)
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=domain)
    ET.SubElement(provider, "domain").text = domain
    ET.SubElement(provider, "displayName").text = domain
    ET.SubElement(provider, "displayShortName").text = domain
    for direction, tag in (("incoming", "incomingServer"), ("outgoing", "outgoingServer")):
        for s in choices[direction]:
            server = ET.SubElement(provider, tag, type=s.protocol.lower())
            ET.SubElement(server, "hostname").text = s.server
            ET.SubElement(server, "port").text = str(s.port)
            ET.SubElement(server, "socketType").text = (
                "SSL" if s.security == "SSL/TLS" else "STARTTLS"
            )
            ET.SubElement(server, "username").text = "%EMAILADDRESS%"
            ET.SubElement(server, "authentication").text = "password-cleartext"
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'
