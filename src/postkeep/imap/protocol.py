"""The sans-IO IMAP server core: bytes in, typed events out; responses in, bytes out.

The driver (``server.py``) feeds received bytes with :meth:`ImapServer.receive_data` and
pulls events with :meth:`ImapServer.next_event`; the session (``session.py``) answers each
event, and the driver passes the answer through :meth:`ImapServer.send`, which checks that
it is legal now, advances the state, and returns the wire form (``list[bytes | BlobSlice]``).

What the core decides (protocol questions), so that no session can get it wrong:

- framing: lines end with CRLF; literals ``{n}`` (synchronising: the client waits for our
  ``+``) and ``{n+}`` (LITERAL+, RFC 7888: the bytes follow at once);
- every limit (:class:`Limits`): line length, literal sizes, total command size, nesting,
  sequence-set size, bad commands and commands per connection;
- which commands are valid in which state (:data:`VALID_IN`, data, RFC 3501 §3 and §6),
  and how our tagged replies move the state (:data:`TRANSITIONS`);
- connection security: LOGIN and AUTHENTICATE before TLS where TLS is required are
  answered ``NO [PRIVACYREQUIRED]`` here, never reach the session, and no password literal
  is read for them; STARTTLS drops every unread byte (RFC 9051 §6.2.1, RFC 2595 §3.1);
- the capabilities valid now (:meth:`ImapServer.capabilities`).

Event flow (``→`` an event, ``←`` what the session sends back):

- a complete command → its :class:`~postkeep.imap.grammar.Command` ← untagged data, then
  exactly one tagged status response;
- a synchronising literal inside a command → :class:`LiteralPending` ← :class:`ContinueLiteral`
  (the core sends ``+ Ready for literal``) or a tagged NO/BAD (the client will not send the
  literal; the command is over and reading resumes with the next command);
- APPEND → :class:`~postkeep.imap.grammar.Append` (mailbox, flags, date, size) *before* the
  message ← :class:`ContinueLiteral` or a tagged NO (``[TRYCREATE]``, ``[OVERQUOTA]``…); then
  :class:`AppendChunk` events of at most ``Limits.append_chunk`` octets (no reply), then
  :class:`AppendEnd` ← the tagged result. :class:`AppendAborted` means the command broke
  after the message: discard it and send ``event.response``;
- AUTHENTICATE → ``Authenticate`` ← ``Continuation`` (a challenge, see
  ``responses.auth_challenge``) or the tagged result; each client line → :class:`AuthResponse`
  ← the same choice; ``*`` or bad base64 → :class:`AuthAborted` ← ``event.response``;
- IDLE → ``Idle`` ← ``Continuation("idling")``; from then on untagged responses may be sent
  at any time, and the core reads only ``DONE`` → :class:`IdleDone` ← the tagged OK (or,
  when the client sent something else, ``event.response``, a BAD);
- anything the core refuses by itself → :class:`Rejected` ← ``event.response`` (a tagged
  BAD/NO, or ``* BAD`` when no tag could be read);
- end of input → :class:`ConnectionClosed`. Untagged responses (``* 3 EXISTS``, ``* BYE``)
  may be sent at any time; ``* BYE`` puts the core in LOGOUT.

Invariants:

- No I/O: imports none of asyncio, ssl, socket, logging or postkeep.store.
- ``next_event()`` returns no new event until the last one that needs a reply has had it
  (``AppendChunk`` and ``ConnectionClosed`` need none); calling it earlier, or calling
  ``send()`` with a reply that is not legal now, raises :class:`UsageError` — a bug in
  the caller, never the client's doing.
- Only :class:`ProtocolError` escapes ``next_event()`` because of the client (too many bad
  commands, too many commands); its ``hint`` is the ``* BYE`` to send before closing.
- After ``next_event()`` returns ``NEED_DATA``, the core holds at most ``max_line`` + 1
  octets of an unfinished line, or of an unfinished buffered literal at most
  ``max_small_literal``;
  a command's fragments and literals together stay within ``max_command``. APPEND message
  octets and refused LITERAL+ octets are passed on or dropped as they arrive, never
  accumulated, and a literal's announced size allocates nothing.
- A synchronising literal is never read before the session said :class:`ContinueLiteral`;
  the ``+`` for it is sent only through ``send()``.
- After our OK to STARTTLS, nothing is parsed until ``start_tls()``, which returns (for
  logging) and forgets every byte received before it.
- LOGIN/AUTHENTICATE reach the session only when ``tls_active`` or not ``require_tls``.
- Every response the core composes is one of the ``TEXT_*`` sentences of ``responses.py``
  or a grammar reason; neither contains unfiltered client data.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum, auto

from postkeep.imap import responses as r
from postkeep.imap.grammar import (
    COMMAND_NAMES,
    Append,
    AppendHead,
    Authenticate,
    Event,
    Idle,
    Login,
    ParseError,
    parse_append_head,
    parse_command,
    peek_command,
)
from postkeep.imap.responses import (
    Code,
    CodeName,
    Condition,
    Continuation,
    Output,
    Response,
    StatusResponse,
    Untagged,
)
from postkeep.imap.seqset import MAX_NUMBER
from postkeep.sasl.mechanisms import Credentials, plain_credentials

__all__ = [
    "CONTINUATIONS",
    "NEED_DATA",
    "TRANSITIONS",
    "VALID_IN",
    "AppendAborted",
    "AppendChunk",
    "AppendEnd",
    "AuthAborted",
    "AuthResponse",
    "ConnectionClosed",
    "ContinueLiteral",
    "Event",
    "IdleDone",
    "ImapServer",
    "Limits",
    "LiteralPending",
    "NeedData",
    "ProtocolError",
    "Rejected",
    "State",
    "UsageError",
]


# -- limits -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the core enforces. Defaults suit a company mail server."""

    #: One line, excluding literals and CRLF. RFC 7162 §4 asks servers to take at least
    #: 8192 octets; long UID sets from real clients need more.
    max_line: int = 64 * 1024
    #: APPEND message size; advertised as APPENDLIMIT (RFC 7889). The config's
    #: ``[limits] message_size``.
    max_literal: int = 50 * 1024 * 1024
    #: Any other literal (a password, a search string, a mailbox name): buffered, so small.
    max_small_literal: int = 64 * 1024
    #: All fragments and buffered literals of one command together.
    max_command: int = 1024 * 1024
    #: Parenthesised lists, search-key nesting, body part depth.
    max_depth: int = 32
    #: Comma-separated ranges in one sequence set.
    max_seqset_ranges: int = 10_000
    #: BADs sent in one connection before ``* BYE``.
    max_bad_commands: int = 20
    #: Commands in one connection before ``* BYE``.
    max_commands: int = 100_000
    #: Largest ``AppendChunk``.
    append_chunk: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be positive")
        if self.max_literal > MAX_NUMBER:
            raise ValueError("Limits.max_literal must fit in 32 bits (RFC 3501 §4.2)")


