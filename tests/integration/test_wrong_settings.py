"""The nine wrong security settings a mail program can have, tried with clients nobody here
wrote: each ends within seconds, in a working secure session or in an error the client
shows that names the port and mode to use.

The nine: SSL/TLS on 587, 143 or 110 (recognised by its ClientHello and served as on
465/993/995); STARTTLS or no security on 465, 993 or 995 (a plaintext line naming the
setting, after ``[security] implicit_tls_hint_timeout``); no security with a login on
587, 143 or 110 (the refusal names the implicit-TLS port).

Two clients decide by themselves, before sending anything, that they cannot log in: on
587 neither smtplib's ``login()`` nor swaks ``--auth`` tries AUTH, and curl does not try
IMAP LOGIN or POP3 USER, because AUTH/USER is not offered and IMAP says LOGINDISABLED
before TLS (RFC 4954 §4, RFC 2595). No server reply can reach those messages without
offering a login in plaintext, which we never do; they end at once, and sending mail
through such a session gets the 530 naming port 465.

The cases of one client run at the same time against one server, each bounded, so a case
that hangs shows up as a case over the limit, not as a stuck test run.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import PASSWORDS, Instance, have, wait_for

HOST = "127.0.0.1"
USER = "alice@example.test"
PASSWORD = PASSWORDS[USER]
#: Every case must end within this many seconds (the issue's bound).
LIMIT = 7.0
#: Socket timeout of the clients: above LIMIT, so a hang is measured, not cut short.
CLIENT_TIMEOUT = LIMIT + 3
MESSAGE = (b"From: alice@example.test\r\nTo: bob@example.test\r\n"
           b"Subject: wrong settings\r\n\r\nhi\r\n")


@dataclass
class Outcome:
    secure: bool  # a TLS session in which the login worked
    shown: str  # what the client showed: the exception's text, or the tool's output
    elapsed: float = 0.0


#: What a case must end in: a secure session, an error naming "port N", or (see the
#: module docstring) the client's own refusal, shown as the given text.
Secure = object()


@dataclass(frozen=True)
class Names:
    port: int


@dataclass(frozen=True)
class ClientRefuses:
    text: str


Expect = object | Names | ClientRefuses


def run_cases(cases: dict[str, tuple[Callable[[], Outcome], Expect]]) -> None:
    """Run every case at once; fail with one line per case that went wrong."""

    def timed(fn: Callable[[], Outcome]) -> Outcome:
        start = time.monotonic()
        try:
            outcome = fn()
        except Exception as exc:  # the client's error is the outcome we judge
            outcome = Outcome(False, f"{type(exc).__name__}: {exc}")
        outcome.elapsed = time.monotonic() - start
        return outcome

    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(timed, fn) for name, (fn, _) in cases.items()}
        outcomes = {name: f.result(timeout=CLIENT_TIMEOUT + 20) for name, f in futures.items()}
    problems = []
    for name, (_, expect) in cases.items():
        got = outcomes[name]
        if got.elapsed >= LIMIT:
            problems.append(f"{name}: took {got.elapsed:.1f} s: {got.shown}")
        elif expect is Secure and not got.secure:
            problems.append(f"{name}: no secure session: {got.shown}")
        elif isinstance(expect, Names) and (
            got.secure or f"port {expect.port}" not in got.shown or "SSL/TLS" not in got.shown
        ):
            problems.append(f"{name}: the error does not name SSL/TLS on port {expect.port}: "
                            f"{got.shown}")
        elif isinstance(expect, ClientRefuses) and (got.secure or expect.text not in got.shown):
            problems.append(f"{name}: expected the client's own refusal: {got.shown}")
    assert not problems, "\n".join(problems)


def ports(server: Instance) -> tuple[int, int, int, int, int, int]:
    p = server.ports
    return (p["submission"], p["submissions"], p["imap"], p["imaps"], p["pop3"], p["pop3s"])


def ctx_for(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


# -- Python's own clients ------------------------------------------------------------------

def test_nine_wrong_settings_with_smtplib_imaplib_poplib(server: Instance, ca_file: Path) -> None:
    p587, p465, p143, p993, p110, p995 = ports(server)
    ctx = ctx_for(ca_file)

    def smtp_ssl_on_587() -> Outcome:
        with smtplib.SMTP_SSL(HOST, p587, context=ctx, timeout=CLIENT_TIMEOUT) as s:
            s.ehlo()
            assert not s.has_extn("starttls"), "STARTTLS offered inside TLS"
            s.login(USER, PASSWORD)
            s.sendmail(USER, ["bob@example.test"], MESSAGE)
            return Outcome(isinstance(s.sock, ssl.SSLSocket), "sent")

    def smtp_on_465(starttls: bool) -> Callable[[], Outcome]:
        def case() -> Outcome:
            with smtplib.SMTP(HOST, p465, timeout=CLIENT_TIMEOUT) as s:
                if starttls:
                    s.starttls(context=ctx)
                s.login(USER, PASSWORD)
                return Outcome(False, "logged in without TLS?")
        return case

    def smtp_login_on_587() -> Outcome:
        with smtplib.SMTP(HOST, p587, timeout=CLIENT_TIMEOUT) as s:
            s.login(USER, PASSWORD)
            return Outcome(False, "logged in without TLS?")

    def smtp_send_on_587() -> Outcome:
        with smtplib.SMTP(HOST, p587, timeout=CLIENT_TIMEOUT) as s:
            s.sendmail(USER, ["bob@example.test"], MESSAGE)
            return Outcome(False, "sent without TLS?")

    def imap_ssl_on_143() -> Outcome:
        m = imaplib.IMAP4_SSL(HOST, p143, ssl_context=ctx, timeout=CLIENT_TIMEOUT)
        try:
            assert "STARTTLS" not in m.capabilities, "STARTTLS offered inside TLS"
            m.login(USER, PASSWORD)
            typ, _ = m.select("INBOX")
            return Outcome(typ == "OK" and isinstance(m.sock, ssl.SSLSocket), typ)
        finally:
            m.logout()

    def imap_on_993(starttls: bool) -> Callable[[], Outcome]:
        def case() -> Outcome:
            m = imaplib.IMAP4(HOST, p993, timeout=CLIENT_TIMEOUT)
            if starttls:
                m.starttls(ssl_context=ctx)
            m.login(USER, PASSWORD)
            return Outcome(False, "logged in without TLS?")
        return case

    def imap_login_on_143() -> Outcome:
        m = imaplib.IMAP4(HOST, p143, timeout=CLIENT_TIMEOUT)
        try:
            m.login(USER, PASSWORD)
            return Outcome(False, "logged in without TLS?")
        finally:
            m.shutdown()

    def pop_ssl_on_110() -> Outcome:
        p = poplib.POP3_SSL(HOST, p110, context=ctx, timeout=CLIENT_TIMEOUT)
        try:
            p.user(USER)
            p.pass_(PASSWORD)
            p.stat()
            return Outcome(isinstance(p.sock, ssl.SSLSocket), "logged in")
        finally:
            p.quit()

    def pop_on_995(stls: bool) -> Callable[[], Outcome]:
        def case() -> Outcome:
            p = poplib.POP3(HOST, p995, timeout=CLIENT_TIMEOUT)
            if stls:
                p.stls(context=ctx)
            p.user(USER)
            p.pass_(PASSWORD)
            return Outcome(False, "logged in without TLS?")
        return case

    def pop_login_on_110() -> Outcome:
        p = poplib.POP3(HOST, p110, timeout=CLIENT_TIMEOUT)
        try:
            p.user(USER)
            p.pass_(PASSWORD)
            return Outcome(False, "logged in without TLS?")
        finally:
            p.close()

    run_cases({
        "smtplib SSL/TLS on 587": (smtp_ssl_on_587, Secure),
        "smtplib STARTTLS on 465": (smtp_on_465(True), Names(p465)),
        "smtplib no security on 465": (smtp_on_465(False), Names(p465)),
        "smtplib no security, login on 587": (
            smtp_login_on_587, ClientRefuses("SMTP AUTH extension not supported by server")),
        "smtplib no security, sending on 587": (smtp_send_on_587, Names(p465)),
        "imaplib SSL/TLS on 143": (imap_ssl_on_143, Secure),
        "imaplib STARTTLS on 993": (imap_on_993(True), Names(p993)),
        "imaplib no security on 993": (imap_on_993(False), Names(p993)),
        "imaplib no security, login on 143": (imap_login_on_143, Names(p993)),
        "poplib SSL/TLS on 110": (pop_ssl_on_110, Secure),
        "poplib STLS on 995": (pop_on_995(True), Names(p995)),
        "poplib no security on 995": (pop_on_995(False), Names(p995)),
        "poplib no security, login on 110": (pop_login_on_110, Names(p995)),
    })
    assert len(server.inbox("bob@example.test")) == 1  # only the message sent over TLS


def test_refusals_before_tls_carry_the_response_codes(server: Instance) -> None:
    p587, p465, p143, p993, p110, p995 = ports(server)
    with smtplib.SMTP(HOST, p587, timeout=CLIENT_TIMEOUT) as s:
        s.ehlo()
        code, text = s.docmd("AUTH", "LOGIN")  # a client that does not read EHLO
        assert (code, text) == (530, f"5.7.0 Must issue a STARTTLS command first, or use "
                                     f"port {p465} with SSL/TLS".encode())
    m = imaplib.IMAP4(HOST, p143, timeout=CLIENT_TIMEOUT)
    with pytest.raises(imaplib.IMAP4.error, match=rf"\[PRIVACYREQUIRED\].*port {p993}"):
        m.authenticate("PLAIN", lambda _: b"")
    m.shutdown()
    p = poplib.POP3(HOST, p110, timeout=CLIENT_TIMEOUT)
    with pytest.raises(poplib.error_proto, match=rf"-ERR \[AUTH\] .*port {p995}"):
        p.user(USER)
    p.close()


# -- curl ------------------------------------------------------------------------------------

@pytest.mark.skipif(not have("curl"), reason="curl is not installed")
def test_nine_wrong_settings_with_curl(server: Instance, ca_file: Path, tmp_path: Path) -> None:
    """curl shows the server's line with ``-v`` (without it: only the reply code)."""
    p587, p465, p143, p993, p110, p995 = ports(server)
    mail = tmp_path / "mail.txt"
    mail.write_bytes(MESSAGE)
    send = ["--mail-from", USER, "--mail-rcpt", "bob@example.test", "--upload-file", str(mail)]

    def curl(url: str, *args: str) -> Callable[[], Outcome]:
        def case() -> Outcome:
            result = subprocess.run(
                ["curl", "-v", "-sS", "--cacert", str(ca_file), "--max-time",
                 str(CLIENT_TIMEOUT), "--user", f"{USER}:{PASSWORD}", url, *args],
                capture_output=True, text=True, timeout=CLIENT_TIMEOUT + 5,
            )
            secure = result.returncode == 0 and url.split(":")[0] in ("smtps", "imaps", "pop3s")
            shown = result.stderr + result.stdout
            if not secure:
                # A client with no security must not have sent the password (in any form).
                assert "LOGIN" not in "\n".join(
                    ln for ln in shown.splitlines() if ln.startswith(">")
                ) and "> PASS" not in shown and "> AUTH" not in shown, shown
            return Outcome(secure, f"rc={result.returncode} {shown}")
        return case

    no_mechanism = ClientRefuses("No known authentication mechanisms supported")
    run_cases({
        "curl SSL/TLS on 587": (curl(f"smtps://{HOST}:{p587}", *send), Secure),
        "curl STARTTLS on 465": (curl(f"smtp://{HOST}:{p465}", "--ssl-reqd", *send),
                                 Names(p465)),
        "curl no security on 465": (curl(f"smtp://{HOST}:{p465}", *send), Names(p465)),
        "curl no security, login on 587": (curl(f"smtp://{HOST}:{p587}", *send), Names(p465)),
        "curl SSL/TLS on 143": (curl(f"imaps://{HOST}:{p143}/INBOX"), Secure),
        "curl STARTTLS on 993": (curl(f"imap://{HOST}:{p993}/INBOX", "--ssl-reqd"),
                                 Names(p993)),
        "curl no security on 993": (curl(f"imap://{HOST}:{p993}/INBOX"), Names(p993)),
        "curl no security, login on 143": (curl(f"imap://{HOST}:{p143}/INBOX"), no_mechanism),
        "curl SSL/TLS on 110": (curl(f"pop3s://{HOST}:{p110}/"), Secure),
        "curl STLS on 995": (curl(f"pop3://{HOST}:{p995}/", "--ssl-reqd"), Names(p995)),
        "curl no security on 995": (curl(f"pop3://{HOST}:{p995}/"), Names(p995)),
        "curl no security, login on 110": (curl(f"pop3://{HOST}:{p110}/"), no_mechanism),
    })
    assert len(server.inbox("bob@example.test")) == 1


