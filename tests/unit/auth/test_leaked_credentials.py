"""The cores hand over credentials they refused before TLS (auth/exposure.py checks them),
without changing the refusal, and never show the password in a repr."""

from __future__ import annotations

import base64

from postkeep.imap.protocol import ImapServer, Rejected
from postkeep.imap.protocol import Limits as ImapLimits
from postkeep.pop3.protocol import Limits as Pop3Limits
from postkeep.pop3.protocol import Pop3Server
from postkeep.pop3.protocol import ProtocolError as Pop3Error
from postkeep.sasl.mechanisms import Credentials, plain_credentials
from postkeep.smtp.protocol import Hello, Role, SmtpServer
from postkeep.smtp.protocol import Limits as SmtpLimits
from postkeep.smtp.protocol import ProtocolError as SmtpError
from postkeep.smtp.replies import Reply

USER, PASSWORD = "alice@example.test", "s3cret pw"
PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()


def _smtp_refusal(line: str) -> SmtpError:
    core = SmtpServer(role=Role.SUBMISSION, limits=SmtpLimits(), hostname="mx.test",
                      tls_active=False, tls_offered=True, require_tls=True,
                      starttls_hint="STARTTLS first")
    core.greet()
    core.receive_data(f"EHLO c\r\n{line}\r\n".encode())
    assert isinstance(core.next_event(), Hello)
    core.send(Reply(250, None, ("mx.test",)))
    try:
        core.next_event()
    except SmtpError as exc:
        core.send(exc.hint)
        return exc
    raise AssertionError("not refused")


def test_smtp_auth_plain_before_tls_carries_the_credentials() -> None:
    exc = _smtp_refusal(f"AUTH PLAIN {PLAIN}")
    assert exc.hint.code == 530 and exc.leaked == Credentials(USER, USER, PASSWORD)
    assert PASSWORD not in repr(exc.leaked)
    plain = _smtp_refusal("AUTH PLAIN")
    assert plain.leaked is None and plain.hint == exc.hint  # same reply either way
    assert _smtp_refusal("AUTH LOGIN").leaked is None
    assert _smtp_refusal("AUTH PLAIN !!notbase64").leaked is None
    assert _smtp_refusal("MAIL FROM:<a@b.test>").leaked is None


def _imap_rejected(line: bytes) -> Rejected:
    core = ImapServer(limits=ImapLimits(), tls_active=False, tls_offered=True,
                      require_tls=True, starttls_hint="STARTTLS first")
    core.greet()
    core.receive_data(line)
    event = core.next_event()
    assert isinstance(event, Rejected)
    return event


def test_imap_login_before_tls_carries_a_quoted_password_only() -> None:
    quoted = _imap_rejected(f'a1 LOGIN {USER} "{PASSWORD}"\r\n'.encode())
    assert quoted.leaked == Credentials(USER, USER, PASSWORD)
    assert PASSWORD not in repr(quoted)
    literal = _imap_rejected(f"a1 LOGIN {USER} {{9}}\r\n".encode())  # never read
    assert literal.leaked is None and literal.response == quoted.response
    sasl = _imap_rejected(f"a1 AUTHENTICATE PLAIN {PLAIN}\r\n".encode())
    assert sasl.leaked == Credentials(USER, USER, PASSWORD)
    assert _imap_rejected(b"a1 AUTHENTICATE PLAIN\r\n").leaked is None


def _pop3_errors(lines: str) -> list[Pop3Error]:
    core = Pop3Server(limits=Pop3Limits(), tls_active=False, tls_offered=True,
                      require_tls=True, starttls_hint="STLS first")
    core.greet()
    core.receive_data(lines.encode())
    out = []
    for _ in range(lines.count("\r\n")):
        try:
            core.next_event()
        except Pop3Error as exc:
            core.send(exc.hint)
            out.append(exc)
    return out


def test_pop3_user_pass_before_tls_carries_the_credentials() -> None:
    user, pass_ = _pop3_errors(f"USER {USER}\r\nPASS {PASSWORD}\r\n")
    assert user.leaked is None and pass_.leaked == Credentials(USER, USER, PASSWORD)
    assert user.hint == pass_.hint  # USER reveals nothing about the name either
    (alone,) = _pop3_errors(f"PASS {PASSWORD}\r\n")
    assert alone.leaked is None
    (sasl,) = _pop3_errors(f"AUTH PLAIN {PLAIN}\r\n")
    assert sasl.leaked == Credentials(USER, USER, PASSWORD) and sasl.hint == user.hint


def test_plain_credentials_parses_only_well_formed_messages() -> None:
    assert plain_credentials(f"\0{USER}\0{PASSWORD}".encode()) == Credentials(
        USER, USER, PASSWORD)
    assert plain_credentials(b"no nuls") is None
    assert plain_credentials(f"other\0{USER}\0{PASSWORD}".encode()) is None
