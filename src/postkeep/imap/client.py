"""A small sans-IO IMAP client core: greeting, CAPABILITY, STARTTLS, LOGIN, NOOP, LOGOUT.

Enough IMAP for ``postkeep probe`` (and tests) to ask a server what it offers and how it
upgrades, no more: no mailbox commands. The driver moves bytes::

    client = ImapClient()
    client.receive_data(await read())             # until next_event() is the Greeting
    write(client.send(Capability()))
    ... next_event() → Untagged("CAPABILITY …"), then Tagged(tag, "OK", …)
    write(client.send(StartTls()))
    ... Tagged(tag, "OK") for STARTTLS → dropped = client.start_tls(); handshake

Invariants:
- No I/O: imports none of asyncio, ssl, socket, logging or postkeep.store.
- A line longer than ``max_line`` (literals included) raises ``ProtocolError``; the buffer
  never holds more than that plus one ``receive_data`` chunk.
- After the tagged OK to STARTTLS nothing more is parsed: ``next_event()`` raises
  ``UsageError`` until ``start_tls()``, which returns every byte received after the OK —
  the server sent it before the handshake, so it is not to be trusted (the mirror image of
  RFC 2595 §3.1 / CVE-2011-0411, the response-injection class) — and forgets the
  capabilities (RFC 9051 §6.2.1: the client MUST discard cached capability information).
- The password of ``Login`` never appears in a ``repr``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum, auto

__all__ = [
    "NEED_DATA",
    "Capability",
    "Command",
    "ConnectionClosed",
    "Continuation",
    "Greeting",
    "ImapClient",
    "Login",
    "Logout",
    "Noop",
    "ProtocolError",
    "Raw",
    "StartTls",
    "Tagged",
    "Untagged",
    "UsageError",
]

MAX_LINE = 64 * 1024


class ProtocolError(Exception):
    """The server broke IMAP framing or a limit; the connection is useless."""


class UsageError(Exception):
    """The driver used the core wrongly (a bug here, not the server's doing)."""


# -- commands ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Capability:
    pass


@dataclass(frozen=True, slots=True)
class StartTls:
    pass


@dataclass(frozen=True, slots=True)
class Noop:
    pass


@dataclass(frozen=True, slots=True)
class Logout:
    pass


@dataclass(frozen=True, slots=True)
class Login:
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Raw:
    """A command line given as is (after the tag), for tests and the probe."""

    text: str


Command = Capability | StartTls | Noop | Logout | Login | Raw


# -- events --------------------------------------------------------------------------------
class NeedData(Enum):
    NEED_DATA = auto()


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Greeting:
    status: str  # "OK", "PREAUTH" or "BYE" (RFC 9051 §7.1)
    code: str | None  # the response code without brackets: "CAPABILITY IMAP4rev1 …"
    text: str


@dataclass(frozen=True, slots=True)
class Untagged:
    keyword: str  # "CAPABILITY", "BYE", "OK", "3" (for "* 3 EXISTS") …, upper case
    text: str  # the rest of the line (literals inlined)


@dataclass(frozen=True, slots=True)
class Tagged:
    tag: str
    command: str  # the command this answers: "CAPABILITY", "STARTTLS", "LOGIN" …
    status: str  # "OK", "NO" or "BAD"
    code: str | None
    text: str

    @property
    def ok(self) -> bool:
        return self.status == "OK"


@dataclass(frozen=True, slots=True)
class Continuation:
    text: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    pass


Event = Greeting | Untagged | Tagged | Continuation | ConnectionClosed


class State(Enum):
    GREETING = auto()  # waiting for the server's first line
    READY = auto()
    TLS_PENDING = auto()  # the server said OK to STARTTLS; call start_tls()
    CLOSED = auto()


_LITERAL = re.compile(rb"\{(\d{1,10})\+?\}\r\n$")
_STATUS = re.compile(r"(?i)^(OK|NO|BAD|PREAUTH|BYE)(?: (.*))?$")


def _split_code(text: str) -> tuple[str | None, str]:
    if text.startswith("["):
        end = text.find("]")
        if end > 0:
            return text[1:end], text[end + 1 :].strip()
    return None, text


class ImapClient:
    def __init__(self, *, tls_active: bool = False, max_line: int = MAX_LINE) -> None:
        self.tls_active = tls_active
        self.max_line = max_line
        self.state = State.GREETING
        self.capabilities: frozenset[str] = frozenset()
        self._buffer = bytearray()
        self._eof = False
        self._next_tag = 1
        self._pending: dict[str, str] = {}  # tag → command name

    # -- input ------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the server; ``b""`` means end of stream."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    def _take_line(self) -> bytes | None:
        """One response line with its literals inlined, or None when more data is needed."""
        pos = 0
        while True:
            end = self._buffer.find(b"\n", pos)
            if end < 0:
                if len(self._buffer) > self.max_line:
                    raise ProtocolError("response line too long")
                return None
            head = bytes(self._buffer[: end + 1])
            match = _LITERAL.search(head)
            if match is None or not head.endswith(b"\r\n"):
                if end + 1 > self.max_line:
                    raise ProtocolError("response line too long")
                del self._buffer[: end + 1]
                return head
            size = int(match.group(1))
            if end + 1 + size > self.max_line:
                raise ProtocolError("literal in a response is too long")
            if len(self._buffer) < end + 1 + size:
                return None
            pos = end + 1 + size  # the line goes on after the literal

    def next_event(self) -> Event | NeedData:
        if self.state is State.TLS_PENDING:
            raise UsageError("the server agreed to STARTTLS: call start_tls() first")
        if self.state is State.CLOSED:
            return ConnectionClosed()
        raw = self._take_line()
        if raw is None:
            if self._eof:
                self.state = State.CLOSED
                return ConnectionClosed()
            return NEED_DATA
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        if self.state is State.GREETING:
            return self._greeting(line)
        if line.startswith("+"):
            return Continuation(line[1:].strip())
        if line.startswith("* "):
            return self._untagged(line[2:])
        tag, _, rest = line.partition(" ")
        status = _STATUS.match(rest)
        if tag not in self._pending or status is None:
            raise ProtocolError("a response line that is neither untagged nor for our tag")
        command = self._pending.pop(tag)
        code, text = _split_code(status.group(2) or "")
        tagged = Tagged(tag, command, status.group(1).upper(), code, text)
        self._note_code(code)
        if command == "STARTTLS" and tagged.ok:
            self.state = State.TLS_PENDING  # RFC 9051 §6.2.1: negotiate TLS now, parse nothing
        return tagged

    def _greeting(self, line: str) -> Event:
        status = _STATUS.match(line[2:]) if line.startswith("* ") else None
        if status is None or status.group(1).upper() not in ("OK", "PREAUTH", "BYE"):
            raise ProtocolError("the greeting is not * OK, * PREAUTH or * BYE")
        code, text = _split_code(status.group(2) or "")
        self._note_code(code)
        word = status.group(1).upper()
        self.state = State.CLOSED if word == "BYE" else State.READY
        return Greeting(word, code, text)

    def _untagged(self, rest: str) -> Event:
        keyword, _, text = rest.partition(" ")
        keyword = keyword.upper()
        if keyword == "CAPABILITY":
            self.capabilities = frozenset(w.upper() for w in text.split())
        elif keyword in ("OK", "NO", "BAD", "BYE"):
            code, _ = _split_code(text)
            self._note_code(code)
        return Untagged(keyword, text)

    def _note_code(self, code: str | None) -> None:
        if code and code.upper().startswith("CAPABILITY "):
            self.capabilities = frozenset(w.upper() for w in code.split()[1:])

    # -- output -----------------------------------------------------------------------
    def send(self, command: Command) -> bytes:
        if self.state is not State.READY:
            raise UsageError(f"cannot send a command in state {self.state.name}")
        tag = f"p{self._next_tag}"
        self._next_tag += 1
        match command:
            case Capability():
                name, line = "CAPABILITY", "CAPABILITY"
            case StartTls():
                name, line = "STARTTLS", "STARTTLS"
            case Noop():
                name, line = "NOOP", "NOOP"
            case Logout():
                name, line = "LOGOUT", "LOGOUT"
            case Login(user, password):
                name, line = "LOGIN", f"LOGIN {_quote(user)} {_quote(password)}"
            case Raw(text):
                name, line = text.split(" ", 1)[0].upper(), text
        self._pending[tag] = name
        return f"{tag} {line}\r\n".encode()

    def start_tls(self) -> bytes:
        """After the OK to STARTTLS: forget capabilities; return (to drop) unread bytes."""
        if self.state is not State.TLS_PENDING:
            raise UsageError("start_tls() is only valid after the server's OK to STARTTLS")
        dropped = bytes(self._buffer)
        self._buffer.clear()
        self._pending.clear()
        self.capabilities = frozenset()
        self.tls_active = True
        self.state = State.READY
        return dropped

    # -- what the capabilities mean ---------------------------------------------------
    @property
    def auth_mechanisms(self) -> tuple[str, ...]:
        return tuple(sorted(c[5:] for c in self.capabilities if c.startswith("AUTH=")))

    @property
    def login_disabled(self) -> bool:
        return "LOGINDISABLED" in self.capabilities

    @property
    def starttls_offered(self) -> bool:
        return "STARTTLS" in self.capabilities


def _quote(value: str) -> str:
    """An IMAP quoted string (RFC 9051 §4.3); the probe's values never need a literal."""
    if any(c in value for c in "\r\n\0"):
        raise UsageError("CR, LF and NUL cannot be sent in a quoted string")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
