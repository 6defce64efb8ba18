"""SMTP replies: the one value type, and every reply text postkeep puts on the wire.

A ``Reply`` is a code, an optional enhanced status code (RFC 3463, announced with
ENHANCEDSTATUSCODES, RFC 2034) and one or more text lines. ``render()`` produces the wire
form, multi-line replies included (RFC 5321 §4.2). Every fixed reply text of the SMTP
server lives here as a named constant or a small builder, so that what a client reads can
be reviewed in one file.

Invariants:
- A reply renders to one or more lines, each ``<code>[-| ]<enhanced> <text>\\r\\n``; only
  the last line has a space after the code (RFC 5321 §4.2).
- The enhanced code, when present, is on every line and its class equals the first digit
  of the reply code (RFC 2034 §4, RFC 3463 §2); 1xx/3xx replies carry none.
- Reply text never contains CR, LF or another control character: nothing a caller puts
  in a reply can inject a second reply line. A rendered line is at most 512 octets
  (RFC 5321 §4.5.3.1.5).
- No exception text, no user input other than what the caller chose to echo.
- ``closes`` is true exactly for 221, 421 and replies built ``terminal=True``: after
  those the connection is closed (RFC 5321 §3.8, §4.1.1.10, §7.8).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

#: RFC 5321 §4.5.3.1.5: the maximum total length of a reply line including the code and CRLF.
MAX_REPLY_LINE = 512

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply. Build it with ``reply()``; compare it by value."""

    code: int
    enhanced: str | None
    lines: tuple[str, ...]
    #: The connection closes after this reply even though it is not a 221/421 (a 5xx the
    #: core sends before hanging up on a peer it can no longer frame, RFC 5321 §7.8).
    terminal: bool = False

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:  # RFC 5321 §4.2: 2yz..5yz (no 1yz in SMTP)
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if self.enhanced is not None:
            # RFC 3463 §2: class.subject.detail, class 2, 4 or 5 and equal to the code's.
            if not _ENHANCED.fullmatch(self.enhanced) or self.enhanced[0] != str(self.code)[0]:
                raise ValueError(f"enhanced status {self.enhanced!r} does not fit {self.code}")
        for line in self.lines:
            if _CONTROL.search(line):
                raise ValueError("reply text must not contain control characters")
        for wire in self._wire_lines():
            if len(wire) > MAX_REPLY_LINE:
                raise ValueError(f"reply line longer than {MAX_REPLY_LINE} octets")

    def _wire_lines(self) -> list[bytes]:
        lines = self.lines or ("",)
        out = []
        for i, text in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"  # RFC 5321 §4.2
            if self.enhanced is not None:
                text = f"{self.enhanced} {text}" if text else self.enhanced
            # Empty text keeps the space after the code: "334 " (RFC 4954 §4).
            out.append(f"{self.code}{sep}{text}\r\n".encode())
        return out

    def render(self) -> bytes:
        """The wire form, CRLF-terminated, ready to write."""
        return b"".join(self._wire_lines())

    @property
    def closes(self) -> bool:
        """True when the connection must be closed after this reply: 221, 421, or a
        reply built with ``terminal=True``."""
        return self.terminal or self.code in (221, 421)

    @property
    def positive(self) -> bool:
        """2xx."""
        return 200 <= self.code < 300

    @property
    def intermediate(self) -> bool:
        """3xx (354, 334): the exchange goes on."""
        return 300 <= self.code < 400


def reply(code: int, enhanced: str | None, *lines: str, terminal: bool = False) -> Reply:
    """Build a reply: ``reply(250, "2.0.0", "OK")``; several lines make a multi-line reply.

    ``terminal=True``: the connection is closed after it (see ``Reply.closes``).
    """
    return Reply(code, enhanced, tuple(lines) if lines else ("",), terminal)


