"""hints: the sentences that name the port and setting use the ports really open."""

from __future__ import annotations

import pytest

from postkeep import hints
from postkeep.config.schema import Service
from postkeep.hints import PREGREET_ERRORS, Ports

CUSTOM = Ports({
    Service.SUBMISSION: 2587, Service.SUBMISSIONS: 2465, Service.IMAP: 2143,
    Service.IMAPS: 2993, Service.POP3: 2110, Service.POP3S: 2995,
})


def test_starttls_first_texts_name_the_configured_implicit_tls_ports() -> None:
    assert hints.smtp_starttls_first(CUSTOM).endswith("or use port 2465 with SSL/TLS")
    assert "SSL/TLS on port 2993" in hints.imap_starttls_first(CUSTOM)
    assert "SSL/TLS on port 2995" in hints.pop3_stls_first(CUSTOM)


def test_starttls_first_texts_name_no_port_that_is_closed() -> None:
    only_plain = Ports({Service.SUBMISSION: 587, Service.IMAP: 143, Service.POP3: 110})
    for text in (hints.smtp_starttls_first(only_plain), hints.imap_starttls_first(only_plain),
                 hints.pop3_stls_first(only_plain)):
        assert "port" not in text
        assert "STARTTLS" in text or "STLS" in text


@pytest.mark.parametrize("service", list(hints.IMPLICIT_HINTS))
def test_implicit_port_hints_name_both_ports_on_one_line(service: Service) -> None:
    line = hints.IMPLICIT_HINTS[service](CUSTOM)
    implicit = CUSTOM.of(service)
    assert line.endswith(b"\r\n") and b"\r" not in line[:-2] and b"\n" not in line[:-2]
    assert f"SSL/TLS on port {implicit}".encode() in line
    assert line.isascii()


@pytest.mark.parametrize("service", [Service.SUBMISSION, Service.IMAP, Service.POP3])
def test_pregreet_errors_exist_for_the_sniffed_ports_only(service: Service) -> None:
    line = PREGREET_ERRORS[service]
    assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1 and line.isascii()
    assert Service.SMTP not in PREGREET_ERRORS  # port 25 greets at once, never sniffs
