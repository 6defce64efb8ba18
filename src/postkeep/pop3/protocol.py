"""The POP3 server core, sans-IO: bytes in, typed events out; replies in, bytes out.

``Pop3Server`` owns the receive buffer, the command grammar (RFC 1939 §3, RFC 2449 §3),
every limit, and the state machine (RFC 1939 §3: AUTHORIZATION, TRANSACTION, UPDATE),
extended with the SASL exchange of RFC 5034 and the STLS upgrade of RFC 2595 §4. It
answers the protocol questions itself (is this command known, legal in this state, legal
before TLS, well formed) by raising :class:`ProtocolError` with the reply to send. The
session answers the policy questions (is this password right, does message 3 exist) by
replying to the events. The driver moves the bytes::

    out = core.greet()
    while True:
        try:
            event = core.next_event()
        except ProtocolError as exc:
            write(core.send(exc.hint))            # closes when exc.hint.closes
            continue
        if event is NEED_DATA: flush(); core.receive_data(await read()); continue
        if isinstance(event, ConnectionClosed): break   # no UPDATE: nothing is deleted
        reply = await session.handle(event)       # Capa may be answered with core.capa_reply()
        write(core.send(reply))
        if isinstance(event, Stls) and reply.ok: upgrade(core.start_tls())
        if reply.closes: break

Line endings: a command line ends at LF, and one CR right before the LF is dropped. A
bare LF is accepted because POP3 clients have long been lenient (telnet and scripts send
it) and the client sends no message content in POP3, so there is nothing for two parsers
to disagree about (the SMTP smuggling class needs a DATA body). Any other CR, and every
control character, is refused inside a command line.

Invariants:

- No I/O and no ``asyncio``, ``ssl``, ``socket``, ``logging`` or ``postkeep.store``.
- ``next_event()`` returns no new event until the previous one (or the previous
  ``ProtocolError``) has had exactly one ``send()``; misuse raises ``RuntimeError``.
  ``ConnectionClosed`` needs no reply. After ``+OK`` to ``Stls``, nothing is parsed until
  ``start_tls()`` has dropped every buffered byte (RFC 2595 §4; CVE-2011-0411).
- Arbitrary input yields events or ``ProtocolError``, nothing else; after ``NEED_DATA``
  the buffer holds less than one line limit (``Limits.line_length``, or
  ``Limits.auth_line_length`` for AUTH lines), so memory per connection is bounded.
- Credentials are refused before TLS when TLS is required: USER, PASS and AUTH get
  ``-ERR [AUTH] <hint>`` and CAPA lists neither USER nor SASL (RFC 2595 §2.3, RFC 8314).
- State changes only through :data:`ON_COMMAND` (when a command is read) and
  :data:`TRANSITIONS` (when our reply is sent), plus CLOSED on a closing reply or EOF.
  TRANSACTION is reached only by a ``+OK`` to PASS or AUTH.
- PASS is accepted only right after a USER that got ``+OK`` (RFC 1939 §7).
- No password or SASL payload appears in an event's ``repr``, and no client data in a
  ``ProtocolError`` reply: every error text is a fixed sentence from ``replies``.
- Every ``-ERR`` sent (the core's and the session's) counts against ``Limits.errors``;
  once the budget is spent, the next command other than QUIT gets a closing ``-ERR``.
  ``Limits.commands`` caps the command lines of one connection the same way.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

from postkeep.pop3 import replies
from postkeep.pop3.replies import Reply
from postkeep.sasl.mechanisms import Credentials, plain_credentials

__all__ = [
    "COMMANDS",
    "NEED_DATA",
    "ON_COMMAND",
    "TRANSITIONS",
    "AuthResponse",
    "AuthStart",
    "Capa",
    "ConnectionClosed",
    "Dele",
    "Event",
    "Limits",
    "List",
    "NeedData",
    "Noop",
    "Outcome",
    "Pass",
    "Pop3Server",
    "ProtocolError",
    "Quit",
    "Retr",
    "Rset",
    "Stat",
    "State",
    "Stls",
    "Top",
    "Uidl",
    "User",
]


class State(Enum):
    """RFC 1939 §3 states, plus a SASL exchange in progress and the end."""

    AUTHORIZATION = auto()
    AUTH_EXCHANGE = auto()  # RFC 5034 §4: between "+ challenge" and the final +OK/-ERR
    TRANSACTION = auto()
    UPDATE = auto()  # RFC 1939 §6: QUIT read in TRANSACTION; the session is deleting
    CLOSED = auto()


#: RFC 2449 §4: a server MUST accept command lines of 255 octets including CRLF.
MIN_LINE_LENGTH: Final = 255
#: Largest message number or TOP line count: fits a signed 32-bit integer everywhere.
MAX_NUMBER: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the core enforces. Line lengths include the CRLF."""

    #: Command lines. RFC 2449 §4 requires 255; generous but bounded.
    line_length: int = 1024
    #: AUTH command lines and SASL response lines: RFC 5034 §4 exempts them from the
    #: command limit (they must fit the mechanism). PLAIN with 1 KiB fields needs ~4.1 KiB.
    auth_line_length: int = 8192
    #: ``-ERR`` replies (ours and the session's) before the connection is closed.
    errors: int = 10
    #: Command lines per connection.
    commands: int = 10_000

    def __post_init__(self) -> None:
        if self.line_length < MIN_LINE_LENGTH:
            raise ValueError(f"RFC 2449 §4: line_length must be at least {MIN_LINE_LENGTH}")
        if self.auth_line_length < self.line_length:
            raise ValueError("auth_line_length must be at least line_length")
        if self.errors < 1 or self.commands < 1:
            raise ValueError("errors and commands must be at least 1")


