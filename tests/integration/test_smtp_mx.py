"""Port 25: receiving mail from other servers."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable

from server_harness import Instance

MESSAGE = b"From: someone@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nbody\r\n"


def mx(server: Instance) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10)


def test_mx_offers_starttls_and_no_auth(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    with mx(server) as s:
        s.ehlo("remote.test")
        assert s.has_extn("starttls")
        assert not s.has_extn("auth")
        s.starttls(context=tls_ctx)
        s.ehlo("remote.test")
        assert not s.has_extn("auth")
        assert not s.has_extn("starttls")
        code, text = s.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtcHc=")
        assert code == 503 and b"5.5.1" in text


def test_mx_delivers_plaintext_and_tls(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    with mx(server) as s:
        assert s.sendmail("someone@remote.test", ["alice@example.test"], MESSAGE) == {}
    with mx(server) as s:
        s.starttls(context=tls_ctx)
        assert s.sendmail("someone@remote.test", ["Alice@Example.TEST"], MESSAGE) == {}
    messages = server.inbox("alice@example.test")
    assert len(messages) == 2
    plain, secure = (data for _, data in messages)
    assert plain.endswith(MESSAGE) and secure.endswith(MESSAGE)
    assert b"with ESMTP " in plain and b"with ESMTPS " in secure
    assert b"Message-ID" not in plain  # only submission adds missing headers


def test_relay_refused_on_25(server: Instance) -> None:
    with mx(server) as s:
        s.ehlo("remote.test")
        s.mail("someone@remote.test")
        code, text = s.rcpt("victim@elsewhere.test")
        assert code == 554 and b"5.7.1" in text
        assert server.outbound() == []


def test_unknown_user_refused_at_rcpt(server: Instance) -> None:
    with mx(server) as s:
        s.ehlo("remote.test")
        s.mail("someone@remote.test")
        code, text = s.rcpt("nobody@example.test")
        assert code == 550 and b"5.1.1" in text
        code, _ = s.rcpt("alice@example.test")
        assert code == 250


def test_alias_one_to_many_and_catch_all(server: Instance) -> None:
    server.add_alias("team@example.test", "alice@example.test")
    server.add_alias("team@example.test", "bob@example.test")
    server.add_alias("@example.test", "bob@example.test")
    with mx(server) as s:
        s.sendmail("someone@remote.test", ["team@example.test"], MESSAGE)
        s.sendmail("someone@remote.test", ["anything@example.test"], MESSAGE)
        # Two aliases leading to the same account: one copy.
        s.sendmail("someone@remote.test", ["team@example.test", "bob@example.test"], MESSAGE)
    assert len(server.inbox("alice@example.test")) == 2
    assert len(server.inbox("bob@example.test")) == 3


def test_vrfy_does_not_probe_users(server: Instance) -> None:
    with mx(server) as s:
        s.ehlo("remote.test")
        real = s.verify("alice@example.test")
        fake = s.verify("nobody@example.test")
        assert real[0] == fake[0] == 252


def test_oversize_message_refused(make_instance: Callable[..., Instance]) -> None:
    inst = make_instance(extra="[limits]\nmessage_size = 2000\n")
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    with smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=10) as s:
        s.ehlo("remote.test")
        assert s.esmtp_features["size"] == "2000"
        s.mail("someone@remote.test")
        s.rcpt("alice@example.test")
        code, text = s.data(big * 40)
        assert code == 552 and b"5.3.4" in text
        # The session goes on: a normal message is accepted afterwards.
        assert s.sendmail("someone@remote.test", ["alice@example.test"], MESSAGE) == {}
        code, _ = s.mail("someone@remote.test", ["SIZE=999999"])
        assert code == 552
    [(_, data)] = inst.inbox("alice@example.test")
    assert data.endswith(MESSAGE)


def test_too_many_recipients(make_instance: Callable[..., Instance]) -> None:
    inst = make_instance(extra="[limits]\nrecipients = 3\n")
    with smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=10) as s:
        s.ehlo("remote.test")
        s.mail("someone@remote.test")
        codes = [s.rcpt("alice@example.test")[0] for _ in range(4)]
    assert codes[:3] == [250, 250, 250]
    assert codes[3] == 452


def test_account_deleted_between_rcpt_and_data_others_still_receive(server: Instance) -> None:
    with mx(server) as s:
        s.ehlo("remote.test")
        s.mail("someone@remote.test")
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250

        async def delete_alice() -> None:
            async with server.store.write() as tx:
                await tx.del_account("alice@example.test")

        server.call(delete_alice)
        code, _ = s.data(MESSAGE)
        assert code == 250
    [(_, data)] = server.inbox("bob@example.test")
    assert data.endswith(MESSAGE)
