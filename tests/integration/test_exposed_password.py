"""A password sent before TLS (refused as always) marks the account exposed when it was
right, tells its owner once, and the ``[security] exposed_password`` policy is enforced —
with imaplib on 143 (LOGIN before STARTTLS), poplib on 110 (USER/PASS without STLS) and
raw SMTP on 587 (AUTH PLAIN with an initial response before STARTTLS)."""

from __future__ import annotations

import base64
import imaplib
import poplib
import smtplib
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from server_harness import PASSWORDS, Instance, run_postkeep, wait_for

from postkeep.store.api import Exposure

HOST = "127.0.0.1"
USER = "alice@example.test"
PASSWORD = PASSWORDS[USER]
WRONG = "not-alices-password"
PROTOCOLS = ("smtp", "imap", "pop3")
SERVICE = {"smtp": "submission", "imap": "imap", "pop3": "pop3"}


# -- clients -------------------------------------------------------------------------------
def _smtp_leak(port: int, password: str) -> str:
    """EHLO, then AUTH PLAIN <initial response> before STARTTLS; the refusal line."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        f = sock.makefile("rb")

        def reply() -> str:
            while True:
                line = f.readline().decode()
                if line[3:4] != "-":
                    return line.strip()

        reply()
        sock.sendall(b"EHLO client.test\r\n")
        reply()
        token = base64.b64encode(f"\0{USER}\0{password}".encode()).decode()
        sock.sendall(f"AUTH PLAIN {token}\r\n".encode())
        refusal = reply()
        sock.sendall(b"NOOP\r\n")  # answered once the check is done
        assert reply().startswith("250")
        sock.sendall(b"QUIT\r\n")
        reply()
    return refusal


def _imap_leak(port: int, password: str) -> str:
    m = imaplib.IMAP4(HOST, port, timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error) as err:
            m.login(USER, password)  # the password travels quoted on the line
        m.noop()
    finally:
        m.logout()
    return str(err.value)


def _pop3_leak(port: int, password: str) -> str:
    p = poplib.POP3(HOST, port, timeout=10)
    try:
        with pytest.raises(poplib.error_proto) as user_err:
            p.user(USER)
        with pytest.raises(poplib.error_proto) as pass_err:
            p.pass_(password)
        assert str(user_err.value) == str(pass_err.value)  # USER says nothing of the name
    finally:
        p.quit()
    return str(pass_err.value)


def leak(inst: Instance, proto: str, password: str) -> str:
    port = inst.ports[SERVICE[proto]]
    return {"smtp": _smtp_leak, "imap": _imap_leak, "pop3": _pop3_leak}[proto](port, password)


def tls_login(inst: Instance, proto: str, ctx: ssl.SSLContext, password: str) -> str:
    """Log in over implicit TLS; "ok" or the error the client shows."""
    try:
        if proto == "smtp":
            with smtplib.SMTP_SSL(HOST, inst.ports["submissions"], context=ctx,
                                  timeout=10) as s:
                s.login(USER, password)
        elif proto == "imap":
            m = imaplib.IMAP4_SSL(HOST, inst.ports["imaps"], ssl_context=ctx, timeout=10)
            try:
                m.login(USER, password)
            finally:
                m.logout()
        else:
            p = poplib.POP3_SSL(HOST, inst.ports["pop3s"], context=ctx, timeout=10)
            try:
                p.user(USER)
                p.pass_(password)
            finally:
                p.quit()
    except (smtplib.SMTPException, imaplib.IMAP4.error, poplib.error_proto) as exc:
        return str(exc)
    return "ok"


# -- store and CLI -------------------------------------------------------------------------
def exposures(inst: Instance) -> list[Exposure]:
    async def run() -> list[Exposure]:
        async with inst.store.read() as tx:
            return await tx.exposures(USER)

    return inst.call(run)


def notices(inst: Instance) -> list[bytes]:
    return [raw for _, raw in inst.inbox(USER) if b"sent unencrypted" in raw]


def cli(inst: Instance, *args: str, stdin: str | None = None) -> str:
    proc = run_postkeep("user", *args, "--config", str(inst.config_path), stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def policy(make_instance: Callable[..., Instance], name: str) -> Instance:
    return make_instance(extra=f'[security]\nexposed_password = "{name}"\n')


# -- tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("proto", PROTOCOLS)
def test_right_password_in_plaintext_marks_the_account_and_tells_once(
    server: Instance, proto: str, tls_ctx: ssl.SSLContext
) -> None:
    wrong = leak(server, proto, WRONG)
    right = leak(server, proto, PASSWORD)
    assert right == wrong  # refused exactly like a wrong password: nothing revealed
    assert wait_for(lambda: len(exposures(server)) == 1)
    (e,) = exposures(server)
    assert (e.peer, e.service) == (HOST, SERVICE[proto])
    assert wait_for(lambda: len(notices(server)) == 1)
    assert leak(server, proto, PASSWORD) == wrong  # the same client again
    assert len(exposures(server)) == 1 and len(notices(server)) == 1  # no flood
    notice = notices(server)[0].decode()
    implicit = {"smtp": "submissions", "imap": "imaps", "pop3": "pop3s"}[proto]
    assert f"Port:                {server.ports[implicit]}" in notice
    assert "SSL/TLS" in notice and HOST in notice and "\"None\"" in notice
    assert PASSWORD not in notice
    listed = cli(server, "list")
    assert f"{USER}  exposed " in listed and f"from {HOST} ({SERVICE[proto]})" in listed
    assert "\nbob@example.test\n" in f"\n{listed}"  # others unmarked
    assert tls_login(server, proto, tls_ctx, PASSWORD) == "ok"  # warn: logins still work


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_wrong_password_in_plaintext_marks_nothing_and_tells_nothing(
    server: Instance, proto: str
) -> None:
    first = leak(server, proto, WRONG)
    assert leak(server, proto, WRONG + "2") == first
    assert exposures(server) == [] and notices(server) == []
    assert "exposed" not in cli(server, "list")


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_require_change_refuses_logins_until_a_new_password(
    make_instance: Callable[..., Instance], proto: str, tls_ctx: ssl.SSLContext
) -> None:
    inst = policy(make_instance, "require_change")
    assert leak(inst, proto, WRONG) == leak(inst, proto, PASSWORD)
    assert wait_for(lambda: len(notices(inst)) == 1)
    assert "Until your password is changed" in notices(inst)[0].decode()
    shown = tls_login(inst, proto, tls_ctx, PASSWORD)
    assert "must be changed" in shown, shown
    assert tls_login(inst, proto, tls_ctx, WRONG) != shown  # only the owner learns it
    cli(inst, "passwd", USER, "--password-stdin", stdin="a-brand-new-password\n")
    assert "exposed" not in cli(inst, "list")
    assert tls_login(inst, proto, tls_ctx, "a-brand-new-password") == "ok"


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_lock_refuses_logins_until_unlocked(
    make_instance: Callable[..., Instance], proto: str, tls_ctx: ssl.SSLContext
) -> None:
    inst = policy(make_instance, "lock")
    assert leak(inst, proto, WRONG) == leak(inst, proto, PASSWORD)
    assert wait_for(lambda: len(exposures(inst)) == 1)
    shown = tls_login(inst, proto, tls_ctx, PASSWORD)
    assert "locked" in shown, shown
    assert "Your account is locked" not in tls_login(inst, proto, tls_ctx, WRONG)
    assert "unlocked" in cli(inst, "unlock", USER)
    assert "exposed" not in cli(inst, "list")
    assert tls_login(inst, proto, tls_ctx, PASSWORD) == "ok"


def test_the_replies_name_the_policy_in_each_protocol(
    make_instance: Callable[..., Instance], tls_ctx: ssl.SSLContext
) -> None:
    inst = policy(make_instance, "lock")
    leak(inst, "imap", PASSWORD)
    assert wait_for(lambda: len(exposures(inst)) == 1)
    shown: dict[str, Any] = {p: tls_login(inst, p, tls_ctx, PASSWORD) for p in PROTOCOLS}
    assert "525" in shown["smtp"] and "5.7.13" in shown["smtp"]  # RFC 5248
    assert "[CONTACTADMIN]" in shown["imap"]  # RFC 5530
    assert "[AUTH]" in shown["pop3"]  # RFC 3206