# -- states -------------------------------------------------------------------------------
class State(Enum):
    """RFC 3501 §3 connection states, plus the IDLE (RFC 2177) and SASL sub-states."""

    NOT_AUTHENTICATED = auto()
    AUTHENTICATED = auto()
    SELECTED = auto()
    LOGOUT = auto()
    IDLE = auto()  # between our "+ idling" and the client's DONE
    AUTHENTICATING = auto()  # between our first SASL challenge and the tagged result


_NA, _AU, _SE = State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED
_ANY = frozenset({_NA, _AU, _SE})
_AUTHED = frozenset({_AU, _SE})

#: Which command is valid in which state (RFC 3501 §6.1–6.4; extensions as cited).
VALID_IN: dict[str, frozenset[State]] = {
    # RFC 3501 §6.1: any state. RFC 2971 §3.1: ID too.
    "CAPABILITY": _ANY,
    "NOOP": _ANY,
    "LOGOUT": _ANY,
    "ID": _ANY,
    # RFC 3501 §6.2: not authenticated.
    "STARTTLS": frozenset({_NA}),
    "AUTHENTICATE": frozenset({_NA}),
    "LOGIN": frozenset({_NA}),
    # RFC 3501 §6.3: authenticated (and so also selected).
    "SELECT": _AUTHED,
    "EXAMINE": _AUTHED,
    "CREATE": _AUTHED,
    "DELETE": _AUTHED,
    "RENAME": _AUTHED,
    "SUBSCRIBE": _AUTHED,
    "UNSUBSCRIBE": _AUTHED,
    "LIST": _AUTHED,
    "LSUB": _AUTHED,
    "STATUS": _AUTHED,
    "APPEND": _AUTHED,
    "NAMESPACE": _AUTHED,  # RFC 2342 §5
    "IDLE": _AUTHED,  # RFC 2177 §3
    # RFC 5161 §3.1: ENABLE only in the authenticated state, before any SELECT.
    "ENABLE": frozenset({_AU}),
    # RFC 3501 §6.4: selected.
    "CHECK": frozenset({_SE}),
    "CLOSE": frozenset({_SE}),
    "UNSELECT": frozenset({_SE}),  # RFC 3691 §2
    "EXPUNGE": frozenset({_SE}),
    "SEARCH": frozenset({_SE}),
    "FETCH": frozenset({_SE}),
    "STORE": frozenset({_SE}),
    "COPY": frozenset({_SE}),
    "MOVE": frozenset({_SE}),  # RFC 6851 §3
    "UID SEARCH": frozenset({_SE}),
    "UID FETCH": frozenset({_SE}),
    "UID STORE": frozenset({_SE}),
    "UID COPY": frozenset({_SE}),
    "UID MOVE": frozenset({_SE}),
    "UID EXPUNGE": frozenset({_SE}),  # RFC 4315 §2.1
}
assert set(VALID_IN) == COMMAND_NAMES, "the state table must cover exactly the grammar"