# -- swaks -----------------------------------------------------------------------------------

@cache
def swaks_available() -> str:
    """"" if swaks can run; otherwise why not. As root, try Debian's package once."""
    if have("swaks"):
        return ""
    if os.geteuid() != 0 or not have("apt-get"):
        return "swaks is not installed (and we are not root to apt-get it)"
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "swaks"],
            capture_output=True, timeout=120, check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get install swaks failed: {exc}"
    return "" if shutil.which("swaks") else "apt-get could not install swaks"


def test_wrong_smtp_settings_with_swaks(server: Instance, ca_file: Path) -> None:
    why = swaks_available()
    if why:
        pytest.skip(why)
    p587, p465, *_ = ports(server)
    base = ["--server", HOST, "--from", USER, "--to", "bob@example.test",
            "--timeout", str(int(CLIENT_TIMEOUT)), "--tls-ca-path", str(ca_file)]
    auth = ["--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD]

    def swaks(*args: str) -> Callable[[], Outcome]:
        def case() -> Outcome:
            result = subprocess.run(["swaks", *base, *args], capture_output=True, text=True,
                                    timeout=CLIENT_TIMEOUT + 5)
            shown = result.stdout + result.stderr
            secure = result.returncode == 0 and "TLS started" in shown
            return Outcome(secure, f"rc={result.returncode} {shown}")
        return case

    run_cases({
        "swaks SSL/TLS on 587": (swaks("--port", str(p587), "--tlsc", *auth), Secure),
        "swaks STARTTLS on 465": (swaks("--port", str(p465), "--tls", *auth), Names(p465)),
        "swaks no security on 465": (swaks("--port", str(p465), *auth), Names(p465)),
        "swaks no security, login on 587": (
            swaks("--port", str(p587), *auth),
            ClientRefuses("Host did not advertise authentication")),
        "swaks no security, sending on 587": (swaks("--port", str(p587)), Names(p465)),
    })


# -- the sniff itself ------------------------------------------------------------------------

def greeting_after(port: int, ctx: ssl.SSLContext | None = None) -> tuple[float, bytes]:
    start = time.monotonic()
    with socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT) as sock:
        line = sock.recv(4096)
    return time.monotonic() - start, line


