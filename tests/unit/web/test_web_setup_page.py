"""The /setup page HTML: open ports only, each program's words, escaping, no script."""

from __future__ import annotations

from html.parser import HTMLParser

from postkeep.config.schema import Service
from postkeep.hints import Ports
from postkeep.web import autoconfig, setup_page

ALL = autoconfig.endpoints(Ports.standard())


class Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Text:
    p = Text()
    p.feed(page)
    return p


def test_page_names_ports_modes_and_server() -> None:
    page = setup_page.render(hostname="mail.example.test", domain="example.test", eps=ALL)
    p = parse(page)
    text = " ".join(p.text)
    assert "script" not in p.tags
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    for port in ("993", "143", "995", "110", "465", "587"):
        assert f">{port}<" in page
    assert ">25<" not in page and ">8080<" not in page
    for words in ("SSL/TLS", "STARTTLS", "Use TLS/SSL", "Connection security",
                  "Encryption method", "Thunderbird for Android", "mail.example.test",
                  "you@example.test", "normal mailbox password"):
        assert words in text, words


def test_page_lists_only_open_ports() -> None:
    eps = autoconfig.endpoints(Ports({Service.IMAPS: 993, Service.SUBMISSIONS: 465}))
    page = setup_page.render(hostname="mail.example.test", domain="example.test", eps=eps)
    assert ">993<" in page and ">465<" in page
    assert ">143<" not in page and ">587<" not in page and "POP3" not in page
    assert "STARTTLS ports" not in page  # no STARTTLS column without a STARTTLS port


def test_page_escapes_everything() -> None:
    page = setup_page.render(
        hostname="<b>h</b>", domain="<script>x</script>", eps=ALL,
        other_domains=['"><img src=x>'], self_signed_fingerprint="<i>",
    )
    assert "<script>x" not in page and "<b>h" not in page and "<img" not in page
    assert "<i>" not in page


def test_self_signed_certificate_shows_its_fingerprint() -> None:
    page = setup_page.render(hostname="h", domain="d", eps=ALL,
                             self_signed_fingerprint="AB:CD:EF")
    assert "self-signed" in page and "AB:CD:EF" in page
    assert "self-signed" not in setup_page.render(hostname="h", domain="d", eps=ALL)
