"""The Received: trace field: content, with-keywords, folding and injection resistance."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from email import message_from_bytes
from email.policy import SMTP
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postkeep.mail.received import MAX_LINE, TlsInfo, received_header, with_keyword

WHEN = datetime(2024, 3, 5, 14, 7, 9, tzinfo=timezone(timedelta(hours=1)))
TLS13 = TlsInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", bits=256)


def build(**overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "helo": "client.example",
        "peer_ip": "192.0.2.10",
        "peer_host": "host.example.net",
        "by_host": "mail.example.com",
        "protocol": "ESMTP",
        "tls": TLS13,
        "authenticated": True,
        "queue_id": "Q1234ABCD",
        "recipient": "bob@example.com",
        "when": WHEN,
    }
    args.update(overrides)
    return received_header(**args)


def unfold(field: bytes) -> str:
    assert field.endswith(b"\r\n")
    return re.sub(r"\r\n[ \t]", " ", field[:-2].decode("utf-8"))


def assert_single_field(field: bytes) -> None:
    """One field: ends in CRLF, every other CRLF is a fold, lines within limits."""
    assert field.startswith(b"Received: ")
    assert field.endswith(b"\r\n")
    body = field[:-2]
    for i in (m.start() for m in re.finditer(rb"\r\n", body)):
        assert body[i + 2 : i + 3] in (b" ", b"\t"), field
    assert b"\r" not in body.replace(b"\r\n", b"")
    assert b"\n" not in body.replace(b"\r\n", b"")
    assert b"\x00" not in body
    for line in body.split(b"\r\n"):
        assert line.strip(), "no whitespace-only line"
        assert len(line) <= 998


# --- content --------------------------------------------------------------------------------


def test_full_header_reads_as_expected() -> None:
    text = unfold(build())
    assert text == (
        "Received: from client.example (host.example.net [192.0.2.10])"
        " (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))"
        " by mail.example.com with ESMTPSA id Q1234ABCD for <bob@example.com>"
        " tls TLS_AES_256_GCM_SHA384; Tue, 05 Mar 2024 14:07:09 +0100"
    )


def test_plain_session_has_no_tls_comment() -> None:
    text = unfold(build(tls=None, authenticated=False))
    assert "using" not in text and " tls " not in text
    assert " with ESMTP id " in text


def test_no_recipient_no_for_clause() -> None:
    assert " for " not in unfold(build(recipient=None))


def test_unknown_reverse_dns() -> None:
    assert "(unknown [192.0.2.10])" in unfold(build(peer_host=None))


def test_ipv6_peer_is_an_ipv6_address_literal() -> None:
    text = unfold(build(peer_ip="2001:DB8:0:0::1"))
    assert "(host.example.net [IPv6:2001:db8::1])" in text


def test_ipv4_mapped_peer_is_written_as_ipv4() -> None:
    assert "[192.0.2.7])" in unfold(build(peer_ip="::ffff:192.0.2.7"))


def test_address_literal_helo_is_kept() -> None:
    assert unfold(build(helo="[192.0.2.10]")).startswith("Received: from [192.0.2.10] (")
    assert "from [IPv6:2001:db8::5] (" in unfold(build(helo="[ipv6:2001:db8:0::5]"))


def test_authenticated_user_name_is_not_disclosed() -> None:
    text = unfold(build())
    assert "alice" not in text.lower()
    assert "auth" not in text.lower()  # recorded only by the A in ESMTPSA


def test_tls_description_string() -> None:
    text = unfold(build(tls="TLSv1.2 with cipher ECDHE-RSA-AES128-GCM-SHA256 (128/128 bits)"))
    assert "(using TLSv1.2 with cipher ECDHE-RSA-AES128-GCM-SHA256 (128/128 bits))" in text
    assert " tls " not in text  # only an IANA-named cipher gets the registered clause


def test_tls_description_naming_an_iana_cipher_gets_the_tls_clause() -> None:
    text = unfold(build(tls="TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits)"))
    assert "(using TLSv1.3 TLS_AES_256_GCM_SHA384 (256 bits))" in text
    assert " tls TLS_AES_256_GCM_SHA384; " in text


def test_tls_description_with_unbalanced_parentheses_is_neutralised() -> None:
    text = unfold(build(tls="TLSv1.2) by evil.example (x"))
    assert "(using TLSv1.2? by evil.example ?x)" in text


def test_tls_info_from_ssl_object() -> None:
    class FakeSsl:
        def version(self) -> str | None:
            return "TLSv1.3"

        def cipher(self) -> tuple[str, str, int] | None:
            return ("TLS_CHACHA20_POLY1305_SHA256", "TLSv1.3", 256)

    info = TlsInfo.from_ssl(FakeSsl())
    assert info == TlsInfo("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", 256)
    assert info.describe() == "TLSv1.3 with cipher TLS_CHACHA20_POLY1305_SHA256 (256/256 bits)"

    class NoHandshake:
        def version(self) -> str | None:
            return None

        def cipher(self) -> tuple[str, str, int] | None:
            return None

    assert TlsInfo.from_ssl(NoHandshake()) is None


def test_header_parses_as_one_received_field() -> None:
    msg = message_from_bytes(build() + b"Subject: hi\r\n\r\nbody\r\n", policy=SMTP)
    received = msg.get_all("Received")
    assert received is not None and len(received) == 1
    assert msg["Subject"] == "hi"


# --- with keyword -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "tls", "auth", "expected"),
    [
        ("ESMTP", False, False, "ESMTP"),
        ("ESMTP", True, False, "ESMTPS"),
        ("ESMTP", False, True, "ESMTPA"),
        ("ESMTP", True, True, "ESMTPSA"),
        ("esmtp", True, True, "ESMTPSA"),
        ("UTF8SMTP", False, False, "UTF8SMTP"),
        ("UTF8SMTP", True, False, "UTF8SMTPS"),
        ("UTF8SMTP", False, True, "UTF8SMTPA"),
        ("UTF8SMTP", True, True, "UTF8SMTPSA"),
        ("LMTP", True, True, "LMTPSA"),
        ("UTF8LMTP", True, False, "UTF8LMTPS"),
        ("SMTP", False, False, "SMTP"),
        ("SMTP", True, False, "SMTP"),  # HELO over implicit TLS: no registered SMTPS
        # A complete keyword is accepted; the flags decide S and A.
        ("ESMTPSA", True, True, "ESMTPSA"),
        ("ESMTPSA", False, False, "ESMTP"),
        ("UTF8SMTPA", True, False, "UTF8SMTPS"),
        ("lmtps", False, True, "LMTPA"),
    ],
)
def test_with_keyword(protocol: str, tls: bool, auth: bool, expected: str) -> None:
    assert with_keyword(protocol, tls=tls, authenticated=auth) == expected


def test_with_keyword_in_header() -> None:
    assert " with UTF8SMTPSA " in unfold(build(protocol="UTF8SMTP"))
    assert " with ESMTPS " in unfold(build(authenticated=False))


@pytest.mark.parametrize("protocol", ["SMTPS", "SMTPA", "HTTP", "", "ESMTPAS", "ESMTP\r\nX: y"])
def test_unknown_protocol_is_refused(protocol: str) -> None:
    with pytest.raises(ValueError):
        build(protocol=protocol)


# --- our own values are validated -------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"peer_ip": "not-an-ip"},
        {"peer_ip": "192.0.2.1\r\nBcc: x"},
        {"by_host": "mail example"},
        {"by_host": "mail.example.com\r\nBcc: x"},
        {"queue_id": "Q1 Q2"},
        {"queue_id": ""},
        {"queue_id": "Q1;\r\nBcc: x"},
        {"when": datetime(2024, 3, 5, 14, 7, 9)},
    ],
)
def test_bad_server_side_values_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build(**overrides)


# --- client-controlled values are sanitised ---------------------------------------------------


def test_helo_injection_cannot_add_a_field() -> None:
    field = build(helo="x\r\nBcc: y")
    assert_single_field(field)
    assert b"\r\nBcc" not in field
    text = unfold(field)
    assert text.startswith("Received: from [192.0.2.10] (host.example.net [192.0.2.10])")
    assert "(helo=x??Bcc:?y)" in text


def test_helo_cannot_close_the_comment_and_forge_clauses() -> None:
    text = unfold(build(helo="evil) by trusted.example with ESMTPSA (x"))
    assert "by trusted.example" not in text
    assert text.count(" by ") == 1


@pytest.mark.parametrize("helo", ["", " ", "a\x00b", "a\\b", "exa mple.com", "ex\u00e4mple.com"])
def test_invalid_helo_goes_into_a_safe_comment(helo: str) -> None:
    field = build(helo=helo)
    assert_single_field(field)
    text = unfold(field)
    assert text.startswith("Received: from [192.0.2.10] ")
    helo_comment = re.search(r"\(helo=([^)]*)\)", text)
    assert helo_comment is not None
    assert re.fullmatch(r"[!-~]*", helo_comment.group(1))
    assert "\\" not in helo_comment.group(1)
    assert field.isascii()


def test_long_helo_is_capped() -> None:
    field = build(helo="a" * 5000 + "!")
    assert_single_field(field)
    assert len(field) < 1000


def test_bad_reverse_dns_is_not_written() -> None:
    text = unfold(build(peer_host="evil\r\nBcc: y.example"))
    assert "(unknown [192.0.2.10])" in text
    assert "evil" not in text


def test_recipient_injection_is_neutralised() -> None:
    field = build(recipient="bob@example.com>\r\nBcc: eve@evil.example")
    assert_single_field(field)
    assert "for <bob@example.com???Bcc: eve@evil.example>" in unfold(field)


def test_non_ascii_recipient_only_in_utf8_transactions() -> None:
    utf8 = build(protocol="UTF8SMTP", recipient="jösé@bücher.example")
    assert "for <jösé@bücher.example>" in unfold(utf8)
    ascii_only = build(recipient="jösé@bücher.example")
    assert ascii_only.isascii()
    assert "for <j?s?@b?cher.example>" in unfold(ascii_only)


def test_line_separator_in_utf8_recipient_is_replaced() -> None:
    field = build(protocol="UTF8SMTP", recipient="a\u2028b\u0085c@example.com")
    assert "for <a?b?c@example.com>" in unfold(field)


def test_recipient_angle_brackets_are_not_doubled() -> None:
    assert "for <bob@example.com>" in unfold(build(recipient="<bob@example.com>"))


def test_empty_recipient_is_dropped() -> None:
    assert " for " not in unfold(build(recipient="<>"))


# --- folding --------------------------------------------------------------------------------


def test_lines_are_folded_at_78() -> None:
    field = build(peer_ip="2001:db8:1234:5678:9abc:def0:1234:5678", protocol="UTF8SMTP")
    assert_single_field(field)
    lines = field[:-2].split(b"\r\n")
    assert len(lines) > 1
    assert all(len(line) <= MAX_LINE for line in lines)
    assert all(line.startswith(b"\t") for line in lines[1:])


def test_one_clause_per_line_where_it_fits() -> None:
    assert build().decode().split("\r\n") == [
        "Received: from client.example (host.example.net [192.0.2.10])",
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))",
        "\tby mail.example.com with ESMTPSA id Q1234ABCD",
        "\tfor <bob@example.com> tls TLS_AES_256_GCM_SHA384;",
        "\tTue, 05 Mar 2024 14:07:09 +0100",
        "",
    ]


def test_short_clauses_share_a_line() -> None:
    field = build(tls=None, recipient=None, peer_host=None, helo="c.example", queue_id="Q1")
    assert field == (
        b"Received: from c.example (unknown [192.0.2.10])\r\n"
        b"\tby mail.example.com with ESMTPA id Q1; Tue, 05 Mar 2024 14:07:09 +0100\r\n"
    )


def test_a_clause_longer_than_a_line_is_folded_between_words() -> None:
    long_host = ".".join(["a" * 60] * 4)  # 243 characters
    field = build(by_host=long_host)
    assert_single_field(field)
    assert f"by {long_host} with ESMTPSA id Q1234ABCD" in unfold(field)
    lines = field[:-2].split(b"\r\n")
    # The over-long word gets a line of its own (longer than 78, within 998); the rest
    # of its clause continues on the next line.
    by_line = lines.index(b"\tby " + long_host.encode())
    assert lines[by_line + 1].startswith(b"\twith ESMTPSA id Q1234ABCD")


def test_clause_keyword_and_value_stay_together() -> None:
    lines = build(by_host=".".join(["b" * 50] * 2))[:-2].decode().split("\r\n")
    for line in lines:
        for kw in ("by", "with", "id", "for", "tls"):
            assert not line.rstrip().endswith(f" {kw}")


@settings(max_examples=200, deadline=None)
@given(
    helo=st.text(max_size=300),
    peer_host=st.none() | st.text(max_size=300),
    recipient=st.none() | st.text(max_size=400),
    tls=st.none() | st.text(max_size=300),
    protocol=st.sampled_from(["SMTP", "ESMTP", "UTF8SMTP", "LMTP"]),
    authenticated=st.booleans(),
)
def test_any_client_text_gives_one_well_formed_field(
    helo: str,
    peer_host: str | None,
    recipient: str | None,
    tls: str | None,
    protocol: str,
    authenticated: bool,
) -> None:
    field = build(
        helo=helo,
        peer_host=peer_host,
        recipient=recipient,
        tls=tls,
        protocol=protocol,
        authenticated=authenticated,
    )
    assert_single_field(field)
    text = unfold(field)
    assert text.endswith("; Tue, 05 Mar 2024 14:07:09 +0100")
    assert text.count(" by mail.example.com ") == 1
    # Parentheses balance: no value escaped its comment.
    depth = 0
    for c in text.split(" for <")[0]:
        depth += {"(": 1, ")": -1}.get(c, 0)
        assert depth >= 0
    assert depth == 0
    if not protocol.startswith("UTF8"):
        assert field.isascii()
