"""Delivery status notifications: the bounce and the "still trying" notice.

A DSN is an RFC 3464 report inside an RFC 6522 ``multipart/report;
report-type=delivery-status`` with three parts: what happened in plain words, the
machine-readable ``message/delivery-status``, and the header section of the original
message (``text/rfc822-headers``, RFC 6522 §4; never the body: it may be large, and the
sender has it). The scheduler builds one with ``build_dsn`` and hands it to ``ingest``
with the null reverse-path, like any other message.

Invariants:
- ``build_dsn`` refuses (``ValueError``) to build a DSN for a message whose reverse-path
  is null: RFC 5321 §6.1 and RFC 3464 §1 forbid it, because a DSN about a DSN can loop.
  The caller checks first; this is the second guard.
- Everything we generate is CRLF-terminated, lines stay under RFC 5322's 998 octets, and
  text from a remote server (its reply) is stripped of control characters and cut to a
  bounded length before it goes into a header field or the text part.
- The output is 7-bit unless an address or the original header section is not ASCII
  (SMTPUTF8 mail); then the RFC 6533 ``message/global-*`` types and a quoted-printable
  text part keep it well-formed.
- ``From:`` is ``MAILER-DAEMON@<hostname>`` and the message carries
  ``Auto-Submitted: auto-replied`` (RFC 3834 §5), so auto-responders do not answer it.
"""

from __future__ import annotations

import quopri
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from postkeep.mail.headers import format_date, make_message_id, split_header

#: Longest remote reply text quoted in a DSN (the rest is cut, with "...").
MAX_DIAGNOSTIC = 400
#: Longest original header section returned (RFC 3462 suggests the headers only).
MAX_HEADERS = 64 * 1024

