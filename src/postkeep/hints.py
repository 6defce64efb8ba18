"""Every sentence that tells a person which port and security setting to use.

These are shown by mail programs in their error dialogs, so they name the setting in the
words mail programs use ("SSL/TLS", "STARTTLS") and the ports this server really listens
on (taken from the bound listeners, not assumed to be the standard ones).

Invariants:
- Each hint is one line of plain ASCII, without CR or LF inside.
- A hint never names a port that is not open.
"""

from __future__ import annotations

from dataclasses import dataclass

from postkeep.config.schema import SERVICE_PORTS, Service


@dataclass(frozen=True, slots=True)
class Ports:
    """The first port each service listens on; absent when switched off."""

    ports: dict[Service, int]

    def of(self, service: Service) -> int | None:
        return self.ports.get(service)

    @classmethod
    def standard(cls) -> Ports:
        return cls({s: p for s, (p, _) in SERVICE_PORTS.items()})




def smtp_implicit_tls_port(ports: Ports) -> bytes:
    """Plaintext line for a non-TLS client on the submissions (465) port."""
    p465 = ports.of(Service.SUBMISSIONS)
    p587 = ports.of(Service.SUBMISSION)
    tail = f", or to STARTTLS on port {p587}" if p587 is not None else ""
    return (
        f"554 5.7.0 Port {p465} expects SSL/TLS from the first byte: set your mail program "
        f"to SSL/TLS on port {p465}{tail}\r\n"
    ).encode()


def smtp_starttls_first(ports: Ports) -> str:
    """Text of the 530 5.7.0 for AUTH/MAIL before STARTTLS on the submission (587) port."""
    p465 = ports.of(Service.SUBMISSIONS)
    alt = f", or use port {p465} with SSL/TLS" if p465 is not None else ""
    return f"Must issue a STARTTLS command first{alt}"


def imap_implicit_tls_port(ports: Ports) -> bytes:
    p993 = ports.of(Service.IMAPS)
    p143 = ports.of(Service.IMAP)
    tail = f", or STARTTLS on port {p143}" if p143 is not None else ""
    return (
        f"* BYE [ALERT] Port {p993} expects SSL/TLS from the first byte: use SSL/TLS on "
        f"port {p993}{tail}\r\n"
    ).encode()


def pop3_implicit_tls_port(ports: Ports) -> bytes:
    p995 = ports.of(Service.POP3S)
    p110 = ports.of(Service.POP3)
    tail = f", or STLS on port {p110}" if p110 is not None else ""
    return (
        f"-ERR Port {p995} expects SSL/TLS from the first byte: use SSL/TLS on "
        f"port {p995}{tail}\r\n"
    ).encode()


def pop3_stls_first(ports: Ports) -> str:
    """Text of the ``-ERR [AUTH]`` for USER, PASS or AUTH before STLS on the pop3 (110) port."""
    p995 = ports.of(Service.POP3S)
    alt = f", or SSL/TLS on port {p995}" if p995 is not None else ""
    return f"Use STLS first{alt}: passwords are never sent unencrypted"


IMPLICIT_HINTS = {
    Service.SUBMISSIONS: smtp_implicit_tls_port,
    Service.IMAPS: imap_implicit_tls_port,
    Service.POP3S: pop3_implicit_tls_port,
}