# -- events -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Event:
    """Something the client did. Every event but ConnectionClosed needs one ``send()``."""


@dataclass(frozen=True, slots=True)
class Capa(Event):
    """RFC 2449 §5. The session may answer with ``core.capa_reply()``."""


@dataclass(frozen=True, slots=True)
class Stls(Event):
    """RFC 2595 §4. Answer ``replies.BEGIN_TLS``, then call ``core.start_tls()``."""


@dataclass(frozen=True, slots=True)
class User(Event):
    """RFC 1939 §7."""

    name: str


@dataclass(frozen=True, slots=True)
class Pass(Event):
    """RFC 1939 §7. The password is the rest of the line, spaces included."""

    # DESIGN.md §5: never a password in a log line or a traceback.
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthStart(Event):
    """RFC 5034 §4: ``AUTH mechanism [initial-response]``.

    ``mechanism`` is upper-case and one we advertise. ``initial`` is the decoded initial
    response, ``b""`` for ``=``, ``None`` when absent.
    """

    mechanism: str
    initial: bytes | None = field(repr=False)  # a PLAIN payload holds the password


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """RFC 5034 §4: the client's decoded answer to a challenge; ``None`` is ``*`` (cancel)."""

    data: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class Stat(Event):
    """RFC 1939 §5."""


@dataclass(frozen=True, slots=True)
class List(Event):
    """RFC 1939 §5. ``msg`` None lists every message (multi-line reply)."""

    msg: int | None


@dataclass(frozen=True, slots=True)
class Retr(Event):
    """RFC 1939 §5."""

    msg: int


@dataclass(frozen=True, slots=True)
class Dele(Event):
    """RFC 1939 §5."""

    msg: int


@dataclass(frozen=True, slots=True)
class Noop(Event):
    """RFC 1939 §5."""


@dataclass(frozen=True, slots=True)
class Rset(Event):
    """RFC 1939 §5."""


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """RFC 1939 §4, §6. In TRANSACTION the core is in UPDATE until the reply: delete, then
    answer ``replies.signing_off()`` (or ``replies.UPDATE_FAILED``). The reply must close.
    """


@dataclass(frozen=True, slots=True)
class Top(Event):
    """RFC 1939 §7."""

    msg: int
    lines: int