def test_a_silent_client_is_greeted_after_tls_sniff_ms_and_starttls_works(
    make_instance: Callable[..., Instance], ca_file: Path
) -> None:
    server = make_instance(extra="[security]\ntls_sniff_ms = 1000\n")
    p587, _, p143, _, p110, _ = ports(server)
    for port, greeting in ((p587, b"220 "), (p143, b"* OK "), (p110, b"+OK ")):
        waited, line = greeting_after(port)
        assert line.startswith(greeting)
        assert 0.9 <= waited < 2.5, (port, waited)
    waited, line = greeting_after(server.ports["smtp"])  # port 25 never waits
    assert line.startswith(b"220 ") and waited < 0.5
    with smtplib.SMTP(HOST, p587, timeout=CLIENT_TIMEOUT) as s:
        s.starttls(context=ctx_for(ca_file))
        s.login(USER, PASSWORD)


def test_tls_sniff_ms_0_greets_at_once_and_ssl_on_587_fails_as_before(
    make_instance: Callable[..., Instance], ca_file: Path
) -> None:
    server = make_instance(extra="[security]\ntls_sniff_ms = 0\n")
    p587, _, p143, _, p110, _ = ports(server)
    for port in (p587, p143, p110):
        waited, _ = greeting_after(port)
        assert waited < 0.5, (port, waited)
    start = time.monotonic()
    with pytest.raises(ssl.SSLError):
        smtplib.SMTP_SSL(HOST, p587, context=ctx_for(ca_file), timeout=CLIENT_TIMEOUT)
    assert time.monotonic() - start < LIMIT
    assert first_bytes(server) == {}  # nothing was sniffed on 587/143/110


