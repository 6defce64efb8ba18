"""A small sans-IO POP3 client core: greeting, CAPA, STLS, USER/PASS, NOOP, QUIT.

Enough POP3 for ``postkeep probe`` (and tests) to learn what a server offers before and
after STLS (RFC 2449 CAPA, RFC 2595 §4 STLS). Commands may be pipelined; replies are
matched to them in order. The driver moves bytes::

    client = Pop3Client()
    client.receive_data(await read())       # until next_event() is the Greeting
    write(client.send(Capa()))
    ... Reply(command="CAPA", ok=True, lines=("USER", "STLS", …))
    write(client.send(Stls()))
    ... Reply(command="STLS", ok=True) → dropped = client.start_tls(); handshake

Invariants:
- No I/O: imports none of asyncio, ssl, socket, logging or postkeep.store.
- A line longer than ``max_line``, or a multi-line reply longer than ``max_lines`` lines,
  raises ``ProtocolError``.
- After ``+OK`` to STLS nothing more is parsed: ``next_event()`` raises ``UsageError``
  until ``start_tls()``, which returns every byte received after the ``+OK`` (sent before
  the handshake: not to be trusted — the client-side mirror image of RFC 2595 §4 and
  CVE-2011-0411) and forgets the capabilities (RFC 2595 §4: they may differ over TLS).
- The password of ``Pass`` never appears in a ``repr``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum, auto

__all__ = [
    "NEED_DATA",
    "Capa",
    "Command",
    "ConnectionClosed",
    "Greeting",
    "Noop",
    "Pass",
    "Pop3Client",
    "ProtocolError",
    "Quit",
    "Reply",
    "Stls",
    "UsageError",
    "User",
]

MAX_LINE = 8192
MAX_LINES = 1000


class ProtocolError(Exception):
    """The server broke POP3 framing or a limit; the connection is useless."""


class UsageError(Exception):
    """The driver used the core wrongly (a bug here, not the server's doing)."""


@dataclass(frozen=True, slots=True)
class Capa:
    pass


@dataclass(frozen=True, slots=True)
class Stls:
    pass


@dataclass(frozen=True, slots=True)
class User:
    name: str


@dataclass(frozen=True, slots=True)
class Pass:
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Noop:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


Command = Capa | Stls | User | Pass | Noop | Quit

#: Commands whose +OK reply is multi-line (RFC 2449 §5: CAPA).
_MULTI_LINE = frozenset({"CAPA"})


class NeedData(Enum):
    NEED_DATA = auto()


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Greeting:
    ok: bool
    text: str


@dataclass(frozen=True, slots=True)
class Reply:
    command: str  # the command this answers: "CAPA", "STLS", "USER" …
    ok: bool
    code: str | None  # RFC 2449 §8 extended response code without brackets: "AUTH", "SYS/TEMP"
    text: str
    lines: tuple[str, ...] = ()  # the body of a multi-line +OK, dot-unstuffed


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    pass


Event = Greeting | Reply | ConnectionClosed


class State(Enum):
    GREETING = auto()
    READY = auto()
    TLS_PENDING = auto()
    CLOSED = auto()


def _status(line: str) -> tuple[bool, str | None, str]:
    if line.startswith("+OK"):
        ok, rest = True, line[3:]
    elif line.startswith("-ERR"):
        ok, rest = False, line[4:]
    else:
        raise ProtocolError("a reply that is neither +OK nor -ERR")
    rest = rest.strip()
    if rest.startswith("["):
        end = rest.find("]")
        if end > 0:
            return ok, rest[1:end], rest[end + 1 :].strip()
    return ok, None, rest


class Pop3Client:
    def __init__(
        self, *, tls_active: bool = False, max_line: int = MAX_LINE, max_lines: int = MAX_LINES
    ) -> None:
        self.tls_active = tls_active
        self.max_line = max_line
        self.max_lines = max_lines
        self.state = State.GREETING
        #: CAPA as a mapping: {"SASL": ("PLAIN", "LOGIN"), "USER": (), "STLS": ()}.
        self.capabilities: dict[str, tuple[str, ...]] = {}
        self._buffer = bytearray()
        self._eof = False
        self._pending: deque[str] = deque()
        self._multi: tuple[str, bool, str | None, str, list[str]] | None = None

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buffer += data
        else:
            self._eof = True

    def _take_line(self) -> str | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > self.max_line:
                raise ProtocolError("reply line too long")
            return None
        if end + 1 > self.max_line:
            raise ProtocolError("reply line too long")
        raw = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return raw.rstrip(b"\r\n").decode("utf-8", "replace")

    def next_event(self) -> Event | NeedData:
        if self.state is State.TLS_PENDING:
            raise UsageError("the server agreed to STLS: call start_tls() first")
        while True:
            if self.state is State.CLOSED:
                return ConnectionClosed()
            line = self._take_line()
            if line is None:
                if self._eof:
                    self.state = State.CLOSED
                    return ConnectionClosed()
                return NEED_DATA
            if self.state is State.GREETING:
                ok, _, text = _status(line)
                self.state = State.READY if ok else State.CLOSED
                return Greeting(ok, text)
            if self._multi is not None:
                command, ok, code, text, lines = self._multi
                if line == ".":
                    self._multi = None
                    return self._finish(Reply(command, ok, code, text, tuple(lines)))
                if len(lines) >= self.max_lines:
                    raise ProtocolError("multi-line reply too long")
                # RFC 1939 §3: a line starting with "." has it doubled.
                lines.append(line[1:] if line.startswith("..") else line)
                continue
            if not self._pending:
                raise ProtocolError("a reply to no command")
            command = self._pending.popleft()
            ok, code, text = _status(line)
            if ok and command in _MULTI_LINE:
                self._multi = (command, ok, code, text, [])
                continue
            return self._finish(Reply(command, ok, code, text))

    def _finish(self, reply: Reply) -> Reply:
        if reply.command == "CAPA" and reply.ok:
            caps: dict[str, tuple[str, ...]] = {}
            for entry in reply.lines:
                words = entry.split()
                if words:
                    caps[words[0].upper()] = tuple(w.upper() for w in words[1:])
            self.capabilities = caps
        elif reply.command == "STLS" and reply.ok:
            self.state = State.TLS_PENDING  # RFC 2595 §4: negotiate TLS now, parse nothing
        elif reply.command == "QUIT":
            self.state = State.CLOSED
        return reply

    def send(self, command: Command) -> bytes:
        if self.state is not State.READY:
            raise UsageError(f"cannot send a command in state {self.state.name}")
        match command:
            case Capa():
                name, line = "CAPA", "CAPA"
            case Stls():
                name, line = "STLS", "STLS"
            case User(user):
                name, line = "USER", f"USER {user}"
            case Pass(password):
                name, line = "PASS", f"PASS {password}"
            case Noop():
                name, line = "NOOP", "NOOP"
            case Quit():
                name, line = "QUIT", "QUIT"
        if any(c in line for c in "\r\n\0"):
            raise UsageError("CR, LF and NUL cannot be sent in a command")
        self._pending.append(name)
        return f"{line}\r\n".encode()

    def start_tls(self) -> bytes:
        """After ``+OK`` to STLS: forget capabilities; return (to drop) unread bytes."""
        if self.state is not State.TLS_PENDING:
            raise UsageError("start_tls() is only valid after the server's +OK to STLS")
        dropped = bytes(self._buffer)
        self._buffer.clear()
        self._pending.clear()
        self.capabilities = {}
        self.tls_active = True
        self.state = State.READY
        return dropped

    @property
    def sasl_mechanisms(self) -> tuple[str, ...]:
        return self.capabilities.get("SASL", ())

    @property
    def user_offered(self) -> bool:
        return "USER" in self.capabilities

    @property
    def stls_offered(self) -> bool:
        return "STLS" in self.capabilities
