"""The sans-IO SMTP client core: commands out as bytes, server replies in as events.

The mirror image of ``protocol.py``. The driver (``queue/deliver.py``) asks the core for
the bytes of each command (``ehlo()``, ``mail()``, ``rcpt()``, ``data()``, ``content()``
…), writes them, feeds what the server sends to ``receive_data()`` and pulls
``next_event()``: one ``Response`` per command, in the order the commands were made
(RFC 2920 §3.1: replies come back in order), or ``NEED_DATA``.

Event protocol:

- The first event is the ``Response`` to ``Command.GREETING`` (RFC 5321 §3.1: the client
  sends nothing before the server's 220).
- A command may be made while replies are still owed only when the server offered
  PIPELINING and every owed command is MAIL, RCPT or RSET (RFC 2920 §3.1: EHLO, DATA,
  STARTTLS, AUTH, QUIT… end a group). Anything else is a programming error
  (``RuntimeError``), as is content before a 354 or AUTH without TLS.
- A 334 to AUTH asks for ``auth_continue()``; a 354 to DATA allows ``content()``; a 220 to
  STARTTLS allows only ``start_tls()``; 221 and 421 close (RFC 5321 §3.8).
- When the server's bytes cannot be framed the core raises ``ProtocolError`` and is
  closed. At end of stream ``next_event()`` returns ``ConnectionClosed()``.

Server text is untrusted: it is decoded leniently, control characters become spaces and
each line is cut to fit a ``Reply`` (RFC 5321 §4.5.3.1.5: 512 octets), so what reaches
logs, ``postkeep queue list`` and DSNs is one clean line per reply line.

Invariants:
- Every command line this core produces ends with CRLF and contains no other CR or LF;
  addresses with control characters are refused (``ValueError``): no command injection.
- Message content goes out dot-stuffed (RFC 5321 §4.5.2) with every line ending CRLF and
  ends with exactly one CRLF "." CRLF (§4.1.1.4). A bare CR or LF in the stored message is
  sent as CRLF, so no receiver can read an end of data, or a command, where we meant
  content (the SMTP smuggling class).
- Bytes received after the 220 to STARTTLS are never parsed: ``start_tls()`` drops and
  returns them with everything learnt from EHLO (RFC 3207 §4.2; the response-injection
  mirror of CVE-2011-0411).
- AUTH is produced only over TLS: a password never leaves in plaintext (RFC 4954 §4,
  RFC 8314 §3).
- Buffered input is bounded: a reply line is at most ``MAX_LINE`` octets and a reply at
  most ``MAX_LINES`` lines; unsolicited input beyond ``MAX_UNSOLICITED`` is an error.
- The core imports no asyncio, ssl, socket, logging or storage code and does no I/O.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, auto
from types import MappingProxyType

from postkeep.smtp.replies import MAX_REPLY_LINE, Reply

#: Longest reply line accepted, CRLF included. RFC 5321 §4.5.3.1.5 says 512; real servers
#: exceed it (long EHLO keywords, verbose rejections), so we are lenient but bounded.
MAX_LINE = 4096
#: Most lines in one reply (an EHLO reply has a dozen or two).
MAX_LINES = 100
#: Bytes tolerated while no reply is owed (a 421 before our next command fits easily).
MAX_UNSOLICITED = 4096

_CRLF = b"\r\n"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)")
_BARE_OR_CRLF = re.compile(rb"\r\n|\r|\n")
_HELLO_NAME = re.compile(r"[\x21-\x7e]+")


class Command(Enum):
    GREETING = auto()  # not sent: the server's 220 (RFC 5321 §3.1)
    EHLO = auto()
    HELO = auto()
    STARTTLS = auto()
    AUTH = auto()
    MAIL = auto()
    RCPT = auto()
    DATA = auto()
    CONTENT = auto()  # the message and CRLF.CRLF: its reply is the final one (§4.1.1.4)
    RSET = auto()
    NOOP = auto()
    QUIT = auto()


#: RFC 2920 §3.1: only these may be followed by another command before their reply.
PIPELINABLE = frozenset({Command.MAIL, Command.RCPT, Command.RSET})


class State(Enum):
    GREETING = auto()  # waiting for the 220
    CONNECTED = auto()  # greeted (or TLS just started): send EHLO/HELO
    READY = auto()  # EHLO/HELO accepted
    DATA = auto()  # 354 received: content() is legal
    TLS_PENDING = auto()  # 220 to STARTTLS received: only start_tls() is legal
    CLOSED = auto()


class NeedData(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Event:
    """Base of everything ``next_event()`` returns."""


@dataclass(frozen=True, slots=True)
class Response(Event):
    command: Command
    reply: Reply
    argument: str = ""  # the address for MAIL and RCPT


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """End of stream (or the core is closed); replies still owed will not come."""


class ProtocolError(Exception):
    """The server's bytes cannot be framed as SMTP replies; the connection is unusable."""