#: How a tagged reply to a command moves the state. Absent: no change.
TRANSITIONS: dict[tuple[State, str, Condition], State] = {
    (_NA, "LOGIN", Condition.OK): _AU,
    (_NA, "AUTHENTICATE", Condition.OK): _AU,  # SASL-IR: done in one step (RFC 4959)
    (State.AUTHENTICATING, "AUTHENTICATE", Condition.OK): _AU,
    (State.AUTHENTICATING, "AUTHENTICATE", Condition.NO): _NA,
    (State.AUTHENTICATING, "AUTHENTICATE", Condition.BAD): _NA,
    (_AU, "SELECT", Condition.OK): _SE,
    (_AU, "EXAMINE", Condition.OK): _SE,
    # RFC 3501 §6.3.1: a failed SELECT/EXAMINE leaves no mailbox selected.
    (_SE, "SELECT", Condition.NO): _AU,
    (_SE, "EXAMINE", Condition.NO): _AU,
    (_SE, "CLOSE", Condition.OK): _AU,
    (_SE, "UNSELECT", Condition.OK): _AU,
    **{(s, "LOGOUT", Condition.OK): State.LOGOUT for s in _ANY},
}

#: Which commands may get a ``+`` continuation (besides literals), and the state it starts.
CONTINUATIONS: dict[tuple[State, str], State] = {
    (_NA, "AUTHENTICATE"): State.AUTHENTICATING,  # RFC 3501 §6.2.2
    (State.AUTHENTICATING, "AUTHENTICATE"): State.AUTHENTICATING,
    (_AU, "IDLE"): State.IDLE,  # RFC 2177 §3
    (_SE, "IDLE"): State.IDLE,
}

#: Capabilities after login (RFC 3501 §7.2.1); the session may extend the list.
AUTHENTICATED_CAPABILITIES: tuple[str, ...] = (
    "IMAP4rev1",
    "LITERAL+",  # RFC 7888
    "SASL-IR",  # RFC 4959
    "IDLE",  # RFC 2177
    "UIDPLUS",  # RFC 4315
    "MOVE",  # RFC 6851
    "UNSELECT",  # RFC 3691
    "NAMESPACE",  # RFC 2342
    "ID",  # RFC 2971
    "ENABLE",  # RFC 5161
    "SPECIAL-USE",  # RFC 6154
    "CREATE-SPECIAL-USE",
    "CHILDREN",  # RFC 3348
    "LIST-EXTENDED",  # RFC 5258
    "LIST-STATUS",  # RFC 5819
    "ESEARCH",  # RFC 4731
    "CONDSTORE",  # RFC 7162
)
#: Capabilities before login, before the TLS- and AUTH-dependent ones.
GREETING_CAPABILITIES: tuple[str, ...] = ("IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE")


# -- events -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LiteralPending(Event):
    """A synchronising literal ``{size}`` ends this line of the command ``command_name``.

    Answer :class:`ContinueLiteral` to receive it, or a tagged NO/BAD to refuse it (the
    client then abandons the command).
    """

    tag: str
    size: int
    command_name: str


@dataclass(frozen=True, slots=True)
class AppendChunk(Event):
    """The next octets of the APPEND message (no reply). Never in a ``repr``."""

    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"AppendChunk(<{len(self.data)} bytes>)"


@dataclass(frozen=True, slots=True)
class AppendEnd(Event):
    """The APPEND message is complete and the command well-formed: store it, then reply."""

    tag: str


@dataclass(frozen=True, slots=True)
class AppendAborted(Event):
    """The APPEND broke after its message: discard it and send ``response``."""

    tag: str
    response: StatusResponse


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """A client line in the SASL exchange, base64-decoded (RFC 3501 §6.2.2)."""

    tag: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthAborted(Event):
    """The client cancelled (``*``) or sent bad base64: drop the exchange, send ``response``."""

    tag: str
    response: StatusResponse


@dataclass(frozen=True, slots=True)
class IdleDone(Event):
    """IDLE ended. ``response`` is ``None`` after DONE (send ``tag OK``), or the BAD to
    send when the client sent something else (RFC 2177 §3)."""

    tag: str
    response: StatusResponse | None = None


@dataclass(frozen=True, slots=True)
class Rejected(Event):
    """The core refused a command by itself; send ``response``. ``tag`` is ``None`` when
    none could be read (``response`` is then ``* BAD``)."""

    tag: str | None
    response: StatusResponse
    #: LOGIN with a password on the line, or AUTHENTICATE PLAIN with an initial response,
    #: refused before TLS: the credentials crossed the wire in plaintext, and the driver
    #: may check them to warn the owner (``auth/exposure.py``). A password in a
    #: literal is never read, so it is never here. The response does not depend on it.
    leaked: Credentials | None = field(default=None, repr=False, compare=False)

    @property
    def reason(self) -> str:
        return self.response.text


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The client closed its side (or the connection is over): stop."""


class NeedData:
    """``next_event()`` needs more bytes: flush output, read, ``receive_data()``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class ContinueLiteral:
    """The session's "yes" to :class:`LiteralPending` or to an ``Append``."""


class ProtocolError(Exception):
    """The client broke the connection's budget; send ``hint`` (a ``* BYE``) and close."""

    def __init__(self, hint: StatusResponse) -> None:
        super().__init__(hint.text)
        self.hint = hint