@pytest.mark.parametrize(
    ("service", "command", "error"),
    [
        ("submission", b"EHLO early.test\r\n", b"554 5.5.1 Protocol error: command sent "
                                               b"before the greeting\r\n"),
        ("imap", b"a LOGIN alice@example.test secret\r\n", b"* BYE Protocol error: command "
                                                           b"sent before the greeting\r\n"),
        ("pop3", b"USER alice@example.test\r\n", b"-ERR Protocol error: command sent "
                                                 b"before the greeting\r\n"),
    ],
)
def test_a_command_before_the_greeting_gets_the_protocol_error(
    server: Instance, service: str, command: bytes, error: bytes
) -> None:
    with socket.create_connection((HOST, server.ports[service]), timeout=CLIENT_TIMEOUT) as s:
        s.sendall(command)
        received = b""
        while chunk := s.recv(4096):
            received += chunk
    assert received == error  # no greeting, no answer to the command, then closed
    assert wait_for(lambda: first_bytes(server).get((service, "plaintext")) == 1)


def test_outcomes_and_plaintext_refusals_are_counted(server: Instance, ca_file: Path) -> None:
    p587, _, p143, _, p110, _ = ports(server)
    ctx = ctx_for(ca_file)
    with smtplib.SMTP_SSL(HOST, p587, context=ctx, timeout=CLIENT_TIMEOUT) as s:
        s.login(USER, PASSWORD)
    with smtplib.SMTP(HOST, p587, timeout=CLIENT_TIMEOUT) as s:  # silent, then STARTTLS
        s.starttls(context=ctx)
    with smtplib.SMTP(HOST, p587, timeout=CLIENT_TIMEOUT) as s:  # MAIL, RCPT, DATA refused
        with pytest.raises(smtplib.SMTPSenderRefused):
            s.sendmail(USER, ["bob@example.test"], MESSAGE)
        s.docmd("AUTH", "LOGIN")
    p = poplib.POP3(HOST, p110, timeout=CLIENT_TIMEOUT)
    for attempt in (lambda: p.user(USER), lambda: p.pass_(PASSWORD)):
        with pytest.raises(poplib.error_proto):
            attempt()
    p.quit()
    m = imaplib.IMAP4(HOST, p143, timeout=CLIENT_TIMEOUT)
    with pytest.raises(imaplib.IMAP4.error):
        m.login(USER, PASSWORD)
    m.logout()

    def counted() -> bool:
        s = samples(server)
        return (
            first_bytes(server) == {("submission", "tls"): 1, ("submission", "silent"): 2,
                                    ("pop3", "silent"): 1, ("imap", "silent"): 1}
            and s[("postkeep_plaintext_logins_refused_total", "submission")] == 1
            and s[("postkeep_plaintext_logins_refused_total", "imap")] == 1
            and s[("postkeep_plaintext_logins_refused_total", "pop3")] == 1
            # The sniffed TLS connection counts as TLS from its start, not as STARTTLS.
            and s[("postkeep_starttls_upgrades_total", "submission")] == 1
            and s[("postkeep_connections_total", "submission")] == 3
        )

    assert wait_for(counted), (first_bytes(server), samples(server))


def samples(server: Instance) -> dict[tuple[str, str], float]:
    """(metric, service) → value, summed over the other labels."""
    assert server.app is not None
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(server.app.metrics.render().decode()):
        for s in family.samples:
            service = s.labels.get("service")
            if service is not None and not s.name.endswith("_created"):
                key = (s.name, service)
                out[key] = out.get(key, 0.0) + s.value
    return out


def first_bytes(server: Instance) -> dict[tuple[str, str], float]:
    assert server.app is not None
    out = {}
    for family in text_string_to_metric_families(server.app.metrics.render().decode()):
        for s in family.samples:
            if s.name == "postkeep_first_bytes_total" and s.value:
                out[(s.labels["service"], s.labels["outcome"])] = s.value
    return out