def reply_text(reply: Reply) -> str:
    """``"5.1.1 User unknown"``: the enhanced code and the text, for results and DSNs."""
    text = " ".join(line for line in reply.lines if line)
    if reply.enhanced:
        return f"{reply.enhanced} {text}".rstrip()
    return text


def content_bytes(message: bytes) -> bytes:
    """The DATA content for ``message``: dot-stuffed, CRLF only, ending with CRLF.CRLF.

    RFC 5321 §4.5.2: a line starting with "." gets another one. Stored messages passed our
    own smuggling checks, but one received by BDAT (RFC 3030) may hold a bare CR or LF;
    those become CRLF here (as Postfix does), because sending them would let a receiver
    and us disagree about where lines, and so the message, end.
    """
    if not message:
        return b"." + _CRLF
    crlf = message.count(_CRLF)
    if message.count(b"\r") == crlf and message.count(b"\n") == crlf:
        body = message.replace(b"\r\n.", b"\r\n..")  # fast path: well-formed lines
        if body.startswith(b"."):
            body = b"." + body
        if not body.endswith(_CRLF):
            body += _CRLF  # RFC 5321 §4.1.1.4: the terminator follows a line end
        return body + b"." + _CRLF
    lines = _BARE_OR_CRLF.split(message)
    if lines[-1] == b"":
        lines.pop()
    out = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    return out + _CRLF + b"." + _CRLF


def has_bare_line_endings(message: bytes) -> bool:
    """True when ``content_bytes`` will change line endings (worth a log line)."""
    crlf = message.count(_CRLF)
    return message.count(b"\r") != crlf or message.count(b"\n") != crlf