class UsageError(RuntimeError):
    """The driver or session used the core wrongly (a bug on our side)."""


# -- internals ----------------------------------------------------------------------------
class _Phase(Enum):
    LINE = auto()  # reading a line: a command fragment, a SASL response, DONE, a trailer
    LITERAL = auto()  # reading a buffered literal
    APPEND = auto()  # streaming the APPEND message
    DISCARD = auto()  # dropping the octets of a refused LITERAL+
    SKIP_LINE = auto()  # dropping the rest of an over-long line
    TLS = auto()  # our OK to STARTTLS is out; waiting for start_tls()


class _Role(Enum):
    """What the next line is."""

    COMMAND = auto()
    AUTH = auto()
    IDLE = auto()
    APPEND_TRAILER = auto()


class _Kind(Enum):
    COMMAND = auto()  # needs a tagged reply (maybe after continuations)
    LITERAL = auto()  # LiteralPending: ContinueLiteral or tagged refusal
    APPEND = auto()  # Append: ContinueLiteral or tagged refusal
    REJECTED = auto()  # needs the core's own response


@dataclass(slots=True)
class _Await:
    kind: _Kind
    tag: str | None
    name: str
    continuable: bool = False
    synchronizing: bool = True
    size: int = 0


# RFC 3501 §9 literal = "{" number "}" CRLF; RFC 7888 literal+ = "{" number "+}".
_MARKER = re.compile(rb"\{([0-9]{1,10})(\+?)\}\Z")
_TAIL = 32  # bytes of an over-long line kept to find its literal marker


def _marker(line: bytes) -> tuple[int, int, bool] | None:
    """``(start, size, synchronizing)`` of a literal marker ending ``line``."""
    m = _MARKER.search(line)
    if m is None:
        return None
    return m.start(), int(m.group(1)), not m.group(2)


