"""Many sessions, one mailbox: changes reach every session at the moments RFC 3501 §7.4.1
allows; IDLE (RFC 2177) is woken by delivery; UIDs and UIDVALIDITY behave; timers.

Raw ``Wire`` connections show exactly which untagged responses come with which command.
"""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Callable, Iterator

import pytest
from server_harness import Instance
from test_imap import ALICE, HOST, Wire, client_993, code_of, message, wire_993

from postkeep.imap import server as imap_server


def append(w: Wire, data: bytes, mailbox: str = "INBOX", flags: str = "") -> int:
    flag_part = f"({flags}) " if flags else ""
    w.send(f"ap APPEND {mailbox} {flag_part}{{{len(data)}+}}\r\n".encode() + data + b"\r\n")
    reply = w.until("ap")[-1]
    assert reply.startswith(b"ap OK [APPENDUID "), reply
    return int(code_of(reply, b"APPENDUID").split()[1])


@pytest.fixture
def pair(server: Instance, tls_ctx: ssl.SSLContext) -> Iterator[tuple[Wire, Wire]]:
    """Two sessions of alice with INBOX (3 messages) selected in both."""
    a, b = wire_993(server, tls_ctx), wire_993(server, tls_ctx)
    for i in range(3):
        append(a, message(f"m{i}"))
    for w in (a, b):
        assert b"* 3 EXISTS\r\n" in w.cmd("s", "SELECT INBOX")
    yield a, b
    a.close()
    b.close()


def deliver(server: Instance, subject: str, to: str = ALICE) -> None:
    with smtplib.SMTP(HOST, server.ports["smtp"], timeout=10) as s:
        s.sendmail("someone@remote.test", [to], message(subject, to=to))


def test_flag_change_reported_to_other_session_on_noop(pair: tuple[Wire, Wire]) -> None:
    a, b = pair
    assert b.cmd("x", "STORE 1 +FLAGS (\\Flagged)")[0] == b"* 1 FETCH (FLAGS (\\Flagged))\r\n"
    assert a.cmd("n", "NOOP") == [
        b"* 1 FETCH (UID 1 FLAGS (\\Flagged))\r\n",
        b"n OK NOOP completed\r\n",
    ]
    assert a.cmd("m", "NOOP") == [b"m OK NOOP completed\r\n"]  # told once
    assert b.cmd("y", "NOOP") == [b"y OK NOOP completed\r\n"]  # its own change: not echoed


def test_expunge_waits_for_a_command_that_may_report_it(pair: tuple[Wire, Wire]) -> None:
    a, b = pair
    b.cmd("x", "STORE 2 +FLAGS.SILENT (\\Deleted)")
    assert b.cmd("y", "EXPUNGE")[0] == b"* 2 EXPUNGE\r\n"
    # RFC 3501 §7.4.1: no EXPUNGE during FETCH, STORE or SEARCH; numbers stay as they were.
    lines = a.cmd("f", "FETCH 1:3 (UID)")
    assert lines == [
        b"* 1 FETCH (UID 1)\r\n",
        b"* 3 FETCH (UID 3)\r\n",
        b"f NO [EXPUNGEISSUED] Some of the requested messages no longer exist\r\n",
    ]
    assert a.cmd("u", "UID FETCH 1:* (UID)")[-1] == b"u OK UID FETCH completed\r\n"
    assert a.cmd("q", "SEARCH ALL") == [b"* SEARCH 1 3\r\n", b"q OK SEARCH completed\r\n"]
    lines = a.cmd("t", "STORE 3 +FLAGS (\\Seen)")
    assert lines == [b"* 3 FETCH (FLAGS (\\Seen))\r\n", b"t OK STORE completed\r\n"]
    assert a.cmd("n", "NOOP") == [b"* 2 EXPUNGE\r\n", b"n OK NOOP completed\r\n"]
    assert a.cmd("g", "FETCH 2 (UID)")[0] == b"* 2 FETCH (UID 3)\r\n"


