"""The durable outbound queue end to end: a real postkeep (in-process, or ``postkeep serve``
as a subprocess) submits to aiosmtpd receivers found through a local DNS server.

Every "remote" host is on loopback (127.0.0.2, 127.0.0.3, ...: outbound_fixtures.py).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from outbound_fixtures import Receiver, Remote
from server_harness import (
    PASSWORDS,
    Instance,
    run_postkeep,
    wait_for,
    write_cert,
    write_config,
)

from postkeep.store.api import QueueEntry, RecipientState

ALICE = "alice@example.test"
MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Friend <friend@remote.test>\r\n"
    b"Subject: outbound test\r\n"
    b"Message-ID: <outbound-test@example.test>\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"\r\n"
    b"Hello over there.\r\n"
    b".leading dot stays\r\n"
)


@pytest.fixture
def remote(ca: trustme.CA, ca_file: Path, tmp_path: Path) -> Iterator[Remote]:
    with Remote(ca, ca_file, tmp_path / "remote") as r:
        yield r


def outbound_extra(remote: Remote, **outbound: Any) -> str:
    values: dict[str, Any] = {"mx_port": remote.port, "ca_file": f'"{remote.ca_file}"',
                              "retry_initial": 0.2, "retry_max": 0.5, "connect_timeout": 5.0}
    values.update(outbound)
    lines = ["[outbound]", *(f"{k} = {v}" for k, v in values.items()),
             "[dns]", f'nameservers = ["{remote.dns.nameserver}"]', "timeout = 3.0"]
    return "\n".join(lines) + "\n"


def submit(inst: Instance, tls_ctx: ssl.SSLContext, rcpts: list[str],
           message: bytes = MESSAGE) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", inst.ports["submissions"], context=tls_ctx,
                          timeout=10) as s:
        s.login(ALICE, PASSWORDS[ALICE])
        s.sendmail(ALICE, rcpts, message)


def entries(inst: Instance) -> list[QueueEntry]:
    async def run() -> list[QueueEntry]:
        async with inst.store.read() as tx:
            return await tx.queue_entries(1000)

    return inst.call(run)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_submitted_mail_reaches_the_remote_mx_byte_exact(
    make_instance: Callable[..., Instance], remote: Remote, tls_ctx: ssl.SSLContext
) -> None:
    mx1 = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2")
    inst = make_instance(extra=outbound_extra(remote))
    submit(inst, tls_ctx, ["friend@remote.test"])
    assert wait_for(lambda: len(mx1.messages) == 1, timeout=10)
    got = mx1.messages[0]
    assert (got.sender, got.recipients) == (ALICE, ["friend@remote.test"])
    # Our trace header first, then the client's bytes exactly (dot-stuffing undone).
    assert got.data.startswith(b"Received: ")
    assert got.data.endswith(MESSAGE)
    assert got.tls  # STARTTLS was offered, so it was used
    assert wait_for(lambda: entries(inst) == [])


def test_a_4xx_is_retried_and_listed_with_its_error_until_delivered(
    make_instance: Callable[..., Instance], remote: Remote, tls_ctx: ssl.SSLContext
) -> None:
    mx1 = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                        rcpt_replies={"friend@remote.test": "451 4.2.0 Mailbox busy, try later"})
    inst = make_instance(extra=outbound_extra(remote))
    submit(inst, tls_ctx, ["friend@remote.test"])

    def deferred() -> bool:
        es = entries(inst)
        return bool(es) and es[0].recipients[0].attempts >= 1

    assert wait_for(deferred, timeout=10)
    (entry,) = entries(inst)
    (rcpt,) = entry.recipients
    assert rcpt.state is RecipientState.PENDING
    assert "451 4.2.0 Mailbox busy" in (rcpt.last_error or "")
    # The operator's view, from another process, while the server runs.
    listed = run_postkeep("queue", "list", "--config", str(inst.config_path))
    assert listed.returncode == 0, listed.stderr
    assert f"{entry.id}  from <{ALICE}>" in listed.stdout
    assert "friend@remote.test  pending" in listed.stdout
    assert "last error: mx1.remote.test: 451 4.2.0 Mailbox busy" in listed.stdout

    del mx1.rcpt_replies["friend@remote.test"]  # the mailbox is free again
    assert wait_for(lambda: len(mx1.messages) == 1, timeout=10)
    assert mx1.messages[0].data.endswith(MESSAGE)
    assert wait_for(lambda: entries(inst) == [])
    assert inst.inbox(ALICE) == []  # delivered in the end: no notice


def test_a_5xx_bounces_to_the_sender_with_a_dsn(
    make_instance: Callable[..., Instance], remote: Remote, tls_ctx: ssl.SSLContext
) -> None:
    remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                  rcpt_replies={"nobody@remote.test": "550 5.1.1 No such user here"})
    inst = make_instance(extra=outbound_extra(remote))
    submit(inst, tls_ctx, ["nobody@remote.test"])
    assert wait_for(lambda: len(inst.inbox(ALICE)) == 1, timeout=10)
    assert wait_for(lambda: entries(inst) == [])
    _row, data = inst.inbox(ALICE)[0]
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert "MAILER-DAEMON@mail.example.test" in str(msg["From"])
    human, status, headers = msg.iter_parts()
    assert "No such user here" in human.get_content()
    per_message, per_rcpt = (dict(b.items()) for b in status.get_payload())
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert per_rcpt["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx1.remote.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user here"
    assert headers.get_content_type() == "text/rfc822-headers"
    original = headers.get_payload(decode=True)
    assert b"Subject: outbound test" in original
    assert b"Hello over there" not in data  # headers only, never the body


def test_no_dsn_for_a_message_with_the_null_sender(
    make_instance: Callable[..., Instance], remote: Remote
) -> None:
    mx1 = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                        rcpt_replies={"nobody@remote.test": "550 5.1.1 No such user here"})
    inst = make_instance(extra=outbound_extra(remote))
    # A bounce from elsewhere (null reverse-path) forwarded by an alias to a remote
    # address that refuses it: RFC 5321 §6.1 / RFC 3464 §1 say it dies here.
    inst.add_alias("fwd@example.test", "nobody@remote.test")
    inst.add_alias("fwd@example.test", "alice@example.test")
    with smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=10) as s:
        s.sendmail("", ["fwd@example.test"], MESSAGE)
    assert wait_for(lambda: mx1.connections >= 1, timeout=10)
    assert wait_for(lambda: entries(inst) == [], timeout=10)
    time.sleep(0.5)  # a DSN, had one been made, would be in a mailbox or the queue by now
    assert [d.endswith(MESSAGE) for _r, d in inst.inbox(ALICE)] == [True]  # the copy only
    assert entries(inst) == []
    assert mx1.messages == []


def test_two_recipients_at_two_domains_each_with_its_own_state(
    make_instance: Callable[..., Instance], remote: Remote, tls_ctx: ssl.SSLContext
) -> None:
    mx1 = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2")
    mx2 = remote.add_mx("other.test", "mx.other.test", "127.0.0.3",
                        rcpt_replies={"pal@other.test": "451 4.3.0 Not now"})
    inst = make_instance(extra=outbound_extra(remote))
    submit(inst, tls_ctx, ["friend@remote.test", "pal@other.test"])

    def split_state() -> bool:
        es = entries(inst)
        return bool(es) and any(r.state is RecipientState.DELIVERED for r in es[0].recipients)

    assert wait_for(split_state, timeout=10)
    (entry,) = entries(inst)
    states = {r.address: r.state for r in entry.recipients}
    assert states == {"friend@remote.test": RecipientState.DELIVERED,
                      "pal@other.test": RecipientState.PENDING}
    del mx2.rcpt_replies["pal@other.test"]
    assert wait_for(lambda: len(mx2.messages) == 1, timeout=10)
    assert wait_for(lambda: entries(inst) == [])
    assert len(mx1.messages) == 1  # the delivered recipient was not sent again
    assert mx1.messages[0].recipients == ["friend@remote.test"]
    assert mx2.messages[0].recipients == ["pal@other.test"]


def test_queue_retry_and_delete_from_the_cli(
    make_instance: Callable[..., Instance], remote: Remote, tls_ctx: ssl.SSLContext
) -> None:
    remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2",
                  rcpt_replies={"friend@remote.test": "451 4.2.0 later"})
    inst = make_instance(extra=outbound_extra(remote, retry_initial=3600, retry_max=3600))
    submit(inst, tls_ctx, ["friend@remote.test"])
    assert wait_for(lambda: bool(entries(inst)) and entries(inst)[0].attempts == 1, timeout=10)
    (entry,) = entries(inst)
    config = str(inst.config_path)
    retried = run_postkeep("queue", "retry", str(entry.id), "--config", config)
    assert retried.returncode == 0, retried.stderr
    # The server looks at the queue again within its poll interval and tries again.
    assert wait_for(lambda: entries(inst)[0].attempts == 2, timeout=10)
    missing = run_postkeep("queue", "delete", "999999", "--config", config)
    assert missing.returncode == 1 and "no queue entry 999999" in missing.stderr
    bad = run_postkeep("queue", "delete", "x1", "--config", config)
    assert bad.returncode == 2
    deleted = run_postkeep("queue", "delete", str(entry.id), "--config", config)
    assert deleted.returncode == 0, deleted.stderr
    assert entries(inst) == []
    empty = run_postkeep("queue", "list", "--config", config)
    assert empty.returncode == 0 and "empty" in empty.stdout


# -- crash safety: postkeep serve as a process, killed with SIGKILL mid-delivery ---------


def _serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "postkeep", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=log.open("ab"), start_new_session=True,
    )


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


def _block_data(receiver: Receiver, started: list[float]) -> Callable[[], None]:
    """Make the receiver hang after the message data arrives (a slow or stuck MX);
    returns a function that puts the normal behaviour back."""
    assert receiver._controller is not None
    handler = receiver._controller.handler
    normal = handler.handle_DATA

    async def hang(server: Any, session: Any, envelope: Any) -> str:
        started.append(time.monotonic())
        await asyncio.sleep(3600)  # never answers: the sender dies waiting
        return "451 4.0.0 unreachable"

    handler.handle_DATA = hang
    return lambda: setattr(handler, "handle_DATA", normal)


def test_a_crash_during_delivery_loses_no_message(
    ca: trustme.CA, remote: Remote, tmp_path: Path, tls_ctx: ssl.SSLContext
) -> None:
    mx1 = remote.add_mx("remote.test", "mx1.remote.test", "127.0.0.2")
    directory = tmp_path / "node"
    cert, key = write_cert(ca, directory / "tls")
    config = write_config(directory, cert, key, services=("submissions",),
                          extra=outbound_extra(remote))
    assert run_postkeep("domain", "add", "example.test", "--config", str(config)).returncode == 0
    added = run_postkeep("user", "add", ALICE, "--password-stdin", "--config", str(config),
                         stdin=PASSWORDS[ALICE] + "\n")
    assert added.returncode == 0, added.stderr
    port = int(config.read_text().split('submissions = "127.0.0.1:')[1].split('"')[0])
    log = tmp_path / "serve.log"

    hung: list[float] = []
    unblock = _block_data(mx1, hung)
    proc = _serve(config, log)
    try:
        _wait_port(port)
        with smtplib.SMTP_SSL("127.0.0.1", port, context=tls_ctx, timeout=10) as s:
            s.login(ALICE, PASSWORDS[ALICE])
            s.sendmail(ALICE, ["friend@remote.test"], MESSAGE)
        # The 250 above means the message is ours. Kill the server while the remote has
        # the data but has not answered: the worst moment.
        assert wait_for(lambda: bool(hung), timeout=15), log.read_text()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert mx1.messages == []
        unblock()
        proc = _serve(config, log)
        # Delivered after the restart (at least once; here exactly once, as the first
        # transaction never completed).
        assert wait_for(lambda: len(mx1.messages) >= 1, timeout=20), log.read_text()
        assert mx1.messages[0].data.endswith(MESSAGE)
        listed = run_postkeep("queue", "list", "--config", str(config))
        assert wait_for(lambda: "empty" in run_postkeep(
            "queue", "list", "--config", str(config)).stdout, timeout=10), listed.stdout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
