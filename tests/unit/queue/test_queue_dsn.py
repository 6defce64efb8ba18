"""RFC 3464 delivery status notifications, parsed back with the stdlib email package."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest

from postkeep.queue.dsn import Action, RecipientReport, build_dsn, clean, status_of

ORIGINAL = (
    b"Received: from x by mail.example.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: friend@remote.test\r\n"
    b"Subject: hello there\r\n"
    b"Message-ID: <orig@example.test>\r\n"
    b"\r\n"
    b"SECRET BODY LINE\r\n"
)
ARRIVAL = datetime(2024, 1, 1, tzinfo=UTC)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def failed(rcpt: str = "friend@remote.test", **kw: object) -> RecipientReport:
    args: dict[str, object] = dict(
        recipient=rcpt, action=Action.FAILED, status="5.1.1",
        diagnostic="550 5.1.1 No such user here", remote_mta="mx1.remote.test",
    )
    args.update(kw)
    return RecipientReport(**args)  # type: ignore[arg-type]


def delivery_status_blocks(msg: EmailMessage) -> list[dict[str, str]]:
    """The message/delivery-status part as field blocks (per-message first)."""
    parts = list(msg.iter_parts())
    report = parts[1]
    assert report.get_content_type() == "message/delivery-status"
    blocks = []
    for block in report.get_payload():  # the stdlib parses it into header blocks
        blocks.append({k.lower(): str(v) for k, v in block.items()})
    return blocks


def test_failed_dsn_is_a_multipart_report_with_three_parts():
    data = build_dsn(hostname="mail.example.test", sender="alice@example.test",
                     original=ORIGINAL, arrival=ARRIVAL, reports=[failed()])
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"  # RFC 6522 §3
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.test>"
    assert str(msg["To"]) == "alice@example.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@mail.example.test>")
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    text = parts[0].get_content()
    assert "could not be delivered" in text
    assert "<friend@remote.test>: this address does not exist" in text
    assert "550 5.1.1 No such user here" in text


def test_delivery_status_fields():
    data = build_dsn(hostname="mail.example.test", sender="alice@example.test",
                     original=ORIGINAL, arrival=ARRIVAL, reports=[failed()])
    per_message, rcpt = delivery_status_blocks(parse(data))
    assert per_message["reporting-mta"] == "dns; mail.example.test"
    assert "01 Jan 2024" in per_message["arrival-date"]
    assert rcpt["final-recipient"] == "rfc822; friend@remote.test"
    assert rcpt["action"] == "failed"
    assert rcpt["status"] == "5.1.1"
    assert rcpt["remote-mta"] == "dns; mx1.remote.test"
    assert rcpt["diagnostic-code"] == "smtp; 550 5.1.1 No such user here"


def test_original_headers_are_returned_but_not_the_body():
    data = build_dsn(hostname="mail.example.test", sender="alice@example.test",
                     original=ORIGINAL, arrival=ARRIVAL, reports=[failed()])
    assert b"SECRET BODY LINE" not in data
    headers = list(parse(data).iter_parts())[2]
    content = headers.get_payload(decode=True)
    assert b"Subject: hello there\r\n" in content
    assert b"Message-ID: <orig@example.test>" in content


def test_delayed_dsn_says_it_is_still_being_tried():
    until = datetime(2024, 1, 6, tzinfo=UTC)
    report = RecipientReport("friend@remote.test", Action.DELAYED, "4.2.0",
                             "450 4.2.0 mailbox busy", "mx1.remote.test")
    data = build_dsn(hostname="mail.example.test", sender="alice@example.test",
                     original=ORIGINAL, arrival=ARRIVAL, reports=[report],
                     retry_until=until)
    msg = parse(data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, rcpt = delivery_status_blocks(msg)
    assert rcpt["action"] == "delayed"
    assert rcpt["status"] == "4.2.0"
    assert "06 Jan 2024" in rcpt["will-retry-until"]
    text = next(iter(msg.iter_parts())).get_content()
    assert "do not need to" in text


def test_several_recipients_get_one_block_each():
    data = build_dsn(hostname="mail.example.test", sender="alice@example.test",
                     original=ORIGINAL, arrival=ARRIVAL,
                     reports=[failed("a@one.test"), failed("b@two.test", status="5.0.0",
                                                            diagnostic=None, remote_mta=None,
                                                            reason="gave up")])
    blocks = delivery_status_blocks(parse(data))
    assert [b.get("final-recipient") for b in blocks[1:]] == [
        "rfc822; a@one.test", "rfc822; b@two.test"]
    assert "diagnostic-code" not in blocks[2]


def test_never_a_dsn_for_the_null_sender():
    with pytest.raises(ValueError, match="null reverse-path"):
        build_dsn(hostname="mail.example.test", sender="", original=ORIGINAL,
                  arrival=ARRIVAL, reports=[failed()])


def test_remote_text_cannot_inject_header_lines():
    evil = "550 5.1.1 no\r\nX-Injected: yes\r\n\r\nbody"
    data = build_dsn(hostname="mail.example.test", sender="alice@example.test",
                     original=ORIGINAL, arrival=ARRIVAL, reports=[failed(diagnostic=evil)])
    assert b"\r\nX-Injected" not in data
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))


def test_utf8_recipient_uses_global_types():
    data = build_dsn(hostname="mail.example.test", sender="alice@example.test",
                     original=ORIGINAL, arrival=ARRIVAL, reports=[failed("jörg@remote.test")])
    assert b"Content-Type: message/global-delivery-status" in data
    assert "Final-Recipient: utf-8; jörg@remote.test".encode() in data


def test_every_line_ends_with_crlf():
    data = build_dsn(hostname="mail.example.test", sender="alice@example.test",
                     original=ORIGINAL, arrival=ARRIVAL, reports=[failed()])
    assert b"\n" not in data.replace(b"\r\n", b"")


@pytest.mark.parametrize(("code", "text", "permanent", "want"), [
    (550, "5.1.1 No such user", True, "5.1.1"),
    (550, "No such user", True, "5.0.0"),
    (451, "4.3.0 try later", False, "4.3.0"),
    (451, "try later", False, "4.0.0"),
    (550, "4.1.1 mismatched class", True, "5.0.0"),  # the class must agree with the code
    (552, "5.03.004 padded", True, "5.3.4"),
])
def test_status_of(code, text, permanent, want):
    assert status_of(code, text, permanent=permanent) == want


def test_clean_bounds_and_flattens():
    assert clean("a\r\nb\tc") == "a b c"
    assert len(clean("x" * 1000)) == 400