class ImapServer:
    """One IMAP connection's protocol state. See the module docstring for the flow."""

    def __init__(
        self,
        *,
        limits: Limits,
        tls_active: bool,
        tls_offered: bool,
        require_tls: bool,
        starttls_hint: str,
        sasl_mechanisms: Sequence[str] = ("PLAIN",),
    ) -> None:
        self.limits = limits
        self.tls_active = tls_active
        self.tls_offered = tls_offered
        self.require_tls = require_tls
        self.sasl_mechanisms = tuple(m.upper() for m in sasl_mechanisms)
        # Checked now, so that a bad hint fails at startup rather than at the first LOGIN.
        r.check_text(starttls_hint)
        self.starttls_hint = starttls_hint
        self._state = State.NOT_AUTHENTICATED
        self._idle_return = State.AUTHENTICATED
        self._buf = bytearray()
        self._scan_from = 0
        self._eof = False
        self._closed = False
        self._bad = 0
        self._commands = 0
        self._phase = _Phase.LINE
        self._role = _Role.COMMAND
        self._awaiting: _Await | None = None
        self._reset_command()
        self._left = 0  # octets left in the current literal / append / discard
        self._skipping = False  # the current command is being consumed and dropped
        self._skip_event: Event | None = None  # what to emit once it is consumed
        self._skip_tail = b""
        self._role_tag = ""  # the tag of the IDLE / AUTHENTICATE / APPEND in progress

    # -- public API -----------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def buffered(self) -> int:
        """Octets held: unparsed input plus the current command's fragments and literals."""
        return len(self._buf) + self._cmd_size

    def capabilities(self, state: State | None = None) -> list[str]:
        """The capabilities valid in ``state`` (default: now), for CAPABILITY and codes."""
        state = self._state if state is None else state
        if state in (State.NOT_AUTHENTICATED, State.AUTHENTICATING):
            caps = list(GREETING_CAPABILITIES)
            if self.tls_offered and not self.tls_active:
                caps.append("STARTTLS")  # RFC 2595 §3.1
            if self.require_tls and not self.tls_active:
                caps.append("LOGINDISABLED")  # RFC 3501 §6.2.3, RFC 2595 §3.2
            else:
                caps.extend(f"AUTH={m}" for m in self.sasl_mechanisms)
            return caps
        return [*AUTHENTICATED_CAPABILITIES, f"APPENDLIMIT={self.limits.max_literal}"]

    def greet(self) -> bytes:
        """``* OK [CAPABILITY …] postkeep ready`` (RFC 3501 §7.1.1)."""
        greeting = r.untagged_status(
            Condition.OK, r.TEXT_GREETING, r.capability_code(self.capabilities())
        )
        return r.encode_bytes(greeting)

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; ``b""`` means end of input."""
        if self._eof:
            if data:
                raise UsageError("receive_data() after end of input")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """The next event, or ``NEED_DATA``. Raises :class:`ProtocolError` (send its hint,
        close) when the client exhausted a budget."""
        if self._closed or self._state is State.LOGOUT:
            self._closed = True
            return ConnectionClosed()
        if self._awaiting is not None:
            raise UsageError(f"next_event() before the reply to {self._awaiting.name}")
        if self._phase is _Phase.TLS:
            raise UsageError("next_event() after the STARTTLS OK: call start_tls() first")
        if self._bad >= self.limits.max_bad_commands:
            self._close()
            raise ProtocolError(r.bye(r.TEXT_TOO_MANY_BAD))
        while True:
            event = self._step()
            if event is not None:
                return event

    def send(self, item: Response | ContinueLiteral) -> Output:
        """Check that ``item`` may be sent now, advance the state, return its wire form."""
        match item:
            case ContinueLiteral():
                return self._continue_literal()
            case Continuation():
                self._continuation()
            case StatusResponse(tag=None):
                self._untagged_status(item)
            case StatusResponse():
                self._tagged(item)
            case Untagged():
                pass
        return r.encode(item)

    def start_tls(self) -> bytes:
        """After our OK to STARTTLS: drop and return every unread byte, forget the parse
        state, and continue as a TLS connection (RFC 9051 §6.2.1, RFC 2595 §3.1)."""
        if self._phase is not _Phase.TLS:
            raise UsageError("start_tls() without an OK to STARTTLS")
        dropped = bytes(self._buf)
        self._buf.clear()
        self._scan_from = 0
        self._reset_command()
        self._phase = _Phase.LINE
        self._role = _Role.COMMAND
        self.tls_active = True
        return dropped

    # -- reading --------------------------------------------------------------------
    def _step(self) -> Event | NeedData | None:
        """One step of reading; ``None`` means progress was made, call again."""
        match self._phase:
            case _Phase.LINE:
                return self._read_line()
            case _Phase.LITERAL:
                if len(self._buf) < self._left:
                    return self._need()
                self._lits.append(bytes(self._buf[: self._left]))
                del self._buf[: self._left]
                self._cmd_size += self._left
                self._left = 0
                self._phase = _Phase.LINE
                return None
            case _Phase.APPEND:
                if self._left == 0:
                    self._phase = _Phase.LINE
                    self._role = _Role.APPEND_TRAILER
                    return None
                if not self._buf:
                    return self._need()
                n = min(len(self._buf), self._left, self.limits.append_chunk)
                chunk = bytes(self._buf[:n])
                del self._buf[:n]
                self._left -= n
                return AppendChunk(chunk)
            case _Phase.DISCARD:
                n = min(len(self._buf), self._left)
                del self._buf[:n]
                self._left -= n
                if self._left:
                    return self._need()
                self._phase = _Phase.LINE
                return None
            case _Phase.SKIP_LINE:
                lf = self._buf.find(b"\n")
                if lf < 0:
                    self._skip_tail = (self._skip_tail + self._buf)[-_TAIL:]
                    self._buf.clear()
                    return self._need()
                tail = (self._skip_tail + self._buf[: lf + 1])[-_TAIL:]
                del self._buf[: lf + 1]
                self._skip_tail = b""
                self._phase = _Phase.LINE
                return self._skipped_line(tail.rstrip(b"\r\n"))
            case _Phase.TLS:  # pragma: no cover - next_event() refuses before
                raise UsageError("call start_tls()")

    def _need(self) -> NeedData | ConnectionClosed:
        if self._eof:
            self._close()
            return ConnectionClosed()
        return NEED_DATA

    def _close(self) -> None:
        self._closed = True
        self._state = State.LOGOUT

    def _read_line(self) -> Event | NeedData | None:
        lf = self._buf.find(b"\n", self._scan_from)
        if lf < 0:
            if len(self._buf) > self.limits.max_line + 1:  # +1: a CR may be waiting
                return self._line_too_long()
            self._scan_from = len(self._buf)
            return self._need()
        self._scan_from = 0
        if lf > self.limits.max_line + 1:
            return self._line_too_long()
        raw = bytes(self._buf[: lf + 1])
        del self._buf[: lf + 1]
        bare_lf = not raw.endswith(b"\r\n")
        line = raw[:-1] if bare_lf else raw[:-2]
        if self._skipping:
            return self._skipped_line(line)
        match self._role:
            case _Role.COMMAND:
                return self._command_line(line, bare_lf)
            case _Role.AUTH:
                return self._auth_line(line, bare_lf)
            case _Role.IDLE:
                return self._idle_line(line, bare_lf)
            case _Role.APPEND_TRAILER:
                return self._append_trailer(line, bare_lf)

    def _line_too_long(self) -> Event | NeedData | None:
        """An over-long line: drop it as it arrives and answer once it has ended."""
        if not self._skipping:
            event: Event
            match self._role:
                case _Role.COMMAND:
                    if self._frags:
                        tag = self._cmd_tag
                    else:
                        self._count_command()
                        # The tag is valid only if a space ends it within the line limit.
                        head = bytes(self._buf[: self.limits.max_line])
                        space = head.find(b" ")
                        tag = peek_command(head[: space + 1])[0] if space > 0 else None
                    event = Rejected(tag, self._reply(tag, Condition.BAD, r.TEXT_LINE_TOO_LONG))
                case _Role.AUTH:
                    event = AuthAborted(self._role_tag, self._bad_reply(r.TEXT_LINE_TOO_LONG))
                case _Role.IDLE:
                    event = self._end_idle(self._bad_reply(r.TEXT_LINE_TOO_LONG))
                case _Role.APPEND_TRAILER:
                    event = AppendAborted(self._role_tag, self._bad_reply(r.TEXT_LINE_TOO_LONG))
            self._reset_command()
            self._skipping = True
            self._skip_event = event
        self._scan_from = 0
        self._skip_tail = b""
        self._phase = _Phase.SKIP_LINE
        return None

    def _skipped_line(self, line: bytes) -> Event | None:
        """A line of a command being dropped has ended: follow its LITERAL+, or finish."""
        if self._role in (_Role.COMMAND, _Role.APPEND_TRAILER):
            found = _marker(line)
            if found is not None and not found[2]:
                # RFC 7888: the client sends these octets without waiting: drop them.
                self._left = found[1]
                self._phase = _Phase.DISCARD
                return None
            # No literal, or a synchronising one we will never ask for: the command ends.
        self._skipping = False
        self._role = _Role.COMMAND
        event, self._skip_event = self._skip_event, None
        if event is not None:
            self._await_reply_to(event)
        return event

    # -- commands -------------------------------------------------------------------
    def _reset_command(self) -> None:
        self._frags: list[bytes] = []
        self._lits: list[bytes] = []
        self._cmd_size = 0
        self._cmd_tag: str | None = None
        self._cmd_name: str | None = None

    def _count_command(self) -> None:
        self._commands += 1
        if self._commands > self.limits.max_commands:
            self._close()
            raise ProtocolError(r.bye(r.TEXT_TOO_MANY_COMMANDS))

    def _command_line(self, line: bytes, bare_lf: bool) -> Event | None:
        first = not self._frags
        found = None if bare_lf else _marker(line)
        fragment = line if found is None else line[: found[0]]
        if first:
            self._count_command()
            tag, name = peek_command(fragment)
            self._cmd_tag, self._cmd_name = tag, name
            if not line:
                return self._refuse(r.TEXT_EMPTY_LINE, None)
            if bare_lf:
                return self._refuse(r.TEXT_BARE_LF, None)
            refusal = self._gate(tag, name)
            if refusal is not None:
                event = self._refuse_with(refusal, found)
                if isinstance(event, Rejected) and found is None and self._privacy(name):
                    leaked = _leaked(fragment, self.limits.max_depth)
                    if leaked is not None:
                        event = replace(event, leaked=leaked)
                return event
        elif bare_lf:
            return self._refuse(r.TEXT_BARE_LF, None)
        tag, name = self._cmd_tag, self._cmd_name
        assert tag is not None and name is not None  # the gate refused otherwise
        self._frags.append(fragment)
        self._cmd_size += len(fragment)
        if self._cmd_size > self.limits.max_command:
            return self._refuse(r.TEXT_COMMAND_TOO_LONG, found)
        if found is None:
            return self._complete_command(tag)
        _, size, sync = found
        if size > MAX_NUMBER:
            # RFC 3501 §4.2: a number is 32-bit. We cannot know how many octets follow.
            return self._refuse(r.TEXT_LITERAL_NUMBER, (0, 0, True))
        if name == "APPEND":
            try:
                head = parse_append_head(self._frags, self._lits, max_depth=self.limits.max_depth)
            except ParseError as exc:
                return self._refuse_with(self._parse_reply(tag, exc), found)
            if head is not None:
                return self._start_append(head, found)
        if size > self.limits.max_small_literal or self._cmd_size + size > self.limits.max_command:
            # Refused before reading: nothing is allocated for the announced size.
            return self._refuse(r.TEXT_LITERAL_TOO_BIG, found, code=Code(CodeName.TOOBIG))
        self._left = size
        if sync:
            self._awaiting = _Await(_Kind.LITERAL, tag, name, size=size)
            return LiteralPending(tag, size, name)
        self._phase = _Phase.LITERAL  # RFC 7888: the octets come without a "+"
        return None

    def _start_append(self, head: AppendHead, found: tuple[int, int, bool]) -> Event | None:
        tag = head.tag
        _, size, sync = found
        self._reset_command()
        if size > self.limits.max_literal:
            # RFC 7889 / RFC 4469: NO [TOOBIG]; for {n+} only after dropping n octets.
            response = r.tagged(tag, Condition.NO, r.TEXT_MESSAGE_TOO_BIG, Code(CodeName.TOOBIG))
            return self._refuse_with(response, found)
        event = Append(tag, head.mailbox, head.flags, head.internal_date, size, sync)
        self._awaiting = _Await(_Kind.APPEND, tag, "APPEND", synchronizing=sync, size=size)
        self._role_tag = tag
        return event

    def _complete_command(self, tag: str) -> Event:
        try:
            command = parse_command(
                self._frags,
                self._lits,
                max_depth=self.limits.max_depth,
                max_ranges=self.limits.max_seqset_ranges,
            )
        except ParseError as exc:
            response = self._parse_reply(tag, exc)
            self._reset_command()
            return self._rejected(Rejected(tag, response))
        self._reset_command()
        continuable = isinstance(command, Authenticate | Idle)
        self._awaiting = _Await(_Kind.COMMAND, tag, command.name, continuable=continuable)
        if isinstance(command, Authenticate | Idle):
            self._role_tag = tag
        return command

    def _gate(self, tag: str | None, name: str | None) -> StatusResponse | None:
        """The state table and the TLS rules, before any argument or literal is read."""
        if tag is None:
            return r.untagged_status(Condition.BAD, r.TEXT_NO_TAG)
        if name is None:
            return r.tagged(tag, Condition.BAD, r.TEXT_NO_COMMAND)
        valid = VALID_IN.get(name)
        if valid is None:
            return r.tagged(tag, Condition.BAD, f"{r.TEXT_UNKNOWN_COMMAND} {_safe(name)}")
        if self._state not in valid:
            return r.tagged(tag, Condition.BAD, self._wrong_state_text(name))
        if name in ("LOGIN", "AUTHENTICATE") and self.require_tls and not self.tls_active:
            # RFC 2595 §3.2, RFC 5530 §3: no credentials over plaintext, and say why.
            return r.privacy_required(tag, self.starttls_hint)
        if name == "STARTTLS":
            if self.tls_active:
                return r.tagged(tag, Condition.BAD, r.TEXT_TLS_ACTIVE)
            if not self.tls_offered:
                return r.tagged(tag, Condition.BAD, r.TEXT_TLS_NOT_OFFERED)
        return None

    def _privacy(self, name: str | None) -> bool:
        return name in ("LOGIN", "AUTHENTICATE") and self.require_tls and not self.tls_active

    def _wrong_state_text(self, name: str) -> str:
        if self._state is State.NOT_AUTHENTICATED:
            return f"{name}: {r.TEXT_NOT_AUTHENTICATED}"
        if name in ("LOGIN", "AUTHENTICATE", "STARTTLS"):
            return f"{name}: {r.TEXT_ALREADY_AUTHENTICATED}"
        if self._state is State.AUTHENTICATED:
            return f"{name}: {r.TEXT_NOT_SELECTED}"
        return f"{name}: {r.TEXT_NOT_IN_SELECTED}"

    def _parse_reply(self, tag: str | None, exc: ParseError) -> StatusResponse:
        return self._reply(tag, exc.condition, exc.reason, exc.code)

    def _reply(
        self, tag: str | None, condition: Condition, text: str, code: Code | None = None
    ) -> StatusResponse:
        if tag is None:
            return r.untagged_status(Condition.BAD, text, code)
        return r.tagged(tag, condition, text, code)

    def _bad_reply(self, text: str) -> StatusResponse:
        return r.tagged(self._role_tag, Condition.BAD, text)

    def _refuse(
        self, text: str, found: tuple[int, int, bool] | None, *, code: Code | None = None
    ) -> Event | None:
        return self._refuse_with(self._reply(self._cmd_tag, Condition.BAD, text, code), found)

    def _refuse_with(
        self, response: StatusResponse, found: tuple[int, int, bool] | None
    ) -> Event | None:
        """Refuse the current command. A LITERAL+ that ends this line will be sent anyway:
        drop it (and any further ones in the command) first, then answer."""
        self._reset_command()
        event = Rejected(response.tag, response)
        if found is not None and not found[2]:
            self._skipping = True
            self._skip_event = event
            self._left = found[1]
            self._phase = _Phase.DISCARD
            return None
        return self._rejected(event)

    def _rejected(self, event: Rejected) -> Rejected:
        self._await_reply_to(event)
        return event

    def _await_reply_to(self, event: Event) -> None:
        match event:
            case Rejected(tag=tag):
                self._awaiting = _Await(_Kind.REJECTED, tag, "rejected command")
            case AppendAborted(tag=tag):
                self._awaiting = _Await(_Kind.COMMAND, tag, "APPEND")
            case AuthAborted(tag=tag):
                self._awaiting = _Await(_Kind.COMMAND, tag, "AUTHENTICATE")
            case IdleDone(tag=tag):
                self._awaiting = _Await(_Kind.COMMAND, tag, "IDLE")
            case _:  # pragma: no cover - every skip event is one of the above
                raise AssertionError(event)

    # -- other lines ----------------------------------------------------------------
    def _auth_line(self, line: bytes, bare_lf: bool) -> Event:
        tag = self._role_tag
        event: Event
        if line == b"*" and not bare_lf:
            # RFC 3501 §6.2.2: the client cancels; we answer BAD.
            event = AuthAborted(tag, self._bad_reply(r.TEXT_AUTH_CANCELLED))
        else:
            try:
                if bare_lf:
                    raise ValueError("bare LF")
                event = AuthResponse(tag, base64.b64decode(line, validate=True))
            except (binascii.Error, ValueError):
                event = AuthAborted(tag, self._bad_reply(r.TEXT_AUTH_BAD_BASE64))
        cont = isinstance(event, AuthResponse)
        self._awaiting = _Await(_Kind.COMMAND, tag, "AUTHENTICATE", continuable=cont)
        return event

    def _end_idle(self, response: StatusResponse | None) -> IdleDone:
        self._state = self._idle_return
        self._role = _Role.COMMAND
        return IdleDone(self._role_tag, response)

    def _idle_line(self, line: bytes, bare_lf: bool) -> Event:
        # RFC 2177 §3: only DONE ends IDLE; anything else is answered BAD, ending it too.
        ok = line.upper() == b"DONE" and not bare_lf
        event = self._end_idle(None if ok else self._bad_reply(r.TEXT_IDLE_EXPECTED_DONE))
        self._await_reply_to(event)
        return event

    def _append_trailer(self, line: bytes, bare_lf: bool) -> Event | None:
        tag = self._role_tag
        if not line and not bare_lf:
            self._role = _Role.COMMAND
            self._awaiting = _Await(_Kind.COMMAND, tag, "APPEND")
            return AppendEnd(tag)
        text = r.TEXT_BARE_LF if bare_lf else r.TEXT_APPEND_TRAILER
        event = AppendAborted(tag, self._bad_reply(text))
        found = None if bare_lf else _marker(line)
        if found is not None and not found[2]:
            # A MULTIAPPEND-style next message (RFC 3502) we did not offer: drop it.
            self._skipping = True
            self._skip_event = event
            self._left = found[1]
            self._phase = _Phase.DISCARD
            return None
        self._role = _Role.COMMAND
        self._await_reply_to(event)
        return event

    # -- replies --------------------------------------------------------------------
    def _continue_literal(self) -> Output:
        aw = self._awaiting
        if aw is None or aw.kind not in (_Kind.LITERAL, _Kind.APPEND):
            raise UsageError("ContinueLiteral without a pending literal")
        self._awaiting = None
        self._left = aw.size
        if aw.kind is _Kind.LITERAL:
            self._phase = _Phase.LITERAL
        else:
            self._phase = _Phase.APPEND
            if not aw.synchronizing:
                return []  # RFC 7888: the client is already sending; no "+"
        return r.encode(Continuation(r.TEXT_CONTINUE_LITERAL))

    def _continuation(self) -> None:
        aw = self._awaiting
        if aw is None or not aw.continuable:
            raise UsageError("a continuation request is only for AUTHENTICATE and IDLE")
        new = CONTINUATIONS.get((self._state, aw.name))
        if new is None:  # pragma: no cover - continuable implies a table entry
            raise UsageError(f"no continuation for {aw.name} in {self._state.name}")
        if new is State.IDLE:
            self._idle_return = self._state
            self._role = _Role.IDLE
            self._awaiting = None
        else:
            self._role = _Role.AUTH
            self._awaiting = None
        self._state = new

    def _untagged_status(self, response: StatusResponse) -> None:
        if response.condition is Condition.BAD:
            self._bad += 1
            aw = self._awaiting
            if aw is not None and aw.kind is _Kind.REJECTED and aw.tag is None:
                self._awaiting = None
        elif response.condition is Condition.BYE:
            self._state = State.LOGOUT  # RFC 3501 §7.1.5: the server closes after BYE

    def _tagged(self, response: StatusResponse) -> None:
        aw = self._awaiting
        if aw is None or aw.tag != response.tag:
            raise UsageError(f"tagged response {response.tag!r} answers no pending command")
        if response.condition is Condition.BAD:
            self._bad += 1
        self._awaiting = None
        match aw.kind:
            case _Kind.LITERAL:
                # RFC 3501 §7.5: a refused synchronising literal is never sent.
                self._reset_command()
                self._left = 0
            case _Kind.APPEND:
                self._role = _Role.COMMAND
                if not aw.synchronizing:
                    # LITERAL+: the octets are on their way; drop them and the line end.
                    self._skipping = True
                    self._skip_event = None
                    self._left = aw.size
                    self._phase = _Phase.DISCARD
            case _Kind.COMMAND:
                self._role = _Role.COMMAND
                new = TRANSITIONS.get((self._state, aw.name, response.condition))
                if new is not None and self._state is not State.LOGOUT:
                    self._state = new
                if aw.name == "STARTTLS" and response.condition is Condition.OK:
                    self._phase = _Phase.TLS
            case _Kind.REJECTED:
                pass


def _safe(name: str) -> str:
    """A command name (atom characters only, from the grammar) shortened for a reply."""
    return name[:32]


def _leaked(line: bytes, max_depth: int) -> Credentials | None:
    """The credentials on a LOGIN or AUTHENTICATE PLAIN line (RFC 9051 §6.2.3, RFC 4959
    §3) refused before TLS, when the whole command was on that line."""
    try:
        command = parse_command([line], [], max_depth=max_depth)
    except ParseError:
        return None
    if isinstance(command, Login):
        return Credentials(command.user, command.user, command.password)
    if (isinstance(command, Authenticate) and command.mechanism.upper() == "PLAIN"
            and command.initial_response):
        return plain_credentials(command.initial_response)
    return None
