"""The probe's minimal SMTP exchange, sans-IO: replies in, command lines out.

Only what a connection-security check needs: the greeting, EHLO (RFC 5321 §4.1.1.1) with
its keywords, STARTTLS (RFC 3207), one AUTH PLAIN attempt, NOOP and QUIT. The outbound
queue's full client core (``smtp/client.py``) rightly refuses what a probe must do — AUTH
before TLS (with fake credentials, ``--active``) and a command pipelined after STARTTLS
(the injection test) — so the probe keeps this small exchange of its own.

Invariants:
- No I/O: imports none of asyncio, ssl, socket, logging or postkeep.store.
- Lines are limited (``MAX_LINE``) and so are multi-line replies (``MAX_LINES``).
- After a 220 to STARTTLS nothing more is parsed: ``start_tls()`` returns every byte
  received after it (sent before the handshake: the response-injection class), and
  forgets the EHLO keywords (RFC 3207 §4.2: the client MUST discard them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum, auto

MAX_LINE = 4096
MAX_LINES = 200


class SmtpProtocolError(Exception):
    """The server's replies cannot be parsed; the connection is useless."""


class NeedData(Enum):
    NEED_DATA = auto()


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class SmtpReply:
    command: str  # "GREETING", "EHLO", "STARTTLS", "AUTH", "NOOP", "QUIT"
    code: int
    lines: tuple[str, ...]  # the text of each line, without the code

    @property
    def text(self) -> str:
        return " ".join(self.lines)


class SmtpExchange:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._pending: deque[str] = deque(["GREETING"])
        self._lines: list[str] = []
        self.keywords: dict[str, tuple[str, ...]] = {}  # EHLO keywords → their parameters
        self.tls_pending = False
        self.closed = False

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_reply(self) -> SmtpReply | NeedData | None:
        """The next complete reply, ``NEED_DATA``, or None at end of stream."""
        if self.tls_pending:
            raise RuntimeError("the server agreed to STARTTLS: call start_tls() first")
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    raise SmtpProtocolError("reply line too long")
                if self._eof:
                    self.closed = True
                    return None
                return NEED_DATA
            if end + 1 > MAX_LINE:
                raise SmtpProtocolError("reply line too long")
            line = bytes(self._buffer[:end]).rstrip(b"\r").decode("utf-8", "replace")
            del self._buffer[: end + 1]
            # RFC 5321 §4.2: "ddd-text" continues, "ddd text" (or "ddd") ends the reply.
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                raise SmtpProtocolError("a reply line without a three-digit code")
            if len(self._lines) >= MAX_LINES:
                raise SmtpProtocolError("multi-line reply too long")
            self._lines.append(line[4:])
            if line[3:4] == "-":
                continue
            lines, self._lines = tuple(self._lines), []
            command = self._pending.popleft() if self._pending else "UNSOLICITED"
            reply = SmtpReply(command, int(line[:3]), lines)
            if command == "EHLO" and reply.code == 250:
                self.keywords = {}
                for entry in lines[1:]:
                    words = entry.upper().split()
                    if words:
                        self.keywords[words[0]] = tuple(words[1:])
            elif command == "STARTTLS" and reply.code == 220:
                self.tls_pending = True
            return reply

    def send(self, command: str, argument: str = "") -> bytes:
        """Render ``command argument`` and expect its reply."""
        line = f"{command} {argument}" if argument else command
        if any(c in line for c in "\r\n\0"):
            raise ValueError("CR, LF and NUL cannot be sent in a command")
        self._pending.append(command.upper())
        return f"{line}\r\n".encode()

    def start_tls(self) -> bytes:
        if not self.tls_pending:
            raise RuntimeError("start_tls() is only valid after 220 to STARTTLS")
        dropped = bytes(self._buffer)
        self._buffer.clear()
        self._pending.clear()
        self._lines = []
        self.keywords = {}
        self.tls_pending = False
        return dropped

    @property
    def auth_mechanisms(self) -> tuple[str, ...]:
        return self.keywords.get("AUTH", ())

    @property
    def starttls_offered(self) -> bool:
        return "STARTTLS" in self.keywords
