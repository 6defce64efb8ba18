"""POP3 replies: the one value type, its wire form, and every reply text postkeep sends.

A :class:`Reply` is ``+OK`` or ``-ERR`` with an optional RFC 2449 response code and a
text (RFC 1939 §3), optionally followed by a multi-line body: a tuple of lines (CAPA,
LIST, UIDL) or a whole message (:class:`MessageBody`, for RETR and TOP). A SASL
challenge (``+ <base64>``, RFC 5034 §4) is a Reply too, built with :func:`challenge`.
:meth:`Reply.render` produces the exact wire bytes: it byte-stuffs every body line that
starts with ``.`` and ends the body with ``.CRLF`` (RFC 1939 §3). Every fixed reply text
of the POP3 server lives here as a named constant or a small builder, so what a client
reads can be reviewed in one file.

Invariants:

- A reply's first line is ``+OK``/``-ERR``, then ``SP [CODE]`` when there is a code,
  then ``SP text`` when the text is not empty, then CRLF (RFC 2449 §3), at most 512
  octets (RFC 2449 §4). A challenge is ``+ <base64>CRLF`` and has no length limit
  (RFC 5034 §4: as long as the mechanism needs).
- Reply text, response codes and body lines never contain CR or LF, and text and codes no
  other control character either: nothing a caller puts in a reply can start a second
  reply line or end a body early.
- Only ``+OK`` carries a body. In the rendered body no line is ``.`` except the final
  terminator, whether the client splits lines on CRLF or on LF alone.
- A message body goes out byte for byte, except that a ``.`` at the start of a line is
  doubled (RFC 1939 §3), a missing final CRLF is added, and a bare CR or LF (which
  RFC 5322 §2.3 forbids in a message, and which SMTP ingest refuses) is sent as CRLF so
  that strict and lenient clients read the same lines.
- The ``repr`` of a message body shows its size, never its content (DESIGN.md §5: no
  message content in logs).
- ``closes`` is set on QUIT's reply and on fatal errors; a challenge never closes.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

#: RFC 2449 §4: the first line of a response (greeting included) is at most 512 octets
#: including the CRLF. RFC 2449 §5 gives each CAPA line the same limit.
MAX_FIRST_LINE: Final = 512

CRLF: Final = b"\r\n"
#: RFC 1939 §3: a multi-line response ends with a line holding only the termination octet.
TERMINATOR: Final = b".\r\n"

#: RFC 2449 §3: resp-code = "[" resp-level *("/" resp-level) "]", resp-level = 1*rchar,
#: rchar = printable ASCII except "/" and "]" (DEL, which the ABNF range includes, is a
#: control character and refused).
_RESP_CODE = re.compile(r"[\x21-\x2e\x30-\x5c\x5e-\x7e]+(?:/[\x21-\x2e\x30-\x5c\x5e-\x7e]+)*")
#: C0 controls, DEL and C1 controls: none of them belongs in a reply line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
#: Any line ending, well-formed or bare (RFC 5322 §2.3 allows only CRLF).
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
#: RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
_UNIQUE_ID = re.compile(r"[\x21-\x7e]{1,70}")


@dataclass(frozen=True, slots=True)
class MessageBody:
    """A whole message (or its TOP excerpt) to send as a multi-line body.

    The bytes are the message as stored; :meth:`Reply.render` frames them.
    """

    data: bytes

    def __repr__(self) -> str:
        # DESIGN.md §5: never message content in a log line or a traceback.
        return f"MessageBody(<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class Reply:
    """One POP3 reply. Build it with the functions below; compare it by value.

    ``lines`` and ``body`` are the two forms of a multi-line body (at most one is set, and
    only on ``+OK``). ``challenge`` marks a SASL continuation (``+ <text>``), whose text is
    the base64 challenge. ``closes`` tells the driver to close after writing it.
    """

    ok: bool
    text: str
    code: str | None = None
    lines: tuple[bytes, ...] | None = None
    closes: bool = False
    body: MessageBody | None = None
    challenge: bool = False

    def __post_init__(self) -> None:
        if _CONTROL.search(self.text):
            raise ValueError("reply text must not contain control characters")
        if self.code is not None and not _RESP_CODE.fullmatch(self.code):
            raise ValueError(f"not an RFC 2449 response code: {self.code!r}")
        multiline = self.lines is not None or self.body is not None
        if self.lines is not None and self.body is not None:
            raise ValueError("a reply has lines or a message body, not both")
        if multiline and not self.ok:
            raise ValueError("RFC 1939 §3: only +OK replies are followed by a body")
        if self.lines is not None:
            for line in self.lines:
                if not isinstance(line, bytes) or b"\r" in line or b"\n" in line:
                    raise ValueError("a body line is bytes without CR or LF")
        if self.challenge:
            if not self.ok or self.code is not None or multiline or self.closes:
                raise ValueError("a SASL challenge is only '+ <base64>'")
            if not _BASE64.fullmatch(self.text):
                raise ValueError("a SASL challenge is base64 (RFC 5034 §4)")
        elif len(self._first_line()) > MAX_FIRST_LINE:
            raise ValueError(f"RFC 2449 §4: first reply line longer than {MAX_FIRST_LINE} octets")

    def _first_line(self) -> bytes:
        if self.challenge:
            # RFC 5034 §4: "+" SP base64; an empty challenge keeps the space.
            return b"+ " + self.text.encode("ascii") + CRLF
        parts = ["+OK" if self.ok else "-ERR"]
        if self.code is not None:
            parts.append(f"[{self.code}]")  # RFC 2449 §8
        if self.text:
            parts.append(self.text)
        return " ".join(parts).encode("utf-8") + CRLF

    def render(self) -> bytes:
        """The wire form: the status line, then the byte-stuffed, terminated body if any."""
        first = self._first_line()
        if self.lines is not None:
            # RFC 1939 §3: a line starting with the termination octet gets one prepended.
            stuffed = [b"." + line if line.startswith(b".") else line for line in self.lines]
            return b"".join([first, *(line + CRLF for line in stuffed), TERMINATOR])
        if self.body is not None:
            return b"".join([first, dot_stuff(self.body.data), TERMINATOR])
        return first

    def __repr__(self) -> str:
        kind = "challenge" if self.challenge else ("+OK" if self.ok else "-ERR")
        extra = ""
        if self.lines is not None:
            extra = f", {len(self.lines)} lines"
        elif self.body is not None:
            extra = f", {self.body!r}"
        code = f"[{self.code}] " if self.code else ""
        closes = ", closes" if self.closes else ""
        return f"Reply({kind} {code}{self.text!r}{extra}{closes})"


# -- framing ------------------------------------------------------------------------------
def normalize_line_endings(data: bytes) -> bytes:
    """``data`` with every bare CR or LF turned into CRLF; CRLF-only data is returned as is.

    RFC 5322 §2.3 allows CR and LF in a message only together. A bare LF followed by ``.``
    would be a terminator to a client that splits on LF and message text to one that
    splits on CRLF; sending CRLF makes both read the same lines.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data  # the normal case: three C-speed scans, no copy
    return _LINE_ENDING.sub(CRLF, data)