class SmtpClient:
    """One SMTP client connection's protocol state. See the module docstring."""

    def __init__(self, *, hostname: str, tls_active: bool = False) -> None:
        if not _HELLO_NAME.fullmatch(hostname):
            raise ValueError("the EHLO name must be a domain or an address literal")
        self.hostname = hostname
        self._tls_active = tls_active
        self._state = State.GREETING
        self._pending: deque[tuple[Command, str]] = deque([(Command.GREETING, "")])
        self._buf = bytearray()
        self._eof = False
        self._lines: list[tuple[int, str]] = []  # the reply being read
        self._caps: dict[str, str] = {}
        self._extended = False
        self._auth_steps: deque[bytes] = deque()

    # -- read-only views -----------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def extended(self) -> bool:
        """The server accepted EHLO (not only HELO)."""
        return self._extended

    @property
    def capabilities(self) -> Mapping[str, str]:
        """EHLO keywords (upper case) and their parameters (RFC 5321 §4.1.1.1)."""
        return MappingProxyType(self._caps)

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self._caps

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self._caps  # RFC 2920

    @property
    def size_limit(self) -> int | None:
        """RFC 1870 §4: the declared maximum, None when unknown or unlimited (0)."""
        value = self._caps.get("SIZE")
        if value is None:
            return None
        first = value.split(" ")[0]
        return int(first) if first.isdigit() and int(first) > 0 else None

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(self._caps.get("AUTH", "").upper().split())

    @property
    def pending(self) -> int:
        """Replies still owed by the server."""
        return len(self._pending)

    # -- commands ------------------------------------------------------------------------
    def _command(self, command: Command, line: bytes, argument: str = "") -> bytes:
        if self._state in (State.CLOSED, State.TLS_PENDING, State.DATA):
            raise RuntimeError(f"{command.name} is not legal in {self._state.name}")
        if self._pending and not (
            self.pipelining and all(c in PIPELINABLE for c, _ in self._pending)
        ):
            raise RuntimeError("a reply is owed and this command cannot be pipelined (RFC 2920)")
        if b"\r" in line or b"\n" in line:
            raise ValueError("a command line must not contain CR or LF")
        self._pending.append((command, argument))
        return line + _CRLF

    def ehlo(self) -> bytes:
        return self._command(Command.EHLO, f"EHLO {self.hostname}".encode("ascii"))

    def helo(self) -> bytes:
        """RFC 5321 §4.1.1.1 / §3.2: the fallback when EHLO is refused."""
        return self._command(Command.HELO, f"HELO {self.hostname}".encode("ascii"))

    def starttls(self) -> bytes:
        if self._tls_active:
            raise RuntimeError("TLS is already active")
        return self._command(Command.STARTTLS, b"STARTTLS")

    def auth_plain(self, username: str, password: str) -> bytes:
        """RFC 4954 §4 with an initial response; RFC 4616 §2: NUL authcid NUL passwd."""
        self._check_auth("PLAIN")
        token = b"\0" + username.encode("utf-8") + b"\0" + password.encode("utf-8")
        return self._command(Command.AUTH, b"AUTH PLAIN " + base64.b64encode(token))

    def auth_login(self, username: str, password: str) -> bytes:
        """The LOGIN mechanism: two 334 challenges, answered with the user, then the password."""
        self._check_auth("LOGIN")
        self._auth_steps = deque(
            base64.b64encode(s.encode("utf-8")) for s in (username, password)
        )
        return self._command(Command.AUTH, b"AUTH LOGIN")

    def auth_continue(self) -> bytes:
        """The next response after a 334; ``*`` cancels when we have none left (RFC 4954 §4)."""
        step = self._auth_steps.popleft() if self._auth_steps else b"*"
        return self._command(Command.AUTH, step)

    def _check_auth(self, mechanism: str) -> None:
        if not self._tls_active:
            raise RuntimeError("AUTH only over TLS: the password would go out in plaintext")
        if mechanism not in self.auth_mechanisms:
            raise RuntimeError(f"the server did not offer AUTH {mechanism}")

    def mail(
        self, sender: str, *, size: int | None = None, eight_bit: bool = False,
        smtputf8: bool = False,
    ) -> bytes:
        """RFC 5321 §4.1.1.2 ``MAIL FROM:<sender>`` with the parameters the server offered:
        SIZE (RFC 1870 §6), BODY=8BITMIME (RFC 6152 §2) and SMTPUTF8 (RFC 6531 §3.4;
        ``ValueError`` when it is needed and not offered: the caller reports that)."""
        params = []
        if size is not None and self.supports("SIZE"):
            params.append(f"SIZE={size}")
        if eight_bit and self.supports("8BITMIME"):
            params.append("BODY=8BITMIME")
        if smtputf8:
            if not self.supports("SMTPUTF8"):
                raise ValueError("the server did not offer SMTPUTF8")
            params.append("SMTPUTF8")
        line = f"MAIL FROM:{_path(sender, smtputf8)}"
        if params:
            line += " " + " ".join(params)
        return self._command(Command.MAIL, line.encode("utf-8"), sender)

    def rcpt(self, recipient: str, *, smtputf8: bool = False) -> bytes:
        """RFC 5321 §4.1.1.3 ``RCPT TO:<recipient>``."""
        if not recipient:
            raise ValueError("a recipient cannot be the null path")
        line = f"RCPT TO:{_path(recipient, smtputf8)}".encode()
        return self._command(Command.RCPT, line, recipient)

    def data(self) -> bytes:
        return self._command(Command.DATA, b"DATA")

    def content(self, message: bytes) -> bytes:
        """After a 354: the whole content, dot-stuffed and terminated (``content_bytes``)."""
        if self._state is not State.DATA:
            raise RuntimeError("content() is legal only after a 354 to DATA")
        self._state = State.READY
        self._pending.append((Command.CONTENT, ""))
        return content_bytes(message)

    def rset(self) -> bytes:
        return self._command(Command.RSET, b"RSET")

    def noop(self) -> bytes:
        return self._command(Command.NOOP, b"NOOP")

    def quit(self) -> bytes:
        return self._command(Command.QUIT, b"QUIT")

    # -- input ---------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer received bytes; ``b""`` means the server closed (EOF)."""
        if self._state is State.CLOSED:
            return
        if not data:
            self._eof = True
            return
        self._buf += data

    def start_tls(self) -> bytes:
        """After the 220 to STARTTLS: drop and return every unread byte, forget EHLO.

        RFC 3207 §4.2: the client MUST discard knowledge obtained from the server (the
        capability list) and must not trust anything sent before the handshake. The
        server sent these bytes after its 220 and before TLS: they are injected or
        broken, and are never parsed as replies.
        """
        if self._state is not State.TLS_PENDING:
            raise RuntimeError("start_tls() is only legal right after the 220 to STARTTLS")
        dropped = bytes(self._buf)
        self._buf = bytearray()
        self._lines = []
        self._caps = {}
        self._extended = False
        self._tls_active = True
        self._state = State.CONNECTED
        return dropped

    def next_event(self) -> Event | NeedData:
        """The next ``Response``, ``ConnectionClosed`` or ``NEED_DATA``."""
        if self._state is State.TLS_PENDING:
            raise RuntimeError("start_tls() first")
        if self._state is State.CLOSED:
            return ConnectionClosed()
        if not self._pending:
            if len(self._buf) > MAX_UNSOLICITED:
                self._close()
                raise ProtocolError("too much data from the server with no command pending")
            if self._eof:
                self._close()
                return ConnectionClosed()
            return NEED_DATA
        reply = self._read_reply()
        if reply is None:
            if self._eof:
                self._close()
                return ConnectionClosed()
            return NEED_DATA
        command, argument = self._pending.popleft()
        self._apply(command, reply)
        return Response(command, reply, argument)

    # -- parsing -------------------------------------------------------------------------
    def _read_reply(self) -> Reply | None:
        """RFC 5321 §4.2: lines ``code-text`` then ``code text``; None until complete."""
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    self._close()
                    raise ProtocolError("reply line too long")
                return None
            raw = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if len(raw) + 1 > MAX_LINE:
                self._close()
                raise ProtocolError("reply line too long")
            # Lenient on input: a bare LF ends a reply line too; the CR is optional.
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            m = _REPLY_LINE.match(raw)
            if m is None:
                self._close()
                raise ProtocolError("not an SMTP reply line")
            code = int(m.group(1))
            if self._lines and self._lines[0][0] != code:
                self._close()
                raise ProtocolError("reply lines with different codes")
            text = raw[4:].decode("utf-8", "replace")
            self._lines.append((code, _CONTROL.sub(" ", text)))
            if m.group(2) == b"-":
                if len(self._lines) >= MAX_LINES:
                    self._close()
                    raise ProtocolError("reply has too many lines")
                continue
            lines, self._lines = self._lines, []
            return _make_reply(code, [t for _, t in lines])

    def _apply(self, command: Command, reply: Reply) -> None:
        code = reply.code
        if code == 421 or (command is Command.QUIT and code == 221):
            self._close()  # RFC 5321 §3.8: 421 closes, whatever it answers
            return
        ok = 200 <= code < 300
        match command:
            case Command.GREETING if ok:
                self._state = State.CONNECTED
            case Command.EHLO if ok:
                self._caps = _capabilities(reply.lines[1:])
                self._extended = True
                self._state = State.READY
            case Command.HELO if ok:
                self._caps = {}
                self._extended = False
                self._state = State.READY
            case Command.STARTTLS if code == 220:
                self._state = State.TLS_PENDING  # RFC 3207 §4: negotiate now
                self._pending.clear()
            case Command.DATA if code == 354:
                self._state = State.DATA  # RFC 5321 §4.1.1.4
            case Command.AUTH if code != 334:
                self._auth_steps.clear()
            case _:
                pass

    def _close(self) -> None:
        self._state = State.CLOSED
        self._buf = bytearray()
        self._lines = []
        self._auth_steps.clear()


