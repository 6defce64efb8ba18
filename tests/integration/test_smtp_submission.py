"""Submission on 587 (STARTTLS required) and 465 (implicit TLS), with smtplib over real TLS."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time

import pytest
from server_harness import PASSWORDS, Instance

MESSAGE = (
    b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: hello\r\n\r\n"
    b"Hi Bob,\r\n.leading dot\r\nbye\r\n"
)


def smtp_587(server: Instance) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10)


def test_auth_not_advertised_before_starttls(server: Instance) -> None:
    with smtp_587(server) as s:
        code, _ = s.ehlo("client.test")
        assert code == 250
        assert s.has_extn("starttls")
        assert not s.has_extn("auth")


def test_auth_refused_before_starttls_names_the_right_setting(server: Instance) -> None:
    with smtp_587(server) as s:
        s.ehlo("client.test")
        code, text = s.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=")
        assert code == 530
        assert b"5.7.0" in text and b"STARTTLS" in text
        assert f"port {server.ports['submissions']}".encode() in text


def test_mail_refused_before_starttls(server: Instance) -> None:
    with smtp_587(server) as s:
        s.ehlo("client.test")
        code, text = s.docmd("MAIL", "FROM:<alice@example.test>")
        assert code == 530 and b"5.7.0" in text


def test_capabilities_resent_after_starttls(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    with smtp_587(server) as s:
        s.starttls(context=tls_ctx)
        code, _ = s.ehlo("client.test")
        assert code == 250
        assert not s.has_extn("starttls")
        assert "PLAIN" in s.esmtp_features["auth"].upper()
        for ext in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8",
                    "chunking"):
            assert s.has_extn(ext), ext


def test_mail_refused_without_auth_after_tls(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    with smtp_587(server) as s:
        s.starttls(context=tls_ctx)
        s.ehlo("client.test")
        code, text = s.docmd("MAIL", "FROM:<alice@example.test>")
        assert code == 530 and b"5.7.0" in text


def test_submit_on_587_delivers_locally_with_trace(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    with smtp_587(server) as s:
        s.starttls(context=tls_ctx)
        s.login("alice@example.test", PASSWORDS["alice@example.test"])
        refused = s.sendmail("alice@example.test", ["bob@example.test"], MESSAGE)
        assert refused == {}
    [(row, data)] = server.inbox("bob@example.test")
    assert data.endswith(MESSAGE.replace(b"\r\nSubject", b"\r\nSubject"))
    header = data[: data.index(b"\r\n\r\n")]
    assert header.startswith(b"Received: ")
    assert b"ESMTPSA" in header
    assert b"TLSv1.3" in header or b"TLSv1.2" in header
    assert b"Message-ID: <" in header and b"Date: " in header
    assert PASSWORDS["alice@example.test"].encode() not in data
    assert row.size == len(data)


def test_submit_on_465_implicit_tls(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.ehlo("client.test")
        assert not s.has_extn("starttls")
        s.login("alice@example.test", PASSWORDS["alice@example.test"])
        s.sendmail("alice@example.test", ["bob@example.test"], MESSAGE)
    assert len(server.inbox("bob@example.test")) == 1


def test_auth_login_mechanism(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.ehlo("client.test")
        s.user, s.password = "bob@example.test", PASSWORDS["bob@example.test"]
        code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert code == 235


def test_wrong_password_refused(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            s.login("alice@example.test", "wrong")
        assert err.value.smtp_code == 535
        # The same answer for an account that does not exist: nothing is revealed.
        with pytest.raises(smtplib.SMTPAuthenticationError) as err2:
            s.login("nobody@example.test", "wrong")
        assert err2.value.smtp_code == 535
        assert err.value.smtp_error == err2.value.smtp_error


def test_repeated_failures_are_throttled(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    codes = []
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_ctx,
                          timeout=60) as s:
        s.ehlo("client.test")
        for _ in range(12):
            code, _ = s.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==")
            codes.append(code)
            if code == 454 or code == 421:
                break
    assert 454 in codes, codes
    # Even the right password is refused while the lockout lasts.
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_ctx,
                          timeout=60) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            s.login("alice@example.test", PASSWORDS["alice@example.test"])
        assert err.value.smtp_code == 454


def test_sender_mismatch_refused(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.login("alice@example.test", PASSWORDS["alice@example.test"])
        code, text = s.mail("bob@example.test")
        assert code == 553 and b"5.7.1" in text
        code, _ = s.mail("ceo@elsewhere.test")
        assert code == 553


def test_sender_alias_allowed(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    server.add_alias("sales@example.test", "alice@example.test")
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.login("alice@example.test", PASSWORDS["alice@example.test"])
        code, _ = s.mail("sales@example.test")
        assert code == 250


def test_remote_recipient_goes_to_outbound_queue(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.login("alice@example.test", PASSWORDS["alice@example.test"])
        s.sendmail("alice@example.test", ["friend@remote.test", "bob@example.test"], MESSAGE)
    [(row, data)] = server.outbound()
    assert row.sender == "alice@example.test"
    assert list(row.recipients) == ["friend@remote.test"]
    assert data.endswith(MESSAGE)
    assert len(server.inbox("bob@example.test")) == 1


def test_unknown_local_recipient_refused_on_submission(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.login("alice@example.test", PASSWORDS["alice@example.test"])
        s.mail("alice@example.test")
        code, text = s.rcpt("nobody@example.test")
        assert code == 550 and b"5.1.1" in text


def test_plaintext_client_on_465_gets_the_setting_to_use(server: Instance) -> None:
    port = server.ports["submissions"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"EHLO client.test\r\n")
        line = sock.makefile("rb").readline()
    assert line.startswith(b"554 5.7.0 Port %d expects SSL/TLS" % port)
    assert b"STARTTLS on port %d" % server.ports["submission"] in line


def test_silent_client_on_465_gets_the_hint_after_5s(server: Instance) -> None:
    port = server.ports["submissions"]
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        line = sock.makefile("rb").readline()
        rest = sock.recv(100)
    elapsed = time.monotonic() - start
    assert line.startswith(b"554 5.7.0 Port %d expects SSL/TLS" % port)
    assert rest == b""  # and the connection is closed
    assert 4.0 < elapsed < 9.0


def test_smtplib_plain_client_on_465_sees_the_hint(server: Instance) -> None:
    # A mail program set to "no security" on 465: smtplib.SMTP shows the server's text.
    with pytest.raises(smtplib.SMTPConnectError) as err:
        smtplib.SMTP("127.0.0.1", server.ports["submissions"], timeout=10)
    assert b"expects SSL/TLS" in err.value.smtp_error


def test_bdat_chunking_submission(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.login("alice@example.test", PASSWORDS["alice@example.test"])
        s.mail("alice@example.test")
        s.rcpt("bob@example.test")
        first, second = MESSAGE[:20], MESSAGE[20:]
        s.send(b"BDAT %d\r\n" % len(first) + first)
        code, _ = s.getreply()
        assert code == 250
        s.send(b"BDAT %d LAST\r\n" % len(second) + second)
        code, text = s.getreply()
        assert code == 250 and b"queued" in text.lower()
    [(_, data)] = server.inbox("bob@example.test")
    assert data.endswith(MESSAGE)