def test_new_message_from_other_session_is_exists(pair: tuple[Wire, Wire]) -> None:
    a, b = pair
    uid = append(b, message("from b"))
    lines = a.cmd("n", "NOOP")
    assert lines[0] == b"* 4 EXISTS\r\n" and lines[-1] == b"n OK NOOP completed\r\n"
    assert a.cmd("f", "FETCH 4 (UID)")[0] == f"* 4 FETCH (UID {uid})\r\n".encode()
    # Other commands than NOOP report it too, before their completion (here: CHECK).
    append(b, message("again"))
    assert a.cmd("c", "CHECK")[0] == b"* 5 EXISTS\r\n"


def test_recent_goes_to_the_first_session_that_sees_it(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    a = wire_993(server, tls_ctx)
    a.cmd("s", "SELECT INBOX")
    deliver(server, "fresh")
    assert a.cmd("n", "NOOP")[:2] == [b"* 1 EXISTS\r\n", b"* 1 RECENT\r\n"]
    assert a.cmd("f", "FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS (\\Recent))\r\n"
    assert a.cmd("q", "SEARCH RECENT")[0] == b"* SEARCH 1\r\n"
    b = wire_993(server, tls_ctx)
    assert b"* 0 RECENT\r\n" in b.cmd("s", "SELECT INBOX")
    assert b.cmd("q", "SEARCH NEW")[0] == b"* SEARCH\r\n"


def test_idle_woken_by_smtp_delivery_within_one_second(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    c = client_993(server, tls_ctx)
    c.select_folder("INBOX")
    c.idle()
    deliver(server, "wake up")
    delivered = time.monotonic()
    responses = c.idle_check(timeout=5)
    woke = time.monotonic() - delivered
    c.idle_done()
    assert (1, b"EXISTS") in responses, responses
    assert woke < 1.0, woke
    c.logout()


def test_idle_reports_flags_and_expunge_from_other_session(pair: tuple[Wire, Wire]) -> None:
    a, b = pair
    a.send(b"i IDLE\r\n")
    assert a.response() == b"+ idling\r\n"
    b.cmd("x", "STORE 3 +FLAGS (\\Answered)")
    assert a.response() == b"* 3 FETCH (UID 3 FLAGS (\\Answered))\r\n"
    b.cmd("y", "STORE 1 +FLAGS.SILENT (\\Deleted)")
    b.cmd("z", "EXPUNGE")
    got = [a.response(), a.response()]  # the \Deleted flag, then the expunge (RFC 2177)
    assert got[-1] == b"* 1 EXPUNGE\r\n", got
    a.send(b"DONE\r\n")
    assert a.response() == b"i OK IDLE terminated\r\n"
    assert a.cmd("f", "FETCH 1:* (UID)")[:-1] == [
        b"* 1 FETCH (UID 2)\r\n",
        b"* 2 FETCH (UID 3)\r\n",
    ]


def test_idle_without_selected_mailbox_and_pipelined_done(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    w = wire_993(server, tls_ctx)
    w.send(b"i IDLE\r\n")
    assert w.response() == b"+ idling\r\n"
    w.send(b"DONE\r\nn NOOP\r\n")
    assert w.response() == b"i OK IDLE terminated\r\n"
    assert w.response() == b"n OK NOOP completed\r\n"
    w.send(b"j IDLE\r\n")
    assert w.response() == b"+ idling\r\n"
    w.send(b"NOPE\r\n")
    assert w.response().startswith(b"j BAD ")  # RFC 2177: only DONE ends IDLE


@pytest.fixture
def fast_timers(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def set_timers(**values: float) -> None:
        for name, value in values.items():
            monkeypatch.setattr(imap_server, name, value)

    return set_timers


def test_autologout_after_login(
    server: Instance, tls_ctx: ssl.SSLContext, fast_timers: Callable[..., None]
) -> None:
    fast_timers(AUTOLOGOUT=0.5)
    w = wire_993(server, tls_ctx)
    assert w.response() == b"* BYE Autologout: idle for too long\r\n"
    assert w.closed()


def test_idle_keepalive_rearms_autologout(
    server: Instance, tls_ctx: ssl.SSLContext, fast_timers: Callable[..., None]
) -> None:
    fast_timers(AUTOLOGOUT=0.5, IDLE_KEEPALIVE=0.3)
    w = wire_993(server, tls_ctx)
    w.cmd("s", "SELECT INBOX")
    w.send(b"i IDLE\r\n")
    assert w.response() == b"+ idling\r\n"
    start = time.monotonic()
    while time.monotonic() - start < 1.5:  # three times the autologout timer
        assert w.response() == b"* OK Still here\r\n"
    w.send(b"DONE\r\n")
    assert w.response() == b"i OK IDLE terminated\r\n"


def test_idle_is_bounded(
    server: Instance, tls_ctx: ssl.SSLContext, fast_timers: Callable[..., None]
) -> None:
    fast_timers(IDLE_MAX=0.5)
    w = wire_993(server, tls_ctx)
    w.send(b"i IDLE\r\n")
    assert w.response() == b"+ idling\r\n"
    assert w.response().startswith(b"* BYE IDLE for too long")
    assert w.closed()


def test_selected_mailbox_deleted_by_other_session(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    a, b = wire_993(server, tls_ctx), wire_993(server, tls_ctx)
    a.cmd("c", "CREATE Doomed")
    a.cmd("s", "SELECT Doomed")
    assert b.cmd("d", "DELETE Doomed")[-1].startswith(b"d OK")
    lines = a.cmd("n", "NOOP")
    assert lines[0] == b"* BYE The selected mailbox was deleted by another session\r\n"
    assert a.closed()


def test_uids_never_reused_and_uidvalidity_stable(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    w = wire_993(server, tls_ctx)
    first = append(w, message("one"), flags="\\Deleted")
    w.cmd("s", "SELECT INBOX")
    validity = code_of(b"".join(w.cmd("s2", "SELECT INBOX")), b"UIDVALIDITY")
    w.cmd("e", "EXPUNGE")
    second = append(w, message("two"))
    assert second > first
    other = wire_993(server, tls_ctx)
    assert code_of(b"".join(other.cmd("s", "EXAMINE INBOX")), b"UIDVALIDITY") == validity
    # A mailbox deleted and created again gets a new UIDVALIDITY (RFC 3501 §2.3.1.1).
    w.cmd("c", "CREATE Box")
    old = w.cmd("t", "STATUS Box (UIDVALIDITY)")[0]
    w.cmd("d", "DELETE Box")
    w.cmd("c2", "CREATE Box")
    new = w.cmd("t2", "STATUS Box (UIDVALIDITY)")[0]
    assert old.startswith(b"* STATUS Box (UIDVALIDITY ") and new != old


def test_append_copy_move_are_durable_at_their_ok(
    server: Instance, tls_ctx: ssl.SSLContext
) -> None:
    w = wire_993(server, tls_ctx)
    uid = append(w, message("durable"))
    assert [row.uid for row, _ in server.inbox(ALICE)] == [uid]  # committed before the OK
    w.cmd("s", "SELECT INBOX")
    assert w.cmd("c", "COPY 1 Sent")[-1].startswith(b"c OK [COPYUID ")
    assert len(server.inbox(ALICE, "Sent")) == 1
    assert w.cmd("m", "MOVE 1 Trash")[-1].startswith(b"m OK")
    assert len(server.inbox(ALICE, "Trash")) == 1 and server.inbox(ALICE) == []


def test_many_sessions_see_one_delivery(server: Instance, tls_ctx: ssl.SSLContext) -> None:
    sessions = [wire_993(server, tls_ctx) for _ in range(5)]
    for w in sessions:
        w.cmd("s", "SELECT INBOX")
        w.send(b"i IDLE\r\n")
        assert w.response() == b"+ idling\r\n"
    deliver(server, "for everyone")
    for w in sessions:
        assert w.response() == b"* 1 EXISTS\r\n"
        assert w.response().endswith(b" RECENT\r\n")
        w.send(b"DONE\r\n")
        assert w.response() == b"i OK IDLE terminated\r\n"
