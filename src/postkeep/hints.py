"""Every sentence that tells a person which port and security setting to use.

These are shown by mail programs in their error dialogs, so they name the setting in the
words mail programs use ("SSL/TLS", "STARTTLS") and the ports this server really listens
on (taken from the bound listeners, not assumed to be the standard ones).

Where each one is said:

- a client silent or speaking plaintext on 465/993/995 (``IMPLICIT_HINTS``, written by
  ``net/listener`` before it closes);
- a login, AUTH or (SMTP) mail before TLS on 587/143/110 (``smtp_starttls_first``,
  ``imap_starttls_first``, ``pop3_stls_first``, the text of the cores' refusals).

A client set to SSL/TLS on 587/143/110 needs no hint: ``net/listener`` recognises its
ClientHello and serves it as on the implicit-TLS port. One that sends a command before
the greeting there gets the protocol's error from ``PREGREET_ERRORS`` (not a setting
hint: no mail program does that, whatever its settings).

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


def imap_starttls_first(ports: Ports) -> str:
    """Text of the ``NO [PRIVACYREQUIRED]`` for LOGIN/AUTHENTICATE before STARTTLS on 143."""
    p993 = ports.of(Service.IMAPS)
    alt = f", or SSL/TLS on port {p993}" if p993 is not None else ""
    return f"Use STARTTLS first{alt}: passwords are never sent unencrypted"


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


#: Said to a client that sent bytes other than a TLS ClientHello on 587/143/110 before our
#: greeting, just before the connection closes. Only bytes received before the greeting
#: count: a client slower than ``[security] tls_sniff_ms`` is greeted normally.
#: SMTP: RFC 5321 §3.1 lets a server answer 554 instead of 220; we then close at once
#: rather than wait for QUIT, as Postfix's postscreen ("pregreet") and Exim ("SMTP
#: synchronization error") do with such clients.
#: IMAP: an untagged BYE may be sent at any time (RFC 9051 §7.1.5). POP3: RFC 1939 §3.
PREGREET_ERRORS: dict[Service, bytes] = {
    Service.SUBMISSION: b"554 5.5.1 Protocol error: command sent before the greeting\r\n",
    Service.IMAP: b"* BYE Protocol error: command sent before the greeting\r\n",
    Service.POP3: b"-ERR Protocol error: command sent before the greeting\r\n",
}