@dataclass(frozen=True, slots=True)
class Uidl(Event):
    """RFC 1939 §7. ``msg`` None lists every message (multi-line reply)."""

    msg: int | None


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The client closed its side. RFC 1939 §6: no UPDATE, so nothing is deleted."""


class NeedData(Enum):
    """The type of :data:`NEED_DATA`."""

    NEED_DATA = auto()


#: ``next_event()`` needs more bytes: flush the replies written so far, then read.
NEED_DATA: Final = NeedData.NEED_DATA


class ProtocolError(Exception):
    """The client broke a protocol rule; send ``hint`` (close after it if ``hint.closes``).

    ``leaked``: USER then PASS, or AUTH PLAIN with an initial response, refused because TLS
    had not started: the credentials crossed the wire in plaintext, and the driver may
    check them to warn the owner (``auth/exposure.py``). The hint does not depend on them.
    """

    def __init__(self, hint: Reply, leaked: Credentials | None = None) -> None:
        super().__init__(hint.text)
        self.hint = hint
        self.leaked = leaked


class Outcome(Enum):
    """How our reply went, for :data:`TRANSITIONS`."""

    OK = auto()
    ERR = auto()
    CHALLENGE = auto()


# -- the state machine, as data -------------------------------------------------------------
#: The commands each state accepts; any other known command gets :data:`WRONG_STATE`.
COMMANDS: Final[Mapping[State, frozenset[str]]] = {
    # RFC 1939 §4 (USER, PASS, APOP, QUIT), RFC 5034 §4 (AUTH), RFC 2595 §4 (STLS), RFC
    # 2449 §5 (CAPA: "valid in both states").
    State.AUTHORIZATION: frozenset({"USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT"}),
    # RFC 1939 §5 and §7.
    State.TRANSACTION: frozenset(
        {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "CAPA", "QUIT"}
    ),
}
KNOWN_COMMANDS: Final[frozenset[str]] = frozenset().union(*COMMANDS.values())

#: The answer to a known command outside its state.
WRONG_STATE: Final[Mapping[State, Reply]] = {
    State.AUTHORIZATION: replies.LOGIN_FIRST,
    State.TRANSACTION: replies.ALREADY_LOGGED_IN,
}

#: Commands that carry or announce credentials: refused before TLS where TLS is required
#: (RFC 2595 §2.3; RFC 8314 §3). USER too: we never invite a password in plaintext.
CREDENTIAL_COMMANDS: Final = frozenset({"USER", "PASS", "AUTH"})

#: State changes when a command is read, before any reply.
ON_COMMAND: Final[Mapping[tuple[State, type[Event]], State]] = {
    # RFC 1939 §6: QUIT from TRANSACTION enters UPDATE; the session deletes, then replies.
    (State.TRANSACTION, Quit): State.UPDATE,
}

#: State changes made by our reply. A (state, event, outcome) not listed leaves the state
#: as it is; a challenge is legal only where listed. Any closing reply goes to CLOSED.
TRANSITIONS: Final[Mapping[tuple[State, type[Event], Outcome], State]] = {
    # RFC 1939 §7 (PASS), RFC 5034 §4 (AUTH): +OK opens the maildrop.
    (State.AUTHORIZATION, Pass, Outcome.OK): State.TRANSACTION,
    (State.AUTHORIZATION, AuthStart, Outcome.OK): State.TRANSACTION,
    (State.AUTHORIZATION, AuthStart, Outcome.CHALLENGE): State.AUTH_EXCHANGE,
    (State.AUTH_EXCHANGE, AuthResponse, Outcome.CHALLENGE): State.AUTH_EXCHANGE,
    (State.AUTH_EXCHANGE, AuthResponse, Outcome.OK): State.TRANSACTION,
    # RFC 5034 §4: a failed or cancelled exchange goes back to AUTHORIZATION.
    (State.AUTH_EXCHANGE, AuthResponse, Outcome.ERR): State.AUTHORIZATION,
    # RFC 1939 §4: QUIT in AUTHORIZATION ends the session without UPDATE.
    (State.AUTHORIZATION, Quit, Outcome.OK): State.CLOSED,
    (State.AUTHORIZATION, Quit, Outcome.ERR): State.CLOSED,
    # RFC 1939 §6: after UPDATE, +OK or -ERR, the connection closes.
    (State.UPDATE, Quit, Outcome.OK): State.CLOSED,
    (State.UPDATE, Quit, Outcome.ERR): State.CLOSED,
}

#: RFC 4422 §3.1: a SASL mechanism name is 1-20 of A-Z, 0-9, "-" and "_".
_MECHANISM = re.compile(r"[A-Z0-9_-]{1,20}")
#: ASCII digits only (str.isdigit() would accept "²" and other Unicode digits).
_NUMBER = re.compile(r"[0-9]{1,10}")
#: C0 controls, DEL and C1 controls. PASS is exempt but for NUL and CR (a password may
#: hold anything SASL PLAIN allows, and it should work the same with PASS).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PRINTABLE = re.compile(r"[\x20-\x7e]+")

#: The correct form of each command, for syntax errors.
USAGE: Final[Mapping[str, str]] = {
    "USER": "USER <name>",
    "PASS": "PASS <password>",
    "AUTH": "AUTH <mechanism> [<initial response>]",
    "STLS": "STLS",
    "CAPA": "CAPA",
    "QUIT": "QUIT",
    "STAT": "STAT",
    "LIST": "LIST [<message>]",
    "RETR": "RETR <message>",
    "DELE": "DELE <message>",
    "NOOP": "NOOP",
    "RSET": "RSET",
    "TOP": "TOP <message> <lines>",
    "UIDL": "UIDL [<message>]",
}
#: Replies for syntax errors, built once.
_SYNTAX: Final[Mapping[str, Reply]] = {k: replies.syntax_error(v) for k, v in USAGE.items()}
_NO_ARGUMENT: Final[Mapping[str, type[Event]]] = {
    "STLS": Stls,
    "CAPA": Capa,
    "QUIT": Quit,
    "STAT": Stat,
    "NOOP": Noop,
    "RSET": Rset,
}


class _ErrorPending:
    """Marks that a ProtocolError was raised and its reply is due."""


_ERROR_PENDING: Final = _ErrorPending()

DEFAULT_STARTTLS_HINT: Final = (
    "Use STLS first, or SSL/TLS on port 995: passwords are never sent unencrypted"
)


class Pop3Server:
    """One POP3 server connection's protocol state. See the module docstring."""

    def __init__(
        self,
        *,
        limits: Limits,
        tls_active: bool,
        tls_offered: bool,
        require_tls: bool,
        implementation: str = "postkeep",
        starttls_hint: str = DEFAULT_STARTTLS_HINT,
        sasl_mechanisms: Sequence[str] = ("PLAIN",),
    ) -> None:
        # RFC 2449 §5: a capability line is at most 512 octets with its CRLF.
        if not _PRINTABLE.fullmatch(implementation) or len(implementation) > 400:
            raise ValueError("implementation must be printable ASCII, at most 400 characters")
        for mechanism in sasl_mechanisms:
            if not _MECHANISM.fullmatch(mechanism):
                raise ValueError(f"not a SASL mechanism name (RFC 4422 §3.1): {mechanism!r}")
        self.limits = limits
        self.tls_offered = tls_offered
        self.require_tls = require_tls
        self.implementation = implementation
        self.sasl_mechanisms: tuple[str, ...] = tuple(sasl_mechanisms)
        self._tls_required = replies.tls_required(starttls_hint)  # validates the hint
        self._tls_active = tls_active
        self._state = State.AUTHORIZATION
        self._buffer = bytearray()
        self._eof = False
        self._discarding = False  # dropping the rest of an over-long line
        self._pending: Event | _ErrorPending | None = None
        self._tls_pending = False  # +OK sent to STLS, start_tls() not called yet
        self._user_ok = False  # the last command was a USER that got +OK
        # The name of the last command if it was a USER refused before TLS: a PASS right
        # after it leaked a password for that name.
        self._refused_user: str | None = None
        self._errors = 0
        self._commands = 0

    # -- read-only views ------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def buffered(self) -> int:
        """Octets received and not yet parsed (for tests and metrics)."""
        return len(self._buffer)

    @property
    def errors(self) -> int:
        """``-ERR`` replies sent so far."""
        return self._errors

    # -- output ------------------------------------------------------------------------------
    def greet(self, text: str = "postkeep ready") -> bytes:
        """RFC 1939 §4: ``+OK <text>``, no APOP timestamp (we keep no plaintext passwords)."""
        return replies.greeting(text).render()

    def credentials_allowed(self) -> bool:
        """RFC 2595 §2.3: may a password be sent now?"""
        return self._tls_active or not self.require_tls

    def capabilities(self) -> list[str]:
        """RFC 2449 §5-§6: the CAPA lines valid now.

        The list depends on TLS, not on the login state: RFC 2449 §6 has every capability
        announced in AUTHORIZATION also announced in TRANSACTION (IANA's registry: USER,
        SASL and STLS are "both", with no differences between states).
        """
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.tls_offered and not self._tls_active:
            caps.append("STLS")  # RFC 2595 §4
        if self.credentials_allowed():
            caps.append("USER")  # RFC 2449 §6.2
            if self.sasl_mechanisms:
                caps.append("SASL " + " ".join(self.sasl_mechanisms))  # RFC 2449 §6.3
        caps.append(f"IMPLEMENTATION {self.implementation}")  # RFC 2449 §6.9
        return caps

    def capa_reply(self) -> Reply:
        """RFC 2449 §5: the full ``+OK`` multi-line answer to CAPA."""
        lines = [c.encode("ascii") for c in self.capabilities()]
        for line in lines:
            if len(line) + 2 > replies.MAX_FIRST_LINE:
                raise ValueError("RFC 2449 §5: capability line longer than 512 octets")
        return replies.multiline(replies.CAPABILITIES_FOLLOW, lines)

    def send(self, reply: Reply) -> bytes:
        """Render our reply to the pending event or ProtocolError, and advance the state."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("send() without a pending event or protocol error")
        if isinstance(pending, _ErrorPending):
            if reply.ok:
                raise RuntimeError("a ProtocolError is answered with -ERR (its hint)")
            outcome = Outcome.ERR
            next_state = self._state
        else:
            self._check_reply(pending, reply)
            if reply.challenge:
                outcome = Outcome.CHALLENGE
            else:
                outcome = Outcome.OK if reply.ok else Outcome.ERR
            next_state = TRANSITIONS.get((self._state, type(pending), outcome), self._state)
            # RFC 1939 §7: PASS is legal only right after USER's +OK.
            self._user_ok = isinstance(pending, User) and outcome is Outcome.OK
            if isinstance(pending, Stls) and outcome is Outcome.OK and not reply.closes:
                self._tls_pending = True
        self._pending = None
        if outcome is Outcome.ERR:
            self._errors += 1
        if reply.closes:
            next_state = State.CLOSED
        if next_state is State.CLOSED:
            self._buffer.clear()  # nothing after the end is ever parsed
        self._state = next_state
        return reply.render()

    def _check_reply(self, event: Event, reply: Reply) -> None:
        if reply.challenge:
            if (self._state, type(event), Outcome.CHALLENGE) not in TRANSITIONS:
                raise RuntimeError(f"a SASL challenge does not answer {type(event).__name__}")
            return
        if reply.ok and (reply.lines is not None or reply.body is not None) != _multiline(event):
            raise RuntimeError(f"wrong reply form (single/multi-line) for {event!r}")
        if isinstance(event, Quit) and not reply.closes:
            raise RuntimeError("the reply to QUIT must close the connection (closes=True)")

    # -- input -------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; ``b""`` means the client closed its side."""
        if self._eof:
            if data:
                raise RuntimeError("receive_data() after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._state is State.CLOSED:
            return  # nothing more will be parsed
        self._buffer += data

    def start_tls(self) -> bytes:
        """After ``+OK`` to STLS: drop and return every unread byte; TLS is now active.

        RFC 2595 §4: the server stays in AUTHORIZATION, and anything the client sent before
        the handshake was sent before our go-ahead: it is never parsed (CVE-2011-0411).
        """
        if not self._tls_pending:
            raise RuntimeError("start_tls() is only legal right after +OK to STLS")
        dropped = bytes(self._buffer)
        self._buffer.clear()
        self._discarding = False
        self._tls_pending = False
        self._tls_active = True
        self._user_ok = False
        self._refused_user = None
        return dropped

    def next_event(self) -> Event | NeedData:
        """The next client event, ``NEED_DATA``, or a raised :class:`ProtocolError`."""
        if self._pending is not None:
            raise RuntimeError("send() a reply to the previous event first")
        if self._tls_pending:
            raise RuntimeError("call start_tls() after the +OK to STLS")
        if self._state is State.CLOSED:
            return ConnectionClosed()
        line = self._next_line()
        if line is None:
            if self._eof:
                self._buffer.clear()  # a partial last line is not a command
                self._state = State.CLOSED
                return ConnectionClosed()
            return NEED_DATA
        self._commands += 1
        # QUIT ends the session anyway, and ending it with QUIT keeps the deletions
        # (RFC 1939 §6): the budgets never refuse it.
        quitting = self._state is not State.AUTH_EXCHANGE and _is_quit(line)
        if self._commands > self.limits.commands and not quitting:
            raise self._error(replies.TOO_MANY_COMMANDS)
        if self._errors >= self.limits.errors and not quitting:
            raise self._error(replies.TOO_MANY_ERRORS)
        event: Event
        if self._state is State.AUTH_EXCHANGE:
            event = self._auth_response(line)
        else:
            event = self._command(line)
        self._state = ON_COMMAND.get((self._state, type(event)), self._state)
        self._pending = event
        return event

    # -- internals ---------------------------------------------------------------------------
    def _error(self, reply: Reply) -> ProtocolError:
        """Record that ``reply`` is due, end any SASL exchange, and build the exception."""
        self._pending = _ERROR_PENDING
        self._user_ok = False
        if self._state is State.AUTH_EXCHANGE:
            # RFC 5034 §4: a malformed response fails the AUTH command.
            self._state = State.AUTHORIZATION
        return ProtocolError(reply)

    def _line_limit(self) -> int:
        if self._state is State.AUTH_EXCHANGE:
            return self.limits.auth_line_length
        if self._state is State.AUTHORIZATION and bytes(self._buffer[:5]).upper() == b"AUTH ":
            return self.limits.auth_line_length  # RFC 5034 §4: the initial response
        return self.limits.line_length

    def _next_line(self) -> bytes | None:
        """One line without its line ending, or None; over-long lines raise and are dropped."""
        buf = self._buffer
        if self._discarding:
            end = buf.find(b"\n")
            if end < 0:
                buf.clear()
                return None
            del buf[: end + 1]
            self._discarding = False
        limit = self._line_limit()
        # The limit counts the line ending: the LF must be among the first `limit` octets.
        end = buf.find(b"\n", 0, limit)
        if end < 0:
            if len(buf) < limit:
                return None
            rest = buf.find(b"\n", limit)
            if rest < 0:
                buf.clear()
                self._discarding = True
            else:
                del buf[: rest + 1]
            raise self._error(replies.LINE_TOO_LONG)
        line = bytes(buf[:end])
        del buf[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line

    def _auth_response(self, line: bytes) -> AuthResponse:
        """RFC 5034 §4: a base64 line, or ``*`` to cancel."""
        if line == b"*":
            return AuthResponse(None)
        return AuthResponse(self._base64(line))

    def _base64(self, data: bytes | str) -> bytes:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise self._error(replies.AUTH_BAD_BASE64) from None

    def _command(self, raw: bytes) -> Event:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error(replies.NOT_UTF8) from None
        word, _, rest = line.partition(" ")
        # RFC 2449 §3: keywords are case-insensitive ASCII (upper() on non-ASCII could map
        # to ASCII, "ı".upper() == "I", so it is applied to ASCII only).
        keyword = word.upper() if word.isascii() else ""
        if keyword == "APOP":
            raise self._error(replies.APOP_UNSUPPORTED)
        if keyword not in KNOWN_COMMANDS:
            raise self._error(replies.UNKNOWN_COMMAND)
        if keyword not in COMMANDS.get(self._state, frozenset()):
            raise self._error(WRONG_STATE.get(self._state, replies.UNKNOWN_COMMAND))
        if keyword in CREDENTIAL_COMMANDS and not self.credentials_allowed():
            # RFC 2595 §2.3: refused the same way whatever they carry; what they carried
            # in plaintext goes to the driver (never into the reply).
            refused_user, self._refused_user = self._refused_user, None
            error = self._error(self._tls_required)
            if keyword == "USER":
                self._refused_user = rest.strip(" ") or None
            elif keyword == "PASS" and refused_user and rest:
                error.leaked = Credentials(refused_user, refused_user, rest)
            elif keyword == "AUTH":
                error.leaked = _leaked_plain(rest)
            raise error
        self._refused_user = None
        if keyword == "PASS":
            return self._pass(rest)
        self._user_ok = False
        if _CONTROL.search(rest):
            raise self._error(replies.CONTROL_CHARACTER)
        # RFC 1939 §3: arguments are separated by single spaces; extra spaces are tolerated.
        args = [a for a in rest.split(" ") if a]
        event_type = _NO_ARGUMENT.get(keyword)
        if event_type is not None:
            if args:
                raise self._error(_SYNTAX[keyword])
            if event_type is Stls:
                return self._stls()
            return event_type()
        match keyword, args:
            case "USER", [name]:
                return User(name)
            case "AUTH", []:
                raise self._error(replies.AUTH_MECHANISM_MISSING)
            case "AUTH", [mechanism, *more] if len(more) <= 1:
                return self._auth(mechanism, more[0] if more else None)
            case "LIST", []:
                return List(None)
            case "LIST", [msg]:
                return List(self._msg(msg))
            case "UIDL", []:
                return Uidl(None)
            case "UIDL", [msg]:
                return Uidl(self._msg(msg))
            case "RETR", [msg]:
                return Retr(self._msg(msg))
            case "DELE", [msg]:
                return Dele(self._msg(msg))
            case "TOP", [msg, lines]:
                return Top(self._msg(msg), self._number(lines, minimum=0, keyword="TOP"))
        raise self._error(_SYNTAX[keyword])

    def _pass(self, password: str) -> Pass:
        # RFC 1939 §7: PASS has exactly one argument, so spaces belong to the password.
        if not self._user_ok:
            raise self._error(replies.USER_FIRST)
        self._user_ok = False
        if not password:
            raise self._error(_SYNTAX["PASS"])
        if "\x00" in password or "\r" in password:
            raise self._error(replies.CONTROL_CHARACTER)
        return Pass(password)

    def _stls(self) -> Stls:
        # RFC 2595 §4: "-ERR" when TLS is already active or not available.
        if self._tls_active:
            raise self._error(replies.TLS_ALREADY_ACTIVE)
        if not self.tls_offered:
            raise self._error(replies.TLS_NOT_OFFERED)
        return Stls()

    def _auth(self, mechanism: str, initial: str | None) -> AuthStart:
        name = mechanism.upper()
        if not _MECHANISM.fullmatch(name) or name not in self.sasl_mechanisms:
            raise self._error(replies.AUTH_MECHANISM_UNSUPPORTED)
        if initial is None:
            return AuthStart(name, None)
        # RFC 5034 §4: "=" is an empty initial response.
        return AuthStart(name, b"" if initial == "=" else self._base64(initial))

    def _msg(self, arg: str) -> int:
        """RFC 1939 §5: a message number is a positive decimal integer."""
        number = _parse_number(arg, minimum=1)
        if number is None:
            raise self._error(replies.BAD_MESSAGE_NUMBER)
        return number

    def _number(self, arg: str, *, minimum: int, keyword: str) -> int:
        number = _parse_number(arg, minimum=minimum)
        if number is None:
            raise self._error(_SYNTAX[keyword])
        return number


def _leaked_plain(rest: str) -> Credentials | None:
    """``AUTH PLAIN <initial-response>`` (RFC 5034 §4, RFC 4616 §2): its credentials."""
    parts = rest.split(" ")
    if len(parts) != 2 or parts[0].upper() != "PLAIN":
        return None
    try:
        message = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    return plain_credentials(message) if message else None


def _parse_number(arg: str, *, minimum: int) -> int | None:
    if not _NUMBER.fullmatch(arg):
        return None
    number = int(arg)
    return number if minimum <= number <= MAX_NUMBER else None


def _is_quit(line: bytes) -> bool:
    return line.rstrip(b" ").upper() == b"QUIT"


def _multiline(event: Event) -> bool:
    """Does a ``+OK`` to ``event`` carry a body? (RFC 1939 §5, §7; RFC 2449 §5)."""
    match event:
        case Capa() | Retr() | Top():
            return True
        case List(msg=msg) | Uidl(msg=msg):
            return msg is None
    return False