def dot_stuff(data: bytes) -> bytes:
    """The body of a multi-line response carrying ``data``, without the terminator.

    RFC 1939 §3: every line beginning with ``.`` gets another ``.`` in front, and each
    line ends with CRLF (a message not ending in CRLF gets one before the terminator).
    """
    data = normalize_line_endings(data)
    if not data:
        return b""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(CRLF):
        stuffed += CRLF
    return stuffed


# -- builders ----------------------------------------------------------------------------
def ok(text: str = "", code: str | None = None) -> Reply:
    """``+OK [code] text``."""
    return Reply(True, text, code)


def err(text: str, code: str | None = None) -> Reply:
    """``-ERR [code] text``: the connection stays open."""
    return Reply(False, text, code)


def fatal(text: str, code: str | None = None) -> Reply:
    """``-ERR [code] text``, after which the connection is closed."""
    return Reply(False, text, code, closes=True)


def multiline(text: str, lines: Iterable[bytes]) -> Reply:
    """``+OK text`` followed by ``lines`` (each without CRLF), stuffed and terminated."""
    return Reply(True, text, lines=tuple(lines))


def challenge(data: bytes) -> Reply:
    """RFC 5034 §4: a SASL server challenge, ``+ <base64 of data>``."""
    return Reply(True, base64.b64encode(data).decode("ascii"), challenge=True)


def greeting(text: str) -> Reply:
    """RFC 1939 §4: the greeting. No APOP timestamp: we do not store plaintext passwords."""
    return ok(text)


def retr_reply(data: bytes) -> Reply:
    """RFC 1939 §5 RETR: ``+OK <n> octets``, then the message, byte-stuffed."""
    return Reply(True, f"{len(data)} octets", body=MessageBody(data))