def _path(address: str, utf8: bool) -> str:
    # Addresses come canonical from our own parser; this guards the command line anyway.
    if _CONTROL.search(address):
        raise ValueError("address contains control characters")
    if not utf8 and not address.isascii():
        raise ValueError("a non-ASCII address needs SMTPUTF8 (RFC 6531)")
    return f"<{address}>"


def _capabilities(lines: tuple[str, ...]) -> dict[str, str]:
    caps: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):  # pre-RFC 4954 form some servers still send
            keyword, params = "AUTH", keyword[5:] + (" " + params if params else "")
        if keyword and keyword not in caps:
            caps[keyword] = params.strip()
    return caps


def _make_reply(code: int, texts: list[str]) -> Reply:
    """A ``Reply`` from untrusted text: enhanced code split off (RFC 2034 §4), lines cut."""
    enhanced: str | None = None
    m = _ENHANCED.match(texts[0]) if texts else None
    if m and m.group(1) == str(code)[0]:
        enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        texts = [t[len(enhanced) :].lstrip(" ") if t.startswith(enhanced) else t for t in texts]
    prefix = 4 + (len(enhanced) + 1 if enhanced else 0) + 2  # "250-" "x.y.z " ... CRLF
    room = MAX_REPLY_LINE - prefix
    cut = [t.encode("utf-8")[:room].decode("utf-8", "ignore") for t in texts]
    return Reply(code, enhanced, tuple(cut) or ("",))