# -- connection --------------------------------------------------------------------------
def greeting(hostname: str) -> Reply:
    """RFC 5321 §4.2 / §3.1: the 220 greeting; no enhanced code here (RFC 2034 §3)."""
    return reply(220, None, f"{hostname} ESMTP postkeep")


BYE = reply(221, "2.0.0", "Bye")
TEMP_ERROR = reply(421, "4.3.0", "Temporary server error, please try again later")
TIMEOUT = reply(421, "4.4.2", "Idle timeout, closing connection")
TOO_BUSY = reply(421, "4.7.0", "Too many connections, please try again later")
TOO_MANY_ERRORS = reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_COMMANDS = reply(421, "4.7.0", "Too many commands in one connection, closing")
#: RFC 5321 §2.3.8: only CRLF ends a line. A bare CR or LF in a command line is either a
#: broken client or an attempt to make two parsers disagree about where commands end, so
#: we say why and close (RFC 5321 §7.8).
BARE_LINE_ENDING = reply(
    500, "5.5.2", "Bare CR or LF in a command line: lines must end with CRLF; closing",
    terminal=True,
)
#: RFC 3030 §2: without a valid size we cannot tell where the chunk ends: close.
#: A browser or proxy speaking HTTP to an SMTP port (cross-protocol attack): close.
NOT_SMTP = reply(421, "4.7.0", "This is an SMTP server; closing connection")
#: RFC 3030 §2: without a valid size we cannot tell where the chunk ends: close.
BAD_BDAT_SIZE = reply(
    501, "5.5.4", "BDAT needs a decimal chunk size; cannot find the end of the chunk, closing",
    terminal=True,
)


def hello(hostname: str, text: str = "", capabilities: tuple[str, ...] = ()) -> Reply:
    """RFC 5321 §4.1.1.1: the 250 reply to EHLO/HELO, capabilities one per line.

    No enhanced code: RFC 2034 §3 exempts the EHLO/HELO reply.
    """
    first = f"{hostname} {text}" if text else hostname
    return reply(250, None, first, *capabilities)


# -- success -----------------------------------------------------------------------------
OK = reply(250, "2.0.0", "OK")
READY_FOR_TLS = reply(220, "2.0.0", "Ready to start TLS")  # RFC 3207 §4
START_DATA = reply(354, None, "End data with <CR><LF>.<CR><LF>")  # RFC 5321 §4.1.1.4
AUTH_OK = reply(235, "2.7.0", "Authentication successful")  # RFC 4954 §6
#: RFC 5321 §3.5.3: VRFY without user probing.
VRFY = reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = reply(214, "2.0.0", "postkeep: see RFC 5321, https://www.rfc-editor.org/rfc/rfc5321")


def queued(queue_id: str) -> Reply:
    """RFC 5321 §6.1: sent only once the message is durably ours."""
    return reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def chunk_ok(size: int) -> Reply:
    """RFC 3030 §2: the reply to a non-final BDAT chunk."""
    return reply(250, "2.0.0", f"{size} octets received")


def auth_challenge(data: bytes) -> Reply:
    """RFC 4954 §4: ``334 <base64>``; an empty challenge is ``334 `` (with the space)."""
    return reply(334, None, base64.b64encode(data).decode("ascii"))


# -- authentication failures (RFC 4954 §6) ----------------------------------------------
AUTH_FAILED = reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = reply(501, "5.7.0", "Authentication cancelled")
AUTH_REQUIRED = reply(530, "5.7.0", "Authentication required")
AUTH_MECHANISM_UNSUPPORTED = reply(
    504, "5.5.4", "Unrecognized authentication mechanism: use PLAIN or LOGIN"
)
AUTH_BAD_BASE64 = reply(501, "5.5.2", "Invalid base64 data in the authentication exchange")
AUTH_ONLY_ON_SUBMISSION = reply(
    503, "5.5.1",
    "AUTH is only available on the submission ports (465 with SSL/TLS, or 587 with STARTTLS)",
)
ALREADY_AUTHENTICATED = reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = reply(503, "5.5.1", "AUTH is not permitted during a mail transaction")
ENCRYPTION_REQUIRED = reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)