def top_reply(data: bytes, lines: int) -> Reply:
    """RFC 1939 §7 TOP: the header, the blank line, then the first ``lines`` body lines.

    A message without a blank line is all header and is sent whole; ``lines`` larger than
    the body sends the whole message.
    """
    if lines < 0:
        raise ValueError("TOP line count must be non-negative")
    data = normalize_line_endings(data)
    if data.startswith(CRLF):
        head, body = CRLF, data[2:]  # no header fields: the blank line comes first
    else:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return Reply(True, "Top of message follows", body=MessageBody(data))
        head, body = data[: end + 4], data[end + 4 :]
    cut = 0
    for _ in range(lines):
        nl = body.find(CRLF, cut)
        if nl < 0:
            cut = len(body)
            break
        cut = nl + 2
    return Reply(True, "Top of message follows", body=MessageBody(head + body[:cut]))


def stat_reply(count: int, size: int) -> Reply:
    """RFC 1939 §5 STAT: the drop listing, exactly ``+OK <count> <octets>``."""
    return ok(f"{count} {size}")


def scan_listing(msg: int, size: int) -> Reply:
    """RFC 1939 §5 LIST msg: ``+OK <msg> <octets>``."""
    return ok(f"{msg} {size}")


def list_reply(entries: Iterable[tuple[int, int]]) -> Reply:
    """RFC 1939 §5 LIST: one ``<msg> <octets>`` line per message not marked deleted."""
    return multiline("Scan listing follows", (f"{m} {s}".encode("ascii") for m, s in entries))


def _unique_id(uid: str) -> str:
    if not _UNIQUE_ID.fullmatch(uid):
        raise ValueError("RFC 1939 §7: a unique-id is 1-70 characters in 0x21-0x7E")
    return uid


def uidl_one(msg: int, uid: str) -> Reply:
    """RFC 1939 §7 UIDL msg: ``+OK <msg> <unique-id>``."""
    return ok(f"{msg} {_unique_id(uid)}")


def uidl_reply(entries: Iterable[tuple[int, str]]) -> Reply:
    """RFC 1939 §7 UIDL: one ``<msg> <unique-id>`` line per message not marked deleted."""
    return multiline(
        "Unique-id listing follows",
        (f"{m} {_unique_id(u)}".encode("ascii") for m, u in entries),
    )


def _messages(count: int) -> str:
    return f"{count} message" if count == 1 else f"{count} messages"


def maildrop_ok(count: int, size: int) -> Reply:
    """After login (RFC 1939 §7 PASS) and for RSET (§5): the maildrop's size."""
    return ok(f"Maildrop has {_messages(count)} ({size} octets)")


def deleted(msg: int) -> Reply:
    """RFC 1939 §5 DELE."""
    return ok(f"Message {msg} deleted")


def signing_off(remaining: int | None = None) -> Reply:
    """RFC 1939 §4, §6: QUIT's ``+OK``; ``remaining`` messages are left in the maildrop."""
    if remaining is None:
        return Reply(True, "postkeep POP3 server signing off", closes=True)
    text = f"postkeep POP3 server signing off ({_messages(remaining)} left)"
    return Reply(True, text, closes=True)


def tls_required(hint: str) -> Reply:
    """USER, PASS and AUTH before TLS where TLS is required: ``-ERR [AUTH] <hint>``.

    RFC 2595 §2.3 (no plaintext passwords without protection), RFC 3206 (AUTH: a policy
    refusal of the credentials), RFC 8314 §3 (implicit TLS on 995 preferred).
    """
    return err(hint, code="AUTH")


def syntax_error(usage: str) -> Reply:
    """A command whose arguments do not parse: tell the client the correct form."""
    return err(f"Syntax error, use: {usage}")


# -- success -----------------------------------------------------------------------------
NOOP_OK: Final = ok()
#: RFC 2595 §4, the example's text.
BEGIN_TLS: Final = ok("Begin TLS negotiation")
#: RFC 1939 §7: the same answer for every name, so USER does not reveal which accounts exist.
USER_OK: Final = ok("Send your password with PASS")
LOGGED_IN: Final = ok("Logged in")
CAPABILITIES_FOLLOW: Final = "Capability list follows"