# RFC 3463 §2: class.subject.detail, at the start of the reply text (RFC 2034 §4).
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class Action(Enum):
    """RFC 3464 §2.3.3 action-value (only the two a sending MTA reports to the sender)."""

    FAILED = "failed"
    DELAYED = "delayed"


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What to tell the sender about one recipient."""

    recipient: str  # the address as it was enqueued
    action: Action
    status: str  # RFC 3463 "5.1.1"
    diagnostic: str | None  # the remote's reply ("550 5.1.1 No such user"), if it answered
    remote_mta: str | None  # the host that answered, if any
    reason: str | None = None  # our own words when no remote answered ("gave up", ...)
    last_attempt: datetime | None = None


def status_of(code: int, text: str, *, permanent: bool) -> str:
    """The RFC 3463 status for a reply: its enhanced code if it has one whose class agrees
    with the reply code, else 5.0.0 (permanent) or 4.0.0 (transient)."""
    m = _ENHANCED.match(text.strip())
    if m and m.group(1) == str(code // 100) and m.group(1) in "45":
        return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
    return "5.0.0" if permanent else "4.0.0"


def clean(text: str, limit: int = MAX_DIAGNOSTIC) -> str:
    """Remote text made safe for a header field: one line, no controls, bounded."""
    one = _CONTROL.sub(" ", text).strip()
    one = re.sub(r" {2,}", " ", one)
    return one if len(one) <= limit else one[: limit - 3].rstrip() + "..."


def build_dsn(
    *,
    hostname: str,
    sender: str,
    original: bytes,
    arrival: datetime,
    reports: Sequence[RecipientReport],
    retry_until: datetime | None = None,
    now: datetime | None = None,
) -> bytes:
    """The DSN message (headers and body, CRLF), addressed to ``sender``.

    ``original`` is the queued message (only its header section is used); ``arrival`` is
    when we accepted it (RFC 3464 §2.2.5 Arrival-Date); ``retry_until`` is the give-up
    time, reported for delayed recipients (§3.2.7 Will-Retry-Until).
    """
    if not sender:
        raise ValueError("no DSN for a message with the null reverse-path (RFC 3464 §1)")
    if not reports:
        raise ValueError("a DSN needs at least one recipient report")
    now = now or datetime.now(UTC)
    failed = [r for r in reports if r.action is Action.FAILED]
    headers_block, _ = split_header(original)
    headers_block = headers_block[:MAX_HEADERS]
    if not headers_block.endswith(b"\r\n"):
        headers_block += b"\r\n"
    utf8_headers = not headers_block.isascii()
    utf8_addresses = not all(r.recipient.isascii() for r in reports)
    boundary = f"=_postkeep_{secrets.token_hex(12)}"

    subject = (
        "Undelivered Mail Returned to Sender"
        if failed
        else "Delayed Mail (still being retried)"
    )
    out: list[bytes] = []

    def line(text: str) -> None:
        out.append(text.encode("utf-8") + b"\r\n")

    # RFC 5322 header of the report itself. To: may be a UTF-8 address (SMTPUTF8 mail).
    line(f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>")
    line(f"To: <{sender}>")
    line(f"Subject: {subject}")
    line(f"Date: {format_date(now)}")
    line(f"Message-ID: {make_message_id(hostname)}")
    line("Auto-Submitted: auto-replied")  # RFC 3834 §5: no auto-reply to this
    line("MIME-Version: 1.0")
    # RFC 6522 §3: multipart/report with the report-type parameter.
    line(f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"')
    line("")
    line("This is a MIME-formatted message: a delivery status notification (RFC 3464).")
    line("")

    # Part 1: for people.
    text = _human_text(hostname, sender, reports, retry_until)
    line(f"--{boundary}")
    line("Content-Description: Notification")
    if text.isascii():
        line('Content-Type: text/plain; charset="us-ascii"')
        line("Content-Transfer-Encoding: 7bit")
        line("")
        out.append(text.replace("\n", "\r\n").encode("ascii"))
    else:
        line('Content-Type: text/plain; charset="utf-8"')
        line("Content-Transfer-Encoding: quoted-printable")
        line("")
        encoded = quopri.encodestring(text.replace("\n", "\r\n").encode("utf-8"))
        out.append(encoded.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    if not out[-1].endswith(b"\r\n"):
        out.append(b"\r\n")

    # Part 2: for programs. RFC 3464 §2.1: per-message fields, a blank line, then one
    # block of per-recipient fields per recipient, blocks separated by blank lines.
    line(f"--{boundary}")
    line("Content-Description: Delivery report")
    # RFC 6533 §6.2: message/global-delivery-status when an address is UTF-8.
    kind = "message/global-delivery-status" if utf8_addresses else "message/delivery-status"
    line(f"Content-Type: {kind}")
    line("")
    line(f"Reporting-MTA: dns; {hostname}")  # RFC 3464 §2.2.2
    line(f"Arrival-Date: {format_date(arrival)}")  # §2.2.5
    for r in reports:
        line("")
        # §2.3.2 Final-Recipient: address-type "rfc822", or "utf-8" (RFC 6533 §3).
        addr_type = "rfc822" if r.recipient.isascii() else "utf-8"
        line(f"Final-Recipient: {addr_type}; {r.recipient}")
        line(f"Action: {r.action.value}")  # §2.3.3
        line(f"Status: {r.status}")  # §2.3.4, RFC 3463
        if r.remote_mta:
            line(f"Remote-MTA: dns; {clean(r.remote_mta, 255)}")  # §2.3.5
        if r.diagnostic:
            line(f"Diagnostic-Code: smtp; {clean(r.diagnostic)}")  # §2.3.6
        if r.last_attempt is not None:
            line(f"Last-Attempt-Date: {format_date(r.last_attempt)}")  # §2.3.7
        if r.action is Action.DELAYED and retry_until is not None:
            line(f"Will-Retry-Until: {format_date(retry_until)}")  # §2.3.8
    line("")

    # Part 3: the original header section (RFC 6522 §4; RFC 6533 §6.3 for UTF-8).
    line(f"--{boundary}")
    line("Content-Description: Undelivered message headers")
    line(f"Content-Type: {'message/global-headers' if utf8_headers else 'text/rfc822-headers'}")
    line("")
    out.append(headers_block)
    line(f"--{boundary}--")
    return b"".join(out)


def _human_text(
    hostname: str,
    sender: str,
    reports: Sequence[RecipientReport],
    retry_until: datetime | None,
) -> str:
    failed = [r for r in reports if r.action is Action.FAILED]
    delayed = [r for r in reports if r.action is Action.DELAYED]
    lines = [f"This is the mail system at {hostname}.", ""]
    if failed:
        lines += [
            "Your message could not be delivered to the recipients below. This is a",
            "permanent failure: the message will not be sent again. Check the address,",
            "or ask the recipient about the problem described.",
            "",
        ]
        lines += [_explain(r) for r in failed]
        lines.append("")
    if delayed:
        until = f" until {format_date(retry_until)}" if retry_until is not None else ""
        lines += [
            "Your message has not been delivered yet to the recipients below. It is",
            f"still in the queue and will be tried again{until}; you do not need to",
            "send it again. You will be told if it cannot be delivered in the end.",
            "",
        ]
        lines += [_explain(r) for r in delayed]
        lines.append("")
    lines += [
        "The delivery report and the header of your message are attached.",
        "",
    ]
    return "\n".join(lines)


def _explain(r: RecipientReport) -> str:
    what = _plain_words(r.status)
    if r.diagnostic and r.remote_mta:
        said = f"The receiving server {clean(r.remote_mta, 255)} said: {clean(r.diagnostic)}"
    elif r.diagnostic:
        said = f"The receiving server said: {clean(r.diagnostic)}"
    elif r.reason:
        said = clean(r.reason)
    else:
        said = ""
    return f"<{r.recipient}>: {what}" + (f"\n    {said}" if said else "")


def _plain_words(status: str) -> str:
    """RFC 3463 subject codes, in the words a person needs."""
    _, subject, detail = [*status.split("."), "0", "0"][:3]
    match subject, detail:
        case "1", "1":
            return "this address does not exist at the receiving server."
        case "1", _:
            return "the receiving server does not accept this address."
        case "2", "2":
            return "the recipient's mailbox is full."
        case "2", _:
            return "the recipient's mailbox cannot take mail now."
        case "3", "4":
            return "the message is too large for the receiving server."
        case "4", "7":
            return "it could not be delivered in the time allowed, so we gave up."
        case "4", _:
            return "the receiving server could not be reached."
        case "7", _:
            return "the receiving server refused it for security or policy reasons."
        case _:
            return "the receiving server did not accept it."