def starttls_required(hint: str) -> Reply:
    """530 5.7.0 for MAIL/RCPT/DATA/BDAT/AUTH before TLS where TLS is required."""
    return reply(530, "5.7.0", hint)


# -- STARTTLS (RFC 3207 §4) -------------------------------------------------------------
TLS_ALREADY_ACTIVE = reply(503, "5.5.1", "TLS is already active")
TLS_NOT_OFFERED = reply(502, "5.5.1", "STARTTLS is not available on this port")

# -- command syntax and sequence (RFC 5321 §4.2.2, §4.3.2) ------------------------------
UNKNOWN_COMMAND = reply(500, "5.5.1", "Command unrecognized")
#: RFC 5321 §4.5.3.1.4; 5.5.6 is the code the design chose for any over-long line.
LINE_TOO_LONG = reply(500, "5.5.6", "Line too long")
NOT_UTF8 = reply(500, "5.5.2", "Command line is not valid UTF-8")
NOT_IMPLEMENTED = reply(502, "5.5.1", "Command not implemented")
SYNTAX_ERROR = reply(501, "5.5.4", "Syntax error in parameters or arguments")
HELLO_SYNTAX = reply(
    501, "5.5.4", "EHLO/HELO needs your host name: a domain or an address literal"
)
HELLO_FIRST = reply(503, "5.5.1", "Send EHLO (or HELO) first")
EHLO_REQUIRED = reply(503, "5.5.1", "This command needs EHLO, not HELO")
NESTED_MAIL = reply(503, "5.5.1", "Nested MAIL command: send RSET to start over")
MAIL_FIRST = reply(503, "5.5.1", "Send MAIL first")
RCPT_FIRST = reply(503, "5.5.1", "Send RCPT first")
NO_VALID_RECIPIENTS = reply(554, "5.5.1", "No valid recipients")  # RFC 5321 §3.3
DATA_AFTER_BDAT = reply(503, "5.5.1", "DATA and BDAT cannot be mixed in one transaction")
RCPT_AFTER_BDAT = reply(503, "5.5.1", "RCPT is not allowed after BDAT")
IN_TRANSACTION = reply(503, "5.5.1", "Not allowed during a mail transaction: send RSET first")
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Too many recipients")  # RFC 5321 §4.5.3.1.10

# -- MAIL/RCPT arguments ----------------------------------------------------------------
BAD_SENDER_SYNTAX = reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = reply(501, "5.1.3", "Bad recipient address syntax")


def bad_sender(detail: str) -> Reply:
    """501 5.1.7 with the parser's sentence (fixed text from mail.address, no input)."""
    return reply(501, "5.1.7", f"Bad sender address syntax: {detail}")


def bad_recipient(detail: str) -> Reply:
    """501 5.1.3 with the parser's sentence (fixed text from mail.address, no input)."""
    return reply(501, "5.1.3", f"Bad recipient address syntax: {detail}")


#: RFC 6531 §3.5 (X.6.7, RFC 5248).
NON_ASCII_ADDRESS = reply(
    553, "5.6.7", "Non-ASCII addresses need the SMTPUTF8 parameter on MAIL (RFC 6531)"
)
UNKNOWN_PARAMETER = reply(555, "5.5.4", "MAIL FROM/RCPT TO parameter not recognized")
BINARYMIME_REFUSED = reply(555, "5.5.4", "BODY=BINARYMIME is not supported here")
#: RFC 1870 §6.1.
MESSAGE_TOO_BIG = reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
#: RFC 5321 §2.3.8, §4.1.1.4: smuggling defence; content lines end with CRLF only.
BARE_LINE_ENDING_IN_DATA = reply(
    554, "5.5.2",
    "Message refused: bare CR or LF in the message; lines must end with CRLF",
)