# -- connection --------------------------------------------------------------------------
TOO_MANY_ERRORS: Final = fatal("Too many errors, closing connection")
TOO_MANY_COMMANDS: Final = fatal("Too many commands in one connection, closing")
TIMEOUT: Final = fatal("Idle timeout, closing connection")
TEMP_ERROR: Final = fatal("Temporary server error, please try again later", "SYS/TEMP")
SHUTTING_DOWN: Final = fatal("Server shutting down, please try again later", "SYS/TEMP")
TOO_BUSY: Final = fatal("Too many connections, please try again later", "SYS/TEMP")

# -- command syntax and sequence (RFC 1939 §3, RFC 2449 §3-§4) ----------------------------
UNKNOWN_COMMAND: Final = err("Unknown command")
LINE_TOO_LONG: Final = err("Line too long; the line was discarded")
NOT_UTF8: Final = err("Command line is not valid UTF-8")
CONTROL_CHARACTER: Final = err("Control characters are not allowed in a command line")
#: RFC 1939 §4: only USER, PASS, APOP, AUTH, STLS, CAPA and QUIT before login.
LOGIN_FIRST: Final = err("Not logged in: log in with USER and PASS, or AUTH, first")
#: RFC 1939 §5, RFC 2595 §4, RFC 5034 §4: no login or STLS once logged in.
ALREADY_LOGGED_IN: Final = err("Already logged in")
#: RFC 1939 §7: PASS only right after a successful USER.
USER_FIRST: Final = err("Send USER first")
BAD_MESSAGE_NUMBER: Final = err("Invalid message number: use a number from LIST")
#: RFC 1939 §7: APOP needs the plaintext password on the server; we store only hashes.
APOP_UNSUPPORTED: Final = err("APOP is not supported: use USER and PASS, or AUTH PLAIN, over TLS")

# -- STLS (RFC 2595 §4) -------------------------------------------------------------------
TLS_ALREADY_ACTIVE: Final = err("Already using TLS")
TLS_NOT_OFFERED: Final = err("STLS not available on this port")

# -- authentication (RFC 5034 §4, RFC 3206) ------------------------------------------------
AUTH_MECHANISM_MISSING: Final = err("AUTH needs a mechanism name, e.g. AUTH PLAIN (see CAPA)")
AUTH_MECHANISM_UNSUPPORTED: Final = err("Unsupported authentication mechanism (see CAPA)")
AUTH_BAD_BASE64: Final = err("Invalid base64 data in the authentication exchange")
AUTH_CANCELLED: Final = err("Authentication cancelled")
AUTH_FAILED: Final = err("Authentication failed", "AUTH")
#: The password was right but sent before TLS ([security] exposed_password): RFC 3206 §4
#: [AUTH] is "a problem with the user's credentials", and the sentence says which.
LOGIN_MUST_CHANGE: Final = err(
    "Your password was sent unencrypted and must be changed: ask your administrator "
    "for a new one (postkeep user passwd)",
    "AUTH",
)
LOGIN_LOCKED: Final = err(
    "Your account is locked because its password was sent unencrypted: ask your "
    "administrator to unlock it",
    "AUTH",
)
#: A SASL message that does not parse (``sasl.SaslError``): the same fixed text for all.
AUTH_MALFORMED: Final = err("Malformed authentication data")
#: Throttled after failed logins (auth/throttle.py): the password was not even checked,
#: so not [AUTH] (RFC 3206 §4: "the credentials" are wrong, and clients then discard a
#: saved password) but [SYS/TEMP] (RFC 3206 §4: temporary, retry later without alerting
#: the user unless it persists). [LOGIN-DELAY] (RFC 2449 §8.1.1) means "logged in too
#: recently", a different policy.
LOGIN_THROTTLED: Final = err("Too many failed logins, please try again later", "SYS/TEMP")
#: RFC 2449 §8.1.2: the maildrop is locked by another session.
IN_USE: Final = err("Mailbox is in use by another session, try again later", "IN-USE")
SYS_TEMP: Final = err("Temporary server error, please try again later", "SYS/TEMP")

# -- transaction (RFC 1939 §5) -------------------------------------------------------------
NO_SUCH_MESSAGE: Final = err("No such message")
MESSAGE_DELETED: Final = err("Message already deleted")
#: The message of the login snapshot was expunged meanwhile (by IMAP, on another node).
MESSAGE_GONE: Final = err("Message no longer exists: another client removed it")
#: RFC 1939 §6: the deletions could not all be done; the connection still closes.
UPDATE_FAILED: Final = fatal("Some deleted messages not removed, try again later", "SYS/TEMP")
